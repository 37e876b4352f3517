"""LayerNorm, and residual + layer scale + LayerNorm in one pass.

``residual_layer_norm`` is the seam between a ViT block's attention and its MLP:
``x = x + scale * f; y = LayerNorm(x)``. Eager PyTorch reads and writes ``N x d`` activations three
times for it (multiply, add, norm); this kernel reads ``x`` and ``f`` once and writes ``x`` and ``y``
once. Each program normalizes ``ROWS`` rows held whole in registers (``d`` up to 8192), with mean and
variance in fp32 (two-pass over the registers, so no cancellation).

The new ``x`` is rounded to the tensor dtype once (eager rounds ``scale * f`` and then the sum), and
``y`` is the LayerNorm of that stored ``x``, so the two outputs are consistent with each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, cast_to, device_reason, first_reason, int32_offsets_ok, interp_bf16, launch_device

_MAX_DIM = 8192


@triton.jit
def _layer_norm_kernel(
    x_ptr,  # (M, D) input rows, row stride stride_x, unit column stride
    f_ptr,  # (M, D) branch output (unused unless HAS_RESIDUAL), row stride stride_f
    scale_ptr,  # (D,) layer scale (unused unless HAS_RESIDUAL)
    w_ptr,  # (D,) LayerNorm weight
    b_ptr,  # (D,) LayerNorm bias
    x_out_ptr,  # (M, D) contiguous: x + scale * f (unused unless HAS_RESIDUAL)
    y_ptr,  # (M, D) contiguous: LayerNorm output
    num_rows,
    dim,
    stride_x,
    stride_f,
    eps,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    col_ok = cols < dim
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        f = tl.load(f_ptr + rows64[:, None] * stride_f + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        x_new = cast_to(f * s[None, :] + x, x_out_ptr.dtype.element_ty, INTERP_BF16)
        tl.store(x_out_ptr + rows64[:, None] * dim + cols[None, :], x_new, mask=ok)
        x = x_new.to(tl.float32)

    mean = tl.sum(x, axis=1) / dim
    centered = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / dim
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows64[:, None] * dim + cols[None, :], cast_to(y, y_ptr.dtype.element_ty, INTERP_BF16), mask=ok)


def _config(dim: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps): about 4K elements per program; to be re-measured on the GPU."""
    block_d = triton.next_power_of_2(dim)
    rows = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_d <= 2048 else 8
    return block_d, rows, num_warps


def _launch(x2, f2, scale, weight, bias, x_out, y, eps):
    num_rows, dim = x2.shape
    if num_rows == 0:
        return
    block_d, rows, num_warps = _config(dim)
    has_residual = f2 is not None
    with launch_device(x2.device, "_layer_norm_kernel"):
        _layer_norm_kernel[(triton.cdiv(num_rows, rows),)](
            x2,
            f2 if has_residual else x2,
            scale if has_residual else weight,
            weight,
            bias,
            x_out if has_residual else y,
            y,
            num_rows,
            dim,
            x2.stride(0),
            f2.stride(0) if has_residual else 0,
            float(eps),
            BLOCK_D=block_d,
            ROWS=rows,
            HAS_RESIDUAL=has_residual,
            INTERP_BF16=interp_bf16(x2.dtype),
            num_warps=num_warps,
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` -> a ``(M, D)`` view (the guard ensured that one exists)."""
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("videomt_fast::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_rows(x), None, None, weight, bias, None, y.view(-1, x.shape[-1]), eps)
    return y


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("videomt_fast::residual_layer_norm", mutates_args=())
def residual_layer_norm_op(
    x: torch.Tensor, f: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dim = x.shape[-1]
    _launch(_rows(x), _rows(f), scale, weight, bias, x_out.view(-1, dim), y.view(-1, dim), eps)
    return x_out, y


@residual_layer_norm_op.register_fake
def _(x, f, scale, weight, bias, eps):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton implementation of :func:`videomt_fast.ops.reference.layer_norm_ref`."""
    return torch.ops.videomt_fast.layer_norm(x, weight, bias, float(eps))


def residual_layer_norm(
    x: torch.Tensor, f: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of :func:`videomt_fast.ops.reference.residual_layer_norm_ref`."""
    return torch.ops.videomt_fast.residual_layer_norm(x, f, scale, weight, bias, float(eps))


def _rows_reason(name: str, t: torch.Tensor) -> str | None:
    """None when ``t`` (..., D) is viewable as (M, D) rows with a unit column stride."""
    if t.dim() < 1 or t.stride(-1) != 1:
        return f"{name} last dim is not contiguous"
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        return f"{name} rows are not evenly strided (needs a (M, D) view)"
    # row offsets are int64 in the kernel; the row index itself is int32
    if t.shape[-1] and not int32_offsets_ok(t.numel() // t.shape[-1]):
        return f"{name} has {t.numel() // t.shape[-1]} rows (at most 2**31 - 1)"
    return None


def _param_reason(name: str, p: torch.Tensor | None, dim: int, dtype: torch.dtype) -> str | None:
    if p is None:
        return f"{name} is None"
    if p.shape != (dim,) or not p.is_contiguous():
        return f"{name} shape {tuple(p.shape)} (needs contiguous ({dim},))"
    if p.dtype != dtype:
        return f"{name} dtype {p.dtype} differs from x {dtype}"
    return None


def layer_norm_guard(x, weight, bias, eps) -> str | None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        return "x, weight and bias must be tensors (an affine LayerNorm)"
    reason = first_reason(device_reason(x, weight, bias), _rows_reason("x", x))
    if reason is not None:
        return reason
    if x.dtype not in FLOAT_DTYPES:
        return f"x dtype {x.dtype} (needs float32, float16 or bfloat16)"
    dim = x.shape[-1]
    if dim > _MAX_DIM:
        return f"last dim {dim} > {_MAX_DIM}"
    return first_reason(_param_reason("weight", weight, dim, x.dtype), _param_reason("bias", bias, dim, x.dtype))


def residual_layer_norm_guard(x, f, scale, weight, bias, eps) -> str | None:
    tensors = (x, f, scale, weight, bias)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "x, f, scale, weight and bias must be tensors"
    reason = layer_norm_guard(x, weight, bias, eps)
    if reason is not None:
        return reason
    reason = first_reason(device_reason(*tensors), _rows_reason("f", f))
    if reason is not None:
        return reason
    if f.shape != x.shape:
        return f"f shape {tuple(f.shape)} differs from x {tuple(x.shape)}"
    if f.dtype != x.dtype:
        return f"f dtype {f.dtype} differs from x {x.dtype}"
    return _param_reason("scale", scale, x.shape[-1], x.dtype)
