"""Deterministic synthetic videos with ground truth: moving, occluding shapes of a few classes.

A clip is drawn from one seed: a smooth random background, one to four shapes (circle, square,
triangle; each class in its own family of hues, reds, greens and blues, varied in hue, saturation
and brightness, so that a small model learns the classes quickly), each moving at constant velocity
and bouncing off the frame edges, painted back to front so that later shapes occlude earlier ones. The scene is
described in coordinates relative to the frame, so the same seed rendered at 64x64 or 256x256 shows
the same video. The ground truth is what is visible: per frame, one mask per object after occlusion,
with the object's class id and track id (1, 2, ... in painting order, stable through the clip).

:func:`make_clip` draws a clip; :func:`score_clip` compares predicted per-frame track-id maps with a
clip's ground truth (per-frame mask IoU of matched tracks, and how consistently each object keeps
one predicted id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("circle", "square", "triangle")
ID2LABEL = dict(enumerate(CLASSES))
_HUES = (0.0, 0.33, 0.62)  # red circles, green squares, blue triangles (centre of each class's hue range)


@dataclass
class Clip:
    """One synthetic clip and its ground truth."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    masks: np.ndarray  # (T, N, H, W) bool: what is visible of each object in each frame
    class_ids: np.ndarray  # (N,) int64, indices into CLASSES
    track_ids: np.ndarray  # (N,) int64, 1..N

    def id_maps(self) -> np.ndarray:
        """``(T, H, W)`` int64: each pixel's track id, 0 = background."""
        ids = np.zeros(self.frames.shape[:3], np.int64)
        for n, track in enumerate(self.track_ids):
            ids[self.masks[:, n]] = track
        return ids


def _inside(kind: str, y: np.ndarray, x: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Points ``(y, x)`` (frame-relative, y and x scaled by the frame's short side) inside a shape."""
    dy, dx = y - cy, x - cx
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        half = 0.85 * r
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    # triangle: apex up at cy - r, base at cy + 0.75 r, base half-width 1.05 r
    depth = (dy + r) / (1.75 * r)
    return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= 1.05 * r * depth)


def _bounce(start: float, velocity: float, t: int, low: float, high: float) -> float:
    """Position at frame ``t`` of a point moving at ``velocity``, reflected at ``low`` and ``high``."""
    span = high - low
    if span <= 0:
        return (low + high) / 2
    p = (start - low + velocity * t) % (2 * span)
    return low + (p if p <= span else 2 * span - p)


def make_clip(
    seed: int,
    num_frames: int = 8,
    size: int | tuple[int, int] = 64,
    max_objects: int = 4,
    supersample: int = 4,
    noise: float = 4.0,
) -> Clip:
    """The clip of ``seed``: ``num_frames`` frames of ``size`` (side or ``(height, width)``).

    ``supersample`` renders colours on an ``s x s`` grid per pixel and averages it (soft edges, as a
    downscaled camera frame has); masks are sampled at pixel centres. ``noise`` is the standard
    deviation of per-pixel Gaussian noise (0-255 scale), drawn from the same seed.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 8 or width < 8:
        raise ValueError(f"size must be at least 8x8, got {height}x{width}")
    if num_frames < 1 or max_objects < 1 or supersample < 1:
        raise ValueError(f"num_frames, max_objects and supersample must be positive, got {num_frames}, "
                         f"{max_objects}, {supersample}")
    rng = np.random.default_rng(seed)
    short = min(height, width)
    ext_y, ext_x = height / short, width / short  # frame extent in short-side units

    # background: a gradient between two muted colours in a random direction
    angle = rng.uniform(0, 2 * np.pi)
    low, high = rng.uniform(30, 110, 3), rng.uniform(110, 190, 3)
    count = int(rng.integers(1, max_objects + 1))
    objects = []
    for _ in range(count):
        label = int(rng.integers(len(CLASSES)))
        kind = CLASSES[label]
        r = rng.uniform(0.11, 0.2)
        hue = (_HUES[label] + rng.uniform(-0.07, 0.07)) % 1.0
        colour = 255 * np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)  # saturated hue
        colour = np.clip(colour * rng.uniform(0.75, 1.0) + rng.uniform(0, 40), 0, 255)
        start = (rng.uniform(r, ext_y - r), rng.uniform(r, ext_x - r))
        speed, heading = rng.uniform(0.02, 0.05), rng.uniform(0, 2 * np.pi)
        objects.append((kind, r, colour, start, (speed * np.sin(heading), speed * np.cos(heading))))

    s = supersample
    sub = (np.arange(s) + 0.5) / s
    ys = ((np.arange(height)[:, None] + sub[None, :]).ravel()) / short  # (H*s,)
    xs = ((np.arange(width)[:, None] + sub[None, :]).ravel()) / short
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    cy_, cx_ = np.meshgrid((np.arange(height) + 0.5) / short, (np.arange(width) + 0.5) / short, indexing="ij")
    ramp = (yy / ext_y * np.sin(angle) + xx / ext_x * np.cos(angle) + 1) / 2
    background = low + (high - low) * ramp[..., None]

    frames = np.empty((num_frames, height, width, 3), np.uint8)
    masks = np.zeros((num_frames, count, height, width), bool)
    for t in range(num_frames):
        image = background.copy()
        covered = np.zeros((height, width), bool)
        centres = []
        for kind, r, colour, (y0, x0), (vy, vx) in objects:
            cy = _bounce(y0, vy, t, r, ext_y - r)
            cx = _bounce(x0, vx, t, r, ext_x - r)
            centres.append((kind, cy, cx, r))
            image[_inside(kind, yy, xx, cy, cx, r)] = colour
        for n in range(count - 1, -1, -1):  # front to back: what is not yet covered is visible
            kind, cy, cx, r = centres[n]
            shape = _inside(kind, cy_, cx_, cy, cx, r)
            masks[t, n] = shape & ~covered
            covered |= shape
        image = image.reshape(height, s, width, s, 3).mean(axis=(1, 3))
        if noise > 0:
            image = image + rng.normal(0, noise, image.shape)
        frames[t] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    class_ids = np.array([CLASSES.index(o[0]) for o in objects], np.int64)
    return Clip(frames, masks, class_ids, np.arange(1, count + 1, dtype=np.int64))


def _match(iou: np.ndarray) -> list[tuple[int, int]]:
    """Greedy one-to-one matching on an IoU matrix (largest first, positive IoU only)."""
    pairs = []
    iou = iou.astype(np.float64).copy()
    while iou.size and iou.max() > 0:
        g, p = np.unravel_index(int(iou.argmax()), iou.shape)
        pairs.append((int(g), int(p)))
        iou[g, :] = -1
        iou[:, p] = -1
    return pairs


def score_clip(pred_ids: np.ndarray, clip: Clip) -> dict:
    """Compare predicted track-id maps ``(T, H, W)`` (0 = none) with the clip's ground truth.

    Predicted tracks are matched one-to-one to the objects over the whole clip (greedy, by IoU of the
    masks stacked over all frames). Returns:

    * ``iou``: mean per-frame mask IoU of each object with its matched predicted track, over the
      frames where the object is visible (0 for an unmatched object);
    * ``track_consistency``: over the same (object, frame) pairs, the fraction where the predicted
      id covering most of the object is the object's matched track id (1 = the id never switches
      and never drops out);
    * ``objects``, ``frames``: how many (object, visible frame) pairs were scored.
    """
    pred_ids = np.asarray(pred_ids)
    if pred_ids.shape != clip.frames.shape[:3]:
        raise ValueError(f"pred_ids must be (T, H, W) = {clip.frames.shape[:3]}, got {pred_ids.shape}")
    gt = clip.masks  # (T, N, H, W)
    labels = [int(v) for v in np.unique(pred_ids) if v != 0]
    pred = np.stack([pred_ids == v for v in labels], axis=1) if labels else np.zeros(gt.shape[:1] + (0,) + gt.shape[2:], bool)
    inter = np.einsum("tnhw,tphw->np", gt.astype(np.float32), pred.astype(np.float32))
    union = gt.sum((0, 2, 3))[:, None] + pred.sum((0, 2, 3))[None, :] - inter
    matched = dict(_match(np.where(union > 0, inter / np.maximum(union, 1), 0)))
    ious, consistent = [], []
    for n in range(gt.shape[1]):
        for t in range(gt.shape[0]):
            mask = gt[t, n]
            if not mask.any():
                continue
            p = matched.get(n)
            if p is None:
                ious.append(0.0)
                consistent.append(False)
                continue
            both = np.logical_and(mask, pred[t, p]).sum()
            ious.append(float(both / np.logical_or(mask, pred[t, p]).sum()))
            covering = np.bincount(pred_ids[t][mask].ravel())
            covering[0] = 0  # background never counts as keeping the id
            consistent.append(bool(covering.max() > 0 and int(covering.argmax()) == labels[p]))
    return {
        "iou": float(np.mean(ious)) if ious else 1.0,
        "track_consistency": float(np.mean(consistent)) if consistent else 1.0,
        "objects": int(gt.shape[1]),
        "frames": len(ious),
    }


__all__ = ["CLASSES", "ID2LABEL", "Clip", "make_clip", "score_clip"]
