"""transformers' own processor code, run without torchvision (for the benchmark and the tests).

transformers' VidEoMT video processor and EoMT image processor import torchvision at module level (the
resize backend), but their post-processing methods are plain torch. Where torchvision is missing (it has
no CPU build on some machines), :func:`exec_module_source` parses the installed module's file, resolves
its relative imports against transformers, drops the torchvision import, stands in for the backend
base class, and executes the rest unmodified: the methods that run are transformers' own code.

This module imports transformers only when called; videomt_fast itself never needs it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from typing import Any

_CACHE: dict[str, Any] = {}


def _package_dir() -> str:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("transformers is not installed")
    return list(spec.submodule_search_locations)[0]


def _no_docstring(obj: Any = None, **_: Any) -> Any:
    return obj if obj is not None else (lambda o: o)


class _Backend:
    """Stands in for transformers' processor base classes; the code run here uses none of them."""

    def __init__(self, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            setattr(self, key, value)


def exec_module_source(module: str, provided: dict[str, Any]) -> dict[str, Any]:
    """Execute ``transformers.<module>``'s source file (``module`` like ``"models.eomt.image_processing_eomt"``)
    in a fresh namespace and return it.

    Relative imports are resolved against transformers; a name that fails to import must be in
    ``provided`` (ImportError naming it otherwise). ``provided`` also overrides resolved names (the
    backend base classes). ``torchvision`` imports are dropped.
    """
    path = os.path.join(_package_dir(), *module.split(".")) + ".py"
    if not os.path.isfile(path):
        raise ImportError(f"this transformers has no {module} ({path} missing)")
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=path)
    package = ["transformers"] + module.split(".")[:-1]
    namespace: dict[str, Any] = {"__name__": f"hf_source_{module.replace('.', '_')}", "__file__": path}
    unresolved: list[str] = []
    body = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("torchvision")):
            if node.level > 0:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    name = alias.asname or alias.name
                    if name in provided:
                        continue
                    try:
                        namespace[name] = getattr(importlib.import_module(source), alias.name)
                    except Exception:  # noqa: BLE001 - an optional backend (torchvision) behind it
                        unresolved.append(name)
            continue
        body.append(node)
    if unresolved:
        raise ImportError(f"transformers.{module} needs {sorted(unresolved)}, which cannot be imported here")
    tree.body = body
    namespace.update(provided)
    exec(compile(tree, path, "exec"), namespace)  # noqa: S102 - transformers' own installed source
    return namespace


def videomt_video_processor() -> tuple[Any, str]:
    """``(processor, how)``: an instance of transformers' ``VideomtVideoProcessor``, or where torchvision
    is missing, of the same class from its source with ``BaseVideoProcessor`` stood in for."""
    import transformers

    try:
        return transformers.VideomtVideoProcessor(), "transformers.VideomtVideoProcessor"
    except Exception as exc:  # noqa: BLE001 - transformers raises ImportError subclasses and others
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:100]}"
    if "videomt" not in _CACHE:
        _CACHE["videomt"] = exec_module_source(
            "models.videomt.video_processing_videomt",
            {"BaseVideoProcessor": _Backend, "auto_docstring": _no_docstring},
        )
    cls = _CACHE["videomt"]["VideomtVideoProcessor"]
    return cls(), f"transformers' post-processing code run without torchvision ({reason})"


def eomt_image_processor_class() -> tuple[type, str]:
    """``(class, how)``: transformers' ``EomtImageProcessor``, or where torchvision is missing, the same
    class from its source with the torchvision backend stood in for (its split / pad / merge and all
    post-processing run; its resize does not)."""
    import transformers

    try:
        # without torchvision, transformers hands out its Pillow class under this name instead
        cls = type(transformers.EomtImageProcessor())
        if cls.__name__ == "EomtImageProcessor":
            return cls, "transformers.EomtImageProcessor"
        reason = f"transformers.EomtImageProcessor gives {cls.__name__} here"
    except Exception as exc:  # noqa: BLE001
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:100]}"
    if "eomt" not in _CACHE:
        _CACHE["eomt"] = exec_module_source(
            "models.eomt.image_processing_eomt",
            {"TorchvisionBackend": _Backend, "tvF": None, "auto_docstring": _no_docstring},
        )
    return _CACHE["eomt"]["EomtImageProcessor"], f"transformers' processor code run without torchvision ({reason})"

