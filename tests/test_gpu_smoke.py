"""The GPU machinery, checked on a CPU so that it cannot rot between GPU runs.

* the conftest's Triton mode (interpreter or compiled) for every machine and ``-m`` expression, and the
  README's ``python -m pytest tests`` with CUDA present (simulated: ``VIDEOMT_FAST_TEST_ASSUME_CUDA=1``);
* ``bench/gpu_smoke.py --dry`` end to end (tiny shapes, CPU, no timing) and its driver's verdicts: a
  phase that fails, times out or runs out of deadline never reads as passed;
* ``bench/gpu_check.sh`` returns the status of what it ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from helpers import ROOT, load_bench
from videomt_fast.testing.pytest_mode import GPU_RUN, gpu_only, triton_mode

# ------------------------------------------------------------------ the conftest's decision


@pytest.mark.parametrize("markexpr,expected", [
    (None, False), ("", False), ("gpu", True), ("gpu and not slow", True), ("gpu and slow", True),
    ("not gpu", False), ("slow", False), ("not slow", False), ("gpu or slow", False), ("gpu or not gpu", False),
])
def test_gpu_only_selection(markexpr, expected):
    assert gpu_only(markexpr) is expected


@pytest.mark.parametrize("cuda,env,markexpr,interpret,skips_gpu", [
    (False, None, None, True, False),      # CI: the interpreter (gpu tests are skipped for want of a device)
    (False, None, "gpu", True, False),
    (True, None, None, True, True),        # the README command on a GPU machine: CPU suite interpreted
    (True, None, "not slow", True, True),
    (True, None, "gpu", False, False),     # pytest -m gpu on a GPU machine: compiled kernels
    (True, "1", "gpu", True, True),        # an explicit TRITON_INTERPRET wins
    (True, "0", None, False, False),
    (False, "0", None, False, False),
    (True, "", "gpu", False, False),       # set but empty counts as unset
])
def test_triton_mode(cuda, env, markexpr, interpret, skips_gpu):
    mode = triton_mode(cuda, env, markexpr)
    assert mode.interpret is interpret and mode.env_value == ("1" if interpret else "0")
    assert (mode.skip_gpu is not None) is skips_gpu, mode
    if skips_gpu:
        assert "gpu" in mode.skip_gpu and ("-m gpu" in mode.skip_gpu or GPU_RUN in mode.skip_gpu)


def _pytest(args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIDEOMT_FAST_TEST_ASSUME_CUDA")}
    environ.update(env, CI="0")  # this is about the Triton mode; tests/ci_policy.py judges skips in the outer run
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)


def test_readme_command_passes_with_cuda_present():
    """With CUDA present and no TRITON_INTERPRET, the default run interprets Triton for the CPU tests (which
    force Triton on CPU tensors: without the interpreter they would get the reference and fail) and skips
    the gpu tests with the command that runs them; ``-m gpu`` compiles instead."""
    args = ["tests/test_kernels_query_update.py", "-k", "frame_zero or guard"]  # CPU and gpu-marked cases
    run = _pytest([*args, "-rs"], VIDEOMT_FAST_TEST_ASSUME_CUDA="1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "videomt_fast triton: interpreter for the CPU tests" in run.stdout
    assert "CUDA devices hidden from this run" in run.stdout  # the CPU tests run as on a machine without CUDA
    assert GPU_RUN in run.stdout  # the skip reason of the gpu tests
    assert " passed" in run.stdout and " failed" not in run.stdout
    gpu = _pytest([*args, "-m", "gpu", "--collect-only"], VIDEOMT_FAST_TEST_ASSUME_CUDA="1")
    assert gpu.returncode == 0, gpu.stdout[-3000:]
    assert "videomt_fast triton: compiled for the GPU" in gpu.stdout, gpu.stdout[-2000:]
    # the gpu run fixes cuBLAS's workspace on every stream, so "graphed equals eager bit for bit" is sound
    # (mutation caught: a gpu run without it, where the capture stream may pick other algorithms)
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in gpu.stdout, gpu.stdout[-2000:]


# ------------------------------------------------------------------ gpu_smoke.py


@pytest.fixture(scope="module")
def smoke():
    return load_bench("gpu_smoke")


def _driver(smoke, tmp_path, deadline=60.0, dry=True):
    args = types.SimpleNamespace(out=str(tmp_path), dry=dry, deadline=deadline, archs=["vit-s"], compile=False,
                                 dinov3=False)
    return smoke.Driver(args)


def _limit(smoke, seconds, required=True):
    return smoke.PhasePlan("test", estimate_s=1, limit_s=seconds, required=required)


def _bench_json(path: Path, rows=("ok",), gate=True):
    plan = {"plans": [{"rows": 1, "size": [640, 640], "dtype": "bfloat16", "mode": "calibrated", "notes": [],
                       "gate": {"passed": gate, "fallbacks": []},
                       "sites": {"query.attention": {"chosen": "triton"}, "early.layer_norm": {"chosen": "reference"}}}]}
    path.mkdir(parents=True, exist_ok=True)
    (path / "b.json").write_text(json.dumps({"rows": [{"provider": "fast", "mode": "online", "status": s,
                                                       "reason": None if s == "ok" else "boom"} for s in rows],
                                             "plan": plan}))
    return path


def test_driver_verdicts_are_honest(smoke, tmp_path):
    driver = _driver(smoke, tmp_path / "a", dry=False)
    py = sys.executable
    good = _bench_json(tmp_path / "good")
    ok = driver.run("ok", [py, "-c", "pass"], kind="bench", plan=_limit(smoke, 30), out_dir=good)
    assert ok["status"] == "pass" and ok["result"]["plans"][0]["ours"] == {"query.attention": "triton"}, ok
    failed = driver.run("failed", [py, "-c", "raise SystemExit(3)"], kind="bench", plan=_limit(smoke, 30),
                        out_dir=good)
    assert failed["status"] == "fail" and failed["rc"] == 3
    missed = driver.run("missed", [py, "-c", "pass"], kind="bench", plan=_limit(smoke, 30),
                        out_dir=_bench_json(tmp_path / "missed", gate=False))
    assert missed["status"] == "fail" and "missed their gate" in missed["reason"]
    row = driver.run("row", [py, "-c", "pass"], kind="bench", plan=_limit(smoke, 30),
                     out_dir=_bench_json(tmp_path / "row", rows=("ok", "error")))
    assert row["status"] == "fail" and "did not run" in row["reason"]
    slow = driver.run("slow", [py, "-c", "import time; time.sleep(60)"], kind="bench", plan=_limit(smoke, 16))
    assert slow["status"] == "timeout" and slow["seconds"] < 30
    worker = driver.run("quiet", [py, "-c", "pass"], plan=_limit(smoke, 30))  # a worker that wrote no result
    assert worker["status"] == "fail" and "no result" in worker["reason"]
    optional = driver.run("optional", [py, "-c", "raise SystemExit(1)"], kind="bench", plan=_limit(smoke, 30, False))
    assert optional["status"] == "fail"
    driver.args.deadline = driver.elapsed() + 5  # less than a phase's minimum left
    late = driver.run("late", [py, "-c", "pass"], kind="bench", plan=_limit(smoke, 30))
    assert late["status"] == "skip" and "deadline" in late["reason"]
    assert driver.finish() == 1
    report = json.loads((tmp_path / "a" / "smoke.json").read_text())
    assert report["status"] == "fail" and report["failed"] == ["failed", "missed", "row", "slow", "quiet"]
    assert report["optional_failed"] == ["optional"] and report["incomplete"] == ["late"]
    log = (tmp_path / "a" / "smoke.log").read_text()
    assert "=== slow: timeout" in log and "=== late: skipped" in log

    only_late = _driver(smoke, tmp_path / "b", dry=False)
    only_late.args.deadline = 5
    only_late.run("late", [py, "-c", "pass"], kind="bench", plan=_limit(smoke, 30))
    assert only_late.finish() == 1  # nothing failed, but a required phase never ran: not a pass
    assert json.loads((tmp_path / "b" / "smoke.json").read_text())["status"] == "incomplete"


def test_the_phase_plan_fits_the_deadline_on_paper(smoke, tmp_path, monkeypatch):
    """The phases main() runs, in order, are those of the plan; the headline (FPS of S/B/L online and offline
    against transformers, then against torch.compile) comes before every check, and the estimates of the
    required phases fit the deadline. Mutation caught: a phase added to main() without an estimate, the
    headline moved behind the checks, or estimates past the deadline."""
    driver = _driver(smoke, tmp_path / "plan", dry=False)
    driver.args.archs, driver.args.compile, driver.args.dinov3 = list(smoke.FPS_ARCHS), True, True
    ran = []
    monkeypatch.setattr(driver, "start_build", lambda: None)
    monkeypatch.setattr(driver, "finish_build", lambda: ran.append("build") or {})
    monkeypatch.setattr(driver, "finish", lambda: 0)

    def run(name, cmd, kind="worker", env=None, planned=None, out_dir=None, plan=None):
        ran.append(name)
        assert (planned or name) in smoke.PLANNED
        if kind == "bench":
            assert "--mode" in cmd
        return {"name": name, "status": "pass"}

    monkeypatch.setattr(driver, "run", run)
    driver.main()
    phases = [n for n in ran if n != "build"]
    assert phases == [p.name for p in smoke.PHASES], phases
    required = [n for n in phases if smoke.PLANNED[n].required]
    headline = [n for n in required if n.startswith(("fps-", "compile-"))]
    assert headline == required[1 : 1 + len(headline)]  # right after env, before every check
    assert {f"fps-{a}" for a in smoke.FPS_ARCHS} | {f"fps-{smoke.FPS_DINOV3}"} <= set(headline)
    assert {f"compile-{a}" for a in smoke.COMPILE_ARCHS} <= set(headline)
    optional = [n for n in phases if not smoke.PLANNED[n].required]
    assert phases[-len(optional):] == optional  # what is optional comes last
    assert ran.index("build") < ran.index("post")  # post-processing needs the extension
    required = [p.name for p in smoke.PHASES if p.required]
    assert smoke.planned_seconds(required) <= smoke.DEADLINE_S, smoke.planned_seconds(required)
    assert all(p.estimate_s < p.limit_s for p in smoke.PHASES)


def test_phases_started_before_the_build_finished_never_build(smoke, tmp_path):
    """A phase that built the extension itself would wait on the background build's lock (forever, with
    torch's builder) or, killed at its limit, leave a lock behind. Mutation caught: NO_JIT only on a dry
    run or after a failed build (the former rule)."""
    driver = _driver(smoke, tmp_path / "jit", dry=False)
    assert driver.env()["VIDEOMT_FAST_NO_JIT"] == "1"
    assert driver.env()["VIDEOMT_FAST_PLAN_CACHE"] == str(driver.work / "plan-cache")  # one cache for all
    driver.build_done = True
    assert "VIDEOMT_FAST_NO_JIT" not in driver.env()
    driver.build_done = False  # (a failed build is never done)
    assert driver.env()["VIDEOMT_FAST_NO_JIT"] == "1"


def test_the_build_worker_clears_locks_before_it_builds(smoke, monkeypatch, capsys):
    """The build phase is the only builder on the GPU machine: it removes the locks an earlier killed run left
    before it loads (the driver itself imports no torch for that); a dry run touches no lock."""
    from videomt_fast.ops import _ext

    calls = []
    monkeypatch.setattr(_ext, "clear_locks", lambda: calls.append("clear") or ["/cache/postprocess-x/lock"])
    monkeypatch.setattr(_ext, "load", lambda: calls.append("load") or "module")
    assert smoke.phase_build(types.SimpleNamespace(dry=False))["status"] == "pass"
    assert calls == ["clear", "load"] and "/cache/postprocess-x/lock" in capsys.readouterr().out
    calls.clear()
    smoke.phase_build(types.SimpleNamespace(dry=True))
    assert calls == ["load"]


def test_dry_build_phase_skips_with_a_cuda_torch_and_no_device(smoke, monkeypatch):
    """A CUDA build of torch on a machine without a GPU (the GPU image's software on a CPU): the dry run
    has nothing to build and says so. Mutation caught: skipping only for a CPU build of torch."""
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("VIDEOMT_FAST_NO_JIT", "1")
    result = smoke.phase_build(types.SimpleNamespace(dry=True))
    assert result["status"] == "skip" and "no CUDA device" in result["reason"], result


def test_pytest_phase_reads_the_junit_report(smoke, tmp_path):
    test = tmp_path / "t" / "test_x.py"
    test.parent.mkdir()
    test.write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_bad(): assert False
        @pytest.mark.skip(reason="x")
        def test_skip(): pass
    """))
    driver = _driver(smoke, tmp_path / "out")
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(test.parent),
            "-c", os.devnull]
    bad = driver.run("bad", base + [str(test)], kind="pytest", plan=_limit(smoke, 60))
    assert bad["status"] == "fail" and bad["result"]["failures"] == 1, bad
    assert any("test_bad" in name for name in bad["result"]["failed"])
    good = driver.run("good", base + [str(test), "-k", "ok or skip"], kind="pytest", plan=_limit(smoke, 60))
    assert good["status"] == "pass" and good["result"]["skipped"] == 1, good
    skipped = driver.run("skipped", base + [str(test), "-k", "skip"], kind="pytest", plan=_limit(smoke, 60))
    assert skipped["status"] == "skip", skipped


@pytest.mark.slow  # ~1-2 minutes of subprocesses on two cores; CI runs it (CI does not deselect slow tests)
def test_dry_run_end_to_end(tmp_path):
    """The whole one-call check on a CPU: every phase's command runs (ops in the interpreter at tiny shapes,
    post-processing on the reference, the benchmark on the tiny model), the GPU-only ones skip, no FPS is
    claimed, and the exit status is 0."""
    out = tmp_path / "smoke"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--dry", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:] + (out / "smoke.log").read_text()[-4000:]
    report = json.loads((out / "smoke.json").read_text())
    status = {p["name"]: p["status"] for p in report["phases"]}
    assert status == {"env": "pass", "ops": "pass", "graphs": "skip", "build": "skip",
                      "post": "pass", "post-tests": "skip", "fps-tiny": "pass"}, status
    fps_phase = next(p for p in report["phases"] if p["name"] == "fps-tiny")
    assert fps_phase["estimate_s"] and fps_phase["result"]["plans"], fps_phase  # the plans the rows ran
    assert report["status"] == "pass" and report["dry"] is True
    ops_result = next(p for p in report["phases"] if p["name"] == "ops")["result"]
    assert len(ops_result["cases"]) >= 40 and all(c["ok"] and c["planned"] == "triton" for c in ops_result["cases"])
    assert {c["case"].split(" | ")[0] for c in ops_result["cases"]} >= {
        "attention", "mask_bits", "layer_norm", "residual_layer_norm", "linear_gelu[cublas]", "linear_gelu[triton]",
        "linear_residual[cublas]", "linear_residual[triton]", "query_update"}
    assert report["fps"] and all(r["fps"] is None and r["mfu"] is None for r in report["fps"])  # no timing
    assert {(r["provider"], r["mode"]) for r in report["fps"]} == {
        (p, m) for p in ("hf-eager-fp32", "hf-sdpa-bf16", "fast") for m in ("online", "offline")}
    # each row is named by the dtype that ran (the CPU runs the bf16 peer in float32)
    assert all(r["label"].endswith({"float32": "-fp32", "bfloat16": "-bf16", "float16": "-fp16"}[r["dtype"]]) for r in report["fps"])
    assert (out / "bench.tar.gz").exists() and (out / "smoke.log").exists() and (out / "build.log").exists()
    assert len(list(out.iterdir())) <= 8  # what a device call brings back


# ------------------------------------------------------------------ gpu_check.sh


def test_gpu_check_returns_the_status_of_what_it_ran(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\nexit 7\n")
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake))
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--archs", "vit-s"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 7
    assert (tmp_path / "args").read_text().split() == ["bench/gpu_smoke.py", "--out", str(tmp_path / "out"),
                                                       "--archs", "vit-s"]
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--extra", "nope"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--extra takes" in bad.stderr
    extra = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--extra", "kernels"],
                           env=dict(env, LIMIT="30"), capture_output=True, text=True, timeout=60)
    assert extra.returncode == 7  # the status of the command, not of tee


# ------------------------------------------------------------------ the CUDA bindings (compiled by test_csrc_build.py)


def test_every_binding_guards_its_device_and_names_its_kernel():
    """Each entry point of csrc/bindings.cpp that launches a kernel makes its tensors' device current
    (c10::DeviceGuard), reports a CUDA error already pending before its launch as an earlier one's, and
    checks its launch under its own name. (No GPU here: the structure is checked on the source; the nvcc /
    g++ compile is tests/test_csrc_build.py, the behaviour the two-GPU tests.)"""
    import re

    source = (ROOT / "csrc" / "bindings.cpp").read_text()
    names = re.findall(r'm\.def\("(\w+)"', source)
    assert names, "no bindings found"
    for name in names:
        body = source[source.index(f"void {name}("):]
        body = body[: body.index("\n}\n")]
        launch = body.index("check_launch(videomt_fast::launch_")
        assert "const c10::DeviceGuard device_guard(" in body[:launch], name
        assert f'check_pending("{name}");' in body[:launch], name
        assert re.search(rf'"{name}", stream\);\s*$', body), f"{name}: check_launch does not name it"
