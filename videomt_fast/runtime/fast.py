"""The fast inference path: low-precision weights, fused kernels, and CUDA-graph sessions.

``model.optimize(dtype=torch.bfloat16)`` casts the weights (fp32 accumulation stays inside the
kernels) and marks the model fast; on CUDA its ``new_session()`` then returns a
:class:`GraphedSession`, which captures the whole frame step (all layers and the head) once per
input shape and replays it per frame, with the propagated queries in static buffers. Several
sessions can run side by side: each owns its graphs and buffers.

The kernels themselves are chosen per op by :mod:`videomt_fast.ops` (Triton / CUDA on GPU
tensors, reference elsewhere), so this module never names a backend.

Off CUDA, ``optimize()`` keeps the dtype unless one is named (and casts nothing it need not): every op
runs its reference and ``new_session()`` is the plain :class:`~videomt_fast.runtime.session.VideomtSession`,
so a float32 CPU model computes exactly what it computed before, at the same cost
(``tests/test_fast_path.py`` checks the op sequence).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from videomt_fast.model.modeling import (
    EomtForUniversalSegmentationOutput,
    VideomtForUniversalSegmentation,
    VideomtForUniversalSegmentationOutput,
)
from videomt_fast.runtime.session import check_step_frames


@dataclass
class FastSettings:
    dtype: torch.dtype = torch.bfloat16
    cuda_graphs: bool = True
    clone_outputs: bool = True  # graph outputs live in static buffers overwritten by the next step


def _casted_tensors(model):
    """Parameters and buffers that ``optimize`` casts (``attn_mask_probs`` stays fp32)."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name != "attn_mask_probs":
            yield name, tensor


def optimize(model, dtype: torch.dtype | str | None = "auto", cuda_graphs: bool = True,
             check_finite: bool | None = None, clone_outputs: bool = True):
    """Set ``model`` up for speed in place and return it (see :meth:`_Segmenter.optimize`)."""
    if isinstance(dtype, str):
        if dtype != "auto":
            raise ValueError(f"dtype must be a torch dtype, 'auto' or None, got {dtype!r}")
        dtype = torch.bfloat16 if model.device.type == "cuda" else None
    if dtype is not None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        # already in ``dtype`` (e.g. float32 on CPU): no cast, no copy, the same tensors as before
        if any(t.is_floating_point() and t.dtype != dtype for name, t in _casted_tensors(model)):
            probs = model.attn_mask_probs.detach().clone()
            model.to(dtype=dtype)
            model.attn_mask_probs = probs.to(model.attn_mask_probs.device)  # stays fp32: read, never multiplied
    if check_finite is not None:
        model.check_finite = bool(check_finite)
    if model.device.type == "cuda":
        from videomt_fast import ops

        ops.preload_backends()  # import the kernels now, outside any traced or captured region
    model.fast_settings = FastSettings(dtype=model.dtype, cuda_graphs=cuda_graphs, clone_outputs=clone_outputs)
    model.__dict__.pop("_graphed_query_steps", None)  # graphs hold the old weights' addresses
    return model.eval()


def graphs_enabled(model) -> bool:
    """Whether the model replays CUDA graphs: after :func:`optimize` with ``cuda_graphs`` on a CUDA
    model, and not while being traced by ``torch.compile`` or captured into another graph."""
    settings = getattr(model, "fast_settings", None)
    return (settings is not None and settings.cuda_graphs and model.device.type == "cuda"
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


def weights_token(model) -> tuple:
    """Where the weights live: changes when the model is moved, cast or given new parameter tensors, after
    which graphs captured before would read freed memory. Two attribute reads, no host sync."""
    first, last = model.embeddings.patch_embeddings.projection.weight, model.class_predictor.weight
    return first.data_ptr(), last.data_ptr(), first.dtype, first.device


def capture_graph(fn, device: torch.device, pool=None):
    """``(graph, outputs, pool)``: ``fn()`` run twice on a side stream (kernels compile, the allocator and
    caches settle), then captured into a CUDA graph drawing on ``pool`` (a new one when None), all on
    ``device`` whatever device is current."""
    with torch.cuda.device(device):
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
    return graph, outputs, pool


def _pinned_position_table(model, size: tuple[int, int]) -> torch.Tensor:
    """The position table a graph at this frame size reads: the graph owner keeps a reference, so the
    embeddings' one-grid cache may move on without its memory being reused under the graph."""
    return model.embeddings.position_embedding(model.grid_for(*size))


class GraphedSession:
    """A VidEoMT streaming session whose frame step replays a captured CUDA graph.

    Same contract as :class:`videomt_fast.runtime.session.VideomtSession` (``step``, ``reset``, errors on a
    changed batch size or frame size). The first frame (learned queries only) and later frames
    (``query_updater(prev) + queries``) are two graphs; both write the queries to propagate into a
    static buffer inside the graph, so a step is one input copy and one replay.

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
        self._static: dict[str, torch.Tensor] = {}
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[bool, tuple[torch.Tensor, ...]] = {}
        self._pool = None
        self._token: tuple | None = None
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
        self._graphs, self._outputs = {}, {}
        self._token = weights_token(model)
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
        # a reset session may change frame size: the static buffers and graphs are then rebuilt
        size = check_step_frames(self.model, frames, self.batch_size, self.frame_size if self.frame_index else None)
        if self.use_graphs and self._token is not None and weights_token(self.model) != self._token:
            if self.frame_index:
                raise RuntimeError("the model's weights were moved, cast or replaced since this session captured "
                                   "its CUDA graphs; reset() the session or start a new one")
            self.frame_size = None  # a reset session: rebuild buffers and graphs for the new weights
        if size != self.frame_size:
            self._allocate(size)
        first = self.frame_index == 0
        self._static["frames"].copy_(frames)
        if self.use_graphs:
            if first not in self._graphs:
                self._capture(first)
            with torch.cuda.device(self.model.device):
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
        with torch.cuda.device(self._hidden.device):
            self._graphs[first].replay()
        masks, classes, sequence, queries = self._outputs[first]
        return masks.clone(), classes.clone(), sequence.clone(), queries


def query_stepper(model: VideomtForUniversalSegmentation, hidden: torch.Tensor, grid: tuple[int, int]):
    """What the clip forward calls per frame: a cached :class:`GraphedQueryStep` for an optimized CUDA
    model (outside ``torch.compile`` and graph capture), else ``model.query_step``."""
    if not graphs_enabled(model) or hidden.device.type != "cuda":
        return model.query_step
    token = weights_token(model)
    cached = model.__dict__.get("_graphed_query_steps")
    if cached is None or cached[0] != token:  # moved, cast or new weights: graphs of the old ones must not replay
        cached = model.__dict__["_graphed_query_steps"] = (token, OrderedDict())
    steps = cached[1]
    key = (tuple(hidden.shape), hidden.dtype, grid)
    if key not in steps:
        if len(steps) >= 4:  # a few shapes at a time; the oldest graphs go first
            steps.popitem(last=False)
        steps[key] = GraphedQueryStep(model, hidden, grid)
    return steps[key]


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
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()  # shape -> (input, graph, outputs, pinned)
        self._pool = None
        self._probs: list[float] | None = None
        self._token: tuple | None = None

    def _capture(self, key: tuple, pixel_values: torch.Tensor, probs: list[float]):
        model = self.model
        with torch.inference_mode(False):  # a normal tensor: later calls may run outside inference mode
            static = torch.empty(pixel_values.shape, dtype=model.dtype, device=model.device)
        static.copy_(pixel_values)
        pinned = _pinned_position_table(model, tuple(pixel_values.shape[-2:]))
        graph, out, self._pool = capture_graph(lambda: model._forward(static, probs), model.device, self._pool)
        entry = (static, graph, (out.class_queries_logits, out.masks_queries_logits, out.last_hidden_state), pinned)
        self._entries[key] = entry
        while len(self._entries) > self.max_shapes:
            self._entries.popitem(last=False)
        return entry

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, patch_offsets=None):
        model = self.model
        probs = model.check_inputs(pixel_values, model.check_finite)
        if not self.use_graphs:
            return model._forward(pixel_values, probs, patch_offsets)
        token = weights_token(model)
        if probs != self._probs or token != self._token:  # masked layers and weight addresses are baked in
            self._entries.clear()
            self._probs, self._token = list(probs), token
        key = tuple(pixel_values.shape)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(key, pixel_values, probs)
        else:
            self._entries.move_to_end(key)
            entry[0].copy_(pixel_values)
        with torch.cuda.device(model.device):
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
