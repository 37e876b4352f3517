"""Several devices: one worker process per device over one shared list of videos.

Workers claim jobs from the plan's claim folder (one ``O_EXCL`` file per job) and report events on stdout.
A worker exits when its parent dies, and a dead worker's unfinished videos are run again by the others.
Ctrl-C reaches the workers (the terminal's process group, or the parent passing it on): each removes its
open video's temporary folder and reports what it had claimed as interrupted before it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import asdict
from typing import Any, Iterator

import videomt_fast
from videomt_fast.apps.segment.jobs import Job, result
from videomt_fast.apps.segment.pipeline import segment_videos
from videomt_fast.apps.segment.settings import SegmentSettings
from videomt_fast.apps.video_io import VideoSource

_EVENT_PREFIX = "@@videomt-segment "
MAX_ATTEMPTS = 2  # a video whose worker died this many times is failed by name (it may be what kills it)


def package_env() -> dict:
    """The environment of a child process that imports this checkout of the package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(videomt_fast.__file__)))
    return {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}


def _job_to_dict(job: Job) -> dict:
    return {"source": asdict(job.source), "out_dir": job.out_dir, "identity": job.identity}


def _job_from_dict(data: dict) -> Job:
    return Job(VideoSource(**data["source"]), data["out_dir"], data.get("identity") or {})


def _exit_with_parent() -> None:
    """A worker's stdin is a pipe from its parent: end of file means the parent is gone, so exit at once
    (the kernel then drops this worker's video claims; its temporary folders are removed on a rerun)."""

    def watch() -> None:  # reads the file descriptor itself: a thread blocked in sys.stdin would hold its
        try:  # lock, and the interpreter aborts at exit when it cannot take it
            while os.read(0, 1 << 16):
                pass
        except OSError:
            pass
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(argv: list[str]) -> int:
    """A device worker process: ``PLAN_JSON DEVICE``. Claims jobs from the plan's claim folder (one
    ``O_EXCL`` file per job, so several workers share one list; a file the parent removes, because the
    worker that claimed it died, makes the job claimable again) and reports events on stdout."""
    plan_path, device = argv
    _exit_with_parent()

    def interrupt_once(signum, frame) -> None:  # the terminal's Ctrl-C and the parent's may both come
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt_once)
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
    try:
        segment_videos(claimed(), settings, device, emit)
    except KeyboardInterrupt:
        return 130
    return 0


def run_multi(jobs: list[Job], settings: SegmentSettings, devices: list[str], on_event) -> None:
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
            on_event("result", result(job, "failed", error=f"{job.source.path}: {why}"))


def _run_round(jobs: list[Job], indices: list[int], attempts: list[int], exits: list[str], settings: SegmentSettings,
               devices: list[str], on_event) -> list[int]:
    """Workers over ``jobs[indices]``; returns the indices to run again (given back by dead workers)."""
    run_id = uuid.uuid4().hex[:12]
    plan_path = os.path.join(settings.out, f".segment-run-{run_id}.json")
    claims = os.path.join(settings.out, f".segment-run-{run_id}.claims")
    os.makedirs(claims)
    with open(plan_path, "w", encoding="utf-8") as fh:
        json.dump({"settings": asdict(settings), "jobs": [_job_to_dict(jobs[i]) for i in indices], "claims": claims}, fh)
    env = {**os.environ, **package_env()}
    code = "import sys; from videomt_fast.apps.segment.processes import worker_main; sys.exit(worker_main(sys.argv[1:]))"
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
                    on_event("result", result(jobs[index], "failed", error=f"{jobs[index].source.path}: {why}"))
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
    except KeyboardInterrupt:  # let the workers clean up and report, then stop
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for thread in pumps:
            thread.join(timeout=30)
        raise
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
