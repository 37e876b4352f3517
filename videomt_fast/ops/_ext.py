"""The compiled post-processing kernels (``videomt_fast._C``), found or built on first CUDA use.

Order: the extension ``setup.py`` built; else a just-in-time build of the csrc sources with
``torch.utils.cpp_extension.load`` into a cache folder (keyed by the sources, torch and CUDA versions);
else ``None``, with a one-time warning, and the ops run their PyTorch references. Nothing here runs
at package import: :mod:`videomt_fast.ops.cuda` calls :func:`load` from its guards, on CUDA tensors.

Switches: ``VIDEOMT_FAST_NO_JIT=1`` skips the just-in-time build; ``VIDEOMT_FAST_EXT_CACHE`` sets the
build folder (default ``~/.cache/videomt_fast``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import threading
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
    root = Path(os.environ.get("VIDEOMT_FAST_EXT_CACHE", Path.home() / ".cache" / "videomt_fast"))
    return root / f"postprocess-{digest.hexdigest()[:16]}"


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


def error() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` before the first attempt or after a success)."""
    return _STATE.get("error")  # type: ignore[return-value]
