"""The lean VidEoMT / EoMT models: transformers' math, expressed through :mod:`videomt_fast.ops`.

Parameter names follow transformers' so checkpoints map one to one, except that each attention
keeps its Q, K and V projections as one fused ``qkv`` Linear (``3d x d``, rows ``[q | k | v]``),
filled from ``q_proj`` / ``k_proj`` / ``v_proj`` at load time.

The model code never sees a backend: every fused op goes through ``ops.call``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from videomt_fast import ops
from videomt_fast.ops import reference as _reference  # noqa: F401  (declares the ops)
from videomt_fast.model.configuration import EomtConfig, VideomtConfig, _SegmenterConfig

# --------------------------------------------------------------------------------------------
# outputs


class _Output:
    """Dataclass output with transformers' ``ModelOutput`` access: ``out.x``, ``out["x"]``, ``out[0]``."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


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
        if torch.compiler.is_compiling():  # part of the graph: no cache keyed by addresses
            return self._resized(weight, grid)
        key = (tuple(grid), weight.data_ptr(), weight._version, weight.dtype, weight.device)
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


class Attention(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)


class LayerScale(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))


class MLP(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_hidden_size)
        self.fc2 = nn.Linear(config.mlp_hidden_size, config.hidden_size)

    def forward_residual(self, h: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        m = ops.call("linear_gelu", h, self.fc1.weight, self.fc1.bias)
        return ops.call("linear_residual", m, self.fc2.weight, self.fc2.bias, scale, residual)


class GatedMLP(nn.Module):
    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.mlp_hidden_size)
        self.up_proj = nn.Linear(config.hidden_size, config.mlp_hidden_size)
        self.down_proj = nn.Linear(config.mlp_hidden_size, config.hidden_size)

    def forward_residual(self, h: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        m = F.silu(self.gate_proj(h)) * self.up_proj(h)
        return ops.call("linear_residual", m, self.down_proj.weight, self.down_proj.bias, scale, residual)


class Layer(nn.Module):
    """Pre-norm ViT block: ``x += ls1 * attn(LN1(x)); x += ls2 * mlp(LN2(x))``."""

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.layer_scale1 = LayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GatedMLP(config) if config.use_swiglu_ffn else MLP(config)
        self.layer_scale2 = LayerScale(config)

    def forward(
        self,
        x: torch.Tensor,
        mask_bits: torch.Tensor | None = None,
        num_queries: int = 0,
        num_prefix: int = 0,
    ) -> torch.Tensor:
        attn = self.attention
        h = ops.call("layer_norm", x, self.norm1.weight, self.norm1.bias, self.eps)
        qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
        a = ops.call("attention", qkv, attn.num_heads, mask_bits, num_queries, num_prefix)
        a = F.linear(a, attn.out_proj.weight, attn.out_proj.bias)
        x, h = ops.call(
            "residual_layer_norm", x, a, self.layer_scale1.lambda1, self.norm2.weight, self.norm2.bias, self.eps
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm2d(self.conv2(F.gelu(self.conv1(x))))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ops.call("linear_gelu", x, self.fc1.weight, self.fc1.bias)
        x = ops.call("linear_gelu", x, self.fc2.weight, self.fc2.bias)
        return self.fc3(x)


# --------------------------------------------------------------------------------------------
# the shared segmenter


class _Segmenter(nn.Module):
    """What VidEoMT and EoMT share: embeddings, the layer stack, the final norm and the head."""

    config_class: type[_SegmenterConfig] = _SegmenterConfig
    _with_mask_token = False

    def __init__(self, config: _SegmenterConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.num_hidden_layers = config.num_hidden_layers
        self.embeddings = Embeddings(config, with_mask_token=self._with_mask_token)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.query = nn.Embedding(config.num_queries, config.hidden_size)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        self.upscale_block = ScaleBlock(config)
        self.mask_head = MaskHead(config)
        self.class_predictor = nn.Linear(config.hidden_size, config.num_labels + 1)
        self.register_buffer("attn_mask_probs", torch.ones(config.num_blocks))
        self.check_finite = True  # set False to skip the NaN/inf scan of inputs (one reduction + sync)
        self.register_load_state_dict_post_hook(self._refresh_mask_probs)
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

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return ops.call("layer_norm", x, self.layernorm.weight, self.layernorm.bias, self.layernorm.eps)

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
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: _SegmenterConfig | None = None,
        dtype: torch.dtype | str | None = "auto",
        device: torch.device | str | None = None,
        fast: bool = False,
        **kwargs: Any,
    ) -> "_Segmenter":
        """Load a transformers ``save_pretrained`` directory, a hub id, or a research-code ``.pth``.

        ``fast=True`` returns ``model.optimize(...)``: bf16 on CUDA unless ``dtype`` names another; on a
        CPU the loaded dtype (the reference path stays the CPU default).
        """
        from videomt_fast.model.loading import load_pretrained

        model = load_pretrained(cls, pretrained_model_name_or_path, config=config, dtype=dtype, device=device, **kwargs)
        if fast:
            model.optimize(dtype=model.dtype if dtype not in (None, "auto") else "auto")
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` in transformers' format (loadable by both)."""
        from videomt_fast.model.loading import save_pretrained

        save_pretrained(self, directory)

    def optimize(
        self,
        dtype: torch.dtype | str | None = "auto",
        cuda_graphs: bool = True,
        check_finite: bool | None = None,
        clone_outputs: bool = True,
    ) -> "_Segmenter":
        """Set the model up for speed, in place; returns it.

        Casts the weights to ``dtype`` (``"auto"``: bf16 on CUDA, where the kernels accumulate in fp32;
        elsewhere the current dtype is kept, so a CPU model keeps computing what it did; ``None``: no
        cast), and on CUDA
        makes :meth:`new_session` replay one CUDA graph per input shape. ``check_finite=False`` also
        drops the per-call NaN/inf scan of the input (one reduction and one host sync).
        ``clone_outputs=False`` lets a graphed session return its static output buffers (valid until
        the next step) instead of copies.
        """
        from videomt_fast.runtime.fast import optimize

        self._refresh_mask_probs()
        return optimize(self, dtype=dtype, cuda_graphs=cuda_graphs, check_finite=check_finite,
                        clone_outputs=clone_outputs)

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
        key = (buf.data_ptr(), buf._version, buf.device)
        if getattr(self, "_mask_probs_key", None) != key:
            self._mask_probs_value = [float(p) for p in buf.detach().cpu().tolist()]
            self._mask_probs_key = key
        return self._mask_probs_value

    def _refresh_mask_probs(self, *_: Any) -> None:
        self._mask_probs_key = None
        self._mask_probs()


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
        for layer in self.layers[: self.query_start]:
            hidden = layer(hidden)
        return hidden

    def query_step(
        self, hidden: torch.Tensor, prev_queries: torch.Tensor | None, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame through the query layers and the head.

        ``hidden`` ``(B, 1 + R + P, d)`` from :meth:`encode_frames`; ``prev_queries`` ``(B, Q, d)`` the raw
        last-layer query rows of the previous frame, or None for the first frame. Returns
        ``(mask logits, class logits, normalized sequence, queries to propagate)``.
        """
        x = self._new_token_buffer(hidden)
        ops.call(
            "query_update", x, self.query.weight, prev_queries, self.query_updater.weight, self.query_updater.bias
        )
        for layer in self.layers[self.query_start :]:
            x = layer(x)
        sequence = self._final_norm(x)
        masks, classes = self.predict(sequence, grid)
        return masks, classes, sequence, x[:, : self.config.num_queries]

    # ------------------------------------------------------------------ clip forward
    def forward(
        self,
        pixel_values_videos: torch.Tensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> VideomtForUniversalSegmentationOutput:
        """``pixel_values_videos`` ``(B, T, 3, H, W)`` -> outputs with frame-major rows (``t * B + b``).

        ``chunk_size`` (or ``self.chunk_size``) runs the early layers on that many frames at a time,
        bounding peak activation memory; the result is identical to one pass.
        """
        if "pixel_values" in kwargs:
            raise ValueError("VideomtForUniversalSegmentation takes `pixel_values_videos` (B, T, 3, H, W), not `pixel_values`")
        if mask_labels is not None or class_labels is not None:
            raise ValueError("videomt_fast is inference-only: mask_labels / class_labels are not supported")
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
        chunk = chunk_size if chunk_size is not None else self.chunk_size
        chunk = num_frames if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk_size must be a positive number of frames, got {chunk}")
        grid = self.grid_for(height, width)

        masks, classes, sequences = [], [], []
        prev = None
        for start in range(0, num_frames, chunk):
            stop = min(start + chunk, num_frames)
            frames = pixel_values_videos[:, start:stop].reshape(batch * (stop - start), channels, height, width)
            hidden = self.encode_frames(frames)
            hidden = hidden.view(batch, stop - start, *hidden.shape[1:])
            step = self.query_stepper(hidden[:, 0], grid)
            for t in range(stop - start):
                mask_logits, class_logits, sequence, prev = step(hidden[:, t], prev, grid)
                masks.append(mask_logits)
                classes.append(class_logits)
                sequences.append(sequence)
            del hidden
        return VideomtForUniversalSegmentationOutput(
            class_queries_logits=torch.cat(classes, dim=0),
            masks_queries_logits=torch.cat(masks, dim=0),
            last_hidden_state=torch.cat(sequences, dim=0),
        )

    def query_stepper(self, hidden: torch.Tensor, grid: tuple[int, int]):
        """What to call per frame on ``hidden`` of this shape: :meth:`query_step`, or after :meth:`optimize`
        on CUDA its CUDA-graph replay (:class:`videomt_fast.runtime.fast.GraphedQueryStep`, same arguments)."""
        if getattr(self, "fast_settings", None) is None:
            return self.query_step
        from videomt_fast.runtime.fast import query_stepper

        return query_stepper(self, hidden, grid)

    # ------------------------------------------------------------------ streaming
    def new_session(self, batch_size: int = 1):
        """A streaming session: feed one frame per ``step(frames)``, queries carried between.

        After :meth:`optimize` on a CUDA model this is a :class:`videomt_fast.runtime.fast.GraphedSession`
        (one CUDA graph per input shape); otherwise a :class:`videomt_fast.runtime.session.VideomtSession`.
        """
        from videomt_fast.runtime.fast import GraphedSession, graphs_enabled

        if graphs_enabled(self):
            return GraphedSession(self, batch_size=batch_size, clone_outputs=self.fast_settings.clone_outputs)
        from videomt_fast.runtime.session import VideomtSession

        return VideomtSession(self, batch_size=batch_size)


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
        **kwargs: Any,
    ) -> EomtForUniversalSegmentationOutput:
        if mask_labels is not None or class_labels is not None:
            raise ValueError("videomt_fast is inference-only: mask_labels / class_labels are not supported")
        probs = self.check_inputs(pixel_values, self.check_finite)
        return self._forward(pixel_values, probs, patch_offsets)

    def new_predictor(self, max_shapes: int = 4):
        """A callable ``predictor(pixel_values)`` returning what ``self(pixel_values=...)`` returns.

        After :meth:`optimize` on a CUDA model it replays one CUDA graph per input shape (a
        :class:`videomt_fast.runtime.fast.GraphedPredictor`); otherwise it runs the forward.
        """
        from videomt_fast.runtime.fast import GraphedPredictor, graphs_enabled

        settings = getattr(self, "fast_settings", None)
        clone = settings.clone_outputs if settings is not None else True
        return GraphedPredictor(self, use_graphs=graphs_enabled(self), clone_outputs=clone, max_shapes=max_shapes)

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
        for idx, layer in enumerate(self.layers):
            mask_bits = None
            if idx == self.query_start:
                x = self._new_token_buffer(x)
                ops.call("query_update", x, self.query.weight)
            if idx >= self.query_start and probs[idx - self.query_start] > 0:
                mask_logits, _ = self.predict(self._final_norm(x), grid)
                mask_bits = ops.call("mask_bits", mask_logits, grid)
            x = layer(x, mask_bits, num_queries, num_prefix)
        sequence = self._final_norm(x)
        masks, classes = self.predict(sequence, grid)
        return EomtForUniversalSegmentationOutput(
            class_queries_logits=classes,
            masks_queries_logits=masks,
            last_hidden_state=sequence,
            patch_offsets=patch_offsets,
        )
