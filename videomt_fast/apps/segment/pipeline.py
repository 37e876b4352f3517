"""One device: claim videos, decode them ahead, run the engine, hand the maps to the writer.

Decoder threads fill bounded per-video queues (:mod:`.decoding`); the main thread runs the model
(:mod:`.engine`) and submits maps to the writer thread (:mod:`.writer`). Videos another run holds are
waited for at the end, one at a time. Ctrl-C (``KeyboardInterrupt``) stops at once: the open video's
temporary folder is removed, every claimed video without a result is reported ``interrupted``, and the
interrupt goes on to the caller.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

from videomt_fast.apps.segment.decoding import DecodedVideo, Prefetcher
from videomt_fast.apps.segment.engine import Engine, torch_threads
from videomt_fast.apps.segment.jobs import Job, existing_result, job_identity, result
from videomt_fast.apps.segment.locking import VideoLock, release, unproven
from videomt_fast.apps.segment.settings import SegmentSettings
from videomt_fast.apps.segment.writer import Writer, WriterError
from videomt_fast.apps.video_io import VideoReadError


def segment_videos(jobs: Iterable[Job], settings: SegmentSettings, device: str,
                   on_event: Callable[[str, Any], None]) -> None:
    """Segment ``jobs`` on ``device``; reports ``("frames", n)`` and ``("result", dict)`` through ``on_event``."""
    with torch_threads(settings.threads, device):
        _segment_videos(jobs, settings, device, on_event)


def decide(job: Job, settings: SegmentSettings) -> tuple[str, str | None]:
    """``("run", None)``, ``("skip", None)`` (done already), or ``("fail", why)``: another source's, model's
    or settings' results without ``--overwrite``, or a folder segment cannot prove it wrote (never replaced)."""
    state, why = existing_result(job)
    if state == "absent":
        return "run", None
    if state == "done" and not settings.overwrite:
        return "skip", None
    if state == "foreign" or not settings.overwrite:
        return "fail", why
    why = unproven(job.out_dir)
    return ("fail", why) if why else ("run", None)


def _claim(jobs: Iterable[Job], settings: SegmentSettings, wait: bool, deferred: list[Job] | None,
           on_event: Callable[[str, Any], None]) -> Iterator[Job]:
    """The jobs this process may work on now, each holding its :class:`VideoLock`. A job locked by another
    run goes to ``deferred`` (or, with ``wait``, is waited for); once claimed, its source identity is taken
    again (what the video is read against), a finished video is skipped and one holding other results is
    refused (:func:`decide`)."""
    for job in jobs:
        lock = VideoLock.acquire(os.path.dirname(job.out_dir), job.name, wait)
        if lock is None:
            deferred.append(job)
            continue
        try:
            job.identity = job_identity(job.source, settings, job.identity.get("model"))
        except OSError as exc:
            lock.release()
            on_event("result", result(job, "failed", error=f"{job.source.path}: cannot read ({exc.strerror or exc})"))
            continue
        action, why = decide(job, settings)
        if action != "run":
            lock.release()
            on_event("result", result(job, "skipped") if action == "skip" else result(job, "failed", error=why))
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
        engine = Engine(settings, device)
    except Exception as exc:  # no model, no videos: report each one with the reason
        error = f"cannot load the model {settings.model!r} on {device}: {type(exc).__name__}: {exc}"
        for job in jobs:
            on_event("result", result(job, "failed", error=error))
        return
    writer = Writer(settings, engine.labels, on_event)
    writer.start()
    claimed: list[Job] = []
    deferred: list[Job] = []

    def claim(batch: Iterable[Job], wait: bool) -> Iterator[Job]:
        for job in _claim(batch, settings, wait, deferred, on_event):
            claimed.append(job)
            yield job

    interrupted = False
    try:
        # first every video no other run holds; then those another run held, one at a time so that no
        # claim is held while waiting for another (two runs would otherwise wait for each other)
        batches = itertools.chain([claim(jobs, False)], (claim([job], True) for job in _drain(deferred)))
        for batch in batches:
            with contextlib.closing(iter(Prefetcher(batch, settings))) as videos:  # closed at once on Ctrl-C
                for video in videos:
                    _segment_one(video, video.job, engine, writer, settings, device, on_event)
    except WriterError as exc:  # nothing more can be written: fail the run at once
        for job in claimed:
            if job.lock is not None and job.lock.held:  # claimed, no result reported yet
                on_event("result", result(job, "failed", error=f"{job.source.path}: {exc}"))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if writer.is_alive():  # it finishes what was queued, then removes what is still open
            with contextlib.suppress(WriterError):
                writer.submit("stop", None)
        writer.join()
        for job in claimed:
            if interrupted and job.lock is not None and job.lock.held:
                on_event("result", result(job, "interrupted", error=f"{job.source.path}: interrupted"))
            release(job)


def _segment_one(video: DecodedVideo, job: Job, engine: Engine, writer: Writer, settings: SegmentSettings,
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
            release(job)
            on_event("result", result(job, "failed", frames, time.perf_counter() - began, error))
