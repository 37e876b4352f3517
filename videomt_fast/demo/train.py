"""Train the demo VidEoMT on synthetic clips (a tool; the result ships in videomt_fast/demo/weights).

    python -m videomt_fast.demo.train --out DIR [--steps 1800] [--threads 1]

Needs scipy for the matching (it comes with the ``test`` extra: ``pip install -e ".[test]"``).

The model is this package's ``VideomtForUniversalSegmentation`` (its reference path is plain,
differentiable PyTorch), small enough to train on a CPU in minutes: hidden size 96, 6 layers (the
last 3 see the queries), patch 8 on 64x64 frames, 8 queries, 3 classes. Each step draws fresh clips
from :func:`videomt_fast.demo.synthetic.make_clip` (training seeds ``step * batch + i``; the tests
use seeds from ``HELD_OUT_SEED`` on, never seen here) and runs the clip forward, queries propagated
frame to frame, so the propagated queries learn to follow their object.

Loss (Mask2Former, on whole clips as Video Mask2Former does): each clip's objects are matched to
queries once for the clip (Hungarian, scipy), on the cost ``2 * class + 5 * mask BCE + 5 * dice``
over the stacked frames; then cross-entropy of every frame's class logits (matched queries: the
object's class; the rest: no object, weighted by the config's ``no_object_weight``), and for
matched queries binary cross-entropy and dice of the mask logits (bilinearly upsampled to the
frame) against the visible masks of the clip.
Fixed seeds and one thread make a run repeatable on one machine and software stack.

``DIR`` receives ``config.json`` and ``model.safetensors`` (transformers' format, with ``id2label``)
and ``training.json`` (settings, wall time, losses, and the held-out scores of ``evaluate``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from videomt_fast.demo.synthetic import CLASSES, ID2LABEL, make_clip, score_clip

HELD_OUT_SEED = 1_000_000  # evaluation clips use seeds from here on; training seeds stay below


def demo_config():
    from videomt_fast.model.configuration import VideomtConfig

    return VideomtConfig(
        hidden_size=96, num_hidden_layers=6, num_attention_heads=3, num_blocks=3, image_size=64, patch_size=8,
        num_upscale_blocks=1, num_queries=8, num_register_tokens=1, id2label=dict(ID2LABEL),
        # 8 queries for up to 4 objects: no-object rows are about two thirds, not 95% as with 200 queries,
        # so they get half weight instead of Mask2Former's 0.1 (that left unmatched queries scored as objects)
        no_object_weight=0.5,
    )


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights for linears, embeddings and the prefix tokens; zero biases."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.trunc_normal_(module.weight, std=std)
    for name, param in model.named_parameters():
        if name.endswith(("cls_token", "register_tokens")):
            torch.nn.init.trunc_normal_(param, std=std)


def batch_of_clips(seeds: list[int], frames: int, size: int):
    """``(B, T, 3, H, W)`` normalized pixels, per clip (masks ``(T, N, H, W)`` float, class ids ``(N,)``)."""
    from videomt_fast.processing.video_processor import VideomtVideoProcessor

    clips = [make_clip(s, frames, size, supersample=2) for s in seeds]
    video = torch.from_numpy(np.stack([c.frames for c in clips])).permute(0, 1, 4, 2, 3)  # uint8
    processor = VideomtVideoProcessor(size={"height": size, "width": size})
    pixels = processor.preprocess(video.flatten(0, 1))["pixel_values_videos"][0].view(*video.shape)
    targets = [(torch.from_numpy(c.masks).float(), torch.from_numpy(c.class_ids)) for c in clips]
    return pixels.float(), targets


def _pair_costs(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and dice costs ``(Q, N)`` between mask logits ``(Q, P)`` and targets ``(N, P)``."""
    pixels = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    bce = (pos @ target.T + neg @ (1 - target).T) / pixels
    probs = logits.sigmoid()
    dice = 1 - (2 * probs @ target.T + 1) / (probs.sum(1, keepdim=True) + target.sum(1)[None] + 1)
    return bce, dice


def clip_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
              no_object_weight: float = 0.1) -> tuple[torch.Tensor, dict]:
    """One clip: ``class_logits`` ``(T, Q, C+1)``, ``mask_logits`` ``(T, Q, h, w)``, ``masks`` ``(T, N, H, W)``."""
    from scipy.optimize import linear_sum_assignment

    frames, queries, classes = class_logits.shape
    up = F.interpolate(mask_logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    tube = up.permute(1, 0, 2, 3).reshape(queries, -1)  # (Q, T*H*W)
    target = masks.permute(1, 0, 2, 3).reshape(masks.shape[1], -1)  # (N, T*H*W)
    with torch.no_grad():
        probs = class_logits.softmax(-1).mean(0)  # (Q, C+1)
        bce, dice = _pair_costs(tube, target)
        cost = -2.0 * probs[:, labels] + 5.0 * bce + 5.0 * dice
        rows, cols = linear_sum_assignment(cost.numpy())
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    wanted = torch.full((queries,), classes - 1, dtype=torch.long)
    wanted[rows] = labels[cols]
    weight = torch.ones(classes)
    weight[-1] = no_object_weight
    loss_class = F.cross_entropy(class_logits.reshape(-1, classes), wanted.repeat(frames), weight=weight)
    matched, goal = tube[rows], target[cols]
    loss_bce = F.binary_cross_entropy_with_logits(matched, goal)
    probs = matched.sigmoid()
    loss_dice = (1 - (2 * (probs * goal).sum(1) + 1) / (probs.sum(1) + goal.sum(1) + 1)).mean()
    loss = 2.0 * loss_class + 5.0 * loss_bce + 5.0 * loss_dice
    return loss, {"class": loss_class.item(), "bce": loss_bce.item(), "dice": loss_dice.item()}


def evaluate(model_dir: str, seeds: list[int], frames: int = 12, size: int = 128, threads: int = 1) -> dict:
    """Held-out scores through ``videomt-fast segment``'s own path: each clip is written as a frame
    folder, segmented (instance task, default threshold and top-k), and its track-id PNGs are scored
    with :func:`score_clip`. Returns the mean IoU and track consistency and the per-clip scores."""
    from videomt_fast.apps import segment, video_io

    with tempfile.TemporaryDirectory(prefix="videomt-demo-eval-") as tmp:
        clips = {}
        for seed in seeds:
            clip = make_clip(seed, frames, size, supersample=2)
            folder = os.path.join(tmp, "in", f"clip{seed}")
            os.makedirs(folder)
            for t, frame in enumerate(clip.frames):
                video_io.write_png(os.path.join(folder, f"{t:04d}.png"), frame)
            clips[f"clip{seed}"] = clip
        settings = segment.SegmentSettings(model=model_dir, task="instance", out=os.path.join(tmp, "out"),
                                           threads=threads, png_threads=1, decode_workers=1)
        summary = segment.run(settings, [os.path.join(tmp, "in")], devices="cpu", progress=False)
        if summary["failed"]:
            raise RuntimeError(segment.format_summary(summary))
        per_clip = {}
        for name, clip in clips.items():
            folder = os.path.join(tmp, "out", name, "instance_ids")
            pred = np.stack([video_io.read_png(os.path.join(folder, f"{t:04d}.png")) for t in range(frames)])
            per_clip[name] = score_clip(pred.astype(np.int64), clip)
    return {
        "iou": float(np.mean([s["iou"] for s in per_clip.values()])),
        "track_consistency": float(np.mean([s["track_consistency"] for s in per_clip.values()])),
        "clips": per_clip,
    }


def train(out: str, steps: int = 1800, batch: int = 4, frames: int = 4, lr: float = 1e-3, seed: int = 0,
          log_every: int = 50) -> dict:
    from videomt_fast.model.modeling import VideomtForUniversalSegmentation

    torch.manual_seed(seed)
    config = demo_config()
    model = VideomtForUniversalSegmentation(config)
    init_weights(model)
    model.train()
    model.check_finite = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    size = config.image_hw[0]
    began = time.perf_counter()
    history = []
    running: dict[str, float] = {}
    for step in range(steps):
        seeds = [step * batch + i for i in range(batch)]
        assert seeds[-1] < HELD_OUT_SEED
        pixels, targets = batch_of_clips(seeds, frames, size)
        out_ = model(pixel_values_videos=pixels)
        # rows are frame-major: t * B + b
        cls = out_.class_queries_logits.view(frames, batch, *out_.class_queries_logits.shape[1:])
        msk = out_.masks_queries_logits.view(frames, batch, *out_.masks_queries_logits.shape[1:])
        total = 0.0
        for b, (masks, labels) in enumerate(targets):
            loss, parts = clip_loss(cls[:, b], msk[:, b], masks, labels, config.no_object_weight)
            total = total + loss / batch
            for k, v in parts.items():
                running[k] = running.get(k, 0.0) + v / batch
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running["loss"] = running.get("loss", 0.0) + total.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = log_every if (step + 1) % log_every == 0 else (step + 1) % log_every
            row = {"step": step + 1, "seconds": round(time.perf_counter() - began, 1),
                   **{k: round(v / n, 4) for k, v in running.items()}}
            history.append(row)
            print(json.dumps(row), flush=True)
            running = {}
    seconds = time.perf_counter() - began
    model.eval()
    model.save_pretrained(out)
    return {"steps": steps, "batch_clips": batch, "frames_per_clip": frames, "lr": lr, "seed": seed,
            "train_seconds": round(seconds, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "classes": list(CLASSES), "history": history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videomt_fast.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for config.json, model.safetensors, training.json")
    parser.add_argument("--steps", type=int, default=1800, help="optimizer steps (default 1800)")
    parser.add_argument("--batch", type=int, default=4, help="clips per step (default 4)")
    parser.add_argument("--frames", type=int, default=4, help="frames per training clip (default 4)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialization seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1: fastest on a small shared CPU)")
    parser.add_argument("--eval-clips", type=int, default=8, help="held-out clips scored at the end (default 8)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "frames", "threads"):
        if getattr(args, name) < 1:
            print(f"python -m videomt_fast.demo.train: --{name} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        print("python -m videomt_fast.demo.train: needs scipy for the Hungarian matching (pip install scipy)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    record = train(args.out, args.steps, args.batch, args.frames, args.lr, args.seed)
    if args.eval_clips > 0:
        began = time.perf_counter()
        scores = evaluate(args.out, [HELD_OUT_SEED + i for i in range(args.eval_clips)], threads=args.threads)
        record["held_out"] = {"seeds": [HELD_OUT_SEED, HELD_OUT_SEED + args.eval_clips - 1], "frames": 12,
                              "size": 128, "iou": round(scores["iou"], 4),
                              "track_consistency": round(scores["track_consistency"], 4),
                              "seconds": round(time.perf_counter() - began, 1)}
        print(f"held-out: IoU {scores['iou']:.3f}, track consistency {scores['track_consistency']:.3f}")
    with open(os.path.join(args.out, "training.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
    print(f"trained in {record['train_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
