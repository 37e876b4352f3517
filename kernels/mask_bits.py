"""EoMT mask bits: bilinear resize of mask logits to the patch grid, ``> 0``, packed to int32 words.

Each program owns one (batch, query) and ``WORDS`` output words (``32 * WORDS`` patches). For every
patch it computes the source position exactly as ``F.interpolate(mode="bilinear",
align_corners=False)`` does (``src = max(scale * (dst + 0.5) - 0.5, 0)`` with ``scale = in / out`` in
fp32, the upper neighbour clamped at the border, weights ``1 - l`` and ``l``), blends the four
neighbours in fp32 in PyTorch's order (``(v00 wx0 + v01 wx1) wy0 + (v10 wx0 + v11 wx1) wy1``), and
ORs ``1 << bit`` into the word when the value is ``> 0``. The resized float map is never written.

A logit whose resized value is within rounding of 0 may land on either side (the GPU may contract
``a * b + c`` into one FMA); the tests allow a differing bit only where the reference value is
``|v| < 1e-5``.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import device_reason, dtype_reason, first_reason, int32_offsets_ok, launch_device, span


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _mask_bits_kernel(
    logits_ptr,  # (B, Q, H_in, W_in) mask logits, any strides
    bits_ptr,  # (B * Q, num_words) int32 output, contiguous
    num_queries,  # Q
    in_h,
    in_w,
    out_h,  # patch grid height
    out_w,  # patch grid width
    num_words,  # ceil(out_h * out_w / 32)
    stride_b,
    stride_q,
    stride_h,
    stride_w,  # logits strides in elements
    scale_h,  # fp32 in_h / out_h
    scale_w,  # fp32 in_w / out_w
    WORDS: tl.constexpr,
):
    pid_bq = tl.program_id(0)
    batch = pid_bq // num_queries
    query = pid_bq % num_queries
    words = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    bit = tl.arange(0, 32)
    patch = words[:, None] * 32 + bit[None, :]  # (WORDS, 32)
    valid = patch < out_h * out_w
    oy = patch // out_w
    ox = patch % out_w

    src_y = tl.maximum(scale_h * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
    src_x = tl.maximum(scale_w * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = src_y.to(tl.int32)  # src >= 0, so truncation is floor
    x0 = src_x.to(tl.int32)
    y1 = tl.where(y0 < in_h - 1, y0 + 1, y0)
    x1 = tl.where(x0 < in_w - 1, x0 + 1, x0)
    wy1 = tl.minimum(tl.maximum(src_y - y0.to(tl.float32), 0.0), 1.0)
    wx1 = tl.minimum(tl.maximum(src_x - x0.to(tl.float32), 0.0), 1.0)
    wy0 = 1.0 - wy1
    wx0 = 1.0 - wx1

    base = logits_ptr + batch.to(tl.int64) * stride_b + query.to(tl.int64) * stride_q
    v00 = tl.load(base + y0 * stride_h + x0 * stride_w, mask=valid, other=0.0).to(tl.float32)
    v01 = tl.load(base + y0 * stride_h + x1 * stride_w, mask=valid, other=0.0).to(tl.float32)
    v10 = tl.load(base + y1 * stride_h + x0 * stride_w, mask=valid, other=0.0).to(tl.float32)
    v11 = tl.load(base + y1 * stride_h + x1 * stride_w, mask=valid, other=0.0).to(tl.float32)
    value = (v00 * wx0 + v01 * wx1) * wy0 + (v10 * wx0 + v11 * wx1) * wy1

    one = tl.full([WORDS, 32], 1, dtype=tl.int32)
    flags = tl.where(valid & (value > 0.0), one << bit[None, :], 0)
    packed = tl.reduce(flags, 1, _bit_or)  # (WORDS,) int32
    tl.store(bits_ptr + pid_bq.to(tl.int64) * num_words + words, packed, mask=words < num_words)


def mask_bits_launch(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    batch, queries, in_h, in_w = mask_logits.shape
    out_h, out_w = int(grid[0]), int(grid[1])
    num_words = (out_h * out_w + 31) // 32
    bits = torch.empty(batch, queries, num_words, dtype=torch.int32, device=mask_logits.device)
    if bits.numel() == 0:
        return bits
    words_per_program = min(8, triton.next_power_of_2(num_words))
    launch_grid = (batch * queries, triton.cdiv(num_words, words_per_program))
    with launch_device(mask_logits.device, "_mask_bits_kernel"):
        _mask_bits_kernel[launch_grid](
            mask_logits,
            bits,
            queries,
            in_h,
            in_w,
            out_h,
            out_w,
            num_words,
            *mask_logits.stride(),
            float(np.float32(in_h) / np.float32(out_h)),  # the fp32 ratio PyTorch computes
            float(np.float32(in_w) / np.float32(out_w)),
            WORDS=words_per_program,
            num_warps=4,
        )
    return bits


@torch.library.custom_op("videomt_fast::mask_bits", mutates_args=())
def mask_bits_op(mask_logits: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    return mask_bits_launch(mask_logits, (grid_h, grid_w))


@mask_bits_op.register_fake
def _(mask_logits, grid_h, grid_w):
    batch, queries = mask_logits.shape[:2]
    return mask_logits.new_empty(batch, queries, (grid_h * grid_w + 31) // 32, dtype=torch.int32)


def mask_bits(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Triton implementation of :func:`videomt_fast.ops.reference.mask_bits_ref`."""
    return torch.ops.videomt_fast.mask_bits(mask_logits, int(grid[0]), int(grid[1]))


def mask_bits_guard(mask_logits: torch.Tensor, grid: tuple[int, int]) -> str | None:
    if not isinstance(mask_logits, torch.Tensor) or mask_logits.dim() != 4:
        return "mask_logits must be a (B, Q, h, w) tensor"
    reason = first_reason(device_reason(mask_logits), dtype_reason("mask_logits", mask_logits))
    if reason is not None:
        return reason
    try:
        out_h, out_w = (int(g) for g in grid)
    except (TypeError, ValueError):
        return f"grid {grid!r} is not a (height, width) pair"
    if out_h <= 0 or out_w <= 0:
        return f"grid {grid!r} must be positive"
    if min(mask_logits.shape[2:]) <= 0:
        return "mask_logits has an empty spatial size"
    # (batch, query) offsets are int64 in the kernel; offsets within one map and the bit index are int32
    if not int32_offsets_ok(span(mask_logits, slice(2, None)), out_h * out_w + 31,
                            mask_logits.shape[0] * mask_logits.shape[1]):
        return f"one mask of {tuple(mask_logits.shape)} or the grid {out_h}x{out_w} needs offsets over 32 bits"
    return None
