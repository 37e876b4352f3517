"""Triton mask-bit builder vs F.interpolate(bilinear, align_corners=False) > 0, packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from videomt_fast import ops
from videomt_fast.ops import reference
from videomt_fast.testing.kernel_checks import poisoned_empty, run_triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NEAR_ZERO = 1e-5  # a bit may differ only where the resized logit is this close to 0


def _check(logits, grid):
    with poisoned_empty():
        got = run_triton("mask_bits", logits, grid)
    want = reference.mask_bits_ref(logits, grid)
    assert got.dtype == torch.int32 and got.shape == want.shape, (got.shape, want.shape)
    patches = grid[0] * grid[1]
    # bits past the last patch must be zero, as the reference packs them
    valid = reference.pack_mask_bits(torch.ones(*want.shape[:2], patches, dtype=torch.bool, device=want.device))
    assert torch.equal(got & ~valid, torch.zeros_like(got)), "padding bits set"
    diff = reference.unpack_mask_bits(got, patches) != reference.unpack_mask_bits(want, patches)
    if diff.any():
        resized = F.interpolate(logits.float(), size=grid, mode="bilinear", align_corners=False).flatten(2)
        worst = resized[diff].abs().max().item()
        assert worst < NEAR_ZERO, f"{int(diff.sum())} bits differ, one where the resized logit is {worst:.3e}"
    return int(diff.sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize(
    "batch,queries,size,grid",
    [
        (1, 7, (12, 20), (3, 5)),  # EoMT: logits at 4x the grid
        (3, 7, (20, 12), (5, 3)),
        (3, 5, (13, 7), (6, 9)),  # upsampling, odd sizes
        (2, 3, (40, 40), (10, 10)),
        (1, 2, (5, 3), (17, 11)),  # 187 patches: 6 words, a partial last word
        (1, 1, (16, 32), (4, 8)),  # exactly one word
        (2, 4, (9, 10), (3, 11)),  # 33 patches: one bit in the second word
    ],
)
def test_matches_interpolate(device, dtype, batch, queries, size, grid):
    logits = torch.randn(batch, queries, *size, device=device).to(DTYPES[dtype])
    assert _check(logits, grid) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_strided_logits_and_all_signs(device):
    base = torch.randn(2, 3, 20, 12, device=device)
    _check(base.transpose(2, 3), (5, 3))  # non-contiguous h/w
    _check(base[:, ::2], (4, 4))  # strided queries
    _check(torch.full((1, 2, 8, 8), 1.0, device=device), (4, 4))  # every bit set
    _check(torch.full((1, 2, 8, 8), -1.0, device=device), (3, 3))  # none set


@pytest.mark.parametrize("device", DEVICES)
def test_real_size(device):
    """640x640 EoMT: 200 queries, 160x160 logits -> 40x40 grid (50 words)."""
    if device == "cpu":
        pytest.skip("large for the interpreter; the small cases cover the indexing")
    logits = torch.randn(2, 200, 160, 160, device=device)
    assert _check(logits, (40, 40)) == 0


def test_zero_queries():
    logits = torch.randn(2, 0, 12, 20)
    got = run_triton("mask_bits", logits, (3, 5))
    assert got.shape == (2, 0, 1)


def test_guard_reasons():
    with ops.use_backend("triton"):
        assert ops.explain("mask_bits", torch.randn(1, 2, 8, 8), (4, 4)).startswith("mask_bits: triton")
        for needle, args in {
            "(B, Q, h, w)": (torch.randn(2, 8, 8), (4, 4)),
            "dtype torch.int64": (torch.zeros(1, 2, 8, 8, dtype=torch.int64), (4, 4)),
            "positive": (torch.randn(1, 2, 8, 8), (0, 4)),
            "pair": (torch.randn(1, 2, 8, 8), 4),
        }.items():
            backend, _, why = ops.choose("mask_bits", *args)
            assert backend == "reference" and needle in why, (needle, why)


def test_no_32_bit_limit_across_masks():
    """(batch, query) offsets are int64 in the kernel: many masks over 2**31 elements in all keep the
    kernel; one mask map and the bit index of one grid stay int32 (expanded views, nothing allocated)."""
    from videomt_fast.kernels._common import INDEX_MARGIN

    logits = torch.randn(1, 1, 160, 160).expand(500, 200, 160, 160)
    assert logits.numel() > 2**31
    with ops.use_backend("triton"):
        assert ops.explain("mask_bits", logits, (40, 40)) == "mask_bits: triton (preconditions met)"
        most = 2**31 - INDEX_MARGIN - 31  # the grid's bits, rounded up to whole words, index in int32
        for width, accepted in ((most, True), (most + 1, False)):
            backend, _, why = ops.choose("mask_bits", logits[:1, :1], (1, width))
            assert (backend == "triton") == accepted, (width, why)
