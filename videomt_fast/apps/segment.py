"""``videomt-fast segment``: offline segmentation of many videos, resumable, on one or more devices.

    videomt-fast segment INPUTS... --model DIR_OR_HUB_ID --task instance|semantic|panoptic --out DIR

INPUTS are video files, folders (searched recursively; a folder holding images is one video made of
those frames, in natural order) and text files listing such paths (one per line, ``#`` comments,
relative paths resolved from the list's folder).

Per video the outputs go to ``OUT/<video name>/``:

* ``instance``: ``instances.json`` (YouTube-VIS style results: one entry per track with a score, a
  1-based YouTube-VIS category id (label + 1) and one RLE mask, or null, per frame) and ``instance_ids/<frame>.png`` (track ids, 0 = none);
* ``semantic``: ``semantic/<frame>.png`` (class ids);
* ``panoptic``: ``panoptic/<frame>.png`` (COCO panoptic colour encoding, ``id = R + 256 G + 256^2 B``,
  0 = void) and ``panoptic.json`` (per-frame ``segments_info``);
* ``overlay.mp4`` with ``--overlay``;
* ``done.json`` last: the completion marker. It records what produced the folder (the source's real
  path, size and a hash of its first and last 64 KiB; the model's path and a hash of its files, or its hub
  id; the task and the settings that change results). A rerun skips a video whose marker matches, and
  refuses one whose marker does not (naming ``--overwrite``) instead of skipping it with stale results.

A video is written under ``OUT/.<name>.tmp-*`` and renamed into place only once complete, so a killed
run never leaves a half-written ``OUT/<name>``; ``--overwrite`` renames the old folder aside first and
removes it after the new one is in place. Each video is claimed with a lock file ``OUT/.<name>.lock``
(``flock``: released by the kernel when its process dies), so runs sharing one ``--out`` never work on
one video at once or delete each other's temporary folders; a video claimed elsewhere is waited for at
the end. Leftovers of dead runs are removed when their video is claimed. Id PNGs are 8-bit palette PNGs
(the stored values are the ids; a viewer shows them in the overlay's colours) when every value fits,
16-bit grayscale otherwise. A name whose folder holds another source's results gets the ``name-<hash>`` form
that two inputs of one run with the same name get; a source keeps the folder that records it.

Pipeline (per device): decoder threads fill bounded per-video queues with uint8 frame chunks; the
main thread uploads a chunk, resizes and normalizes it on the device, runs the early layers on the
whole chunk and the query layers frame by frame with the propagated queries carried across chunks
(memory is bounded by the chunk, not the video), post-processes on the device, and hands CPU maps to
a writer thread (bounded queue) that encodes PNGs in a small thread pool. Several devices run one
process each over a shared work queue; ``--ray`` runs one Ray task per video instead. On a CPU device
``--threads N`` sets PyTorch's thread count (on a small or shared CPU, 1 keeps the decoder and PNG
threads from oversubscribing the cores); ``--fast`` there runs the same reference ops as without it.

Videos are decoded upright (a display-matrix rotation is applied and recorded); one that decodes fewer
frames than its container lists, or holds corrupt data, fails by name. A dead writer thread fails the
run at once; a device worker exits when its parent dies, and a dead worker's unfinished videos are run
again by the others. Exit status: 0 when every video is done (or was already), 1 when any failed, 2 with
one line on stderr for misuse (devices, ``--out``, list files, thresholds, options), before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from videomt_fast.apps import video_io, visualize
from videomt_fast.apps.video_io import VideoReadError, VideoSource
from videomt_fast.demo import resolve_model

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: videos are not locked against other runs
    fcntl = None

DONE_MARKER = "done.json"
KILL_AFTER_FRAMES_ENV = "VIDEOMT_FAST_SEGMENT_KILL_AFTER_FRAMES"  # test hook: SIGKILL self after N frames written
KILL_ONCE_ENV = "VIDEOMT_FAST_SEGMENT_KILL_ONCE"  # test hook: a file path; only the process that creates it is killed
TASKS = ("instance", "semantic", "panoptic")


class UsageError(ValueError):
    """A command line that cannot run (bad device, output folder, list file): one line, exit status 2."""


class WriterError(RuntimeError):
    """The writer thread died: nothing more can be written, so the run stops at once."""


# ---------------------------------------------------------------------------------- settings


@dataclass
class SegmentSettings:
    model: str
    task: str
    out: str
    size: int | None = None  # square side; None = config.image_size
    short_side: int | None = None  # keep aspect: short side to this, pad to the patch size
    chunk_size: int = 16
    dtype: str = "auto"
    engine: str = "chunk"  # "chunk": early layers batched over a chunk; "session": model.new_session()
    fast: bool = False  # model.optimize() (bf16 weights, fused kernels, CUDA graphs for sessions)
    runtime: str = "torch"  # "onnxruntime": the exported step graph on ONNX Runtime (apps/segment_ort.py)
    threads: int = 0  # torch intra-op threads on a CPU device; 0 = PyTorch's default
    decoder: str = "auto"
    decode_workers: int = 2
    decode_threads: int = 0
    prefetch_chunks: int = 2
    png_threads: int = 2
    png_level: int = 3
    threshold: float | None = None
    mask_threshold: float = 0.5
    overlap_threshold: float = 0.8
    fuse_labels: list[int] = field(default_factory=list)
    top_k: int = 10  # instance: video-level (query, class) pairs kept
    overlay: bool = False
    overwrite: bool = False

    def task_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.8 if self.task == "panoptic" else 0.5


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
                   help="video decoder (auto: torchcodec when importable, else PyAV)")
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
    for name in ("chunk_size", "decode_workers", "prefetch_chunks", "png_threads", "top_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (PyTorch's default) or more, got {args.threads}")
    for name in ("size", "short_side"):
        value = getattr(args, name)
        if value is not None and value < 16:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 16, got {value}")
    for name in ("threshold", "mask_threshold", "overlap_threshold"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:  # NaN fails the comparison too
            raise ValueError(f"--{name.replace('_', '-')} must be a number from 0 to 1, got {value}")
    from videomt_fast.apps.segment_ort import check_settings

    check_settings(args.runtime, args.dtype, args.fast)
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
    )


# ---------------------------------------------------------------------------------- jobs and markers


@dataclass
class Job:
    source: VideoSource
    out_dir: str  # final folder OUT/<name>
    identity: dict = field(default_factory=dict)  # what produces its results; recorded in done.json
    lock: Any = field(default=None, repr=False, compare=False)  # VideoLock while this process holds the video

    @property
    def name(self) -> str:
        return self.source.name


def is_done(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, DONE_MARKER))


_WEIGHT_FILES = (".json", ".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def model_identity(model: str) -> dict:
    """A local checkpoint: its real path and a hash of its files' names, sizes and first and last MiB;
    a hub id: the id as given."""
    if not os.path.exists(model):
        return {"hub_id": model}
    real = os.path.realpath(model)
    if os.path.isdir(real):
        files = sorted(os.path.join(real, n) for n in os.listdir(real) if n.endswith(_WEIGHT_FILES))
    else:
        files = [real]
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.basename(path).encode() + b"\0")
        digest.update(video_io.sampled_sha256(path).encode())
    return {"path": real, "sha256": digest.hexdigest()}


def result_settings(settings: SegmentSettings) -> dict:
    """The settings that change a video's results (recorded in done.json and compared on resume)."""
    out = {"task": settings.task, "size": settings.size, "short_side": settings.short_side,
           "dtype": settings.dtype, "fast": settings.fast, "overlay": settings.overlay}
    if settings.runtime != "torch":
        out["runtime"] = settings.runtime
    if settings.task == "instance":
        out.update(threshold=settings.task_threshold(), top_k=settings.top_k)
    elif settings.task == "panoptic":
        out.update(threshold=settings.task_threshold(), mask_threshold=settings.mask_threshold,
                   overlap_threshold=settings.overlap_threshold, fuse_labels=sorted(settings.fuse_labels))
    return out


def job_identity(source: VideoSource, settings: SegmentSettings, model: dict | None = None) -> dict:
    return {"source": video_io.source_identity(source), "model": model or model_identity(settings.model),
            "settings": result_settings(settings)}


def _read_marker(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, DONE_MARKER), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _recorded_source(out_dir: str) -> str | None:
    """The real path of the source whose results ``out_dir`` holds (None when it holds none)."""
    marker = _read_marker(out_dir)
    if marker is None:
        return None
    path = (marker.get("identity") or {}).get("source", {}).get("path") or marker.get("source")
    return os.path.realpath(path) if isinstance(path, str) else ""


def existing_result(job: Job) -> tuple[str, str | None]:
    """``("absent", None)``, ``("done", None)`` when ``done.json`` records this job's identity, or
    ``("conflict", why)`` when it records another source content, model or settings."""
    marker = _read_marker(job.out_dir)
    if marker is None:
        return "absent", None
    recorded = marker.get("identity")
    if not isinstance(recorded, dict):
        return "conflict", (f"{job.out_dir} holds results without a record of what produced them; pass --overwrite "
                            f"to replace them, or choose another --out")
    if recorded == job.identity:
        return "done", None
    changed = []
    for part in ("source", "model", "settings"):
        old, new = recorded.get(part) or {}, job.identity.get(part) or {}
        if old != new:
            keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            detail = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if k != "sha256")
            changed.append(f"{part} ({detail or 'content changed'})")
    return "conflict", (f"{job.out_dir} holds results made with another {'; another '.join(changed)}; pass "
                        f"--overwrite to replace them, or choose another --out")


def assign_names(sources: list[VideoSource], out: str) -> None:
    """Output names consistent across runs: a source keeps a folder under ``out`` that records it (its
    base name or ``base-<hash>``); a base name whose folder records another source gives ``base-<hash>``,
    as two inputs with one name in a single run get."""
    for src in sources:
        me = os.path.realpath(src.path)
        base = src.base or src.name
        hashed = video_io.hashed_name(src)
        for candidate in (base, hashed):
            if _recorded_source(os.path.join(out, candidate)) == me:
                src.name = candidate
                break
        else:
            if src.name == base and _recorded_source(os.path.join(out, base)) not in (None, me):
                src.name = hashed


class VideoLock:
    """An exclusive claim on one video's name under OUT, across processes and runs.

    ``flock`` on ``OUT/.<name>.lock``: the kernel drops it when its process dies, so a dead run's claim
    never holds. Released claims remove the file; a claimant that locked a file removed meanwhile retries.
    """

    def __init__(self, path: str, fd: int | None):
        self.path = path
        self.fd = fd
        self.held = True

    @classmethod
    def acquire(cls, parent: str, name: str, wait: bool) -> "VideoLock | None":
        path = os.path.join(parent, f".{name}.lock")
        if fcntl is None:
            return cls(path, None)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                return cls(path, fd)
            os.close(fd)  # its holder removed the file while releasing it: claim the new one

    def release(self) -> None:
        self.held = False
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(fd)


def _result(job: Job, status: str, frames: int = 0, seconds: float = 0.0, error: str | None = None) -> dict:
    return {"name": job.name, "path": job.source.path, "status": status, "frames": frames,
            "seconds": round(seconds, 3), "error": error}


# ---------------------------------------------------------------------------------- model


_MODEL_CACHE: dict[tuple, Any] = {}


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_model(settings: SegmentSettings, device: str):
    """The model on ``device`` (cached per process: Ray workers and repeated calls reuse it)."""
    key = (settings.model, device, settings.dtype, settings.fast)
    if key not in _MODEL_CACHE:
        from videomt_fast.model.modeling import VideomtForUniversalSegmentation

        dtype = resolve_dtype(settings.dtype, device)
        model = VideomtForUniversalSegmentation.from_pretrained(settings.model, dtype=dtype, device=device)
        if settings.fast and hasattr(model, "optimize"):
            model.optimize(dtype=dtype)
        model.eval()
        _MODEL_CACHE.clear()  # one model per process
        _MODEL_CACHE[key] = model
    return _MODEL_CACHE[key]


@dataclass
class Geometry:
    height: int  # source frame size
    width: int
    resize: tuple[int, int]  # frames are resized to this ...
    padded: tuple[int, int]  # ... then padded (bottom/right) to this multiple of the patch size
    valid: tuple[int, int]  # mask-logit rows/cols that cover the resized (unpadded) frame


def plan_geometry(height: int, width: int, settings: SegmentSettings, config) -> Geometry:
    ph, pw = config.patch_hw
    if settings.short_side:
        scale = settings.short_side / min(height, width)
        # multiples of 4 so that the unpadded region is a whole number of mask-logit pixels (stride 4)
        rh = max(4, int(round(height * scale / 4)) * 4)
        rw = max(4, int(round(width * scale / 4)) * 4)
        padded = (math.ceil(rh / ph) * ph, math.ceil(rw / pw) * pw)
        return Geometry(height, width, (rh, rw), padded, (rh // 4, rw // 4))
    if settings.size:
        side = (settings.size, settings.size)
    else:
        side = tuple(config.image_hw)
    if side[0] % ph or side[1] % pw:
        raise ValueError(f"--size {side[0]}x{side[1]} must be a multiple of the patch size {ph}x{pw}")
    return Geometry(height, width, side, side, (side[0] // 4, side[1] // 4))


# ---------------------------------------------------------------------------------- decoding ahead


class _DecodedVideo:
    """The consumer's view of one video being decoded in the background."""

    def __init__(self, job: Job, depth: int):
        self.job = job
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.cancel = threading.Event()

    def _get(self):
        return self.queue.get()

    def info(self) -> video_io.VideoInfo:
        kind, payload = self._get()
        if kind == "error":
            raise payload
        assert kind == "info", kind
        return payload

    def chunks(self) -> Iterator[np.ndarray]:
        while True:
            kind, payload = self._get()
            if kind == "end":
                return
            if kind == "error":
                raise payload
            yield payload


def _decode_into(video: _DecodedVideo, settings: SegmentSettings, decoder: str) -> None:
    def put(item) -> bool:
        while not video.cancel.is_set():
            try:
                video.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        source = video.job.source
        if not put(("info", video_io.probe(source))):
            return
        for chunk in video_io.iter_chunks(source, settings.chunk_size, decoder, settings.decode_threads):
            if not put(("chunk", chunk)):
                return
        put(("end", None))
    except BaseException as exc:  # reported by name to the consumer
        if not isinstance(exc, VideoReadError):
            exc = VideoReadError(f"{video.job.source.path}: {type(exc).__name__}: {exc}")
        put(("error", exc))


class Prefetcher:
    """Decode up to ``workers`` videos ahead, each into its own bounded queue; yield them in order."""

    def __init__(self, jobs: Iterable[Job], settings: SegmentSettings):
        self.jobs = iter(jobs)
        self.settings = settings
        self.decoder = video_io.resolve_decoder(settings.decoder)
        self.pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        self.pending: deque[_DecodedVideo] = deque()

    def _fill(self) -> None:
        while len(self.pending) < self.settings.decode_workers + 1:
            job = next(self.jobs, None)
            if job is None:
                return
            video = _DecodedVideo(job, self.settings.prefetch_chunks)
            self.pool.submit(_decode_into, video, self.settings, self.decoder)
            self.pending.append(video)

    def __iter__(self) -> Iterator[_DecodedVideo]:
        try:
            self._fill()
            while self.pending:
                video = self.pending.popleft()
                try:
                    yield video
                finally:
                    video.cancel.set()  # stop its decoder if the consumer gave up early
                self._fill()
        finally:
            for video in self.pending:
                video.cancel.set()
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------- writing


_frame_names = video_io.output_frame_names


class VideoOutput:
    """All files of one video, written under a temporary folder and renamed into place at the end."""

    def __init__(self, job: Job, settings: SegmentSettings, info: video_io.VideoInfo, geometry: Geometry,
                 labels: dict[int, str], pool: ThreadPoolExecutor):
        self.job = job
        self.settings = settings
        self.info = info
        self.geometry = geometry
        self.labels = labels
        self.pool = pool
        parent = os.path.dirname(job.out_dir)
        os.makedirs(parent, exist_ok=True)
        remove_stale_partials(parent, job.name)
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = os.path.join(parent, f".{job.name}.tmp-{tag}")
        os.makedirs(self.tmp)
        self.sub = {"instance": "instance_ids", "semantic": "semantic", "panoptic": "panoptic"}[settings.task]
        self.frames = 0
        self.max_id = 0
        self.panoptic_frames: list[dict] = []
        self.overlay = None
        self.colours = visualize.colours(256)  # the overlay's colours, and the palette of 8-bit id PNGs
        try:
            os.makedirs(os.path.join(self.tmp, self.sub))
            if settings.overlay:
                self.overlay = video_io.Mp4Writer(os.path.join(self.tmp, "overlay.mp4"), info.fps)
        except BaseException:
            self.abort()  # never leave the temporary folder behind
            raise

    def _write_png(self, name: str, image: np.ndarray) -> None:
        palette = self.colours if image.ndim == 2 and image.dtype == np.uint8 else None
        video_io.write_png(os.path.join(self.tmp, self.sub, name + ".png"), image, self.settings.png_level, palette)

    def add(self, start: int, count: int, ids: np.ndarray | None, extra: list | None, rgb: np.ndarray | None) -> None:
        """``ids`` ``(t, H, W)`` int: semantic classes / panoptic ids (0 = none); None for instance (painted at the end)."""
        if ids is None:
            self.frames += count
            return
        names = _frame_names(self.job.source, start, ids.shape[0])
        if len(names) != ids.shape[0]:
            raise RuntimeError(f"{self.job.source.path}: more frames decoded than listed")
        if self.settings.task == "panoptic":
            images = [video_io.ids_to_rgb(frame) for frame in ids]
            for i, (name, segments) in enumerate(zip(names, extra)):
                areas = np.bincount(ids[i].ravel(), minlength=len(segments) + 1)
                self.panoptic_frames.append({
                    "frame_index": start + i,
                    "file_name": name + ".png",
                    "segments_info": [
                        {"id": s["id"] + 1, "category_id": s["label_id"], "score": s["score"],
                         "area": int(areas[s["id"] + 1]) if s["id"] + 1 < len(areas) else 0}
                        for s in segments
                    ],
                })
        else:
            images = [video_io.label_map_image(frame) for frame in ids]
        list(self.pool.map(self._write_png, names, images))
        self.max_id = max(self.max_id, int(ids.max()) if ids.size else 0)
        if self.overlay is not None and rgb is not None:
            for i, (frame, frame_ids) in enumerate(zip(rgb, ids)):
                if self.settings.task == "panoptic":
                    legend = {s["id"] + 1: f"{s['id'] + 1} {self.labels.get(s['label_id'], s['label_id'])}" for s in extra[i]}
                    tags = None
                else:  # semantic: the ids are classes
                    legend = tags = {int(c): str(self.labels.get(int(c), c)) for c in np.unique(frame_ids) if c > 0}
                self.overlay.write(visualize.draw_overlay(frame, frame_ids, legend, tags, self.colours))
        self.frames += ids.shape[0]

    def _json(self, name: str, data: Any) -> None:
        path = os.path.join(self.tmp, name)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)

    def _instances(self, tracker, video: dict, categories: list) -> None:
        """instances.json (YouTube-VIS results + track ids) and the per-frame track-id PNGs."""
        from videomt_fast.processing.tracks import rle_decode

        instances = tracker.finalize()
        # YouTube-VIS numbers categories from 1 and its evaluation matches results by category_id: label l
        # is category l + 1 (as the research code's ytvis_eval unmaps it); label_id keeps the model's label
        entries = tracker.to_youtube_vis(self.job.name, label_to_category={c["id"]: c["id"] + 1 for c in categories})
        for inst, entry in zip(instances, entries):
            entry["id"] = inst.track_id + 1  # the query index: stable through the video; 0 = background
            entry["label_id"] = inst.label_id
        categories = [{**c, "id": c["id"] + 1} for c in categories]
        self._json("instances.json", {"video": video, "categories": categories, "annotations": entries})
        # paint: lowest score first, so the best instance wins where masks overlap
        shown = sorted((i for i in instances if i.score >= self.settings.task_threshold()), key=lambda i: i.score)
        wide = max((i.track_id + 1 for i in shown), default=0) > 255
        h, w = self.geometry.height, self.geometry.width
        names = _frame_names(self.job.source, 0, self.frames)
        colour_source = None
        legend = {i.track_id + 1: f"{i.track_id + 1} {self.labels.get(i.label_id, i.label_id)} {i.score:.2f}"
                  for i in reversed(shown)}  # best first
        if self.overlay is not None:
            colour_source = (f for c in video_io.iter_chunks(self.job.source, 8, video_io.resolve_decoder(self.settings.decoder)) for f in c)
        for start in range(0, self.frames, 16):
            maps = []
            for t in range(start, min(start + 16, self.frames)):
                ids = np.zeros((h, w), dtype=np.uint16 if wide else np.uint8)
                for inst in shown:
                    ids[rle_decode(inst.rles[t])] = inst.track_id + 1
                maps.append(ids)
                self.max_id = max(self.max_id, int(ids.max()))
                if colour_source is not None:
                    self.overlay.write(visualize.draw_overlay(next(colour_source), ids, legend, palette=self.colours))
            list(self.pool.map(self._write_png, names[start : start + len(maps)], maps))

    def finish(self, tracker: Any, stats: dict) -> None:
        video = {"name": self.job.name, "file": self.job.source.path, "height": self.geometry.height,
                 "width": self.geometry.width, "length": self.frames,
                 "frame_names": _frame_names(self.job.source, 0, self.frames)}
        categories = [{"id": int(k), "name": v} for k, v in sorted(self.labels.items())]
        if self.settings.task == "instance" and tracker is None:
            raise RuntimeError("instance task without a track accumulator")
        if self.settings.task == "instance":
            self._instances(tracker, video, categories)
        elif self.settings.task == "panoptic":
            self._json("panoptic.json", {"video": video, "categories": categories, "annotations": self.panoptic_frames})
        marker = {**stats, "name": self.job.name, "source": self.job.source.path, "task": self.settings.task,
                  "frames": self.frames, "frames_listed": self.info.num_frames, "height": self.geometry.height,
                  "width": self.geometry.width, "rotation": self.info.rotation,
                  "model_input": list(self.geometry.padded), "model": self.settings.model,
                  "max_id": self.max_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "identity": self.job.identity}
        if self.overlay is not None:
            self.overlay.close()
            self.overlay = None
        self._json(DONE_MARKER, marker)  # last file: the folder is complete
        # swap: the old folder (an incomplete one from elsewhere, or --overwrite) is renamed aside, the new
        # one renamed in, and only then the old one removed: a kill at any point leaves OUT/<name> either
        # complete or absent, never half-deleted with its marker
        old = None
        if os.path.lexists(self.job.out_dir):
            old = os.path.join(os.path.dirname(self.job.out_dir), f".{self.job.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(self.job.out_dir, old)
        try:
            os.rename(self.tmp, self.job.out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, self.job.out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)

    def abort(self) -> None:
        if self.overlay is not None:
            try:
                self.overlay.close()
            except Exception:
                pass
            self.overlay = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_stale_partials(parent: str, name: str) -> None:
    """Temporary and set-aside folders a killed run left for this video (call it holding its claim)."""
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(prefixes):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


class _KillHook:
    """Test hook: SIGKILL this process once ``VIDEOMT_FAST_SEGMENT_KILL_AFTER_FRAMES`` frames are written."""

    def __init__(self):
        value = os.environ.get(KILL_AFTER_FRAMES_ENV)
        self.limit = int(value) if value else None
        self.count = 0

    def frames_written(self, n: int) -> None:
        if self.limit is None:
            return
        self.count += n
        if self.count >= self.limit:
            once = os.environ.get(KILL_ONCE_ENV)
            if once:
                try:
                    os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    self.limit = None  # another process took the kill
                    return
            os.kill(os.getpid(), signal.SIGKILL)


class Writer(threading.Thread):
    """Consumes ``(kind, job, ...)`` messages from a bounded queue and writes files; reports results."""

    def __init__(self, settings: SegmentSettings, labels: dict[int, str], on_event: Callable[[str, Any], None]):
        super().__init__(name="segment-writer", daemon=True)
        self.settings = settings
        self.labels = labels
        self.on_event = on_event
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.pool = ThreadPoolExecutor(settings.png_threads, thread_name_prefix="png")
        self.outputs: dict[str, VideoOutput] = {}
        self.failed: dict[str, str] = {}  # job name -> error, read by the producer to stop early
        self.error: str | None = None  # set when the thread dies
        self.kill_hook = _KillHook()

    def submit(self, *message) -> None:
        """Queue a message; raises :class:`WriterError` at once if the writer thread has died."""
        while True:
            if self.error is not None or not self.is_alive():
                raise WriterError(f"the output writer stopped: {self.error or 'thread exited'}")
            try:
                self.queue.put(message, timeout=0.2)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the producer sees self.error on its next submit and fails the run
            self.error = f"{type(exc).__name__}: {exc}"
            for output in self.outputs.values():  # their claims stay held: the producer reports them
                output.abort()
            self.outputs.clear()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            message = self.queue.get()
            if message[0] == "stop":
                break
            kind, job = message[0], message[1]
            output = None
            try:
                if job.name in self.failed and kind != "end" and kind != "abort":
                    continue
                if kind == "start":
                    _, _, info, geometry = message
                    self.outputs[job.name] = VideoOutput(job, self.settings, info, geometry, self.labels, self.pool)
                elif kind == "chunk":
                    _, _, start, count, ids, extra, rgb = message
                    self.outputs[job.name].add(start, count, ids, extra, rgb)
                    self.kill_hook.frames_written(count)
                elif kind == "end":
                    _, _, tracker, stats = message
                    output = self.outputs.pop(job.name, None)
                    if job.name in self.failed:
                        if output is not None:
                            output.abort()
                        self.on_event("result", _result(job, "failed", stats.get("frames", 0), stats.get("seconds", 0.0), self.failed.pop(job.name)))
                        _release(job)
                        continue
                    output.finish(tracker, stats)
                    self.on_event("result", _result(job, "done", output.frames, stats.get("seconds", 0.0)))
                    _release(job)  # after the report: a claim still held when the writer dies is reported by the producer
                elif kind == "abort":
                    _, _, error, frames = message
                    output = self.outputs.pop(job.name, None)
                    if output is not None:
                        output.abort()
                    error = self.failed.pop(job.name, None) or error
                    self.on_event("result", _result(job, "failed", frames, 0.0, error))
                    _release(job)
            except Exception as exc:
                output = self.outputs.pop(job.name, None) or output  # "end" popped it before finish()
                if output is not None:
                    output.abort()  # never leak the temporary folder (e.g. a disk-full finish())
                error = f"{job.source.path}: writing outputs failed: {type(exc).__name__}: {exc}"
                if kind in ("end", "abort"):
                    self.failed.pop(job.name, None)
                    self.on_event("result", _result(job, "failed", 0, 0.0, error))
                    _release(job)
                else:
                    self.failed[job.name] = error
        self.pool.shutdown(wait=True)


def _release(job: Job) -> None:
    if job.lock is not None:
        job.lock.release()


# ---------------------------------------------------------------------------------- inference


class _Engine:
    """One device: preprocessing, the model with queries carried across chunks, post-processing."""

    def __init__(self, settings: SegmentSettings, device: str):
        import torch

        from videomt_fast.processing.video_processor import VideomtVideoProcessor

        self.torch = torch
        self.settings = settings
        self.device = torch.device(device)
        self.model = load_model(settings, device)
        self.config = self.model.config
        self.processor_cls = VideomtVideoProcessor
        self.processor = VideomtVideoProcessor()
        self.labels = dict(self.config.id2label)

    # --- per video
    def start(self, info: video_io.VideoInfo) -> Geometry:
        geometry = plan_geometry(info.height, info.width, self.settings, self.config)
        self.geometry = geometry
        self.processor = self.processor_cls(size={"height": geometry.resize[0], "width": geometry.resize[1]})
        self.prev_queries = None
        self.session = self.model.new_session(1) if self.settings.engine == "session" else None
        if self.settings.runtime == "onnxruntime":
            from videomt_fast.apps import segment_ort

            self.session = segment_ort.new_session(self.model, geometry.padded, self.settings.dtype, str(self.device))
        self.tracker = None
        if self.settings.task == "instance":
            from videomt_fast.processing.tracks import VideoInstanceAccumulator

            self.tracker = VideoInstanceAccumulator(top_k=self.settings.top_k)
        return geometry

    def preprocess(self, chunk: np.ndarray):
        torch = self.torch
        frames = torch.from_numpy(chunk)
        if self.device.type == "cuda":
            frames = frames.pin_memory().to(self.device, non_blocking=True)
        frames = frames.permute(0, 3, 1, 2)  # (t, 3, H, W) uint8 on the device
        pixels = self.processor.preprocess(frames)["pixel_values_videos"][0]
        ph, pw = self.geometry.padded
        if pixels.shape[-2:] != (ph, pw):
            pixels = torch.nn.functional.pad(pixels, (0, pw - pixels.shape[-1], 0, ph - pixels.shape[-2]))
        return pixels.to(self.model.dtype)

    def forward(self, pixels):
        """``(t, 3, H, W)`` -> class logits ``(t, Q, C+1)`` and mask logits ``(t, Q, h, w)`` (float32, cropped)."""
        torch = self.torch
        with torch.inference_mode():
            classes, masks = [], []
            if self.session is not None:
                for i in range(pixels.shape[0]):
                    out = self.session.step(pixels[i : i + 1])
                    classes.append(out.class_queries_logits)
                    masks.append(out.masks_queries_logits)
            else:
                grid = self.model.grid_for(*pixels.shape[-2:])
                hidden = self.model.frame_encoder(pixels)(pixels)  # with --fast: the plan of this many frames
                step = self.model.query_stepper(hidden[:1], grid)  # with --fast: its plan, CUDA graphs on a GPU
                for i in range(pixels.shape[0]):
                    mask_logits, class_logits, _, self.prev_queries = step(hidden[i : i + 1], self.prev_queries, grid)
                    classes.append(class_logits)
                    masks.append(mask_logits)
                del hidden
            vh, vw = self.geometry.valid
            classes = torch.cat(classes).float()
            masks = torch.cat(masks)[:, :, :vh, :vw].float()
        return classes, masks

    def postprocess(self, start: int, classes, masks) -> tuple[np.ndarray | None, list | None]:
        """Maps ``(t, H, W)`` int32 on the host (0 = none) and per-frame extras (None for instance)."""
        torch = self.torch
        outputs = {"class_queries_logits": classes, "masks_queries_logits": masks}
        sizes = [(self.geometry.height, self.geometry.width)] * classes.shape[0]
        s = self.settings
        with torch.inference_mode():
            if s.task == "semantic":
                maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
                return torch.stack(maps).to(torch.int32).cpu().numpy(), None
            if s.task == "panoptic":
                results = self.processor.post_process_panoptic_segmentation(
                    outputs, target_sizes=sizes, threshold=s.task_threshold(), mask_threshold=s.mask_threshold,
                    overlap_mask_area_threshold=s.overlap_threshold, label_ids_to_fuse=set(s.fuse_labels) or None,
                )
                ids = torch.stack([r["segmentation"] for r in results]).to(torch.int32) + 1
                return ids.cpu().numpy(), [r["segments_info"] for r in results]
            # instance: masks are kept as run lengths; id maps are painted once the video's tracks are known
            self.tracker.update(outputs, sizes)
            return None, None


# ---------------------------------------------------------------------------------- one device


@contextlib.contextmanager
def torch_threads(threads: int, device: str) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` while segmenting on a CPU device (0 = leave it).

    The count is process-wide: it is restored afterwards so that a library caller keeps its own.
    """
    import torch

    if threads <= 0 or torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def segment_videos(jobs: Iterable[Job], settings: SegmentSettings, device: str,
                   on_event: Callable[[str, Any], None]) -> None:
    """Segment ``jobs`` on ``device``; reports ``("frames", n)`` and ``("result", dict)`` through ``on_event``."""
    with torch_threads(settings.threads, device):
        _segment_videos(jobs, settings, device, on_event)


def _claim(jobs: Iterable[Job], settings: SegmentSettings, wait: bool, deferred: list[Job] | None,
           on_event: Callable[[str, Any], None]) -> Iterator[Job]:
    """The jobs this process may work on now, each holding its :class:`VideoLock`. A job locked by another
    run goes to ``deferred`` (or, with ``wait``, is waited for); once claimed, a finished video is
    skipped and one holding other results is refused (unless ``--overwrite``)."""
    for job in jobs:
        lock = VideoLock.acquire(os.path.dirname(job.out_dir), job.name, wait)
        if lock is None:
            deferred.append(job)
            continue
        try:
            if not job.identity:
                job.identity = job_identity(job.source, settings)
        except OSError as exc:
            lock.release()
            on_event("result", _result(job, "failed", error=f"{job.source.path}: cannot read ({exc.strerror or exc})"))
            continue
        state, why = existing_result(job)
        if state != "absent" and not settings.overwrite:
            lock.release()
            on_event("result", _result(job, "skipped") if state == "done" else _result(job, "failed", error=why))
            continue
        job.lock = lock
        yield job


def _drain(items: list) -> Iterator:
    """Yield from a list that may grow while it is being read."""
    i = 0
    while i < len(items):
        yield items[i]
        i += 1


def _segment_videos(jobs: Iterable[Job], settings: SegmentSettings, device: str,
                    on_event: Callable[[str, Any], None]) -> None:
    try:
        engine = _Engine(settings, device)
    except Exception as exc:  # no model, no videos: report each one with the reason
        error = f"cannot load the model {settings.model!r} on {device}: {type(exc).__name__}: {exc}"
        for job in jobs:
            on_event("result", _result(job, "failed", error=error))
        return
    writer = Writer(settings, engine.labels, on_event)
    writer.start()
    claimed: list[Job] = []
    deferred: list[Job] = []

    def claim(batch: Iterable[Job], wait: bool) -> Iterator[Job]:
        for job in _claim(batch, settings, wait, deferred, on_event):
            claimed.append(job)
            yield job

    try:
        # first every video no other run holds; then those another run held, one at a time so that no
        # claim is held while waiting for another (two runs would otherwise wait for each other)
        batches = itertools.chain([claim(jobs, False)], (claim([job], True) for job in _drain(deferred)))
        for batch in batches:
            for video in Prefetcher(batch, settings):
                _segment_one(video, video.job, engine, writer, settings, device, on_event)
    except WriterError as exc:  # nothing more can be written: fail the run at once
        for job in claimed:
            if job.lock is not None and job.lock.held:  # claimed, no result reported yet
                on_event("result", _result(job, "failed", error=f"{job.source.path}: {exc}"))
    finally:
        if writer.is_alive():
            with contextlib.suppress(WriterError):
                writer.submit("stop", None)
        writer.join()
        for job in claimed:
            _release(job)


def _segment_one(video: "_DecodedVideo", job: Job, engine: "_Engine", writer: Writer, settings: SegmentSettings,
                 device: str, on_event: Callable[[str, Any], None]) -> None:
    began = time.perf_counter()
    frames = 0
    started = False
    try:
        info = video.info()
        geometry = engine.start(info)
        writer.submit("start", job, info, geometry)
        started = True
        for chunk in video.chunks():
            if job.name in writer.failed:
                break
            t = chunk.shape[0]
            if (chunk.shape[1], chunk.shape[2]) != (geometry.height, geometry.width):
                raise VideoReadError(
                    f"{job.source.path}: frame {frames} is {chunk.shape[2]}x{chunk.shape[1]}, "
                    f"expected {geometry.width}x{geometry.height}"
                )
            classes, masks = engine.forward(engine.preprocess(chunk))
            ids, extra = engine.postprocess(frames, classes, masks)
            overlay_frames = chunk if settings.overlay and ids is not None else None
            writer.submit("chunk", job, frames, t, ids, extra, overlay_frames)
            frames += t
            on_event("frames", t)
        if frames == 0 and job.name not in writer.failed:
            raise VideoReadError(f"{job.source.path}: no frames decoded (empty video)")
        seconds = time.perf_counter() - began
        writer.submit("end", job, engine.tracker, {"seconds": round(seconds, 3), "frames": frames,
                                                  "fps": round(frames / max(seconds, 1e-9), 3),
                                                  "device": str(device)})
    except WriterError:
        raise
    except Exception as exc:
        error = str(exc) if isinstance(exc, VideoReadError) else f"{job.source.path}: {type(exc).__name__}: {exc}"
        if not isinstance(exc, VideoReadError):
            error += "\n" + traceback.format_exc(limit=4)
        if started:
            writer.submit("abort", job, error, frames)
        else:
            _release(job)
            on_event("result", _result(job, "failed", frames, time.perf_counter() - began, error))


# ---------------------------------------------------------------------------------- several devices


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


_EVENT_PREFIX = "@@videomt-segment "


def _job_to_dict(job: Job) -> dict:
    return {"source": asdict(job.source), "out_dir": job.out_dir, "identity": job.identity}


def _job_from_dict(data: dict) -> Job:
    return Job(VideoSource(**data["source"]), data["out_dir"], data.get("identity") or {})


def _exit_with_parent() -> None:
    """A worker's stdin is a pipe from its parent: end of file means the parent is gone, so exit at once
    (the kernel then drops this worker's video claims; its temporary folders are removed on a rerun)."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(1 << 16):
                pass
        except (OSError, ValueError):
            pass
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


MAX_ATTEMPTS = 2  # a video whose worker died this many times is failed by name (it may be what kills it)


def worker_main(argv: list[str]) -> int:
    """A device worker process: ``PLAN_JSON DEVICE``. Claims jobs from the plan's claim folder (one
    ``O_EXCL`` file per job, so several workers share one list; a file the parent removes, because the
    worker that claimed it died, makes the job claimable again) and reports events on stdout."""
    plan_path, device = argv
    _exit_with_parent()
    with open(plan_path, encoding="utf-8") as fh:
        plan = json.load(fh)
    settings = SegmentSettings(**plan["settings"])
    jobs = [_job_from_dict(j) for j in plan["jobs"]]
    claims = plan["claims"]
    lock = threading.Lock()

    def emit(kind: str, payload: Any) -> None:
        line = _EVENT_PREFIX + json.dumps({"kind": kind, "payload": payload})
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def claimed() -> Iterator[Job]:
        while True:  # passes until one claims nothing: jobs of a dead worker come back
            progressed = False
            for index, job in enumerate(jobs):
                try:
                    os.close(os.open(os.path.join(claims, str(index)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                progressed = True
                emit("taken", index)
                yield job
            if not progressed:
                return

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    segment_videos(claimed(), settings, device, emit)
    return 0


def _run_multi(jobs: list[Job], settings: SegmentSettings, devices: list[str], on_event) -> None:
    """One worker process per device over one shared list (claim files under OUT).

    A worker that dies gives its unfinished videos back: live workers claim them again, or a new round
    of workers runs them; a video is failed by name once its worker died :data:`MAX_ATTEMPTS` times.
    """
    attempts = [0] * len(jobs)
    remaining = list(range(len(jobs)))
    exits: list[str] = []
    reported: set[str] = set()

    def report(kind: str, payload: Any) -> None:
        if kind == "result":
            reported.add(payload["name"])
        on_event(kind, payload)

    while remaining:  # ends: each round finishes its jobs or gives some back with one more attempt counted
        remaining = _run_round(jobs, remaining, attempts, exits, settings, devices, report)
    for job in jobs:
        if job.name not in reported:
            why = "; ".join(dict.fromkeys(exits)) or "no worker reported it"
            on_event("result", _result(job, "failed", error=f"{job.source.path}: {why}"))


def _run_round(jobs: list[Job], indices: list[int], attempts: list[int], exits: list[str], settings: SegmentSettings,
               devices: list[str], on_event) -> list[int]:
    """Workers over ``jobs[indices]``; returns the indices to run again (given back by dead workers)."""
    import subprocess

    run_id = uuid.uuid4().hex[:12]
    plan_path = os.path.join(settings.out, f".segment-run-{run_id}.json")
    claims = os.path.join(settings.out, f".segment-run-{run_id}.claims")
    os.makedirs(claims)
    with open(plan_path, "w", encoding="utf-8") as fh:
        json.dump({"settings": asdict(settings), "jobs": [_job_to_dict(jobs[i]) for i in indices], "claims": claims}, fh)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    code = "import sys; from videomt_fast.apps.segment import worker_main; sys.exit(worker_main(sys.argv[1:]))"
    taken: dict[str, set[int]] = {}  # worker -> plan positions claimed and not yet reported
    position = {jobs[i].name: k for k, i in enumerate(indices)}
    again: set[int] = set()
    lock = threading.Lock()

    def pump(key: str, proc) -> None:
        for line in proc.stdout:  # read to the end whatever happens, or the worker would block
            try:
                if not line.startswith(_EVENT_PREFIX):
                    with contextlib.suppress(OSError, ValueError):
                        sys.stderr.write(line)
                    continue
                event = json.loads(line[len(_EVENT_PREFIX):])
                kind, payload = event["kind"], event["payload"]
                with lock:
                    if kind == "taken":
                        taken[key].add(payload)
                        again.discard(payload)
                        continue
                    if kind == "result":
                        taken[key].discard(position.get(payload["name"], -1))
                on_event(kind, payload)
            except Exception:
                continue
        proc.wait()
        with lock:
            lost, taken[key] = sorted(taken[key]), set()
            if proc.returncode:
                exits.append(f"worker on {key.split('#')[0]} exited with status {proc.returncode}")
            if not lost:
                return
            why = f"worker on {key.split('#')[0]} exited with status {proc.returncode} before finishing it"
            for k in lost:
                index = indices[k]
                attempts[index] += 1
                if attempts[index] >= MAX_ATTEMPTS:
                    on_event("result", _result(jobs[index], "failed", error=f"{jobs[index].source.path}: {why}"))
                else:  # give it back: a live worker's next pass, or the next round, claims it
                    again.add(k)
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(claims, str(k)))

    procs, pumps = {}, []
    try:
        for i, device in enumerate(devices):
            # two workers may name one device (e.g. cpu,cpu): keep their keys apart
            key = device if device not in procs else f"{device}#{i}"
            taken[key] = set()
            procs[key] = subprocess.Popen([sys.executable, "-c", code, plan_path, device], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
            thread = threading.Thread(target=pump, args=(key, procs[key]), daemon=True)
            thread.start()
            pumps.append(thread)
        for thread in pumps:
            thread.join()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(OSError):
                proc.stdin.close()
        shutil.rmtree(claims, ignore_errors=True)
        try:
            os.remove(plan_path)
        except OSError:
            pass
    return [indices[k] for k in sorted(again)]


# ---------------------------------------------------------------------------------- Ray


def _ray_segment_one(job: Job, settings: SegmentSettings) -> dict:
    """Body of a Ray task: one video on this worker's GPU (or CPU); same outputs and markers."""
    import torch

    device = "cpu"
    try:
        import ray

        if ray.get_gpu_ids() and torch.cuda.is_available():
            device = "cuda"
    except Exception:
        pass
    results: list[dict] = []
    settings = SegmentSettings(**{**asdict(settings), "decode_workers": 1})
    segment_videos([job], settings, device, lambda kind, payload: results.append(payload) if kind == "result" else None)
    if not results:
        return _result(job, "failed", error="no result from the worker")
    return results[-1]


def _run_ray(jobs: list[Job], settings: SegmentSettings, address: str, on_event) -> None:
    import ray

    started_here = False
    if not ray.is_initialized():
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {"PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
        ray.init(address=address or None, runtime_env={"env_vars": env}, log_to_driver=False)
        started_here = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(_ray_segment_one).options(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=1)
        pending = {task.remote(job, settings): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    result = _result(job, "failed", error=f"Ray task failed: {type(exc).__name__}: {exc}")
                if result.get("frames"):
                    on_event("frames", result["frames"])
                on_event("result", result)
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------------------------- entry point


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
    cannot be used.
    """
    began = time.perf_counter()
    device_list = resolve_devices(devices) if ray_address is None else []
    if settings.dtype == "auto" and len({torch_device_type(d) for d in device_list}) == 1:
        # recorded in done.json as what runs (bfloat16 on CUDA, float32 on a CPU), not as "auto"
        settings = replace(settings, dtype=str(resolve_dtype("auto", device_list[0])).replace("torch.", ""))
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
            results.append(_result(job, "failed", error=f"{source.path}: cannot read ({exc.strerror or exc})"))
            continue
        state, why = existing_result(job)
        if state == "absent" or settings.overwrite:
            todo.append(job)
        elif state == "done":
            results.append(_result(job, "skipped"))
            lock = VideoLock.acquire(settings.out, job.name, wait=False)
            if lock is not None:  # finished: leftovers of runs that died on it are garbage
                remove_stale_partials(settings.out, job.name)
                lock.release()
        else:
            results.append(_result(job, "failed", error=why))

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
                if payload["status"] == "failed":
                    first = payload["error"].splitlines()[0] if payload["error"] else payload["name"]
                    show(lambda b: b.write(f"failed: {first}", file=sys.stderr))
                show(lambda b: b.set_postfix(videos=counts["done"], failed=counts["failed"], refresh=False))

    try:
        if todo:
            if ray_address is not None:
                _run_ray(todo, settings, ray_address, on_event)
            elif len(device_list) == 1:
                segment_videos(todo, settings, device_list[0], on_event)
            else:
                _run_multi(todo, settings, device_list, on_event)
    finally:
        show(lambda b: b.close())
    seconds = time.perf_counter() - began
    reported = {r["name"] for r in results}
    for job in todo:  # never lose a video silently
        if job.name not in reported:
            results.append(_result(job, "failed", error=f"{job.source.path}: no result reported"))
    frames = sum(r["frames"] for r in results if r["status"] == "done")
    summary = {
        "videos": len(results),
        "done": sum(r["status"] == "done" for r in results),
        "skipped": sum(r["status"] == "skipped" for r in results),
        "failed": sum(r["status"] == "failed" for r in results),
        "frames": frames,
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 3) if seconds > 0 else 0.0,
        "results": results,
    }
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"segment: {summary['videos']} videos: {summary['done']} done, {summary['skipped']} skipped (already done), "
        f"{summary['failed']} failed; {summary['frames']} frames in {summary['seconds']:.1f} s "
        f"({summary['fps']:.1f} frames/s)"
    ]
    for r in summary["results"]:
        if r["status"] == "failed":
            lines.append(f"  FAILED {r['name']}: {(r['error'] or '').splitlines()[0] if r['error'] else ''}")
    return "\n".join(lines)


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
        print(f"videomt-fast segment: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
