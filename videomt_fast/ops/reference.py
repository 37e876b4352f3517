"""Plain-PyTorch references of every fused op: the ground truth, and the CPU path.

Each function here is declared as an op in :mod:`videomt_fast.ops`; fast implementations
(Triton in ``videomt_fast.kernels``, CUDA in ``videomt_fast._C``) must match them. Tests and
benchmarks import these same functions.

Layouts shared by all backends:

* ``qkv`` is the output of the fused QKV projection, ``(B, N, 3 * d)`` with the columns ordered
  ``[q (d) | k (d) | v (d)]`` and each of those split into ``num_heads`` heads of ``d / num_heads``.
* Token rows are ordered ``[queries (num_queries), cls, registers, patches]``; ``num_prefix`` counts
  the rows before the first patch (``num_queries + 1 + num_register_tokens``).
* ``mask_bits`` packs, per (batch, query), one bit per patch column: bit ``j % 32`` of int32 word
  ``j // 32`` is set when query row ``q`` may attend patch ``j``. Shape ``(B, num_queries, ceil(P / 32))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from videomt_fast.ops import registry as ops

# --------------------------------------------------------------------------------------------
# attention


def unpack_mask_bits(mask_bits: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``(B, Q, W)`` int32 words -> ``(B, Q, num_patches)`` bool."""
    shifts = torch.arange(32, device=mask_bits.device, dtype=torch.int32)
    bits = (mask_bits.unsqueeze(-1) >> shifts) & 1  # (B, Q, W, 32)
    return bits.flatten(-2)[..., :num_patches].bool()


def pack_mask_bits(allowed: torch.Tensor) -> torch.Tensor:
    """``(B, Q, P)`` bool -> ``(B, Q, ceil(P / 32))`` int32 words (inverse of :func:`unpack_mask_bits`)."""
    batch, queries, patches = allowed.shape
    words = (patches + 31) // 32
    padded = torch.zeros(batch, queries, words * 32, dtype=torch.int64, device=allowed.device)
    padded[..., :patches] = allowed.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=allowed.device) << torch.arange(
        32, dtype=torch.int64, device=allowed.device
    )
    packed = (padded.view(batch, queries, words, 32) * weights).sum(-1)
    # reinterpret the low 32 bits as a signed int32 word
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def attention_mask_from_bits(
    mask_bits: torch.Tensor, seq_len: int, num_queries: int, num_prefix: int
) -> torch.Tensor:
    """Boolean ``(B, 1, N, N)`` mask (True = may attend) equivalent to the packed bits."""
    batch = mask_bits.shape[0]
    allowed = torch.ones(batch, seq_len, seq_len, dtype=torch.bool, device=mask_bits.device)
    allowed[:, :num_queries, num_prefix:] = unpack_mask_bits(mask_bits, seq_len - num_prefix)
    return allowed[:, None]


def attention_ref(
    qkv: torch.Tensor,
    num_heads: int,
    mask_bits: torch.Tensor | None = None,
    num_queries: int = 0,
    num_prefix: int = 0,
) -> torch.Tensor:
    """Softmax attention over the fused QKV layout; ``(B, N, 3d) -> (B, N, d)``.

    With ``mask_bits``, query rows ``[0, num_queries)`` see patch column ``j`` (row ``num_prefix + j``)
    only where its bit is set; every other pair is unmasked. Rows never lose their non-patch columns,
    so no row is fully masked.
    """
    batch, seq_len, three_d = qkv.shape
    dim = three_d // 3
    head_dim = dim // num_heads
    q, k, v = qkv.view(batch, seq_len, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None
    if mask_bits is not None:
        mask = attention_mask_from_bits(mask_bits, seq_len, num_queries, num_prefix)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim**-0.5)
    return out.transpose(1, 2).reshape(batch, seq_len, dim)


def rotate_patch_rows(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DINOv3's rotary embedding on the fused QKV layout: a new ``(B, N, 3d)`` whose q and k of the last
    ``P = cos.shape[0]`` rows (the patch tokens) are ``x * cos + rotate_half(x) * sin`` per head (``cos`` /
    ``sin`` ``(P, head_dim)``, cast to the qkv dtype first, as transformers does); every other row (queries,
    cls, registers) and v unchanged. ``rotate_half(x) = [-x2, x1]`` for the halves ``[x1, x2]`` of a head."""
    batch, seq_len, three_d = qkv.shape
    dim = three_d // 3
    head_dim = dim // num_heads
    patches = cos.shape[0]
    out = qkv.clone()
    qk = out[:, seq_len - patches:, : 2 * dim].view(batch, patches, 2, num_heads, head_dim)
    cos = cos.to(qkv.dtype)[None, :, None, None, :]
    sin = sin.to(qkv.dtype)[None, :, None, None, :]
    half = head_dim // 2
    rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
    qk.copy_(qk * cos + rotated * sin)
    return out


def rope_attention_ref(
    qkv: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask_bits: torch.Tensor | None = None,
    num_queries: int = 0,
    num_prefix: int = 0,
) -> torch.Tensor:
    """:func:`attention_ref` after :func:`rotate_patch_rows` (DINOv3): the rotary embedding on the q and k of
    the last ``cos.shape[0]`` rows only; ``(B, N, 3d) -> (B, N, d)``."""
    return attention_ref(rotate_patch_rows(qkv, num_heads, cos, sin), num_heads, mask_bits, num_queries, num_prefix)


# --------------------------------------------------------------------------------------------
# EoMT mask bits


def mask_bits_ref(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, Q, h, w)`` mask logits -> packed bits of ``bilinear_resize(logits, grid) > 0``.

    The resize is ``F.interpolate(mode="bilinear", align_corners=False)``, as transformers' EoMT does.
    """
    resized = F.interpolate(mask_logits, size=tuple(grid), mode="bilinear", align_corners=False)
    return pack_mask_bits(resized.flatten(2) > 0)


# --------------------------------------------------------------------------------------------
# norms and epilogues


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def residual_layer_norm_ref(
    x: torch.Tensor,
    f: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = x + scale * f; y = LayerNorm(x)``; returns ``(x, y)``."""
    x = f * scale + x
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` with the exact erf GELU."""
    return F.gelu(F.linear(x, weight, bias))


ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}  # exact-erf GELU and SiLU, by config name


def linear_gated_ref(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """The gated MLP's first half: ``act(x @ gate_weight.T + gate_bias) * (x @ up_weight.T + up_bias)``
    (``activation``: ``"silu"``, DINOv2's SwiGLU, or ``"gelu"``)."""
    return ACTIVATIONS[activation](F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)


def linear_residual_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """``residual + scale * (x @ weight.T + bias)``."""
    return F.linear(x, weight, bias) * scale + residual


def query_update_ref(
    out: torch.Tensor,
    table: torch.Tensor,
    prev: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the next frame's queries into rows ``[0, Q)`` of the token buffer ``out`` and return it.

    ``out[:, :Q] = prev @ weight.T + bias + table`` (or ``table`` when ``prev`` is None, frame 0).
    """
    num_queries = table.shape[0]
    if prev is None:
        out[:, :num_queries] = table
    else:
        out[:, :num_queries] = F.linear(prev, weight, bias) + table
    return out


ops.define_op("attention", attention_ref, "softmax attention on the fused QKV layout (EoMT mask bits optional)")
ops.define_op("rope_attention", rope_attention_ref,
              "attention with DINOv3's rotary embedding on the patch rows' q and k (EoMT mask bits optional)")
ops.define_op("linear_gated", linear_gated_ref, "gated MLP's first half: act(gate projection) * up projection")
ops.define_op("mask_bits", mask_bits_ref, "bilinear resize of mask logits to the patch grid, > 0, packed to bits")
ops.define_op("layer_norm", layer_norm_ref, "LayerNorm over the last dimension")
ops.define_op("residual_layer_norm", residual_layer_norm_ref, "x += scale * f, then LayerNorm(x)")
ops.define_op("linear_gelu", linear_gelu_ref, "Linear + bias + exact GELU (fc1 epilogue)")
ops.define_op("linear_residual", linear_residual_ref, "Linear + bias + layer scale + residual (out-proj / fc2)")
ops.define_op("query_update", query_update_ref, "query_updater(prev) + query table into the token buffer rows")

ops.register_backend_module("triton", "videomt_fast.kernels")


# --------------------------------------------------------------------------------------------
# library baselines that execution plans also try on CUDA: the reference with one SDPA backend


def _sdpa_with(ref, backend_name: str):
    def attention_sdpa(*args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return ref(*args, **kwargs)

    attention_sdpa.__name__ = f"{ref.__name__[:-4]}_sdpa_{backend_name.lower()}"
    attention_sdpa.__doc__ = f":func:`{ref.__name__}` with SDPA restricted to its {backend_name} backend."
    return attention_sdpa


for _op, _ref in (("attention", attention_ref), ("rope_attention", rope_attention_ref)):
    for _label, _backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                             ("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-math", "MATH")):
        ops.register_candidate(_op, _label, _sdpa_with(_ref, _backend))

__all__ = [
    "attention_ref",
    "rope_attention_ref",
    "rotate_patch_rows",
    "linear_gated_ref",
    "mask_bits_ref",
    "layer_norm_ref",
    "residual_layer_norm_ref",
    "linear_gelu_ref",
    "linear_residual_ref",
    "query_update_ref",
    "pack_mask_bits",
    "unpack_mask_bits",
    "attention_mask_from_bits",
]
