"""Query updater fused into the token buffer: rows [0, Q) written in place, the rest untouched."""

from __future__ import annotations

import pytest
import torch

from videomt_fast import ops
from videomt_fast.ops import reference
from videomt_fast.testing.kernel_checks import assert_close, run_triton

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _buffer(batch, seq, dim, dtype, device):
    """A NaN-poisoned token buffer whose rows past Q hold real tokens (which must survive)."""
    out = torch.full((batch, seq, dim), float("nan"), dtype=dtype, device=device)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("batch,queries,seq,dim", [(1, 7, 27, 64), (3, 7, 27, 48), (2, 200, 220, 32), (1, 0, 20, 64)])
def test_frame_zero_copies_the_table(device, dtype, batch, queries, seq, dim):
    dt = DTYPES[dtype]
    table = torch.randn(queries, dim, device=device).to(dt)
    out = _buffer(batch, seq, dim, dt, device)
    tokens = torch.randn(batch, seq - queries, dim, device=device).to(dt)
    out[:, queries:] = tokens
    result = run_triton("query_update", out, table)
    assert result is out
    assert torch.equal(out[:, :queries], table.expand(batch, queries, dim))
    assert torch.equal(out[:, queries:], tokens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("batch,queries,seq,dim", [(1, 7, 27, 64), (3, 7, 27, 48), (2, 200, 220, 32)])
def test_updater(device, dtype, batch, queries, seq, dim):
    dt = DTYPES[dtype]
    table = torch.randn(queries, dim, device=device).to(dt)
    prev_buffer = torch.randn(batch, seq, dim, device=device).to(dt)
    prev = prev_buffer[:, :queries]  # the previous frame's query rows, a strided slice as in the model
    weight = (torch.randn(dim, dim, device=device) / dim**0.5).to(dt)
    bias = torch.randn(dim, device=device).to(dt)
    out = _buffer(batch, seq, dim, dt, device)
    tokens = torch.randn(batch, seq - queries, dim, device=device).to(dt)
    out[:, queries:] = tokens
    result = run_triton("query_update", out, table, prev, weight, bias)
    assert result is out
    assert torch.equal(out[:, queries:], tokens), "rows past Q must be untouched"
    truth = reference.query_update_ref(out.double().clone(), table.double(), prev.double(), weight.double(), bias.double())
    lowprec = reference.query_update_ref(out.clone(), table, prev, weight, bias)
    assert_close(out[:, :queries], truth[:, :queries], lowprec[:, :queries], what="query rows")


@pytest.mark.parametrize("device", DEVICES)
def test_updater_without_bias(device):
    batch, queries, seq, dim = 2, 7, 27, 64
    table = torch.randn(queries, dim, device=device)
    prev = torch.randn(batch, queries, dim, device=device)
    weight = torch.randn(dim, dim, device=device) / 8
    out = _buffer(batch, seq, dim, torch.float32, device)
    run_triton("query_update", out, table, prev, weight, None)
    truth = reference.query_update_ref(torch.zeros(batch, seq, dim, dtype=torch.float64, device=device),
                                       table.double(), prev.double(), weight.double(), None)
    assert_close(out[:, :queries], truth[:, :queries])


def test_guard_reasons():
    out = torch.zeros(2, 27, 64)
    table, prev, weight, bias = torch.randn(7, 64), torch.randn(2, 7, 64), torch.randn(64, 64), torch.randn(64)
    with ops.use_backend("triton"):
        assert ops.explain("query_update", out, table, prev, weight, bias) == "query_update: triton (preconditions met)"
        for needle, args in {
            "shares storage": (out, table, out[:, :7], weight, bias),
            "table shape": (out, torch.randn(7, 32)),
            "table dtype": (out, table.half()),
            "weight is required": (out, table, prev, None, None),
            "prev must be": (out, table, torch.randn(2, 6, 64), weight, bias),
            "bias must be": (out, table, prev, weight, torch.randn(63)),
            "token buffer": (torch.zeros(27, 64), table),
        }.items():
            backend, _, why = ops.choose("query_update", *args)
            assert backend == "reference" and needle in why, (needle, why)


def test_no_32_bit_limit_on_the_token_buffer():
    """The token buffer of a clip may pass 2**31 elements: row offsets are int64 (expanded views)."""
    dim, seq, queries = 1024, 1805, 200
    frames = 2**31 // (seq * dim) + 10
    out = torch.randn(1, seq, dim).expand(frames, seq, dim)
    table = torch.randn(queries, dim)
    assert out.numel() > 2**31
    with ops.use_backend("triton"):
        assert ops.explain("query_update", out, table) == "query_update: triton (preconditions met)"
