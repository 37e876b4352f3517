"""Job identity and resume: what decides a video is done.

A video is done when ``OUT/<name>/done.json`` records the identity of this very job: the source's
content, the model's, and the settings that change results (:func:`job_identity`). Only a complete video
gets one: the writer (:mod:`.writer`) writes it last, after every other file, and only once the decoder
proved the whole video read (:func:`videomt_fast.apps.video_io.check_complete`: no damaged frame, nothing
short of what the container lists or declares) and :func:`source_changed` found the source as it was when
the video was claimed. :func:`existing_result` compares a folder's marker with the job; a rerun skips what
matches and refuses what does not (naming ``--overwrite``) instead of skipping with stale results.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from videomt_fast.apps import video_io
from videomt_fast.apps.segment.settings import SegmentSettings
from videomt_fast.apps.video_io import VideoSource

DONE_MARKER = "done.json"


@dataclass
class Job:
    source: VideoSource
    out_dir: str  # final folder OUT/<name>
    identity: dict = field(default_factory=dict)  # what produces its results; recorded in done.json
    lock: Any = field(default=None, repr=False, compare=False)  # VideoLock while this process holds the video

    @property
    def name(self) -> str:
        return self.source.name


def result(job: Job, status: str, frames: int = 0, seconds: float = 0.0, error: str | None = None) -> dict:
    """One video's line in the summary."""
    return {"name": job.name, "path": job.source.path, "status": status, "frames": frames,
            "seconds": round(seconds, 3), "error": error}


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
        digest.update(os.fsencode(os.path.basename(path)) + b"\0")
        digest.update(video_io.sampled_sha256(path).encode())
    return {"path": real, "sha256": digest.hexdigest()}


def result_settings(settings: SegmentSettings) -> dict:
    """The settings that change a video's results (recorded in done.json and compared on resume)."""
    out = {"task": settings.task, "size": settings.size, "short_side": settings.short_side,
           "dtype": settings.dtype, "fast": settings.fast, "overlay": settings.overlay}
    if settings.runtime != "torch":  # (absent for torch: markers written before the option stay valid)
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


def source_changed(job: Job) -> str | None:
    """How the source differs from the identity the job recorded when it was claimed (None when it does not):
    a file cut, grown or replaced while it was being read is never recorded as done."""
    try:
        now = video_io.source_identity(job.source)
    except OSError as exc:
        return f"it can no longer be read ({exc.strerror or exc})"
    then = job.identity.get("source") or {}
    if now == then:
        return None
    keys = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k) and k != "sha256"]
    return ", ".join(f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in keys) or "its content changed"


def read_marker(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, DONE_MARKER), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def recorded_identity(out_dir: str) -> dict | None:
    """The job identity ``out_dir``'s ``done.json`` records (None when there is no such record)."""
    marker = read_marker(out_dir)
    recorded = marker.get("identity") if marker else None
    return recorded if isinstance(recorded, dict) else None


def _occupant(out_dir: str) -> str | None:
    """Who holds ``out_dir``: None when nothing is there, the real path of the source whose results it
    holds, or "" for anything else (a user's folder or file)."""
    if not os.path.lexists(out_dir):
        return None
    path = ((recorded_identity(out_dir) or {}).get("source") or {}).get("path")
    return os.path.realpath(path) if isinstance(path, str) else ""


def existing_result(job: Job) -> tuple[str, str | None]:
    """What ``OUT/<name>`` holds for this job: ``("absent", None)``; ``("done", None)`` when its
    ``done.json`` records this job's identity; ``("conflict", why)`` when it records another source content,
    model or settings (``--overwrite`` may replace it); ``("foreign", why)`` when it is anything else, which
    segment did not write and never replaces."""
    if not os.path.lexists(job.out_dir):
        return "absent", None
    recorded = recorded_identity(job.out_dir)
    if recorded is None:
        return "foreign", (f"{job.out_dir} exists and holds no results of segment's (no done.json recording what "
                           f"produced them); it is left alone: move it away, or choose another --out")
    if recorded == job.identity:
        return "done", None
    changed = []
    what = {"source": "another source", "model": "another model", "settings": "other settings"}
    for part in ("source", "model", "settings"):
        old, new = recorded.get(part) or {}, job.identity.get(part) or {}
        if old != new:
            keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            detail = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if k != "sha256")
            changed.append(f"{what[part]} ({detail or 'content changed'})")
    return "conflict", (f"{job.out_dir} holds results made with {'; '.join(changed)}; pass --overwrite to "
                        f"replace them, or choose another --out")


def assign_names(sources: list[VideoSource], out: str) -> None:
    """Output names consistent across runs: a source keeps a folder under ``out`` that records it (its
    base name or ``base-<hash>``); a base name taken by anything else (another source's results, a user's
    folder or file) gives ``base-<hash>``, as two inputs with one name in a single run get."""
    for src in sources:
        me = os.path.realpath(src.path)
        base = src.base or src.name
        hashed = video_io.hashed_name(src)
        for candidate in (base, hashed):
            if _occupant(os.path.join(out, candidate)) == me:
                src.name = candidate
                break
        else:
            if src.name == base and _occupant(os.path.join(out, base)) not in (None, me):
                src.name = hashed
