"""Segmentation post-processing ops: vectorized PyTorch references (the CPU path and ground truth).

transformers' ``VideomtVideoProcessor`` upsamples every query mask of a frame to the target size,
``(Q, H, W)`` floats (1.6 GB for 200 queries at 1080p), then walks the queries in Python with a host
sync per query. The references here give the same answers without either:

* masks are upsampled in query blocks of :data:`QUERY_ALIGN` channels (16), in the original query
  numbering, and only the blocks that hold a query that can still be kept. Blocks aligned this way make
  ``F.interpolate`` produce the very bits it produces on the full stack (its CPU kernel vectorizes
  over channels in groups of 8 or 16 for small outputs, so unaligned slices can differ in the last
  ulp). Peak extra memory is one block, bounded by ``VIDEOMT_FAST_POSTPROCESS_BLOCK_MB`` (default 64).
* on the CPU a block is also kept small enough to stay in the cache
  (``VIDEOMT_FAST_POSTPROCESS_CPU_BLOCK_MB``, default 4, still at least 16 channels): every op after
  the upsampling then reads cached data instead of freshly faulted-in pages, which is most of what
  transformers' full-stack version spends its time on (2 frames x 200 queries at 180x320, one
  core: transformers' instance post-processing 0.4-0.6 s, this blocked single pass ~0.07 s).
* each block is upsampled once: everything a block's maps feed (counts, sigmoid sums, painting,
  argmaxes) is taken from that one upsampled block, with in-place ops and 0/1 float masks rather than
  bool tensors (``bool.sum`` and ``float * bool`` convert the whole mask first).
* the per-query loops become cumulative sums, scatters and one running argmax.

Every op returns its per-frame maps as device tensors plus small per-frame tables; the processor turns
the tables into ``segments_info`` with a single host transfer.

Ops (declared with :func:`videomt_fast.ops.define_op`; the CUDA kernels register under the same names
from :mod:`videomt_fast.ops.cuda`):

``semantic_segmentation(class_logits, mask_logits, target_sizes, return_scores)``
    -> ``list[(segmentation int64 (H, W), scores float32 (C, H, W) or None)]``
``instance_segmentation(class_logits, mask_logits, target_sizes, threshold)``
    -> ``(list[segmentation int64 (H, W)], keep bool (F, Q), labels int64 (F, Q), scores float32 (F, Q))``;
    frame f's segments are the kept queries in query order, ids 0, 1, ...
``panoptic_segmentation(class_logits, mask_logits, target_sizes, threshold, mask_threshold,
overlap_mask_area_threshold, label_ids_to_fuse)``
    -> ``(list[segmentation], new bool (F, Q), labels int64 (F, Q), scores float32 (F, Q))``;
    frame f's segments are the queries flagged ``new`` in query order, ids 0, 1, ...
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from videomt_fast.ops import registry as ops

QUERY_ALIGN = 16  # block starts/lengths in channels; a multiple of every CPU vector width torch uses


def _block_budget_bytes() -> int:
    return int(float(os.environ.get("VIDEOMT_FAST_POSTPROCESS_BLOCK_MB", "64")) * 2**20)


def block_channels(num_channels: int, height: int, width: int, bytes_per_value: int = 4) -> int:
    """Channels per upsampling block: a multiple of :data:`QUERY_ALIGN` within the memory budget."""
    per_channel = max(1, height * width * bytes_per_value)
    fit = max(1, _block_budget_bytes() // per_channel) // QUERY_ALIGN * QUERY_ALIGN
    return max(QUERY_ALIGN, min(fit, math.ceil(num_channels / QUERY_ALIGN) * QUERY_ALIGN))


def _cpu_block_bytes() -> int:
    return int(float(os.environ.get("VIDEOMT_FAST_POSTPROCESS_CPU_BLOCK_MB", "4")) * 2**20)


def work_channels(num_channels: int, height: int, width: int, device: torch.device, bytes_per_value: int = 4) -> int:
    """Channels per block for the references: :func:`block_channels`, and on the CPU no more than fit
    the cache budget (a multiple of :data:`QUERY_ALIGN`, at least one alignment unit)."""
    block = block_channels(num_channels, height, width, bytes_per_value)
    if torch.device(device).type == "cpu":
        per_channel = max(1, height * width * bytes_per_value)
        fit = _cpu_block_bytes() // per_channel // QUERY_ALIGN * QUERY_ALIGN
        block = min(block, max(QUERY_ALIGN, fit))
    return block


def _like_float(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _positive(up: torch.Tensor) -> torch.Tensor:
    """``up > 0`` as float32 0/1 values (sums of them are exact counts below 2**24 pixels)."""
    return torch.gt(up, 0, out=_like_float(up))


def _count(mask01: torch.Tensor) -> torch.Tensor:
    """Per-row count of a ``(n, P)`` float 0/1 mask, int64 and exact."""
    if mask01.shape[1] < 2**24:  # float32 partial sums of ones are exact integers below 2**24
        return mask01.sum(1).long()
    return mask01.sum(1, dtype=torch.float64).long()


def _upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W), transformers' ``F.interpolate`` call."""
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def _blocks(needed: torch.Tensor, block: int) -> list[tuple[int, int]]:
    """Aligned ``[start, stop)`` channel blocks that contain at least one ``needed`` channel (one host sync)."""
    n = needed.shape[0]
    starts = torch.arange(0, n, block, device=needed.device)
    padded = torch.zeros(starts.numel() * block, dtype=torch.bool, device=needed.device)
    padded[:n] = needed
    hit = padded.view(-1, block).any(1).tolist()
    return [(s, min(s + block, n)) for s, h in zip(range(0, n, block), hit) if h]


# --------------------------------------------------------------------------------------------
# input checks shared by every backend
# --------------------------------------------------------------------------------------------


def normalize_target_sizes(target_sizes, num_frames: int, what: str = "frame") -> list[tuple[int, int]]:
    """``target_sizes`` as a list of ``(height, width)`` python ints, one per ``what``, validated."""
    if target_sizes is None:
        raise ValueError(f"target_sizes is required: one (height, width) per {what} ({num_frames} {what}s)")
    if isinstance(target_sizes, torch.Tensor):
        if target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes as a tensor must have shape ({what}s, 2), got {tuple(target_sizes.shape)}")
        target_sizes = target_sizes.tolist()
    sizes = []
    for i, size in enumerate(target_sizes):
        if isinstance(size, torch.Tensor):
            size = size.tolist()
        try:
            h, w = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValueError(f"target_sizes[{i}] must be a (height, width) pair, got {size!r}") from None
        if h <= 0 or w <= 0:
            raise ValueError(f"target_sizes[{i}] must be positive, got {(h, w)}")
        sizes.append((h, w))
    if len(sizes) != num_frames:
        raise ValueError(
            f"len(target_sizes) must equal the number of {what}s in the outputs ({num_frames}), got {len(sizes)}"
        )
    return sizes


def check_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    """Ranks and matching frame / query counts of the two model outputs."""
    if not isinstance(class_logits, torch.Tensor) or class_logits.ndim != 3:
        got = tuple(class_logits.shape) if isinstance(class_logits, torch.Tensor) else type(class_logits).__name__
        raise ValueError(f"class_queries_logits must have shape (frames, queries, classes + 1), got {got}")
    if not isinstance(mask_logits, torch.Tensor) or mask_logits.ndim != 4:
        got = tuple(mask_logits.shape) if isinstance(mask_logits, torch.Tensor) else type(mask_logits).__name__
        raise ValueError(f"masks_queries_logits must have shape (frames, queries, height, width), got {got}")
    if class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            "class_queries_logits and masks_queries_logits must agree on (frames, queries), got "
            f"{tuple(class_logits.shape[:2])} and {tuple(mask_logits.shape[:2])}"
        )
    if class_logits.shape[2] < 2:
        raise ValueError(f"class_queries_logits needs at least one class plus the no-object class, got {class_logits.shape[2]}")
    if class_logits.device != mask_logits.device:
        raise ValueError(f"class and mask logits must be on one device, got {class_logits.device} and {mask_logits.device}")


# --------------------------------------------------------------------------------------------
# semantic
# --------------------------------------------------------------------------------------------


def semantic_mix(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Low-resolution class maps ``(F, C, h, w)``: softmax classes without null x sigmoid masks (transformers' ops)."""
    classes = class_logits.float().softmax(dim=-1)[..., :-1]
    probs = mask_logits.float().sigmoid()
    mixed = torch.matmul(classes.transpose(1, 2), probs.flatten(2))
    return mixed.reshape(probs.shape[0], classes.shape[-1], probs.shape[-2], probs.shape[-1])


def _better(val: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Where a later block's max ``val`` beats the running ``best`` as ``argmax`` over both would decide:
    strictly greater (ties keep the earlier index), and a NaN beats everything but an earlier NaN."""
    return (val > best) | (val.isnan() & ~best.isnan())


def semantic_segmentation_ref(class_logits, mask_logits, target_sizes, return_scores=False):
    """Semantic maps: per-pixel argmax over classes of the upsampled class maps (scores only when asked).

    ``max(0)`` gives ``argmax(0)``'s indices (first maximum; NaN wins) in one pass that also returns
    the values, and is several times faster than ``argmax`` over the leading dimension on the CPU.
    """
    mixed = semantic_mix(class_logits, mask_logits)
    results = []
    for f, size in enumerate(target_sizes):
        if return_scores:
            scores = _upsample(mixed[f], size)
            results.append((scores.max(dim=0).indices, scores))
            continue
        num_classes = mixed.shape[1]
        block = block_channels(num_classes, *size)
        best = best_idx = None
        for start in range(0, num_classes, block):
            val, idx = _upsample(mixed[f, start : start + block], size).max(dim=0)
            if best is None:
                best, best_idx = val, idx
            else:
                better = _better(val, best)
                best = torch.where(better, val, best)
                best_idx = torch.where(better, idx + start, best_idx)
        results.append((best_idx, None))
    return results


# --------------------------------------------------------------------------------------------
# instance
# --------------------------------------------------------------------------------------------


def instance_class_scores(class_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best non-null class probability and its label per query, ``(F, Q)`` each."""
    return class_logits.float().softmax(dim=-1)[..., :-1].max(-1)


def instance_segmentation_ref(class_logits, mask_logits, target_sizes, threshold=0.5):
    """Instance maps: queries with a positive pixel and score >= threshold, later queries painted on top.

    A query's score is its class probability times the mean sigmoid over its positive pixels, which is
    at most the class probability, so only queries with ``class probability >= threshold`` are upsampled.
    One pass: a block's queries are scored and, where kept, painted from the same upsampled block
    (a query's keep depends on its own score only); the map holds ``1 + the last kept query`` with a
    positive pixel, turned into segment ids at the end.
    """
    num_frames, num_queries = class_logits.shape[:2]
    device = mask_logits.device
    class_scores, labels = instance_class_scores(class_logits)
    candidates = class_scores.double() >= threshold
    keep = torch.zeros(num_frames, num_queries, dtype=torch.bool, device=device)
    scores = torch.zeros(num_frames, num_queries, dtype=torch.float32, device=device)
    segmentations = []
    for f, size in enumerate(target_sizes):
        block = work_channels(num_queries, *size, device)
        blocks = _blocks(candidates[f], block)
        if not blocks:
            segmentations.append(torch.full(size, -1, dtype=torch.long, device=device))
            continue
        winner = torch.zeros(size, dtype=torch.int32, device=device)  # 1 + last kept positive query, 0 = none
        for start, stop in blocks:
            up = _upsample(mask_logits[f, start:stop], size)  # native dtype, as transformers
            positive = _positive(up).flatten(1)  # transformers' `mask_pred > 0`, as 0/1
            counts = _count(positive)
            probs = up.float()  # transformers' `mask_pred.float().sigmoid()`; in place: `up` is ours
            sums = probs.sigmoid_().flatten(1).mul_(positive).sum(1)
            block_scores = class_scores[f, start:stop] * (sums / (counts + 1e-6))
            block_keep = candidates[f, start:stop] & (counts > 0) & (block_scores.double() >= threshold)
            keep[f, start:stop], scores[f, start:stop] = block_keep, block_scores
            rank = torch.arange(1, stop - start + 1, dtype=torch.float32, device=device) * block_keep
            last = positive.mul_(rank[:, None]).amax(0).view(size)  # 1 + last kept positive query of the block
            winner = torch.where(last > 0, last.int() + start, winner)
        lookup = torch.cumsum(keep[f], 0) - 1  # segment id of each kept query, in query order
        lookup = torch.cat([lookup.new_full((1,), -1), lookup])
        segmentations.append(lookup[winner.long()])
    return segmentations, keep, labels, scores


# --------------------------------------------------------------------------------------------
# panoptic
# --------------------------------------------------------------------------------------------


def panoptic_selection(class_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores, labels, keep)`` per query, ``(F, Q)`` each: best class incl. null and the keep rule."""
    num_labels = class_logits.shape[-1] - 1
    scores, labels = class_logits.float().softmax(dim=-1).max(-1)
    keep = labels.ne(num_labels) & (scores > threshold)
    return scores, labels, keep


def fuse_tensor(label_ids_to_fuse, device) -> torch.Tensor | None:
    """``label_ids_to_fuse`` as an int64 tensor on ``device`` (None when empty); tensors pass through."""
    if isinstance(label_ids_to_fuse, torch.Tensor):
        return label_ids_to_fuse.to(device=device, dtype=torch.long) if label_ids_to_fuse.numel() else None
    if not label_ids_to_fuse:
        return None
    return torch.tensor(sorted(int(i) for i in label_ids_to_fuse), dtype=torch.long, device=device)


def panoptic_segment_ids(
    keep: torch.Tensor,
    labels: torch.Tensor,
    assigned_area: torch.Tensor,
    original_area: torch.Tensor,
    final_area: torch.Tensor,
    overlap_mask_area_threshold: float,
    label_ids_to_fuse,
    num_labels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' sequential segment numbering, vectorized over the queries of one frame.

    Returns ``(id_of_query, new)``: the segment id each query paints (-1 when the query makes no
    segment) and whether it opens a new segment. A query is valid when its assigned, original and
    final areas are positive and ``assigned / original > overlap`` (float32 ratio compared in double, as
    ``.item() > threshold`` does). Valid queries of a fused label reuse the id of the first valid
    query of that label; every other valid query opens the next id. No host sync.
    """
    num_queries = keep.shape[0]
    device = keep.device
    ratio = assigned_area.float() / original_area.float().clamp(min=1)
    valid = (
        keep
        & (assigned_area > 0)
        & (original_area > 0)
        & (final_area > 0)
        & (ratio.double() > overlap_mask_area_threshold)
    )
    position = torch.arange(num_queries, device=device)
    fuse_ids = fuse_tensor(label_ids_to_fuse, device)
    if fuse_ids is not None:
        fused = valid & torch.isin(labels, fuse_ids)
        first = torch.full((num_labels + 1,), num_queries, dtype=torch.long, device=device)
        sentinel = torch.full_like(position, num_queries)
        first.scatter_reduce_(0, labels.clamp(0, num_labels), torch.where(fused, position, sentinel), reduce="amin")
        owner = torch.where(fused, first[labels.clamp(0, num_labels)], position)
        new = valid & (owner == position)
    else:
        owner = position
        new = valid
    new_id = torch.cumsum(new, 0) - 1
    id_of_query = torch.where(valid, new_id[owner.clamp(max=num_queries - 1)], -1)
    return id_of_query, new


def panoptic_segmentation_ref(
    class_logits,
    mask_logits,
    target_sizes,
    threshold=0.8,
    mask_threshold=0.5,
    overlap_mask_area_threshold=0.8,
    label_ids_to_fuse=None,
):
    """Panoptic maps: argmax over kept queries of score x sigmoid, area checks, stuff fusing, ids in query order.

    One pass over the kept queries gives each pixel's winner and the winner's probability, and each
    query's original area (probability >= mask_threshold); assigned and final areas are then counts
    over the winner map, so the per-query masks never coexist.
    """
    num_frames, num_queries = class_logits.shape[:2]
    num_labels = class_logits.shape[-1] - 1
    device = mask_logits.device
    scores, labels, keep = panoptic_selection(class_logits, threshold)
    fuse_ids = fuse_tensor(label_ids_to_fuse, device)  # one copy to the device, not one per frame
    new = torch.zeros(num_frames, num_queries, dtype=torch.bool, device=device)
    segmentations = []
    for f, size in enumerate(target_sizes):
        block = work_channels(num_queries, *size, device)
        blocks = _blocks(keep[f], block)
        if not blocks:
            segmentations.append(torch.full(size, -1, dtype=torch.long, device=device))
            continue
        best = winner = winner_prob = None
        original_area = torch.zeros(num_queries, dtype=torch.long, device=device)
        for start, stop in blocks:
            local = keep[f, start:stop].nonzero()[:, 0]
            query = local + start
            up = _upsample(mask_logits[f, start:stop], size)
            probs = (up if local.numel() == stop - start else up[local]).sigmoid_()  # native dtype, as transformers
            original_area[query] = _count(torch.ge(probs, mask_threshold, out=_like_float(probs)).flatten(1))
            val, idx = (scores[f, query][:, None, None] * probs).max(dim=0)  # argmax's index, and its value
            prob = probs.gather(0, idx[None])[0]
            q = query[idx]
            if best is None:
                best, winner, winner_prob = val, q, prob
            else:
                better = _better(val, best)
                best = torch.where(better, val, best)
                winner = torch.where(better, q, winner)
                winner_prob = torch.where(better, prob, winner_prob)
        inside = winner_prob >= mask_threshold
        flat = winner.flatten()
        assigned_area = torch.zeros(num_queries, dtype=torch.long, device=device).index_add_(
            0, flat, torch.ones_like(flat)
        )
        final_area = torch.zeros(num_queries, dtype=torch.long, device=device).index_add_(
            0, flat, inside.flatten().long()
        )
        id_of_query, new[f] = panoptic_segment_ids(
            keep[f], labels[f], assigned_area, original_area, final_area,
            overlap_mask_area_threshold, fuse_ids, num_labels,
        )
        segmentations.append(torch.where(inside, id_of_query[winner], -1))
    return segmentations, new, labels, scores


ops.define_op(
    "semantic_segmentation",
    semantic_segmentation_ref,
    "Semantic maps at target size from (F,Q,C+1) class and (F,Q,h,w) mask logits (fused upsample + argmax).",
)
ops.define_op(
    "instance_segmentation",
    instance_segmentation_ref,
    "Instance maps at target size: per-query mask scores and last-kept-query painting (fused upsample).",
)
ops.define_op(
    "panoptic_segmentation",
    panoptic_segmentation_ref,
    "Panoptic maps at target size: argmax of score x sigmoid, area rules, label fusing (fused upsample).",
)
ops.register_backend_module("cuda", "videomt_fast.ops.cuda")
