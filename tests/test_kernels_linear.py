"""GEMM epilogues (linear_gelu, linear_residual): the cuBLAS + Triton-pass and the Triton-GEMM paths."""

from __future__ import annotations

import pytest
import torch

from videomt_fast import ops
from videomt_fast.ops import reference
from videomt_fast.kernels import linear
from videomt_fast.testing.kernel_checks import assert_close, poisoned_empty, run_triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (leading shape, K, N): token counts 20 / 27 / 212, K and N that are and are not tile multiples
SHAPES = [((1, 20), 64, 256), ((3, 27), 256, 64), ((3, 27), 48, 40), ((1, 212), 96, 130), ((5,), 64, 64)]
IMPLS = ["cublas", "triton"]


def _inputs(lead, k, n, dtype, device, with_bias=True):
    x = torch.randn(*lead, k, device=device).to(dtype)
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    scale = (torch.rand(n, device=device) * 2 - 0.5).to(dtype)
    residual = torch.randn(*lead, n, device=device).to(dtype)
    return x, weight, bias, scale, residual


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_gelu(device, impl, dtype, shape):
    x, weight, bias, _, _ = _inputs(*shape, DTYPES[dtype], device)
    with poisoned_empty():
        out = torch.ops.videomt_fast.linear_gelu(x, weight, bias, impl == "triton")
    truth = reference.linear_gelu_ref(x.double(), weight.double(), bias.double())
    assert out.dtype == x.dtype
    assert_close(out, truth, reference.linear_gelu_ref(x, weight, bias), what=f"{impl} linear_gelu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_linear_residual(device, impl, dtype, shape):
    x, weight, bias, scale, residual = _inputs(*shape, DTYPES[dtype], device)
    residual_before = residual.clone()
    with poisoned_empty():
        out = torch.ops.videomt_fast.linear_residual(x, weight, bias, scale, residual, impl == "triton")
    assert torch.equal(residual, residual_before), "the residual must not be modified"
    truth = reference.linear_residual_ref(x.double(), weight.double(), bias.double(), scale.double(), residual.double())
    lowprec = reference.linear_residual_ref(x, weight, bias, scale, residual)
    assert_close(out, truth, lowprec, what=f"{impl} linear_residual")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("view", ["columns", "query_rows"])
def test_no_bias_and_strided_inputs(device, impl, view):
    """bias=None; x / residual as strided views: column slices of wider buffers, or the query rows
    ``buf[:, :Q]`` of a token buffer (batch stride != Q * row stride)."""
    if view == "columns":
        x = torch.randn(3, 27, 80, device=device)[..., :64]
        residual = torch.randn(3, 27, 60, device=device)[..., :48]
    else:
        x = torch.randn(3, 27, 64, device=device)[:, :7]
        residual = torch.randn(3, 27, 48, device=device)[:, :7]
    _, weight, _, scale, _ = _inputs((3, 27), 64, 48, torch.float32, device)
    with ops.use_backend("triton"):
        assert ops.choose("linear_residual", x, weight, None, scale, residual)[0] == "triton"
    with poisoned_empty():
        out = torch.ops.videomt_fast.linear_gelu(x, weight, None, impl == "triton")
    assert_close(out, reference.linear_gelu_ref(x.double(), weight.double(), None))
    with poisoned_empty():
        out = torch.ops.videomt_fast.linear_residual(x, weight, None, scale, residual, impl == "triton")
    assert_close(out, reference.linear_residual_ref(x.double(), weight.double(), None, scale.double(), residual.double()))


@pytest.mark.parametrize("device", DEVICES)
def test_registered_impl_dispatches(device):
    """What ops.call runs is the implementation VIDEOMT_FAST_GEMM picked (the default: cublas)."""
    x, weight, bias, scale, residual = _inputs((3, 27), 64, 48, torch.float32, device)
    with poisoned_empty():
        out = run_triton("linear_gelu", x, weight, bias)
    assert_close(out, reference.linear_gelu_ref(x.double(), weight.double(), bias.double()))
    with poisoned_empty():
        out = run_triton("linear_residual", x, weight, bias, scale, residual)
    assert_close(out, reference.linear_residual_ref(x.double(), weight.double(), bias.double(), scale.double(), residual.double()))


def test_gemm_switch(monkeypatch):
    import videomt_fast.kernels as kernels

    assert kernels.GEMM in linear.GEMM_CHOICES
    monkeypatch.delenv("VIDEOMT_FAST_GEMM", raising=False)
    assert linear.gemm_choice() == "cublas"
    monkeypatch.setenv("VIDEOMT_FAST_GEMM", "Triton")
    assert linear.gemm_choice() == "triton"
    monkeypatch.setenv("VIDEOMT_FAST_GEMM", "cutlass")
    with pytest.raises(ValueError, match="VIDEOMT_FAST_GEMM"):
        linear.gemm_choice()


def test_guard_reasons():
    x, weight, bias, scale, residual = _inputs((2, 5), 16, 8, torch.float32, "cpu")
    with ops.use_backend("triton"):
        assert ops.explain("linear_gelu", x, weight, bias) == "linear_gelu: triton (preconditions met)"
        for needle, args in {
            "weight shape": (x, torch.randn(8, 15), bias),
            "weight dtype": (x, weight.half(), bias),
            "bias must be": (x, weight, torch.randn(9)),
            "last dim is not contiguous": (torch.randn(16, 2, 5).permute(1, 2, 0), weight, bias),
            "evenly strided": (torch.randn(2, 3, 9, 16)[:, :, :5], weight, bias),
            "weight rows": (x, torch.randn(16, 8).t(), bias),
        }.items():
            backend, _, why = ops.choose("linear_gelu", *args)
            assert backend == "reference" and needle in why, (needle, why)
        for needle, args in {
            "residual shape": (x, weight, bias, scale, torch.randn(2, 5, 9)),
            "residual dtype": (x, weight, bias, scale, residual.half()),
            "scale must be": (x, weight, bias, torch.randn(3), residual),
        }.items():
            backend, _, why = ops.choose("linear_residual", *args)
            assert backend == "reference" and needle in why, (needle, why)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("dim", [384, 768, 1024])
def test_real_vit_shapes_on_gpu(impl, dtype, dim):
    """fc1 / fc2 of ViT-S/B/L on 1805 tokens: full tiles, many K steps."""
    x, weight, bias, _, _ = _inputs((1, 1805), dim, 4 * dim, DTYPES[dtype], "cuda")
    out = torch.ops.videomt_fast.linear_gelu(x, weight, bias, impl == "triton")
    truth = reference.linear_gelu_ref(x.double(), weight.double(), bias.double())
    assert_close(out, truth, reference.linear_gelu_ref(x, weight, bias), what="fc1")
    h, weight2, bias2, scale, residual = _inputs((1, 1805), 4 * dim, dim, DTYPES[dtype], "cuda")
    out = torch.ops.videomt_fast.linear_residual(h, weight2, bias2, scale, residual, impl == "triton")
    truth = reference.linear_residual_ref(*(t.double() for t in (h, weight2, bias2, scale, residual)))
    assert_close(out, truth, reference.linear_residual_ref(h, weight2, bias2, scale, residual), what="fc2")


def test_no_32_bit_limit_on_elements_only_on_rows():
    """Row offsets are int64 in both GEMM-epilogue kernels, so a clip whose activations pass 2**31
    elements (ViT-L fc1 output over ~326 frames at 640x640) keeps the kernel; only the int32 row index
    bounds the size. Expanded (stride-0) views give the shapes without allocating them."""
    from videomt_fast.kernels._common import INDEX_MARGIN

    k, n = 64, 32
    weight, bias, scale = torch.randn(n, k), torch.randn(n), torch.randn(n)
    most = 2**31 - INDEX_MARGIN
    for rows, accepted in ((most, True), (most + 1, False)):
        x = torch.randn(1, 1, k).expand(rows, 1, k)  # rows * k elements, far over 2**31
        residual = torch.randn(1, 1, n).expand(rows, 1, n)
        for name, args in (("linear_gelu", (x, weight, bias)), ("linear_residual", (x, weight, bias, scale, residual))):
            with ops.use_backend("triton"):
                backend, _, why = ops.choose(name, *args)
            assert (backend == "triton") == accepted, (name, rows, why)
            if not accepted:
                assert f"{rows} rows" in why, why
    # ViT-L at 640x640 (1 + 4 + 1600 tokens, fc1 to 4096 features) passes 2**31 elements from 327 frames
    assert 327 * 1605 * 4096 > 2**31 and 327 * 1605 <= most


# ------------------------------------------------------------------ the gated MLP (linear_gated)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("shape,bias", [(((1, 20), 64, 96), True), (((3, 27), 48, 40), False), (((1, 212), 96, 130), True)],
                         ids=str)
def test_linear_gated(device, impl, dtype, activation, shape, bias):
    """``act(gate) * up`` in one GEMM epilogue (triton) or after two cuBLAS GEMMs (cublas); rows, K and N
    that are not tile multiples, with and without biases, both activations."""
    lead, k, n = shape
    x, gate, gate_bias, _, _ = _inputs(lead, k, n, DTYPES[dtype], device, with_bias=bias)
    _, up, up_bias, _, _ = _inputs(lead, k, n, DTYPES[dtype], device, with_bias=bias)
    args = (x, gate, gate_bias, up, up_bias, activation)
    with poisoned_empty():
        out = torch.ops.videomt_fast.linear_gated(*args, impl == "triton")
    truth = reference.linear_gated_ref(*(_d(a) if isinstance(a, torch.Tensor) or a is None else a for a in args))
    assert out.dtype == x.dtype and out.shape == (*lead, n)
    assert_close(out, truth, reference.linear_gated_ref(*args), what=f"{impl} linear_gated {activation}")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_gated_dispatches(device):
    x, gate, gate_bias, _, _ = _inputs((3, 27), 64, 48, torch.float32, device)
    _, up, up_bias, _, _ = _inputs((3, 27), 64, 48, torch.float32, device)
    with poisoned_empty():
        out = run_triton("linear_gated", x, gate, gate_bias, up, up_bias, "silu")
    assert_close(out, reference.linear_gated_ref(x.double(), gate.double(), gate_bias.double(), up.double(),
                                                 up_bias.double(), "silu"))
    with ops.use_backend("triton"):
        for needle, args in {
            "activation 'relu'": (x, gate, gate_bias, up, up_bias, "relu"),
            "up weight": (x, gate, gate_bias, up[:40], up_bias[:40], "silu"),
            "both have a bias": (x, gate, gate_bias, up, None, "gelu"),
            "not contiguous": (x.transpose(0, 1), gate, gate_bias, up, up_bias, "gelu"),
        }.items():
            backend, _, why = ops.choose("linear_gated", *args)
            assert backend == "reference" and needle in why, (needle, why)
