"""Video-level instances from VidEoMT's propagated queries, computed incrementally.

VidEoMT carries each query from frame to frame, so query ``i`` is one object through the video and
needs no matching. Following the research code's video instance inference (tue-mps/videomt), a video's
instances are the top-k (query, class) pairs of the class distribution averaged over frames (by
default the research rule: softmax of the frame-averaged logits, without the no-object class), each
with its mask in every frame (bilinear upsampling to the frame's target size, logit > 0).

:class:`VideoInstanceAccumulator` sees one frame (or a few) at a time: it keeps a running sum of the
class logits / probabilities and, per frame, each query's binarized mask at target size as
column-major run lengths (COCO RLE counts; change points found on the device, runs assembled with
vectorized numpy). The runs are stored packed: per frame, one int32 array with every query's runs back
to back plus a ``(Q + 1,)`` offsets array, about 4 bytes a run instead of a Python list slot and int
each; lists are built only for the top-k instances in :meth:`finalize`. It never keeps mask logits, so
a streaming session can feed it frame by frame and call :meth:`finalize` at the end.
:meth:`to_youtube_vis` writes YouTube-VIS result entries with pycocotools RLE strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from videomt_fast.ops import postprocess as pp


@dataclass
class VideoInstance:
    """One video-level instance: a (query, class) pair with a mask per frame."""

    track_id: int  # the query index: stable across frames and across calls
    label_id: int
    score: float
    rles: list[dict] = field(repr=False)  # per frame, uncompressed COCO RLE {"size": [H, W], "counts": [...]}

    def masks(self) -> torch.Tensor:
        """Decode to a bool tensor ``(T, H, W)`` (all frames must share one size)."""
        return torch.stack([torch.from_numpy(rle_decode(r)) for r in self.rles])


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Uncompressed COCO RLE -> bool ``(H, W)``."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()


def _index_dtype(largest: int) -> np.dtype:
    """The dtype for values up to ``largest``: int32 when they fit, else int64."""
    return np.dtype(np.int32) if largest < 2**31 else np.dtype(np.int64)


def rle_encode_packed(masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """COCO run lengths (column-major, starting with a zero run) of each mask in ``(K, H, W)`` bool, packed.

    Returns ``(runs, offsets)``: mask ``i``'s runs are ``runs[offsets[i]:offsets[i + 1]]``. The change
    points are found on the masks' device; the runs are then built with vectorized numpy, without a
    per-mask loop. ``runs`` is int32 (int64 past 2**31 pixels).
    """
    k = masks.shape[0]
    n = masks.shape[1] * masks.shape[2]
    if k == 0:
        return np.zeros(0, _index_dtype(n)), np.zeros(1, np.int64)
    flat = masks.transpose(1, 2).reshape(k, n)
    change = flat[:, 1:] != flat[:, :-1]
    rows, cols = change.nonzero(as_tuple=True)  # row-major: grouped by mask, ascending positions
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy() + 1
    starts = flat[:, 0].cpu().numpy().astype(np.int64)  # a mask starting with a 1 gets an empty first run
    changes = np.bincount(rows, minlength=k)
    # each mask's run edges: 0, [0 again when it starts with a 1], its change positions, n
    lengths = changes + 2 + starts
    edge_end = np.cumsum(lengths)
    edge_start = edge_end - lengths
    edges = np.zeros(int(edge_end[-1]), np.int64)
    rank = np.arange(len(rows)) - (np.cumsum(changes) - changes)[rows]
    edges[edge_start[rows] + 1 + starts[rows] + rank] = cols
    edges[edge_end - 1] = n
    steps = np.diff(edges)
    within = np.ones(len(steps), bool)
    within[edge_end[:-1] - 1] = False  # drop the steps from one mask's last edge to the next mask's first
    runs = steps[within].astype(_index_dtype(n))
    offsets = np.zeros(k + 1, np.int64)
    np.cumsum(lengths - 1, out=offsets[1:])
    return runs, offsets


def rle_encode_batch(masks: torch.Tensor) -> list[list[int]]:
    """COCO run lengths (column-major, starting with a zero run) of each mask in ``(K, H, W)`` bool."""
    runs, offsets = rle_encode_packed(masks)
    values, bounds = runs.tolist(), offsets.tolist()
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class VideoInstanceAccumulator:
    """Top-k video instances of one video, fed frame by frame.

    Args:
        top_k: number of (query, class) pairs kept (the research code uses 10 for YouTube-VIS).
        class_average: ``"logits"`` (research rule: softmax of the mean logits) or ``"probs"`` (mean of
            the per-frame softmax).
    """

    def __init__(self, top_k: int = 10, class_average: str = "logits") -> None:
        if class_average not in ("logits", "probs"):
            raise ValueError(f"class_average must be 'logits' or 'probs', got {class_average!r}")
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        self.top_k = top_k
        self.class_average = class_average
        self._class_sum: torch.Tensor | None = None
        self._frames = 0
        # per frame: every query's runs back to back, and (Q + 1) offsets into them
        self._runs: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._sizes: list[tuple[int, int]] = []

    @property
    def num_frames(self) -> int:
        return self._frames

    def update(self, outputs, target_sizes: Sequence[tuple[int, int]]) -> None:
        """Add frames: ``outputs`` with ``class_queries_logits`` (F, Q, C+1) and ``masks_queries_logits``
        (F, Q, h, w) for F consecutive frames of this video, and one ``(height, width)`` per frame."""
        cls = getattr(outputs, "class_queries_logits", None)
        masks = getattr(outputs, "masks_queries_logits", None)
        if cls is None and isinstance(outputs, Mapping):
            cls, masks = outputs.get("class_queries_logits"), outputs.get("masks_queries_logits")
        if cls is None or masks is None:
            raise ValueError("outputs must carry class_queries_logits and masks_queries_logits")
        pp.check_logits(cls, masks)
        sizes = pp.normalize_target_sizes(target_sizes, cls.shape[0])
        if self._class_sum is not None and self._class_sum.shape != cls.shape[1:]:
            raise ValueError(
                f"class_queries_logits must keep (queries, classes + 1) = {tuple(self._class_sum.shape)} "
                f"through the video, got {tuple(cls.shape[1:])}"
            )
        if cls.shape[0] == 0:
            return  # no frames: nothing to add
        values = cls.float() if self.class_average == "logits" else cls.float().softmax(-1)
        total = values.double().sum(0)
        self._class_sum = total if self._class_sum is None else self._class_sum + total.to(self._class_sum.device)
        self._frames += cls.shape[0]
        for f, size in enumerate(sizes):
            runs, offsets = self._frame_runs(masks[f], size)
            self._runs.append(runs)
            self._offsets.append(offsets)
            self._sizes.append(size)

    @staticmethod
    def _frame_runs(masks: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """One frame's ``(Q, h, w)`` mask logits -> packed runs and ``(Q + 1,)`` offsets at ``size``."""
        num_queries = masks.shape[0]
        height, width = size
        lengths = np.ones(num_queries, np.int64)  # an empty mask is one run of height * width zeros
        encoded = []
        # bilinear weights are non-negative, so a query with no positive low-res logit has an empty mask
        any_positive = (masks > 0).flatten(1).any(1)
        block = pp.work_channels(num_queries, height, width, masks.device, bytes_per_value=5)
        for start, stop in pp._blocks(any_positive, block):
            binary = pp._upsample(masks[start:stop], size) > 0
            runs, offsets = rle_encode_packed(binary)
            lengths[start:stop] = np.diff(offsets)
            encoded.append((start, runs))
        total = int(lengths.sum())
        offsets = np.zeros(num_queries + 1, _index_dtype(total))
        np.cumsum(lengths, out=offsets[1:])
        frame = np.full(total, height * width, _index_dtype(height * width))  # empty masks keep this run
        for start, runs in encoded:
            frame[offsets[start] : offsets[start] + len(runs)] = runs
        return frame, offsets

    def scores(self) -> torch.Tensor:
        """Video-level class scores ``(Q, C)`` without the no-object class."""
        if self._class_sum is None:
            raise RuntimeError("no frames were added: a video-level score needs at least one frame")
        mean = (self._class_sum / self._frames).float()
        probs = mean.softmax(-1) if self.class_average == "logits" else mean
        return probs[:, :-1]

    def finalize(self) -> list[VideoInstance]:
        """The top-k instances, best first. Refused (RuntimeError) when no frames were added; a (query,
        class) pair whose score is not finite (NaN logits) is never an instance (``topk`` ranks NaN first)."""
        scores = self.scores()
        num_classes = scores.shape[1]
        flat_scores = scores.flatten()
        finite = torch.isfinite(flat_scores)
        k = min(self.top_k, int(finite.sum()))
        top, idx = flat_scores.masked_fill(~finite, float("-inf")).topk(k)
        instances = []
        for score, flat in zip(top.tolist(), idx.tolist()):
            query, label = divmod(flat, num_classes)
            rles = [
                {"size": [h, w], "counts": runs[offsets[query] : offsets[query + 1]].tolist()}
                for runs, offsets, (h, w) in zip(self._runs, self._offsets, self._sizes)
            ]
            instances.append(VideoInstance(track_id=query, label_id=label, score=score, rles=rles))
        return instances

    def to_youtube_vis(self, video_id: Any, label_to_category: Mapping[int, int] | Sequence[int] | None = None) -> list[dict]:
        """YouTube-VIS result entries ``{"video_id", "score", "category_id", "segmentations"}``, one per
        instance, with compressed RLE strings (pycocotools). ``label_to_category`` maps label ids to the
        dataset's category ids (identity when omitted)."""
        from pycocotools import mask as mask_utils

        entries = []
        for inst in self.finalize():
            segmentations = []
            for rle in inst.rles:
                h, w = rle["size"]
                compressed = mask_utils.frPyObjects({"size": [h, w], "counts": list(rle["counts"])}, h, w)
                compressed["counts"] = compressed["counts"].decode("ascii")
                segmentations.append(compressed)
            category = inst.label_id if label_to_category is None else int(label_to_category[inst.label_id])
            entries.append(
                {"video_id": video_id, "score": float(inst.score), "category_id": category, "segmentations": segmentations}
            )
        return entries


__all__ = ["VideoInstance", "VideoInstanceAccumulator", "rle_decode", "rle_encode_batch", "rle_encode_packed"]
