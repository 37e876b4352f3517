"""The writer: one thread turning model outputs into files, each video under a temporary folder.

The main thread hands CPU maps to a writer thread (bounded queue) that encodes PNGs in a small thread
pool. A video is written under ``OUT/.<name>.tmp-*``, ``done.json`` last, and renamed into place only
once complete (:func:`.locking.replace_folder`), so a killed run never leaves a half-written
``OUT/<name>``. ``done.json`` lists every file written, the proof :mod:`.locking` asks before it deletes
anything. A dead writer thread fails the run at once (:class:`WriterError`).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from videomt_fast.apps import video_io, visualize
from videomt_fast.apps.segment.engine import Geometry
from videomt_fast.apps.segment.jobs import DONE_MARKER, Job, result
from videomt_fast.apps.segment.locking import NotOurs, release, remove_stale_partials, replace_folder, temporary_name
from videomt_fast.apps.segment.settings import SegmentSettings

KILL_AFTER_FRAMES_ENV = "VIDEOMT_FAST_SEGMENT_KILL_AFTER_FRAMES"  # test hook: SIGKILL self after N frames written
KILL_ONCE_ENV = "VIDEOMT_FAST_SEGMENT_KILL_ONCE"  # test hook: a file path; only the process that creates it is killed

_frame_names = video_io.output_frame_names


class WriterError(RuntimeError):
    """The writer thread died: nothing more can be written, so the run stops at once."""


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
        self.tmp = os.path.join(parent, temporary_name(job.name, "tmp", tag))
        os.makedirs(self.tmp)
        self.sub = {"instance": "instance_ids", "semantic": "semantic", "panoptic": "panoptic"}[settings.task]
        self.files: list[str] = []  # every file written, relative to the folder ("/"-separated): done.json lists them
        self.frames = 0
        self.max_id = 0
        self.panoptic_frames: list[dict] = []
        self.overlay = None
        self.colours = visualize.colours(256)  # the overlay's colours, and the palette of 8-bit id PNGs
        self.corner: str | None = None  # the overlay legend's corner
        try:
            os.makedirs(os.path.join(self.tmp, self.sub))
            if settings.overlay:
                self.overlay = video_io.Mp4Writer(os.path.join(self.tmp, "overlay.mp4"), info.fps)
                self.files.append("overlay.mp4")
        except BaseException:
            self.abort()  # never leave the temporary folder behind
            raise

    def _write_png(self, name: str, image: np.ndarray, palette: np.ndarray | None = None) -> None:
        palette = (self.colours if palette is None else palette) if image.ndim == 2 and image.dtype == np.uint8 else None
        video_io.write_png(os.path.join(self.tmp, self.sub, name + ".png"), image, self.settings.png_level, palette)

    def _write_pngs(self, names: list[str], images: list[np.ndarray], palette: np.ndarray | None = None) -> None:
        self.files.extend(f"{self.sub}/{name}.png" for name in names)
        list(self.pool.map(self._write_png, names, images, [palette] * len(names)))

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
        self._write_pngs(names, images)
        self.max_id = max(self.max_id, int(ids.max()) if ids.size else 0)
        if self.overlay is not None and rgb is not None:
            for i, (frame, frame_ids) in enumerate(zip(rgb, ids)):
                if self.settings.task == "panoptic":
                    legend = {s["id"] + 1: f"{s['id'] + 1} {self.labels.get(s['label_id'], s['label_id'])}" for s in extra[i]}
                    tags = None
                else:  # semantic: the ids are classes
                    legend = tags = {int(c): str(self.labels.get(int(c), c)) for c in np.unique(frame_ids) if c > 0}
                corner = None
                if legend:  # where it covers the least; it stays put until another corner is freer
                    size = visualize.legend_size(legend, visualize.text_scale(*frame_ids.shape))
                    corner = self.corner = visualize.legend_corner(frame_ids > 0, size, self.corner)
                self.overlay.write(visualize.draw_overlay(frame, frame_ids, legend, tags, self.colours, corner=corner))
        self.frames += ids.shape[0]

    def _json(self, name: str, data: Any) -> None:
        path = os.path.join(self.tmp, name)
        if name != DONE_MARKER:
            self.files.append(name)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)

    def _instances(self, tracker, video: dict, categories: list) -> None:
        """``instances.json`` (one entry per track), ``youtube_vis.json`` (every top-k (track, class) pair, as
        video instance segmentation benchmarks take results) and the per-frame track-id PNGs."""
        from videomt_fast.processing.tracks import rle_decode

        instances = tracker.finalize()  # the top-k (query, class) pairs, best first
        # YouTube-VIS numbers categories from 1 and its evaluation matches results by category_id: label l
        # is category l + 1 (as the research code's ytvis_eval unmaps it); label_id keeps the model's label
        entries = tracker.to_youtube_vis(self.job.name, label_to_category={c["id"]: c["id"] + 1 for c in categories})
        for inst, entry in zip(instances, entries):
            entry["id"] = inst.track_id + 1  # the query index: stable through the video; 0 = background
            entry["label_id"] = inst.label_id
        # one entry per track: its class and score are its best pair's (decided over the whole video), the
        # other classes it had among the top-k are listed with theirs; its masks are per frame
        tracks: dict[int, dict] = {}
        best: dict[int, Any] = {}
        for inst, entry in zip(instances, entries):
            name = self.labels.get(inst.label_id, str(inst.label_id))
            cls = {"category_id": entry["category_id"], "label_id": inst.label_id, "label": name, "score": entry["score"]}
            if inst.track_id not in tracks:
                best[inst.track_id] = inst
                tracks[inst.track_id] = {"id": inst.track_id + 1, **cls, "classes": [],
                                         "segmentations": entry["segmentations"]}
            tracks[inst.track_id]["classes"].append(cls)
        categories = [{**c, "id": c["id"] + 1} for c in categories]
        self._json("instances.json", {"video": video, "categories": categories, "tracks": list(tracks.values())})
        self._json("youtube_vis.json", entries)
        # paint: lowest score first, so the best track wins where masks overlap
        shown = sorted((i for i in best.values() if i.score >= self.settings.task_threshold()), key=lambda i: i.score)
        best_first = [i.track_id + 1 for i in reversed(shown)]
        palette = visualize.ranked_palette(best_first)  # a video's few tracks get the most separated colours
        wide = max(best_first, default=0) > 255
        h, w = self.geometry.height, self.geometry.width
        names = _frame_names(self.job.source, 0, self.frames)
        colour_source = None
        legend = {i.track_id + 1: f"{i.track_id + 1} {self.labels.get(i.label_id, i.label_id)} {i.score:.2f}"
                  for i in reversed(shown)}  # best first
        corner = None
        if self.overlay is not None:
            colour_source = (f for c in video_io.iter_chunks(self.job.source, 8, video_io.resolve_decoder(self.settings.decoder)) for f in c)
            if legend:  # one corner for the whole video: where the tracks are least over all frames
                occupancy = np.zeros((h, w), np.int64)
                for inst in shown:
                    for rle in inst.rles:
                        occupancy += rle_decode(rle)
                size = visualize.legend_size(legend, visualize.text_scale(h, w))
                corner = visualize.legend_corner(occupancy, size)
        for start in range(0, self.frames, 16):
            maps = []
            for t in range(start, min(start + 16, self.frames)):
                ids = np.zeros((h, w), dtype=np.uint16 if wide else np.uint8)
                for inst in shown:
                    ids[rle_decode(inst.rles[t])] = inst.track_id + 1
                maps.append(ids)
                self.max_id = max(self.max_id, int(ids.max()))
                if colour_source is not None:
                    self.overlay.write(visualize.draw_overlay(next(colour_source), ids, legend, palette=palette,
                                                              corner=corner))
            self._write_pngs(names[start : start + len(maps)], maps, palette[:256])

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
                  "width": self.geometry.width, "rotation": self.info.rotation, "stream": self.info.stream,
                  "video_streams": self.info.video_streams, "model_input": list(self.geometry.padded),
                  "model": self.settings.model, "max_id": self.max_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "identity": self.job.identity, "files": sorted(self.files)}
        if self.overlay is not None:
            self.overlay.close()
            self.overlay = None
        self._json(DONE_MARKER, marker)  # last file: the folder is complete
        replace_folder(self.tmp, self.job.out_dir, self.job.name)

    def abort(self) -> None:
        if self.overlay is not None:
            try:
                self.overlay.close()
            except Exception:
                pass
            self.overlay = None
        shutil.rmtree(self.tmp, ignore_errors=True)


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
            if message[0] == "stop":  # a video still open never got its "end": it is incomplete
                for output in self.outputs.values():
                    output.abort()
                self.outputs.clear()
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
                        self.on_event("result", result(job, "failed", stats.get("frames", 0), stats.get("seconds", 0.0), self.failed.pop(job.name)))
                        release(job)
                        continue
                    output.finish(tracker, stats)
                    self.on_event("result", result(job, "done", output.frames, stats.get("seconds", 0.0)))
                    release(job)  # after the report: a claim still held when the writer dies is reported by the producer
                elif kind == "abort":
                    _, _, error, frames = message
                    output = self.outputs.pop(job.name, None)
                    if output is not None:
                        output.abort()
                    error = self.failed.pop(job.name, None) or error
                    self.on_event("result", result(job, "failed", frames, 0.0, error))
                    release(job)
            except Exception as exc:
                output = self.outputs.pop(job.name, None) or output  # "end" popped it before finish()
                if output is not None:
                    output.abort()  # never leak the temporary folder (e.g. a disk-full finish())
                if isinstance(exc, NotOurs):
                    error = f"{job.source.path}: {exc}"
                else:
                    error = f"{job.source.path}: writing outputs failed: {type(exc).__name__}: {exc}"
                if kind in ("end", "abort"):
                    self.failed.pop(job.name, None)
                    self.on_event("result", result(job, "failed", 0, 0.0, error))
                    release(job)
                else:
                    self.failed[job.name] = error
        self.pool.shutdown(wait=True)
