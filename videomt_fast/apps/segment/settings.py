"""What one ``segment`` run was asked to do: the settings every part reads."""

from __future__ import annotations

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

    def task_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.8 if self.task == "panoptic" else 0.5
