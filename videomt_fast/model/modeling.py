"""The lean VidEoMT / EoMT models: transformers' math, expressed through :mod:`videomt_fast.ops`.

Parameter names follow transformers' so checkpoints map one to one, except that each attention
keeps its Q, K and V projections as one fused ``qkv`` Linear (``3d x d``, rows ``[q | k | v]``),
filled from ``q_proj`` / ``k_proj`` / ``v_proj`` at load time.

The model code never sees a backend: every module that runs fused ops calls them through its ``impl``
table (:class:`videomt_fast.ops.OpTable`): per-call dispatch by default, the implementations an
execution plan chose after :meth:`optimize`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from videomt_fast import ops
from videomt_fast.ops import reference as _reference  # noqa: F401  (declares the ops)
from videomt_fast.model.configuration import EomtConfig, EomtDinov3Config, VideomtConfig, _SegmenterConfig

# --------------------------------------------------------------------------------------------
# outputs


def _flatten_output(output: "_Output") -> tuple[list[Any], list[str]]:
    return list(output.values()), list(output.keys())


def _flatten_output_with_keys(output: "_Output") -> tuple[list[tuple[Any, Any]], list[str]]:
    return [(pytree.MappingKey(k), v) for k, v in output.items()], list(output.keys())


class _Output(OrderedDict):
    """transformers' ``ModelOutput`` behaviour without transformers: a dataclass that is also an ordered
    dict of its non-None fields. ``out.x``, ``out["x"]``, ``out[0]``, ``out["x"] = v`` (item assignment
    sets the attribute too), ``to_tuple()``; each subclass is a registered pytree node (so
    ``torch.export`` and ``torch.utils._pytree`` flatten it), and instances pickle."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls not in pytree.SUPPORTED_NODES:
            pytree.register_pytree_node(
                cls,
                _flatten_output,
                lambda values, keys, _cls=cls: _cls(**dict(zip(keys, values))),
                serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
                flatten_with_keys_fn=_flatten_output_with_keys,
            )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = self.__dict__.get(f.name)
            if value is not None:
                super().__setitem__(f.name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if value is not None and name in self.__dataclass_fields__:  # a field: also an item
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __delitem__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support item deletion")

    def setdefault(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support setdefault")

    def pop(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support pop")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support update")

    def __reduce__(self):
        cls = getattr(type(self), "_plain_class", type(self))  # a transformers twin pickles as our class
        return cls, tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self) -> tuple:
        """The non-None fields, in field order (what ``return_dict=False`` returns)."""
        return tuple(self[k] for k in self.keys())


_TRANSFORMERS_TWINS: dict[type, type] = {}


def as_transformers_output(output: _Output) -> _Output:
    """``output``, also an instance of transformers' ``ModelOutput`` when transformers is already imported
    (never imported here): its pipelines and helpers test ``isinstance(x, ModelOutput)`` and turn anything
    else into a plain dict. The object changes class in place to a subclass of both; behaviour is ours."""
    generic = sys.modules.get("transformers.utils.generic")
    base = getattr(generic, "ModelOutput", None)
    if base is None or isinstance(output, base) or torch.compiler.is_compiling():
        return output
    cls = type(output)
    twin = _TRANSFORMERS_TWINS.get(cls)
    if twin is None:
        namespace = {"__module__": f"{cls.__module__}.transformers_twin", "__qualname__": cls.__qualname__,
                     "_plain_class": cls}
        twin = _TRANSFORMERS_TWINS[cls] = type(base)(cls.__name__, (cls, base), namespace)
    output.__class__ = twin
    return output


@dataclass
class VideomtForUniversalSegmentationOutput(_Output):
    """transformers' output fields. Rows are frame-major: row ``t * batch_size + b``."""

    loss: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None  # (T*B, Q, num_labels + 1)
    masks_queries_logits: torch.Tensor | None = None  # (T*B, Q, H/4, W/4)
    last_hidden_state: torch.Tensor | None = None  # (T*B, Q + 1 + R + P, d), after the final LayerNorm
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class EomtForUniversalSegmentationOutput(_Output):
    loss: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None  # (B, Q, num_labels + 1)
    masks_queries_logits: torch.Tensor | None = None  # (B, Q, H/4, W/4)
    last_hidden_state: torch.Tensor | None = None  # (B, Q + 1 + R + P, d)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    patch_offsets: list[torch.Tensor] | None = None


# --------------------------------------------------------------------------------------------
# the runtime

# The model imports nothing of the runtime (videomt_fast.runtime: plans, CUDA graphs, sessions). The
# runtime registers itself here when it is imported, which importing videomt_fast always does; the
# convenience methods optimize(), new_session() and new_predictor() hand the model to it.
_RUNTIME: list[Any] = []


def register_runtime(api: Any) -> None:
    """Called by :mod:`videomt_fast.runtime`: an object with ``optimize``, ``new_session``, ``new_predictor``."""
    _RUNTIME[:] = [api]


def runtime() -> Any:
    if not _RUNTIME:
        raise RuntimeError("videomt_fast.runtime is not loaded; import videomt_fast (not only videomt_fast.model)")
    return _RUNTIME[0]


# --------------------------------------------------------------------------------------------
# input checks


def check_frames(
    value: Any, name: str, rank: int, config: _SegmenterConfig, layout: str, check_finite: bool = True
) -> torch.Tensor:
    """Validate a pixel tensor and raise an error that names ``name`` and what was expected."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.ndim != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} has dtype {value.dtype}; expected a floating dtype holding normalized pixels "
            "(rescale to [0, 1] and normalize with ImageNet mean/std, e.g. with VideomtVideoProcessor)"
        )
    channels, height, width = value.shape[-3:]
    if any(s == 0 for s in value.shape[:-3]):
        raise ValueError(f"{name} is empty: shape {tuple(value.shape)} {layout}; expected at least one frame")
    if channels != config.num_channels:
        raise ValueError(
            f"{name} has {channels} channels (dim {rank - 3} of shape {tuple(value.shape)}); "
            f"expected {config.num_channels}"
        )
    ph, pw = config.patch_hw
    if height == 0 or width == 0 or height % ph or width % pw:
        raise ValueError(
            f"{name} has frames of {height}x{width}; height and width must be positive multiples of the "
            f"patch size {ph}x{pw} (e.g. {max(ph, height // ph * ph)}x{max(pw, width // pw * pw)})"
        )
    if check_finite and not torch.compiler.is_compiling():
        # one reduction and one sync; the exact count only when something is wrong. A compiled graph
        # cannot branch on data without a graph break, so under torch.compile the scan is left out.
        total = value.sum(dtype=torch.float32)
        if not bool(torch.isfinite(total)):
            nan = int(torch.isnan(value).sum())
            inf = int(torch.isinf(value).sum())
            if nan or inf:
                raise ValueError(f"{name} contains {nan} NaN and {inf} infinite values; expected finite pixels")
            raise ValueError(f"{name} holds values so large that their sum overflows; expected normalized pixels")
    return value


# --------------------------------------------------------------------------------------------
# modules


class PatchEmbeddings(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_hw, stride=config.patch_hw
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class Embeddings(nn.Module):
    """``[cls, registers..., patches + position embeddings]``; position embeddings are resized for
    grids other than the config's, bicubically with antialiasing as timm's DINOv2 does."""

    def __init__(self, config: _SegmenterConfig, with_mask_token: bool):
        super().__init__()
        d = config.hidden_size
        self.grid_size = config.grid_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, d))
        if with_mask_token:
            # transformers' VidEoMT carries it for masked-image training; inference never reads it
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embeddings = PatchEmbeddings(config)
        self.position_embeddings = nn.Embedding(self.grid_size[0] * self.grid_size[1], d)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(gh * gw, d)`` position embeddings for a patch grid."""
        weight = self.position_embeddings.weight
        if tuple(grid) == tuple(self.grid_size):
            return weight
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # part of the graph: no address cache
            return self._resized(weight, grid)
        key = (tuple(grid), weight.data_ptr(), 0 if weight.is_inference() else weight._version, weight.dtype,
               weight.device)
        cached = self._pos_cache.get(key)
        if cached is None:
            cached = self._resized(weight, grid)
            # one grid at a time keeps memory flat; a CUDA graph that read an evicted table holds its own
            # reference to it (videomt_fast.runtime.fast), so its memory is never reused under the graph
            self._pos_cache = {key: cached}
        return cached

    def _resized(self, weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        gh0, gw0 = self.grid_size
        table = weight.detach().float().reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(weight.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch = pixel_values.shape[0]
        grid = (pixel_values.shape[-2] // self.patch_embeddings.projection.stride[0],
                pixel_values.shape[-1] // self.patch_embeddings.projection.stride[1])
        patches = self.patch_embeddings(pixel_values) + self.position_embedding(grid)
        return torch.cat(
            [self.cls_token.expand(batch, -1, -1), self.register_tokens.expand(batch, -1, -1), patches], dim=1
        )


class Dinov3Embeddings(nn.Module):
    """DINOv3's ``[cls, registers..., patches]``: no position table (the rotary embedding in every layer's
    attention carries the positions); the patch convolution is ``patch_embeddings`` itself, as in
    transformers' ``EomtDinov3Embeddings``."""

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        d = config.hidden_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, d))
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_hw, stride=config.patch_hw
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch = pixel_values.shape[0]
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.weight.dtype)).flatten(2).transpose(1, 2)
        return torch.cat(
            [self.cls_token.expand(batch, -1, -1), self.register_tokens.expand(batch, -1, -1), patches], dim=1
        )


class RotaryTable(nn.Module):
    """DINOv3's axial rotary embedding: ``(cos, sin)``, each ``(gh * gw, head_dim)`` float32, for a patch grid.

    Patch centres at ``((i + 0.5) / gh, (j + 0.5) / gw)`` mapped to ``[-1, 1]``; per axis ``head_dim / 4``
    frequencies ``theta ** -(4k / head_dim)``; angles ``2 pi * coordinate * frequency`` for (y, x), flattened
    and tiled twice, as transformers' ``EomtDinov3RotaryEmbedding`` computes them (float32, eval mode: no
    shift, jitter or rescale). No parameters or buffers; one grid's tables are cached per device."""

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            # part of the graph: no cache, and the grid's sides as traced (an exported graph with a dynamic
            # frame size computes the tables from it)
            return self._compute(grid[0], grid[1], device)
        gh, gw = int(grid[0]), int(grid[1])
        key = (gh, gw, device)
        cached = self._cache.get(key)
        if cached is None:
            # one grid at a time keeps memory flat; a CUDA graph that read evicted tables holds its own
            # reference to them (videomt_fast.runtime.fast), so their memory is never reused under the graph
            with torch.inference_mode(False):
                cached = self._compute(gh, gw, device)
            self._cache = {key: cached}
        return cached

    def _compute(self, gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = (1 / self.theta ** torch.arange(0, 1, 4 / self.head_dim, dtype=torch.float32)).to(device)
        # i + 0.5 (exact in float32): arange(0.5, n) would need ceil(n - 0.5), which a symbolic n cannot give
        ys = (torch.arange(gh, dtype=torch.float32, device=device) + 0.5) / gh
        xs = (torch.arange(gw, dtype=torch.float32, device=device) + 0.5) / gw
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
        angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)
        return torch.cos(angles), torch.sin(angles)


class Attention(nn.Module):
    """Fused QKV (rows ``[q | k | v]``) and the output projection. DINOv3 may leave out q/k/v biases (its
    key projection has none): the fused bias then holds zeros there (``qkv_biases`` says which are real),
    and its output projection is transformers' ``o_proj`` (DINOv2: ``out_proj``; :attr:`output` is either)."""

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        if config.backbone_family == "dinov3":
            self.qkv_biases = (config.query_bias, config.key_bias, config.value_bias)
            self.qkv = nn.Linear(d, 3 * d, bias=any(self.qkv_biases))
            if self.qkv.bias is not None:
                with torch.no_grad():
                    for part, real in enumerate(self.qkv_biases):
                        if not real:
                            self.qkv.bias[part * d:(part + 1) * d] = 0
            self.o_proj = nn.Linear(d, d, bias=config.proj_bias)
        else:
            self.qkv_biases = (True, True, True)
            self.qkv = nn.Linear(d, 3 * d)
            self.out_proj = nn.Linear(d, d)
        self._output_name = "o_proj" if config.backbone_family == "dinov3" else "out_proj"

    @property
    def output(self) -> nn.Linear:
        """The output projection (``out_proj``, DINOv3's ``o_proj``)."""
        return getattr(self, self._output_name)


class LayerScale(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))


def linear_act(impl: ops.OpTable, x: torch.Tensor, linear: nn.Linear, activation: str) -> torch.Tensor:
    """``act(linear(x))``: the fused ``linear_gelu`` op for GELU, plain PyTorch for SiLU (a DINOv3 config with
    ``hidden_act="silu"``)."""
    if activation == "gelu":
        return impl.linear_gelu(x, linear.weight, linear.bias)
    return _reference.ACTIVATIONS[activation](F.linear(x, linear.weight, linear.bias))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` (DINOv2); DINOv3 names them ``up_proj`` / ``down_proj`` and uses ``hidden_act``."""

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.activation = config.mlp_activation
        if config.backbone_family == "dinov3":
            self.up_proj = nn.Linear(config.hidden_size, config.mlp_hidden_size, bias=config.mlp_bias)
            self.down_proj = nn.Linear(config.mlp_hidden_size, config.hidden_size, bias=config.mlp_bias)
            self._names = ("up_proj", "down_proj")
        else:
            self.fc1 = nn.Linear(config.hidden_size, config.mlp_hidden_size)
            self.fc2 = nn.Linear(config.mlp_hidden_size, config.hidden_size)
            self._names = ("fc1", "fc2")
        self.impl = ops.DISPATCH

    def forward_residual(self, h: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        first, second = getattr(self, self._names[0]), getattr(self, self._names[1])
        m = linear_act(self.impl, h, first, self.activation)
        return self.impl.linear_residual(m, second.weight, second.bias, scale, residual)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: DINOv2's SwiGLU (SiLU) and DINOv3's gated MLP (``hidden_act``); the
    gate and up projections run as one op (``linear_gated``: one GEMM with the product in its epilogue)."""

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        bias = config.mlp_bias if config.backbone_family == "dinov3" else True
        self.activation = config.mlp_activation
        self.gate_proj = nn.Linear(config.hidden_size, config.mlp_hidden_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.mlp_hidden_size, bias=bias)
        self.down_proj = nn.Linear(config.mlp_hidden_size, config.hidden_size, bias=bias)
        self.impl = ops.DISPATCH

    def forward_residual(self, h: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        m = self.impl.linear_gated(h, gate.weight, gate.bias, up.weight, up.bias, self.activation)
        return self.impl.linear_residual(m, self.down_proj.weight, self.down_proj.bias, scale, residual)


class Layer(nn.Module):
    """Pre-norm ViT block: ``x += ls1 * attn(LN1(x)); x += ls2 * mlp(LN2(x))``."""

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.layer_scale1 = LayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GatedMLP(config) if config.gated_mlp else MLP(config)
        self.layer_scale2 = LayerScale(config)
        self.impl = ops.DISPATCH

    def forward(
        self,
        x: torch.Tensor,
        mask_bits: torch.Tensor | None = None,
        num_queries: int = 0,
        num_prefix: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``rope``: DINOv3's ``(cos, sin)`` tables of the patch grid (the last rows of ``x``), else None."""
        attn = self.attention
        h = self.impl.layer_norm(x, self.norm1.weight, self.norm1.bias, self.eps)
        qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
        if rope is None:
            a = self.impl.attention(qkv, attn.num_heads, mask_bits, num_queries, num_prefix)
        else:
            a = self.impl.rope_attention(qkv, attn.num_heads, rope[0], rope[1], mask_bits, num_queries, num_prefix)
        out = attn.output
        a = F.linear(a, out.weight, out.bias)
        x, h = self.impl.residual_layer_norm(
            x, a, self.layer_scale1.lambda1, self.norm2.weight, self.norm2.bias, self.eps
        )
        return self.mlp.forward_residual(h, self.layer_scale2.lambda1, x)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (eps 1e-6, as transformers)."""

    def __init__(self, num_channels: int):
        super().__init__(num_channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class ScaleLayer(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        d = config.hidden_size
        self.conv1 = nn.ConvTranspose2d(d, d, kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d, bias=False)
        self.layernorm2d = LayerNorm2d(d)
        self.activation = _reference.ACTIVATIONS[config.head_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm2d(self.conv2(self.activation(self.conv1(x))))


class ScaleBlock(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.block = nn.ModuleList([ScaleLayer(config) for _ in range(config.num_upscale_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.block:
            x = layer(x)
        return x


class MaskHead(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        d = config.hidden_size
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        self.fc3 = nn.Linear(d, d)
        self.activation = config.head_activation
        self.impl = ops.DISPATCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = linear_act(self.impl, x, self.fc1, self.activation)
        x = linear_act(self.impl, x, self.fc2, self.activation)
        return self.fc3(x)


# --------------------------------------------------------------------------------------------
# output_hidden_states / output_attentions (reference path, hooks on the layers)


def attention_maps(
    layer: "Layer",
    x: torch.Tensor,
    mask_bits: torch.Tensor | None = None,
    num_queries: int = 0,
    num_prefix: int = 0,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(B, heads, N, N)`` attention probabilities of ``layer`` on its input ``x``, as transformers' eager
    attention returns them (softmax in float32, cast back; masked pairs get probability 0; DINOv3's rotary
    embedding applied first). Plain PyTorch: ``N^2`` memory per head, for inspection only."""
    attn = layer.attention
    h = F.layer_norm(x, (x.shape[-1],), layer.norm1.weight, layer.norm1.bias, layer.eps)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
    if rope is not None:
        qkv = _reference.rotate_patch_rows(qkv, attn.num_heads, rope[0], rope[1])
    batch, seq_len, three_d = qkv.shape
    head_dim = three_d // 3 // attn.num_heads
    q, k, _ = qkv.view(batch, seq_len, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * head_dim**-0.5
    if mask_bits is not None:
        allowed = _reference.attention_mask_from_bits(mask_bits, seq_len, num_queries, num_prefix)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


class _Recorder:
    """Per-layer hidden states and attention maps of one forward, in transformers' order and shapes.

    Hooks on every :class:`Layer` call: hidden states are the first layer's input then each call's output
    (VidEoMT: the early layers on all frames, then the query layers frame by frame), the last one
    replaced by ``last_hidden_state``; ``output_hidden_states`` may be an index or a list of indices
    (others are None), as transformers allows. Attention maps come from :func:`attention_maps`."""

    _ARGS = ("x", "mask_bits", "num_queries", "num_prefix", "rope")  # Layer.forward's parameters

    def __init__(self, model: "_Segmenter", hidden_states: Any, attentions: bool):
        self.layers = model.layers
        self.want_hidden = hidden_states is not None and hidden_states is not False
        self.want_attentions = bool(attentions)
        self.selection = None
        if self.want_hidden and not isinstance(hidden_states, bool):
            chosen = [hidden_states] if isinstance(hidden_states, int) else list(hidden_states)
            total = model.config.num_hidden_layers + 1
            self.selection = {i % total for i in chosen if -total <= i < total}
        self.hidden: list[torch.Tensor | None] = []
        self.attentions: list[torch.Tensor] = []
        self.handles: list[Any] = []

    @property
    def active(self) -> bool:
        return self.want_hidden or self.want_attentions

    def __enter__(self) -> "_Recorder":
        if not self.active:  # nothing asked: no hooks (a compiled graph never sees them)
            return self
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(self._before, with_kwargs=True))
            if self.want_hidden:
                self.handles.append(layer.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _keep(self, value: torch.Tensor) -> None:
        self.hidden.append(value if self.selection is None or len(self.hidden) in self.selection else None)

    def _before(self, layer: "Layer", args: tuple, kwargs: dict) -> None:
        call = {**dict(zip(self._ARGS, args)), **kwargs}
        if self.want_hidden and not self.hidden:
            self._keep(call["x"])
        if self.want_attentions:
            self.attentions.append(attention_maps(layer, call["x"], call.get("mask_bits"), call.get("num_queries", 0),
                                                  call.get("num_prefix", 0), call.get("rope")))

    def _after(self, layer: "Layer", args: tuple, output: torch.Tensor) -> None:
        self._keep(output)

    def fill(self, output: "_Output") -> None:
        if self.want_hidden:
            if self.hidden and self.hidden[-1] is not None:
                self.hidden[-1] = output.last_hidden_state
            output.hidden_states = tuple(self.hidden)
        if self.want_attentions:
            output.attentions = tuple(self.attentions)


def _fuse_transformers_names(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: a state dict with transformers' names (``q_proj`` / ``k_proj`` /
    ``v_proj``, the training-only ``criterion.*``) is rewritten in place to ours."""
    from videomt_fast.model.loading import is_transformers_key, hf_to_fast

    keys = [k for k in state_dict if k.startswith(prefix)]
    names = [k[len(prefix):] for k in keys]
    if not any(is_transformers_key(n) for n in names):
        return
    ours = hf_to_fast({n: state_dict[k] for n, k in zip(names, keys)}, config=module.config)
    for key in keys:
        del state_dict[key]
    state_dict.update({prefix + n: v for n, v in ours.items()})


def _transformers_state_names(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``state_dict`` post-hook: our keys rewritten in place to transformers' (``qkv`` split into views
    ``q_proj`` / ``k_proj`` / ``v_proj``, the bias parts transformers' model has; the training-only
    ``criterion.empty_weight`` its loss holds), so a state dict loads into transformers' class and its tools.
    :meth:`_Segmenter.fused_state_dict` gives our own keys."""
    if module.__dict__.get("_fused_names"):
        return
    from videomt_fast.model.loading import fast_to_hf

    keys = [k for k in state_dict if k.startswith(prefix)]
    ours = {k[len(prefix):]: state_dict.pop(k) for k in keys}
    theirs = fast_to_hf(ours, module.config, contiguous=False)
    weight = module.layernorm.weight
    empty = torch.ones(module.config.num_labels + 1, dtype=weight.dtype, device=weight.device)
    empty[-1] = module.config.no_object_weight
    theirs["criterion.empty_weight"] = empty
    state_dict.update({prefix + k: v for k, v in theirs.items()})


# the attn_implementation names transformers knows
_ATTN_IMPLEMENTATIONS = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                                   "flex_attention"})

# transformers' PreTrainedModel methods that only training uses: a clear error instead of an AttributeError
_TRAINING_ONLY = ("resize_token_embeddings", "add_adapter", "load_adapter", "set_adapter", "enable_adapters",
                  "disable_adapters", "get_loss_dict", "get_loss")


def _training_only(name: str):
    def refuse(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"{type(self).__name__}.{name} is a training API of transformers' PreTrainedModel; videomt_fast is "
            "inference-only (train with transformers' class, then load its checkpoint here)")

    refuse.__name__ = name
    refuse.__doc__ = "Refused: a training API (videomt_fast is inference-only)."
    return refuse

# --------------------------------------------------------------------------------------------
# the shared segmenter


class _Segmenter(nn.Module):
    """What VidEoMT and EoMT share: embeddings, the layer stack, the final norm and the head."""

    config_class: type[_SegmenterConfig] = _SegmenterConfig
    _with_mask_token = False

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        config = self.config_class.coerce(config)  # ours, or transformers' config of the same model type
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"
        self.config = config
        self.num_hidden_layers = config.num_hidden_layers
        if config.backbone_family == "dinov3":
            self.embeddings = Dinov3Embeddings(config)
            self.rope_embeddings = RotaryTable(config)
        else:
            self.embeddings = Embeddings(config, with_mask_token=self._with_mask_token)
            self.rope_embeddings = None
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.query = nn.Embedding(config.num_queries, config.hidden_size)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        self.upscale_block = ScaleBlock(config)
        self.mask_head = MaskHead(config)
        self.class_predictor = nn.Linear(config.hidden_size, config.num_labels + 1)
        self.register_buffer("attn_mask_probs", torch.ones(config.num_blocks))
        self.impl = ops.DISPATCH  # query update, final norm, mask bits
        self.check_finite = True  # set False to skip the NaN/inf scan of inputs (one reduction + sync)
        self.register_load_state_dict_post_hook(self._refresh_mask_probs)
        self.register_load_state_dict_pre_hook(_fuse_transformers_names)
        self.register_state_dict_post_hook(_transformers_state_names)
        if self.attn_mask_probs.device.type != "meta":
            self._refresh_mask_probs()
        self.eval()

    # ------------------------------------------------------------------ structure
    @property
    def query_start(self) -> int:
        """Index of the first layer that sees the queries."""
        return self.config.num_hidden_layers - self.config.num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layernorm.weight.device

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.config.patch_hw
        return height // ph, width // pw

    def rope(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """DINOv3's rotary ``(cos, sin)`` tables for a patch grid (what every layer's attention reads), else None."""
        if self.rope_embeddings is None:
            return None
        return self.rope_embeddings.tables(grid, self.device)

    def position_tables(self, grid: tuple[int, int]) -> Any:
        """The position tensors a frame of this grid reads (DINOv2: the resized position table; DINOv3: the
        rotary tables), which a CUDA graph reads by address and so must keep alive."""
        if self.rope_embeddings is not None:
            return self.rope(grid)
        return self.embeddings.position_embedding(grid)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl.layer_norm(x, self.layernorm.weight, self.layernorm.bias, self.layernorm.eps)

    def _new_token_buffer(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, Q + S, d)`` with the patch-side tokens copied in; rows ``[0, Q)`` left for the queries."""
        batch, seq, dim = hidden.shape
        buffer = hidden.new_empty(batch, self.config.num_queries + seq, dim)
        buffer[:, self.config.num_queries :] = hidden
        return buffer

    def predict(self, sequence: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Head on the normalized sequence: ``(mask logits (B, Q, 4gh, 4gw), class logits (B, Q, C+1))``."""
        num_queries = self.config.num_queries
        queries = sequence[:, :num_queries]
        class_logits = self.class_predictor(queries)
        patches = sequence[:, num_queries + self.config.num_prefix_tokens :]
        pixel = patches.transpose(1, 2).reshape(sequence.shape[0], -1, grid[0], grid[1])
        pixel = self.upscale_block(pixel)
        mask_embed = self.mask_head(queries)
        masks = torch.bmm(mask_embed, pixel.flatten(2)).view(sequence.shape[0], num_queries, *pixel.shape[-2:])
        return masks, class_logits

    # ------------------------------------------------------------------ loading
    def fused_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """``state_dict()`` with this package's own keys (one fused ``qkv`` per attention, no loss buffer);
        ``state_dict()`` itself gives transformers' names (and ``load_state_dict`` takes either)."""
        with self.fused_names():
            return self.state_dict(*args, **kwargs)

    @contextlib.contextmanager
    def fused_names(self) -> Iterator[None]:
        """Inside, ``state_dict()`` (of this model or a module holding it) has this package's own keys, the
        parameters themselves: what a tracer that finds parameters through the state dict needs (torch.jit's,
        so the TorchScript ONNX exporter)."""
        self.__dict__["_fused_names"] = True
        try:
            yield
        finally:
            self.__dict__.pop("_fused_names", None)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *model_args: Any,
        config: Any = None,
        dtype: torch.dtype | str | None = "auto",
        device: torch.device | str | None = None,
        fast: bool = False,
        **kwargs: Any,
    ) -> "_Segmenter":
        """Load a transformers ``save_pretrained`` directory, a hub id, a research-code ``.pth`` (or a
        research-style folder: its ``pytorch_model.bin``), or ``None`` with ``config=`` and ``state_dict=``.

        transformers' arguments mean what they mean there: ``config`` (ours or transformers'),
        ``dtype``/``torch_dtype``, ``device_map`` (``"auto"``, a device, or a dict naming one device:
        the model is never split), ``subfolder``, ``revision``, ``cache_dir``, ``token``,
        ``local_files_only``, ``state_dict``, ``output_loading_info`` (returns ``(model, info)``),
        ``ignore_mismatched_sizes`` and config fields such as ``num_labels``, ``id2label`` or
        ``output_hidden_states``. Missing weights are initialised and named in a :class:`LoadingWarning`
        (``strict=True`` raises instead); ``attn_implementation`` is accepted and has no effect (our kernels
        always run). ``timeout`` (seconds, or ``(connect, read)``) bounds hub requests. Other keywords raise.

        ``fast=True`` returns ``model.optimize(...)``: bf16 on CUDA unless ``dtype`` names another; on a
        CPU the loaded dtype (the reference path stays the CPU default).
        """
        from videomt_fast.model.loading import load_pretrained

        loaded = load_pretrained(
            cls, pretrained_model_name_or_path, *model_args, config=config, dtype=dtype, device=device, **kwargs
        )
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if fast:
            model.optimize(dtype=model.dtype if dtype not in (None, "auto") else "auto")
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``config.json`` and ``model.safetensors`` in transformers' format (loadable by both).

        transformers' ``safe_serialization=True`` and ``is_main_process`` are accepted; other keywords
        (sharding, hub push) raise."""
        from videomt_fast.model.loading import save_pretrained

        if kwargs.pop("safe_serialization", True) is not True:
            raise ValueError("save_pretrained writes safetensors only (safe_serialization=False is not supported)")
        if not kwargs.pop("is_main_process", True):
            return
        if kwargs:
            raise TypeError(f"save_pretrained got unsupported keyword arguments {sorted(kwargs)}")
        save_pretrained(self, save_directory)

    def export(self, out_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """Write ONNX graphs and their JSON sidecar into ``out_dir``; returns the sidecar. Arguments as
        :func:`videomt_fast.export.export` (which this calls; needs the ``onnx`` extra)."""
        from videomt_fast.export import export  # the export layer sits above the model, imported on use

        return export(self, out_dir, **kwargs)

    # ------------------------------------------------------------------ transformers' model surface
    supports_gradient_checkpointing = False
    is_gradient_checkpointing = False

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Refused: videomt_fast runs inference only (transformers' VidEoMT/EoMT do not support it either)."""
        raise ValueError(
            f"{type(self).__name__} does not support gradient checkpointing: videomt_fast is inference-only "
            "(train with transformers' model, then load its checkpoint here)"
        )

    def gradient_checkpointing_disable(self) -> None:
        """Nothing to disable: gradient checkpointing is never on."""

    # transformers' attention switch: recorded (config._attn_implementation), and every setting computes the
    # same attention (eager's math; our kernels, chosen by the execution plan, run either way)
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _keep_in_fp32_modules: list[str] = []
    _keep_in_fp32_modules_strict: list[str] = []

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    def set_attn_implementation(self, attn_implementation: str | dict | None) -> None:
        """transformers' ``set_attn_implementation``: records the setting in ``config._attn_implementation``
        (``None``: ``"sdpa"``). Outputs do not change with it: the attention is computed by the op the
        execution plan chose, and ``output_attentions`` works under every setting."""
        if isinstance(attn_implementation, dict):
            attn_implementation = attn_implementation.get("", next(iter(attn_implementation.values()), None))
        name = attn_implementation or "sdpa"
        if not isinstance(name, str) or not (name in _ATTN_IMPLEMENTATIONS or name.startswith("paged|") or "/" in name):
            raise ValueError(f'Specified `attn_implementation="{name}"` is not supported. The only possible arguments '
                             f"are {sorted(_ATTN_IMPLEMENTATIONS)}, a 'paged|' one or a hub kernel repo id (every one "
                             "computes the same attention here)")
        self.config._attn_implementation = name

    # ------------------------------------------------------------------ training helpers
    def init_weights(self) -> None:
        """transformers' ``init_weights``: every parameter and buffer set to transformers' initial value (e.g. after
        building on the meta device and ``to_empty``), in place."""
        from videomt_fast.model.loading import initial_state

        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in initial_state(self).items():
                (params[name] if name in params else self.get_buffer(name)).copy_(value)
        self._refresh_mask_probs()

    def enable_input_require_grads(self) -> None:
        """transformers' helper: the input embeddings' output requires grad (so gradients reach the layers while the
        embeddings are frozen)."""
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        handle = self.__dict__.pop("_require_grads_hook", None)
        if handle is not None:
            handle.remove()


    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return False

    @classmethod
    def can_generate(cls) -> bool:
        return False

    @classmethod
    def _from_config(cls, config: Any, dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None,
                     **kwargs: Any) -> "_Segmenter":
        """transformers' ``_from_config``: a freshly initialised model (PyTorch's default initialisation).
        ``attn_implementation`` is recorded as by :meth:`set_attn_implementation`."""
        attn = kwargs.pop("attn_implementation", None)
        if kwargs:
            raise TypeError(f"{cls.__name__}._from_config got unsupported keyword arguments {sorted(kwargs)}")
        model = cls(config)
        if attn is not None:
            model.set_attn_implementation(attn)
        dtype = dtype or torch_dtype
        return model.to(dtype) if dtype is not None else model

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        skip = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        return sum(
            p.numel() for p in self.parameters()
            if (p.requires_grad or not only_trainable) and not (exclude_embeddings and id(p) in skip)
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def get_output_embeddings(self) -> None:
        return None

    def _output_flags(
        self, return_dict: bool | None, output_hidden_states: Any, output_attentions: bool | None
    ) -> tuple[bool, Any, bool]:
        """The call's arguments, else the config's switches (as transformers resolves them)."""
        config = self.config
        if self.class_predictor.out_features != config.num_labels + 1:
            raise ValueError(
                f"config.num_labels is {config.num_labels} but the class head predicts "
                f"{self.class_predictor.out_features - 1} classes (+1 no-object): changing num_labels does not "
                "re-head a built model; load with from_pretrained(..., num_labels=N, ignore_mismatched_sizes=True) "
                "for a new, randomly initialised head"
            )
        return (
            config.return_dict if return_dict is None else bool(return_dict),
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.output_attentions if output_attentions is None else bool(output_attentions),
        )

    def _finish_output(self, output: "_Output", recorder: "_Recorder | None", return_dict: bool):
        if recorder is not None:
            recorder.fill(output)
        return as_transformers_output(output) if return_dict else output.to_tuple()

    def optimize(
        self,
        dtype: torch.dtype | str | None = "auto",
        cuda_graphs: bool = True,
        check_finite: bool | None = None,
        clone_outputs: bool = True,
        plan: str | None = None,
        budget_s: float = 60.0,
        shapes: Any = (),
        compile: str | None = None,
        verbose: bool | None = None,
    ) -> "_Segmenter":
        """Set the model up for its device, in place; returns it (:mod:`videomt_fast.runtime.fast`).

        ``dtype``: ``"auto"`` is bf16 on CUDA (the kernels accumulate in fp32); on a CPU it is decided at
        the first input shape by measurement (bf16 where the CPU computes it natively and it agrees with
        float32 and is faster, else the current dtype); a torch dtype casts; ``None`` keeps the dtype.
        Per input shape an execution plan picks, per op site, the implementation verified against the
        float64 reference and timed fastest here (``plan``: ``"auto"`` uses the on-disk cache,
        ``"recalibrate"`` measures again, ``"static"`` skips calibration; default ``$VIDEOMT_FAST_PLAN``
        or ``"auto"``). ``budget_s`` is a wall-clock promise per input shape: everything planning a shape
        spends (the CPU dtype decision, recording, verification, timing, the gate, a compiled step) fits in
        it, and what did not fit is left unmeasured and named in the plan's notes. A wait of more than a
        couple of seconds shows one progress line on stderr when it is a terminal (``verbose=True``: always;
        ``False``: never). On CUDA, :meth:`new_session`, the clip
        forward's per-frame steps and EoMT's forward replay CUDA graphs (``cuda_graphs=False``: eager).
        The NaN/inf scan of inputs is off on the fast path (a reduction and a host sync per call);
        ``check_finite=True`` keeps it. ``clone_outputs=False`` lets graphed calls return their static
        output buffers (valid until the next call) instead of copies. ``shapes``: ``(frames per call,
        height, width)`` triples to plan now instead of at their first call. ``compile`` (VidEoMT sessions on
        a CPU): ``"auto"`` compiles a session's whole frame step into one native call where the step is
        host-bound and keeps it when it verifies and is faster, ``"on"`` tries it regardless, ``"off"``
        never (default ``$VIDEOMT_FAST_COMPILE`` or ``"auto"``; :mod:`videomt_fast.runtime.compiled`).
        """
        self._refresh_mask_probs()
        return runtime().optimize(self, dtype=dtype, cuda_graphs=cuda_graphs, check_finite=check_finite,
                                  clone_outputs=clone_outputs, plan=plan, budget_s=budget_s, shapes=shapes,
                                  compile=compile, verbose=verbose)

    def backend_report(self) -> dict[str, dict[str, Any]]:
        """Which backend each op would use on this model's device, and why."""
        return ops.backend_report(self.device)

    def _mask_probs(self) -> list[float]:
        """``attn_mask_probs`` as floats, read once per change of the buffer (no per-call sync).

        Under ``torch.compile`` the value last read eagerly is used (a graph cannot read a buffer into
        Python control flow without a break); it is refreshed by every eager call, by
        ``load_state_dict`` and by :meth:`optimize`. After changing the buffer in place, run one eager
        call (or recompile) before the next compiled one.
        """
        if torch.compiler.is_compiling() and getattr(self, "_mask_probs_value", None) is not None:
            return self._mask_probs_value
        buf = self.attn_mask_probs
        key = (buf.data_ptr(), 0 if buf.is_inference() else buf._version, buf.device)
        if getattr(self, "_mask_probs_key", None) != key:
            self._mask_probs_value = [float(p) for p in buf.detach().cpu().tolist()]
            self._mask_probs_key = key
        return self._mask_probs_value

    def _refresh_mask_probs(self, *_: Any) -> None:
        self._mask_probs_key = None
        self._mask_probs()


for _name in _TRAINING_ONLY:
    setattr(_Segmenter, _name, _training_only(_name))


class VideomtForUniversalSegmentation(_Segmenter):
    """Drop-in for transformers' ``VideomtForUniversalSegmentation`` (inference)."""

    config_class = VideomtConfig
    main_input_name = "pixel_values_videos"
    _with_mask_token = True

    def __init__(self, config: VideomtConfig):
        super().__init__(config)
        self.query_updater = nn.Linear(config.hidden_size, config.hidden_size)
        self.chunk_size: int | None = None  # frames per early-layer pass in forward(); None = all

    # ------------------------------------------------------------------ the two halves of a frame
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Embeddings and the query-free early layers: ``(N, 3, H, W) -> (N, 1 + R + P, d)``."""
        hidden = self.embeddings(frames)
        rope = self.rope(self.grid_for(*frames.shape[-2:]))
        for layer in self.layers[: self.query_start]:
            hidden = layer(hidden, rope=rope)
        return hidden

    def query_step(
        self, hidden: torch.Tensor, prev_queries: torch.Tensor | None, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame through the query layers and the head.

        ``hidden`` ``(B, 1 + R + P, d)`` from :meth:`encode_frames`; ``prev_queries`` ``(B, Q, d)`` the queries
        this method returned for the previous frame, or None for the first frame. Returns
        ``(mask logits, class logits, normalized sequence, queries to propagate)``: the raw last-layer query
        rows, or with ``config.norm_queries`` (the research code's ``NORM_QUERIES``) the normalized ones.
        """
        x = self._new_token_buffer(hidden)
        self.impl.query_update(x, self.query.weight, prev_queries, self.query_updater.weight, self.query_updater.bias)
        rope = self.rope(grid)
        for layer in self.layers[self.query_start :]:
            x = layer(x, rope=rope)
        sequence = self._final_norm(x)
        masks, classes = self.predict(sequence, grid)
        carried = sequence if self.config.norm_queries else x
        return masks, classes, sequence, carried[:, : self.config.num_queries]

    # ------------------------------------------------------------------ clip forward
    def forward(
        self,
        pixel_values_videos: torch.Tensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
        chunk_size: int | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> VideomtForUniversalSegmentationOutput | tuple:
        """``pixel_values_videos`` ``(B, T, 3, H, W)`` -> outputs with frame-major rows (``t * B + b``).

        ``chunk_size`` (or ``self.chunk_size``; an int, never truncated) runs the early layers on that many
        frames at a time, bounding peak activation memory; the result is identical to one pass.

        ``output_hidden_states`` / ``output_attentions`` (or the config's switches) return transformers'
        per-layer hidden states and attention maps; that call runs the plain reference path in one pass
        (no CUDA graphs, no chunking) and attention maps cost ``N^2`` memory per head and layer: slow, for
        inspection. ``return_dict=False`` (or ``config.return_dict = False``) returns ``to_tuple()``.
        """
        if "pixel_values" in kwargs:
            raise ValueError(
                "Use `pixel_values_videos` (B, T, 3, H, W) with `VideomtForUniversalSegmentation`, not `pixel_values`"
            )
        if isinstance(pixel_values_videos, torch.Tensor) and pixel_values_videos.ndim != 5:
            raise ValueError(
                "pixel_values_videos must be 5-D (batch_size, num_frames, channels, height, width), got shape "
                f"{tuple(pixel_values_videos.shape)}: VideomtForUniversalSegmentation only supports 5D video inputs"
            )
        if kwargs:
            raise TypeError(f"VideomtForUniversalSegmentation.forward got unexpected keyword arguments {sorted(kwargs)}")
        if mask_labels is not None or class_labels is not None:
            raise ValueError("videomt_fast is inference-only: mask_labels / class_labels are not supported")
        return_dict, output_hidden_states, output_attentions = self._output_flags(
            return_dict, output_hidden_states, output_attentions
        )
        if pixel_values_videos is None:
            raise ValueError("pixel_values_videos is required: a (batch_size, num_frames, 3, height, width) tensor")
        check_frames(
            pixel_values_videos,
            "pixel_values_videos",
            5,
            self.config,
            "(batch_size, num_frames, channels, height, width)",
            self.check_finite,
        )
        batch, num_frames, channels, height, width = pixel_values_videos.shape
        recorder = _Recorder(self, output_hidden_states, output_attentions)
        chunk = chunk_size if chunk_size is not None else self.chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral)):
            raise TypeError(f"chunk_size must be a whole number of frames (an int), got {chunk!r}")
        chunk = num_frames if chunk is None or recorder.active else int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk_size must be a positive number of frames, got {chunk}")
        grid = self.grid_for(height, width)

        masks, classes, sequences = [], [], []
        prev = None
        with recorder:
            for start in range(0, num_frames, chunk):
                stop = min(start + chunk, num_frames)
                frames = pixel_values_videos[:, start:stop].reshape(batch * (stop - start), channels, height, width)
                encode = self.encode_frames if recorder.active else self.frame_encoder(frames)
                hidden = encode(frames)
                hidden = hidden.view(batch, stop - start, *hidden.shape[1:])
                step = self.query_step if recorder.active else self.query_stepper(hidden[:, 0], grid)
                for t in range(stop - start):
                    mask_logits, class_logits, sequence, prev = step(hidden[:, t], prev, grid)
                    masks.append(mask_logits)
                    classes.append(class_logits)
                    sequences.append(sequence)
                del hidden
        output = VideomtForUniversalSegmentationOutput(
            class_queries_logits=torch.cat(classes, dim=0),
            masks_queries_logits=torch.cat(masks, dim=0),
            last_hidden_state=torch.cat(sequences, dim=0),
        )
        return self._finish_output(output, recorder if recorder.active else None, return_dict)

    def frame_encoder(self, frames: torch.Tensor):
        """What the clip forward calls on a batch of frames: :meth:`encode_frames`, unless a runtime installed
        ``encode_provider`` (after :meth:`optimize`: the execution plan of that many frames)."""
        provider = self.__dict__.get("encode_provider")
        return self.encode_frames if provider is None else provider(frames)

    def query_stepper(self, hidden: torch.Tensor, grid: tuple[int, int]):
        """What the clip forward calls per frame on ``hidden`` of this shape: :meth:`query_step`, unless a
        runtime installed ``step_provider`` (after :meth:`optimize`: the frame's execution plan, and on CUDA
        a CUDA-graph replay with the same arguments and results)."""
        provider = self.__dict__.get("step_provider")
        return self.query_step if provider is None else provider(hidden, grid)

    # ------------------------------------------------------------------ streaming
    def new_session(self, batch_size: int = 1):
        """A streaming session: feed one frame per ``step(frames)``, queries carried between.

        After :meth:`optimize` on a CUDA model this is a :class:`videomt_fast.runtime.fast.GraphedSession`
        (one CUDA graph per input shape); otherwise a :class:`videomt_fast.runtime.session.VideomtSession`.
        """
        return runtime().new_session(self, batch_size)


class EomtForUniversalSegmentation(_Segmenter):
    """Drop-in for transformers' ``EomtForUniversalSegmentation`` (inference), masked attention included."""

    config_class = EomtConfig
    main_input_name = "pixel_values"

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> EomtForUniversalSegmentationOutput | tuple:
        """``pixel_values`` ``(B, 3, H, W)`` -> transformers' outputs. ``output_hidden_states`` /
        ``output_attentions`` / ``return_dict`` as in :meth:`VideomtForUniversalSegmentation.forward`
        (recording runs the plain reference path)."""
        if kwargs:
            raise TypeError(f"EomtForUniversalSegmentation.forward got unexpected keyword arguments {sorted(kwargs)}")
        if mask_labels is not None or class_labels is not None:
            raise ValueError("videomt_fast is inference-only: mask_labels / class_labels are not supported")
        return_dict, output_hidden_states, output_attentions = self._output_flags(
            return_dict, output_hidden_states, output_attentions
        )
        probs = self.check_inputs(pixel_values, self.check_finite)
        recorder = _Recorder(self, output_hidden_states, output_attentions)
        if recorder.active:
            with recorder:
                output = self._forward(pixel_values, probs, patch_offsets)
            return self._finish_output(output, recorder, return_dict)
        # after optimize(): the runtime's runner (the shape's execution plan; on CUDA a CUDA-graph replay)
        runner = self.__dict__.get("checked_forward") or self._forward
        return self._finish_output(runner(pixel_values, probs, patch_offsets), None, return_dict)

    def new_predictor(self, max_shapes: int = 4):
        """A callable ``predictor(pixel_values)`` returning what ``self(pixel_values=...)`` returns.

        After :meth:`optimize` on a CUDA model it replays one CUDA graph per input shape (a
        :class:`videomt_fast.runtime.fast.GraphedPredictor`); otherwise it runs the forward.
        """
        return runtime().new_predictor(self, max_shapes)

    def check_inputs(self, pixel_values: Any, check_finite: bool = True) -> list[float]:
        """Validate ``pixel_values`` and the masked-attention probabilities; returns the probabilities."""
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch_size, 3, height, width) tensor")
        check_frames(
            pixel_values, "pixel_values", 4, self.config, "(batch_size, channels, height, width)", check_finite
        )
        probs = self._mask_probs()
        for i, p in enumerate(probs):
            if 0.0 < p < 1.0:
                raise ValueError(
                    f"attn_mask_probs[{i}] = {p}: masked attention with a probability strictly between 0 and 1 "
                    "disables the mask for random queries (a training device) and would make inference random; "
                    "set it to 0 (masks off) or 1 (masks on)"
                )
        return probs

    def _forward(
        self, pixel_values: torch.Tensor, probs: list[float], patch_offsets: list[torch.Tensor] | None = None
    ) -> EomtForUniversalSegmentationOutput:
        """The forward on checked inputs: no host synchronization (CUDA-graph capturable)."""
        config = self.config
        grid = self.grid_for(*pixel_values.shape[-2:])
        num_queries = config.num_queries
        num_prefix = num_queries + config.num_prefix_tokens
        x = self.embeddings(pixel_values)
        rope = self.rope(grid)
        for idx, layer in enumerate(self.layers):
            mask_bits = None
            if idx == self.query_start:
                x = self._new_token_buffer(x)
                self.impl.query_update(x, self.query.weight)
            if idx >= self.query_start and probs[idx - self.query_start] > 0:
                mask_logits, _ = self.predict(self._final_norm(x), grid)
                mask_bits = self.impl.mask_bits(mask_logits, grid)
            x = layer(x, mask_bits, num_queries, num_prefix, rope)
        sequence = self._final_norm(x)
        masks, classes = self.predict(sequence, grid)
        return EomtForUniversalSegmentationOutput(
            class_queries_logits=classes,
            masks_queries_logits=masks,
            last_hidden_state=sequence,
            patch_offsets=patch_offsets,
        )


EomtDinov3ForUniversalSegmentationOutput = EomtForUniversalSegmentationOutput  # transformers' name; the same fields


class EomtDinov3ForUniversalSegmentation(EomtForUniversalSegmentation):
    """Drop-in for transformers' ``EomtDinov3ForUniversalSegmentation`` (inference): EoMT on a DINOv3
    backbone (rotary embeddings on the patch tokens, no position table, optional gated MLP), masked
    attention included."""

    config_class = EomtDinov3Config


def model_class_for(config: _SegmenterConfig) -> type[_Segmenter]:
    """The model class of a config of ours: VidEoMT (either backbone), EoMT, EoMT-DINOv3."""
    for cls in (EomtDinov3ForUniversalSegmentation, EomtForUniversalSegmentation, VideomtForUniversalSegmentation):
        if type(config) is cls.config_class:
            return cls
    raise TypeError(f"no model class for {type(config).__name__}")
