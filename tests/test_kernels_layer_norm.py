"""Triton LayerNorm and residual + layer scale + LayerNorm vs the reference."""

from __future__ import annotations

import pytest
import torch

from videomt_fast import ops
from videomt_fast.ops import reference
from videomt_fast.testing.kernel_checks import assert_close, poisoned_empty, run_triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (rows, dim): token counts 1+4+15 and 7+1+4+15, batch 1 and 3, dims that are and are not powers of two
SHAPES = [(1, 20, 64), (3, 27, 64), (3, 27, 48), (1, 212, 384), (2, 13, 1000)]


def _params(dim, dtype, device):
    weight = (torch.randn(dim, device=device) * 0.5 + 1).to(dtype)
    bias = torch.randn(dim, device=device).to(dtype)
    scale = (torch.rand(dim, device=device) * 2 - 0.5).to(dtype)
    return weight, bias, scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm(device, dtype, shape):
    dt = DTYPES[dtype]
    x = (torch.randn(shape, device=device) * 3 + 2).to(dt)  # a mean far from 0 catches one-pass variance
    weight, bias, _ = _params(shape[-1], dt, device)
    with poisoned_empty():
        y = run_triton("layer_norm", x, weight, bias, 1e-6)
    truth = reference.layer_norm_ref(x.double(), weight.double(), bias.double(), 1e-6)
    assert y.dtype == dt
    assert_close(y, truth, reference.layer_norm_ref(x, weight, bias, 1e-6), what="layer_norm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_residual_layer_norm(device, dtype, shape):
    dt = DTYPES[dtype]
    x = (torch.randn(shape, device=device) * 3 + 2).to(dt)
    f = torch.randn(shape, device=device).to(dt)
    weight, bias, scale = _params(shape[-1], dt, device)
    x_before = x.clone()
    with poisoned_empty():
        x_new, y = run_triton("residual_layer_norm", x, f, scale, weight, bias, 1e-5)
    assert torch.equal(x, x_before), "the input x must not be modified"
    x_truth, y_truth = reference.residual_layer_norm_ref(
        x.double(), f.double(), scale.double(), weight.double(), bias.double(), 1e-5
    )
    x_low, y_low = reference.residual_layer_norm_ref(x, f, scale, weight, bias, 1e-5)
    assert x_new.dtype == dt and y.dtype == dt
    assert_close(x_new, x_truth, x_low, what="x + scale * f")
    assert_close(y, y_truth, y_low, what="LayerNorm")
    # y is the LayerNorm of the returned x (the two outputs agree with each other)
    assert_close(y, reference.layer_norm_ref(x_new.double(), weight.double(), bias.double(), 1e-5), y_low)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows(device):
    """A row-strided view (columns of a wider buffer) is read in place, without a copy."""
    buf = torch.randn(3, 27, 80, device=device)
    x = buf[..., :64]
    f = torch.randn(3, 27, 64, device=device)
    weight, bias, scale = _params(64, torch.float32, device)
    y = run_triton("layer_norm", x, weight, bias, 1e-6)
    assert_close(y, reference.layer_norm_ref(x.double(), weight.double(), bias.double(), 1e-6))
    x_new, y = run_triton("residual_layer_norm", x, f, scale, weight, bias, 1e-6)
    x_t, y_t = reference.residual_layer_norm_ref(x.double(), f.double(), scale.double(), weight.double(), bias.double(), 1e-6)
    assert_close(x_new, x_t)
    assert_close(y, y_t)


def test_guard_reasons():
    x = torch.randn(2, 5, 8)
    w, b = torch.randn(8), torch.randn(8)
    with ops.use_backend("triton"):
        assert ops.explain("layer_norm", x, w, b, 1e-6) == "layer_norm: triton (preconditions met)"
        for needle, args in {
            "last dim is not contiguous": (x.transpose(1, 2), torch.randn(5), torch.randn(5), 1e-6),
            "weight dtype": (x, w.half(), b, 1e-6),
            "bias shape": (x, w, torch.randn(9), 1e-6),
            "affine": (x, None, None, 1e-6),
            "dtype torch.float64": (x.double(), w.double(), b.double(), 1e-6),
            "evenly strided": (torch.randn(2, 9, 8)[:, :5], w, b, 1e-6),
        }.items():
            backend, _, why = ops.choose("layer_norm", *args)
            assert backend == "reference" and needle in why, (needle, why)
        for needle, args in {
            "f shape": (x, torch.randn(2, 5, 7), w, w, b, 1e-6),
            "scale shape": (x, x, torch.randn(3), w, b, 1e-6),
            "f dtype": (x, x.half(), w, w, b, 1e-6),
        }.items():
            backend, _, why = ops.choose("residual_layer_norm", *args)
            assert backend == "reference" and needle in why, (needle, why)


def test_no_32_bit_limit_on_elements_only_on_rows():
    """Row offsets are int64 in the kernel: over 2**31 elements the kernel is kept; the int32 row index
    is the bound (expanded views give the shapes without allocating them)."""
    from videomt_fast.kernels._common import INDEX_MARGIN

    d = 1024
    w, b = torch.randn(d), torch.randn(d)
    most = 2**31 - INDEX_MARGIN
    for rows, accepted in ((most, True), (most + 1, False)):
        x = torch.randn(1, d).expand(rows, d)
        with ops.use_backend("triton"):
            backend, _, why = ops.choose("layer_norm", x, w, b, 1e-6)
            assert (backend == "triton") == accepted, (rows, why)
            backend2, _, why2 = ops.choose("residual_layer_norm", x, x, w, w, b, 1e-6)
            assert backend2 == backend, why2
        if not accepted:
            assert f"{rows} rows" in why, why
