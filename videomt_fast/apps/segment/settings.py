"""What one ``segment`` run was asked to do: the settings every part reads."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

TASKS = ("instance", "semantic", "panoptic")


@dataclass
class SegmentSettings:
    model: str
    task: str
    out: str
    size: int | None = None  # square side; None = config.image_size
    short_side: int | None = None  # keep aspect: short side to this, pad to the patch size
    chunk_size: int = 16
    dtype: str = "auto"
    engine: str = "chunk"  # "chunk": early layers batched over a chunk; "session": model.new_session()
    fast: bool = False  # model.optimize() (bf16 weights, fused kernels, CUDA graphs for sessions)
    runtime: str = "torch"  # "onnxruntime": the exported step graph on ONNX Runtime (segment/ort.py)
    threads: int = 0  # torch intra-op threads on a CPU device; 0 = PyTorch's default
    decoder: str = "auto"
    decode_workers: int = 2
    decode_threads: int = 0
    prefetch_chunks: int = 2
    png_threads: int = 2
    png_level: int = 3
    threshold: float | None = None
    mask_threshold: float = 0.5
    overlap_threshold: float = 0.8
    fuse_labels: list[int] = field(default_factory=list)
    top_k: int = 10  # instance: video-level (query, class) pairs kept
    overlay: bool = False
    overwrite: bool = False

    def validate(self) -> "SegmentSettings":
        """Raise ``ValueError`` naming the setting (and its option) when it cannot run; return ``self``.

        Counts are whole numbers: a chunk size of 2.5 is refused, not truncated (or taken as "no chunk")."""

        def option(name: str) -> str:
            return f"{name} (--{name.replace('_', '-')})"

        for name, low in (("chunk_size", 1), ("decode_workers", 1), ("prefetch_chunks", 1), ("png_threads", 1),
                          ("top_k", 1), ("threads", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{option(name)} must be a whole number of at least {low}, got {value!r}")
        for name in ("size", "short_side"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 16):
                raise ValueError(f"{option(name)} must be a whole number of at least 16, got {value!r}")
        for name in ("threshold", "mask_threshold", "overlap_threshold"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):  # NaN fails too
                raise ValueError(f"{option(name)} must be a number from 0 to 1, got {value!r}")
        from videomt_fast.apps.segment.ort import check_settings

        check_settings(self.runtime, self.dtype, self.fast)
        return self

    def task_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.8 if self.task == "panoptic" else 0.5
