"""The models under torch.compile: one graph (fullgraph=True), the same outputs as eager.

On a CPU the ``aot_eager`` backend checks what matters here (dynamo traces the whole forward through
the op dispatch, AOT autograd builds the graph) in seconds; inductor's CPU code generation would only
add minutes. On a GPU the fast path (bf16, Triton kernels) is compiled with inductor.
"""

import pytest
import torch

from videomt_fast import EomtForUniversalSegmentation, VideomtForUniversalSegmentation
from videomt_fast.model.configuration import EomtConfig, VideomtConfig

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_blocks=2, num_queries=8,
            num_labels=5, image_size=32)


def _fresh(family, **overrides):
    torch.manual_seed(0)
    if family == "videomt":
        return VideomtForUniversalSegmentation(VideomtConfig(**{**TINY, **overrides})).eval()
    return EomtForUniversalSegmentation(EomtConfig(**{**TINY, **overrides})).eval()


def _inputs(family, device="cpu", dtype=torch.float32):
    shape = (2, 3, 3, 32, 32) if family == "videomt" else (2, 3, 32, 32)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return {"pixel_values_videos": x} if family == "videomt" else {"pixel_values": x}


@pytest.mark.parametrize("family,probs", [("videomt", None), ("eomt", 1.0), ("eomt", 0.0)])
def test_fullgraph_compile_matches_eager(family, probs):
    model = _fresh(family)
    if probs is not None:  # through load_state_dict, as a checkpoint sets it
        state = model.state_dict()
        state["attn_mask_probs"] = torch.full_like(state["attn_mask_probs"], probs)
        model.load_state_dict(state)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    inputs = _inputs(family)
    with torch.no_grad():
        out = compiled(**inputs)  # compiled first: no eager call has read the mask probabilities yet
        ref = model(**inputs)
    for name in ("masks_queries_logits", "class_queries_logits"):
        assert torch.allclose(getattr(out, name), getattr(ref, name), atol=1e-5, rtol=0), name


@pytest.mark.parametrize("family", ["videomt", "eomt"])
def test_fullgraph_compile_through_the_triton_ops_and_a_resized_grid(family, monkeypatch):
    """The Triton ops' guards and the resized position table trace too (no address comparisons in the
    graph), and the compiled graph computes what the reference ops compute: it is judged against the
    reference backend, not against eager Triton (a bug shared by both Triton runs would cancel out).
    On a CPU the Triton kernels run in the interpreter when forced, as the conftest arranges; every
    kernel launch is counted so the graph provably ran them."""
    from triton.runtime.interpreter import InterpretedFunction

    from videomt_fast import ops
    from videomt_fast.testing.kernel_checks import rel_err

    if not ops.triton_interpreting():
        pytest.skip("CPU Triton needs the interpreter; the GPU test below compiles the fast path")
    launches = []
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    model = _fresh(family)
    x = torch.randn((1, 2, 3, 48, 32) if family == "videomt" else (2, 3, 48, 32),
                    generator=torch.Generator().manual_seed(2))
    inputs = {"pixel_values_videos": x} if family == "videomt" else {"pixel_values": x}
    with torch.no_grad():
        with ops.use_backend("reference"):
            ref = model(**inputs)
        assert not launches
        ops.preload_backends()  # the kernels import before tracing, as optimize() does
        with ops.use_backend("triton"):
            torch._dynamo.reset()
            out = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)
    assert {"_attention_kernel", "_layer_norm_kernel"} <= set(launches), sorted(set(launches))
    for name in ("masks_queries_logits", "class_queries_logits"):
        err = rel_err(getattr(out, name), getattr(ref, name))
        assert err < 1e-5, f"{name}: compiled Triton vs reference ops, relative error {err:.3g}"


def test_compiled_eomt_follows_loaded_mask_probs():
    """Masks on and off give different outputs; a compiled model sees the probabilities a load sets."""
    model = _fresh("eomt")
    inputs = _inputs("eomt")
    with torch.no_grad():
        on = model(**inputs).masks_queries_logits
        state = model.state_dict()
        state["attn_mask_probs"].zero_()
        model.load_state_dict(state)
        torch._dynamo.reset()
        off_compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs).masks_queries_logits
        off = model(**inputs).masks_queries_logits
    assert not torch.allclose(on, off, atol=1e-3)
    assert torch.allclose(off_compiled, off, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["videomt", "eomt"])
def test_inductor_compile_of_fast_path_on_gpu(family):
    model = _fresh(family).cuda()
    ref_inputs = _inputs(family, "cuda")
    from videomt_fast import ops

    with torch.no_grad():
        with ops.use_backend("reference"):  # the fp32 truth on the reference ops, not on the kernels under test
            ref = model(**ref_inputs).masks_queries_logits.float()
        model.optimize(dtype=torch.bfloat16)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(**_inputs(family, "cuda", torch.bfloat16)).masks_queries_logits
    err = (out.float() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and err < 2e-2, float(err)
