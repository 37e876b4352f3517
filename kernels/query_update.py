"""Query updater fused into the token buffer: rows ``[0, Q)`` of ``out`` get
``prev @ weight.T + bias + table`` (frame ``t > 0``) or ``table`` (frame 0).

One launch of the GEMM kernel of :mod:`.linear`: it reads ``prev`` (the previous frame's query rows,
usually a strided slice of that frame's token buffer) by strides, adds the bias and the broadcast
query table to the fp32 accumulator, and stores straight into the strided rows of ``out``. There is
no ``torch.cat`` and no intermediate tensor. Frame 0 is the same kernel with ``K = 0``: a broadcast
copy of the table.

The op mutates ``out`` (``mutates_args=("out",)``) and returns nothing at the ``torch.library`` level;
the Python wrapper returns ``out`` as the reference does.
"""

from __future__ import annotations

import torch

from ._common import device_reason, first_reason, int32_offsets_ok
from .linear import gemm_launch, vector_reason


@torch.library.custom_op("videomt_fast::query_update", mutates_args=("out",))
def query_update_op(
    out: torch.Tensor,
    table: torch.Tensor,
    prev: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    num_queries = table.shape[0]
    rows = out[:, :num_queries]  # (B, Q, d) strided view of the buffer
    if prev is None:
        gemm_launch(table.unsqueeze(0), None, None, rows, add=table.unsqueeze(0))
    else:
        gemm_launch(prev, weight, bias, rows, add=table.unsqueeze(0))


@query_update_op.register_fake
def _(out, table, prev, weight, bias):
    return None


def query_update(
    out: torch.Tensor,
    table: torch.Tensor,
    prev: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton implementation of :func:`videomt_fast.ops.reference.query_update_ref`; returns ``out``."""
    torch.ops.videomt_fast.query_update(out, table, prev, weight, bias)
    return out


def query_update_guard(out, table, prev=None, weight=None, bias=None) -> str | None:
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        return "out must be a (B, S, d) token buffer"
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        return "table must be a (Q, d) tensor"
    tensors = [t for t in (out, table, prev, weight, bias) if isinstance(t, torch.Tensor)]
    reason = device_reason(*tensors)
    if reason is not None:
        return reason
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"out dtype {out.dtype} (needs float32, float16 or bfloat16)"
    batch, seq, dim = out.shape
    num_queries = table.shape[0]
    if table.shape[1] != dim or num_queries > seq:
        return f"table shape {tuple(table.shape)} does not fit the buffer {tuple(out.shape)}"
    if table.dtype != out.dtype:
        return f"table dtype {table.dtype} differs from out {out.dtype}"
    if out.stride(2) != 1 or table.stride(1) != 1:
        return "out and table need a contiguous last dim"
    if not int32_offsets_ok(batch * num_queries):  # the GEMM's row index (row offsets are int64)
        return f"{batch * num_queries} query rows (at most 2**31 - 1)"
    if prev is None:
        return None
    if not isinstance(weight, torch.Tensor):
        return "weight is required with prev"
    if not isinstance(prev, torch.Tensor) or tuple(prev.shape) != (batch, num_queries, dim):
        return f"prev must be ({batch}, {num_queries}, {dim})"
    if weight.shape != (dim, dim) or weight.stride(1) != 1:
        return f"weight must be ({dim}, {dim}) with contiguous rows"
    if prev.stride(2) != 1:
        return "prev last dim is not contiguous"
    if prev.dtype != out.dtype or weight.dtype != out.dtype:
        return f"prev/weight dtype differs from out {out.dtype}"
    # a traced graph cannot compare storage addresses; the model never passes an aliasing prev
    if not torch.compiler.is_compiling() and (
        prev.data_ptr() == out.data_ptr() or prev.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    ):
        return "prev shares storage with out (the kernel would read rows it writes)"
    return first_reason(vector_reason("bias", bias, dim, out.dtype))
