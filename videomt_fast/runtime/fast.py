"""The fast inference path: ``optimize()``, execution plans per input shape, and CUDA graphs.

``model.optimize()`` sets the model up for its device, in place:

* the dtype: ``"auto"`` is bf16 on CUDA; on a CPU it is decided by measurement at the first input shape
  (bf16 where the CPU computes it natively and it passes the agreement gate and is faster, else the
  current dtype; :func:`videomt_fast.runtime.plans.choose_cpu_dtype`);
* per input shape, an execution plan (:mod:`videomt_fast.runtime.plans`): every op site runs the
  implementation that was verified against the float64 reference and timed fastest on this device,
  called directly (no per-call dispatch);
* on CUDA, CUDA graphs: ``new_session()`` returns a :class:`GraphedSession` (the whole frame step, one graph
  per input shape), the clip forward replays its per-frame query layers and head
  (:class:`GraphedQueryStep`), and EoMT's plain ``model(pixel_values=...)`` replays one graph per input
  shape (:class:`GraphedPredictor`);
* on a CPU, a VidEoMT session's frame may run as one call into a library compiled ahead of time, where
  the frame is host-bound and the library verifies and is faster (:mod:`videomt_fast.runtime.compiled`);
* the NaN/inf scan of inputs is off (it costs a reduction and a host sync per call, which keeps the CPU
  from running ahead of the GPU); ``optimize(check_finite=True)`` keeps it.

The model never imports this module: the runtime registers itself with the model layer
(:func:`videomt_fast.model.modeling.register_runtime`), and ``optimize()`` installs its providers on the
model instance (``encode_provider``, ``step_provider``, ``checked_forward``), which the forward calls.

A graph bakes in the weights' addresses, the plan's implementations and the backend switches. Each
graph owner keeps the token of what it captured (:func:`weights_token`, the plan object) and captures
again, or refuses mid-video, when any of them changed. Checked per step: the model's parameter
registrations (a process-wide counter bumped by every ``module.x = Parameter``/buffer assignment), the
first and last weight's address, dtype and device (moves and casts), and the plan for the current
switches; the addresses of all weights are compared at capture and at the first frame of each video.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from videomt_fast.model.modeling import (
    EomtForUniversalSegmentationOutput,
    VideomtForUniversalSegmentation,
    VideomtForUniversalSegmentationOutput,
)
from videomt_fast.ops import registry
from videomt_fast.runtime import compiled, plans
from videomt_fast.runtime.cudagraph import capture_graph
from videomt_fast.runtime.tokens import full_weights_token, weights_token
from videomt_fast.runtime.session import VideomtSession, check_step_frames


@dataclass
class FastSettings:
    dtype: torch.dtype = torch.bfloat16
    cuda_graphs: bool = True
    clone_outputs: bool = True  # graph outputs live in static buffers overwritten by the next step
    plan: str | None = None  # "auto" | "recalibrate" | "static" (None: $VIDEOMT_FAST_PLAN, else "auto")
    budget_s: float = 60.0  # wall-clock budget of planning one input shape (dtype, plan, compiled step)
    verbose: bool | None = None  # progress line: None when stderr is a terminal, True always, False never
    compile: str | None = None  # "auto" | "on" | "off" (None: $VIDEOMT_FAST_COMPILE, else "auto")
    cpu_dtype: str | None = None  # "pending" until a CPU model's dtype was decided at its first shape
    cpu_dtype_report: dict = field(default_factory=dict)


def _casted_tensors(model):
    """Parameters and buffers that ``optimize`` casts (``attn_mask_probs`` stays fp32)."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name != "attn_mask_probs":
            yield name, tensor


def _cast(model, dtype: torch.dtype) -> None:
    # already in ``dtype`` (e.g. float32 on CPU): no cast, no copy, the same tensors as before
    if any(t.is_floating_point() and t.dtype != dtype for name, t in _casted_tensors(model)):
        with torch.inference_mode(False):  # normal tensors even when the first frame runs in inference mode
            probs = model.attn_mask_probs.detach().clone()
            model.to(dtype=dtype)
            model.attn_mask_probs = probs.to(model.attn_mask_probs.device)  # stays fp32: read, never multiplied
        model._refresh_mask_probs()


def optimize(model, dtype: torch.dtype | str | None = "auto", cuda_graphs: bool = True,
             check_finite: bool | None = None, clone_outputs: bool = True, plan: str | None = None,
             budget_s: float = 60.0, shapes=(), compile: str | None = None, verbose: bool | None = None):
    """Set ``model`` up for speed in place and return it (see :meth:`_Segmenter.optimize`)."""
    shapes = [_shape(s) for s in shapes]
    cpu_auto = False
    if isinstance(dtype, str):
        if dtype != "auto":
            raise ValueError(f"dtype must be a torch dtype, 'auto' or None, got {dtype!r}")
        cpu_auto = model.device.type != "cuda"
        dtype = torch.bfloat16 if model.device.type == "cuda" else None
    if dtype is not None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        _cast(model, dtype)
    if not (isinstance(budget_s, (int, float)) and not isinstance(budget_s, bool) and budget_s > 0):
        raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    plans.plan_mode(plan)  # an unknown mode fails here, not at the first frame
    compiled.compile_mode(compile)
    model.check_finite = bool(check_finite) if check_finite is not None else False
    if model.device.type == "cuda":
        from videomt_fast import ops

        ops.preload_backends()  # import the kernels now, outside any traced or captured region
    model.fast_settings = FastSettings(dtype=model.dtype, cuda_graphs=cuda_graphs, clone_outputs=clone_outputs,
                                       plan=plan, budget_s=budget_s, compile=compile, verbose=verbose,
                                       cpu_dtype="pending" if cpu_auto and model.dtype == torch.float32 else None)
    for name in ("_plans", "_active", "_graphed_query_steps", "_predictor"):
        model.__dict__.pop(name, None)  # plans and graphs of the old weights / dtype
    if isinstance(model, VideomtForUniversalSegmentation):
        model.__dict__["encode_provider"] = lambda frames: _encoder(model, frames)
        model.__dict__["step_provider"] = lambda hidden, grid: query_stepper(model, hidden, grid)
    else:
        model.__dict__["checked_forward"] = lambda pixels, probs, offsets=None: _checked_forward(
            model, pixels, probs, offsets)
    plans.apply(model, None)
    for rows, height, width in shapes:  # plan now, not at the first call of that shape
        plan = plan_for(model, rows, (height, width))
        if isinstance(model, VideomtForUniversalSegmentation):
            compiled_step(model, plan)
    return model.eval()


def _shape(value) -> tuple[int, int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"shapes takes (frames per call, height, width) triples of positive ints, got {value!r}")
    return tuple(value)


def plans_of(model) -> list[plans.Plan]:
    """The execution plans an optimized model has built so far (one per input shape and switch state)."""
    return list(model.__dict__.get("_plans", {}).values())


def new_session(model, batch_size: int = 1):
    """``model.new_session()``: a :class:`GraphedSession` after :func:`optimize` on CUDA, else the plain
    :class:`~videomt_fast.runtime.session.VideomtSession` (which runs the plan of an optimized model)."""
    if graphs_enabled(model):
        return GraphedSession(model, batch_size=batch_size, clone_outputs=model.fast_settings.clone_outputs)
    return VideomtSession(model, batch_size=batch_size)


def new_predictor(model, max_shapes: int = 4):
    """``model.new_predictor()`` (EoMT): a :class:`GraphedPredictor`, replaying graphs after :func:`optimize`
    on CUDA."""
    settings = getattr(model, "fast_settings", None)
    clone = settings.clone_outputs if settings is not None else True
    return GraphedPredictor(model, use_graphs=graphs_enabled(model), clone_outputs=clone, max_shapes=max_shapes)


def graphs_enabled(model) -> bool:
    """Whether the model replays CUDA graphs: after :func:`optimize` with ``cuda_graphs`` on a CUDA
    model, and not while being traced by ``torch.compile`` or captured into another graph."""
    settings = getattr(model, "fast_settings", None)
    return (settings is not None and settings.cuda_graphs and model.device.type == "cuda"
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


# --------------------------------------------------------------------------------------------
# plans per shape


def plan_for(model, rows: int, size: tuple[int, int], stages: tuple[str, ...] | None = None) -> plans.Plan:
    """The model's plan at ``rows`` frames of ``size`` under the current backend switches (built on first
    use: from the disk cache or calibrated). On a CPU with ``dtype="auto"`` the first call also decides
    the dtype. Everything the first use of a shape spends shares one budget (``optimize(budget_s=)``),
    which the plan keeps for its compiled frame step."""
    settings = model.fast_settings
    budget = None
    if settings.cpu_dtype == "pending":
        _check_shape(model, rows, tuple(size))
        budget = _budget(model, rows, size)
        report = plans.cpu_dtype_decision(model, rows, size, settings.plan, budget=budget)
        settings.cpu_dtype, settings.cpu_dtype_report = report["dtype"], report
        if report["dtype"] == "bfloat16":
            _cast(model, torch.bfloat16)
            settings.dtype = model.dtype
    # per frame: a dict lookup, no environment read; which layers are masked (EoMT's probabilities as last
    # read by the forward's input check), a use_backend() in force and the exclusions so far are part of the
    # key (environment switches are read when a plan is built: optimize(shapes=...) or a shape's first call)
    probs = tuple(model.__dict__.get("_mask_probs_value") or ())
    key = (rows, tuple(size), stages, model.dtype, probs, registry.forced_override(), registry.exclusion_count())
    cache = model.__dict__.setdefault("_plans", {})
    plan = cache.get(key)
    if plan is None:
        _check_shape(model, rows, tuple(size))
        budget = budget or _budget(model, rows, size)
        report = settings.cpu_dtype_report
        notes = []
        if report:
            figures = f" ({_dtype_figures(report)})" if report.get("measured", True) else ""
            notes.append(f"cpu dtype: {report['reason']}{figures}")
        plan = plans.get(model, rows, tuple(size), mode=settings.plan, stages=list(stages or plans.stages_of(model)),
                         budget=budget, notes=notes)
        plan.__dict__["_planning_s"] = budget.elapsed()  # what is left of the budget goes to a compiled step
        cache[key] = plan
    if budget is not None:
        budget.progress.close()
    return plan


def _budget(model, rows: int, size: tuple[int, int], seconds: float | None = None) -> plans.Budget:
    from videomt_fast.runtime.progress import PlanProgress

    settings = model.fast_settings
    progress = PlanProgress(f"videomt_fast: planning {rows}x{size[0]}x{size[1]} on {model.device.type}",
                            settings.verbose)
    return plans.Budget(settings.budget_s if seconds is None else seconds, progress=progress)


def _dtype_figures(report: dict) -> str:
    gate = report.get("gate") or {}
    parts = [f"{k} {report[k]} ms" for k in ("float32_ms", "bfloat16_ms") if k in report]
    parts += [f"bf16 agreement masks {gate['masks']}, classes {gate['classes']}"] if gate else []
    return "; ".join(parts) or "not measured"


def _check_shape(model, rows: int, size: tuple[int, int]) -> None:
    ph, pw = model.config.patch_hw
    if not (isinstance(rows, int) and rows > 0 and len(size) == 2 and all(isinstance(v, int) for v in size)
            and size[0] > 0 and size[1] > 0 and size[0] % ph == 0 and size[1] % pw == 0):
        raise ValueError(f"cannot plan {rows} frame(s) of {size}: frames per call must be positive and height and "
                         f"width positive multiples of the patch size {ph}x{pw}")


def activate(model, plan: plans.Plan) -> None:
    """Install ``plan``'s tables for the stages it covers (one attribute read when they already are)."""
    if model.__dict__.get("_active") is plan:
        return
    stages = set(plan._tables)
    if stages >= set(plans.stages_of(model)):
        plans.apply(model, plan)
        model.__dict__["_active"] = plan
    else:  # a partial plan (the clip forward's batched early layers)
        for stage in stages:
            plans.apply_stage(model, plan, stage)
        model.__dict__["_active"] = None


def current_plan(model, rows: int, size: tuple[int, int]) -> plans.Plan:
    plan = plan_for(model, rows, size)
    activate(model, plan)
    return plan


def compiled_step(model, plan: plans.Plan):
    """The compiled frame step a session of ``model`` runs under ``plan`` (None: the plan's ops), decided at
    first use (:mod:`videomt_fast.runtime.compiled`; CPU only)."""
    settings = model.fast_settings
    held = plan.__dict__.get("_step", compiled.UNDECIDED)
    if held is not compiled.UNDECIDED:
        return held
    budget = _budget(model, plan.rows, tuple(plan.size), settings.budget_s - plan.__dict__.get("_planning_s", 0.0))
    try:
        return compiled.step_for(model, plan, mode=settings.compile, budget=budget)
    finally:
        budget.progress.close()


def session_step_kind(model) -> str:
    """What a session step of ``model`` runs: ``"cuda graph"``, the compiled frame step (``"aot-inductor"``),
    the plan's ``"ops"``, or ``"ops (unplanned)"`` before :func:`optimize`."""
    if getattr(model, "fast_settings", None) is None:
        return "ops (unplanned)"
    if graphs_enabled(model):
        return "cuda graph"
    sites = [p.sites.get(compiled.SITE) for p in plans_of(model)]
    return compiled.NAME if any(s is not None and s.chosen == compiled.NAME for s in sites) else "ops"


def _encoder(model, frames: torch.Tensor):
    """The clip forward's batched early layers: the plan of that many frames (early stage only)."""
    if torch.compiler.is_compiling():
        return model.encode_frames
    activate(model, plan_for(model, frames.shape[0], tuple(frames.shape[-2:]), stages=("early",)))
    return model.encode_frames


# --------------------------------------------------------------------------------------------
# what a graph baked in

def _pinned_position_table(model, size: tuple[int, int]):
    """The position tensors a graph at this frame size reads (DINOv2's resized table, DINOv3's rotary
    tables): the graph owner keeps a reference, so the model's one-grid cache may move on without their
    memory being reused under the graph."""
    return model.position_tables(model.grid_for(*size))


class _Baked:
    """What a set of graphs baked in: the plan, the cheap weights token, all weights' addresses."""

    def __init__(self, model, plan: plans.Plan):
        self.plan, self.token, self.full = plan, weights_token(model), full_weights_token(model)

    def still_valid(self, model, plan: plans.Plan, full_check: bool = False) -> bool:
        if plan is not self.plan:
            return False
        if weights_token(model) != self.token:
            if full_weights_token(model) != self.full:
                return False
            self.token = weights_token(model)  # a registration elsewhere in the process: not ours
        return not full_check or full_weights_token(model) == self.full


# --------------------------------------------------------------------------------------------
# sessions


class GraphedSession:
    """A VidEoMT streaming session whose frame step replays a captured CUDA graph.

    Same contract as :class:`videomt_fast.runtime.session.VideomtSession` (``step``, ``reset``, errors on a
    changed batch size or frame size). The first frame (learned queries only) and later frames
    (``query_updater(prev) + queries``) are two graphs; both write the queries to propagate into a
    static buffer inside the graph, so a step is one input copy and one replay. The step runs the
    execution plan of its shape.

    With ``use_graphs=False`` (or off CUDA) the same static-buffer step runs eagerly, which is how
    the CPU tests check it.
    """

    def __init__(self, model: VideomtForUniversalSegmentation, batch_size: int = 1, use_graphs: bool | None = None,
                 clone_outputs: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        on_cuda = model.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else bool(use_graphs and on_cuda)
        self.clone_outputs = clone_outputs
        self.frame_size: tuple[int, int] | None = None
        self.frame_index = 0
        self.plan: plans.Plan | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[bool, tuple[torch.Tensor, ...]] = {}
        self._pool = None
        self._baked: _Baked | None = None
        self._pinned: torch.Tensor | None = None

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Start a new video (the graphs for this frame size are kept and reused)."""
        self.frame_index = 0

    @property
    def propagated_queries(self) -> torch.Tensor | None:
        return None if self.frame_index == 0 else self._static["queries"]

    def _allocate(self, size: tuple[int, int]) -> None:
        model, cfg = self.model, self.model.config
        device, dtype = model.device, model.dtype
        with torch.inference_mode(False):  # normal tensors: later steps may run outside inference mode
            self._static = {
                "frames": torch.zeros(self.batch_size, cfg.num_channels, *size, device=device, dtype=dtype),
                "queries": torch.zeros(self.batch_size, cfg.num_queries, cfg.hidden_size, device=device, dtype=dtype),
            }
        self._graphs, self._outputs, self._baked = {}, {}, None
        self.frame_size = size

    # ------------------------------------------------------------------ the step
    def _eager_step(self, first: bool) -> tuple[torch.Tensor, ...]:
        model, static = self.model, self._static
        hidden = model.encode_frames(static["frames"])
        prev = None if first else static["queries"]
        masks, classes, sequence, queries = model.query_step(hidden, prev, model.grid_for(*self.frame_size))
        static["queries"].copy_(queries)
        return masks, classes, sequence

    def _capture(self, first: bool) -> None:
        saved = self._static["queries"].clone()  # queued before the side stream starts: ordered
        self._pinned = _pinned_position_table(self.model, self.frame_size)
        graph, outputs, self._pool = capture_graph(lambda: self._eager_step(first), self.model.device, self._pool)
        self._static["queries"].copy_(saved)  # warm-up and capture must not advance the video
        self._graphs[first] = graph
        self._outputs[first] = outputs

    @torch.no_grad()
    def step(self, frames: torch.Tensor) -> VideomtForUniversalSegmentationOutput:
        model = self.model
        # a reset session may change frame size: the static buffers and graphs are then rebuilt
        size = check_step_frames(model, frames, self.batch_size, self.frame_size if self.frame_index else None)
        first = self.frame_index == 0
        plan = current_plan(model, self.batch_size, size) if getattr(model, "fast_settings", None) else None
        if size != self.frame_size or self._static["frames"].dtype != model.dtype:
            self._allocate(size)  # a new size, or the plan decided the dtype of a CPU model
        self.plan = plan
        if self.use_graphs and self._baked is not None and not self._baked.still_valid(model, plan, full_check=first):
            if not first:
                raise RuntimeError("the model's weights were moved, cast or replaced, or the backend switches "
                                   "changed, since this session captured its CUDA graphs; reset() the session "
                                   "or start a new one")
            self._allocate(size)  # a new video: capture again for the new weights / plan
        self._static["frames"].copy_(frames)
        if self.use_graphs:
            if first not in self._graphs:
                self._capture(first)
                self._baked = self._baked or _Baked(model, plan)
            self._graphs[first].replay()
            masks, classes, sequence = self._outputs[first]
        else:
            masks, classes, sequence = self._eager_step(first)
        if self.clone_outputs:
            masks, classes, sequence = masks.clone(), classes.clone(), sequence.clone()
        self.frame_index += 1
        return VideomtForUniversalSegmentationOutput(
            class_queries_logits=classes, masks_queries_logits=masks, last_hidden_state=sequence
        )

    __call__ = step

    def __repr__(self) -> str:
        return (f"GraphedSession(batch_size={self.batch_size}, frame_size={self.frame_size}, "
                f"graphs={'on' if self.use_graphs else 'off'}, frames_seen={self.frame_index})")


class GraphedQueryStep:
    """``model.query_step`` for one ``(batch, tokens)`` shape, replayed from two CUDA graphs (the first
    frame, from the learned queries, and later frames, from the propagated ones).

    The clip forward of an optimized CUDA model uses it for its frame-by-frame half: the early layers
    run batched over many frames (large matrix products), the query layers and the head run per frame,
    where one replay replaces dozens of kernel launches and their Python dispatch. Returns copies of
    the masks, classes and sequence, and the queries to propagate as a view valid until the next call.
    """

    def __init__(self, model: VideomtForUniversalSegmentation, hidden: torch.Tensor, grid: tuple[int, int]):
        self.model = model
        self.grid = grid
        cfg = model.config
        with torch.inference_mode(False):  # normal tensors: later calls may run outside inference mode
            self._hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype)
            self._prev = torch.zeros(hidden.shape[0], cfg.num_queries, cfg.hidden_size, device=hidden.device,
                                     dtype=hidden.dtype)
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[bool, tuple[torch.Tensor, ...]] = {}
        self._pool = None

    def _run(self, first: bool) -> tuple[torch.Tensor, ...]:
        return self.model.query_step(self._hidden, None if first else self._prev, self.grid)

    def _capture(self, first: bool) -> None:
        graph, outputs, self._pool = capture_graph(lambda: self._run(first), self._hidden.device, self._pool)
        self._graphs[first], self._outputs[first] = graph, outputs

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, prev: torch.Tensor | None, grid: tuple[int, int] | None = None):
        """Same arguments and results as ``model.query_step`` (for the shape it was built for)."""
        if tuple(hidden.shape) != tuple(self._hidden.shape) or (grid is not None and tuple(grid) != self.grid):
            raise ValueError(f"GraphedQueryStep built for hidden {tuple(self._hidden.shape)} and grid {self.grid}, "
                             f"got {tuple(hidden.shape)} and {grid}")
        first = prev is None
        self._hidden.copy_(hidden)
        if not first:
            self._prev.copy_(prev)
        if first not in self._graphs:
            self._capture(first)
        self._graphs[first].replay()
        masks, classes, sequence, queries = self._outputs[first]
        return masks.clone(), classes.clone(), sequence.clone(), queries


def query_stepper(model: VideomtForUniversalSegmentation, hidden: torch.Tensor, grid: tuple[int, int]):
    """What the clip forward of an optimized model calls per frame: ``model.query_step`` under the plan of
    this shape, replayed from a cached :class:`GraphedQueryStep` on CUDA (outside ``torch.compile`` and
    graph capture)."""
    if torch.compiler.is_compiling():
        return model.query_step
    ph, pw = model.config.patch_hw
    plan = current_plan(model, hidden.shape[0], (grid[0] * ph, grid[1] * pw))
    if not graphs_enabled(model) or hidden.device.type != "cuda":
        return model.query_step
    cached = model.__dict__.get("_graphed_query_steps")
    if cached is None or not cached[0].still_valid(model, plan, full_check=True):
        # moved, cast or new weights, or another plan: graphs of the old ones must not replay
        cached = model.__dict__["_graphed_query_steps"] = (_Baked(model, plan), OrderedDict())
    steps = cached[1]
    key = (tuple(hidden.shape), hidden.dtype, grid)
    if key not in steps:
        if len(steps) >= 4:  # a few shapes at a time; the oldest graphs go first
            steps.popitem(last=False)
        steps[key] = GraphedQueryStep(model, hidden, grid)
    return steps[key]


def _checked_forward(model, pixel_values: torch.Tensor, probs: list[float], patch_offsets=None):
    """EoMT's forward after :func:`optimize`, on checked inputs: the plan of this shape, replayed from a
    CUDA graph per shape on CUDA."""
    if torch.compiler.is_compiling():
        return model._forward(pixel_values, probs, patch_offsets)
    current_plan(model, pixel_values.shape[0], tuple(pixel_values.shape[-2:]))
    if not graphs_enabled(model):
        return model._forward(pixel_values, probs, patch_offsets)
    predictor = model.__dict__.get("_predictor")
    if predictor is None:
        predictor = model.__dict__["_predictor"] = GraphedPredictor(
            model, use_graphs=True, clone_outputs=model.fast_settings.clone_outputs)
    return predictor.replay(pixel_values, probs, patch_offsets)


class GraphedPredictor:
    """An EoMT forward replayed from a CUDA graph, one graph per input shape.

    ``predictor(pixel_values)`` returns what ``model(pixel_values=...)`` returns. The inputs are checked
    eagerly (shape, dtype, NaN/inf as the model's ``check_finite`` says, the masked-attention
    probabilities); the checked forward, which never synchronizes with the host, is what the graph
    holds, so a call is one input copy and one replay. Up to ``max_shapes`` shapes keep their graph
    (least recently used dropped first). Off CUDA, or with ``use_graphs=False``, it calls the forward.

    Outputs are copies unless ``clone_outputs=False``; then they are the graphs' static buffers, valid
    until the next call (the graphs of all shapes share one memory pool).
    """

    def __init__(self, model, use_graphs: bool | None = None, clone_outputs: bool = True, max_shapes: int = 4):
        if not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"max_shapes must be a positive int, got {max_shapes!r}")
        self.model = model
        on_cuda = model.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else bool(use_graphs and on_cuda)
        self.clone_outputs = clone_outputs
        self.max_shapes = max_shapes
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()  # shape -> (input, graph, outputs, pinned, baked)
        self._pool = None
        self._probs: list[float] | None = None

    def _capture(self, key: tuple, pixel_values: torch.Tensor, probs: list[float], plan):
        model = self.model
        with torch.inference_mode(False):  # a normal tensor: later calls may run outside inference mode
            static = torch.empty(pixel_values.shape, dtype=model.dtype, device=model.device)
        static.copy_(pixel_values)
        pinned = _pinned_position_table(model, tuple(pixel_values.shape[-2:]))
        graph, out, self._pool = capture_graph(lambda: model._forward(static, probs), model.device, self._pool)
        entry = (static, graph, (out.class_queries_logits, out.masks_queries_logits, out.last_hidden_state), pinned,
                 _Baked(model, plan))
        self._entries[key] = entry
        while len(self._entries) > self.max_shapes:
            self._entries.popitem(last=False)
        return entry

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, patch_offsets=None):
        model = self.model
        probs = model.check_inputs(pixel_values, model.check_finite)
        plan = None
        if getattr(model, "fast_settings", None) is not None:
            plan = current_plan(model, pixel_values.shape[0], tuple(pixel_values.shape[-2:]))
        if not self.use_graphs:
            return model._forward(pixel_values, probs, patch_offsets)
        return self.replay(pixel_values, probs, patch_offsets, plan)

    def replay(self, pixel_values: torch.Tensor, probs: list[float], patch_offsets=None, plan=None):
        """The graphed forward on checked inputs (the plan of this shape already active)."""
        model = self.model
        if plan is None and getattr(model, "fast_settings", None) is not None:
            plan = plan_for(model, pixel_values.shape[0], tuple(pixel_values.shape[-2:]))
        if probs != self._probs:  # which layers are masked is baked in
            self._entries.clear()
            self._probs = list(probs)
        key = tuple(pixel_values.shape)
        entry = self._entries.get(key)
        if entry is not None and not entry[4].still_valid(model, plan):
            del self._entries[key]  # moved, cast or new weights, or another plan
            entry = None
        if entry is None:
            entry = self._capture(key, pixel_values, probs, plan)
        else:
            self._entries.move_to_end(key)
            entry[0].copy_(pixel_values)
        entry[1].replay()
        classes, masks, sequence = entry[2]
        if self.clone_outputs:
            classes, masks, sequence = classes.clone(), masks.clone(), sequence.clone()
        return EomtForUniversalSegmentationOutput(
            class_queries_logits=classes, masks_queries_logits=masks, last_hidden_state=sequence,
            patch_offsets=patch_offsets,
        )

    def __repr__(self) -> str:
        return (f"GraphedPredictor(graphs={'on' if self.use_graphs else 'off'}, "
                f"shapes={[list(k) for k in self._entries]})")
