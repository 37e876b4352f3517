"""GEMM epilogues of a ViT block: ``linear_gelu`` (fc1), ``linear_residual`` (out-proj, fc2) and ``linear_gated``
(the gated MLP's ``act(gate(x)) * up(x)``: DINOv2's SwiGLU, DINOv3's gated MLP).

Two implementations of each, one registered:

* ``"cublas"`` (default): ``F.linear`` (cuBLAS, bias in its own epilogue) and then ONE Triton pass over
  the output, in place: exact-erf GELU, or ``y * scale + residual``. Eager PyTorch needs one extra pass
  for GELU and two (multiply, add) for the layer-scaled residual.
* ``"triton"``: one Triton GEMM (``tl.dot`` tiles, grouped launch order) that applies bias, GELU or
  ``scale`` + ``residual`` to the fp32 accumulator before its only store. No extra pass at all, but a
  hand-written GEMM must first match cuBLAS at these shapes.

``linear_gated`` the same way: ``"cublas"`` runs the gate and up projections with ``F.linear`` and one Triton
pass writes ``act(gate) * up`` over the gate output; ``"triton"`` is one GEMM kernel with two accumulators
(the gate's and the up projection's columns ``j`` of the same row block), bias, activation and product in
its epilogue: the ``2 x (M, N)`` intermediate is never written.

``VIDEOMT_FAST_GEMM=cublas|triton`` (read when ``videomt_fast.kernels`` is imported) picks the one
that :mod:`videomt_fast.ops` gets; both stay callable from here. The default is ``cublas`` because it
is the safer bet without measurements: the choice must be re-measured on the GPU
(``bench/bench_kernels.py`` times both against eager).

The same GEMM kernel also serves :mod:`.query_update` (rows addressed as ``(batch, row)`` pairs, so it
can read and write slices of the token buffer in place). fp32 tensors use exact fp32 ``tl.dot``
(``input_precision="ieee"``), never silent TF32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import cast_to, device_reason, dot_precision, env_flag, first_reason, int32_offsets_ok, interp_bf16, launch_device

GEMM_CHOICES = ("cublas", "triton")


def gemm_choice() -> str:
    choice = env_flag("VIDEOMT_FAST_GEMM", "cublas")
    if choice not in GEMM_CHOICES:
        raise ValueError(f"VIDEOMT_FAST_GEMM must be one of {GEMM_CHOICES}, got {choice!r}")
    return choice


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """``ACT``: 0 exact-erf GELU, 1 SiLU."""
    if ACT == 0:
        return _gelu(x)
    return _silu(x)


ACT_CODES = {"gelu": 0, "silu": 1}


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's row and column offsets, its tile taken in grouped order: GROUP_M row blocks share the
    weight tiles while they are in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _linear_kernel(
    x_ptr,  # (M, K) input rows; row m = (m // rows_per_batch, m % rows_per_batch) by strides, unit K stride
    w_ptr,  # (N, K) weight, row stride stride_wn, unit K stride
    bias_ptr,  # (N,) bias (unused unless HAS_BIAS)
    scale_ptr,  # (N,) layer scale (unused unless HAS_SCALE)
    add_ptr,  # (M, N) residual / broadcast table rows by strides, unit N stride (unused unless HAS_ADD)
    out_ptr,  # (M, N) output rows by strides, unit N stride
    M,
    N,
    K,
    rows_per_batch,  # splits row m into (batch, row) for every row-indexed tensor
    stride_xb,
    stride_xr,
    stride_wn,
    stride_ab,  # 0 for a table broadcast over the batch
    stride_ar,
    stride_ob,
    stride_or,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    offs_m, offs_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows_b = (offs_m // rows_per_batch).to(tl.int64)
    rows_r = (offs_m % rows_per_batch).to(tl.int64)

    x_rows = x_ptr + rows_b * stride_xb + rows_r * stride_xr  # (BLOCK_M,)
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn  # (BLOCK_N,)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(x_rows[:, None] + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_rows[None, :] + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
        if INTERP_BF16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_ADD:
        add_rows = add_ptr + rows_b * stride_ab + rows_r * stride_ar
        acc += tl.load(add_rows[:, None] + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    out_rows = out_ptr + rows_b * stride_ob + rows_r * stride_or
    tl.store(out_rows[:, None] + offs_n[None, :], cast_to(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=ok)


def _gemm_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); a starting point, to be tuned on the GPU."""
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 64, 8, 3


def gemm_launch(
    x: torch.Tensor,  # (Bx, R, K) rows by strides (stride(-1) == 1)
    weight: torch.Tensor | None,  # (N, K), stride(-1) == 1; None with K == 0
    bias: torch.Tensor | None,  # (N,)
    out: torch.Tensor,  # (B, R, N) rows by strides (stride(-1) == 1), written
    *,
    gelu: bool = False,
    scale: torch.Tensor | None = None,  # (N,)
    add: torch.Tensor | None = None,  # (Ba, R, N) with Ba in {1, B}; size-1 batch broadcast
) -> torch.Tensor:
    """``out = epilogue(x @ weight.T)`` for 3-D row-strided operands; returns ``out``."""
    batch, rows, n = out.shape
    k = x.shape[-1] if weight is not None else 0
    m = batch * rows
    if m == 0 or n == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = _gemm_config(out.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    w = weight if weight is not None else out
    with launch_device(out.device, "_linear_kernel"):
        _linear_kernel[grid](
            x,
            w,
            bias if bias is not None else out,
            scale if scale is not None else out,
            add if add is not None else out,
            out,
            m,
            n,
            k,
            rows,
            x.stride(0) if x.shape[0] > 1 else 0,
            x.stride(1),
            w.stride(0),
            add.stride(0) if add is not None and add.shape[0] > 1 else 0,
            add.stride(1) if add is not None else 0,
            out.stride(0),
            out.stride(1),
            HAS_BIAS=bias is not None,
            GELU=gelu,
            HAS_SCALE=scale is not None,
            HAS_ADD=add is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            GROUP_M=8,
            PRECISION=dot_precision(out.dtype),
            INTERP_BF16=interp_bf16(out.dtype),
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out


@triton.jit
def _epilogue_kernel(
    y_ptr,  # (M, N) contiguous GEMM output (bias already added), updated in place
    scale_ptr,  # (N,) layer scale (unused unless RESIDUAL)
    res_ptr,  # (M, N) residual, row m at (m // rows_per_batch, m % rows_per_batch) by strides (unused unless RESIDUAL)
    M,
    N,
    rows_per_batch,
    stride_rb,
    stride_rr,
    RESIDUAL: tl.constexpr,  # False: y = gelu(y); True: y = y * scale + residual
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ok = (offs_m < M)[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)
    y_ptrs = y_ptr + rows[:, None] * N + offs_n[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        s = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        res_rows = res_ptr + (rows // rows_per_batch) * stride_rb + (rows % rows_per_batch) * stride_rr
        r = tl.load(res_rows[:, None] + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
        y = y * s[None, :] + r
    else:
        y = _gelu(y)
    tl.store(y_ptrs, cast_to(y, y_ptr.dtype.element_ty, INTERP_BF16), mask=ok)


def epilogue_launch(y: torch.Tensor, scale: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """In place on the contiguous ``y`` (..., N): GELU, or ``y * scale + residual``."""
    n = y.shape[-1]
    y2 = y.view(-1, n)
    m = y2.shape[0]
    if m == 0 or n == 0:
        return y
    block_n = min(triton.next_power_of_2(n), 256)
    block_m = max(1, 2048 // block_n)
    res3 = as_3d(residual) if residual is not None else y2.unsqueeze(0)
    with launch_device(y.device, "_epilogue_kernel"):
        _epilogue_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            y2,
            scale if scale is not None else y2,
            res3,
            m,
            n,
            res3.shape[1],
            res3.stride(0) if res3.shape[0] > 1 else 0,
            res3.stride(1),
            RESIDUAL=residual is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            INTERP_BF16=interp_bf16(y.dtype),
            num_warps=4,
        )
    return y


def as_3d(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> a (B, R, K) strided view: a 3-D tensor as it is (batch and row strides may be anything,
    e.g. the query rows of a token buffer), anything else as (1, M, K) rows (the guard ensured it exists)."""
    if t.dim() == 3:
        return t
    return t.view(1, -1, t.shape[-1])


# ------------------------------------------------------------------ the two implementations


def linear_gelu_cublas(x, weight, bias):
    return epilogue_launch(F.linear(x, weight, bias))


def linear_gelu_triton(x, weight, bias):
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    x3 = as_3d(x)
    gemm_launch(x3, weight, bias, out.view(*x3.shape[:2], weight.shape[0]), gelu=True)
    return out


def linear_residual_cublas(x, weight, bias, scale, residual):
    return epilogue_launch(F.linear(x, weight, bias), scale, residual)


def linear_residual_triton(x, weight, bias, scale, residual):
    n = weight.shape[0]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    x3 = as_3d(x)
    gemm_launch(x3, weight, bias, out.view(*x3.shape[:2], n), scale=scale, add=as_3d(residual))
    return out


@torch.library.custom_op("videomt_fast::linear_gelu", mutates_args=())
def linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, triton_gemm: bool) -> torch.Tensor:
    return (linear_gelu_triton if triton_gemm else linear_gelu_cublas)(x, weight, bias)


@linear_gelu_op.register_fake
def _(x, weight, bias, triton_gemm):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("videomt_fast::linear_residual", mutates_args=())
def linear_residual_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    residual: torch.Tensor,
    triton_gemm: bool,
) -> torch.Tensor:
    return (linear_residual_triton if triton_gemm else linear_residual_cublas)(x, weight, bias, scale, residual)


@linear_residual_op.register_fake
def _(x, weight, bias, scale, residual, triton_gemm):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def make_linear_gelu(triton_gemm: bool):
    def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Triton implementation of :func:`videomt_fast.ops.reference.linear_gelu_ref`."""
        return torch.ops.videomt_fast.linear_gelu(x, weight, bias, triton_gemm)

    return linear_gelu


def make_linear_residual(triton_gemm: bool):
    def linear_residual(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """Triton implementation of :func:`videomt_fast.ops.reference.linear_residual_ref`."""
        return torch.ops.videomt_fast.linear_residual(x, weight, bias, scale, residual, triton_gemm)

    return linear_residual


# ------------------------------------------------------------------ guards


def rows_reason(name: str, t: torch.Tensor) -> str | None:
    if t.dim() < 1:
        return f"{name} is a scalar"
    if t.stride(-1) != 1:
        return f"{name} last dim is not contiguous"
    if t.dim() != 3:
        try:
            t.view(-1, t.shape[-1])
        except RuntimeError:
            return f"{name} rows are not evenly strided (needs 3-D or a (M, K) view)"
    # row offsets (batch and row strides) are int64 in the kernels; the row index itself is int32
    rows = t.numel() // t.shape[-1] if t.shape[-1] else 0
    if not int32_offsets_ok(rows):
        return f"{name} has {rows} rows (at most 2**31 - 1)"
    return None


def vector_reason(name: str, v: torch.Tensor | None, n: int, dtype: torch.dtype) -> str | None:
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or v.shape != (n,) or not v.is_contiguous():
        return f"{name} must be a contiguous ({n},) tensor"
    if v.dtype != dtype:
        return f"{name} dtype {v.dtype} differs from {dtype}"
    return None


def weight_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "weight must be a (N, K) tensor"
    if weight.dtype != x.dtype:
        return f"weight dtype {weight.dtype} differs from x {x.dtype}"
    if weight.shape[1] != x.shape[-1]:
        return f"weight shape {tuple(weight.shape)} does not match x last dim {x.shape[-1]}"
    if weight.stride(1) != 1:
        return "weight rows are not contiguous"
    return None


def linear_gelu_guard(x, weight, bias=None) -> str | None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return "x must be a (..., K) tensor"
    tensors = [t for t in (x, weight, bias) if isinstance(t, torch.Tensor)]
    reason = first_reason(device_reason(*tensors), rows_reason("x", x))
    if reason is not None:
        return reason
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"x dtype {x.dtype} (needs float32, float16 or bfloat16)"
    reason = weight_reason(x, weight)
    if reason is not None:
        return reason
    return vector_reason("bias", bias, weight.shape[0], x.dtype)


def linear_residual_guard(x, weight, bias, scale, residual) -> str | None:
    reason = linear_gelu_guard(x, weight, bias)
    if reason is not None:
        return reason
    if not isinstance(residual, torch.Tensor) or not isinstance(scale, torch.Tensor):
        return "scale and residual must be tensors"
    reason = first_reason(device_reason(x, scale, residual), rows_reason("residual", residual))
    if reason is not None:
        return reason
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(residual.shape) != expected:
        return f"residual shape {tuple(residual.shape)} (needs {expected})"
    if residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} differs from x {x.dtype}"
    return vector_reason("scale", scale, weight.shape[0], x.dtype)


# ------------------------------------------------------------------ the gated MLP: act(x @ Wg.T + bg) * (x @ Wu.T + bu)


@triton.jit
def _gated_kernel(
    x_ptr,  # (M, K) input rows, row stride stride_xm, unit K stride
    wg_ptr,  # (N, K) gate weight, row stride stride_wg, unit K stride
    bg_ptr,  # (N,) gate bias (unused unless HAS_BIAS)
    wu_ptr,  # (N, K) up weight, row stride stride_wu, unit K stride
    bu_ptr,  # (N,) up bias (unused unless HAS_BIAS)
    out_ptr,  # (M, N) output, row stride stride_om, unit N stride
    M,
    N,
    K,
    stride_xm,
    stride_wg,
    stride_wu,
    stride_om,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # 0 GELU, 1 SiLU
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    offs_m, offs_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    g_rows = wg_ptr + offs_n.to(tl.int64) * stride_wg
    u_rows = wu_ptr + offs_n.to(tl.int64) * stride_wu
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(x_rows[:, None] + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = n_ok[None, :] & k_ok[:, None]
        bg = tl.load(g_rows[None, :] + kk[:, None], mask=wmask, other=0.0)  # (BLOCK_K, BLOCK_N)
        bu = tl.load(u_rows[None, :] + kk[:, None], mask=wmask, other=0.0)
        if INTERP_BF16:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
    if HAS_BIAS:
        acc_g += tl.load(bg_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bu_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = _activation(acc_g, ACT) * acc_u
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, cast_to(y, out_ptr.dtype.element_ty, INTERP_BF16), mask=m_ok[:, None] & n_ok[None, :])


def _gated_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): two accumulators, so half the N tile of
    :func:`_gemm_config`; a starting point, to be tuned on the GPU."""
    if dtype == torch.float32:
        return 64, 32, 32, 4, 3
    return 128, 64, 64, 8, 3


def gated_launch(x2: torch.Tensor, wg, bg, wu, bu, activation: str) -> torch.Tensor:
    """``act(x2 @ wg.T + bg) * (x2 @ wu.T + bu)`` for ``(M, K)`` rows (unit K stride); a new ``(M, N)``."""
    m, k = x2.shape
    n = wg.shape[0]
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = _gated_config(x2.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    with launch_device(x2.device, "_gated_kernel"):
        _gated_kernel[grid](
            x2, wg, bg if bg is not None else out, wu, bu if bu is not None else out, out,
            m, n, k, x2.stride(0), wg.stride(0), wu.stride(0), out.stride(0),
            HAS_BIAS=bg is not None,
            ACT=ACT_CODES[activation],
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            GROUP_M=8,
            PRECISION=dot_precision(x2.dtype),
            INTERP_BF16=interp_bf16(x2.dtype),
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out


@triton.jit
def _gate_product_kernel(
    g_ptr,  # (M, N) contiguous gate projection (bias added), overwritten with act(g) * u
    u_ptr,  # (M, N) contiguous up projection (bias added)
    numel,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(g_ptr + offs, cast_to(_activation(g, ACT) * u, g_ptr.dtype.element_ty, INTERP_BF16), mask=ok)


def linear_gated_cublas(x, wg, bg, wu, bu, activation):
    g = F.linear(x, wg, bg)
    u = F.linear(x, wu, bu)
    if g.numel():
        block = 1024
        with launch_device(g.device, "_gate_product_kernel"):
            _gate_product_kernel[(triton.cdiv(g.numel(), block),)](
                g, u, g.numel(), ACT=ACT_CODES[activation], BLOCK=block, INTERP_BF16=interp_bf16(g.dtype), num_warps=4
            )
    return g


def linear_gated_triton(x, wg, bg, wu, bu, activation):
    x2 = x.reshape(-1, x.shape[-1])
    return gated_launch(x2, wg, bg, wu, bu, activation).view(*x.shape[:-1], wg.shape[0])


@torch.library.custom_op("videomt_fast::linear_gated", mutates_args=())
def linear_gated_op(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str,
    triton_gemm: bool,
) -> torch.Tensor:
    impl = linear_gated_triton if triton_gemm else linear_gated_cublas
    return impl(x, gate_weight, gate_bias, up_weight, up_bias, activation)


@linear_gated_op.register_fake
def _(x, gate_weight, gate_bias, up_weight, up_bias, activation, triton_gemm):
    return x.new_empty(*x.shape[:-1], gate_weight.shape[0])


def make_linear_gated(triton_gemm: bool):
    def linear_gated(x, gate_weight, gate_bias, up_weight, up_bias, activation):
        """Triton implementation of :func:`videomt_fast.ops.reference.linear_gated_ref`."""
        return torch.ops.videomt_fast.linear_gated(x, gate_weight, gate_bias, up_weight, up_bias, activation,
                                                   triton_gemm)

    return linear_gated


def linear_gated_guard(x, gate_weight, gate_bias, up_weight, up_bias, activation) -> str | None:
    if activation not in ACT_CODES:
        return f"activation {activation!r} (needs one of {sorted(ACT_CODES)})"
    reason = linear_gelu_guard(x, gate_weight, gate_bias)
    if reason is not None:
        return reason
    reason = first_reason(weight_reason(x, up_weight), device_reason(x, up_weight))
    if reason is not None:
        return reason
    if tuple(up_weight.shape) != tuple(gate_weight.shape):
        return f"up weight {tuple(up_weight.shape)} differs from gate weight {tuple(gate_weight.shape)}"
    if (gate_bias is None) != (up_bias is None):
        return "gate and up projections must both have a bias or both have none"
    reason = vector_reason("up bias", up_bias, up_weight.shape[0], x.dtype)
    if reason is not None:
        return reason
    if not x.is_contiguous():
        return "x is not contiguous (the gated kernel reads (M, K) rows)"
    return None
