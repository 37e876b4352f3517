"""Claims on videos under ``OUT``, and what may be deleted.

Each video is claimed with a lock file ``OUT/.<name>.lock`` (``flock``: released by the kernel when its
process dies), so runs sharing one ``--out`` never work on one video at once or delete each other's
temporary folders. Everything segment removes under ``OUT`` is removed here, by the holder of the claim,
and only what segment can prove it wrote:

* its own hidden entries for the claimed name: the lock file, temporary folders ``.<name>.tmp-*`` and
  folders set aside while replacing ``.<name>.old-*`` (leftovers of killed runs included);
* a results folder ``OUT/<name>`` replaced with ``--overwrite``, only when its ``done.json`` lists every
  file and folder in it (:func:`unproven`). A user's folder or file, a ``done.json`` segment did not
  write, or a file added to the results is never deleted: the video fails by name instead.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid

from videomt_fast.apps.segment.jobs import DONE_MARKER, read_marker

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: videos are not locked against other runs
    fcntl = None


class NotOurs(RuntimeError):
    """A path under OUT that segment cannot prove it wrote: it is left alone."""


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


def release(job) -> None:
    """Give up ``job``'s claim, if this process holds one."""
    if job.lock is not None:
        job.lock.release()


def temporary_name(name: str, kind: str, tag: str) -> str:
    """``.<name>.tmp-<tag>`` (being written) or ``.<name>.old-<tag>`` (set aside while replacing)."""
    return f".{name}.{kind}-{tag}"


def _is_leftover(entry: str, name: str) -> bool:
    """A temporary or set-aside folder name of the video ``name`` (not of a video whose name starts with
    ``name.tmp-``: a tag holds no second ``.tmp-``/``.old-``)."""
    match = re.fullmatch(rf"\.{re.escape(name)}\.(?:tmp|old)-(.+)", entry)
    return match is not None and not re.search(r"\.(?:tmp|old)-", match.group(1))


def remove_stale_partials(parent: str, name: str) -> None:
    """Temporary and set-aside folders a killed run left for this video (call it holding its claim)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        path = os.path.join(parent, entry)
        if _is_leftover(entry, name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def unproven(out_dir: str) -> str | None:
    """Why segment may not delete ``out_dir`` (None when it may: nothing is there, or its ``done.json``
    records what produced it and lists every file and folder in it)."""
    if not os.path.lexists(out_dir):
        return None
    marker = (read_marker(out_dir) if os.path.isdir(out_dir) and not os.path.islink(out_dir) else None) or {}
    listed = marker.get("files")
    if not isinstance(marker.get("identity"), dict) or not isinstance(listed, list):
        return (f"{out_dir} was not written by segment (or by a version that did not list its files in "
                f"done.json); it is left alone: move it away, or choose another --out")
    files = {DONE_MARKER, *(f for f in listed if isinstance(f, str))}
    folders = {parent for f in files for parent in _parents(f)}
    foreign: list[str] = []

    def unreadable(exc: OSError) -> None:
        foreign.append(os.path.relpath(exc.filename or out_dir, out_dir))

    for folder, subfolders, names in os.walk(out_dir, onerror=unreadable):  # links are not followed
        for entry in subfolders + names:
            path = os.path.join(folder, entry)
            rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
            if os.path.islink(path) or rel not in (folders if entry in subfolders else files):
                foreign.append(rel)  # segment writes no links
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"{out_dir} holds files segment did not write ({shown}); they are left alone: move them away to redo it"
    return None


def _parents(path: str) -> list[str]:
    """``a/b/c.png`` -> ``["a/b", "a"]``."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def replace_folder(tmp: str, out_dir: str, name: str) -> None:
    """Rename the complete folder ``tmp`` to ``out_dir``; raises :class:`NotOurs` (leaving everything in
    place) when ``out_dir`` holds anything segment cannot prove it wrote.

    The old folder (``--overwrite``) is renamed aside, the new one renamed in, and only then the old one
    removed: a kill at any point leaves ``out_dir`` either complete or absent, never half-deleted with its
    marker.
    """
    why = unproven(out_dir)
    if why is not None:
        raise NotOurs(why)
    old = None
    if os.path.lexists(out_dir):
        old = os.path.join(os.path.dirname(out_dir), temporary_name(name, "old", uuid.uuid4().hex[:8]))
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
