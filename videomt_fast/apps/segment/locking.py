"""Claims on videos under ``OUT``, and what may be deleted.

Each video is claimed with a lock file ``OUT/.<name>.lock`` (``flock``: released by the kernel when its
process dies), so runs sharing one ``--out`` never work on one video at once or delete each other's
temporary folders. Everything segment removes under ``OUT`` is removed here, by the holder of the claim.
"""

from __future__ import annotations

import os
import shutil
import uuid

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: videos are not locked against other runs
    fcntl = None


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


def replace_folder(tmp: str, out_dir: str, name: str) -> None:
    """Rename the complete folder ``tmp`` to ``out_dir``.

    The old folder (an incomplete one from elsewhere, or ``--overwrite``) is renamed aside, the new one
    renamed in, and only then the old one removed: a kill at any point leaves ``out_dir`` either complete
    or absent, never half-deleted with its marker.
    """
    old = None
    if os.path.lexists(out_dir):
        old = os.path.join(os.path.dirname(out_dir), f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
