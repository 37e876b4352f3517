"""Configs with transformers' field names and defaults, readable from and writable to ``config.json``."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a (height, width) pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclass
class _SegmenterConfig:
    """Fields shared by VidEoMT and EoMT (transformers' ``EomtConfig``), same names and defaults."""

    model_type: ClassVar[str] = ""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int | list[int] | tuple[int, int] = 640
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    mlp_ratio: int = 4
    layerscale_value: float = 1.0
    drop_path_rate: float = 0.0
    num_upscale_blocks: int = 2
    attention_dropout: float = 0.0
    use_swiglu_ffn: bool = False
    num_blocks: int = 4
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    num_queries: int = 200
    num_register_tokens: int = 4
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json fields, kept for round trips

    def __init__(self, **kwargs: Any) -> None:
        names = {f.name for f in fields(self)}
        for f in fields(self):
            if f.name == "extra":
                continue
            default = f.default
            setattr(self, f.name, kwargs.pop(f.name, default))
        self.extra = dict(kwargs.pop("extra", {}) or {})
        for key in ("model_type", "transformers_version"):
            kwargs.pop(key, None)
        self.extra.update({k: v for k, v in kwargs.items() if k not in names})
        self._finish_labels()
        self.validate()

    def _finish_labels(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ValueError(
                    f"num_labels={self.num_labels} does not match id2label, which has {len(self.id2label)} entries"
                )
            self.num_labels = len(self.id2label)
        else:
            self.num_labels = 2 if self.num_labels is None else int(self.num_labels)
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.label2id = {k: int(v) for k, v in self.label2id.items()}

    def validate(self) -> None:
        checks = [
            (self.hidden_size > 0, "hidden_size must be positive"),
            (self.num_attention_heads > 0, "num_attention_heads must be positive"),
            (
                self.hidden_size % max(self.num_attention_heads, 1) == 0,
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})",
            ),
            (
                1 <= self.num_blocks <= self.num_hidden_layers,
                f"num_blocks ({self.num_blocks}) must be in [1, num_hidden_layers={self.num_hidden_layers}]",
            ),
            (self.num_queries >= 1, "num_queries must be at least 1"),
            (self.num_register_tokens >= 0, "num_register_tokens must be >= 0"),
            (self.num_upscale_blocks >= 1, "num_upscale_blocks must be at least 1"),
            (self.hidden_act in ("gelu",), f"hidden_act must be 'gelu' (exact erf), got {self.hidden_act!r}"),
        ]
        image, patch = _pair(self.image_size), _pair(self.patch_size)
        checks.append(
            (
                image[0] % patch[0] == 0 and image[1] % patch[1] == 0,
                f"image_size {image} must be a multiple of patch_size {patch}",
            )
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid {type(self).__name__}: {message}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        (h, w), (ph, pw) = self.image_hw, self.patch_hw
        return h // ph, w // pw

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    @property
    def mlp_hidden_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "_SegmenterConfig":
        data = dict(data)
        model_type = data.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(f"config model_type is {model_type!r}, {cls.__name__} expects {cls.model_type!r}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "_SegmenterConfig":
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "_SegmenterConfig":
        from videomt_fast.model.loading import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(path, **kwargs)
        return cls.from_json_file(os.path.join(directory, "config.json"))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from videomt_fast.model.loading import atomic_write_text

        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "config.json"), self.to_json_string())

    def __repr__(self) -> str:
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_blocks", "num_queries", "num_labels")
        inner = ", ".join(f"{k}={getattr(self, k)}" for k in keys)
        return f"{type(self).__name__}({inner}, ...)"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]


class VideomtConfig(_SegmenterConfig):
    """transformers' ``VideomtConfig``: same fields, same defaults (ViT-L shapes)."""

    model_type: ClassVar[str] = "videomt"


class EomtConfig(_SegmenterConfig):
    """transformers' ``EomtConfig``: same fields, same defaults (ViT-L shapes)."""

    model_type: ClassVar[str] = "eomt"


# The published VidEoMT backbones (DINOv2 with registers), for benchmarks and random-weight models.
PRESETS: dict[str, dict[str, Any]] = {
    "vit-s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}


def config_from_preset(name: str, cls: type[_SegmenterConfig] = VideomtConfig, **overrides: Any) -> _SegmenterConfig:
    """A config with the published shapes of ``name`` (``vit-s``, ``vit-b``, ``vit-l``)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return cls(**{**PRESETS[key], **overrides})
