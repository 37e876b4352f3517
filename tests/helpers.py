"""Shared builders for the CPU test suite: tiny random transformers models and their inputs."""

from __future__ import annotations

import torch

TINY = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_blocks=2,
    num_queries=7,
    image_size=48,
    num_labels=5,
)


def hf_videomt(**overrides):
    import transformers

    config = transformers.VideomtConfig(**{**TINY, **overrides})
    return transformers.VideomtForUniversalSegmentation(config).eval()


def hf_eomt(**overrides):
    import transformers

    config = transformers.EomtConfig(**{**TINY, **overrides})
    return transformers.EomtForUniversalSegmentation(config).eval()


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter fresh non-trivial values (layer scales, norms and registers included),
    so parity tests cannot pass on identity-like initialisations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if param.ndim <= 1 or "token" in name else 1.0 / max(param.shape[-1], 1) ** 0.5
            param.copy_(torch.randn(param.shape, generator=gen) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model


def video(batch=1, frames=2, height=48, width=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, height, width, generator=gen)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a.float() - b.float()).abs().max().item()
