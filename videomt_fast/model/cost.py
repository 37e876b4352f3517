"""What a frame costs in arithmetic: FLOPs by stage (multiply-add = 2 FLOPs), from the config alone.

Used by the benchmark (MFU) and by the runtime (how much of a CPU frame is arithmetic).
"""

from __future__ import annotations

from typing import Any


def layer_flops(tokens: int, hidden: int, mlp_hidden: int | None = None, swiglu: bool = False) -> int:
    """One pre-norm ViT layer on ``tokens`` tokens: QKV + output projections + MLP + attention.

    With ``mlp_hidden = 4 * hidden`` this is ``24*N*d^2 + 4*N^2*d`` (multiply-add = 2 FLOPs).
    """
    mlp_hidden = 4 * hidden if mlp_hidden is None else mlp_hidden
    mlp = (3 if swiglu else 2) * hidden * mlp_hidden
    projections = 4 * hidden * hidden
    return 2 * tokens * (projections + mlp) + 4 * tokens * tokens * hidden


def frame_flops(config: Any, height: int, width: int, first_frame: bool = False, masked_blocks: int = 0) -> dict[str, int]:
    """FLOPs of one frame at ``height x width``, by stage, and their ``total``.

    ``first_frame`` leaves out the query updater (frame 0 uses the learned queries as they are; EoMT
    has none). ``masked_blocks``: query layers preceded by a mask prediction (EoMT's masked attention
    runs the head, upscale and mask product once more before each of them).
    """
    d = config.hidden_size
    ph, pw = config.patch_hw
    gh, gw = height // ph, width // pw
    patches = gh * gw
    tokens = config.num_prefix_tokens + patches
    queries = config.num_queries
    mlp = config.mlp_hidden_size
    swiglu = bool(config.gated_mlp)  # DINOv2 SwiGLU or DINOv3 gated MLP: three projections
    early = config.num_hidden_layers - config.num_blocks
    out = {
        "patch_embed": 2 * patches * d * config.num_channels * ph * pw,
        "early_layers": early * layer_flops(tokens, d, mlp, swiglu),
        "query_update": 0 if first_frame else 2 * queries * d * d,
        "query_layers": config.num_blocks * layer_flops(tokens + queries, d, mlp, swiglu),
        "head": 2 * queries * (3 * d * d + d * (config.num_labels + 1)),
    }
    upscale = 0
    h, w = gh, gw
    for _ in range(config.num_upscale_blocks):
        h, w = 2 * h, 2 * w
        upscale += 2 * h * w * d * d  # transposed conv 2x2 stride 2: d*d multiply-adds per output pixel
        upscale += 2 * h * w * d * 9  # depthwise 3x3
    out["upscale"] = upscale
    out["mask_einsum"] = 2 * queries * d * h * w
    out["masked_attention_heads"] = masked_blocks * (out["head"] + upscale + out["mask_einsum"])
    out["total"] = sum(out.values())
    return out
