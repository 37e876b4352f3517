"""Exported graphs run on ONNX Runtime with the model's call surface.

``load(folder)`` gives an :class:`OrtModel`: ``model(pixel_values_videos=...)`` (the clip graph) or, for
EoMT, ``model(pixel_values=...)``; ``model.new_session(batch_size)`` gives an :class:`OrtSession`
whose ``step(frames)`` holds the carried queries between calls, as ``VideomtSession`` does, so a
stream moves between PyTorch and ONNX Runtime by changing the line that makes the model::

    model = VideomtForUniversalSegmentation.from_pretrained(...)   # PyTorch
    model = videomt_fast.export.load("exported/")                   # ONNX Runtime
    session = model.new_session(batch_size=1)
    out = session.step(frames)                                      # the same call and outputs

Inputs may be torch tensors or numpy arrays; outputs come back as the input came (torch tensors on the
CPU, or numpy arrays). The graphs return class and mask logits; ``last_hidden_state`` is not an output
of the exported graphs (it is None).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from videomt_fast.export.errors import ExportError, FrameSizeError, StateError, require
from videomt_fast.export.exporter import FORMAT, SIDECAR, SHORT

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available_providers() -> list[str]:
    ort = require("onnxruntime", "running exported graphs")
    return list(ort.get_available_providers())


def resolve_providers(providers: Any = None) -> list[str]:
    """``None`` or ``"cpu"``: the CPU execution provider; ``"auto"``: TensorRT, CUDA, CPU, those installed;
    a name or a list of names: as given (each must be installed)."""
    have = available_providers()
    if providers in (None, "cpu"):
        return ["CPUExecutionProvider"]
    if providers == "auto":
        return [p for p in PROVIDER_ORDER if p in have]
    wanted = [providers] if isinstance(providers, str) else list(providers)
    missing = [p for p in wanted if p not in have]
    if missing:
        raise ExportError(f"ONNX Runtime execution provider(s) {missing} not installed here; available: {have}")
    return wanted


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _numpy(x: Any, dtype: np.dtype) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _back(x: np.ndarray, as_torch: bool):
    if not as_torch:
        return x
    import torch

    return torch.from_numpy(x)


class OrtModel:
    """The graphs of one export folder in one dtype, on ONNX Runtime (see the module doc).

    ``dtype``: ``"float32"`` or ``"float16"`` (which graphs to run; the export must have them).
    ``providers``: see :func:`resolve_providers`. ``threads``: ONNX Runtime's intra-op threads (None: its
    default)."""

    def __init__(self, path: str | os.PathLike, dtype: str = "float32", providers: Any = None,
                 threads: int | None = None):
        self.path = os.path.abspath(os.fspath(path))
        sidecar_path = os.path.join(self.path, SIDECAR)
        if not os.path.isfile(sidecar_path):
            raise ExportError(f"{self.path} has no {SIDECAR}: not a folder written by videomt_fast.export")
        with open(sidecar_path, encoding="utf-8") as fh:
            self.sidecar = json.load(fh)
        if self.sidecar.get("format") != FORMAT:
            raise ExportError(f"{sidecar_path} is not a {FORMAT} sidecar (format {self.sidecar.get('format')!r})")
        self.dtype = dtype
        self.entries = [g for g in self.sidecar["graphs"] if g["dtype"] == dtype]
        if not self.entries:
            have = sorted({g["dtype"] for g in self.sidecar["graphs"]})
            raise ExportError(f"{self.path} has no {dtype} graphs; it has {have}")
        self.providers = resolve_providers(providers)
        self.threads = threads
        config = self.sidecar["model"]["config"]
        self.video = self.sidecar["model"]["class"].startswith("Videomt")
        self.num_queries = int(config["num_queries"])
        self.hidden_size = int(config["hidden_size"])
        self.num_channels = int(config.get("num_channels", 3))
        patch = config["patch_size"]
        self.patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.state_dtype = np.dtype(dtype)
        self._sessions: dict[str, Any] = {}

    # ------------------------------------------------------------------ graphs
    @property
    def frame_sizes(self) -> list[tuple[int, int]] | None:
        """The sizes a fixed-size export takes; None when height and width are dynamic."""
        info = self.sidecar["frame_sizes"]
        if info["dynamic"]:
            return None
        return [tuple(int(v) for v in s.split("x")) for s in info["sizes"]]

    def check_size(self, name: str, height: int, width: int) -> None:
        ph, pw = self.patch
        if height <= 0 or width <= 0 or height % ph or width % pw:
            raise FrameSizeError(f"{name} has frames of {height}x{width}; height and width must be positive multiples "
                                 f"of the patch size {ph}x{pw}")
        sizes = self.frame_sizes
        if sizes is not None and (height, width) not in sizes:
            raise FrameSizeError(f"{name} has frames of {height}x{width}; this export has graphs for "
                                 f"{', '.join(f'{h}x{w}' for h, w in sizes)} only (export again with --size "
                                 f"{height}x{width})")

    def _entry(self, kind: str, size: tuple[int, int]) -> dict:
        for entry in self.entries:
            if entry["graph"] == kind and (entry["frame_sizes"] == "dynamic" or f"{size[0]}x{size[1]}" in entry["frame_sizes"]):
                return entry
        have = sorted({g["graph"] for g in self.entries})
        raise ExportError(f"{self.path} has no {self.dtype} '{kind}' graph for {size[0]}x{size[1]} (it has {have})")

    def session_for(self, kind: str, size: tuple[int, int]):
        """The ONNX Runtime session of graph ``kind`` for frames of ``size`` (made once)."""
        entry = self._entry(kind, size)
        if entry["file"] not in self._sessions:
            ort = require("onnxruntime", "running exported graphs")
            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            self._sessions[entry["file"]] = ort.InferenceSession(
                os.path.join(self.path, entry["file"]), sess_options=options, providers=self.providers)
        return self._sessions[entry["file"]]

    def _frames(self, value: Any, name: str, rank: int, layout: str) -> np.ndarray:
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {shape}")
        if shape[-3] != self.num_channels:
            raise ValueError(f"{name} has {shape[-3]} channels (shape {shape}); expected {self.num_channels}")
        if any(s == 0 for s in shape):
            raise ValueError(f"{name} is empty: shape {shape} {layout}")
        self.check_size(name, int(shape[-2]), int(shape[-1]))
        return _numpy(value, np.float32)

    # ------------------------------------------------------------------ calls
    def step(self, frames: Any, queries: Any, first: Any) -> tuple[Any, Any, Any]:
        """One run of the step graph: ``frames (B, 3, H, W)``, ``queries (B, Q, d)``, ``first (B,)`` ->
        ``(class logits, mask logits, queries_out)``; the state is the caller's."""
        if not self.video:
            raise ExportError("step() runs VidEoMT's step graph; this export is EoMT's (call the model on pixel_values)")
        as_torch = _is_torch(frames)
        x = self._frames(frames, "frames", 4, "(batch_size, channels, height, width)")
        batch = x.shape[0]
        q = self.check_state(queries, batch)
        f = np.asarray(first.cpu() if _is_torch(first) else first, dtype=bool).reshape(-1)
        if f.shape != (batch,):
            raise StateError(f"first must hold one flag per stream, shape ({batch},); got {f.shape}")
        session = self.session_for("step", x.shape[-2:])
        classes, masks, carried = session.run(None, {"frames": x, "queries": q, "first": f})
        return _back(classes, as_torch), _back(masks, as_torch), _back(carried, as_torch)

    def check_state(self, queries: Any, batch: int) -> np.ndarray:
        """``queries`` as the step graph's state input, or :class:`StateError` naming the shape expected."""
        want = (batch, self.num_queries, self.hidden_size)
        shape = tuple(getattr(queries, "shape", ()))
        if shape != want:
            raise StateError(f"queries (the carried state) must have shape {want} (batch, num_queries, hidden_size), "
                             f"got {shape}")
        dtype = str(getattr(queries, "dtype", "")).replace("torch.", "")
        if dtype not in (self.dtype, "float32", "float16", "bfloat16"):
            raise StateError(f"queries has dtype {dtype}; the {self.dtype} step graph carries {self.dtype} queries")
        return _numpy(queries, self.state_dtype)

    def __call__(self, pixel_values_videos: Any = None, pixel_values: Any = None, **kwargs: Any):
        """The clip graph (VidEoMT, ``pixel_values_videos``) or the image graph (EoMT, ``pixel_values``),
        returning the model's output class (frame-major rows for a clip)."""
        from videomt_fast.model.modeling import EomtForUniversalSegmentationOutput, VideomtForUniversalSegmentationOutput

        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(kwargs)}")
        if self.video:
            if pixel_values_videos is None:
                raise ValueError("pixel_values_videos is required: a (batch_size, num_frames, 3, height, width) tensor")
            x = self._frames(pixel_values_videos, "pixel_values_videos", 5,
                             "(batch_size, num_frames, channels, height, width)")
            classes, masks, _ = self.session_for("clip", x.shape[-2:]).run(None, {"pixel_values_videos": x})
            as_torch = _is_torch(pixel_values_videos)
            return VideomtForUniversalSegmentationOutput(class_queries_logits=_back(classes, as_torch),
                                                         masks_queries_logits=_back(masks, as_torch))
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch_size, 3, height, width) tensor")
        x = self._frames(pixel_values, "pixel_values", 4, "(batch_size, channels, height, width)")
        classes, masks = self.session_for("image", x.shape[-2:]).run(None, {"pixel_values": x})
        as_torch = _is_torch(pixel_values)
        return EomtForUniversalSegmentationOutput(class_queries_logits=_back(classes, as_torch),
                                                  masks_queries_logits=_back(masks, as_torch))

    def new_session(self, batch_size: int = 1) -> "OrtSession":
        return OrtSession(self, batch_size)

    def new_predictor(self, max_shapes: int = 4) -> "OrtModel":
        """EoMT's predictor: the model itself (``predictor(pixel_values)``)."""
        return self

    def __repr__(self) -> str:
        return f"OrtModel({self.path!r}, dtype={self.dtype!r}, providers={self.providers})"


class OrtSession:
    """One stream (or ``batch_size`` streams in lockstep) through the step graph, the carried queries held
    here: ``step(frames)`` as :class:`videomt_fast.runtime.session.VideomtSession`."""

    def __init__(self, model: OrtModel, batch_size: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not model.video:
            raise ExportError("sessions run VidEoMT's step graph; this export is EoMT's")
        self.model = model
        self.batch_size = batch_size
        self.frame_size: tuple[int, int] | None = None
        self.frame_index = 0
        self._queries: np.ndarray | None = None
        self._torch = False  # whether the last frames were a torch tensor (state is returned the same way)

    def reset(self) -> None:
        """Start a new video: forget the carried queries and the frame size."""
        self._queries = None
        self.frame_size = None
        self.frame_index = 0

    @property
    def propagated_queries(self):
        """``(B, Q, d)`` queries carried from the previous frame (None before the first step); setting it
        (e.g. to a PyTorch session's ``propagated_queries``) continues that stream here."""
        return None if self._queries is None else _back(self._queries, self._torch)

    @propagated_queries.setter
    def propagated_queries(self, value: Any) -> None:
        self._queries = None if value is None else self.model.check_state(value, self.batch_size)

    def step(self, frames: Any):
        from videomt_fast.model.modeling import VideomtForUniversalSegmentationOutput

        shape = tuple(getattr(frames, "shape", ()))
        if len(shape) == 4 and shape[0] != self.batch_size:
            raise ValueError(f"frames has batch size {shape[0]}; this session was started with "
                             f"batch_size={self.batch_size}")
        if len(shape) == 4 and self.frame_size is not None and tuple(shape[-2:]) != self.frame_size:
            raise FrameSizeError(f"frames are {shape[-2]}x{shape[-1]}; this session's video is "
                                 f"{self.frame_size[0]}x{self.frame_size[1]} (call reset() to start a new video)")
        first = self._queries is None
        queries = (np.zeros((self.batch_size, self.model.num_queries, self.model.hidden_size), self.model.state_dtype)
                   if first else self._queries)
        classes, masks, carried = self.model.step(frames, queries, np.full(self.batch_size, first))
        self._torch = _is_torch(carried)
        self._queries = carried.numpy() if self._torch else carried
        self.frame_size = (int(shape[-2]), int(shape[-1]))
        self.frame_index += 1
        return VideomtForUniversalSegmentationOutput(class_queries_logits=classes, masks_queries_logits=masks)

    __call__ = step

    def __repr__(self) -> str:
        return (f"OrtSession(batch_size={self.batch_size}, frame_size={self.frame_size}, "
                f"frames_seen={self.frame_index}, providers={self.model.providers})")


def load(path: str | os.PathLike, dtype: str = "float32", providers: Any = None, threads: int | None = None) -> OrtModel:
    """An export folder's graphs on ONNX Runtime (see :class:`OrtModel`)."""
    if dtype not in SHORT:
        raise ExportError(f"dtype must be one of {sorted(SHORT)}, got {dtype!r}")
    return OrtModel(path, dtype=dtype, providers=providers, threads=threads)
