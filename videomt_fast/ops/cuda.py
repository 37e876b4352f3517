"""CUDA implementations of the post-processing ops, registered with :mod:`videomt_fast.ops`.

Imported lazily by the dispatcher on the first call with CUDA tensors. Each op reads the low-res
mask logits with the fused kernels of ``csrc/`` (through :mod:`videomt_fast.ops._ext`) and keeps the
per-query selection on the device: no host sync inside these functions (the processor makes one
transfer for all frames' ``segments_info``). The guards send other inputs to the references.

The kernels read float32 mask logits. bf16 / fp16 logits (the fast path's outputs) are widened to
float32 first (one small cast of the low-resolution logits), so the upsampling runs in float32 on the
same values: for float32 inputs the maps equal transformers' to the bit; for low-precision inputs they
are the float32 computation rather than transformers' upsampling in the low-precision dtype.
"""

from __future__ import annotations

import torch

from videomt_fast.ops import registry as ops
from videomt_fast.ops import _ext
from videomt_fast.ops import postprocess as pp

MAX_QUERIES = 2048


def _guard(class_logits, mask_logits, *args, **kwargs) -> str | None:
    if not (isinstance(mask_logits, torch.Tensor) and mask_logits.is_cuda):
        return "inputs are not CUDA tensors"
    if mask_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the kernels take float32 (or bf16/fp16, widened) mask logits, got {mask_logits.dtype}"
    if mask_logits.shape[1] > MAX_QUERIES:
        return f"at most {MAX_QUERIES} queries, got {mask_logits.shape[1]}"
    if _ext.load() is None:
        return f"extension unavailable: {_ext.error()}"
    return None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _kept_list(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the set flags first, ascending (int32), and their count as a 1-element device tensor."""
    order = torch.argsort((~flags).to(torch.uint8), stable=True).to(torch.int32)
    return order.contiguous(), flags.sum().to(torch.int32).reshape(1)


def instance_segmentation_cuda(class_logits, mask_logits, target_sizes, threshold=0.5):
    C = _ext.load()
    device = mask_logits.device
    num_frames, num_queries = class_logits.shape[:2]
    masks = mask_logits.float().contiguous()
    with torch.cuda.device(device):
        stream = _stream(device)
        class_scores, labels = pp.instance_class_scores(class_logits)
        candidates = class_scores.double() >= threshold
        keep = torch.zeros(num_frames, num_queries, dtype=torch.bool, device=device)
        scores = torch.zeros(num_frames, num_queries, dtype=torch.float32, device=device)
        segmentations = []
        for f, (H, W) in enumerate(target_sizes):
            tiles = (H + C.STATS_ROWS - 1) // C.STATS_ROWS
            part_count = torch.empty(num_queries, tiles, dtype=torch.int32, device=device)
            part_sum = torch.empty(num_queries, tiles, dtype=torch.float32, device=device)
            C.instance_stats(masks[f], candidates[f].to(torch.uint8).contiguous(), H, W, part_count, part_sum, stream)
            counts = part_count.sum(1)
            mask_scores = part_sum.sum(1) / (counts + 1e-6)
            frame_scores = class_scores[f] * mask_scores
            frame_keep = candidates[f] & (counts > 0) & (frame_scores.double() >= threshold)
            keep[f], scores[f] = frame_keep, frame_scores
            ids = (torch.cumsum(frame_keep, 0) - 1).to(torch.int32)
            kept, num_kept = _kept_list(frame_keep)
            out = torch.empty(H, W, dtype=torch.long, device=device)
            C.instance_paint(masks[f], kept, num_kept, ids, out, stream)
            segmentations.append(out)
    return segmentations, keep, labels, scores


def semantic_segmentation_cuda(class_logits, mask_logits, target_sizes, return_scores=False):
    C = _ext.load()
    device = mask_logits.device
    with torch.cuda.device(device):
        stream = _stream(device)
        mixed = pp.semantic_mix(class_logits, mask_logits).contiguous()  # cuBLAS, transformers' exact ops
        results = []
        for f, (H, W) in enumerate(target_sizes):
            out = torch.empty(H, W, dtype=torch.long, device=device)
            scores = torch.empty(mixed.shape[1], H, W, dtype=torch.float32, device=device) if return_scores else None
            C.semantic_argmax(mixed[f], out, scores, stream)
            results.append((out, scores))
    return results


def panoptic_segmentation_cuda(
    class_logits,
    mask_logits,
    target_sizes,
    threshold=0.8,
    mask_threshold=0.5,
    overlap_mask_area_threshold=0.8,
    label_ids_to_fuse=None,
):
    C = _ext.load()
    device = mask_logits.device
    num_frames, num_queries = class_logits.shape[:2]
    num_labels = class_logits.shape[-1] - 1
    masks = mask_logits.float().contiguous()
    with torch.cuda.device(device):
        stream = _stream(device)
        scores, labels, keep = pp.panoptic_selection(class_logits, threshold)
        scores_c = scores.contiguous()
        fuse_ids = pp.fuse_tensor(label_ids_to_fuse, device)
        new = torch.zeros(num_frames, num_queries, dtype=torch.bool, device=device)
        segmentations = []
        for f, (H, W) in enumerate(target_sizes):
            kept, num_kept = _kept_list(keep[f])
            code = torch.empty(H, W, dtype=torch.int32, device=device)
            areas = torch.zeros(3, num_queries, dtype=torch.int32, device=device)
            C.panoptic_assign(masks[f], kept, num_kept, scores_c[f], float(mask_threshold), code, areas[0], areas[1], areas[2], stream)
            original_area, assigned_area, final_area = areas.long().unbind(0)
            id_of_query, new[f] = pp.panoptic_segment_ids(
                keep[f], labels[f], assigned_area, original_area, final_area,
                overlap_mask_area_threshold, fuse_ids, num_labels,
            )
            out = torch.empty(H, W, dtype=torch.long, device=device)
            C.panoptic_paint(code, id_of_query.contiguous(), out, stream)
            segmentations.append(out)
    return segmentations, new, labels, scores


ops.register_impl("instance_segmentation", "cuda", instance_segmentation_cuda, _guard)
ops.register_impl("semantic_segmentation", "cuda", semantic_segmentation_cuda, _guard)
ops.register_impl("panoptic_segmentation", "cuda", panoptic_segmentation_cuda, _guard)
