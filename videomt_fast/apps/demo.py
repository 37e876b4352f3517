"""``videomt-fast demo``: segment a synthetic clip with the packaged demo model, offline.

    videomt-fast demo [--out DIR] [--seed N] [--frames N] [--size N] [--devices D]

Draws a clip of moving, occluding shapes (videomt_fast.demo.synthetic), writes it as ``DIR/clip.mp4``,
segments it with ``videomt-fast segment``'s own pipeline and the small model shipped with the package
(``--model demo``), and writes

* ``DIR/segment/clip/``: what ``segment`` writes (``instances.json``, ``instance_ids/*.png`` palette
  PNGs of track ids, ``overlay.mp4``, ``done.json``);
* ``DIR/overlay/*.png``: the overlay's frames as images (tinted, outlined objects with their track
  ids, and a legend of track id, class and score in the corner that hides the objects least).

The demo model was trained only on such clips: it knows circles, squares and triangles on a plain
background and nothing else (on a real video it finds nothing useful).

It then prints where they are, the tracks found, and how they score against the clip's ground truth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videomt-fast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="videomt-demo", help="output folder (default ./videomt-demo)")
    p.add_argument("--seed", type=int, default=1_000_107,
                   help="clip seed (default 1000107: three objects; seeds from 1000000 on were never used in training)")
    p.add_argument("--frames", type=int, default=24, help="clip length in frames (default 24)")
    p.add_argument("--size", type=int, default=384, help="frame side in pixels (default 384)")
    p.add_argument("--devices", default="auto",
                   help="cpu, cuda, cuda:N, or auto (a GPU when there is one), as segment's --devices")
    return p


def _write_clip(path: str, frames: np.ndarray, fps: float) -> None:
    """The clip as an MP4 (nearly lossless), written under a temporary name and renamed into place."""
    from videomt_fast.apps.video_io import Mp4Writer

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}.mp4")
    writer = Mp4Writer(tmp, fps, crf=12)
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.close()
    os.replace(tmp, path)


def _overlay_images(video: str, folder: str) -> int:
    """Every frame of ``video`` as ``folder/<frame>.png`` (the folder is replaced as a whole)."""
    from videomt_fast.apps import video_io

    parent = os.path.dirname(folder)
    tmp = tempfile.mkdtemp(prefix=".overlay.tmp-", dir=parent)
    count = 0
    try:
        for chunk in video_io.iter_chunks(video_io.VideoSource(video, "video"), 8):
            for frame in chunk:
                video_io.write_png(os.path.join(tmp, f"{count:06d}.png"), frame)
                count += 1
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def run_demo(out: str, seed: int = 1_000_107, frames: int = 24, size: int = 384, device: str = "auto",
             progress: bool = False) -> dict:
    """Write the clip, segment it, write the overlay images; returns paths, tracks and scores."""
    import json

    from videomt_fast.apps import segment, video_io
    from videomt_fast.demo import WEIGHTS_DIR
    from videomt_fast.demo.synthetic import make_clip, score_clip

    began = time.perf_counter()
    segment.resolve_devices(device)  # a bad device fails here, before anything is written
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    clip = make_clip(seed, frames, size, supersample=2)
    clip_path = os.path.join(out, "clip.mp4")
    _write_clip(clip_path, clip.frames, fps=8)
    settings = segment.SegmentSettings(model=WEIGHTS_DIR, task="instance", out=os.path.join(out, "segment"),
                                       overlay=True, overwrite=True, threads=1, png_threads=1, decode_workers=1)
    summary = segment.run(settings, [clip_path], devices=device, progress=progress)
    if summary["failed"]:
        raise RuntimeError(segment.format_summary(summary))
    result_dir = os.path.join(settings.out, "clip")
    overlay_dir = os.path.join(out, "overlay")
    _overlay_images(os.path.join(result_dir, "overlay.mp4"), overlay_dir)
    with open(os.path.join(result_dir, "instances.json"), encoding="utf-8") as fh:
        instances = json.load(fh)
    names = sorted(os.listdir(os.path.join(result_dir, "instance_ids")))
    ids = np.stack([video_io.read_png(os.path.join(result_dir, "instance_ids", n)) for n in names])
    return {
        "clip": clip_path, "results": result_dir, "overlay_video": os.path.join(result_dir, "overlay.mp4"),
        "overlay_images": overlay_dir, "frames": frames,
        "tracks": [t for t in instances["tracks"] if t["score"] >= settings.task_threshold()],
        "labels": {c["id"]: c["name"] for c in instances["categories"]},
        "scores": score_clip(ids.astype(np.int64), clip), "seconds": time.perf_counter() - began,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name, low in (("frames", 1), ("size", 32)):
        if getattr(args, name) < low:
            print(f"videomt-fast demo: --{name} must be at least {low}, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"videomt-fast demo: --out {args.out} is a file; expected a folder", file=sys.stderr)
        return 2
    try:
        result = run_demo(args.out, args.seed, args.frames, args.size, args.devices, progress=False)
    except ValueError as exc:  # e.g. --devices cuda without CUDA
        print(f"videomt-fast demo: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # segmenting failed: segment's summary names the reason
        print(f"videomt-fast demo: {exc}", file=sys.stderr)
        return 1
    print(f"videomt-fast demo: {result['frames']} frames segmented in {result['seconds']:.1f} s")
    print(f"  input clip        {result['clip']}")
    print(f"  track ids (PNG)   {os.path.join(result['results'], 'instance_ids')}/  (palette PNGs: ids as stored values)")
    print(f"  tracks (JSON)     {os.path.join(result['results'], 'instances.json')}")
    print(f"  overlay video     {result['overlay_video']}")
    print(f"  overlay images    {result['overlay_images']}/")
    print(f"  {len(result['tracks'])} tracks above the score threshold:")
    for track in result["tracks"]:
        print(f"    track {track['id']:>3}  {track['label']:10s} score {track['score']:.2f}")
    s = result["scores"]
    print(f"  against the clip's ground truth: mean mask IoU {s['iou']:.2f}, track-id consistency "
          f"{s['track_consistency']:.2f} ({s['objects']} objects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
