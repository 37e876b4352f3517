"""``patch_transformers()``: transformers' own loaders return videomt_fast models, reversibly."""

from __future__ import annotations

from typing import Any

_STATE: dict[str, Any] = {"patches": None}


def _fast_classes() -> dict[str, type]:
    from videomt_fast.model.modeling import (EomtDinov3ForUniversalSegmentation, EomtForUniversalSegmentation,
                                             VideomtForUniversalSegmentation)

    return {"videomt": VideomtForUniversalSegmentation, "eomt": EomtForUniversalSegmentation,
            "eomt_dinov3": EomtDinov3ForUniversalSegmentation}


def _model_type(name_or_path: Any, kwargs: dict) -> str | None:
    """The model type ``from_pretrained(name_or_path, **kwargs)`` would load, or None if unknown."""
    config = kwargs.get("config")
    if config is not None:
        return getattr(config, "model_type", None)
    if name_or_path is None:
        return None
    from videomt_fast.model.loading import checkpoint_model_type

    keys = ("revision", "cache_dir", "token", "subfolder", "local_files_only")
    return checkpoint_model_type(name_or_path, **{k: kwargs[k] for k in keys if k in kwargs})


def _name_or_path(args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """``from_pretrained``'s first argument, given by position or as ``pretrained_model_name_or_path=``."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("pretrained_model_name_or_path", None), (), kwargs


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

    for model_type, target in fast.items():
        hf_name = target.__name__
        hf_cls = getattr(transformers, hf_name, None)
        if hf_cls is None:
            continue

        def loader(cls, *args, _target=target, **kwargs):
            # every argument passes through: ours take transformers' (and refuse the ones they cannot honour)
            return _target.from_pretrained(*args, **kwargs)

        remember(hf_cls, "from_pretrained")
        hf_cls.from_pretrained = classmethod(loader)

    auto_cls = getattr(transformers, "AutoModelForUniversalSegmentation", None)
    if auto_cls is not None:
        original = auto_cls.from_pretrained  # bound classmethod

        def auto_loader(cls, *args, **kwargs):
            name_or_path, rest, options = _name_or_path(args, kwargs)
            model_type = _model_type(name_or_path, options)
            if model_type in fast:
                return fast[model_type].from_pretrained(name_or_path, *rest, **options)
            return original(*args, **kwargs)

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
