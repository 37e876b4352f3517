"""Comparing segmentation maps of the CUDA post-processing with an independent computation.

The kernels compute ATen's bilinear expression, but nvcc may contract it into FMAs differently, so a
pixel may differ where its decision sits within rounding of the threshold: ``|upsampled logit| < NEAR``
for a mask (``> 0``, and ``sigmoid >= 0.5``), a gap below ``NEAR`` between the two best classes for the
semantic argmax. Everywhere else the maps must be equal. Used by ``tests/test_postprocess_cuda.py`` and
``bench/gpu_smoke.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from videomt_fast.ops import postprocess as pp

NEAR = 1e-5  # a decision this close to its threshold may go either way (the mask-bit kernel tests' rule)


def upsampled(maps: torch.Tensor, size) -> torch.Tensor:
    """(C, h, w) -> (C, H, W) float32 with ATen's bilinear upsampling (transformers' arithmetic)."""
    return F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def near_mask_threshold(out, sizes) -> list[torch.Tensor]:
    """Per frame, (H, W) bool on the CPU: pixels where some query's upsampled mask logit is within NEAR
    of 0. Upsamples one block of queries at a time (1080p x 200 queries would be 1.6 GB at once)."""
    masks = out.masks_queries_logits.float()
    near = []
    for f, size in enumerate(sizes):
        hit = torch.zeros(tuple(size), dtype=torch.bool, device=masks.device)
        for block in masks[f].split(16):
            hit |= (upsampled(block, size).abs() < NEAR).any(0)
        near.append(hit.cpu())
    return near


def near_class_tie(out, sizes) -> list[torch.Tensor]:
    """Per frame, (H, W) bool on the CPU: pixels whose two best upsampled semantic class scores are
    within NEAR of each other."""
    mixed = pp.semantic_mix(out.class_queries_logits.float(), out.masks_queries_logits.float())
    near = []
    for f, size in enumerate(sizes):
        top = upsampled(mixed[f], size).topk(2, dim=0).values
        near.append(((top[0] - top[1]) < NEAR).cpu())
    return near


def map_mismatch(expected: torch.Tensor, got: torch.Tensor, tolerated: torch.Tensor) -> str | None:
    """None when ``got == expected`` at every pixel outside ``tolerated``, else what differs."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"got {tuple(got.shape)} {got.dtype}, want {tuple(expected.shape)} {expected.dtype}"
    diff = got.cpu() != expected.cpu()
    bad = diff & ~tolerated
    if not bad.any():
        return None
    y, x = (int(i) for i in bad.nonzero()[0])
    return (f"{int(bad.sum())} pixels differ away from a threshold ({int(diff.sum())} in all); first at "
            f"({y}, {x}): got {got[y, x].item()}, want {expected[y, x].item()}")


def assert_maps_match(expected: torch.Tensor, got: torch.Tensor, tolerated: torch.Tensor, what: str = "") -> None:
    why = map_mismatch(expected, got, tolerated)
    assert why is None, f"{what}: {why}"


def segments_mismatch(expected, got, tolerated, tol: float = 1e-5) -> str | None:
    """None when the frames' segment maps match outside ``tolerated`` and their segments (ids, labels,
    scores within ``tol``) are equal; else what differs first."""
    if len(expected) != len(got):
        return f"{len(got)} frames, want {len(expected)}"
    for f, (e, o) in enumerate(zip(expected, got)):
        why = map_mismatch(e["segmentation"], o["segmentation"], tolerated[f])
        if why is not None:
            return f"frame {f}: {why}"
        ei, oi = e["segments_info"], o["segments_info"]
        if [(s["id"], s["label_id"]) for s in oi] != [(s["id"], s["label_id"]) for s in ei]:
            return f"frame {f}: segments {[(s['id'], s['label_id']) for s in oi]}, want {[(s['id'], s['label_id']) for s in ei]}"
        for s_e, s_o in zip(ei, oi):
            if abs(s_e["score"] - s_o["score"]) > tol:
                return f"frame {f}: segment {s_o['id']} score {s_o['score']}, want {s_e['score']}"
    return None


def assert_segments_match(expected, got, tolerated, tol: float = 1e-5) -> None:
    why = segments_mismatch(expected, got, tolerated, tol)
    assert why is None, why
