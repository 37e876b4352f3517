"""The research code's VidEoMT on a DINOv3 backbone (tue-mps/videomt), rebuilt on the CPU as a test oracle.

What the research model does at inference, in its own module layout so that its ``state_dict()`` has the
research checkpoint's keys: transformers' ``DINOv3ViTModel`` renamed timm-style (``embeddings`` ->
``patch_embed``, the encoder's ``layer`` -> ``blocks``, no ``mask_token``) inside ``encoder.backbone``; the
query table ``q``, ``query_updater``, ``class_head``, ``mask_head`` (Linear, GELU, Linear, GELU, Linear) and
``upscale`` (transposed conv, GELU, depthwise conv, LayerNorm2d) beside it; one video of ``T`` frames per
call. The early blocks run on every frame; per frame the query blocks run on ``[queries, cls, registers,
patches]`` with the rotary tables of the frame's grid; the queries carried to the next frame are
``query_updater(rows) + q`` where ``rows`` are the last block's query rows, raw or (``norm_queries``, the
research code's ``NORM_QUERIES``) after the backbone's final norm; the head runs on the normalized
outputs. Used only by the tests (never imported by the library).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _ResearchScaleBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # timm's LayerNorm2d: channels last, eps 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(F.gelu(self.conv1(x)))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResearchVideomtDinov3(nn.Module):
    """``forward(frames (T, 3, H, W)) -> (masks (T, Q, 4gh, 4gw), classes (T, Q, C + 1))`` for one video."""

    def __init__(self, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96,
                 num_register_tokens=4, num_queries=7, num_classes=5, num_blocks=2, patch_size=8,
                 use_gated_mlp=False, hidden_act="gelu", norm_queries=False):
        super().__init__()
        import transformers

        config = transformers.DINOv3ViTConfig(
            hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size, num_register_tokens=num_register_tokens, patch_size=patch_size,
            use_gated_mlp=use_gated_mlp, hidden_act=hidden_act, layer_norm_eps=1e-5, rope_theta=100.0,
            attn_implementation="eager",
        )
        backbone = transformers.DINOv3ViTModel(config).eval()
        # the research code's _transformers_to_timm: timm's attribute names, the mask token deleted
        backbone.patch_embed = backbone.embeddings
        backbone.blocks = backbone.model.layer if hasattr(backbone, "model") else backbone.layer
        del backbone.embeddings, backbone.patch_embed.mask_token
        for name in ("model", "layer"):
            if hasattr(backbone, name):
                delattr(backbone, name)
        self.encoder = nn.Module()
        self.encoder.backbone = backbone
        self.num_q, self.num_blocks, self.norm_queries = num_queries, num_blocks, norm_queries
        self.num_prefix_tokens = 1 + num_register_tokens
        self.patch_size = patch_size
        self.register_buffer("attn_mask_probs", torch.ones(num_blocks))
        self.q = nn.Embedding(num_queries, hidden_size)
        self.query_updater = nn.Linear(hidden_size, hidden_size)
        self.class_head = nn.Linear(hidden_size, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size),
                                       nn.GELU(), nn.Linear(hidden_size, hidden_size))
        num_upscale = max(1, int(math.log2(patch_size)) - 2)
        self.upscale = nn.Sequential(*[_ResearchScaleBlock(hidden_size) for _ in range(num_upscale)])
        self.eval()

    def _block(self, block, x, rope):
        x = x + block.layer_scale1(block.attention(block.norm1(x), attention_mask=None, position_embeddings=rope)[0])
        return x + block.layer_scale2(block.mlp(block.norm2(x)))

    def _predict(self, x, grid):
        q = x[:, : self.num_q]
        patches = x[:, self.num_q + self.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return torch.einsum("bqc,bchw->bqhw", self.mask_head(q), self.upscale(patches)), self.class_head(q)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor):
        backbone = self.encoder.backbone
        frames = frames.to(backbone.patch_embed.patch_embeddings.weight.dtype)
        grid = (frames.shape[-2] // self.patch_size, frames.shape[-1] // self.patch_size)
        rope = backbone.rope_embeddings(frames)
        x = backbone.patch_embed(frames)
        blocks = list(backbone.blocks)
        start = len(blocks) - self.num_blocks
        for block in blocks[:start]:
            x = self._block(block, x, rope)
        carried, outputs = None, []
        for t in range(x.shape[0]):
            queries = self.q.weight[None] if carried is None else carried
            frame = torch.cat((queries, x[t:t + 1]), dim=1)
            for block in blocks[start:]:
                frame = self._block(block, frame, rope)
            outputs.append(frame)
            rows = backbone.norm(frame) if self.norm_queries else frame
            carried = self.query_updater(rows[:, : self.num_q]) + self.q.weight[None]
        return self._predict(backbone.norm(torch.cat(outputs)), grid)

    def research_state_dict(self, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
        """The weights as a research checkpoint names them (the detectron2 wrapper's ``backbone.`` prefix)."""
        return {prefix + k: v.detach().clone() for k, v in self.state_dict().items()}
