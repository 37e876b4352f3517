"""CUDA graphs at the published model shapes, in bf16, through the public API (GPU only).

The CPU suite captures nothing; earlier GPU tests captured graphs only at toy sizes in fp32. Here
ViT-S and ViT-L VidEoMT / EoMT at 640x640 (1 + 4 + 1600 tokens, + 200 queries) run as a user runs them:

* ``model.to("cuda").optimize()`` then ``new_session()`` (a graphed session) equals, bit for bit, the same
  bf16 model stepped eagerly (``optimize(cuda_graphs=False)``): the same kernels on the same inputs, so
  any difference is the graph (stale addresses, a missed copy, a wrong static buffer). Sound because the
  algorithms are the same on both streams: cuDNN deterministic (tests/conftest.py, per gpu test) and one
  cuBLAS workspace size on every stream (``CUBLAS_WORKSPACE_CONFIG``, set by conftest for gpu runs);
* every Triton/CUDA candidate of the plans was verified on the device and the plans' tables hold what
  they chose (``helpers.assert_plans_ran_verified_kernels``): the comparisons are of our kernels, not of
  reference ops a plan fell back to;
* the graphed session is judged against the fp32 reference ops like every low-precision kernel
  (``videomt_fast.testing.kernel_checks.assert_close``: at most twice PyTorch's own bf16 error);
* the graphed clip forward and EoMT's graphed masked predictor equal their eager runs;
* with two GPUs, a model on ``cuda:1`` while ``cuda:0`` is current gives the results of ``cuda:0``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from videomt_fast import EomtConfig, EomtForUniversalSegmentation, VideomtConfig, VideomtForUniversalSegmentation, ops
from videomt_fast.model.configuration import config_from_preset
from videomt_fast.testing.kernel_checks import assert_close

from helpers import assert_plans_ran_verified_kernels

pytestmark = pytest.mark.gpu

SIZE = 640
FRAMES = 3
PRESETS = ["vit-s", "vit-l"]
FIELDS = ("class_queries_logits", "masks_queries_logits")


def _model(cls, config_cls, preset: str, device="cuda"):
    """A freshly initialized model of the preset's shapes; the same weights on every device (seeded CPU init)."""
    torch.manual_seed(0)
    return cls(config_from_preset(preset, config_cls, image_size=SIZE)).eval().to(device)


def _clip(device="cuda", frames=FRAMES, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 3, SIZE, SIZE, generator=gen).to(device)


def _step_all(session, clip, dtype):
    outs = []
    for t in range(clip.shape[1]):
        out = session.step(clip[:, t].to(dtype))
        outs.append({f: getattr(out, f).clone() for f in FIELDS})
    torch.cuda.synchronize()
    return outs


@pytest.fixture(scope="module", params=PRESETS)
def videomt(request):
    """(fp32 model, bf16 optimized copy) of one preset; the copy holds the same weights."""
    ref = _model(VideomtForUniversalSegmentation, VideomtConfig, request.param)
    fast = copy.deepcopy(ref).optimize(dtype=torch.bfloat16)
    yield request.param, ref, fast
    del ref, fast
    torch.cuda.empty_cache()


def _sessions(fast, clip):
    """(graphed outputs, eager outputs) of the bf16 model over the clip, both on the auto-dispatched kernels."""
    fast.optimize(dtype=torch.bfloat16, cuda_graphs=True)
    session = fast.new_session()
    assert type(session).__name__ == "GraphedSession", type(session)
    graphed = _step_all(session, clip, torch.bfloat16)
    fast.optimize(dtype=torch.bfloat16, cuda_graphs=False)
    eager_session = fast.new_session()
    assert type(eager_session).__name__ != "GraphedSession"
    eager = _step_all(eager_session, clip, torch.bfloat16)
    fast.optimize(dtype=torch.bfloat16, cuda_graphs=True)
    return graphed, eager


def test_graphed_session_equals_eager_bf16(videomt):
    preset, _, fast = videomt
    clip = _clip()
    with torch.no_grad():
        graphed, eager = _sessions(fast, clip)
    assert len(graphed) == len(eager) == FRAMES
    for t, (g, e) in enumerate(zip(graphed, eager)):
        for f in FIELDS:
            assert g[f].dtype == torch.bfloat16 and torch.isfinite(g[f]).all(), (preset, t, f)
            assert torch.equal(g[f], e[f]), f"{preset} frame {t} {f}: graphed differs from eager ({_ulps(g[f], e[f])})"
    assert_plans_ran_verified_kernels(fast)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> str:
    """How far apart, in units in the last place of bf16 at the larger magnitude."""
    diff = (a.float() - b.float()).abs()
    ulp = torch.finfo(a.dtype).eps * torch.maximum(a.float().abs(), b.float().abs()).clamp_min(1e-30)
    return f"{int((a != b).sum())} elements differ, up to {float((diff / ulp).max()):.1f} ulp"


def test_graphed_session_against_fp32_reference(videomt):
    """bf16 graphed session vs the fp32 reference ops: within twice PyTorch's own bf16 error, every frame
    (the propagated queries carry any error forward)."""
    preset, ref, fast = videomt
    clip = _clip(seed=2)
    with torch.no_grad():
        graphed, _ = _sessions(fast, clip)
        with ops.use_backend("reference"):
            truth = _step_all(ref.new_session(), clip, torch.float32)
            torch_bf16 = _step_all(_bf16_reference_copy(ref).new_session(), clip, torch.bfloat16)
    assert len(graphed) == len(truth) == len(torch_bf16) == FRAMES
    for t in range(FRAMES):
        for f in FIELDS:
            assert_close(graphed[t][f], truth[t][f], torch_bf16[t][f], what=f"{preset} frame {t} {f}")
    assert_plans_ran_verified_kernels(fast)


def _bf16_reference_copy(ref):
    """The fp32 model's weights in bf16, not optimized (plain PyTorch ops under the reference backend)."""
    model = copy.deepcopy(ref)
    probs = model.attn_mask_probs.clone()
    model.to(torch.bfloat16)
    model.attn_mask_probs = probs  # read as floats, never multiplied (as optimize() keeps it)
    return model


def test_graphed_clip_forward_equals_eager(videomt):
    preset, _, fast = videomt
    clip = _clip(frames=2, seed=3).to(torch.bfloat16)
    with torch.no_grad():
        fast.optimize(dtype=torch.bfloat16, cuda_graphs=True)
        graphed = fast(pixel_values_videos=clip)
        graphed_again = fast(pixel_values_videos=clip)  # replays the graphs captured by the first call
        fast.optimize(dtype=torch.bfloat16, cuda_graphs=False)
        eager = fast(pixel_values_videos=clip)
        fast.optimize(dtype=torch.bfloat16, cuda_graphs=True)
    for f in FIELDS:
        assert torch.equal(getattr(graphed, f), getattr(eager, f)), f"{preset} {f}: graphed clip forward differs"
        assert torch.equal(getattr(graphed_again, f), getattr(eager, f)), f"{preset} {f}: replay differs"
    assert_plans_ran_verified_kernels(fast)


@pytest.mark.parametrize("preset", PRESETS)
def test_graphed_masked_eomt_predictor_equals_eager(preset):
    """EoMT with masked attention on (fresh models keep attn_mask_probs at 1): graphed predictor == eager."""
    model = _model(EomtForUniversalSegmentation, EomtConfig, preset).optimize(dtype=torch.bfloat16)
    assert bool((model.attn_mask_probs == 1).all())
    images = _clip(frames=2, seed=4)[0].to(torch.bfloat16)  # (2, 3, H, W)
    with torch.no_grad():
        predictor = model.new_predictor()
        graphed = predictor(images)
        graphed_again = predictor(images)
        model.optimize(dtype=torch.bfloat16, cuda_graphs=False)
        eager = model(pixel_values=images)
    for f in FIELDS:
        assert torch.isfinite(getattr(graphed, f)).all()
        assert torch.equal(getattr(graphed, f), getattr(eager, f)), f"{preset} {f}: graphed predictor differs"
        assert torch.equal(getattr(graphed_again, f), getattr(eager, f)), f"{preset} {f}: replay differs"
    choices = assert_plans_ran_verified_kernels(model)
    assert "masked.attention" in choices  # the masked layers have a plan stage of their own
    del model
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ a second GPU


def _need_two_gpus():
    # in the body, not a skipif mark: without CUDA the gpu mark's own skip must be the one reported
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")


def test_every_triton_op_runs_on_the_tensors_device():
    """Each Triton op on cuda:1 tensors with cuda:0 current equals the same op on cuda:0."""
    _need_two_gpus()
    from videomt_fast.testing.kernel_checks import run_triton

    gen = torch.Generator().manual_seed(5)
    d, heads, seq, q = 128, 2, 5 + 37, 7

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    cases = {
        "attention": (r(2, seq, 3 * d), heads, None, 0, 0),
        "layer_norm": (r(2, seq, d), r(d), r(d), 1e-6),
        "residual_layer_norm": (r(2, seq, d), r(2, seq, d), r(d), r(d), r(d), 1e-6),
        "linear_gelu": (r(2, seq, d), r(3 * d, d), r(3 * d)),
        "linear_residual": (r(2, seq, 3 * d), r(d, 3 * d), r(d), r(d), r(2, seq, d)),
        "mask_bits": (r(2, q, 24, 28), (6, 7)),
    }
    torch.cuda.set_device(0)
    for name, args in cases.items():
        outs = []
        for device in ("cuda:0", "cuda:1"):
            moved = tuple(a.to(device, torch.bfloat16 if a.is_floating_point() and name != "mask_bits" else a.dtype)
                          if isinstance(a, torch.Tensor) else a for a in args)
            out = run_triton(name, *moved)
            out = out if isinstance(out, torch.Tensor) else out[-1]
            torch.cuda.synchronize(device)
            assert out.device == torch.device(device), name
            outs.append(out.cpu())
        assert torch.cuda.current_device() == 0
        assert torch.equal(outs[0], outs[1]), f"{name}: cuda:1 differs from cuda:0"


def test_graphed_session_on_the_second_gpu():
    """A graphed ViT-S session on cuda:1 with cuda:0 current equals the same session on cuda:0."""
    _need_two_gpus()
    torch.cuda.set_device(0)
    clip = _clip(frames=2, seed=6, device="cpu")
    outs = []
    for device in ("cuda:0", "cuda:1"):
        model = _model(VideomtForUniversalSegmentation, VideomtConfig, "vit-s", device=device)
        model.optimize(dtype=torch.bfloat16)
        with torch.no_grad():
            outs.append(_step_all(model.new_session(), clip.to(device), torch.bfloat16))
        assert torch.cuda.current_device() == 0
    for t in range(2):
        for f in FIELDS:
            assert torch.equal(outs[0][t][f].cpu(), outs[1][t][f].cpu()), f"frame {t} {f}: cuda:1 differs"
