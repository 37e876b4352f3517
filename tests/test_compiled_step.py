"""The compiled frame step (``step.frame_step`` plan site, videomt_fast/runtime/compiled.py).

One real AOTInductor compile of a small VidEoMT (module fixture, some tens of seconds on a CPU); the other
tests reuse its library through a compiler stand-in that copies it, or stub what they test. Every compile
here runs without a budget (``budget_s=math.inf``): whether a test compiles never depends on how busy the
machine is; the budget's own logic is tested with a clock that does not move.
"""

import math
import shutil

import pytest
import torch

from videomt_fast.model.configuration import VideomtConfig
from videomt_fast.model.cost import frame_flops
from videomt_fast.model.modeling import VideomtForUniversalSegmentation
from videomt_fast.runtime import compiled, plans
from videomt_fast.runtime.fast import plans_of

SIZE = (48, 32)  # not the config's 32x32: the position table is resized inside the compiled step


def _config():
    return VideomtConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_blocks=2, num_queries=8,
                         image_size=32, num_labels=5)


def _pair(seed=0):
    torch.manual_seed(seed)
    model = VideomtForUniversalSegmentation(_config())
    for p in model.parameters():  # larger than the init's, so every op matters in the outputs
        p.data.normal_(0, 0.3)
    ref = VideomtForUniversalSegmentation(_config())
    ref.load_state_dict(model.state_dict())
    return model, ref


def _frames(n=4, seed=1):
    return torch.randn(n, 1, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def _run(model, frames):
    session = model.new_session()
    with torch.inference_mode():
        return [tuple(t.clone() for t in session.step(f).values()) for f in frames]


def _assert_close(outs, refs, tol=1e-5):
    for out, ref in zip(outs, refs):
        for a, b in zip(out, ref):
            assert a.shape == b.shape
            assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A real compile of the step at SIZE; yields the library's bytes on disk (a file to copy)."""
    cache = tmp_path_factory.mktemp("plans")
    mp = pytest.MonkeyPatch()
    mp.setenv("VIDEOMT_FAST_PLAN_CACHE", str(cache))
    mp.delenv("VIDEOMT_FAST_PLAN", raising=False)
    mp.setattr(compiled, "MIN_GAIN", math.inf)  # chosen whenever it verifies: no timing noise in tests
    try:
        model, ref = _pair()
        model.optimize(dtype=torch.float32, compile="on", shapes=[(1, *SIZE)], budget_s=math.inf)
        plan = plans_of(model)[0]
        site = plan.sites[compiled.SITE]
        assert site.chosen == compiled.NAME, plan.format()
        keep = tmp_path_factory.mktemp("library")
        paths = {}
        for form, package in compiled.package_paths(plan).items():
            paths[form] = keep / package.name
            shutil.copy(package, paths[form])
        yield {"paths": paths, "model": model, "ref": ref, "plan": plan}
    finally:
        mp.undo()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDEOMT_FAST_PLAN_CACHE", str(tmp_path / "plans"))
    monkeypatch.delenv("VIDEOMT_FAST_PLAN", raising=False)
    monkeypatch.setattr(compiled, "MIN_GAIN", math.inf)
    return tmp_path / "plans"


def _copying(library, calls):
    """A compiler stand-in: the fixture's libraries copied to the requested files."""
    def compiler(jobs, timeout_s):
        calls.append((jobs, timeout_s))
        for _, package in jobs:
            form = next(f for f in compiled.FORMS if package.endswith(f".step-{f}.pt2"))
            shutil.copy(library["paths"][form], package)
        return True, ""
    return compiler


def test_compiled_session_matches_the_reference_and_skips_the_python_frame(library):
    model, ref = library["model"], library["ref"]
    site = library["plan"].sites[compiled.SITE]
    ops_c, comp = site.candidates
    assert comp.status == "chosen" and comp.error <= comp.tolerance and comp.time_ms > 0 and ops_c.time_ms > 0
    frames = _frames()
    _assert_close(_run(model, frames), _run(ref, frames))
    # every frame runs as one call: the model's Python frame is never entered
    calls = []
    original = model.encode_frames
    model.encode_frames = lambda x: (calls.append(1), original(x))[1]
    try:
        _run(model, frames)
    finally:
        del model.encode_frames
    assert calls == []
    assert "compiled in" in " ".join(library["plan"].notes)


def test_the_compiled_step_reads_the_models_weights_as_they_change(library):
    model, ref = library["model"], library["ref"]
    frames = _frames(3, seed=5)
    torch.manual_seed(7)
    new = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    model.load_state_dict(new)  # in place: the bound tensors see it
    ref.load_state_dict(new)
    _assert_close(_run(model, frames), _run(ref, frames))
    # a replaced tensor (new storage) is bound again before it is read
    weight = torch.nn.Parameter(model.layers[-1].mlp.fc1.weight.detach() * 1.5)
    model.layers[-1].mlp.fc1.weight = weight
    ref.layers[-1].mlp.fc1.weight = torch.nn.Parameter(weight.detach().clone())
    _assert_close(_run(model, frames), _run(ref, frames))


def test_second_model_loads_the_cached_library(library, cache, monkeypatch):
    calls = []
    monkeypatch.setattr(compiled, "_compile_in_child", _copying(library, calls))
    first, ref = _pair()
    first.optimize(dtype=torch.float32, compile="on", shapes=[(1, *SIZE)], budget_s=math.inf)
    assert len(calls) == 1 and calls[0][1] > compiled.MIN_COMPILE_S and len(calls[0][0]) == 2
    second, _ = _pair()
    second.optimize(dtype=torch.float32, compile="on", shapes=[(1, *SIZE)], budget_s=math.inf)
    plan = plans_of(second)[0]
    assert len(calls) == 1 and plan.mode == "cached" and plan.sites[compiled.SITE].chosen == compiled.NAME
    frames = _frames()
    _assert_close(_run(second, frames), _run(ref, frames))
    # the library deleted from the cache: compiled again, and said so
    compiled.package_paths(plan)["first"].unlink()
    third, _ = _pair()
    third.optimize(dtype=torch.float32, compile="on", shapes=[(1, *SIZE)], budget_s=math.inf)
    assert len(calls) == 2
    notes = plans_of(third)[0].notes
    assert any("not usable" in n for n in notes) and sum("compiled in" in n for n in notes) == 1


@pytest.mark.parametrize("fault", ["raises", "wrong", "nan"])
def test_a_faulty_library_is_excluded_with_its_reason_and_the_ops_run(library, cache, monkeypatch, fault):
    calls = []
    monkeypatch.setattr(compiled, "_compile_in_child", _copying(library, calls))
    real = compiled.CompiledStep.__call__

    def faulty(self, frames, prev, check_all=False):
        out = real(self, frames, prev, check_all)
        if fault == "raises":
            raise RuntimeError("library failure")
        if (fault == "wrong") != (prev is None):  # wrong: the first-frame library; nan: the later-frame one
            return out
        bad = out[0].clone()
        bad[0, 0] = math.nan if fault == "nan" else bad[0, 0] + 10 * float(bad.abs().max())
        return (bad,) + out[1:]

    monkeypatch.setattr(compiled.CompiledStep, "__call__", faulty)
    model, ref = _pair()
    model.optimize(dtype=torch.float32, compile="on", shapes=[(1, *SIZE)], budget_s=math.inf)
    site = plans_of(model)[0].sites[compiled.SITE]
    comp = site.candidates[1]
    assert site.chosen == "ops" and comp.status == "excluded"
    expected = {"raises": "raised RuntimeError: library failure", "wrong": "first frame: error",
                "nan": "later frame: NaN"}[fault]
    assert expected in comp.reason
    frames = _frames(3)
    outs, refs = _run(model, frames), _run(ref, frames)
    for out, r in zip(outs, refs):  # the op plan on a CPU: the reference ops, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(out, r))


def test_a_failing_compiler_is_excluded_with_its_error(cache, monkeypatch):
    monkeypatch.setattr(compiled, "_compile_in_child", lambda *a: (False, "the compiler failed (exit 1): boom"))
    model, _ = _pair()
    model.optimize(dtype=torch.float32, compile="on", shapes=[(1, *SIZE)], budget_s=math.inf)
    site = plans_of(model)[0].sites[compiled.SITE]
    assert site.chosen == "ops" and site.candidates[1].reason == "the compiler failed (exit 1): boom"
    assert "aot-inductor: excluded (the compiler failed" in plans_of(model)[0].format()


def test_a_compile_past_the_budget_is_killed(tmp_path):
    exported = tmp_path / "missing.pt2"  # the child would fail later; it is killed first
    jobs = [(str(exported), str(tmp_path / f"{form}.pt2")) for form in compiled.FORMS]
    ok, error = compiled._compile_in_child(jobs, 0.2)
    assert not ok and error.startswith("budget:")
    assert not any((tmp_path / f"{form}.pt2").exists() for form in compiled.FORMS)


def test_a_failing_compile_reports_the_compilers_error(tmp_path):
    exported = tmp_path / "missing.pt2"
    ok, error = compiled._compile_in_child([(str(exported), str(tmp_path / "out.pt2"))], 120)
    assert not ok and error.startswith("the compiler failed (exit 1):") and "missing.pt2" in error


def test_host_model_has_the_structure_and_little_arithmetic(library):
    model, plan = library["model"], library["plan"]
    small, size = compiled.host_model(model, plan)
    assert size == model.config.patch_hw and small.config.num_queries == 1
    assert len(small.layers) == len(model.layers) and small.query_start == model.query_start
    assert all(m.impl is plan.table(stage) for stage, m in plans.op_sites(small))
    assert frame_flops(small.config, *size)["total"] < 0.1 * frame_flops(model.config, *SIZE)["total"]


def test_auto_compiles_a_host_bound_step_and_the_session_runs_it(library, cache, monkeypatch):
    """``auto`` (the CPU default) deciding to compile: the step is host-bound enough (the share lowered to
    0 so any step is), the stand-in compiler's library verifies, and sessions run it. Mutation caught: an
    ``auto`` that never compiles (every other test kept the share above 1)."""
    from videomt_fast.runtime.fast import session_step_kind

    calls = []
    monkeypatch.setattr(compiled, "_compile_in_child", _copying(library, calls))
    monkeypatch.setattr(compiled, "HOST_SHARE", 0.0)
    model, ref = _pair()
    assert session_step_kind(model) == "ops (unplanned)"
    model.optimize(dtype=torch.float32, compile="auto", shapes=[(1, *SIZE)], budget_s=math.inf)
    site = plans_of(model)[0].sites[compiled.SITE]
    assert len(calls) == 1 and site.chosen == compiled.NAME, plans_of(model)[0].format()
    assert session_step_kind(model) == compiled.NAME
    frames = _frames(3)
    _assert_close(_run(model, frames), _run(ref, frames))


def test_a_budget_too_small_to_compile_is_said_not_overrun(cache, monkeypatch):
    """A clock that does not move and a budget below what a compile needs: not attempted, the reason and the
    budget's note say so; the same model with no budget compiles (the stand-in)."""
    monkeypatch.setattr(plans, "clock", lambda: 1000.0)
    monkeypatch.setattr(compiled, "_compile_in_child", lambda *a: (True, ""))  # never reached
    model, _ = _pair()
    plan = plans.build(model, 1, SIZE)
    plan.key = plans.cache_key(model, 1, SIZE, plans.stages_of(model))
    budget = plans.Budget(compiled.MIN_COMPILE_S + compiled.VERIFY_RESERVE_S - 1)
    site = compiled.consider(model, plan, mode="on", budget=budget)
    assert site.chosen == "ops" and site.candidates[1].reason.startswith("budget:"), site
    assert budget.skipped == ["the compiled frame step (not compiled)"]


def test_a_decision_cut_short_by_the_budget_is_not_cached(cache, monkeypatch):
    """"Too little to compile" is this call's verdict, not the shape's: the plan is used but not written, so
    the next process decides again (as for a plan cut short). Mutation caught: caching every decision."""
    monkeypatch.setattr(plans, "clock", lambda: 1000.0)
    monkeypatch.setattr(compiled, "_compile_in_child", lambda *a: (True, ""))  # never reached
    model, _ = _pair()
    plan = plans.build(model, 1, SIZE)
    plan.key = plans.cache_key(model, 1, SIZE, plans.stages_of(model))
    compiled.consider(model, plan, mode="on", budget=plans.Budget(compiled.MIN_COMPILE_S + compiled.VERIFY_RESERVE_S - 1))
    assert not plans._cache_file(plan.key).exists()
    assert plans.save_cached(plan) is None  # nor later, by another site's decision


def test_auto_does_not_time_a_step_its_arithmetic_clearly_dominates(cache, monkeypatch):
    """Where the estimated arithmetic dwarfs the measured host time (a large model on a CPU), auto declines
    without timing the op step (seconds a frame at ViT-L 640x640) and says which figure is an estimate."""
    monkeypatch.setattr(plans, "gemm_rate", lambda *a, **k: 1e3)  # a very slow matrix product: arithmetic dominates
    monkeypatch.setattr(compiled, "_compile_in_child", lambda *a: pytest.fail("compiled"))
    model, _ = _pair()
    model.optimize(dtype=torch.float32, compile="auto", shapes=[(1, *SIZE)], budget_s=math.inf)
    plan = plans_of(model)[0]
    ops_c, comp = plan.sites[compiled.SITE].candidates
    assert ops_c.time_ms is None and comp.reason.startswith("auto: not host-bound")
    assert "measured" in comp.reason and "estimated" in comp.reason
    assert any("(estimated, not measured)" in n for n in plan.notes)


def test_auto_compiles_only_a_host_bound_step(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(compiled, "_compile_in_child", lambda *a: (calls.append(a), (False, "not reached"))[1])
    monkeypatch.setattr(compiled, "HOST_SHARE", 1.01)  # no step is this host-bound
    model, _ = _pair()
    model.optimize(dtype=torch.float32, compile="auto", shapes=[(1, *SIZE)], budget_s=math.inf)
    site = plans_of(model)[0].sites[compiled.SITE]
    assert calls == [] and site.chosen == "ops" and site.candidates[1].reason.startswith("auto: not host-bound")
    # declined either after timing the op step or, where the estimated arithmetic clearly dominates, before
    assert any("host time" in n and "measured" in n for n in plans_of(model)[0].notes)
    # "on" retries what "auto" declined
    again, _ = _pair()
    again.optimize(dtype=torch.float32, compile="on", shapes=[(1, *SIZE)], budget_s=math.inf)
    assert len(calls) == 1


def test_compile_off_and_bad_modes(cache, monkeypatch):
    monkeypatch.setattr(compiled, "_compile_in_child", lambda *a: pytest.fail("compiled with compile='off'"))
    model, ref = _pair()
    model.optimize(dtype=torch.float32, compile="off", shapes=[(1, *SIZE)])
    assert compiled.SITE not in plans_of(model)[0].sites
    frames = _frames(2)
    assert all(torch.equal(a, b) for o, r in zip(_run(model, frames), _run(ref, frames)) for a, b in zip(o, r))
    with pytest.raises(ValueError, match="compile mode"):
        model.optimize(compile="sometimes")
    monkeypatch.setenv("VIDEOMT_FAST_COMPILE", "bogus")
    with pytest.raises(ValueError, match="VIDEOMT_FAST_COMPILE"):
        model.optimize()


def test_frame_flops_counts_the_products_of_a_later_frame():
    from torch.utils.flop_counter import FlopCounterMode

    from videomt_fast import ops

    cfg = _config()
    model = VideomtForUniversalSegmentation(cfg)
    rows, grid = 2, model.grid_for(*SIZE)
    frames, prev = torch.randn(rows, 3, *SIZE), torch.randn(rows, cfg.num_queries, cfg.hidden_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), ops.use_backend("reference"):
        model.query_step(model.encode_frames(frames), prev, grid)
    counted = counter.get_total_flops()
    # FlopCounterMode leaves out the CPU attention kernel: add the attention products by hand
    seq = cfg.num_prefix_tokens + grid[0] * grid[1]
    early = cfg.num_hidden_layers - cfg.num_blocks
    attention = rows * 4 * cfg.hidden_size * (early * seq**2 + cfg.num_blocks * (seq + cfg.num_queries) ** 2)
    estimate = rows * frame_flops(cfg, *SIZE)["total"]
    assert abs(estimate - (counted + attention)) <= 0.05 * (counted + attention)


def test_plan_command_shows_the_step_site(cache, monkeypatch, capsys):
    from videomt_fast.apps import cli

    monkeypatch.setattr(compiled, "HOST_SHARE", 1.01)
    assert cli.main(["plan", "--arch", "vit-s", "--size", "32x48", "--dtype", "float32", "--compile", "auto"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(compiled.SITE))
    assert "ops" in line and "aot-inductor: excluded (auto: not host-bound" in line
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--compile", "maybe"])
    assert exit_info.value.code == 2
