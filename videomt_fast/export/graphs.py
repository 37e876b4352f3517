"""What is traced into the ONNX graphs: thin modules around the model's own methods, and the op table
they run on.

Every graph runs the model's own modules (``encode_frames``, ``query_step``, EoMT's ``_forward``), so
a new backbone or layer exports with no code here. Only the op table differs from the CPU path: each
module's ``impl`` is swapped, for the trace, for :class:`ExportTable`, whose ops are the plain-PyTorch
references (:mod:`videomt_fast.ops.reference`) with two changes:

* **the first frame of a video** is an input: ``query_update`` writes the learned query table for rows
  whose ``first`` flag is set and ``query_updater(queries) + table`` for the others, so one graph serves
  every frame and each stream of a batch may start a new video on any frame;
* **fp32 inside an fp16 graph**: in a half-precision graph, attention (the q·kᵀ scores, their softmax
  and the weighted sum of values; with DINOv3 the rotary rotation of q and k before them, its tables
  float32 as the model computes them) and the LayerNorms routed through the op table compute in float32
  and cast their result back (:data:`FP32_INSIDE` names them for the sidecar). Everything else runs in the
  graph's dtype.

DINOv3's rotary tables are the model's own (``model.rope(grid)``), computed inside the graph from the frame
size when height and width are dynamic.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from videomt_fast import ops
from videomt_fast.ops import reference
from videomt_fast.runtime import plans

# What an fp16 graph computes in float32 (written into the sidecar): the lines that apply to a model,
# chosen by :func:`fp32_inside`.
FP32_INSIDE = {
    "attention": "attention: q·kᵀ scores, softmax and the weighted sum of values (q, k, v cast to float32, the "
                 "output back)",
    "rotary": "DINOv3's rotary embedding: the cos/sin tables (float32, as the model computes them) and the "
              "rotation of the patch rows' q and k, in float32 before the attention",
    "layer_norm": "LayerNorm statistics: the op-table LayerNorms (each layer's norm1 / norm2, the final norm) "
                  "compute in float32; the upscale block's channel LayerNorm2d is an ONNX LayerNormalization with "
                  "stash_type=1 (float32 mean and variance)",
    "position_resize": "position-embedding resize: bicubic in float32, cast to the graph's dtype",
    "mask": "EoMT mask prediction for masked attention: the bilinear resize of the mask logits and the > 0 test",
}


def fp32_inside(model) -> list[str]:
    """The :data:`FP32_INSIDE` lines of ``model``'s fp16 graphs (its backbone and graph family)."""
    dinov3 = model.config.backbone_family == "dinov3"
    keys = ["attention", "rotary" if dinov3 else None, "layer_norm", None if dinov3 else "position_resize",
            None if hasattr(model, "query_updater") else "mask"]
    return [FP32_INSIDE[k] for k in keys if k]


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ExportTable(ops.OpTable):
    """The op table of an exported graph (see the module doc). ``first`` is the current trace's
    first-frame flag ``(B,)`` bool, set by :class:`QueryGraph` before it calls the model."""

    def __init__(self) -> None:
        super().__init__({
            "attention": self._attention, "rope_attention": self._rope_attention, "layer_norm": self._layer_norm,
            "residual_layer_norm": self._residual_layer_norm, "linear_gelu": reference.linear_gelu_ref,
            "linear_gated": reference.linear_gated_ref,
            "linear_residual": reference.linear_residual_ref, "query_update": self._query_update,
            "mask_bits": self._mask_bits,
        }, label="onnx export")
        self.first: torch.Tensor | None = None

    @staticmethod
    def _attention(qkv, num_heads, mask_bits=None, num_queries=0, num_prefix=0):
        return ExportTable._wide_attention(_wide(qkv), num_heads, mask_bits, num_queries, num_prefix).to(qkv.dtype)

    @staticmethod
    def _rope_attention(qkv, num_heads, cos, sin, mask_bits=None, num_queries=0, num_prefix=0):
        """DINOv3: the rotary rotation of the patch rows' q and k (float32 tables) on the widened qkv, then
        :meth:`_attention`'s float32 attention."""
        wide = ExportTable._rotate(_wide(qkv), num_heads, cos, sin)
        return ExportTable._wide_attention(wide, num_heads, mask_bits, num_queries, num_prefix).to(qkv.dtype)

    @staticmethod
    def _rotate(qkv, num_heads, cos, sin):
        """:func:`~videomt_fast.ops.reference.rotate_patch_rows` with the same values, written for a trace
        whose token count is an input of its own (the query graph's ``hidden``): the tables are padded to
        every row (cos 1, sin 0 on the rows before the patches: those rows come back unchanged), so no
        slice starts at a symbolic row, and the result is assembled rather than written in place."""
        batch, seq_len, three_d = qkv.shape
        dim = three_d // 3
        head_dim = dim // num_heads
        before = seq_len - cos.shape[0]
        cos = F.pad(cos.to(qkv.dtype), (0, 0, before, 0), value=1.0)[None, :, None, None, :]
        sin = F.pad(sin.to(qkv.dtype), (0, 0, before, 0), value=0.0)[None, :, None, None, :]
        qk = qkv[..., : 2 * dim].reshape(batch, seq_len, 2, num_heads, head_dim)
        half = head_dim // 2
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        qk = (qk * cos + rotated * sin).reshape(batch, seq_len, 2 * dim)
        return torch.cat((qk, qkv[..., 2 * dim :]), dim=-1)

    @staticmethod
    def _wide_attention(wide, num_heads, mask_bits, num_queries, num_prefix):
        if mask_bits is None:
            return reference.attention_ref(wide, num_heads)
        batch, seq_len, three_d = wide.shape
        head_dim = three_d // 3 // num_heads
        q, k, v = wide.view(batch, seq_len, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # query rows see every non-patch column and the patches their mask allows; other rows see all
        query_rows = torch.cat([mask_bits.new_ones(batch, num_queries, num_prefix), mask_bits], dim=-1)
        allowed = torch.cat([query_rows, mask_bits.new_ones(batch, seq_len - num_queries, seq_len)], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=head_dim**-0.5)
        return out.transpose(1, 2).reshape(batch, seq_len, three_d // 3)

    @staticmethod
    def _layer_norm(x, weight, bias, eps):
        return F.layer_norm(_wide(x), (int(x.shape[-1]),), _wide(weight), _wide(bias), eps).to(x.dtype)

    @staticmethod
    def _residual_layer_norm(x, f, scale, weight, bias, eps):
        x = f * scale + x
        return x, ExportTable._layer_norm(x, weight, bias, eps)

    @staticmethod
    def _mask_bits(mask_logits, grid):
        """``(B, Q, P)`` bool, unpacked: which patches each query may attend (the packed int32 words of
        :func:`~videomt_fast.ops.reference.mask_bits_ref` need bit shifts ONNX has no signed form of; only
        this table's ``attention`` reads the value)."""
        resized = F.interpolate(_wide(mask_logits), size=tuple(grid), mode="bilinear", align_corners=False)
        return resized.flatten(2) > 0

    def _query_update(self, out, table, prev=None, weight=None, bias=None):
        num_queries = table.shape[0]
        if prev is None or self.first is None:  # EoMT: the table, expanded to the (traced) batch
            out[:, :num_queries] = table.expand(out.shape[0], -1, -1)
            return out
        updated = F.linear(prev, weight, bias) + table
        out[:, :num_queries] = torch.where(self.first[:, None, None], table.expand_as(updated), updated)
        return out


class PinnedRotary(torch.nn.Module):
    """DINOv3's rotary tables of one patch grid, computed by the model beforehand: what a fixed-size graph
    stores in place of computing them (``tables`` as :class:`~videomt_fast.model.modeling.RotaryTable`'s)."""

    def __init__(self, rotary, grid: tuple[int, int], device: torch.device):
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        cos, sin = rotary.tables(self.grid, device)
        self.register_buffer("cos", cos.detach().clone(), persistent=False)
        self.register_buffer("sin", sin.detach().clone(), persistent=False)

    def tables(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(int(g) for g in grid) != self.grid:
            raise ValueError(f"rotary tables pinned for the grid {self.grid}, asked for {tuple(grid)}")
        return self.cos, self.sin


@contextlib.contextmanager
def export_tables(model, table: ExportTable) -> Iterator[None]:
    """``table`` in every op site of ``model`` (the reference backend for anything dispatched per call);
    the model's own tables are back afterwards."""
    with plans.tables_restored(model), ops.use_backend("reference"):
        for _, module in plans.op_sites(model):
            module.impl = table
        yield


class EncodeGraph(torch.nn.Module):
    """``frames (N, 3, H, W) -> hidden (N, 1 + R + P, d)``: the embeddings and the query-free layers
    (``encode_frames``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.encode_frames(frames)


class QueryGraph(torch.nn.Module):
    """``(frames, hidden, queries (B, Q, d), first (B,) bool) -> (class logits, mask logits, queries to
    carry)``: one frame through the query layers and the head (``query_step``); ``frames`` gives only the
    frame size. Rows whose ``first`` is set start a video from the learned queries (their ``queries`` are
    not read). ``encode_frames`` then this is what a session's ``step`` runs."""

    def __init__(self, model, table: ExportTable):
        super().__init__()
        self.model = model
        self.table = table

    def forward(self, frames: torch.Tensor, hidden: torch.Tensor, queries: torch.Tensor, first: torch.Tensor):
        model = self.model
        self.table.first = first
        try:
            masks, classes, _, carried = model.query_step(hidden, queries, model.grid_for(*frames.shape[-2:]))
        finally:
            self.table.first = None
        return classes, masks, carried


class ImageGraph(torch.nn.Module):
    """EoMT: ``pixel_values (B, 3, H, W) -> (class logits, mask logits)``, masked attention as the
    model's ``attn_mask_probs`` say (computed inside the graph)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.probs = model.check_inputs(torch.zeros(1, model.config.num_channels, *model.config.patch_hw), False)

    def forward(self, pixel_values: torch.Tensor):
        out = self.model._forward(pixel_values, self.probs)
        return out.class_queries_logits, out.masks_queries_logits
