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
3. **Time.** Verified candidates are timed where they run: on a GPU the device's time of calls captured
   back to back in a CUDA graph (sessions replay graphs, so Python's launch cost is not the op's; a call
   that cannot be captured is excluded), the wall clock over back-to-back calls elsewhere; median of
   repeats; the fastest wins.
4. **Gate.** On a calibration input the planned model is judged against a float32 reference of the same
   weights (no TF32), with the reference ops in the plan's own dtype as its peer (:func:`judge`): its
   whole-model error at most :data:`FACTOR` times the peer's (plus a floor), and every *decisive* decision
   (mask pixels and class argmaxes whose float32 margin is well above the error) equal. The reference ops
   pass by construction, for any seed. Otherwise sites fall back to the reference one by one, worst error
   first, until it passes. The verdict belongs to the weights it was judged on (their fingerprint): a plan
   cached for other weights of the same shape keeps its timing choices and is judged again.

Everything planning one shape spends shares one wall-clock :class:`Budget` (``optimize(budget_s=)``):
past it, what is left unmeasured is named in the plan's notes, sites keep the best verified candidate
timed so far (else the reference), and a plan cut short is used but not cached.

On a CPU the candidates are the reference ops; what a plan decides there is the compute dtype (with
``dtype="auto"`` and a CPU with native bf16, AVX512-BF16 or AMX, bfloat16 is kept when it passes the gate
and is faster: :func:`choose_cpu_dtype`) and, for a VidEoMT session, whether its frame step runs as one
compiled call (the ``step.frame_step`` site, :mod:`videomt_fast.runtime.compiled`).

A plan is applied by installing, per op site, an :class:`~videomt_fast.ops.OpTable` of the chosen callables
(:func:`apply`): a planned frame calls them directly, with no dispatch. Plans are cached on disk
(:func:`cache_dir`), keyed by device, driver, torch / Triton / package versions, model config, dtype and
shape (the config's structural fields, :meth:`~videomt_fast.model.configuration._SegmenterConfig.structure`),
so calibration runs once per machine. ``VIDEOMT_FAST_PLAN=auto|recalibrate|static`` (or the
``plan=`` argument of ``optimize()``) picks: use the cache, calibrate again, or no calibration (the
dispatcher's static priority, resolved once).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
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
            shown = {k: v for k, v in self.gate.items() if k != "weights"}
            lines.append("gate vs float32: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        single = [key for key, site in self.sites.items()
                  if [c.name for c in site.candidates] == [site.chosen] and site.chosen == "reference"]
        if single:  # one implementation per op here (a CPU): nothing was measured at these sites
            lines.append(f"{len(single)} op sites run the reference ops, the only implementation here (nothing to "
                         f"verify or time): {', '.join(single)}")
        lines.append(f"{'site':28s} {'chosen':16s} candidates (time ms, rel. error / tolerance, or why excluded)")
        for key, site in self.sites.items():
            if key in single:
                continue
            parts = []
            for c in site.candidates:
                if c.status == "excluded":
                    parts.append(f"{c.name}: excluded ({c.reason})")
                elif c.time_ms is None and c.error is None:
                    parts.append(f"{c.name}: not measured" + (f" ({c.reason})" if c.reason else ""))
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


def record_calls(model, rows: int, size: tuple[int, int], stages: list[str], meta: bool = False) -> dict:
    """``{(stage, op): {form: args}}`` of a two-frame run (VidEoMT's later frames take another form).
    ``meta``: run a copy of the model on the meta device (shapes only, no arithmetic), where no candidate
    needs the recorded values (one implementation per op)."""
    calls: dict = {}
    if meta:
        with torch.device("meta"):
            shadow = type(model)(model.config)
        shadow.attn_mask_probs = model.attn_mask_probs.detach().cpu().clone()  # which layers are masked
        shadow._refresh_mask_probs()
        shadow.to(dtype=model.dtype)
        shadow.attn_mask_probs = shadow.attn_mask_probs.float()
        shadow._refresh_mask_probs()
        pixels = torch.empty(rows, 2, model.config.num_channels, *size, device="meta", dtype=model.dtype)
        with torch.no_grad():
            for stage, module in op_sites(shadow):
                module.impl = _Recorder(stage, calls)
            run_frames(shadow, pixels)
        return {k: v for k, v in calls.items() if k[0] in stages}
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
    """Median milliseconds of one ``fn(*args)`` as a frame runs it: on a GPU the device's time for a call
    replayed in a CUDA graph of back-to-back calls (sessions replay graphs, so Python's launch cost is not
    the op's); elsewhere the wall clock over back-to-back calls."""
    if device.type == "cuda":
        from videomt_fast.runtime.cudagraph import graph_ms

        return graph_ms(lambda: fn(*args), device, repeats=repeats or 10)
    repeats = repeats or 5
    for _ in range(2):
        fn(*args)
    times = []
    calls = 3
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


Timer = Callable[[str, str, Callable, tuple], float]  # (site key, candidate, fn, args) -> ms


def _calibrate_site(stage: str, op: str, forms: dict, device: torch.device, dtype: torch.dtype,
                    timer: Timer, budget: Budget, reserve: float = 0.0) -> Site:
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
        if name != "reference" and budget.left() <= reserve:
            cand.status, cand.reason = "untimed", "not measured: calibration budget spent"
            budget.skip("later candidates were neither verified nor timed")
            continue
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
        if budget.left() <= reserve and best is not None:
            cand.status, cand.reason = "untimed", "verified, not timed: calibration budget spent"
            budget.skip("later candidates were neither verified nor timed")
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


def _ext_ready() -> bool:
    from videomt_fast.ops import _ext

    return _ext.ready()


def postprocess_sites(device: torch.device, num_queries: int, num_labels: int, size: tuple[int, int],
                      timer: Timer, seed: int = 0, budget: Budget | None = None, reserve: float = 0.0) -> list[Site]:
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
            if name != "reference" and budget is not None and budget.left() <= reserve:
                cand.status, cand.reason = "untimed", "not measured: calibration budget spent"
                budget.skip("post-processing candidates were not measured")
                continue
            if name == "cuda" and not _ext_ready():
                cand.status = "untimed"
                cand.reason = ("not measured: the CUDA extension is not built yet (a just-in-time build takes "
                               "minutes; the processors use it per call once it is)")
                continue
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
#
# Random weights give class logits with near-zero margins, so plain agreement of class argmax (or of mask
# signs) over every query is noise: it moves by a percent from one seed to the next at any precision. The
# gate therefore judges a low-precision run by two things that are stable: its whole-model relative error
# against float32 (the masks' and classes' logits), and its agreement on *decisive* decisions -- mask pixels
# and class argmaxes whose float32 margin is more than DECISIVE times the run's typical error -- which an
# honest rounding error never flips and a broken kernel does. A plan is judged against the reference ops
# in its own dtype (its peer): error at most FACTOR times theirs (plus a floor); a dtype (the CPU's bf16
# decision) against a fixed budget. The reference ops themselves always pass, for any seed.

DECISIVE = 8.0  # a decision counts where its float32 margin exceeds this many times the typical error
GATE_DECISIVE = 0.999  # share of decisive mask pixels and class argmaxes that must equal float32
MODEL_FLOOR = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float64: 1e-10}
ERROR_BUDGET = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}  # a dtype vs float32
# (measured on CPU, random weights, any seed: bf16 reference ops err 0.0065 on class and 0.013-0.016 on mask
# logits at ViT-S/B/L, 224 and 640)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matrix products and convolutions in full float32 (no TF32) inside the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)


def float32_reference(model):
    """A float32 copy of ``model`` on per-call dispatch, forced to the reference ops by its user."""
    ref = copy.deepcopy(model)  # op tables reduce to per-call dispatch when copied
    probs = model.attn_mask_probs.detach().clone()
    ref.float()
    ref.attn_mask_probs = probs.to(ref.attn_mask_probs.device)
    ref._refresh_mask_probs()
    return ref


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    """:func:`_error` of one tensor, inf where ``out`` is not finite."""
    error = _error(out, ref)
    return math.inf if math.isnan(error) else error


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def judge(outputs, reference, dtype: torch.dtype, peer=None) -> dict[str, Any]:
    """Whether ``outputs`` ``(masks, classes)`` of a run in ``dtype`` agree with the float32 ``reference``
    (see the comment above). ``peer``: the reference ops' outputs in the same dtype (a plan's gate); without
    it the error budget of the dtype applies (a dtype decision). Returns the figures and ``passed``."""
    masks, classes = (t.float() for t in outputs)
    ref_masks, ref_classes = (t.float() for t in reference)
    if masks.shape != ref_masks.shape or classes.shape != ref_classes.shape:
        raise ValueError(f"gate: outputs {tuple(masks.shape)}/{tuple(classes.shape)} do not match the reference "
                         f"{tuple(ref_masks.shape)}/{tuple(ref_classes.shape)}")
    floor = MODEL_FLOOR.get(dtype, 1e-3)
    error = {"masks": _relative(masks, ref_masks), "classes": _relative(classes, ref_classes)}
    if peer is not None:
        peer_error = {"masks": _relative(peer[0].float(), ref_masks), "classes": _relative(peer[1].float(), ref_classes)}
        limit = {k: FACTOR * v + floor for k, v in peer_error.items()}
    else:
        peer_error = {"masks": 0.0, "classes": 0.0}
        limit = dict.fromkeys(error, ERROR_BUDGET.get(dtype, 5e-2))
    scale = {k: max(error[k], peer_error[k], floor) for k in error}
    finite = all(math.isfinite(v) for v in error.values())
    # masks: pixels whose float32 logit is decisively away from 0
    decisive_px = ref_masks.abs() > DECISIVE * scale["masks"] * _rms(ref_masks)
    same_px = (masks > 0) == (ref_masks > 0)
    # classes: queries whose float32 best class leads the second by a decisive margin
    if ref_classes.shape[-1] > 1:
        top = ref_classes.topk(2, dim=-1).values
        decisive_q = (top[..., 0] - top[..., 1]) > DECISIVE * scale["classes"] * _rms(ref_classes)
    else:
        decisive_q = torch.ones(ref_classes.shape[:-1], dtype=torch.bool, device=ref_classes.device)
    same_q = classes.argmax(-1) == ref_classes.argmax(-1)
    result: dict[str, Any] = {
        "masks": float(same_px[decisive_px].float().mean()) if bool(decisive_px.any()) else 1.0,
        "classes": float(same_q[decisive_q].float().mean()) if bool(decisive_q.any()) else 1.0,
        "error_masks": error["masks"], "error_classes": error["classes"],
        "limit_masks": limit["masks"], "limit_classes": limit["classes"],
        "decisive_masks": float(decisive_px.float().mean()), "decisive_classes": float(decisive_q.float().mean()),
        "masks_all": float(same_px.float().mean()), "classes_all": float(same_q.float().mean()),
    }
    result["passed"] = bool(finite and all(error[k] <= limit[k] for k in error)
                            and result["masks"] >= GATE_DECISIVE and result["classes"] >= GATE_DECISIVE)
    return result


def gate_passes(result: dict[str, Any]) -> bool:
    return bool(result.get("passed"))


def rounded(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}


def gate_summary(result: dict[str, Any]) -> str:
    """One line: decisive agreement and error against their limits."""
    return (f"decisive masks {result['masks']:.4f}, classes {result['classes']:.4f}; error masks "
            f"{result['error_masks']:.2e} (limit {result['limit_masks']:.2e}), classes {result['error_classes']:.2e} "
            f"(limit {result['limit_classes']:.2e})")


def _gate_outputs(model, plan: Plan, pixels: torch.Tensor):
    with tables_restored(model), torch.no_grad():
        apply(model, plan.resolve())
        return run_frames(model, pixels.to(model.dtype))


def peer_outputs(model, pixels: torch.Tensor):
    """``(masks, classes)`` of the model's own weights and dtype on the reference ops (a plan's peer), under
    the same math settings the plan runs with (TF32 where the user allows it): the error a plan may have is
    measured against what the library baseline would give this user."""
    with tables_restored(model), torch.no_grad(), ops.use_backend("reference"):
        apply(model, None)
        return run_frames(model, pixels.to(model.dtype))


def reference_outputs(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 reference ``(masks, classes)`` of ``pixels`` for the gate (a temporary float32 copy, the
    reference ops, no TF32)."""
    ref = float32_reference(model)
    with torch.no_grad(), ops.use_backend("reference"), exact_float32():
        out = run_frames(ref, pixels.float())
    del ref
    return out


# --------------------------------------------------------------------------------------------
# the budget

clock = time.monotonic  # what budgets read (tests replace it: no verdict depends on the machine's speed)


class Budget:
    """One wall-clock deadline for everything spent planning one input shape: the CPU dtype decision,
    recording, verification, timing, the gate, a compiled frame step. Each part asks what is left and,
    past the deadline, keeps the best it has found and says what it did not measure (:attr:`skipped`).
    ``progress(what, elapsed_s, budget_s)`` hears of each phase (a progress line)."""

    def __init__(self, seconds: float, progress: Callable[[str, float, float], None] | None = None):
        self.seconds = float(seconds)
        self.start = clock()
        self.skipped: list[str] = []
        self.progress = progress

    def elapsed(self) -> float:
        return clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0

    def phase(self, what: str) -> None:
        if self.progress is not None:
            self.progress(what, self.elapsed(), self.seconds)

    def skip(self, what: str) -> None:
        if what not in self.skipped:
            self.skipped.append(what)


def as_budget(budget: "Budget | float | None", default: float = 60.0) -> Budget:
    return budget if isinstance(budget, Budget) else Budget(default if budget is None else budget)


# --------------------------------------------------------------------------------------------
# building


def _only_references(device: torch.device) -> bool:
    """Whether every op has one implementation here (a CPU): nothing to verify, time or gate."""
    return all(len(ops.candidates(name, device)) == 1 for name in registry.op_names())


def build(model, rows: int, size: tuple[int, int], *, mode: str = "auto", stages: list[str] | None = None,
          timer: Timer | None = None, budget: Budget | float | None = None, gate: bool = True) -> Plan:
    """Calibrate (or, with ``mode="static"``, resolve the dispatcher's priority for) a plan of ``model`` at
    ``rows`` frames of ``size``, within ``budget`` (seconds or a :class:`Budget`, default 60 s).
    ``timer(site, candidate, fn, args) -> ms`` replaces the device timer (tests). Does not apply the plan."""
    if mode not in MODES:
        raise ValueError(f"plan mode must be one of {MODES}, got {mode!r}")
    budget = as_budget(budget)
    start = clock()
    device, dtype = model.device, model.dtype
    stages = stages or stages_of(model)
    only_references = _only_references(device)
    budget.phase(f"recording the op sites of {rows}x{size[0]}x{size[1]}")
    recorded_at = clock()
    calls = record_calls(model, rows, size, stages, meta=only_references)
    # the gate runs about three such passes (float32 reference, peer, plan): keep that much for it
    reserve = 0.0 if only_references else 3.0 * (clock() - recorded_at)
    sites: dict[str, Site] = {}
    if timer is None:
        def timer(key, name, fn, args):
            return default_timer(fn, args, device)
    for (stage, op), forms in sorted(calls.items(), key=lambda kv: (STAGES.index(kv[0][0]), kv[0][1])):
        if mode == "static":
            site = _static_site(stage, op, forms, device)
        else:
            budget.phase(f"measuring {stage}.{op}")
            site = _calibrate_site(stage, op, forms, device, dtype, timer, budget, reserve)
        sites[site.key] = site
    if mode != "static" and "frame" in stages and device.type == "cuda":
        budget.phase("measuring post-processing")
        for site in postprocess_sites(device, model.config.num_queries, model.config.num_labels, size, timer,
                                      budget=budget, reserve=reserve):
            sites[site.key] = site
    plan = Plan(device=str(device), dtype=str(dtype).replace("torch.", ""), rows=rows, size=tuple(size),
                mode="static" if mode == "static" else "calibrated", sites=sites)
    if only_references and mode != "static":
        plan.notes.append(f"{device.type}: one implementation per op here (the reference ops), so nothing was "
                          "verified, timed or gated per op")
    if gate and mode != "static" and any(s.chosen != "reference" for s in sites.values() if s.stage not in UNTABLED):
        run_gate(model, plan, budget)  # (a plan of reference ops is the gate's own peer: nothing to check)
    plan.notes.extend(f"not measured within the {budget.seconds:.0f} s planning budget: {what}"
                      for what in budget.skipped)
    plan.calibration_s = round(clock() - start, 3)
    return plan.resolve()


def run_gate(model, plan: Plan, budget: Budget | float | None = None) -> None:
    """Judge ``plan`` against a float32 reference, its peer being the reference ops in the plan's dtype
    (:func:`judge`); fall back site by site (worst error first) until it passes. Past the budget every
    site falls back at once (the reference ops pass by construction). Records the result in ``plan.gate``
    with the fingerprint of the weights it was judged on."""
    budget = as_budget(budget)
    budget.phase("the whole-model gate")
    pixels = calibration_input(model, plan.rows, plan.size, frames=2 if hasattr(model, "query_updater") else 1)
    reference = reference_outputs(model, pixels)
    peer = peer_outputs(model, pixels)
    dtype = model.dtype

    def verdict() -> dict[str, Any]:
        return judge(_gate_outputs(model, plan, pixels), reference, dtype, peer=peer)

    def badness(site: Site) -> float:
        chosen = next(c for c in site.candidates if c.name == site.chosen)
        return (chosen.error or 0.0) / (chosen.tolerance or 1.0)

    result = verdict()
    fallbacks = []
    pending = sorted((s for s in plan.sites.values() if s.chosen != "reference" and s.stage not in UNTABLED),
                     key=badness, reverse=True)
    while not result["passed"] and pending:
        out_of_time = budget.spent()
        batch = pending if out_of_time else pending[:1]
        for site in batch:
            site.fallback = (f"gate failed with {site.chosen} ({gate_summary(result)})" if not out_of_time else
                             f"gate failed with {site.chosen} and the budget was spent: every site fell back")
            fallbacks.append(site.key)
            _choose(site, "reference")
        del pending[: len(batch)]
        if out_of_time:
            budget.skip("the gate's site-by-site fallback (every chosen kernel fell back to the reference)")
            result = judge(peer, reference, dtype, peer=peer)
        else:
            result = verdict()
    plan.gate = rounded(result) | {"fallbacks": fallbacks, "weights": weights_fingerprint(model)}


def _choose(site: Site, name: str) -> None:
    for c in site.candidates:
        c.status = "chosen" if c.name == name else ("ok" if c.status == "chosen" else c.status)
    site.chosen = name


def regate(model, plan: Plan, budget: Budget | float | None = None) -> None:
    """A plan measured on other weights (timing choices are per shape, agreement belongs to the weights):
    restore the sites the gate moved to the reference to their fastest verified candidate, then judge it
    again on this model's weights."""
    for site in plan.sites.values():
        if site.fallback and site.stage not in UNTABLED:
            timed = [c for c in site.candidates if c.status in ("ok", "chosen") and c.time_ms is not None]
            if timed:
                _choose(site, min(timed, key=lambda c: c.time_ms).name)
            site.fallback = ""
    plan.notes[:] = [n for n in plan.notes if not n.startswith("gate re-run")]
    plan.notes.append("gate re-run: the plan was measured on other weights of this shape")
    run_gate(model, plan.resolve(), budget)
    plan.resolve()


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of the weights' values (names, shapes, dtypes and a strided sample of each
    tensor): verdicts of agreement belong to the weights they were measured on."""
    digest = hashlib.sha256()
    samples = []
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel() and flat.is_floating_point():
                step = max(1, flat.numel() // 64)
                samples.append(flat[::step][:64].float())
    if samples:
        digest.update(torch.cat(samples).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


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


DTYPE_SHARE = 0.5  # of the budget left, what the CPU dtype decision may spend
MIN_GRID = 12  # patches per side below which a scaled-down size would not rank float32 and bf16 as the full one


def gemm_rate(config, tokens: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of this CPU's matrix product at a layer's fc1 shape for ``tokens`` rows."""
    a = torch.randn(tokens, config.hidden_size).to(dtype)
    w = torch.randn(config.mlp_hidden_size, config.hidden_size).to(dtype)
    torch.nn.functional.linear(a, w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        times.append(time.perf_counter() - t0)
    return 2 * tokens * config.hidden_size * config.mlp_hidden_size / max(sorted(times)[repeats // 2], 1e-9)


def _frame_seconds(model, rows: int, size: tuple[int, int], rate: float) -> float:
    from videomt_fast.model.cost import frame_flops

    return rows * frame_flops(model.config, *size)["total"] / rate


def measured_size(model, rows: int, size: tuple[int, int], seconds: float, frame_s: Callable | None = None):
    """The frame size the dtype decision measures within ``seconds``: ``size`` itself, or one scaled down
    (same aspect, multiples of the patch, at least :data:`MIN_GRID` patches a side: sizes at which float32
    and bf16 rank as at the full one, and bf16's error does not depend on the size). None when not even
    that fits. ``frame_s(size) -> seconds`` estimates a float32 frame (default: FLOPs at this CPU's rate)."""
    if frame_s is None:
        ph, pw = model.config.patch_hw
        tokens = min(1024, (size[0] // ph) * (size[1] // pw)) + model.config.num_queries
        rate = gemm_rate(model.config, rows * tokens, torch.float32, repeats=3)
        frame_s = functools.partial(_frame_seconds, model, rows, rate=rate)
    # the gate runs a first and a later frame (VidEoMT) in each dtype, then at least two timing rounds of one
    # frame in each: at most eight float32 frames' worth (bf16 frames cost no more where bf16 is native)
    runs = 8 if hasattr(model, "query_updater") else 6
    ph, pw = model.config.patch_hw
    gh, gw = size[0] // ph, size[1] // pw
    scale = 1.0
    while True:
        grid = (max(1, round(gh * scale)), max(1, round(gw * scale)))
        if scale < 1.0 and min(grid) < min(MIN_GRID, gh, gw):
            return None
        candidate = (grid[0] * ph, grid[1] * pw)
        if runs * frame_s(candidate) <= seconds:
            return candidate
        scale *= 0.8


def choose_cpu_dtype(model, rows: int, size: tuple[int, int], timer: Callable[[str], float] | None = None,
                     budget: Budget | float | None = None, times: dict | None = None) -> dict:
    """On a CPU: gate bf16 against float32 on this model's weights (:func:`judge` with the dtype's error
    budget) and time a frame in each (interleaved medians), within a share of ``budget``, at ``size`` or a
    size scaled down to fit. ``times`` (``float32_ms``, ``bfloat16_ms`` measured earlier for this shape)
    skips the timing. Returns ``{"dtype", "reason", "gate", "float32_ms", "bfloat16_ms", "measured_size",
    "weights"}``; casts nothing."""
    result: dict[str, Any] = {"dtype": "float32"}
    if not native_bf16():
        result["reason"] = "this CPU has no native bf16 (AVX512-BF16 or AMX): float32"
        return result
    budget = as_budget(budget)
    budget.phase("cpu dtype: float32 or bf16")
    allowed = DTYPE_SHARE * budget.left()
    at = tuple(size) if timer is not None or times is not None else measured_size(model, rows, size, allowed)
    if at is None:
        result["reason"] = (f"not measured: frames at the smallest representative size would not fit the "
                            f"{allowed:.0f} s of the planning budget left for the decision: float32 kept")
        result["measured"] = False  # kept for this call only: never cached
        return result
    result["measured_size"] = list(at)
    pixels = calibration_input(model, rows, at, frames=2 if hasattr(model, "query_updater") else 1).float()
    one = pixels[:, :1]  # timing: one frame (a later frame costs what the first does, plus one d x d product)
    fp32 = float32_reference(model)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.attn_mask_probs = fp32.attn_mask_probs.clone()
    bf16._refresh_mask_probs()
    low, one_low = pixels.to(torch.bfloat16), one.to(torch.bfloat16)

    def run(m, x):
        with torch.no_grad():
            return run_frames(m, x)

    def measured(m, x) -> float:
        t0 = time.perf_counter()
        run(m, x)
        return (time.perf_counter() - t0) * 1e3

    deadline = budget.elapsed() + allowed
    with ops.use_backend("reference"), exact_float32():
        reference = run(fp32, pixels)
        verdict = judge(run(bf16, low), reference, torch.bfloat16)
        if times is not None:
            result.update(float32_ms=times["float32_ms"], bfloat16_ms=times["bfloat16_ms"], timing="cached")
        elif timer is not None:
            result["float32_ms"], result["bfloat16_ms"] = timer("float32"), timer("bfloat16")
        else:  # interleaved, so a load that comes and goes weighs on both alike; medians of up to 3
            samples: dict[str, list[float]] = {"float32_ms": [], "bfloat16_ms": []}
            while len(samples["float32_ms"]) < 3 and (len(samples["float32_ms"]) < 2 or budget.elapsed() < deadline):
                samples["float32_ms"].append(measured(fp32, one))
                samples["bfloat16_ms"].append(measured(bf16, one_low))
            for key, values in samples.items():
                result[key] = round(sorted(values)[(len(values) - 1) // 2], 3)
            result["timing"] = f"{len(samples['float32_ms'])} interleaved round(s)"
    result["gate"] = rounded(verdict)
    result["weights"] = weights_fingerprint(model)
    if not verdict["passed"]:
        result["reason"] = f"bfloat16 misses the agreement gate ({gate_summary(verdict)}): float32"
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
    key: dict[str, Any] = {"package": __version__, "sources": sources_digest(), "torch": torch.__version__,
                           "device": str(device.type)}
    try:
        import triton

        key["triton"] = triton.__version__
    except Exception:
        key["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        from videomt_fast.ops import _ext

        key.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   cuda=torch.version.cuda, driver=_driver_version(),
                   cuda_extension=_ext.ready())  # a plan made without the post-processing kernels is made again
    else:
        key.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                   native_bf16=native_bf16())
    config = json.dumps(model.config.structure(), sort_keys=True, default=str)  # not the JSON's other fields
    key.update(config=hashlib.sha256(config.encode()).hexdigest()[:16], model=type(model).__name__,
               dtype=str(model.dtype).replace("torch.", ""), rows=rows, size=list(size), stages=stages,
               switches=switch_state(), plan_version=PLAN_VERSION)
    return key


_SOURCES: list[str] = []


def sources_digest() -> str:
    """A hash of the code a plan measured: the Triton kernels, the op layer and the CUDA sources. A plan
    cached by other code (an edited kernel, another checkout) is measured again, never trusted."""
    if not _SOURCES:
        import importlib.util

        from videomt_fast.ops import _ext

        digest = hashlib.sha256()
        spec = importlib.util.find_spec("videomt_fast.kernels")
        kernels = Path(spec.origin).parent if spec is not None and spec.origin else None
        folders = [kernels, Path(ops.__file__).parent, _ext.sources_dir()]
        for folder in folders:
            if folder is None:
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix in (".py", ".cu", ".cuh", ".h", ".cpp"):
                    digest.update(path.name.encode() + b"\0" + path.read_bytes())
        _SOURCES.append(digest.hexdigest()[:16])
    return _SOURCES[0]


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


def cpu_dtype_decision(model, rows: int, size: tuple[int, int], mode: str | None = None,
                       budget: Budget | float | None = None) -> dict:
    """:func:`choose_cpu_dtype`, remembered in the plan cache (same key as a plan, for the stage
    ``cpu-dtype``): the timing once per machine, model shape and thread count, the agreement gate once per
    weights (a cached decision for other weights keeps its timing and judges bf16 again on these), unless
    ``mode`` is ``recalibrate``; with ``static`` nothing is measured and the model keeps its dtype."""
    mode = plan_mode(mode)
    if mode == "static":
        return {"dtype": "float32", "reason": "static plan: no measurement, the model's own dtype"}
    key = cache_key(model, rows, size, ["cpu-dtype"])
    path = _cache_file(key)
    times = None
    if mode == "auto":
        try:
            data = json.loads(path.read_text())
            report = data["report"]
            if data.get("key") == key and report["dtype"] in ("float32", "bfloat16"):
                if "gate" not in report or report.get("weights") == weights_fingerprint(model):
                    return dict(report, cached=True)
                times = {k: report[k] for k in ("float32_ms", "bfloat16_ms")}  # timing is per shape
        except (OSError, ValueError, KeyError, TypeError):
            pass
    report = choose_cpu_dtype(model, rows, size, budget=budget, times=times)
    if report.get("measured", True):
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
    if plan.__dict__.get("_cut_short"):
        return None  # a plan cut short by its budget is used, not remembered
    path = _cache_file(plan.key)
    return path if _write_json_atomic(path, plan.to_json()) else None


def plan_mode(requested: str | None) -> str:
    mode = (requested or os.environ.get("VIDEOMT_FAST_PLAN") or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"plan mode (VIDEOMT_FAST_PLAN or plan=) must be one of {MODES}, got {mode!r}")
    return mode


def get(model, rows: int, size: tuple[int, int], *, mode: str | None = None, stages: list[str] | None = None,
        timer: Timer | None = None, budget: Budget | float | None = None, notes: list[str] = ()) -> Plan:
    """The plan for ``model`` at ``rows`` x ``size``: from the disk cache (``auto``; its gate judged again
    when it was passed on other weights), else calibrated within ``budget`` and cached; ``recalibrate``
    always calibrates; ``static`` never does."""
    mode = plan_mode(mode)
    budget = as_budget(budget)
    stages = stages or stages_of(model)
    key = cache_key(model, rows, size, stages)
    if mode == "auto":
        cached = load_cached(key)
        if cached is not None:
            if cached.gate and cached.gate.get("weights") != weights_fingerprint(model):
                regate(model, cached, budget)
                save_cached(cached)
            _exclude_failures(cached)
            return cached
    plan = build(model, rows, size, mode="static" if mode == "static" else "auto", stages=stages, timer=timer,
                 budget=budget)
    plan.key = key
    plan.notes.extend(notes)
    if plan.mode == "calibrated":
        plan.__dict__["_cut_short"] = bool(budget.skipped)
        if not budget.skipped:  # a plan cut short by its budget is used, not remembered
            save_cached(plan)
        _exclude_failures(plan)
    return plan


def _exclude_failures(plan: Plan) -> None:
    """A backend found wrong or failing on this device must not be dispatched per call either."""
    for site in plan.sites.values():
        for c in site.candidates:
            if c.status == "excluded" and c.name in registry.BACKENDS and not c.reason.startswith("refuses"):
                ops.exclude(site.op, c.name, f"{site.key}: {c.reason}")
