"""The whole lean model with every op on its Triton kernel vs the same model on the reference ops.

On CPU the kernels run in Triton's interpreter (forced with ``ops.use_backend("triton")``); the GPU
test runs them for real in bf16 against the fp32 reference.
"""

from __future__ import annotations

import collections

import pytest
import torch

from videomt_fast import EomtConfig, EomtForUniversalSegmentation, VideomtConfig, VideomtForUniversalSegmentation, ops

TINY = dict(
    hidden_size=64,
    num_attention_heads=2,  # head_dim 32
    num_hidden_layers=3,
    num_blocks=2,
    num_queries=7,
    image_size=(48, 80),  # a 3x5 patch grid: 1 + 4 + 15 tokens, + 7 queries
    num_labels=5,
)
FIELDS = ("class_queries_logits", "masks_queries_logits", "last_hidden_state")


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (layer scales, norms, query table, updater), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 0.5 if param.ndim <= 1 else param.shape[-1] ** -0.5
            offset = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")) else 0.0
            param.copy_(torch.randn(param.shape, generator=gen) * std + offset)
    return model


class _Recorder:
    """Counts which backend every ops.call picked."""

    def __init__(self, monkeypatch):
        self.picked = collections.Counter()
        real = ops.choose

        def choose(name, *args, **kwargs):
            backend, fn, why = real(name, *args, **kwargs)
            self.picked[(name, backend)] += 1
            return backend, fn, why

        monkeypatch.setattr(ops.registry, "choose", choose)

    def backends(self, name):
        return {b for (n, b) in self.picked if n == name}


def _run(model, inputs, backend):
    with torch.no_grad(), ops.use_backend(backend):
        return model(inputs)


def _compare(fast, ref, tol):
    for field in FIELDS:
        a, b = getattr(fast, field), getattr(ref, field)
        assert a.shape == b.shape, field
        assert torch.isfinite(a).all(), f"{field} has non-finite values"
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol, f"{field}: max abs error {err:.3g} > {tol}"


@pytest.mark.parametrize("batch,frames", [(1, 3), (2, 2)])
def test_videomt_triton_matches_reference(monkeypatch, batch, frames):
    model = _randomize(VideomtForUniversalSegmentation(VideomtConfig(**TINY)))
    video = torch.randn(batch, frames, 3, 48, 80)
    ref = _run(model, video, "reference")
    recorder = _Recorder(monkeypatch)
    fast = _run(model, video, "triton")
    for name in ("attention", "layer_norm", "residual_layer_norm", "linear_gelu", "linear_residual", "query_update"):
        assert recorder.backends(name) == {"triton"}, (name, dict(recorder.picked))
    _compare(fast, ref, 1e-3)


@pytest.mark.parametrize("batch", [1, 3])
def test_eomt_masked_attention_triton_matches_reference(monkeypatch, batch):
    model = _randomize(EomtForUniversalSegmentation(EomtConfig(**TINY)))
    assert bool((model.attn_mask_probs == 1).all()), "a fresh EoMT runs masked attention"
    images = torch.randn(batch, 3, 48, 80)
    ref = _run(model, images, "reference")
    recorder = _Recorder(monkeypatch)
    fast = _run(model, images, "triton")
    for name in ("attention", "mask_bits", "layer_norm", "residual_layer_norm", "linear_gelu", "query_update"):
        assert recorder.backends(name) == {"triton"}, (name, dict(recorder.picked))
    assert recorder.picked[("mask_bits", "triton")] == TINY["num_blocks"]
    _compare(fast, ref, 1e-3)


def _agreement(fast, ref):
    masks = ((fast.masks_queries_logits > 0) == (ref.masks_queries_logits > 0)).float().mean().item()
    classes = (fast.class_queries_logits.argmax(-1) == ref.class_queries_logits.argmax(-1)).float().mean().item()
    return masks, classes


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["videomt", "eomt"])
def test_bf16_on_gpu_agrees_with_fp32_reference(family, monkeypatch):
    config = dict(TINY, hidden_size=384, num_attention_heads=6, num_hidden_layers=4, num_queries=50, image_size=(224, 320))
    if family == "videomt":
        model = _randomize(VideomtForUniversalSegmentation(VideomtConfig(**config))).cuda()
        inputs = torch.randn(1, 3, 3, 224, 320, device="cuda")
    else:
        model = _randomize(EomtForUniversalSegmentation(EomtConfig(**config))).cuda()
        inputs = torch.randn(2, 3, 224, 320, device="cuda")
    ref = _run(model, inputs, "reference")
    model, inputs = model.to(torch.bfloat16), inputs.to(torch.bfloat16)
    torch_bf16 = _run(model, inputs, "reference")  # PyTorch's own bf16 error is the yardstick
    recorder = _Recorder(monkeypatch)
    fast = _run(model, inputs, "auto")
    assert recorder.backends("attention") == {"triton"}, dict(recorder.picked)
    masks, classes = _agreement(fast, ref)
    base_masks, base_classes = _agreement(torch_bf16, ref)  # about 0.994 / 0.99+ on these random models
    assert masks >= base_masks - 0.005, f"masks agree on {masks:.4%} (PyTorch bf16: {base_masks:.4%})"
    assert classes >= base_classes - 0.02, f"classes agree on {classes:.4%} (PyTorch bf16: {base_classes:.4%})"


@pytest.mark.gpu
def test_fp32_on_gpu_matches_reference():
    model = _randomize(EomtForUniversalSegmentation(EomtConfig(**TINY))).cuda()
    images = torch.randn(2, 3, 48, 80, device="cuda")
    _compare(_run(model, images, "triton"), _run(model, images, "reference"), 1e-3)
