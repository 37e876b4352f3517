"""The command line: ``videomt-fast segment`` and :func:`run`, which both it and library callers use.

Exit status: 0 when every video is done (or was already), 1 when any failed, 2 with one line on stderr
for misuse (devices, ``--out``, list files, thresholds, options), before any work, and 130 after Ctrl-C
(the summary says what finished; a rerun resumes). A closed stdout (``| head``) does not change it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable

from videomt_fast.apps import video_io
from videomt_fast.apps.segment.engine import resolve_dtype
from videomt_fast.apps.segment.jobs import Job, assign_names, job_identity, model_identity, result
from videomt_fast.apps.segment.locking import VideoLock, remove_stale_partials
from videomt_fast.apps.segment.pipeline import decide, segment_videos
from videomt_fast.apps.segment.processes import run_multi
from videomt_fast.apps.segment.ray_tasks import run_ray
from videomt_fast.apps.segment.settings import TASKS, SegmentSettings
from videomt_fast.demo import resolve_model


class UsageError(ValueError):
    """A command line that cannot run (bad device, output folder, list file): one line, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run`, once what was under way is cleaned up: ``summary`` says what finished."""

    def __init__(self, summary: dict):
        super().__init__("interrupted")
        self.summary = summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="videomt-fast segment",
        description="Segment videos and frame folders offline with a VidEoMT model; resumable.",
    )
    p.add_argument("inputs", nargs="+", help="video files, folders (recursive), frame folders, or .txt lists of paths")
    p.add_argument("--model", required=True, help="save_pretrained folder, hub id, research .pth, or demo (the small packaged model)")
    p.add_argument("--task", choices=TASKS, default="instance",
                   help="instance (default): tracks, instances.json and track-id PNGs; semantic: class-map PNGs; "
                        "panoptic: PNGs and panoptic.json")
    p.add_argument("--out", required=True, help="output folder (one subfolder per video)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, help="square input side (default: the config's image_size, as transformers)")
    size.add_argument("--short-side", type=int, help="keep the aspect ratio: resize the short side to N, pad to the patch size")
    p.add_argument("--chunk-size", type=int, default=16, help="frames per early-layer batch (bounds memory; default 16)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--engine", choices=["chunk", "session"], default="chunk",
                   help="chunk: early layers batched per chunk; session: one frame per step (CUDA graphs with --fast)")
    p.add_argument("--fast", action="store_true", help="model.optimize(): fused kernels, CUDA-graph sessions")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: export the frame step to ONNX once and run it on ONNX Runtime (one frame per step)")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch threads on a CPU device (0 = PyTorch's default); on a shared or small CPU, "
                        "1 avoids oversubscribing the cores next to the decoder and PNG threads")
    p.add_argument("--devices", default="auto", help="comma list (cuda:0,cuda:1,cpu) or auto (every GPU, else cpu)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run one Ray task per video (ADDRESS of a cluster, or none for the default/local one)")
    p.add_argument("--decoder", choices=["auto", "pyav", "torchcodec"], default="auto",
                   help="video decoder (auto: PyAV, which sees damaged frames; torchcodec checks only the frame count)")
    p.add_argument("--decode-workers", type=int, default=2, help="videos decoded ahead in parallel per device")
    p.add_argument("--decode-threads", type=int, default=0, help="FFmpeg threads per decoder (0 = automatic)")
    p.add_argument("--prefetch-chunks", type=int, default=2, help="decoded chunks queued per video")
    p.add_argument("--png-threads", type=int, default=2, help="threads encoding and writing PNGs (default 2)")
    p.add_argument("--png-level", type=int, default=3, help="zlib level for PNGs (0-9)")
    p.add_argument("--threshold", type=float, help="score threshold (default 0.5 instance, 0.8 panoptic)")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="panoptic mask threshold")
    p.add_argument("--overlap-threshold", type=float, default=0.8, help="panoptic overlap mask area threshold")
    p.add_argument("--top-k", type=int, default=10, help="instance: video-level tracks kept (default 10)")
    p.add_argument("--fuse-labels", default="", help="panoptic: comma list of label ids to fuse (stuff)")
    p.add_argument("--overlay", action="store_true", help="also write overlay.mp4 (tinted, outlined regions, their ids and a legend)")
    p.add_argument("--overwrite", action="store_true", help="redo videos that are already done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from_args(args: argparse.Namespace) -> SegmentSettings:
    try:
        fuse = [int(v) for v in args.fuse_labels.split(",") if v.strip()] if args.fuse_labels else []
    except ValueError:
        raise ValueError(f"--fuse-labels must be a comma list of label ids, got {args.fuse_labels!r}") from None
    return SegmentSettings(
        model=resolve_model(args.model), task=args.task, out=os.path.abspath(args.out), size=args.size, short_side=args.short_side,
        chunk_size=args.chunk_size, dtype=args.dtype, engine=args.engine, fast=args.fast, threads=args.threads,
        decoder=args.decoder,
        decode_workers=args.decode_workers, decode_threads=args.decode_threads, prefetch_chunks=args.prefetch_chunks,
        png_threads=args.png_threads, png_level=max(0, min(9, args.png_level)), threshold=args.threshold,
        mask_threshold=args.mask_threshold, overlap_threshold=args.overlap_threshold, fuse_labels=fuse,
        overlay=args.overlay, overwrite=args.overwrite, top_k=args.top_k, runtime=args.runtime,
    ).validate()


def resolve_devices(spec: str) -> list[str]:
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices:
        raise UsageError(f"--devices {spec!r}: empty list; expected auto or a comma list such as cuda:0,cuda:1 or cpu")
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise UsageError(f"--devices {spec}: {d!r} is not a device; expected cpu, cuda or cuda:N")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--devices {spec}: {d} asked for, but CUDA is not available here")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise UsageError(f"--devices {spec}: {d} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return devices


def _progress_bar(total: int | None, enabled: bool):
    try:
        from tqdm import tqdm
    except Exception:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, unit="frame", dynamic_ncols=True, disable=not enabled, smoothing=0.1, file=sys.stderr)


def torch_device_type(device: str) -> str:
    return device.split(":")[0]


def _prepare_out(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--out {out}: is a file; expected a folder (it is created if missing)") from None
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: the folder is not writable")


def run(settings: SegmentSettings, inputs: list[str], devices: str = "auto", ray_address: str | None = None,
        progress: bool = True) -> dict:
    """Segment ``inputs``; returns the summary (also what ``main`` prints).

    Raises :class:`UsageError` before any work when the devices, the output folder or a list file
    cannot be used, and :class:`Interrupted` (a ``KeyboardInterrupt`` holding the summary) after Ctrl-C.
    """
    began = time.perf_counter()
    try:
        settings.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    device_list = resolve_devices(devices) if ray_address is None else []
    if settings.dtype == "auto" and len({torch_device_type(d) for d in device_list}) == 1:
        # recorded in done.json as what runs (bfloat16 on CUDA, float32 on a CPU), not as "auto"
        settings = replace(settings, dtype=str(resolve_dtype("auto", device_list[0], settings.runtime)).replace("torch.", ""))
    _prepare_out(settings.out)
    try:  # the output folder is never searched for inputs (a rerun would segment the results)
        sources, problems = video_io.discover_inputs(inputs, exclude=[settings.out])
    except video_io.InputListError as exc:
        raise UsageError(str(exc)) from None
    assign_names(sources, settings.out)
    results: list[dict] = [
        {"name": os.path.basename(p.rstrip(os.sep)) or p, "path": p, "status": "failed", "frames": 0, "seconds": 0.0, "error": f"{p}: {why}"}
        for p, why in problems
    ]
    todo: list[Job] = []
    model = model_identity(settings.model)
    for source in sources:
        job = Job(source, os.path.join(settings.out, source.name))
        try:
            job.identity = job_identity(source, settings, model)
        except OSError as exc:
            results.append(result(job, "failed", error=f"{source.path}: cannot read ({exc.strerror or exc})"))
            continue
        action, why = decide(job, settings)
        if action == "run":
            todo.append(job)
        elif action == "skip":
            results.append(result(job, "skipped"))
            lock = VideoLock.acquire(settings.out, job.name, wait=False)
            if lock is not None:  # finished: leftovers of runs that died on it are garbage
                remove_stale_partials(settings.out, job.name)
                lock.release()
        else:
            results.append(result(job, "failed", error=why))

    def count(job: Job) -> int | None:
        try:
            return video_io.probe(job.source, rotation=False).num_frames
        except Exception:
            return 0  # unreadable: reported when its turn comes

    # frame counts for the bar's ETA (a container that does not say makes it open-ended)
    with ThreadPoolExecutor(8) as pool:
        counts_per_video = list(pool.map(count, todo))
    total = None if any(n is None for n in counts_per_video) else sum(counts_per_video)
    bar = _progress_bar(total, progress and bool(todo))
    counts = {"done": 0, "failed": 0}
    lock = threading.Lock()

    def show(action: Callable[[Any], Any]) -> None:
        """Progress output never stops the run: a closed stderr (piped into ``head``) turns the bar off."""
        nonlocal bar
        if bar is None:
            return
        try:
            action(bar)
        except (OSError, ValueError):
            bar = None

    def on_event(kind: str, payload: Any) -> None:
        with lock:
            if kind == "frames":
                show(lambda b: b.update(payload))
            elif kind == "result":
                results.append(payload)
                if payload["status"] in counts:
                    counts[payload["status"]] += 1
                if payload["status"] == "failed" and progress:
                    # named as it happens; its reason is printed once, in the summary
                    name = printable(payload["name"])
                    show(lambda b: b.write(f"failed: {name} (the reason is in the summary)", file=sys.stderr))
                show(lambda b: b.set_postfix(videos=counts["done"], failed=counts["failed"], refresh=False))

    interrupted = False
    try:
        if todo:
            if ray_address is not None:
                run_ray(todo, settings, ray_address, on_event)
            elif len(device_list) == 1:
                segment_videos(todo, settings, device_list[0], on_event)
            else:
                run_multi(todo, settings, device_list, on_event)
    except KeyboardInterrupt:  # Ctrl-C: what finished stands, the rest is reported as interrupted
        interrupted = True
    finally:
        show(lambda b: b.close())
    seconds = time.perf_counter() - began
    reported = {r["name"] for r in results}
    for job in todo:  # never lose a video silently
        if job.name not in reported:
            if interrupted:
                results.append(result(job, "interrupted", error=f"{job.source.path}: interrupted"))
            else:
                results.append(result(job, "failed", error=f"{job.source.path}: no result reported"))
    frames = sum(r["frames"] for r in results if r["status"] == "done")
    summary = {
        "videos": len(results),
        "done": sum(r["status"] == "done" for r in results),
        "skipped": sum(r["status"] == "skipped" for r in results),
        "failed": sum(r["status"] == "failed" for r in results),
        "interrupted": sum(r["status"] == "interrupted" for r in results),
        "frames": frames,
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 3) if seconds > 0 else 0.0,
        "results": results,
    }
    if interrupted:
        raise Interrupted(summary)
    return summary


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 shown as escapes (``bad\\xff.mp4``)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def format_summary(summary: dict) -> str:
    interrupted = summary.get("interrupted", 0)
    lines = [
        f"segment: {summary['videos']} videos: {summary['done']} done, {summary['skipped']} skipped (already done), "
        f"{summary['failed']} failed" + (f", {interrupted} interrupted (a rerun resumes)" if interrupted else "")
        + f"; {summary['frames']} frames in {summary['seconds']:.1f} s ({summary['fps']:.1f} frames/s)"
    ]
    for r in summary["results"]:
        if r["status"] == "failed":
            lines.append(f"  FAILED {r['name']}: {(r['error'] or '').splitlines()[0] if r['error'] else ''}")
    return printable("\n".join(lines))


def _one_line_error(message: str):
    print(f"videomt-fast segment: {message} (see --help)", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.error = _one_line_error  # misuse: one line on stderr, exit status 2
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from_args(args)
        video_io.resolve_decoder(settings.decoder)
        if args.ray is not None:
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise ValueError("--ray needs Ray: pip install 'ray[default]'")
    except ValueError as exc:
        print(f"videomt-fast segment: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(settings, args.inputs, devices=args.devices, ray_address=args.ray,
                      progress=not args.no_progress)
    except UsageError as exc:
        print(f"videomt-fast segment: {printable(str(exc))}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        summary = exc.summary
    except KeyboardInterrupt:
        print("videomt-fast segment: interrupted before any video started", file=sys.stderr)
        return 130
    try:
        print(format_summary(summary), flush=True)
    except BrokenPipeError:  # the reader of stdout is gone; the work stands, and so does the exit status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if summary["interrupted"]:
        return 130
    return 1 if summary["failed"] else 0
