"""``videomt-fast segment --runtime onnxruntime``: the frame step exported to ONNX and run on ONNX
Runtime, in place of the PyTorch session, for one segmentation engine (:mod:`.engine`).

:func:`check_settings` refuses the combinations that cannot run (called with the parsed options);
:func:`new_session` gives the engine an :class:`videomt_fast.export.OrtSession` for a video's padded
frame size. The model is exported once per process into a temporary folder (with torch's dynamo
exporter one export serves every frame size; with the TorchScript exporter one per size), float32
graphs unless ``--dtype float16``; ONNX Runtime runs on the CPU, or with CUDA / TensorRT first when the
device is a GPU and they are installed.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Any

RUNTIMES = ("torch", "onnxruntime")
_EXPORTS: dict[tuple, tuple[Any, Any]] = {}  # (model id, dtype, size or None) -> (model, OrtModel)


def check_settings(runtime: str, dtype: str, fast: bool) -> None:
    """ValueError (one line, exit 2) for what ``--runtime onnxruntime`` cannot do."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime != "onnxruntime":
        return
    if fast:
        raise ValueError("--fast applies to the torch runtime; --runtime onnxruntime runs the exported graphs")
    if dtype == "bfloat16":
        raise ValueError("--runtime onnxruntime runs float32 or float16 graphs, not bfloat16")
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--runtime onnxruntime needs {' and '.join(missing)}: pip install -e \".[onnx]\"")


def new_session(model, size: tuple[int, int], dtype: str, device: str):
    """An :class:`~videomt_fast.export.OrtSession` (batch 1) of ``model``'s step graph for frames of ``size``."""
    from videomt_fast.export import export, load
    from videomt_fast.export.exporter import resolve_exporter

    graph_dtype = "float16" if dtype == "float16" else "float32"
    dynamic = resolve_exporter() == "dynamo"
    key = (id(model), graph_dtype, None if dynamic else tuple(size))
    if _EXPORTS.get(key, (None,))[0] is not model:  # (an id is reused once its model is freed)
        folder = tempfile.mkdtemp(prefix="videomt-fast-segment-onnx-")
        atexit.register(shutil.rmtree, folder, True)
        export(model, f"{folder}/export", graphs_=["step"], dtypes=[graph_dtype], sizes=[tuple(size)], verify=False)
        providers = "auto" if str(device).startswith("cuda") else "cpu"
        _EXPORTS[key] = (model, load(f"{folder}/export", dtype=graph_dtype, providers=providers))
    return _EXPORTS[key][1].new_session(1)
