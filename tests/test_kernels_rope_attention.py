"""Triton attention with DINOv3's rotary embedding in its Q/K load, against the reference (rotate, then
attention): awkward sizes (token counts not multiples of the blocks, head dims 16..128 incl. 48 and 96),
the query / cls / register rows left unrotated, plain and EoMT-masked, real rotary tables."""

from __future__ import annotations

import pytest
import torch

from videomt_fast import ops
from videomt_fast.model.modeling import RotaryTable
from videomt_fast.model.configuration import EomtDinov3Config
from videomt_fast.ops import reference
from videomt_fast.testing.kernel_checks import assert_close, poisoned_empty, run_triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LOWP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tables(grid, heads, head_dim, device):
    """The model's own rotary tables for a grid (fp32, what the model passes the op)."""
    config = EomtDinov3Config(hidden_size=heads * head_dim, num_attention_heads=heads)
    return RotaryTable(config).tables(grid, torch.device(device))


def _check(qkv, heads, cos, sin, bits=None, queries=0, prefix=0, what=""):
    with poisoned_empty():
        out = run_triton("rope_attention", qkv, heads, cos, sin, bits, queries, prefix)
    truth = reference.rope_attention_ref(qkv.double(), heads, cos.double(), sin.double(), bits, queries, prefix)
    lowprec = reference.rope_attention_ref(qkv, heads, cos, sin, bits, queries, prefix)
    assert out.dtype == qkv.dtype and out.shape == truth.shape
    return assert_close(out, truth, lowprec, what=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(LOWP), ids=list(LOWP))
@pytest.mark.parametrize(
    "batch,prefix,grid,heads,head_dim",
    [(1, 5, (3, 5), 2, 32), (3, 1, (5, 3), 1, 64), (2, 5, (7, 9), 4, 16), (1, 0, (4, 5), 1, 48), (1, 3, (3, 4), 1, 96),
     (2, 5, (2, 7), 1, 128)],
)
def test_unmasked(device, dtype, batch, prefix, grid, heads, head_dim):
    patches = grid[0] * grid[1]
    qkv = torch.randn(batch, prefix + patches, 3 * heads * head_dim, device=device).to(LOWP[dtype])
    cos, sin = _tables(grid, heads, head_dim, device)
    _check(qkv, heads, cos, sin, what=f"N={prefix + patches}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["empty", "random"])
@pytest.mark.parametrize("batch,queries,grid,heads,head_dim", [(1, 7, (3, 5), 2, 32), (2, 70, (5, 7), 1, 64)])
def test_masked(device, dtype, kind, batch, queries, grid, heads, head_dim):
    """EoMT-DINOv3's masked query layers: queries, cls and registers unrotated, patches rotated and masked."""
    patches = grid[0] * grid[1]
    prefix = queries + 1 + 4
    allowed = torch.rand(batch, queries, patches) > 0.6 if kind == "random" else torch.zeros(batch, queries, patches,
                                                                                            dtype=torch.bool)
    bits = reference.pack_mask_bits(allowed).to(device)
    qkv = torch.randn(batch, prefix + patches, 3 * heads * head_dim, device=device).to(LOWP[dtype])
    cos, sin = _tables(grid, heads, head_dim, device)
    _check(qkv, heads, cos, sin, bits, queries, prefix, what=kind)


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_rows_are_not_rotated(device):
    """Rows before the patches come out as plain attention over rotated keys: equal to the reference, and
    different from rotating every row (so the kernel does not rotate them)."""
    heads, head_dim, grid, prefix = 2, 32, (3, 5), 12
    qkv = torch.randn(1, prefix + 15, 3 * heads * head_dim, device=device)
    cos, sin = _tables(grid, heads, head_dim, device)
    with poisoned_empty():
        out = run_triton("rope_attention", qkv, heads, cos, sin)
    all_rows = reference.rope_attention_ref(qkv.double(), heads, *(torch.cat([t[:1].expand(prefix, -1), t]).double()
                                                                   for t in (cos, sin)))
    assert (out[:, :prefix].double() - all_rows[:, :prefix]).abs().max() > 1e-3
    assert_close(out, reference.rope_attention_ref(qkv.double(), heads, cos.double(), sin.double()))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_qkv(device):
    heads, head_dim, grid = 2, 32, (3, 5)
    wide = torch.randn(2, 5 + 15, 3 * heads * head_dim + 24, device=device)
    qkv = wide[:, :, 8:8 + 3 * heads * head_dim]
    cos, sin = _tables(grid, heads, head_dim, device)
    _check(qkv, heads, cos, sin)


def test_guard_reasons():
    qkv = torch.randn(1, 20, 3 * 2 * 32)
    cos, sin = _tables((3, 5), 2, 32, "cpu")
    with ops.use_backend("triton"):
        assert ops.explain("rope_attention", qkv, 2, cos, sin) == "rope_attention: triton (preconditions met)"
        bits = torch.zeros(1, 3, 1, dtype=torch.int32)
        for needle, args in {
            "head_dim 24": (torch.randn(1, 20, 3 * 2 * 24), 2, cos[:, :24], sin[:, :24]),
            "(patches, head_dim=32)": (qkv, 2, cos[:, :16], sin[:, :16]),
            "dtype torch.float16": (qkv, 2, cos.half(), sin),
            "must match": (qkv, 2, cos, sin[:4]),
            "not the masked patch columns": (qkv, 2, cos, sin, bits, 3, 4),
        }.items():
            backend, fn, why = ops.choose("rope_attention", *args)
            assert backend == "reference" and fn is reference.rope_attention_ref and needle in why, (needle, why)
