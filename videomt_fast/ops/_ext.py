"""The compiled post-processing kernels (``videomt_fast._C``), found or built on first CUDA use.

Order: the extension ``setup.py`` built; else a just-in-time build of the csrc sources with
``torch.utils.cpp_extension.load`` into a cache folder (keyed by the sources, torch and CUDA versions);
else ``None``, with a one-time warning, and the ops run their PyTorch references. Nothing here runs
at package import: :mod:`videomt_fast.ops.cuda` calls :func:`load` from its guards, on CUDA tensors.

Switches: ``VIDEOMT_FAST_NO_JIT=1`` skips the just-in-time build; ``VIDEOMT_FAST_EXT_CACHE`` sets the
build folder (default ``~/.cache/videomt_fast``).

torch's builder takes a lock file in the build folder and waits on another build's lock forever; a
builder killed while holding it (a time limit, ``kill -9``) would leave every later load spinning. Here a
load waits at most ``VIDEOMT_FAST_JIT_WAIT_S`` seconds (default 600) for another build, and removes a
lock older than :data:`LOCK_STALE_S` (no build of these sources takes that long) with a warning.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}

SOURCES = ("bindings.cpp", "instance_kernels.cu", "panoptic_kernels.cu", "semantic_kernels.cu")
HEADERS = ("postprocess.h", "upsample.cuh")


def sources_dir() -> Path | None:
    """The folder holding the csrc sources: shipped inside the package, or the source checkout's csrc/."""
    package = Path(__file__).resolve().parent.parent  # videomt_fast/
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES + HEADERS):
            return candidate
    return None


def _cache_dir(src: Path) -> Path:
    import torch

    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((src / name).read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}".encode())
    return _cache_root() / f"postprocess-{digest.hexdigest()[:16]}"


def _cache_root() -> Path:
    """``$VIDEOMT_FAST_EXT_CACHE``, else ``~/.cache/videomt_fast``: every build folder is under it."""
    return Path(os.environ.get("VIDEOMT_FAST_EXT_CACHE", Path.home() / ".cache" / "videomt_fast"))


LOCK_STALE_S = 900.0  # a build lock older than this was left by a builder that is gone


def clear_stale_lock(build: Path, max_age_s: float = LOCK_STALE_S) -> bool:
    """Remove ``build/lock`` when it is at least ``max_age_s`` old (0: whatever its age, for a caller that
    knows no build is running). Returns whether one was removed."""
    lock = Path(build) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    lock.unlink(missing_ok=True)
    warnings.warn(f"videomt_fast: removed a stale build lock {lock} ({age:.0f} s old)", RuntimeWarning, stacklevel=2)
    return True


def clear_locks() -> list[Path]:
    """Remove every build lock under the build folder: for a caller that knows it is the only builder on its
    machine (the GPU check), after an earlier run was killed mid-build."""
    return [lock for lock in _cache_root().glob("postprocess-*/lock") if clear_stale_lock(lock.parent, 0.0)]


def wait_for_lock(build: Path, timeout_s: float, poll_s: float = 0.5) -> None:
    """Return once no other build holds ``build``'s lock (a stale one is removed); raise after
    ``timeout_s`` seconds instead of waiting forever."""
    lock = Path(build) / "lock"
    deadline = time.monotonic() + timeout_s
    while lock.exists():
        if clear_stale_lock(build):
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"another build of the extension holds {lock} (waited {timeout_s:.0f} s); "
                               "remove the file if no build is running")
        time.sleep(poll_s)


def _jit_build() -> ModuleType:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load as load_extension

    if os.environ.get("VIDEOMT_FAST_NO_JIT", "0") == "1":
        raise RuntimeError("just-in-time build disabled by VIDEOMT_FAST_NO_JIT=1")
    if torch.version.cuda is None:
        raise RuntimeError("torch is a CPU build")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    src = sources_dir()
    if src is None:
        raise RuntimeError("csrc sources not found next to the package")
    build = _cache_dir(src)
    build.mkdir(parents=True, exist_ok=True)
    wait_for_lock(build, float(os.environ.get("VIDEOMT_FAST_JIT_WAIT_S", "600")))
    return load_extension(
        name="videomt_fast_C",
        sources=[str(src / name) for name in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3", "-std=c++20"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        build_directory=str(build),
        verbose=os.environ.get("VIDEOMT_FAST_EXT_VERBOSE", "0") == "1",
    )


def load() -> ModuleType | None:
    """The extension module, or ``None`` when it can be neither imported nor built (see :func:`error`)."""
    if "module" in _STATE:
        return _STATE["module"]  # type: ignore[return-value]
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]  # type: ignore[return-value]
        module, errors = None, []
        try:
            module = importlib.import_module("videomt_fast._C")
        except Exception as exc:  # not built by setup.py
            errors.append(f"videomt_fast._C: {type(exc).__name__}: {exc}")
            try:
                module = _jit_build()
            except Exception as exc2:
                errors.append(f"just-in-time build: {type(exc2).__name__}: {exc2}")
        _STATE["module"] = module
        _STATE["error"] = None if module is not None else "; ".join(errors)
        if module is None:
            warnings.warn(
                "videomt_fast: the CUDA post-processing extension is unavailable "
                f"({_STATE['error']}); post-processing runs on the vectorized PyTorch path",
                RuntimeWarning,
                stacklevel=3,
            )
        return module


def ready() -> bool:
    """Whether :func:`load` gives the extension without a build: loaded already, built by ``setup.py``, or
    built just in time earlier into the cache folder (and just-in-time loading is allowed)."""
    if "module" in _STATE:
        return _STATE["module"] is not None
    if importlib.util.find_spec("videomt_fast._C") is not None:
        return True
    if os.environ.get("VIDEOMT_FAST_NO_JIT", "0") == "1":
        return False
    src = sources_dir()
    try:
        return src is not None and any(_cache_dir(src).glob("videomt_fast_C*.so"))
    except Exception:
        return False


def error() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` before the first attempt or after a success)."""
    return _STATE.get("error")  # type: ignore[return-value]
