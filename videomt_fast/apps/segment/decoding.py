"""Decoding ahead: decoder threads fill bounded per-video queues with uint8 frame chunks.

A video's stream ends with ``"end"`` only when the decoder proved it whole
(:func:`videomt_fast.apps.video_io.check_complete`) and the source is what it was when the video was
claimed (:func:`.jobs.source_changed`); otherwise with an error naming the input.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

from videomt_fast.apps import video_io
from videomt_fast.apps.segment.jobs import Job, source_changed
from videomt_fast.apps.segment.settings import SegmentSettings
from videomt_fast.apps.video_io import VideoReadError


class DecodedVideo:
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


def _decode_into(video: DecodedVideo, settings: SegmentSettings, decoder: str) -> None:
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
        changed = source_changed(video.job)
        if changed:
            raise VideoReadError(f"{source.path}: changed while being read ({changed}); run again once it is complete")
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
        self.pending: deque[DecodedVideo] = deque()

    def _fill(self) -> None:
        while len(self.pending) < self.settings.decode_workers + 1:
            job = next(self.jobs, None)
            if job is None:
                return
            video = DecodedVideo(job, self.settings.prefetch_chunks)
            self.pool.submit(_decode_into, video, self.settings, self.decoder)
            self.pending.append(video)

    def __iter__(self) -> Iterator[DecodedVideo]:
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
