"""Compiled frame steps: a CPU plan candidate that runs a session's whole frame in one native call.

On a CPU a small model's frame is host-bound: a frame is some two hundred ATen calls, and each pays
Python, argument parsing and dispatch, which can cost more than its arithmetic. This candidate exports
the frame step of a VidEoMT session (embeddings, every layer, the final norm, the head; the queries
carried in from the previous frame) with ``torch.export`` and compiles it ahead of time with
AOTInductor into a shared library: one call per frame, fused elementwise kernels, no Python between ops.
The library reads the model's own weight tensors (bound by address, not copied), so in-place updates
(``load_state_dict``) are seen; tensors replaced since binding are bound again before the next frame
(:mod:`videomt_fast.runtime.tokens`). A video's first frame (from the learned queries) has a library of
its own, compiled alongside.

It is a site of the execution plan (``step.frame_step``; candidates ``ops``, the op plan's frame, and
``aot-inductor``), decided like any other:

1. **Worth compiling** (``auto``): the op plan's step is timed beside the same step of a model of the
   same structure whose arithmetic is negligible (same layers, heads, registers and head, 8 channels per
   head, one query, a one-patch frame: :func:`host_model`), which is the time a frame spends outside
   arithmetic. The step is compiled only when that is at least :data:`HOST_SHARE` of it, i.e. where
   compiling can pay. ``on`` compiles regardless, ``off`` never (``VIDEOMT_FAST_COMPILE`` or
   ``optimize(compile=...)``). The plan notes both times and an estimate of the arithmetic (FLOPs at this
   CPU's measured matrix-product rate).
2. **Compiled within the budget**, in child processes (one per library, side by side) killed when the
   plan's time budget runs out (a compiler that fails or hangs is excluded with its error; the session
   keeps the op plan).
3. **Verified**: on two calibration frames (a first and a later one) both libraries' outputs (masks,
   classes, sequence, queries) are compared with a float64 reference under the op rule (at most twice the
   op plan's own error plus a floor), and the agreement gate against float32 is applied.
4. **Timed** interleaved with the op plan's step (a later frame); chosen when at least 5% faster.

The libraries are cached beside the plan (same key), so this happens once per machine, model config,
dtype and shape. CPU only: on a GPU a session step is one CUDA-graph replay already.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from videomt_fast import ops
from videomt_fast.model.cost import frame_flops
from videomt_fast.runtime import plans, tokens
from videomt_fast.runtime.tokens import full_weights_token

MODES = ("auto", "on", "off")
NAME = "aot-inductor"
SITE = "step.frame_step"
HOST_SHARE = 0.25  # auto: compile when at least this share of the op plan's step is host time
MIN_GAIN = 0.95  # chosen when its step takes at most this share of the op plan's
MIN_COMPILE_S = 5.0  # less budget left than this: not attempted
VERIFY_RESERVE_S = 3.0  # of the budget, kept for verifying and timing what was compiled
UNREAD = {"model.embeddings.mask_token", "model.attn_mask_probs"}  # held by the model, never read by a frame
INPUT_DTYPE = torch.float32  # frames enter the library in float32 (float16/bfloat16 frames convert exactly)


def compile_mode(requested: str | None = None) -> str:
    """``requested``, else ``$VIDEOMT_FAST_COMPILE``, else ``auto``."""
    mode = (requested or os.environ.get("VIDEOMT_FAST_COMPILE") or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"compile mode (VIDEOMT_FAST_COMPILE or compile=) must be one of {MODES}, got {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------
# the step as a module, its cost, its export


class FrameStep(torch.nn.Module):
    """``(frames (B, 3, H, W), previous queries (B, Q, d)) -> (masks, classes, sequence, queries)``: a
    session's later frame, as ``encode_frames`` then ``query_step`` of the wrapped model; with
    ``first=True``, ``frames -> ...``: a video's first frame (the learned queries)."""

    def __init__(self, model, size: tuple[int, int], first: bool = False):
        super().__init__()
        self.model = model
        self.grid = model.grid_for(*size)
        self.first = first

    def forward(self, frames: torch.Tensor, prev: torch.Tensor | None = None):
        hidden = self.model.encode_frames(frames)
        return self.model.query_step(hidden, None if self.first else prev, self.grid)


FORMS = ("later", "first")  # the library of a later frame, and of a video's first frame


def host_model(model, plan: plans.Plan):
    """``(model, frame size)``: a model of ``model``'s structure (layers, heads, registers, MLP kind, upscale
    blocks) with negligible arithmetic (8 channels per head, one query, one class, a one-patch frame),
    in the same dtype and running ``plan``'s op tables: its step time is the host time of a frame."""
    cfg = model.config
    data = cfg.to_dict()
    for key in ("id2label", "label2id"):
        data.pop(key, None)
    data.update(hidden_size=8 * cfg.num_attention_heads, num_queries=1, num_labels=1, image_size=cfg.patch_size)
    small = type(model)(type(cfg).from_dict(data)).to(dtype=model.dtype)
    for stage, module in plans.op_sites(small):
        module.impl = plan.table(stage)
    return small, cfg.patch_hw


def export_step(model, rows: int, size: tuple[int, int], first: bool = False):
    """``torch.export`` of :class:`FrameStep` on the reference ops (what the op plan runs on a CPU)."""
    step = FrameStep(model, size, first)
    cfg = model.config
    with plans.tables_restored(model), torch.inference_mode(False), torch.no_grad(), ops.use_backend("reference"):
        plans.apply(model, None)
        frames = torch.zeros(rows, cfg.num_channels, *size, dtype=INPUT_DTYPE, device=model.device)
        prev = torch.zeros(rows, cfg.num_queries, cfg.hidden_size, dtype=model.dtype, device=model.device)
        return torch.export.export(step, (frames,) if first else (frames, prev), strict=False)


def _compile_in_child(jobs: list[tuple[str, str]], timeout_s: float) -> tuple[bool, str]:
    """Compile ``(exported program file, library file)`` pairs with AOTInductor, each in a child process of
    its own, side by side (their own process groups, all killed at the deadline). Returns ``(ok, error)``."""
    deadline = time.monotonic() + timeout_s
    children = []
    try:
        for exported, package in jobs:
            log = tempfile.TemporaryFile(mode="w+")
            cmd = [sys.executable, "-m", "videomt_fast.runtime.compiled", "--threads", str(torch.get_num_threads()),
                   "--job", exported, package]
            children.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
        for proc, log in children:
            try:
                rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False, f"budget: the compile did not finish within the {timeout_s:.0f} s left of the plan's budget"
            if rc != 0:
                log.seek(0)
                lines = [line for line in log.read().splitlines() if line.strip()]
                last = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
                return False, f"the compiler failed (exit {rc}): {last.strip()[:300]}"
        return True, ""
    finally:
        for proc, log in children:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the compiler's own workers too
                except OSError:
                    pass
                proc.wait()
            log.close()


def _child(argv: list[str]) -> int:
    """``python -m videomt_fast.runtime.compiled --threads N --job EXPORTED LIBRARY [--job ...]``: compile
    exported steps."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m videomt_fast.runtime.compiled")
    p.add_argument("--job", nargs=2, action="append", required=True, metavar=("EXPORTED", "LIBRARY"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # the generated code's parallel loops follow it
    for exported_path, package in args.job:
        exported = torch.export.load(exported_path)
        tmp = str(Path(package).with_suffix(".partial.pt2"))  # the compiler wants a .pt2 name
        torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs={
            "aot_inductor.package_constants_in_so": False,  # the weights are the model's, bound at load
            "always_keep_tensor_constants": True,  # no small weight inlined as literals (they could not change)
        })
        os.replace(tmp, package)  # never a half-written library under the final name
    return 0


# --------------------------------------------------------------------------------------------
# a loaded library bound to a model


def _direct_call(runner):
    """``fn(list of input tensors) -> tuple of outputs`` for a loaded library: its runner without the
    argument and result trees (which parse their specs from JSON on every call), where the outputs are a
    flat tuple; else the runner itself."""
    from torch.utils import _pytree as pytree

    spec = pytree.treespec_loads(runner.loader.get_call_spec()[1])
    leaves = list(range(spec.num_leaves))
    if pytree.tree_unflatten(leaves, spec) != tuple(leaves):
        return lambda inputs: tuple(runner(*inputs))
    run = runner.loader.boxed_run
    return lambda inputs: tuple(run(inputs))


class CompiledStep:
    """The compiled :class:`FrameStep` libraries (first and later frame) bound to ``model``'s tensors.
    ``step(frames, prev)`` returns ``(masks, classes, sequence, queries)`` (``prev`` None: a first frame);
    ``check_all`` compares every tensor's address (a video's first frame), else only the cheap token."""

    def __init__(self, packages: dict[str, str], model, rows: int, size: tuple[int, int],
                 extra_constants: dict[str, torch.Tensor] | None = None):
        self.packages = dict(packages)
        self.shape = (rows, model.config.num_channels, *size)
        self._runners = {form: torch._inductor.aoti_load_package(path) for form, path in packages.items()}
        self._calls = {form: _direct_call(runner) for form, runner in self._runners.items()}
        self._extra = dict(extra_constants or {})
        self.bind(model)

    def bind(self, model) -> None:
        live = {f"model.{k}": v for k, v in model.named_parameters()}
        live.update({f"model.{k}": v for k, v in model.named_buffers()})
        live.update(self._extra)
        bound = {}
        for form, runner in self._runners.items():
            needed = runner.get_constant_fqns()
            missing = [k for k in needed if k not in live]
            if missing:
                raise RuntimeError(f"the compiled {form}-frame step reads tensors the model does not have: "
                                   f"{missing[:3]}")
            baked = sorted(set(live) - set(needed) - set(self._extra) - UNREAD
                           - ({"model.query_updater.weight", "model.query_updater.bias"} if form == "first" else set()))
            if baked:  # values compiled in would not follow weight updates
                raise RuntimeError(f"the compiled {form}-frame step does not bind {baked[:3]}")
            bound[form] = {k: live[k].detach() for k in needed}
            runner.load_constants(bound[form], check_full_update=True, user_managed=True)
        self._bound = bound  # the library holds raw pointers: these references keep the memory alive
        self._model, self._full = model, full_weights_token(model)
        self._seen(model)

    def _seen(self, model) -> None:
        self._registrations = tokens.registrations()
        self._tensors = list(model.parameters()) + list(model.buffers())
        self._ptrs = [t.data_ptr() for t in self._tensors]

    def _changed(self, check_all: bool) -> bool:
        """Whether a tensor may have moved since binding: a parameter or buffer registered anywhere, else
        (per frame) the first and last tensor's address, or (``check_all``) every tensor's."""
        if tokens.registrations() != self._registrations:
            return True
        if check_all:
            return [t.data_ptr() for t in self._tensors] != self._ptrs
        return self._tensors[0].data_ptr() != self._ptrs[0] or self._tensors[-1].data_ptr() != self._ptrs[-1]

    def __call__(self, frames: torch.Tensor, prev: torch.Tensor | None, check_all: bool = False):
        if self._changed(check_all):
            model = self._model
            if full_weights_token(model) != self._full:
                self.bind(model)  # replaced tensors: bind the new ones before they are read
            else:
                self._seen(model)  # a registration elsewhere in the process: not ours
        if frames.dtype != INPUT_DTYPE:
            frames = frames.to(INPUT_DTYPE)  # exact for float16/bfloat16; the library casts on, as the model does
        if prev is None:
            return self._calls["first"]([frames.contiguous()])
        return self._calls["later"]([frames.contiguous(), prev.contiguous()])


# --------------------------------------------------------------------------------------------
# the plan site


def package_paths(plan: plans.Plan) -> dict[str, Path]:
    """The compiled libraries' files (per form): beside the plan's JSON in the plan cache, same key."""
    base = plans._cache_file(plan.key)
    return {form: base.with_suffix(f".step-{form}.pt2") for form in FORMS}


def _calibration_frames(model, rows: int, size: tuple[int, int]):
    """``(first frame, later frame, prev)``: two calibration frames and the queries the first propagates."""
    pixels = plans.calibration_input(model, rows, size, frames=2, seed=2).to(INPUT_DTYPE)
    with torch.inference_mode(False), torch.no_grad():
        _, _, _, prev = model.query_step(model.encode_frames(pixels[:, 0]), None, model.grid_for(*size))
    return pixels[:, 0].contiguous(), pixels[:, 1].contiguous(), prev.clone()


def _truth(model, first: torch.Tensor, later: torch.Tensor, prev: torch.Tensor, size: tuple[int, int]):
    """float64 and float32 reference outputs ``{form: (masks, classes, sequence, queries)}`` of the two
    calibration frames (the later one from ``prev``), on copies of the model with the reference ops."""
    ref = plans.float32_reference(model)
    grid = model.grid_for(*size)
    out = {}
    with torch.no_grad(), ops.use_backend("reference"):
        for dtype in (torch.float32, torch.float64):
            ref.to(dtype)
            out[dtype] = {"first": ref.query_step(ref.encode_frames(first.to(dtype)), None, grid),
                          "later": ref.query_step(ref.encode_frames(later.to(dtype)), prev.to(dtype), grid)}
    del ref
    return out[torch.float64], out[torch.float32]


def _interleaved(fns: dict[str, Any], rounds: int = 7, budget: plans.Budget | None = None,
                 share: float = 0.5) -> dict[str, float]:
    """Median milliseconds per call of each function, alternated call by call: ``rounds`` rounds, fewer
    (at least two) when they would take more than ``share`` of what is left of ``budget``."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    stop = None if budget is None else budget.elapsed() + share * max(0.0, budget.left())
    for fn in fns.values():
        fn()
    for r in range(rounds):
        if r >= 2 and stop is not None and budget.elapsed() > stop:
            budget.skip(f"the compiled step's timing ({r} of {rounds} rounds)")
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def consider(model, plan: plans.Plan, *, mode: str | None = None, budget: plans.Budget | float | None = None,
             compiler=None) -> plans.Site:
    """Decide the ``step.frame_step`` site of ``plan`` (a VidEoMT session plan on a CPU) within ``budget``
    (seconds or a :class:`~videomt_fast.runtime.plans.Budget`): measure, compile, verify, time; record it in
    the plan (and the plan cache). ``compiler(jobs, timeout_s) -> (ok, error)`` replaces the child-process
    compile (tests)."""
    mode = compile_mode(mode)
    budget = plans.as_budget(budget)
    rows, size = plan.rows, tuple(plan.size)
    site = plans.Site(stage="step", op="frame_step", shapes=[[rows, model.config.num_channels, *size]],
                      chosen="ops")
    ops_c = plans.Candidate(name="ops", status="chosen")
    comp = plans.Candidate(name=NAME, status="excluded")
    site.candidates = [ops_c, comp]
    plan.sites[SITE] = site
    plan.notes[:] = [n for n in plan.notes if not n.startswith(f"{SITE}:")]  # of an earlier decision
    plan.__dict__["_step"] = None
    grid = model.grid_for(*size)
    budget.phase("compiled frame step: host time")
    small, small_size = host_model(model, plan)
    small_frame = torch.randn(rows, small.config.num_channels, *small_size)
    small_prev = torch.randn(rows, 1, small.config.hidden_size).to(small.dtype)

    def run_small():
        with torch.no_grad():
            return small.query_step(small.encode_frames(small_frame), small_prev, (1, 1))

    host_ms = _interleaved({"host": run_small})["host"]
    flops = rows * frame_flops(model.config, *size)["total"]
    tokens = rows * (model.config.num_queries + model.config.num_prefix_tokens + 16)
    arith_ms = flops / plans.gemm_rate(model.config, tokens, model.dtype) * 1e3
    if mode == "auto" and host_ms < (HOST_SHARE / 4) * arith_ms:
        # clearly not host-bound: the op step (arithmetic-bound, possibly seconds) is not timed to find that out
        comp.reason = (f"auto: not host-bound (host time {host_ms:.2f} ms per frame, measured; the arithmetic is "
                       f"estimated at {arith_ms:.0f} ms from the FLOPs at this CPU's matrix-product rate); "
                       "VIDEOMT_FAST_COMPILE=on compiles anyway")
        plan.notes.append(f"{SITE}: host time {host_ms:.2f} ms per frame (measured); arithmetic about "
                          f"{arith_ms:.0f} ms (estimated, not measured)")
        return _finish(plan, site, budget)
    first, later, prev = _calibration_frames(model, rows, size)

    def run_ops(frames=later, queries=prev):
        with torch.no_grad():
            return model.query_step(model.encode_frames(frames), queries, grid)

    budget.phase("compiled frame step: timing the op plan's step")
    timed = _interleaved({"ops": run_ops, "host": run_small}, budget=budget, share=0.25)
    ops_c.time_ms = round(timed["ops"], 4)
    host_share = min(1.0, timed["host"] / ops_c.time_ms)
    plan.notes.append(f"{SITE}: op plan step {ops_c.time_ms:.2f} ms, of which host time about {timed['host']:.2f} ms "
                      "(both measured)")
    if mode == "auto" and host_share < HOST_SHARE:
        comp.reason = (f"auto: not host-bound (host time {host_share:.0%} of the op plan's step, under "
                       f"{HOST_SHARE:.0%}); VIDEOMT_FAST_COMPILE=on compiles anyway")
        return _finish(plan, site, budget)
    packages = package_paths(plan)
    extra_path = packages["later"].with_suffix(".constants.pt")
    budget.phase("compiled frame step: exporting")
    try:
        exported = {form: export_step(model, rows, size, first=form == "first") for form in FORMS}
    except Exception as exc:
        comp.reason = f"export raised {type(exc).__name__}: {plans._first_line(exc)}"
        return _finish(plan, site, budget)
    extra = {k: v for ep in exported.values() for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    # verification and timing follow the compile: keep a little for them
    left = budget.left() - VERIFY_RESERVE_S
    if left < MIN_COMPILE_S:
        comp.reason = (f"budget: {max(0.0, budget.left()):.0f} s of the {budget.seconds:.0f} s planning budget "
                       "left, too little to compile")
        budget.skip("the compiled frame step (not compiled)")
        return _finish(plan, site, budget)
    budget.phase("compiled frame step: compiling")
    compile_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="videomt_fast-step-") as tmp:
        targets = dict(packages)
        try:
            plans.cache_dir().mkdir(parents=True, exist_ok=True)
        except OSError:  # an unwritable cache: compiled for this process only
            targets = {form: Path(tmp) / path.name for form, path in packages.items()}
            extra_path = Path(tmp) / extra_path.name
        jobs = []
        for form, ep in exported.items():
            jobs.append((os.path.join(tmp, f"{form}.pt2"), str(targets[form])))
            torch.export.save(ep, jobs[-1][0])
        del exported
        ok, error = (compiler or _compile_in_child)(jobs, left)
        compiled_s = time.perf_counter() - compile_start
        if not ok:
            comp.reason = error
            if error.startswith("budget"):
                budget.skip("the compiled frame step (its compile was stopped)")
            return _finish(plan, site, budget)
        if extra:
            torch.save(extra, extra_path)
        try:
            step = CompiledStep({form: str(path) for form, path in targets.items()}, model, rows, size, extra)
        except Exception as exc:
            comp.reason = f"the compiled library failed to load: {type(exc).__name__}: {plans._first_line(exc)}"
            return _finish(plan, site, budget)
    plan.notes.append(f"{SITE}: {NAME} compiled in {compiled_s:.1f} s (first-frame and later-frame libraries)")
    budget.phase("compiled frame step: verifying and timing")
    _verify_and_time(model, plan, site, step, (first, later, prev), run_ops, size, budget)
    return _finish(plan, site, budget)


def _verify_and_time(model, plan, site, step, calibration, run_ops, size, budget=None) -> None:
    """Both forms against float64 (the op rule) and float32 (the gate); then the later frame timed."""
    ops_c, comp = site.candidates
    first, later, prev = calibration
    f64, f32 = _truth(model, first, later, prev, size)
    inputs = {"first": (first, None), "later": (later, prev)}
    try:
        with torch.no_grad():
            outs = {form: step(frames, queries, check_all=True) for form, (frames, queries) in inputs.items()}
    except Exception as exc:
        comp.reason = f"raised {type(exc).__name__}: {plans._first_line(exc)}"
        return
    ops_outs = {form: run_ops(frames, queries) for form, (frames, queries) in inputs.items()}
    errors, tols = {}, {}
    for form in inputs:
        ops_error = plans._error(ops_outs[form], f64[form])
        tols[form] = plans.tolerance(model.dtype, ops_error)
        errors[form] = plans._error(outs[form], f64[form])
        ops_c.error = ops_error if ops_c.error is None else max(ops_c.error, ops_error)
    worst = max(FORMS, key=lambda form: (math.isnan(errors[form]), errors[form] / tols[form]))
    comp.error, comp.tolerance = errors[worst], tols[worst]
    ops_c.tolerance = comp.tolerance
    if math.isnan(comp.error) or not comp.error <= comp.tolerance:
        comp.reason = (f"{worst} frame: NaN or inf in the output" if math.isnan(comp.error)
                       else f"{worst} frame: error {comp.error:.2e} over tolerance {comp.tolerance:.2e}")
        return
    for form in inputs:
        verdict = plans.judge(outs[form][:2], f32[form][:2], model.dtype, peer=ops_outs[form][:2])
        if not verdict["passed"]:
            comp.reason = f"{form} frame: misses the agreement gate ({plans.gate_summary(verdict)})"
            return
    with torch.inference_mode():
        timed = _interleaved({"ops": run_ops, NAME: lambda: step(later, prev)}, budget=budget)
    ops_c.time_ms, comp.time_ms = round(timed["ops"], 4), round(timed[NAME], 4)
    comp.status = "ok"
    if comp.time_ms <= MIN_GAIN * ops_c.time_ms:
        site.chosen, comp.status, ops_c.status = NAME, "chosen", "ok"
        plan.__dict__["_step"] = step


def _finish(plan: plans.Plan, site: plans.Site, budget: plans.Budget | None = None) -> plans.Site:
    """Remember the decision with its plan, unless the plan or this decision was cut short by its budget
    (then it is used in this process and decided again in the next)."""
    if budget is not None and budget.skipped:
        plan.__dict__["_cut_short"] = True
    if plan.key:
        plans.save_cached(plan)
    return site


def attach(model, plan: plans.Plan) -> CompiledStep | None:
    """Load and bind the libraries a cached plan chose (None when the plan did not choose them). Raises when
    they cannot be used (missing, unloadable)."""
    site = plan.sites.get(SITE)
    if site is None or site.chosen != NAME:
        return None
    packages = package_paths(plan)
    extra_path = packages["later"].with_suffix(".constants.pt")
    extra = torch.load(extra_path, weights_only=True) if extra_path.exists() else None
    return CompiledStep({form: str(path) for form, path in packages.items()}, model, plan.rows,
                        tuple(plan.size), extra)


UNDECIDED = object()


def step_for(model, plan: plans.Plan, mode: str | None = None,
             budget: plans.Budget | float | None = None) -> CompiledStep | None:
    """The compiled step a session runs for ``plan`` (None: the op plan), deciding the site on first use."""
    held = plan.__dict__.get("_step", UNDECIDED)
    if held is not UNDECIDED:
        return held
    mode = compile_mode(mode)
    if (mode == "off" or model.device.type != "cpu" or plan.mode == "static" or not plan.key
            or not hasattr(model, "query_updater")):  # a plan outside the cache (no key) has no library files
        plan.__dict__["_step"] = None
        return None
    site = plan.sites.get(SITE)
    retry = site is not None and mode == "on" and site.chosen != NAME and any(
        c.name == NAME and c.reason.startswith("auto:") for c in site.candidates)
    unusable = None
    if site is not None and not retry:
        try:
            plan.__dict__["_step"] = attach(model, plan)
            return plan.__dict__["_step"]
        except Exception as exc:  # the cached library is gone or broken: decide again
            unusable = f"{type(exc).__name__}: {plans._first_line(exc)}"
    consider(model, plan, mode=mode, budget=budget)
    if unusable:
        plan.notes.append(f"{SITE}: the cached library was not usable ({unusable}); decided again")
        _finish(plan, plan.sites[SITE])
    return plan.__dict__.get("_step")


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
