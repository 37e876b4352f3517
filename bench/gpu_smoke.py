"""One call, at most seven minutes on a fresh GPU machine: the proof that videomt_fast's GPU paths work.

    python bench/gpu_smoke.py --out "$OUT"            # on a GPU machine (bench/gpu_check.sh runs this)
    python bench/gpu_smoke.py --dry --out /tmp/smoke  # on a CPU: tiny shapes, no timing (the CI test runs this)

The headline comes first: FPS of ViT-S, ViT-B and ViT-L at 640x640, online and offline, videomt_fast
``fast`` against transformers SDPA bf16 (and eager fp32, the agreement reference), then against
``torch.compile`` of transformers; then the checks. Each phase runs in its own process under its own
limit, all within ``--deadline`` seconds (a phase is cut to the time left, or skipped). The deadline is
planned on the estimates in :data:`PHASES` (a fresh H100/H200, empty Triton, Inductor and plan caches);
``tests/test_gpu_smoke.py`` checks that they fit it.

* ``build`` (in the background from the start, at low priority and half the cores, so it does not slow
  the timed phases' Python): the CUDA post-processing extension. Phases started before it finished never
  build it themselves (``VIDEOMT_FAST_NO_JIT=1``); a lock left by an earlier killed run is cleared first.
* ``env``: device, driver, versions.
* ``fps-vit-s|b|l`` and ``fps-dinov3-l`` (VidEoMT on DINOv3 ViT-L: rotary attention and the gated MLP's
  kernels): ``python -m bench`` per model (CUDA events, rotated inputs, MFU from the FLOP model), online and
  offline. The fast provider's ``optimize()`` calibrates the execution plans of these shapes
  (every candidate verified against float64 and timed as a CUDA graph, the whole-model gate): the plan
  tables are in the benchmark JSON, the phase fails when a plan misses its gate, and every later phase
  reads the same plan cache.
* ``compile-vit-s|l``: ``torch.compile`` of transformers (online); ``compile-vit-b`` after the checks, when
  time is left.
* ``graphs``: ``tests/test_gpu_graphs.py`` (graphed sessions at 640x640, ViT-S then ViT-L, equal the
  eager session bit for bit under deterministic cuDNN and cuBLAS settings, and the fp32 reference within
  the bf16 rule; graphed clip forward and masked EoMT predictor equal eager; the plan's kernels ran).
* ``post``: CUDA post-processing of one 1080p frame with 200 queries equals the reference pixel for
  pixel (a pixel may differ only where its decision is within 1e-5 of the threshold) and its extra
  device memory is measured; then ``post-tests`` (``tests/test_postprocess_cuda.py``).
* ``ops`` (optional, last): every Triton kernel in every argument form at ViT-S and ViT-L shapes, chosen
  or not, against float64 (the plans verify the chosen ones already).

Writes to ``--out``: ``smoke.json`` (each phase's status, seconds, limit, estimate and results;
environment; the FPS table; the plans' gates), ``smoke.log`` (every phase's output), ``build.log`` and
``bench.tar.gz`` (the benchmark JSON files, for ``bench/results/``). Exit status 0 only when every
required phase passed (``--dry``: when none failed; phases that need CUDA are skipped there).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
DEADLINE_S = 400  # leaves the 7-minute call margin for the start of Python, the archive and the copy back
BUILD_LIMIT_S = 300
MIN_PHASE_S = 15  # a phase with less time than this left is skipped
FPS_ARCHS = ("vit-s", "vit-b", "vit-l")


@dataclass(frozen=True)
class PhasePlan:
    name: str
    estimate_s: int  # on a fresh H100/H200: empty Triton, Inductor and plan caches; what the deadline is planned on
    limit_s: int  # the most it may take (cut to the time left)
    required: bool = True
    why: str = ""


# In running order. Estimates (not yet measured on the device; the first call's smoke.json has the real
# seconds per phase): a process starts in ~8 s (torch, transformers, Triton); a model's plan compiles its
# Triton kernels (~0.5 s each, ~20 per shape) and verifies and times every candidate (~10 s); transformers'
# fp32 master is built on the CPU (ViT-L ~8 s); timing the three providers online and offline ~15 s;
# torch.compile of transformers (Inductor, default mode, one shape) 30-45 s.
PHASES: tuple[PhasePlan, ...] = (
    PhasePlan("env", 10, 30, why="device, driver, versions"),
    PhasePlan("fps-vit-s", 55, 100, why="headline: plans + online/offline FPS vs transformers"),
    PhasePlan("fps-vit-b", 45, 80, why="headline"),
    PhasePlan("fps-vit-l", 60, 100, why="headline"),
    PhasePlan("fps-dinov3-l", 55, 100, why="headline: VidEoMT on DINOv3 ViT-L (rotary attention, gated MLP kernels)"),
    PhasePlan("compile-vit-s", 40, 70, why="headline: torch.compile of transformers"),
    PhasePlan("compile-vit-l", 50, 90, why="headline"),
    PhasePlan("graphs", 45, 100, why="graphed = eager bit for bit, vs fp32, the plan's kernels ran"),
    PhasePlan("post", 10, 45, why="CUDA post-processing at 1080p"),
    PhasePlan("post-tests", 25, 60, why="tests/test_postprocess_cuda.py"),
    PhasePlan("compile-vit-b", 40, 70, required=False, why="torch.compile of ViT-B: between S and L, when time is left"),
    PhasePlan("ops", 25, 90, required=False, why="every Triton kernel in every form (the plans verify the chosen ones)"),
)
FPS_DINOV3 = "dinov3-l"  # the published VidEoMT-DINOv3 models are ViT-L
COMPILE_ARCHS = ("vit-s", "vit-l")  # required; vit-b optional, after the checks
PLANNED = {p.name: p for p in PHASES}


def planned_seconds(names) -> int:
    """The estimate of running these phases (what the deadline is planned on)."""
    return sum(PLANNED[n].estimate_s for n in names)


# ------------------------------------------------------------------ the driver


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Driver:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="videomt_fast_smoke_"))
        self.start = time.monotonic()
        self.log_path = self.out / "smoke.log"
        self.log_path.write_text("")
        self.phases: list[dict[str, Any]] = []
        self.build: subprocess.Popen | None = None
        self.build_started = 0.0
        self.build_done = False
        # --dry proves the code paths, not the timing: a busy CPU (CI) gets four times each limit
        self.scale = 4 if args.dry else 1

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.args.deadline - self.elapsed()

    def say(self, line: str) -> None:
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def env(self, **extra: str) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # a bare machine: the checkout
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path,
                   VIDEOMT_FAST_PLAN_CACHE=str(self.work / "plan-cache"), **extra)  # one plan cache for every phase
        if self.args.dry or not self.build_done:
            # nothing to build on a CPU; while the background build runs, a phase never builds (it would wait
            # on the build's lock, or leave one behind when killed at its limit); after a failure, no second try
            env["VIDEOMT_FAST_NO_JIT"] = "1"
        return env

    def worker(self, phase: str) -> list[str]:
        cmd = [sys.executable, str(SCRIPT), "--phase", phase, "--work", str(self.work)]
        return cmd + (["--dry"] if self.args.dry else [])

    def _wait(self, proc: subprocess.Popen, limit: float) -> tuple[int | None, bool]:
        """(return code, timed out); a process over its limit is killed with its whole process group."""
        try:
            return proc.wait(timeout=max(limit, 0.1)), False
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return proc.returncode, True

    def run(self, name: str, cmd: list[str], kind: str = "worker", env: dict[str, str] | None = None,
            planned: str | None = None, out_dir: Path | None = None, plan: PhasePlan | None = None) -> dict[str, Any]:
        """Run one phase under its planned limit (:data:`PHASES`; ``planned`` names the entry when the phase
        is named otherwise, e.g. ``fps-tiny`` of a dry run; ``plan`` gives one outright); ``kind`` says where
        its verdict comes from: ``worker`` (its JSON), ``pytest`` (its junit XML), ``bench`` (return code and
        the benchmark JSON in ``out_dir``: every row ran, every plan passed its gate)."""
        plan = plan or PLANNED[planned or name]
        phase: dict[str, Any] = {"name": name, "required": plan.required, "limit_s": None,
                                 "estimate_s": plan.estimate_s, "seconds": 0.0, "rc": None}
        self.phases.append(phase)
        budget = min(plan.limit_s * self.scale, self.left())
        if budget < MIN_PHASE_S:
            phase.update(status="skip", reason=f"deadline: {self.left():.0f} s left of {self.args.deadline} s")
            self.say(f"=== {name}: skipped ({phase['reason']})")
            return phase
        phase["limit_s"] = round(budget)
        junit = self.work / f"{name}.xml"
        if kind == "pytest":
            cmd = cmd + ["--junitxml", str(junit)]
        self.say(f"=== {name} (limit {budget:.0f} s): {' '.join(cmd)}")
        t0 = time.monotonic()
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env or self.env(),
                                    start_new_session=True)
            rc, timed_out = self._wait(proc, budget)
        phase["seconds"] = round(time.monotonic() - t0, 1)
        phase["rc"] = rc
        if timed_out:
            phase.update(status="timeout", reason=f"killed at its limit of {budget:.0f} s")
        elif kind == "worker":
            self._worker_verdict(phase, name, rc)
        elif kind == "pytest":
            self._pytest_verdict(phase, junit, rc)
        else:
            self._bench_verdict(phase, out_dir, rc)
        self.say(f"=== {name}: {phase['status']} in {phase['seconds']} s" + (f" ({phase['reason']})" if phase.get("reason") else ""))
        return phase

    def _worker_verdict(self, phase: dict, name: str, rc: int | None) -> None:
        path = self.work / f"{name}.json"
        if not path.exists():
            phase.update(status="fail", reason=f"exit status {rc}, no result written")
            return
        result = json.loads(path.read_text())
        phase["result"] = result
        status = result.get("status", "fail")
        if rc != 0 and status == "pass":
            status = "fail"
        phase.update(status=status, reason=result.get("reason"))

    def _bench_verdict(self, phase: dict, out_dir: Path | None, rc: int | None) -> None:
        files = sorted(out_dir.glob("*.json")) if out_dir is not None and out_dir.exists() else []
        if rc != 0 or not files:
            phase.update(status="fail", reason=f"exit status {rc}" + ("" if files else ", no benchmark JSON"))
            return
        data = json.loads(files[-1].read_text())
        rows = data.get("rows") or []
        bad_rows = [f"{r.get('provider')} {r.get('mode')}: {r.get('reason')}" for r in rows if r.get("status") != "ok"]
        plans = plan_summaries(data.get("plan"))
        phase["result"] = {"file": files[-1].name, "rows": len(rows), "plans": plans}
        missed = [p["shape"] for p in plans if p["gate"] and not p["gate"].get("passed")]
        if bad_rows:
            phase.update(status="fail", reason="rows that did not run: " + "; ".join(bad_rows)[:500])
        elif missed:
            phase.update(status="fail", reason=f"plans that missed their gate: {missed}")
        else:
            fallbacks = sum(len(p["gate"].get("fallbacks") or []) for p in plans if p["gate"])
            phase.update(status="pass", reason=f"{len(rows)} rows, {len(plans)} plans"
                         + (f", {fallbacks} site(s) moved back to the reference by the gate" if fallbacks else ""))

    def _pytest_verdict(self, phase: dict, junit: Path, rc: int | None) -> None:
        if not junit.exists():
            phase.update(status="fail", reason=f"pytest exit status {rc}, no report")
            return
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        ran = counts["tests"] - counts["skipped"]
        phase["result"] = {**counts, "failed": failed[:20]}
        if counts["failures"] or counts["errors"] or rc not in (0, 5):
            phase.update(status="fail", reason=f"{counts['failures']} failed, {counts['errors']} errors (rc {rc})")
        elif ran == 0:
            phase.update(status="skip", reason=f"all {counts['tests']} tests skipped (no CUDA device)")
        else:
            phase.update(status="pass", reason=f"{ran} passed, {counts['skipped']} skipped")

    # -------------------------------------------------------------- the build in the background

    def start_build(self) -> None:
        self.build_started = time.monotonic()
        cores = os.cpu_count() or 2
        env = self.env(VIDEOMT_FAST_EXT_VERBOSE="1", MAX_JOBS=os.environ.get("MAX_JOBS", str(max(1, cores // 2))))
        if not self.args.dry:
            env.pop("VIDEOMT_FAST_NO_JIT", None)
        self._build_log = open(self.out / "build.log", "w")
        self.build = subprocess.Popen(self.worker("build"), cwd=ROOT, stdout=self._build_log,
                                      stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                      preexec_fn=lambda: os.nice(19))  # the timed phases' Python comes first
        self.say(f"=== build started in the background (limit {BUILD_LIMIT_S} s, {env['MAX_JOBS']} jobs, low "
                 "priority), log in build.log")

    def finish_build(self) -> dict[str, Any]:
        phase: dict[str, Any] = {"name": "build", "required": not self.args.dry, "limit_s": BUILD_LIMIT_S * self.scale}
        self.phases.append(phase)
        limit = min(BUILD_LIMIT_S * self.scale - (time.monotonic() - self.build_started), self.left())
        rc, timed_out = self._wait(self.build, limit)
        self._build_log.close()
        phase["seconds"] = round(time.monotonic() - self.build_started, 1)
        phase["rc"] = rc
        if timed_out:
            phase.update(status="timeout", reason=f"the build was not done within {limit:.0f} s more")
        else:
            self._worker_verdict(phase, "build", rc)
        self.build_done = phase["status"] == "pass"
        self.say(f"=== build: {phase['status']} after {phase['seconds']} s" + (f" ({phase['reason']})" if phase.get("reason") else ""))
        return phase

    # -------------------------------------------------------------- the whole call

    def main(self) -> int:
        a = self.args
        self.say(f"gpu_smoke {'--dry ' if a.dry else ''}started {_now()}, deadline {a.deadline} s, work dir {self.work}")
        self.start_build()
        self.run("env", self.worker("env"))
        for arch in (["tiny"] if a.dry else a.archs):  # the headline first
            self.bench(f"fps-{arch}", arch, "hf-eager-fp32,hf-sdpa-bf16,fast", ("online", "offline"))
        if a.dinov3 and not a.dry:
            self.bench(f"fps-{FPS_DINOV3}", FPS_DINOV3, "hf-eager-fp32,hf-sdpa-bf16,fast", ("online", "offline"))
        if a.compile and not a.dry:
            for arch in (x for x in a.archs if x in COMPILE_ARCHS):
                self.bench(f"compile-{arch}", arch, "hf-compile", ("online",))
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfE"]
        # deterministic cuDNN algorithms and one cuBLAS workspace size on every stream: graphed and eager runs
        # pick the same algorithms, so "equal bit for bit" is a sound claim (tests/test_gpu_graphs.py)
        self.run("graphs", pytest + ["tests/test_gpu_graphs.py"], kind="pytest",
                 env=self.env(CUBLAS_WORKSPACE_CONFIG=":4096:8"))
        self.finish_build()
        self.run("post", self.worker("post"))
        self.run("post-tests", pytest + ["tests/test_postprocess_cuda.py"], kind="pytest")
        if a.compile and not a.dry:
            for arch in (x for x in a.archs if x not in COMPILE_ARCHS):  # optional, when time is left
                self.bench(f"compile-{arch}", arch, "hf-compile", ("online",))
        self.run("ops", self.worker("ops"), env=self.env(VIDEOMT_FAST_CHECK_LAUNCHES="1",
                                                         **({"TRITON_INTERPRET": "1"} if a.dry else {})))
        return self.finish()

    def bench(self, name: str, arch: str, providers: str, modes: tuple[str, ...]) -> dict[str, Any]:
        out_dir = self.work / "bench" / name
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench", "--peers", "none", "--providers", providers, "--out-dir", str(out_dir)]
        for mode in modes:
            cmd += ["--mode", mode]
        if self.args.dry:  # tiny model on the CPU: the command line, the plans and the JSON are checked, nothing timed
            cmd += ["--tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--agree-frames", "1", "--frames", "2"]
            planned = name.replace("-tiny", "-vit-s")
        else:
            cmd += ["--arch", arch, "--size", "640x640", "--frames", "16", "--repeats", "20"]
            planned = name
        return self.run(name, cmd, kind="bench", planned=planned, out_dir=out_dir)

    def finish(self) -> int:
        fps = _fps_rows(self.work / "bench", dry=self.args.dry)
        env = next((p.get("result", {}).get("environment") for p in self.phases if p["name"] == "env"), None)
        failed = [p["name"] for p in self.phases if p["status"] in ("fail", "timeout") and p["required"]]
        optional_failed = [p["name"] for p in self.phases if p["status"] in ("fail", "timeout") and not p["required"]]
        incomplete = [p["name"] for p in self.phases
                      if p["required"] and p["status"] == "skip" and not self.args.dry]
        status = "fail" if failed else "incomplete" if incomplete else "pass"
        report = {
            "tool": "bench/gpu_smoke.py",
            "dry": self.args.dry,
            "created_utc": _now(),
            "status": status,
            "failed": failed,
            "optional_failed": optional_failed,  # reported, not part of the exit status (e.g. torch.compile)
            "incomplete": incomplete,
            "seconds": round(self.elapsed(), 1),
            "deadline_s": self.args.deadline,
            "environment": env,
            "fps": fps,
            "phases": self.phases,
        }
        _write_json(self.out / "smoke.json", report)
        bench_dir = self.work / "bench"
        files = sorted(bench_dir.rglob("*.json")) if bench_dir.exists() else []
        if files:
            tmp = self.out / "bench.tar.gz.tmp"
            with tarfile.open(tmp, "w:gz") as tar:
                for f in files:
                    tar.add(f, arcname=f.name)
            tmp.replace(self.out / "bench.tar.gz")
        self.say(f"--- summary ({self.elapsed():.0f} s): {status}")
        for p in self.phases:
            self.say(f"{p['name']:<14} {p['status']:<8} {p.get('seconds', 0):>6} s  {p.get('reason') or ''}")
        for row in fps:
            self.say(f"fps {row['arch']:<6} {row.get('label') or row['provider']:<13} {row['mode']:<8} "
                     f"{row['fps'] if row['fps'] is None else round(row['fps'], 1)} frames/s  mfu {row['mfu']}")
        return 0 if status == "pass" else 1


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def plan_summaries(plan: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per execution plan in a benchmark JSON: shape, dtype, mode, gate, the sites not on the reference."""
    out = []
    for p in (plan or {}).get("plans") or []:
        out.append({"shape": f"{p['rows']}x{p['size'][0]}x{p['size'][1]}", "dtype": p["dtype"], "mode": p["mode"],
                    "calibration_s": p.get("calibration_s"), "gate": p.get("gate") or {},
                    "ours": {k: v["chosen"] for k, v in p["sites"].items() if v["chosen"] not in ("reference", "ops")},
                    "notes": p.get("notes", [])})
    return out


def _fps_rows(bench_dir: Path, dry: bool) -> list[dict[str, Any]]:
    """The rows of every benchmark JSON: arch, provider, mode, fps, mfu, status (no FPS from --dry)."""
    rows = []
    for path in sorted(bench_dir.rglob("*.json")) if bench_dir.exists() else []:
        data = json.loads(path.read_text())
        rows_of = data.get("rows")
        for r in rows_of if isinstance(rows_of, list) else []:  # (plan tables have no benchmark rows)
            rows.append({"arch": data.get("arch"), "provider": r.get("provider"), "label": r.get("label"),
                         "mode": r.get("mode"),
                         "size": r.get("size"),
                         "dtype": r.get("dtype"), "status": r.get("status"),
                         "fps": None if dry else r.get("fps"), "mfu": None if dry else r.get("mfu"),
                         "latency_ms_p50": None if dry else r.get("latency_ms_p50"), "file": path.name})
    return rows


# ------------------------------------------------------------------ the phases that run here


def phase_env(args) -> dict[str, Any]:
    import torch

    from videomt_fast.apps.benchmark import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    try:
        env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[-1]
    except Exception as exc:  # noqa: BLE001
        env["nvcc"] = f"unavailable: {exc}"
    import transformers

    env["transformers_has_videomt"] = hasattr(transformers, "VideomtForUniversalSegmentation")
    if not args.dry and device.type != "cuda":
        return {"status": "fail", "reason": "no CUDA device", "environment": env}
    return {"status": "pass", "environment": env}


def phase_build(args) -> dict[str, Any]:
    import torch

    from videomt_fast.ops import _ext

    t0 = time.monotonic()
    if not args.dry:
        for lock in _ext.clear_locks():  # the only builder on this machine: an earlier run was killed mid-build
            print(f"removed a build lock left by an earlier run: {lock}", flush=True)
    module = _ext.load()
    result = {"module": repr(module), "error": _ext.error(), "seconds": round(time.monotonic() - t0, 1)}
    if module is not None:
        return {"status": "pass", **result}
    if args.dry and not torch.cuda.is_available():  # a CPU build of torch, or a CUDA build with no device
        why = "a CPU build of torch" if torch.version.cuda is None else "no CUDA device"
        return {"status": "skip", "reason": f"dry run on {why}: nothing to build", **result}
    return {"status": "fail", "reason": f"extension unavailable: {_ext.error()}", **result}


# ------------------------------------------------ the kernel a call reaches
# What a model runs is its execution plan's choice (the ``plans`` phase: every candidate verified, timed
# and gated). The ``ops`` phase checks every Triton kernel in every argument form, chosen or not: each
# must accept the real shapes (its guard, asked here through the dispatcher) and agree with float64.


def planned_implementation(op: str, args: tuple) -> tuple[str, Any, str]:
    """(implementation name, callable, why) the dispatcher picks for op ``op`` on ``args``."""
    from videomt_fast import ops

    return ops.choose(op, *args)


# -----------------------------------------------------------------------------------------------------


def _fill(args: tuple, gen) -> tuple:
    """Random values in every tensor (and in the whole buffer a view comes from): activations ~ N(0, 1),
    weight matrices ~ N(0, 1/K), mask words random bits."""
    import torch

    for a in args:
        if not isinstance(a, torch.Tensor):
            continue
        base = a if a._base is None else a._base
        if base.dtype == torch.int32:
            base.copy_(torch.randint(-2**31, 2**31 - 1, base.shape, generator=gen, dtype=torch.int64).to(torch.int32))
        else:
            values = torch.randn(base.shape, generator=gen)
            if base.dim() == 2 and min(base.shape) >= 16:
                values *= base.shape[1] ** -0.5
            base.copy_(values)
    return args


def _snapshot(args: tuple, dtype=None) -> tuple:
    import torch

    return tuple(a.clone().to(dtype) if isinstance(a, torch.Tensor) and dtype is not None and a.is_floating_point()
                 else a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _outputs(op: str, args: tuple, result) -> tuple:
    import torch

    if op == "query_update":  # the rows it writes, not the rest of the token buffer
        return (args[0][:, : args[1].shape[0]],)
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _mask_bits_verdict(logits, got, grid) -> tuple[bool, str]:
    import torch
    import torch.nn.functional as F

    from videomt_fast.ops import reference

    want = reference.mask_bits_ref(logits, grid)
    patches = grid[0] * grid[1]
    diff = reference.unpack_mask_bits(got, patches) != reference.unpack_mask_bits(want, patches)
    if not diff.any():
        return True, "bits equal"
    resized = F.interpolate(logits.float(), size=grid, mode="bilinear", align_corners=False).flatten(2)
    worst = resized[diff].abs().max().item()
    return worst < 1e-5, f"{int(diff.sum())} bits differ, largest |resized logit| there {worst:.2e}"


def phase_ops(args) -> dict[str, Any]:
    import contextlib

    import torch

    from videomt_fast import ops
    from videomt_fast.ops import reference
    from videomt_fast.testing import kernel_checks as kc
    from videomt_fast.testing import triton_compile as tc

    device = "cpu" if args.dry else "cuda"
    if args.dry:
        plans = [("tiny", ("bf16", "fp32"))]
        image = 64
    else:
        plans = [("vit-s", ("bf16", "fp32")), ("vit-l", ("bf16",))]
        image = 640
    cases = [c for model, dtypes in plans for c in tc.launch_cases((model,), (1,), dtypes, image, device=device)]
    gen = torch.Generator().manual_seed(0)
    rows, failures = [], []
    for case in cases:
        op = case.op.split("[")[0]
        row: dict[str, Any] = {"case": case.name}
        try:
            run_args = _fill(case.make(), gen)
            before = _snapshot(run_args)
            # every model op has a Triton implementation; on a CPU (--dry) it runs in the interpreter, forced
            with ops.use_backend("triton") if args.dry else contextlib.nullcontext():
                planned, _, why = planned_implementation(op, run_args)
            row["planned"] = planned
            if planned != "triton":
                raise AssertionError(f"the plan runs {planned!r}, not 'triton': {why}")
            with kc.poisoned_empty(), ops.use_backend("triton"):
                result = case.call(*run_args)  # the case's own variant (both GEMM epilogues are cases)
            if device == "cuda":
                torch.cuda.synchronize()
            got = _outputs(op, run_args, result)
            if op == "mask_bits":
                ok, note = _mask_bits_verdict(before[0], got[0], before[1])
                row.update(ok=ok, note=note)
                if not ok:
                    raise AssertionError(note)
            else:
                ref = getattr(reference, f"{op}_ref")
                truth_args = _snapshot(before, torch.float64)
                truth = _outputs(op, truth_args, ref(*truth_args))
                low_args = _snapshot(before)
                low = _outputs(op, low_args, ref(*low_args))
                errs = []
                for i, (g, t, l) in enumerate(zip(got, truth, low)):
                    errs.append({"rel_err": kc.rel_err(g, t), "torch_rel_err": kc.rel_err(l, t)})
                    kc.assert_close(g, t, l, what=f"{case.name} output {i}")
                row.update(ok=True, errors=errs)
        except Exception as exc:  # noqa: BLE001 - every failure is a row
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            failures.append(case.name)
        rows.append(row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {case.name}" + ("" if row["ok"] else f"\n     {row['error']}"), flush=True)
    status = "fail" if failures else "pass"
    return {"status": status, "reason": f"{len(failures)} of {len(rows)} op calls failed" if failures else
            f"{len(rows)} op calls", "failed": failures, "cases": rows}


def phase_post(args) -> dict[str, Any]:
    import importlib.util

    import torch

    from videomt_fast import ops
    from videomt_fast.processing.video_processor import VideomtVideoProcessor
    from videomt_fast.testing import postprocess_checks as pc

    spec = importlib.util.spec_from_file_location("_smoke_test_helpers", ROOT / "tests" / "helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    if args.dry:
        device, sizes, queries, classes, side = "cpu", [(45, 80)], 12, 5, 12
    else:
        device, sizes, queries, classes, side = "cuda", [(1080, 1920)], 200, 80, 160
    raw = helpers.random_outputs(1, queries, classes, side, side, seed=4, layout="cells")
    out = type(raw)(class_queries_logits=raw.class_queries_logits.to(device),
                    masks_queries_logits=raw.masks_queries_logits.to(device))
    proc = VideomtVideoProcessor()
    tasks = {
        "instance": (lambda: proc.post_process_instance_segmentation(out, sizes, threshold=0.3), 0.3),
        "panoptic": (lambda: proc.post_process_panoptic_segmentation(out, sizes, threshold=0.5), 0.5),
        "semantic": (lambda: proc.post_process_semantic_segmentation(out, sizes), None),
    }
    rows, failures = {}, []
    for task, (call, threshold) in tasks.items():
        explain_args = (out.class_queries_logits, out.masks_queries_logits, sizes) + ((threshold,) if threshold else ())
        backend = ops.explain(f"{task}_segmentation", *explain_args)
        row: dict[str, Any] = {"backend": backend}
        got = call()  # warm-up: cuBLAS handles, the extension's first launch
        extra = None
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            got = call()
            torch.cuda.synchronize()
            row["seconds"] = round(time.perf_counter() - t0, 4)
            extra = torch.cuda.max_memory_allocated() - base
            row["extra_memory_mb"] = round(extra / 2**20, 2)
        with ops.use_backend("reference"):
            want = call()
        if task == "semantic":
            near = pc.near_class_tie(out, sizes)
            why = next((m for m in (pc.map_mismatch(w, g, n) for w, g, n in zip(want, got, near)) if m), None)
        else:
            near = pc.near_mask_threshold(out, sizes)
            got_cpu = [{"segmentation": r["segmentation"].cpu(), "segments_info": r["segments_info"]} for r in got]
            want_cpu = [{"segmentation": r["segmentation"].cpu(), "segments_info": r["segments_info"]} for r in want]
            why = pc.segments_mismatch(want_cpu, got_cpu, near)
            row["segments"] = len(want[0]["segments_info"])
        row["tolerated_pixels"] = int(near[0].sum())
        row["mismatch"] = why
        if not args.dry and ": cuda" not in backend:
            why = why or f"the CUDA kernels did not run: {backend}"
        if why is not None:
            failures.append(task)
        rows[task] = row
        print(f"{task}: {row}", flush=True)
    return {"status": "fail" if failures else "pass", "reason": f"failed: {failures}" if failures else None,
            "size": f"{sizes[0][0]}x{sizes[0][1]}", "queries": queries, "tasks": rows}


WORKERS = {"env": phase_env, "build": phase_build, "ops": phase_ops, "post": phase_post}


def run_worker(args) -> int:
    result = WORKERS[args.phase](args)
    _write_json(Path(args.work) / f"{args.phase}.json", result)
    return 0 if result.get("status") in ("pass", "skip") else 1


# ------------------------------------------------------------------ command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_smoke.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_smoke_out"), help="results folder (default $OUT)")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, no timing")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds for all phases (default {DEADLINE_S}; four times that with --dry)")
    p.add_argument("--archs", type=lambda s: [a for a in s.split(",") if a], default=list(FPS_ARCHS),
                   help="models of the FPS phases (default vit-s,vit-b,vit-l)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile of transformers (ViT-S and ViT-L; ViT-B when time is left) (default on)")
    p.add_argument("--dinov3", action=argparse.BooleanOptionalAction, default=True,
                   help=f"the FPS row of VidEoMT on DINOv3 ({FPS_DINOV3}) (default on)")
    p.add_argument("--phase", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.deadline is None:
        args.deadline = DEADLINE_S * (4 if args.dry else 1)
    bad = [a for a in args.archs if a not in FPS_ARCHS]
    if bad:
        p.error(f"--archs: unknown {bad}; known {list(FPS_ARCHS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        return run_worker(args)
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
