"""``patch_transformers()``: transformers' own loaders return videomt_fast models, reversibly."""

from __future__ import annotations

import json
import os
from typing import Any

_STATE: dict[str, Any] = {"patches": None}


def _fast_classes() -> dict[str, type]:
    from videomt_fast.model.modeling import EomtForUniversalSegmentation, VideomtForUniversalSegmentation

    return {"videomt": VideomtForUniversalSegmentation, "eomt": EomtForUniversalSegmentation}


def _model_type(name_or_path: Any, kwargs: dict) -> str | None:
    config = kwargs.get("config")
    if config is not None:
        return getattr(config, "model_type", None)
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return None
    try:
        from videomt_fast.model.loading import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(path, **{k: kwargs[k] for k in ("revision", "cache_dir", "token") if k in kwargs})
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            return json.load(handle).get("model_type")
    except (OSError, ValueError):
        return None


def _fast_kwargs(kwargs: dict) -> dict:
    """Keep the loader arguments that mean the same thing for both libraries."""
    keep = {}
    for key in ("dtype", "torch_dtype", "device_map", "revision", "cache_dir", "token", "local_files_only"):
        if key in kwargs:
            keep[key] = kwargs[key]
    return keep


class TransformersPatch:
    """Handle returned by :func:`patch`; ``undo()`` restores transformers. Also a context manager."""

    def __init__(self, restores: list[tuple[type, str, Any]]):
        self._restores = restores

    def undo(self) -> None:
        unpatch()

    def __enter__(self) -> "TransformersPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        unpatch()


def patch() -> TransformersPatch:
    import transformers

    if _STATE["patches"] is not None:
        return _STATE["patches"]
    fast = _fast_classes()
    restores: list[tuple[type, str, Any]] = []

    def remember(owner: type, name: str) -> None:
        restores.append((owner, name, owner.__dict__.get(name, _MISSING)))

    for model_type, hf_name in (("videomt", "VideomtForUniversalSegmentation"), ("eomt", "EomtForUniversalSegmentation")):
        hf_cls = getattr(transformers, hf_name, None)
        if hf_cls is None:
            continue
        target = fast[model_type]

        def loader(cls, name_or_path, *args, _target=target, **kwargs):
            return _target.from_pretrained(name_or_path, **_fast_kwargs(kwargs))

        remember(hf_cls, "from_pretrained")
        hf_cls.from_pretrained = classmethod(loader)

    auto_cls = getattr(transformers, "AutoModelForUniversalSegmentation", None)
    if auto_cls is not None:
        original = auto_cls.from_pretrained  # bound classmethod

        def auto_loader(cls, name_or_path, *args, **kwargs):
            model_type = _model_type(name_or_path, kwargs)
            if model_type in fast:
                return fast[model_type].from_pretrained(name_or_path, **_fast_kwargs(kwargs))
            return original(name_or_path, *args, **kwargs)

        remember(auto_cls, "from_pretrained")
        auto_cls.from_pretrained = classmethod(auto_loader)

    _STATE["patches"] = TransformersPatch(restores)
    return _STATE["patches"]


def unpatch() -> None:
    handle = _STATE["patches"]
    if handle is None:
        return
    for owner, name, previous in reversed(handle._restores):
        if previous is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)
    _STATE["patches"] = None


def is_patched() -> bool:
    return _STATE["patches"] is not None


class _Missing:
    pass


_MISSING = _Missing()
