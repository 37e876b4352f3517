"""Test helpers for the kernels: error measures, the low-precision rule, poisoned allocations.

Used by ``tests/test_kernels_*.py`` and ``bench/bench_kernels.py``; importing this module does not
import Triton.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from videomt_fast.ops import registry as ops

FP32_REL_TOL = 1e-5
# low precision: kernel error vs the float64 truth <= LOWPREC_FACTOR * PyTorch's own error + eps
LOWPREC_FACTOR = 2.0
LOWPREC_EPS = {torch.float16: 1e-5, torch.bfloat16: 1e-4}
POISON_INT = -0x55555556  # 0xAAAAAAAA


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    out64, ref64 = out.double(), ref.double()
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def describe_diff(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Where and how much ``out`` differs from ``ref`` (for assertion messages)."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = (out.double() - ref.double()).abs()
    nan = torch.isnan(out)
    if nan.any():
        idx = tuple(int(i) for i in nan.nonzero()[0])
        return f"{int(nan.sum())} NaN in output (first at {idx}, reference {ref[idx].item():.6g})"
    diff = torch.nan_to_num(diff, nan=float("inf"))
    flat = int(diff.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), out.shape))
    return (
        f"max abs diff {diff.max().item():.3e} at {idx}: got {out[idx].item():.6g}, want {ref[idx].item():.6g}; "
        f"{int((diff > 0).sum())}/{diff.numel()} elements differ"
    )


def assert_close(
    out: torch.Tensor,
    truth: torch.Tensor,
    torch_lowprec: torch.Tensor | None = None,
    *,
    fp32_tol: float = FP32_REL_TOL,
    what: str = "",
) -> float:
    """Judge ``out`` against ``truth`` (float64 of the same inputs); returns the relative error.

    fp32: relative error below ``fp32_tol``. fp16/bf16: at most ``LOWPREC_FACTOR`` times the error that
    PyTorch's own low-precision result ``torch_lowprec`` makes against the same truth, plus a small eps.
    NaN never passes (and a NaN truth is a broken test).
    """
    assert not torch.isnan(truth).any(), f"{what}: the reference itself has NaN"
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(out).any(), f"{what}: {describe_diff(out, truth)}"
    err = rel_err(out, truth)
    if out.dtype == torch.float32 or torch_lowprec is None:
        assert err < fp32_tol, f"{what}: rel err {err:.3e} >= {fp32_tol:.1e}; {describe_diff(out, truth)}"
    else:
        base = rel_err(torch_lowprec, truth)
        bound = LOWPREC_FACTOR * base + LOWPREC_EPS[out.dtype]
        assert err <= bound, (
            f"{what}: rel err {err:.3e} > {LOWPREC_FACTOR} x PyTorch {out.dtype} error {base:.3e} + eps; "
            f"{describe_diff(out, truth)}"
        )
    return err


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Make ``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty`` return NaN-filled (float) or
    0xAAAAAAAA-filled (integer) tensors, so a kernel that leaves an element unwritten fails its test."""
    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64, torch.int16):
            t.fill_(POISON_INT)
        return t

    def empty(*args, **kwargs):
        return poison(originals[0](*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(originals[1](*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison(originals[2](self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals


def run_triton(name: str, *args, **kwargs):
    """Run op ``name`` with the triton backend forced, failing if the dispatcher would not pick Triton."""
    with ops.use_backend("triton"):
        backend, fn, why = ops.choose(name, *args, **kwargs)
        assert backend == "triton", f"{name} did not dispatch to triton: {why}"
        return fn(*args, **kwargs)
