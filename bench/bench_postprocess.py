"""Post-processing per frame at 480p / 720p / 1080p: videomt_fast (CUDA kernels and the PyTorch
reference on GPU) vs transformers' VideomtVideoProcessor, same logits, CUDA events, median of repeats.

    python bench/bench_postprocess.py [--queries 200] [--classes 40] [--frames 4] [--repeats 20]

Writes <results folder>/postprocess-<device>-<time>.json ($VIDEOMT_FAST_RESULTS_DIR, else
~/.cache/videomt_fast/results) (temporary name, then rename). Exits with a
message when CUDA is unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' random mask-logit generator

RESOLUTIONS = {"480p": (480, 854), "720p": (720, 1280), "1080p": (1080, 1920)}


def _logits(frames, queries, classes, seed):
    from test_postprocess import random_outputs

    out = random_outputs(frames, queries, classes, 160, 160, seed=seed, layout="cells")
    return SimpleNamespace(
        class_queries_logits=out.class_queries_logits.cuda(), masks_queries_logits=out.masks_queries_logits.cuda()
    )


def _time(fn, inputs, repeats):
    for x in inputs[:2]:
        fn(x)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        x = inputs[i % len(inputs)]  # rotate input buffers
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-transformers", action="store_true", help="transformers needs ~Q*H*W*4 bytes per frame")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_postprocess: CUDA is not available; nothing to measure.")
        return 0

    from videomt_fast import ops
    from videomt_fast.apps import hf_source
    from videomt_fast.ops import _ext
    from videomt_fast.processing.video_processor import VideomtVideoProcessor

    ours = VideomtVideoProcessor()
    hf, _ = hf_source.videomt_video_processor()
    ext_ok = _ext.load() is not None
    inputs = [_logits(args.frames, args.queries, args.classes, seed) for seed in range(3)]
    rows = []
    tasks = {
        "semantic": lambda p, o, s: p.post_process_semantic_segmentation(o, s),
        "instance": lambda p, o, s: p.post_process_instance_segmentation(o, s, threshold=0.5),
        "panoptic": lambda p, o, s: p.post_process_panoptic_segmentation(o, s, threshold=0.8),
    }
    providers = [("videomt_fast-cuda", ours, "cuda"), ("videomt_fast-reference", ours, "reference")]
    if not args.skip_transformers:
        providers.append(("transformers", hf, None))
    for res, size in RESOLUTIONS.items():
        sizes = [size] * args.frames
        for task, call in tasks.items():
            for name, proc, backend in providers:
                if backend == "cuda" and not ext_ok:
                    continue
                fn = lambda o: call(proc, o, sizes)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                try:
                    if backend is None:
                        times = _time(fn, inputs, args.repeats)
                    else:
                        with ops.use_backend(backend):
                            times = _time(fn, inputs, args.repeats)
                except torch.cuda.OutOfMemoryError as exc:
                    rows.append({"resolution": res, "task": task, "provider": name, "error": f"OOM: {exc}"[:200]})
                    continue
                per_frame = [t / args.frames for t in times]
                row = {
                    "resolution": res, "task": task, "provider": name,
                    "ms_per_frame_median": statistics.median(per_frame),
                    "ms_per_frame_p90": sorted(per_frame)[int(0.9 * (len(per_frame) - 1))],
                    "peak_extra_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
                }
                rows.append(row)
                print(json.dumps(row))
    for res in RESOLUTIONS:
        for task in tasks:
            base = [r for r in rows if r["resolution"] == res and r["task"] == task and r["provider"] == "transformers" and "ms_per_frame_median" in r]
            for r in rows:
                if base and r["resolution"] == res and r["task"] == task and "ms_per_frame_median" in r:
                    r["speedup_vs_transformers"] = base[0]["ms_per_frame_median"] / r["ms_per_frame_median"]
    record = {
        "benchmark": "postprocess",
        "device": torch.cuda.get_device_name(),
        "driver": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": vars(args) | {"mask_size": [160, 160]},
        "extension": "loaded" if ext_ok else f"unavailable: {_ext.error()}",
        "rows": rows,
    }
    from videomt_fast.apps.benchmark import results_dir

    out_dir = Path(results_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"postprocess-{torch.cuda.get_device_name().replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = out_dir / (name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out_dir / name)
    print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
