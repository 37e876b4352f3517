"""``videomt-fast segment``: offline segmentation of many videos, resumable, on one or more devices.

    videomt-fast segment INPUTS... --model DIR_OR_HUB_ID --task instance|semantic|panoptic --out DIR

INPUTS are video files, folders (searched recursively; a folder holding images is one video made of
those frames, in natural order) and text files listing such paths (one per line, ``#`` comments,
relative paths resolved from the list's folder).

Per video the outputs go to ``OUT/<video name>/``:

* ``instance``: ``instances.json`` (one entry per track: its id, its class and score decided over the
  video, the other classes it had among the top-k, and one RLE mask per frame), ``youtube_vis.json``
  (every top-k (track, class) pair in the YouTube-VIS results format, 1-based category ids = label + 1,
  for benchmark evaluation) and ``instance_ids/<frame>.png`` (track ids, 0 = none);
* ``semantic``: ``semantic/<frame>.png`` (class ids);
* ``panoptic``: ``panoptic/<frame>.png`` (COCO panoptic colour encoding, ``id = R + 256 G + 256^2 B``,
  0 = void) and ``panoptic.json`` (per-frame ``segments_info``);
* ``overlay.mp4`` with ``--overlay``;
* ``done.json`` last: the completion marker (:mod:`.jobs`).

The parts, each in its own file, each importing only what it needs (the command line last):

* :mod:`.settings`   what a run was asked to do;
* :mod:`.jobs`       job identity and resume: what decides a video is done;
* :mod:`.locking`    claims on videos under OUT, and what may be deleted;
* :mod:`.decoding`   decoder threads filling bounded per-video queues;
* :mod:`.engine`     one device's model: pre-processing, queries carried across chunks, post-processing;
* :mod:`.ort`        ``--runtime onnxruntime``: the exported frame step on ONNX Runtime, for the engine;
* :mod:`.writer`     the writer thread: files under a temporary folder, renamed into place when complete;
* :mod:`.pipeline`   one device: claim, decode, run, write;
* :mod:`.processes`  several devices: one worker process each over a shared list;
* :mod:`.ray_tasks`  ``--ray``: one Ray task per video;
* :mod:`.cli`        the command line and :func:`run`.
"""

from videomt_fast.apps import video_io
from videomt_fast.apps.segment.cli import (
    Interrupted,
    UsageError,
    build_parser,
    format_summary,
    main,
    resolve_devices,
    run,
    settings_from_args,
)
from videomt_fast.apps.segment.engine import Engine, Geometry, load_model, plan_geometry, resolve_dtype
from videomt_fast.apps.segment.jobs import DONE_MARKER, Job, existing_result, job_identity
from videomt_fast.apps.segment.locking import VideoLock
from videomt_fast.apps.segment.pipeline import segment_videos
from videomt_fast.apps.segment.processes import worker_main
from videomt_fast.apps.segment.settings import TASKS, SegmentSettings
from videomt_fast.apps.segment.writer import KILL_AFTER_FRAMES_ENV, KILL_ONCE_ENV, VideoOutput, Writer, WriterError

__all__ = [
    "DONE_MARKER", "KILL_AFTER_FRAMES_ENV", "KILL_ONCE_ENV", "TASKS", "Engine", "Geometry", "Job", "SegmentSettings",
    "Interrupted", "UsageError", "VideoLock", "VideoOutput", "Writer", "WriterError", "build_parser", "existing_result",
    "format_summary", "job_identity", "load_model", "main", "plan_geometry", "resolve_devices", "resolve_dtype", "run",
    "segment_videos", "settings_from_args", "video_io", "worker_main",
]
