"""Execution plans: which implementation runs at every op site of a frame, decided by measurement.

A plan is built for one model on one device, in one dtype, for one input shape ``(rows, height, width)``
(rows = frames per call). Building it:

1. **Record.** One reference frame runs with recording op tables: every op site keeps the arguments of
   its calls (real shapes, real activations, every argument form the model uses there, e.g. the query
   update of the first frame and of later frames).
2. **Verify.** Every candidate of the site (:func:`videomt_fast.ops.candidates`: the reference, which is
   the library baseline -- ``F.linear``/cuBLAS, SDPA, ``F.layer_norm`` --, SDPA restricted to each of its
   backends, the Triton kernels and their variants, CUDA kernels) runs on those arguments. Its output is
   compared with the reference computed in float64: the relative error ``||out - truth|| / ||truth||``
   must be at most :data:`FACTOR` times the reference's own error in the model's dtype (PyTorch's error at
   that precision) plus a floor (:func:`tolerance`); packed mask bits may differ on at most that share of
   bits. A candidate that raises, refuses the inputs (guard), mismatches or returns NaN/inf is excluded,
   with the reason kept.
3. **Time.** Verified candidates are timed where they run (CUDA events on a GPU, the wall clock on a CPU;
   median of repeats); the fastest wins. The whole calibration has a time budget (``budget_s``); sites
   left when it runs out take the fastest verified candidate timed so far, else the reference.
4. **Gate.** On a calibration input the planned model must agree with a float32 reference of the same
   weights: binarized masks on at least :data:`GATE_MASKS` of pixels and class argmax on at least
   :data:`GATE_CLASSES` of queries. Otherwise sites fall back to the reference one by one, worst error
   first, until it does.

On a CPU the candidates are the reference ops; what a plan decides there is the compute dtype (with
``dtype="auto"`` and a CPU with native bf16, AVX512-BF16 or AMX, bfloat16 is kept when it passes the gate
and is faster: :func:`choose_cpu_dtype`) and, for a VidEoMT session, whether its frame step runs as one
compiled call (the ``step.frame_step`` site, :mod:`videomt_fast.runtime.compiled`).

A plan is applied by installing, per op site, an :class:`~videomt_fast.ops.OpTable` of the chosen callables
(:func:`apply`): a planned frame calls them directly, with no dispatch. Plans are cached on disk
(:func:`cache_dir`), keyed by device, driver, torch / Triton / package versions, model config, dtype and
shape, so calibration runs once per machine. ``VIDEOMT_FAST_PLAN=auto|recalibrate|static`` (or the
``plan=`` argument of ``optimize()``) picks: use the cache, calibrate again, or no calibration (the
dispatcher's static priority, resolved once).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from videomt_fast import ops
from videomt_fast.ops import registry

FACTOR = 2.0  # a candidate may err at most this many times the reference's own error at its precision
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}
BITS_FLOOR = 1e-3  # share of packed mask bits that may flip (logits within rounding of zero)
GATE_MASKS = 0.995  # binarized masks: share of pixels equal to the float32 reference
GATE_CLASSES = 0.99  # class argmax: share of queries equal to the float32 reference
MODES = ("auto", "recalibrate", "static")
STAGES = ("early", "query", "masked", "head", "frame", "post", "step")
UNTABLED = ("post", "step")  # sites the plan decides but does not install as op tables (processors, sessions)
PLAN_VERSION = 1


def tolerance(dtype: torch.dtype, reference_error: float) -> float:
    """The largest relative error a candidate may have at ``dtype`` (see the module doc)."""
    return FACTOR * reference_error + FLOOR.get(dtype, 1e-3)


# --------------------------------------------------------------------------------------------
# op sites


def op_sites(model) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(stage, module)`` for every module that calls ops. Stages: ``early`` (layers before the queries),
    ``query`` (layers with the queries), ``masked`` (EoMT layers with masked attention), ``head`` (mask
    head), ``frame`` (the model itself: query update, final norm, mask bits). Sites of one stage see the
    same shapes, so one measurement serves them all."""
    yield "frame", model
    yield "head", model.mask_head
    masked = set()
    if not hasattr(model, "query_updater"):  # EoMT: layers whose attention is masked
        masked = {model.query_start + i for i, p in enumerate(model._mask_probs()) if p > 0}
    for index, layer in enumerate(model.layers):
        stage = "early" if index < model.query_start else ("masked" if index in masked else "query")
        yield stage, layer
        yield stage, layer.mlp


def stages_of(model) -> list[str]:
    return sorted({stage for stage, _ in op_sites(model)}, key=STAGES.index)


# --------------------------------------------------------------------------------------------
# the plan


@dataclass
class Candidate:
    name: str
    status: str  # "chosen", "ok" (verified, slower), "excluded", "untimed" (verified, budget ran out)
    error: float | None = None  # relative error vs float64, worst over the recorded calls
    tolerance: float | None = None
    time_ms: float | None = None
    reason: str = ""


@dataclass
class Site:
    stage: str
    op: str
    shapes: list[list[int]]  # the first tensor argument's shape of each recorded call form
    chosen: str
    candidates: list[Candidate] = field(default_factory=list)
    fallback: str = ""  # why the gate moved this site to the reference

    @property
    def key(self) -> str:
        return f"{self.stage}.{self.op}"


@dataclass
class Plan:
    device: str
    dtype: str
    rows: int
    size: tuple[int, int]
    mode: str  # "calibrated", "static", or "cached" (a calibrated plan read from disk)
    sites: dict[str, Site]
    gate: dict[str, Any] = field(default_factory=dict)
    calibration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    key: dict[str, Any] = field(default_factory=dict)
    _tables: dict[str, ops.OpTable] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- resolution
    def resolve(self) -> "Plan":
        """Look up the chosen callables (raises KeyError when one is no longer available)."""
        by_stage: dict[str, dict[str, Callable]] = {}
        for site in self.sites.values():
            if site.stage in UNTABLED:  # processors dispatch post per call; a session runs the step
                continue
            found = ops.candidates(site.op, self.device)
            if site.chosen not in found:
                raise KeyError(f"{site.key}: implementation {site.chosen!r} is not available here "
                               f"(available: {sorted(found)})")
            by_stage.setdefault(site.stage, {})[site.op] = found[site.chosen][0]
        self._tables = {stage: ops.OpTable(fns, label=f"plan {stage}") for stage, fns in by_stage.items()}
        return self

    def table(self, stage: str) -> ops.OpTable:
        return self._tables.get(stage, ops.DISPATCH)

    def choices(self) -> dict[str, str]:
        return {key: site.chosen for key, site in self.sites.items()}

    # ---------------------------------------------------------------- serialization
    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION, "device": self.device, "dtype": self.dtype, "rows": self.rows,
            "size": list(self.size), "mode": self.mode, "gate": self.gate, "calibration_s": self.calibration_s,
            "notes": self.notes, "key": self.key,
            "sites": {key: {"stage": s.stage, "op": s.op, "shapes": s.shapes, "chosen": s.chosen,
                            "fallback": s.fallback, "candidates": [dataclasses.asdict(c) for c in s.candidates]}
                      for key, s in self.sites.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan format {data.get('version')!r}, expected {PLAN_VERSION}")
        sites = {key: Site(stage=s["stage"], op=s["op"], shapes=s["shapes"], chosen=s["chosen"],
                           fallback=s.get("fallback", ""), candidates=[Candidate(**c) for c in s["candidates"]])
                 for key, s in data["sites"].items()}
        return cls(device=data["device"], dtype=data["dtype"], rows=int(data["rows"]), size=tuple(data["size"]),
                   mode=data["mode"], sites=sites, gate=data.get("gate", {}),
                   calibration_s=float(data.get("calibration_s", 0.0)), notes=list(data.get("notes", [])),
                   key=data.get("key", {}))

    # ---------------------------------------------------------------- display
    def format(self) -> str:
        """The plan as a table a person can read: per site the choice, every candidate's time and error,
        and why any was excluded."""
        lines = [f"execution plan: {self.device}, {self.dtype}, {self.rows} x {self.size[0]}x{self.size[1]} "
                 f"({self.mode}, calibration {self.calibration_s:.1f} s)"]
        if self.gate:
            lines.append("gate vs float32: " + ", ".join(f"{k}={v}" for k, v in self.gate.items()))
        lines.append(f"{'site':28s} {'chosen':16s} candidates (time ms, rel. error / tolerance, or why excluded)")
        for key, site in self.sites.items():
            parts = []
            for c in site.candidates:
                if c.status == "excluded":
                    parts.append(f"{c.name}: excluded ({c.reason})")
                else:
                    t = "-" if c.time_ms is None else f"{c.time_ms:.3f}"
                    e = "-" if c.error is None else f"{c.error:.1e}/{c.tolerance:.1e}"
                    parts.append(f"{c.name}: {t} ms, {e}")
            chosen = site.chosen + (" (fallback)" if site.fallback else "")
            lines.append(f"{key:28s} {chosen:16s} " + "; ".join(parts))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def apply(model, plan: Plan | None) -> None:
    """Install ``plan``'s tables in the model's op sites (``None``: per-call dispatch everywhere)."""
    for stage, module in op_sites(model):
        module.impl = ops.DISPATCH if plan is None else plan.table(stage)


@contextlib.contextmanager
def tables_restored(model) -> Iterator[None]:
    """Whatever op tables the body installs, the model's own are back afterwards."""
    previous = [(module, module.impl) for _, module in op_sites(model)]
    try:
        yield
    finally:
        for module, table in previous:
            module.impl = table


def apply_stage(model, plan: Plan, stage: str) -> None:
    table = plan.table(stage)
    for s, module in op_sites(model):
        if s == stage:
            module.impl = table


# --------------------------------------------------------------------------------------------
# recording


class _Recorder(ops.OpTable):
    """Runs the reference of every op and keeps the arguments of each call form seen at its stage."""

    def __init__(self, stage: str, calls: dict):
        super().__init__({}, label=f"recording {stage}")
        self.__dict__["_stage"] = stage
        self.__dict__["_calls"] = calls

    def __getattr__(self, name: str) -> Callable:
        if name.startswith("_") or name not in registry._OPS:
            raise AttributeError(name)
        ref = registry._OPS[name].ref
        stage, calls = self._stage, self._calls

        def record(*args):
            form = tuple(type(a).__name__ if not isinstance(a, torch.Tensor) else "T" for a in args)
            forms = calls.setdefault((stage, name), {})
            if form not in forms:
                forms[form] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
            return ref(*args)

        self.__dict__[name] = record
        return record


def calibration_input(model, rows: int, size: tuple[int, int], frames: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic input of normalized-pixel statistics: smooth random blobs, not white noise, so masks
    have regions and edges. ``(rows, frames, 3, H, W)`` (``frames`` > 1 for VidEoMT clips)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.randn(rows * frames, model.config.num_channels, max(1, h // 32), max(1, w // 32), generator=gen)
    pixels = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * 1.5
    pixels = pixels + 0.1 * torch.randn(pixels.shape, generator=gen)
    return pixels.view(rows, frames, -1, h, w).to(device=model.device, dtype=model.dtype)


def run_frames(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masks, classes)`` of ``pixels`` ``(rows, frames, 3, H, W)`` through the model's frame steps (the
    queries carried between frames for VidEoMT; EoMT takes each frame as an image), with whatever op
    tables the model holds. No input scan, no graphs."""
    masks, classes = [], []
    if hasattr(model, "query_updater"):
        prev = None
        grid = model.grid_for(*pixels.shape[-2:])
        for t in range(pixels.shape[1]):
            hidden = model.encode_frames(pixels[:, t])
            m, c, _, prev = model.query_step(hidden, prev, grid)
            masks.append(m)
            classes.append(c)
    else:
        probs = model._mask_probs()
        for t in range(pixels.shape[1]):
            out = model._forward(pixels[:, t], probs)
            masks.append(out.masks_queries_logits)
            classes.append(out.class_queries_logits)
    return torch.cat(masks), torch.cat(classes)


def record_calls(model, rows: int, size: tuple[int, int], stages: list[str]) -> dict:
    """``{(stage, op): {form: args}}`` of a two-frame run (VidEoMT's later frames take another form)."""
    calls: dict = {}
    with tables_restored(model), torch.no_grad():
        for stage, module in op_sites(model):
            module.impl = _Recorder(stage, calls)
        run_frames(model, calibration_input(model, rows, size, frames=2, seed=1))
    return {k: v for k, v in calls.items() if k[0] in stages}


# --------------------------------------------------------------------------------------------
# verification and timing


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _to64(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _error(out, truth) -> float:
    """Worst relative error over the outputs; share of differing bits for integer (packed mask) outputs."""
    worst = 0.0
    for o, t in zip(_as_tuple(out), _as_tuple(truth)):
        if o.shape != t.shape:
            return math.inf
        if not o.is_floating_point():
            diff = (o.to(torch.int64) ^ t.to(torch.int64)).view(-1)
            flips = sum(int(((diff >> b) & 1).sum()) for b in range(32))
            worst = max(worst, flips / max(1, 32 * o.numel()))
            continue
        if not bool(torch.isfinite(o).all()):
            return math.nan
        o64, t64 = o.double(), t.double()
        den = float(t64.norm())
        num = float((o64 - t64).norm())
        worst = max(worst, num / den if den > 0 else num)
    return worst


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def _shapes(form_args: list[tuple]) -> list[list[int]]:
    """The first tensor argument's shape of each recorded call form."""
    return [list(next(a for a in args if isinstance(a, torch.Tensor)).shape) for args in form_args]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_timer(fn: Callable, args: tuple, device: torch.device, repeats: int | None = None) -> float:
    """Median milliseconds of ``fn(*args)``: CUDA events on a GPU, the wall clock elsewhere."""
    repeats = repeats or (25 if device.type == "cuda" else 5)
    for _ in range(2):
        fn(*args)
    times = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


Timer = Callable[[str, str, Callable, tuple], float]  # (site key, candidate, fn, args) -> ms


def _calibrate_site(stage: str, op: str, forms: dict, device: torch.device, dtype: torch.dtype,
                    timer: Timer, deadline: float) -> Site:
    found = ops.candidates(op, device)
    ref = found["reference"][0]
    form_args = list(forms.values())
    site = Site(stage=stage, op=op, shapes=_shapes(form_args), chosen="reference")
    if len(found) == 1:  # nothing to choose between (a CPU): no verification or timing to pay for
        site.candidates = [Candidate(name="reference", status="chosen", reason="the only candidate here")]
        return site
    truths, ref_errors = [], []
    for args in form_args:
        truth = ref(*_to64(_clone(args)))
        truths.append(truth)
        ref_errors.append(_error(ref(*_clone(args)), truth))
    key = f"{stage}.{op}"
    timed_args = form_args[-1]  # the steady-state form (VidEoMT: a later frame)
    best: tuple[float, str] | None = None
    for name, (fn, guard) in found.items():
        cand = Candidate(name=name, status="ok")
        site.candidates.append(cand)
        try:
            if guard is not None:
                why = next((w for w in (guard(*args) for args in form_args) if w is not None), None)
                if why is not None:
                    cand.status, cand.reason = "excluded", f"refuses the inputs: {why}"
                    continue
            errors, tols = [], []
            for args, truth, ref_err in zip(form_args, truths, ref_errors):
                errors.append(_error(fn(*_clone(args)), truth))
                tols.append(tolerance(dtype, ref_err) if truth_is_float(truth) else FACTOR * ref_err + BITS_FLOOR)
            _synchronize(device)
        except Exception as exc:  # a candidate that raises is excluded, with the reason kept
            cand.status, cand.reason = "excluded", f"raised {type(exc).__name__}: {_first_line(exc)}"
            continue
        ratios = [e / t for e, t in zip(errors, tols)]
        worst = max(range(len(errors)), key=lambda i: (math.isnan(errors[i]), ratios[i]))
        cand.error, cand.tolerance = errors[worst], tols[worst]
        if math.isnan(cand.error) or not cand.error <= cand.tolerance:
            cand.status = "excluded"
            cand.reason = ("NaN or inf in the output" if math.isnan(cand.error)
                           else f"error {cand.error:.2e} over tolerance {cand.tolerance:.2e}")
            continue
        if time.perf_counter() > deadline and best is not None:
            cand.status, cand.reason = "untimed", "calibration budget spent"
            continue
        try:
            cand.time_ms = float(timer(key, name, fn, _clone(timed_args)))
        except Exception as exc:
            cand.status, cand.reason = "excluded", f"raised while timed: {type(exc).__name__}: {_first_line(exc)}"
            continue
        if best is None or cand.time_ms < best[0]:
            best = (cand.time_ms, name)
    if best is not None:
        site.chosen = best[1]
    for cand in site.candidates:
        if cand.name == site.chosen:
            cand.status = "chosen"
    return site


def truth_is_float(truth) -> bool:
    return all(t.is_floating_point() for t in _as_tuple(truth))


def _static_site(stage: str, op: str, forms: dict, device: torch.device) -> Site:
    """The dispatcher's fixed priority, resolved once on the recorded arguments (no timing)."""
    form_args = list(forms.values())
    shapes = _shapes(form_args)
    chosen = {registry.choose(op, *args)[0] for args in form_args}
    name = chosen.pop() if len(chosen) == 1 else "reference"
    return Site(stage=stage, op=op, shapes=shapes, chosen=name,
                candidates=[Candidate(name=name, status="chosen", reason="static priority")])


# --------------------------------------------------------------------------------------------
# post-processing (dispatched per call by the processors: a plan verifies, times and excludes)

POST_OPS = ("instance_segmentation", "panoptic_segmentation", "semantic_segmentation")
POST_PIXELS = 1e-4  # share of map pixels that may differ (logits within rounding of zero flip)


def _maps_error(out, truth) -> float:
    """Worst share of differing pixels over the maps, inf when anything else (ids kept, labels) differs
    or scores differ by more than 1e-5."""
    maps_out, maps_truth = out[0], truth[0]
    if maps_out and isinstance(maps_out[0], tuple):  # semantic: (map, scores or None) per frame
        maps_out, maps_truth = [m for m, _ in maps_out], [m for m, _ in maps_truth]
    if len(maps_out) != len(maps_truth):
        return math.inf
    worst = 0.0
    for a, b in zip(maps_out, maps_truth):
        if a.shape != b.shape:
            return math.inf
        worst = max(worst, float((a != b).float().mean()))
    for a, b in zip(out[1:], truth[1:]):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape:
                return math.inf
            if a.is_floating_point():
                if a.numel() and (not bool(torch.isfinite(a).all())
                                  or float((a.double() - b.double()).abs().max()) > 1e-5):
                    return math.inf
            elif not torch.equal(a.cpu(), b.cpu()):
                return math.inf
    return worst


def postprocess_sites(device: torch.device, num_queries: int, num_labels: int, size: tuple[int, int],
                      timer: Timer, seed: int = 0) -> list[Site]:
    """Verify and time every post-processing implementation on random logits of these shapes (masks at a
    quarter of ``size``, maps at ``size``); an implementation that raises or differs is excluded from
    per-call dispatch (:func:`videomt_fast.ops.exclude`)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = max(1, size[0] // 4), max(1, size[1] // 4)
    classes = (torch.randn(1, num_queries, num_labels + 1, generator=gen) * 3).to(device)
    coarse = torch.randn(1, num_queries, max(1, h // 4), max(1, w // 4), generator=gen) * 4
    masks = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).to(device)
    args = {"instance_segmentation": (classes, masks, [size], 0.0),
            "panoptic_segmentation": (classes, masks, [size], 0.0),
            "semantic_segmentation": (classes, masks, [size])}
    sites = []
    for op in POST_OPS:
        found = ops.candidates(op, device)
        truth = found["reference"][0](*args[op])
        site = Site(stage="post", op=op, shapes=[list(masks.shape)], chosen="reference")
        best = None
        for name, (fn, guard) in found.items():
            cand = Candidate(name=name, status="ok", tolerance=POST_PIXELS)
            site.candidates.append(cand)
            try:
                why = guard(*args[op]) if guard is not None else None
                if why is not None:
                    cand.status, cand.reason = "excluded", f"refuses the inputs: {why}"
                    continue
                cand.error = _maps_error(_as_tuple(fn(*args[op])), _as_tuple(truth))
                _synchronize(device)
            except Exception as exc:
                cand.status, cand.reason = "excluded", f"raised {type(exc).__name__}: {_first_line(exc)}"
            else:
                if not cand.error <= POST_PIXELS:
                    cand.status = "excluded"
                    cand.reason = f"maps differ from the reference ({cand.error:.2e} of pixels, or ids/labels/scores)"
                elif len(found) > 1:
                    cand.time_ms = float(timer(f"post.{op}", name, fn, args[op]))
                    if best is None or cand.time_ms < best[0]:
                        best = (cand.time_ms, name)
            if cand.status == "excluded" and name in registry.BACKENDS and not cand.reason.startswith("refuses"):
                ops.exclude(op, name, f"post.{op}: {cand.reason}")
        site.chosen = best[1] if best else "reference"
        for cand in site.candidates:
            cand.status = "chosen" if cand.name == site.chosen else cand.status
        sites.append(site)
    return sites


# --------------------------------------------------------------------------------------------
# the gate


def float32_reference(model):
    """A float32 copy of ``model`` on per-call dispatch, forced to the reference ops by its user."""
    ref = copy.deepcopy(model)  # op tables reduce to per-call dispatch when copied
    probs = model.attn_mask_probs.detach().clone()
    ref.float()
    ref.attn_mask_probs = probs.to(ref.attn_mask_probs.device)
    ref._refresh_mask_probs()
    return ref


def agreement(masks, classes, ref_masks, ref_classes) -> dict[str, float]:
    return {"masks": float(((masks.float() > 0) == (ref_masks > 0)).float().mean()),
            "classes": float((classes.float().argmax(-1) == ref_classes.argmax(-1)).float().mean())}


def gate_passes(result: dict[str, float]) -> bool:
    return result["masks"] >= GATE_MASKS and result["classes"] >= GATE_CLASSES


def _gate(model, plan: Plan, pixels: torch.Tensor, reference: tuple) -> dict[str, float]:
    with tables_restored(model), torch.no_grad():
        apply(model, plan.resolve())
        masks, classes = run_frames(model, pixels.to(model.dtype))
    return agreement(masks, classes, *reference)


def reference_outputs(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 reference ``(masks, classes)`` of ``pixels`` for the gate (a temporary float32 copy)."""
    ref = float32_reference(model)
    with torch.no_grad(), ops.use_backend("reference"):
        out = run_frames(ref, pixels.float())
    del ref
    return out


# --------------------------------------------------------------------------------------------
# building


def build(model, rows: int, size: tuple[int, int], *, mode: str = "auto", stages: list[str] | None = None,
          timer: Timer | None = None, budget_s: float = 60.0, gate: bool = True) -> Plan:
    """Calibrate (or, with ``mode="static"``, resolve the dispatcher's priority for) a plan of ``model`` at
    ``rows`` frames of ``size``. ``timer(site, candidate, fn, args) -> ms`` replaces the device timer
    (tests). Does not apply the plan."""
    if mode not in MODES:
        raise ValueError(f"plan mode must be one of {MODES}, got {mode!r}")
    start = time.perf_counter()
    device, dtype = model.device, model.dtype
    stages = stages or stages_of(model)
    calls = record_calls(model, rows, size, stages)
    sites: dict[str, Site] = {}
    if timer is None:
        def timer(key, name, fn, args):
            return default_timer(fn, args, device)
    deadline = start + budget_s
    for (stage, op), forms in sorted(calls.items(), key=lambda kv: (STAGES.index(kv[0][0]), kv[0][1])):
        site = (_static_site(stage, op, forms, device) if mode == "static"
                else _calibrate_site(stage, op, forms, device, dtype, timer, deadline))
        sites[site.key] = site
    if mode != "static" and "frame" in stages and device.type == "cuda":
        for site in postprocess_sites(device, model.config.num_queries, model.config.num_labels, size, timer):
            sites[site.key] = site
    plan = Plan(device=str(device), dtype=str(dtype).replace("torch.", ""), rows=rows, size=tuple(size),
                mode="static" if mode == "static" else "calibrated", sites=sites)
    if time.perf_counter() > deadline:
        plan.notes.append(f"calibration budget of {budget_s:.0f} s spent: later candidates were not timed")
    only_references = all(site.chosen == "reference" for site in sites.values())
    if gate and mode != "static" and not (only_references and dtype == torch.float32):
        run_gate(model, plan)  # (the float32 references are the gate's own reference: nothing to check)
    plan.calibration_s = round(time.perf_counter() - start, 3)
    return plan.resolve()


def run_gate(model, plan: Plan) -> None:
    """Check ``plan`` against a float32 reference; fall back site by site (worst error first) until it
    agrees. Records the result in ``plan.gate``."""
    pixels = calibration_input(model, plan.rows, plan.size, frames=2 if hasattr(model, "query_updater") else 1)
    reference = reference_outputs(model, pixels)
    result = _gate(model, plan, pixels, reference)
    fallbacks = []

    def badness(site: Site) -> float:
        chosen = next(c for c in site.candidates if c.name == site.chosen)
        return (chosen.error or 0.0) / (chosen.tolerance or 1.0)

    pending = sorted((s for s in plan.sites.values() if s.chosen != "reference" and s.stage not in UNTABLED),
                     key=badness, reverse=True)
    while not gate_passes(result) and pending:
        site = pending.pop(0)
        site.fallback = f"gate failed with {site.chosen} (masks {result['masks']:.4f}, classes {result['classes']:.4f})"
        fallbacks.append(site.key)
        for c in site.candidates:
            c.status = "chosen" if c.name == "reference" else ("ok" if c.status == "chosen" else c.status)
        site.chosen = "reference"
        result = _gate(model, plan, pixels, reference)
    plan.gate = {"masks": round(result["masks"], 6), "classes": round(result["classes"], 6),
                 "passed": gate_passes(result), "fallbacks": fallbacks}
    if not gate_passes(result):
        plan.notes.append(f"even the reference ops in {plan.dtype} miss the gate (masks {result['masks']:.4f}, "
                          f"classes {result['classes']:.4f}): PyTorch's own error at this precision")


# --------------------------------------------------------------------------------------------
# the CPU dtype


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 can beat fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def choose_cpu_dtype(model, rows: int, size: tuple[int, int], timer: Callable[[str], float] | None = None) -> dict:
    """On a CPU: time a frame in float32 and in bfloat16 (when native) and gate bf16 against float32.
    Returns ``{"dtype": chosen, "float32_ms", "bfloat16_ms", "gate": {...}, "reason"}``; casts nothing."""
    pixels = calibration_input(model, rows, size, frames=2 if hasattr(model, "query_updater") else 1).float()
    result: dict[str, Any] = {"dtype": "float32"}
    if not native_bf16():
        result["reason"] = "this CPU has no native bf16 (AVX512-BF16 or AMX): float32"
        return result
    fp32 = float32_reference(model)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.attn_mask_probs = fp32.attn_mask_probs.clone()
    bf16._refresh_mask_probs()

    def run(m, x):
        with torch.no_grad():
            return run_frames(m, x)

    def measured(m, x) -> float:
        t0 = time.perf_counter()
        run(m, x)
        return (time.perf_counter() - t0) * 1e3

    with ops.use_backend("reference"):
        reference = run(fp32, pixels)
        low = pixels.to(torch.bfloat16)
        gate = agreement(*run(bf16, low), *reference)
        if timer is not None:
            result["float32_ms"], result["bfloat16_ms"] = timer("float32"), timer("bfloat16")
        else:  # interleaved, so a load that comes and goes weighs on both alike; medians of 3
            times: dict[str, list[float]] = {"float32_ms": [], "bfloat16_ms": []}
            run(bf16, low)
            for _ in range(3):
                times["float32_ms"].append(measured(fp32, pixels))
                times["bfloat16_ms"].append(measured(bf16, low))
            for key, values in times.items():
                result[key] = round(sorted(values)[1], 3)
    result["gate"] = {k: round(v, 6) for k, v in gate.items()} | {"passed": gate_passes(gate)}
    if not gate_passes(gate):
        result["reason"] = "bfloat16 misses the agreement gate: float32"
    elif result["bfloat16_ms"] < 0.95 * result["float32_ms"]:
        result["dtype"], result["reason"] = "bfloat16", "bfloat16 passes the gate and is faster"
    else:
        result["reason"] = "bfloat16 is not faster here: float32"
    return result


# --------------------------------------------------------------------------------------------
# the cache


def cache_dir() -> Path:
    """``$VIDEOMT_FAST_PLAN_CACHE``, else ``$XDG_CACHE_HOME/videomt_fast/plans`` (``~/.cache/...``)."""
    explicit = os.environ.get("VIDEOMT_FAST_PLAN_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "videomt_fast" / "plans"


def cache_key(model, rows: int, size: tuple[int, int], stages: list[str]) -> dict[str, Any]:
    """Everything a calibrated plan depends on: device, driver, versions, switches, model, dtype, shape."""
    from videomt_fast import __version__

    device = model.device
    key: dict[str, Any] = {"package": __version__, "torch": torch.__version__, "device": str(device.type)}
    try:
        import triton

        key["triton"] = triton.__version__
    except Exception:
        key["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   cuda=torch.version.cuda, driver=_driver_version())
    else:
        key.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                   native_bf16=native_bf16())
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    key.update(config=hashlib.sha256(config.encode()).hexdigest()[:16], model=type(model).__name__,
               dtype=str(model.dtype).replace("torch.", ""), rows=rows, size=list(size), stages=stages,
               switches=switch_state(), plan_version=PLAN_VERSION)
    return key


def _driver_version() -> str | None:
    try:
        return str(torch.cuda.driver_version()) if hasattr(torch.cuda, "driver_version") else None
    except Exception:
        return None


def switch_state() -> list:
    """The backend switches in force (``VIDEOMT_FAST_BACKEND``/``use_backend``, ``VIDEOMT_FAST_DISABLE``, plan
    exclusions): a plan is only valid under the switches it was built with."""
    return [registry._forced_backend(), sorted(registry._disabled()), sorted(registry.exclusions())]


def _cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / f"{key['model']}-{key['dtype']}-{key['rows']}x{key['size'][0]}x{key['size'][1]}-{digest}.json"


def cpu_dtype_decision(model, rows: int, size: tuple[int, int], mode: str | None = None) -> dict:
    """:func:`choose_cpu_dtype`, remembered in the plan cache (same key as a plan, for the stage
    ``cpu-dtype``): measured once per machine, model and shape unless ``mode`` is ``recalibrate``; with
    ``static`` nothing is measured and the model keeps its dtype."""
    mode = plan_mode(mode)
    if mode == "static":
        return {"dtype": "float32", "reason": "static plan: no measurement, the model's own dtype"}
    key = cache_key(model, rows, size, ["cpu-dtype"])
    path = _cache_file(key)
    if mode == "auto":
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key and data["report"]["dtype"] in ("float32", "bfloat16"):
                return dict(data["report"], cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    report = choose_cpu_dtype(model, rows, size)
    _write_json_atomic(path, {"key": key, "report": report})
    return report


def _write_json_atomic(path: Path, data: dict) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError:
        return False  # a read-only home: the result still holds, it is just not remembered


def load_cached(key: dict[str, Any]) -> Plan | None:
    path = _cache_file(key)
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        plan = Plan.from_json(data)
        plan.mode = "cached"
        return plan.resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, stale or from another version: calibrate again


def save_cached(plan: Plan) -> Path | None:
    path = _cache_file(plan.key)
    return path if _write_json_atomic(path, plan.to_json()) else None


def plan_mode(requested: str | None) -> str:
    mode = (requested or os.environ.get("VIDEOMT_FAST_PLAN") or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"plan mode (VIDEOMT_FAST_PLAN or plan=) must be one of {MODES}, got {mode!r}")
    return mode


def get(model, rows: int, size: tuple[int, int], *, mode: str | None = None, stages: list[str] | None = None,
        timer: Timer | None = None, budget_s: float = 60.0, notes: list[str] = ()) -> Plan:
    """The plan for ``model`` at ``rows`` x ``size``: from the disk cache (``auto``), else calibrated and
    cached; ``recalibrate`` always calibrates; ``static`` never does."""
    mode = plan_mode(mode)
    stages = stages or stages_of(model)
    key = cache_key(model, rows, size, stages)
    if mode == "auto":
        cached = load_cached(key)
        if cached is not None:
            _exclude_failures(cached)
            return cached
    plan = build(model, rows, size, mode="static" if mode == "static" else "auto", stages=stages, timer=timer,
                 budget_s=budget_s)
    plan.key = key
    plan.notes.extend(notes)
    if plan.mode == "calibrated":
        save_cached(plan)
        _exclude_failures(plan)
    return plan


def _exclude_failures(plan: Plan) -> None:
    """A backend found wrong or failing on this device must not be dispatched per call either."""
    for site in plan.sites.values():
        for c in site.candidates:
            if c.status == "excluded" and c.name in registry.BACKENDS and not c.reason.startswith("refuses"):
                ops.exclude(site.op, c.name, f"{site.key}: {c.reason}")
