"""Flash-style softmax attention on the fused QKV layout, with EoMT's packed mask bits.

One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the key/value rows in blocks of
``BLOCK_N`` with an online softmax (running max and sum in fp32), so the ``N x N`` score matrix never
exists in memory. Q, K and V are read by strides straight from the ``(B, N, 3 d)`` output of the fused
QKV projection (no transpose, no copy) and the result is written as ``(B, N, d)``, ready for the output
projection.

Masked variant (EoMT): rows ``[0, num_queries)`` may attend patch column ``j`` (token ``num_prefix + j``)
only where bit ``j`` of their packed mask words is set; all other (row, column) pairs are unmasked. A
masked score is ``-inf`` and the running max starts at a finite ``-1e30``, so a block in which a row sees
nothing contributes exactly zero and never produces NaN; every query row keeps its non-patch columns.

Rotary variant (DINOv3, ``ROPE``): the q and k of the last ``P`` rows (the patch tokens; queries, cls and
registers are left alone) are rotated as they are loaded, ``x * cos + rotate_half(x) * sin`` per head in fp32
from the ``(P, head_dim)`` fp32 tables, then rounded once to the input dtype before the dot. The partner
half of each head (``rotate_half``) is a second load of the same rows, so the rotated Q and K never exist in
memory: no extra pass over the QKV output, no second copy of it.

The block sizes below are a conventional starting point (Triton's fused-attention tutorial uses the
same family); they must be re-tuned on the GPU, e.g. against SDPA's flash backend with
``bench/bench_kernels.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (cast_to, device_reason, dot_precision, dtype_reason, first_reason, int32_offsets_ok, interp_bf16,
                      launch_device, span)

_LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    qkv_ptr,  # (B, N, 3 * D) fused projection output; head h of q/k/v at columns h*HEAD_DIM (+D, +2D)
    out_ptr,  # (B, N, D) output, same dtype as qkv
    bits_ptr,  # (B, Q, W) int32 packed mask bits, W = ceil((N - num_prefix) / 32); unused without HAS_MASK
    stride_qkv_b,
    stride_qkv_n,  # qkv strides in elements (the last one is 1)
    stride_out_b,
    stride_out_n,  # out strides in elements (the last one is 1)
    stride_bits_b,
    stride_bits_q,  # bits strides in words (the last one is 1)
    seq_len,  # N
    dim,  # D = num_heads * HEAD_DIM
    num_heads,
    num_queries,  # Q: rows [0, Q) are masked query rows
    num_prefix,  # first patch token; patch j is token num_prefix + j
    qk_scale,  # head_dim ** -0.5 * log2(e): scores go straight to exp2
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 tensors)
    INTERP_BF16: tl.constexpr,  # interpreter bf16 workarounds, see _common.interp_bf16 (never on a GPU)
    cos_ptr=None,  # (P, HEAD_DIM) fp32 rotary cosines of the patch rows (ROPE only)
    sin_ptr=None,  # (P, HEAD_DIM) fp32 rotary sines (ROPE only)
    first_patch=0,  # N - P: the first rotated row (ROPE only)
    ROPE: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_heads).to(tl.int64)  # batch offsets in int64: a clip of frames may pass 2**31 elements
    head = pid_bh % num_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len

    q_base = qkv_ptr + batch * stride_qkv_b + head * HEAD_DIM
    k_base = q_base + dim
    v_base = q_base + 2 * dim

    q = tl.load(
        q_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    if ROPE:
        # the partner of dimension d in rotate_half: d + half (negated) in the first half, d - half in the second
        partner = tl.where(offs_d < HEAD_DIM // 2, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
        sign = tl.where(offs_d < HEAD_DIM // 2, -1.0, 1.0)
        q = _rotate(q, q_base + offs_m[:, None] * stride_qkv_n + partner[None, :], offs_m, row_ok, offs_d, d_ok,
                    sign, cos_ptr, sin_ptr, first_patch, HEAD_DIM, False, qkv_ptr.dtype.element_ty, INTERP_BF16)
    if INTERP_BF16:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max (log2 domain), finite on purpose
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Only blocks that hold query rows look at the mask words at all.
    block_has_queries = pid_m * BLOCK_M < num_queries
    bits_rows = bits_ptr + batch * stride_bits_b + offs_m * stride_bits_q  # (BLOCK_M,) row starts
    is_query = offs_m < num_queries

    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seq_len
        k_t = tl.load(
            k_base + cols[None, :] * stride_qkv_n + offs_d[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        if ROPE:
            k_t = _rotate(k_t, k_base + cols[None, :] * stride_qkv_n + partner[:, None], cols, col_ok, offs_d, d_ok,
                          sign, cos_ptr, sin_ptr, first_patch, HEAD_DIM, True, qkv_ptr.dtype.element_ty, INTERP_BF16)
        if INTERP_BF16:
            k_t = k_t.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if HAS_MASK:
            if block_has_queries:
                patch = cols - num_prefix
                patch_c = tl.maximum(patch, 0)
                need = is_query[:, None] & ((patch >= 0) & col_ok)[None, :]
                words = tl.load(bits_rows[:, None] + (patch_c // 32)[None, :], mask=need, other=-1)
                allowed = ((words >> (patch_c % 32)[None, :]) & 1) != 0
                s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = tl.load(
            v_base + cols[:, None] * stride_qkv_n + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        p = cast_to(p, qkv_ptr.dtype.element_ty, INTERP_BF16)  # the tensor cores take P in the input precision
        if INTERP_BF16:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + batch * stride_out_b + offs_m[:, None] * stride_out_n + head * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, cast_to(out, out_ptr.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _rotate(x, partner_ptrs, rows, row_ok, offs_d, d_ok, sign, cos_ptr, sin_ptr, first_patch, HEAD_DIM: tl.constexpr,
            TRANSPOSED: tl.constexpr, DTYPE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` on the patch rows of a loaded tile (rows: token indices; a
    ``(rows, dims)`` tile, or ``(dims, rows)`` when ``TRANSPOSED``), computed in fp32 and rounded once to
    ``DTYPE``; other rows come back unchanged (cos 1, sin 0)."""
    patch = rows - first_patch
    is_patch = (patch >= 0) & row_ok
    patch = tl.maximum(patch, 0)
    if TRANSPOSED:
        ok = d_ok[:, None] & is_patch[None, :]
        table = patch[None, :] * HEAD_DIM + offs_d[:, None]
        signs = sign[:, None]
    else:
        ok = is_patch[:, None] & d_ok[None, :]
        table = patch[:, None] * HEAD_DIM + offs_d[None, :]
        signs = sign[None, :]
    other = tl.load(partner_ptrs, mask=ok, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + table, mask=ok, other=1.0)
    sin = tl.load(sin_ptr + table, mask=ok, other=0.0)
    return cast_to(x.to(tl.float32) * cos + signs * other * sin, DTYPE, INTERP_BF16)


def _launch_config(head_dim: int, dtype: torch.dtype, rope: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim and dtype; to be re-measured on the GPU.

    fp32 (IEEE dots on the FMA units) keeps half the key block and twice the warps: at 64x64 with
    4 warps ptxas spills (sm_90: 255 registers, ~1.6 KB spill stores unmasked, ~6.6 KB masked), at
    64x32 with 8 warps it uses 90 / 248 registers and no local memory (videomt_fast/testing/triton_compile.py).
    The rotary variant holds three more key tiles (the partner half, cos, sin): in fp32 64x32 spills
    (255 registers, 0.6 KB unmasked, 5.3 KB masked), so it halves the key block (64x16: 201-235 registers);
    in bf16 / fp16, 64x64 with 4 warps spilled 20 B masked on sm_80 with Triton 3.6, so it takes 8 warps
    and 2 stages (at most 242 registers, sm_80 and sm_90, Triton 3.6 and 3.9).
    """
    if dtype == torch.float32:
        return (64, 16, 8, 2) if rope else (64, 32, 8, 2)
    if rope:
        return 64, 64, 8, 2
    if head_dim <= 64:
        return 64, 64, 4, 3
    return 64, 64, 8, 2


def attention_launch(
    qkv: torch.Tensor, num_heads: int, mask_bits: torch.Tensor | None, num_queries: int, num_prefix: int,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Host launcher: ``(B, N, 3d)`` -> new ``(B, N, d)``; with ``cos`` / ``sin`` (fp32 ``(P, head_dim)``) the
    rotary variant. Inputs must have passed :func:`attention_guard` (:func:`rope_attention_guard`)."""
    batch, seq_len, three_d = qkv.shape
    dim = three_d // 3
    head_dim = dim // num_heads
    out = torch.empty(batch, seq_len, dim, dtype=qkv.dtype, device=qkv.device)
    if batch == 0 or seq_len == 0:
        return out
    block_m, block_n, num_warps, num_stages = _launch_config(head_dim, qkv.dtype, cos is not None)
    has_mask = mask_bits is not None and num_queries > 0
    bits = mask_bits if has_mask else qkv  # dummy pointer when unmasked, never read
    grid = (triton.cdiv(seq_len, block_m), batch * num_heads)
    with launch_device(qkv.device, "_attention_kernel"):
        _attention_kernel[grid](
            qkv,
            out,
            bits,
            qkv.stride(0),
            qkv.stride(1),
            out.stride(0),
            out.stride(1),
            bits.stride(0) if has_mask else 0,
            bits.stride(1) if has_mask else 0,
            seq_len,
            dim,
            num_heads,
            num_queries if has_mask else 0,
            num_prefix,
            head_dim**-0.5 * _LOG2E,
            HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            HAS_MASK=has_mask,
            PRECISION=dot_precision(qkv.dtype),
            INTERP_BF16=interp_bf16(qkv.dtype),
            cos_ptr=cos,
            sin_ptr=sin,
            first_patch=seq_len - cos.shape[0] if cos is not None else 0,
            ROPE=cos is not None,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out


@torch.library.custom_op("videomt_fast::attention", mutates_args=())
def attention_op(
    qkv: torch.Tensor, num_heads: int, mask_bits: torch.Tensor | None, num_queries: int, num_prefix: int
) -> torch.Tensor:
    return attention_launch(qkv, num_heads, mask_bits, num_queries, num_prefix)


@attention_op.register_fake
def _(qkv, num_heads, mask_bits, num_queries, num_prefix):
    batch, seq_len, three_d = qkv.shape
    return qkv.new_empty(batch, seq_len, three_d // 3)


def attention(
    qkv: torch.Tensor,
    num_heads: int,
    mask_bits: torch.Tensor | None = None,
    num_queries: int = 0,
    num_prefix: int = 0,
) -> torch.Tensor:
    """Triton implementation of :func:`videomt_fast.ops.reference.attention_ref` (same signature)."""
    return torch.ops.videomt_fast.attention(qkv, int(num_heads), mask_bits, int(num_queries), int(num_prefix))


def attention_guard(
    qkv: torch.Tensor,
    num_heads: int,
    mask_bits: torch.Tensor | None = None,
    num_queries: int = 0,
    num_prefix: int = 0,
) -> str | None:
    """None when the kernel takes these inputs, else why not."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        return "qkv must be a (B, N, 3d) tensor"
    tensors = (qkv,) if mask_bits is None else (qkv, mask_bits)
    reason = first_reason(device_reason(*tensors), dtype_reason("qkv", qkv))
    if reason is not None:
        return reason
    batch, seq_len, three_d = qkv.shape
    if three_d % 3 or num_heads <= 0 or (three_d // 3) % num_heads:
        return f"qkv last dim {three_d} is not 3 * num_heads({num_heads}) * head_dim"
    head_dim = three_d // 3 // num_heads
    if head_dim % 16 or head_dim > 128:
        return f"head_dim {head_dim} (needs a multiple of 16, at most 128)"
    if qkv.stride(2) != 1:
        return "qkv last dim is not contiguous"
    if batch * num_heads > 65535:  # the launch grid's second dimension
        return f"batch * num_heads = {batch * num_heads} over the grid limit 65535 (split the batch)"
    if mask_bits is not None:
        if not 0 <= num_queries <= num_prefix <= seq_len:
            return f"needs 0 <= num_queries ({num_queries}) <= num_prefix ({num_prefix}) <= N ({seq_len})"
        words = math.ceil((seq_len - num_prefix) / 32)
        if mask_bits.dtype != torch.int32:
            return f"mask_bits dtype {mask_bits.dtype} (needs int32)"
        if tuple(mask_bits.shape) != (batch, num_queries, words):
            return f"mask_bits shape {tuple(mask_bits.shape)} (needs {(batch, num_queries, words)})"
        if num_queries > 0 and mask_bits.stride(2) != 1:
            return "mask_bits last dim is not contiguous"
    # offsets within one batch entry are int32 in the kernel (batch offsets are int64)
    if not int32_offsets_ok(span(qkv, slice(1, None)), seq_len * (three_d // 3)):
        return f"one batch entry of qkv {tuple(qkv.shape)} spans 2**31 elements or more (32-bit offsets within it)"
    return None


# ------------------------------------------------------------------ DINOv3: the rotary embedding in the Q/K load


@torch.library.custom_op("videomt_fast::rope_attention", mutates_args=())
def rope_attention_op(
    qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor, mask_bits: torch.Tensor | None,
    num_queries: int, num_prefix: int,
) -> torch.Tensor:
    return attention_launch(qkv, num_heads, mask_bits, num_queries, num_prefix, cos.contiguous(), sin.contiguous())


@rope_attention_op.register_fake
def _(qkv, num_heads, cos, sin, mask_bits, num_queries, num_prefix):
    batch, seq_len, three_d = qkv.shape
    return qkv.new_empty(batch, seq_len, three_d // 3)


def rope_attention(
    qkv: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask_bits: torch.Tensor | None = None,
    num_queries: int = 0,
    num_prefix: int = 0,
) -> torch.Tensor:
    """Triton implementation of :func:`videomt_fast.ops.reference.rope_attention_ref` (same signature)."""
    return torch.ops.videomt_fast.rope_attention(qkv, int(num_heads), cos, sin, mask_bits, int(num_queries),
                                                  int(num_prefix))


def rope_attention_guard(
    qkv: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask_bits: torch.Tensor | None = None,
    num_queries: int = 0,
    num_prefix: int = 0,
) -> str | None:
    """None when the rotary kernel takes these inputs, else why not."""
    reason = attention_guard(qkv, num_heads, mask_bits, num_queries, num_prefix)
    if reason is not None:
        return reason
    seq_len, head_dim = qkv.shape[1], qkv.shape[2] // 3 // num_heads
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != head_dim:
            return f"{name} must be a (patches, head_dim={head_dim}) tensor"
        if table.dtype != torch.float32:
            return f"{name} dtype {table.dtype} (needs float32)"
        if table.device != qkv.device:
            return f"{name} is on {table.device}, qkv on {qkv.device}"
    if cos.shape != sin.shape or cos.shape[0] > seq_len:
        return f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must match and cover at most N={seq_len} rows"
    if mask_bits is not None and num_queries > 0 and seq_len - num_prefix != cos.shape[0]:
        return f"the rotated rows ({cos.shape[0]}) are not the masked patch columns (N - num_prefix = {seq_len - num_prefix})"
    return None
