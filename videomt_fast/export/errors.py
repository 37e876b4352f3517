"""The errors of exporting and of running exported graphs; each names the input and what was expected."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be made as asked (a size that is not a multiple of the patch, a graph or dtype
    the model has no form of, an output folder in the way)."""


class FrameSizeError(ValueError):
    """Frames of a size the exported graphs do not take (not a multiple of the patch, or not among the
    sizes a fixed-size export was made for)."""


class StateError(ValueError):
    """Carried queries of the wrong shape or dtype for the step graph."""


class MissingDependency(ImportError):
    """onnx, onnxruntime or onnxscript is not installed."""


def require(module: str, what: str):
    """Import ``module`` or raise :class:`MissingDependency` saying what needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{what} needs the '{module.split('.')[0]}' package, which is not installed "
            f"({exc}); install the ONNX extra: pip install -e \".[onnx]\" (onnx, onnxruntime, onnxscript)"
        ) from None
