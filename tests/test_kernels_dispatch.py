"""The triton backend as the dispatcher sees it: registration, explain, switches, torch.library, compile."""

from __future__ import annotations

import pytest
import torch

from videomt_fast import ops
from videomt_fast.ops import reference
from videomt_fast.testing.kernel_checks import run_triton

from helpers import load_bench

OPS = ("attention", "mask_bits", "layer_norm", "residual_layer_norm", "linear_gelu", "linear_residual", "query_update")


def _cases():
    """One valid argument tuple per op (for ops.call) and for its torch.library op."""
    qkv = torch.randn(1, 20, 3 * 2 * 16)
    bits = reference.pack_mask_bits(torch.rand(1, 3, 12) > 0.5)
    x, f = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w, b, s = torch.randn(16), torch.randn(16), torch.randn(16)
    fc, fb = torch.randn(8, 16), torch.randn(8)
    buf, table, prev, uw = torch.randn(2, 9, 16), torch.randn(3, 16), torch.randn(2, 3, 16), torch.randn(16, 16)
    return {
        "attention": ((qkv, 2, bits, 3, 8), (qkv, 2, bits, 3, 8)),
        "mask_bits": ((torch.randn(1, 3, 8, 8), (4, 4)), (torch.randn(1, 3, 8, 8), 4, 4)),
        "layer_norm": ((x, w, b, 1e-6), (x, w, b, 1e-6)),
        "residual_layer_norm": ((x, f, s, w, b, 1e-6), (x, f, s, w, b, 1e-6)),
        "linear_gelu": ((x, fc, fb), (x, fc, fb, True)),
        "linear_residual": ((x, fc, fb, fb, torch.randn(2, 5, 8)), (x, fc, fb, fb, torch.randn(2, 5, 8), False)),
        "query_update": ((buf, table, prev, uw, w), (buf, table, prev, uw, w)),
    }


def test_every_op_has_a_triton_impl():
    import videomt_fast.kernels  # noqa: F401

    report = ops.backend_report("cpu")
    for name in OPS:
        assert "triton" in report[name]["available"], name
    assert not ops.load_errors()


@pytest.mark.parametrize("name", OPS)
def test_forced_triton_is_explained(name):
    args, _ = _cases()[name]
    with ops.use_backend("triton"):
        assert ops.explain(name, *args) == f"{name}: triton (preconditions met)"


@pytest.mark.parametrize("name", OPS)
def test_cpu_auto_keeps_the_reference(name):
    args, _ = _cases()[name]
    with ops.use_backend("auto"):
        backend, fn, why = ops.choose(name, *args)
    assert backend == "reference" and fn is ops.registry._OPS[name].ref and "cpu" in why


@pytest.mark.parametrize("name", OPS)
def test_disable_switch(name, monkeypatch):
    args, _ = _cases()[name]
    monkeypatch.setenv("VIDEOMT_FAST_DISABLE", name)
    with ops.use_backend("triton"):
        backend, _, why = ops.choose(name, *args)
        assert backend == "reference" and f"VIDEOMT_FAST_DISABLE={name}" in why
    monkeypatch.setenv("VIDEOMT_FAST_DISABLE", "triton")
    with ops.use_backend("triton"):
        backend, _, why = ops.choose(name, *args)
        assert backend == "reference" and "triton: disabled" in why
    monkeypatch.setenv("VIDEOMT_FAST_DISABLE", "")
    with ops.use_backend("triton"):
        assert ops.choose(name, *args)[0] == "triton"


def test_disabled_kernel_is_not_launched(monkeypatch):
    """With the op disabled, the kernel module's launcher is never called."""
    from videomt_fast.kernels import layer_norm as kernel

    def boom(*args, **kwargs):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(kernel, "_launch", boom)
    x, w, b = torch.randn(2, 5, 16), torch.randn(16), torch.randn(16)
    with pytest.raises(AssertionError, match="kernel launched"):
        run_triton("layer_norm", x, w, b, 1e-6)
    monkeypatch.setenv("VIDEOMT_FAST_DISABLE", "layer_norm")
    with ops.use_backend("triton"):
        torch.testing.assert_close(ops.call("layer_norm", x, w, b, 1e-6), reference.layer_norm_ref(x, w, b, 1e-6))


@pytest.mark.parametrize("name", OPS)
def test_torch_library_registration(name):
    """Schema, fake (meta) implementation and AOT dispatch of every custom op."""
    import videomt_fast.kernels  # noqa: F401

    _, op_args = _cases()[name]
    torch.library.opcheck(getattr(torch.ops.videomt_fast, name).default, op_args)


def test_compiles_through_ops_call():
    """torch.compile traces ops.call down to the custom op (fullgraph: no graph break)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, w, b = torch.randn(2, 5, 16), torch.randn(16), torch.randn(16)
    f, s = torch.randn(2, 5, 16), torch.randn(16)

    def block(x, f):
        x, h = ops.call("residual_layer_norm", x, f, s, w, b, 1e-6)
        return ops.call("layer_norm", h, w, b, 1e-6) + x

    counter = CompileCounterWithBackend("aot_eager")
    with ops.use_backend("triton"):
        eager = block(x, f)  # loads the backend outside the traced region
        torch._dynamo.reset()
        compiled = torch.compile(block, backend=counter, fullgraph=True)(x, f)
    torch.testing.assert_close(compiled, eager)
    targets = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("videomt_fast.residual_layer_norm" in t for t in targets), targets
    assert any("videomt_fast.layer_norm" in t for t in targets), targets


def test_bench_kernels_cli(monkeypatch, tmp_path, capsys):
    """The benchmark parses its arguments, lists its cases, refuses to time without a GPU, and its whole
    measuring loop runs (here on CPU kernels in the interpreter, at toy sizes, with a one-shot timer)."""
    import json

    import triton.testing

    bench = load_bench("bench_kernels")

    args = bench.parse_args(["--ops", "attention,layer_norm", "--models", "s,B", "--seq", "1605,1805"])
    assert args.ops == ["attention", "layer_norm"] and args.models == ["S", "B"] and args.seq == [1605, 1805]
    assert [c["queries"] for c in bench.cases(args)][:2] == [0, 200]
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--ops", "softmax"])
    assert exit_info.value.code == 2 and "unknown op 'softmax'; choose from attention," in capsys.readouterr().err
    assert bench.main(["--list", "--models", "L"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(bench.OPS) * 2
    if not torch.cuda.is_available():
        assert bench.main(["--ops", "layer_norm"]) == 2

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "MODELS", {"T": (32, 2)})
    monkeypatch.setattr(bench, "environment", lambda: {"device": "cpu (interpreter)"})
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: (fn(), [1.0, 0.9, 1.1])[1])
    monkeypatch.setattr(bench, "NUM_QUERIES", 9)  # 9 query rows instead of 200: cheap in the interpreter
    args = bench.parse_args(["--models", "T", "--seq", "26,30", "--dtype", "fp32"])  # 30 = 9 + 5 + 4x4: masked
    with ops.use_backend("triton"):
        result = bench.run(args)
    path = bench.write(result, str(tmp_path / "out.json"))
    rows = json.load(open(path))["rows"]
    assert {r["op"] for r in rows} == set(bench.OPS)
    assert {r["queries"] for r in rows if r["op"] == "attention"} == {0, 9}, rows
    for row in rows:
        assert row["rel_err"] < 1e-5, row
