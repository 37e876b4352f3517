"""Triton flash attention vs the reference: fused-QKV strides, EoMT mask bits, awkward sizes."""

from __future__ import annotations

import pytest
import torch

from videomt_fast import ops
from videomt_fast.ops import reference
from videomt_fast.testing.kernel_checks import assert_close, poisoned_empty, run_triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LOWP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREFIX = 1 + 4  # cls + 4 registers


def _qkv(batch, seq, heads, head_dim, dtype, device, scale=1.0):
    return (torch.randn(batch, seq, 3 * heads * head_dim, device=device) * scale).to(dtype)


def _mask(kind, batch, queries, patches, device):
    if kind == "empty":
        allowed = torch.zeros(batch, queries, patches, dtype=torch.bool)
    elif kind == "full":
        allowed = torch.ones(batch, queries, patches, dtype=torch.bool)
    else:
        allowed = torch.rand(batch, queries, patches) > 0.6
        allowed[:, 0] = False  # a query that sees no patch at all
        if queries > 1:
            allowed[:, 1] = True
    return reference.pack_mask_bits(allowed).to(device)


def _check(qkv, heads, bits=None, queries=0, prefix=0, what=""):
    with poisoned_empty():
        out = run_triton("attention", qkv, heads, bits, queries, prefix)
    truth = reference.attention_ref(qkv.double(), heads, bits, queries, prefix)
    lowprec = reference.attention_ref(qkv, heads, bits, queries, prefix)
    assert out.dtype == qkv.dtype and out.shape == truth.shape
    # fp32 bound: the kernel's accumulation order differs from SDPA's; measured ~3e-7 on CPU.
    return assert_close(out, truth, lowprec, what=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(LOWP), ids=list(LOWP))
@pytest.mark.parametrize(
    "batch,grid,heads,head_dim",
    [(1, (3, 5), 2, 32), (3, (3, 5), 1, 64), (1, (5, 3), 4, 16), (3, (2, 7), 2, 48), (1, (3, 5), 1, 96), (1, (4, 5), 1, 128)],
)
def test_unmasked(device, dtype, batch, grid, heads, head_dim):
    seq = PREFIX + grid[0] * grid[1]
    _check(_qkv(batch, seq, heads, head_dim, LOWP[dtype], device), heads, what=f"N={seq}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(LOWP), ids=list(LOWP))
@pytest.mark.parametrize("kind", ["empty", "full", "random"])
@pytest.mark.parametrize("batch,queries,grid,heads,head_dim", [(1, 7, (3, 5), 2, 32), (3, 7, (5, 3), 1, 16)])
def test_masked_small(device, dtype, kind, batch, queries, grid, heads, head_dim):
    patches = grid[0] * grid[1]
    prefix = queries + PREFIX
    seq = prefix + patches
    bits = _mask(kind, batch, queries, patches, device)
    _check(_qkv(batch, seq, heads, head_dim, LOWP[dtype], device), heads, bits, queries, prefix, what=kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["empty", "random"])
def test_masked_200_queries_several_blocks(device, dtype, kind):
    """200 queries + 1 + 4 + a 3x5 grid: query rows span several row blocks, patches cross a column block."""
    batch, queries, heads, head_dim, patches = 1, 200, 1, 64, 15
    prefix = queries + PREFIX
    bits = _mask(kind, batch, queries, patches, device)
    _check(_qkv(batch, prefix + patches, heads, head_dim, LOWP[dtype], device), heads, bits, queries, prefix)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_patches_over_many_words(device):
    """A 9x11 grid (99 patches, 4 mask words) and a Q that does not fill a row block."""
    batch, queries, heads, head_dim, patches = 3, 5, 2, 32, 99
    prefix = queries + PREFIX
    bits = _mask("random", batch, queries, patches, device)
    _check(_qkv(batch, prefix + patches, heads, head_dim, torch.float32, device), heads, bits, queries, prefix)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_queries_is_zero(device):
    batch, heads, head_dim, patches = 2, 2, 16, 15
    bits = torch.zeros(batch, 0, 1, dtype=torch.int32, device=device)
    _check(_qkv(batch, PREFIX + patches, heads, head_dim, torch.float32, device), heads, bits, 0, PREFIX)


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_do_not_overflow(device):
    """Scores of several hundred: the online softmax must rescale, not overflow."""
    qkv = _qkv(1, 90, 2, 32, torch.float32, device, scale=8.0)
    _check(qkv, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_reads_a_strided_qkv_view(device):
    """qkv as a column slice of a wider tensor, and a batch-strided view: strides, not copies."""
    heads, head_dim, seq = 2, 32, 27
    wide = torch.randn(3, seq, 3 * heads * head_dim + 40, device=device)
    qkv = wide[:, :, 8 : 8 + 3 * heads * head_dim]
    assert not qkv.is_contiguous()
    _check(qkv, heads)
    _check(wide[::2, :, : 3 * heads * head_dim], heads)


@pytest.mark.parametrize("device", DEVICES)
def test_real_length_1805(device):
    """The real ViT-S query-layer length (200 + 1 + 4 + 1600), masked, one head (slow in the interpreter)."""
    if device == "cpu":
        pytest.skip("covered by the smaller cases on CPU; runs on the GPU")
    queries, patches, heads, head_dim = 200, 1600, 6, 64
    prefix = queries + PREFIX
    bits = _mask("random", 2, queries, patches, device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _check(_qkv(2, prefix + patches, heads, head_dim, dtype, device), heads, bits, queries, prefix)
        _check(_qkv(1, PREFIX + patches, heads, head_dim, dtype, device), heads)


def test_guard_reasons():
    qkv = torch.randn(1, 20, 3 * 2 * 32)
    with ops.use_backend("triton"):
        assert ops.explain("attention", qkv, 2) == "attention: triton (preconditions met)"
        bad = {
            "head_dim 24": (torch.randn(1, 20, 3 * 2 * 24), 2),
            "head_dim 256": (torch.randn(1, 20, 3 * 256), 1),
            "not 3 * num_heads": (torch.randn(1, 20, 100), 2),
            "dtype torch.float64": (qkv.double(), 2),
            "last dim is not contiguous": (qkv.transpose(1, 2).contiguous().transpose(1, 2), 2),
            "mask_bits shape": (qkv, 2, torch.zeros(1, 3, 2, dtype=torch.int32), 3, 8),
            "mask_bits dtype": (qkv, 2, torch.zeros(1, 3, 1, dtype=torch.int64), 3, 8),
            "num_queries": (qkv, 2, torch.zeros(1, 3, 1, dtype=torch.int32), 3, 2),
            "grid limit": (torch.empty(8193, 1, 3 * 8 * 16), 8),  # 65544 (batch, head) programs
        }
        for needle, args in bad.items():
            backend, fn, why = ops.choose("attention", *args)
            assert backend == "reference" and fn is reference.attention_ref, needle
            assert needle in why, (needle, why)
        # a rejected input still gets the right answer (from the reference)
        x = torch.randn(1, 20, 3 * 2 * 24)
        torch.testing.assert_close(ops.call("attention", x, 2), reference.attention_ref(x, 2))


def test_no_32_bit_limit_across_the_batch():
    """Batch offsets are int64 in the kernel, so a clip of frames over 2**31 elements keeps the kernel;
    offsets within one frame stay int32 and bound one batch entry (expanded views give the shapes
    without allocating them)."""
    from videomt_fast.kernels._common import INDEX_MARGIN

    heads, head_dim = 16, 64
    d = heads * head_dim
    seq = 1605
    frames = 2**31 // (seq * 3 * d) + 10  # ViT-L frames whose fused QKV passes 2**31 elements
    qkv = torch.randn(1, seq, 3 * d, dtype=torch.bfloat16).expand(frames, seq, 3 * d)
    assert qkv.numel() > 2**31 and qkv.stride(0) == 0
    with ops.use_backend("triton"):
        assert ops.explain("attention", qkv, heads) == "attention: triton (preconditions met)"
        # one batch entry at the int32 boundary: its output rows span seq * d elements
        most = (2**31 - INDEX_MARGIN) // d
        for rows, accepted in ((most, True), (most + 1, False)):
            one = torch.randn(1, 1, 3 * d, dtype=torch.bfloat16).expand(1, rows, 3 * d)
            backend, _, why = ops.choose("attention", one, heads)
            assert (backend == "triton") == accepted, (rows, why)
            if not accepted:
                assert "one batch entry" in why, why
