"""Deploy outside PyTorch: ONNX graphs of the frame step (its carried queries an explicit input and
output), the clip and EoMT's image forward, with a JSON sidecar, and a runner on ONNX Runtime with the
session API (:mod:`.exporter`, :mod:`.runner`).

onnx, onnxruntime and onnxscript are an optional extra (``pip install -e ".[onnx]"``), imported only
when an export is made or run.
"""

from videomt_fast.export.errors import ExportError, FrameSizeError, MissingDependency, StateError
from videomt_fast.export.exporter import export
from videomt_fast.export.runner import OrtModel, OrtSession, load

__all__ = ["export", "load", "OrtModel", "OrtSession", "ExportError", "FrameSizeError", "StateError",
           "MissingDependency"]
