"""The DINOv3 family on the fast path: plan sites for the rotary attention and the gated MLP (the Triton
kernels verified and chosen under the interpreter), optimize() on a CPU in float32 and bf16, sessions and
predictors under plans, torch.compile, and the compiled frame step's export."""

from __future__ import annotations

import pytest
import torch

import videomt_fast
from videomt_fast import EomtDinov3Config, EomtDinov3ForUniversalSegmentation, VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast import ops
from videomt_fast.ops import registry
from videomt_fast.runtime import compiled, plans

from helpers import TINY_DINOV3, agreement, assert_outputs_close, images, randomize_, video

SIZE = (TINY_DINOV3["image_size"], TINY_DINOV3["image_size"])
DINOV3 = dict(TINY_DINOV3, num_register_tokens=4)


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDEOMT_FAST_PLAN_CACHE", str(tmp_path / "plans"))
    monkeypatch.delenv("VIDEOMT_FAST_PLAN", raising=False)
    monkeypatch.setattr(registry, "_EXCLUDED", {})


def _videomt(**overrides):
    config = VideomtConfig(**{**DINOV3, "backbone_type": "dinov3", **overrides})
    return randomize_(VideomtForUniversalSegmentation(config), seed=11)


def _eomt(**overrides):
    return randomize_(EomtDinov3ForUniversalSegmentation(EomtDinov3Config(**{**DINOV3, **overrides})), seed=12)


def _stub_timer(ms):
    def timer(site, name, fn, args):
        return ms.get(name, 5.0)

    return timer


@pytest.mark.parametrize("kind", ["videomt-gated", "eomt-masked"])
def test_rope_attention_and_gated_mlp_are_plan_sites_and_the_kernels_verify(kind):
    """Under the interpreter the Triton candidates of every DINOv3 site are verified against float64 and, timed
    faster by a stub, chosen; the planned model then agrees with a float64 reference model."""
    model = _videomt(use_gated_mlp=True, hidden_act="silu") if kind.startswith("videomt") else _eomt()
    with ops.use_backend("triton"):
        plan = plans.build(model, 1, SIZE, timer=_stub_timer({"triton": 1.0, "reference": 2.0}), gate=False)
    sites = {site.op for site in plan.sites.values()}
    assert "rope_attention" in sites and "attention" not in sites
    assert ("linear_gated" in sites) == kind.startswith("videomt")
    if kind.startswith("eomt"):
        assert "masked.rope_attention" in plan.sites
    for site in plan.sites.values():
        names = {c.name: c for c in site.candidates}
        assert site.chosen == "triton", (site.key, [(c.name, c.status, c.reason) for c in site.candidates])
        assert names["triton"].error <= names["triton"].tolerance <= (1e-3 if site.op == "mask_bits" else 1e-4)
    plans.apply(model, plan)
    ref64 = type(model)(model.config).double()
    ref64.load_state_dict(model.state_dict())
    x = video(1, 2) if kind.startswith("videomt") else images(1, 48)[:, None]
    with torch.no_grad(), ops.use_backend("triton"):
        masks, _ = plans.run_frames(model, x)
    with torch.no_grad(), ops.use_backend("reference"):
        truth, _ = plans.run_frames(ref64, x.double())
    assert float((masks.double() - truth).norm() / truth.norm()) < 1e-5


def test_optimize_on_cpu_float32_keeps_every_output():
    model, eomt = _videomt(norm_queries=True), _eomt()
    x, pixels = video(1, 3), images(2, 48)
    with torch.no_grad():
        ref, ref_eomt = model(pixel_values_videos=x), eomt(pixel_values=pixels)
        model.optimize(dtype=torch.float32)
        eomt.optimize(dtype=torch.float32)
        out, out_eomt = model(pixel_values_videos=x), eomt(pixel_values=pixels)
        session = model.new_session()
        steps = [session.step(x[:, t]) for t in range(3)]
        predicted = eomt.new_predictor()(pixels)
    assert_outputs_close(out, ref, atol=0.0)
    assert_outputs_close(out_eomt, ref_eomt, atol=0.0)
    assert_outputs_close(predicted, ref_eomt, atol=0.0)
    for t, step in enumerate(steps):
        assert torch.equal(step.masks_queries_logits, ref.masks_queries_logits[t:t + 1])


@pytest.mark.parametrize("family", ["videomt", "eomt"])
def test_cpu_bf16(family):
    """bf16 on a CPU (what optimize() keeps where it is native, faster and agrees): the rotary tables stay
    float32 and are cast inside the op; the masks agree with float32."""
    model = _videomt() if family == "videomt" else _eomt(num_blocks=1)
    kwargs = {"pixel_values_videos": video(1, 2)} if family == "videomt" else {"pixel_values": images(1, 48)}
    with torch.no_grad():
        ref = model(**kwargs)
        model.optimize(dtype=torch.bfloat16)
        out = model(**kwargs)
    assert out.masks_queries_logits.dtype == torch.bfloat16
    masks, _ = agreement(out, ref)
    assert masks > 0.95


@pytest.mark.parametrize("family", ["videomt", "eomt"])
def test_fullgraph_torch_compile(family):
    model = _videomt(use_gated_mlp=True) if family == "videomt" else _eomt()
    kwargs = {"pixel_values_videos": video(2, 2, 48, 32)} if family == "videomt" else {"pixel_values": images(2, 32, 48)}
    torch._dynamo.reset()
    graph = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = graph(**kwargs)
        ref = model(**kwargs)
    assert_outputs_close(out, ref, atol=1e-5)


def test_compiled_frame_step_exports_and_matches():
    """The compiled frame step's front half: torch.export of a DINOv3 session's later frame (rotary tables
    computed in the graph, at a grid other than the config's) gives the eager step's outputs."""
    model = _videomt(use_gated_mlp=True)
    size = (32, 48)
    program = compiled.export_step(model, 1, size)
    frames = torch.randn(1, 3, *size)
    prev = torch.randn(1, model.config.num_queries, model.config.hidden_size)
    with torch.no_grad():
        got = program.module()(frames, prev)
        want = compiled.FrameStep(model, size)(frames, prev)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_frame_step_is_chosen_and_matches(monkeypatch, request):
    """A real AOTInductor compile of a DINOv3 session step (about a minute): verified, chosen, same outputs."""
    from videomt_fast.runtime.fast import plans_of

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a second AOTInductor compile runs only when asked for: -m slow")

    monkeypatch.setattr(compiled, "MIN_GAIN", float("inf"))
    model = _videomt()
    ref = _videomt()
    model.optimize(dtype=torch.float32, compile="on", shapes=[(1, 48, 32)])
    plan = plans_of(model)[0]
    assert plan.sites[compiled.SITE].chosen == compiled.NAME, plan.format()
    x = video(1, 3, 48, 32)
    with torch.inference_mode():
        session, plain = model.new_session(), ref.new_session()
        for t in range(3):
            a, b = session.step(x[:, t]), plain.step(x[:, t])
            assert torch.allclose(a.masks_queries_logits, b.masks_queries_logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ the apps: bench, profiler, plan


@pytest.mark.parametrize("model", ["videomt", "eomt"])
def test_bench_arch_dinov3(tmp_path, model):
    """``bench --arch dinov3-s``: transformers' rows (EoMT-DINOv3; for VidEoMT its DINOv3 modules in the VidEoMT
    loop, transformers having no such class) and the fast rows, which agree with them."""
    import json

    from videomt_fast.apps import benchmark

    argv = ["--arch", "dinov3-s", "--model", model, "--device", "cpu", "--size", "32x32", "--repeats", "1",
            "--warmup", "0", "--num-inputs", "1", "--frames", "2", "--online-frames", "2", "--e2e-frames", "1",
            "--agree-frames", "2", "--e2e-size", "32x40", "--providers", "hf-eager-fp32,fast", "--out-dir",
            str(tmp_path / "out"), "--dtype", "float32"]  # (float32: the plumbing, not a CPU's dtype decision)
    assert benchmark.main(argv) == 0
    (name,) = list((tmp_path / "out").iterdir())
    report = json.loads(name.read_text())
    assert report["config"]["hidden_size"] == 384 and report["config"].get("rope_parameters")
    rows = {(r["provider"], r["mode"]): r for r in report["rows"]}
    for mode in benchmark.MODES:
        assert rows[("hf-eager-fp32", mode)]["status"] == "ok"
        fast = rows[("fast", mode)]
        assert fast["status"] == "ok" and fast["agreement"]["mask_sign"] == 1.0, fast
        assert fast["agreement"]["mask_max_abs_err"] < 1e-3
    sites = {site["op"] for p in report["plan"]["plans"] for site in p["sites"].values()}
    assert "rope_attention" in sites and "attention" not in sites


def test_profiler_stages_compute_what_a_dinov3_session_step_computes():
    from videomt_fast.apps import profiler

    args = profiler.parse_args(["--arch", "dinov3-s", "--device", "cpu", "--size", "32x32", "--no-postprocess",
                                "--provider", "fast-ref"])
    model, _ = profiler.build_model(args)
    assert model.config.backbone_type == "dinov3"
    frame_fn = profiler._frame_fn(model, None, args)
    session = model.new_session(batch_size=1)
    prev = None
    with torch.inference_mode():
        for t in range(2):
            frame = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(t))
            masks, classes, prev = frame_fn(frame, prev, None)
            out = session.step(frame)
            assert torch.equal(masks, out.masks_queries_logits) and torch.equal(classes, out.class_queries_logits)
            assert torch.equal(prev, session.propagated_queries)


def test_plan_command_for_dinov3(capsys):
    from videomt_fast.apps import plan

    assert plan.main(["--arch", "dinov3-s", "--model", "eomt", "--device", "cpu", "--size", "32x48",
                      "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "early.rope_attention" in printed and "masked.rope_attention" in printed
