"""Configs with transformers' field names and defaults, readable from and writable to ``config.json``."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names every key (or config field) that is missing,
    unexpected, misshapen or invalid."""


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a (height, width) pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# field -> (check, what is expected); checked on construction, so a bad config.json fails at load
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "hidden_size": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "num_hidden_layers": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "num_attention_heads": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "hidden_act": (lambda v: v == "gelu", "'gelu' (exact erf)"),  # DINOv3 configs: 'gelu' or 'silu'
    "layer_norm_eps": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    "image_size": (
        lambda v: (_is_int(v) and v > 0)
        or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)),
        "a positive int or a (height, width) pair of positive ints",
    ),
    "patch_size": (
        lambda v: (_is_int(v) and v > 0)
        or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)),
        "a positive int or a (height, width) pair of positive ints",
    ),
    "num_channels": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "mlp_ratio": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "layerscale_value": (_is_number, "a finite number"),
    "num_upscale_blocks": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "use_swiglu_ffn": (lambda v: isinstance(v, bool), "true or false"),
    "num_blocks": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "num_queries": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "num_register_tokens": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "return_dict": (lambda v: isinstance(v, bool), "true or false"),
    "output_hidden_states": (lambda v: isinstance(v, bool), "true or false"),
    "output_attentions": (lambda v: isinstance(v, bool), "true or false"),
}
for _name in ("hidden_dropout_prob", "initializer_range", "drop_path_rate", "attention_dropout", "no_object_weight",
              "class_weight", "mask_weight", "dice_weight", "oversample_ratio", "importance_sample_ratio"):
    _FIELD_RULES[_name] = (_is_number, "a finite number")
_FIELD_RULES["train_num_points"] = (_is_int, "an int")
_FIELD_RULES.update({
    "architectures": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                      "null or a list of class names"),
    "dtype": (lambda v: v is None or isinstance(v, str), "null or a dtype name such as 'float32'"),
    "chunk_size_feed_forward": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "problem_type": (lambda v: v is None or isinstance(v, str), "null or a string"),
})
# transformers' PreTrainedConfig fields with no inference meaning here: kept, round-tripped, written to
# config.json only when set
_PRETRAINED_DEFAULTS: dict[str, Any] = {"architectures": None, "dtype": None, "chunk_size_feed_forward": 0,
                                        "problem_type": None}


def _rope_ok(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    theta = value.get("rope_theta", 100.0)
    return value.get("rope_type", "default") == "default" and _is_number(theta) and theta > 0


def _optional_number(value: Any) -> bool:
    return value is None or _is_number(value)


# DINOv3 backbones (EomtDinov3Config, and VideomtConfig with backbone_type="dinov3")
_DINOV3_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "hidden_act": (lambda v: v in ("gelu", "silu"), "'gelu' (exact erf) or 'silu'"),
    "intermediate_size": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "rope_parameters": (_rope_ok, "None or {'rope_type': 'default', 'rope_theta': a positive number} "
                                  "(only the default rope type is supported, as in transformers' EoMT-DINOv3)"),
    "pos_embed_shift": (_optional_number, "None or a finite number"),
    "pos_embed_jitter": (_optional_number, "None or a finite number"),
    "pos_embed_rescale": (_optional_number, "None or a finite number"),
}
for _name in ("query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp"):
    _DINOV3_RULES[_name] = (lambda v: isinstance(v, bool), "true or false")
BACKBONES = ("dinov2", "dinov3")


def _label_key(key: Any) -> int:
    if _is_int(key):
        return key
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    raise ValueError(key)


@dataclass(eq=False, repr=False)
class _SegmenterConfig:
    """Fields shared by VidEoMT and EoMT (transformers' ``EomtConfig``), same names and defaults.

    ``num_labels`` behaves as in transformers: setting it to a new count rebuilds ``id2label`` /
    ``label2id`` (``LABEL_0`` ...). Invalid values raise a ``ValueError`` naming the field, the value
    and what is expected (a :class:`CheckpointError` naming the file when read from ``config.json``).
    """

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
    layerscale_value: float = 1.0
    drop_path_rate: float = 0.0
    num_upscale_blocks: int = 2
    attention_dropout: float = 0.0
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
    # transformers' PreTrainedConfig switches, read by forward() when its arguments leave them unset
    return_dict: bool = True
    output_hidden_states: bool = False
    output_attentions: bool = False
    architectures: list[str] | None = None
    dtype: str | None = None  # a torch dtype's name ("float32"); a torch.dtype set here is stored by name
    chunk_size_feed_forward: int = 0
    problem_type: str | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json fields, kept for round trips

    # fields that do not change what inference computes: training losses and regularization, output
    # switches, label names, other JSON fields (read by :meth:`structure`)
    NON_STRUCTURAL: ClassVar[frozenset[str]] = frozenset({
        "hidden_dropout_prob", "initializer_range", "drop_path_rate", "attention_dropout", "no_object_weight",
        "class_weight", "mask_weight", "dice_weight", "train_num_points", "oversample_ratio",
        "importance_sample_ratio", "return_dict", "output_hidden_states", "output_attentions", "id2label",
        "label2id", "extra", "architectures", "dtype", "chunk_size_feed_forward", "problem_type",
        "pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale",  # (DINOv3's training augmentations)
    })

    def __init__(self, **kwargs: Any) -> None:
        names = {f.name for f in fields(self)}
        for f in fields(self):
            if f.name == "extra":
                continue
            setattr(self, f.name, kwargs.pop(f.name, f.default))
        num_labels = kwargs.pop("num_labels", None)
        self.extra = dict(kwargs.pop("extra", {}) or {})
        # transformers' attention switch (not written to config.json); our kernels compute either
        self._attn_implementation = kwargs.pop("attn_implementation", None) or kwargs.pop("_attn_implementation", None)
        self._name_or_path = str(kwargs.pop("_name_or_path", "") or "")
        for key in ("model_type", "transformers_version", "use_return_dict", "_attn_implementation"):
            kwargs.pop(key, None)
        self.extra.update({k: v for k, v in kwargs.items() if k not in names})
        self._finish_labels(num_labels)
        self._normalize()
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "dtype" and value is not None and not isinstance(value, str):
            value = str(value).removeprefix("torch.")  # torch.float16 -> "float16", as config.json holds it
        super().__setattr__(name, value)

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    def _normalize(self) -> None:
        """Fill fields whose value depends on others (DINOv3's ``rope_parameters``), as transformers does."""
        if self.backbone_family == "dinov3" and (self.rope_parameters is None or isinstance(self.rope_parameters, dict)):
            rope = dict(self.rope_parameters or {})
            rope.setdefault("rope_theta", 100.0)
            rope.setdefault("rope_type", "default")
            self.rope_parameters = rope

    def _finish_labels(self, num_labels: Any) -> None:
        if num_labels is not None and not (_is_int(num_labels) and num_labels >= 1):
            raise ValueError(f"invalid {type(self).__name__}: num_labels = {num_labels!r}; expected an int >= 1")
        if self.id2label is not None:
            if not isinstance(self.id2label, dict):
                raise ValueError(
                    f"invalid {type(self).__name__}: id2label = {self.id2label!r}; expected a mapping "
                    "{class index: name}"
                )
            try:
                self.id2label = {_label_key(k): v for k, v in self.id2label.items()}
            except ValueError as exc:
                raise ValueError(
                    f"invalid {type(self).__name__}: id2label has the key {exc.args[0]!r}; expected integer class "
                    "indices"
                ) from None
            if num_labels is not None and num_labels != len(self.id2label):
                raise ValueError(
                    f"num_labels={num_labels} does not match id2label, which has {len(self.id2label)} entries"
                )
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        elif not isinstance(self.label2id, dict):
            raise ValueError(
                f"invalid {type(self).__name__}: label2id = {self.label2id!r}; expected a mapping {{name: class index}}"
            )
        else:
            try:
                self.label2id = {k: _label_key(v) for k, v in self.label2id.items()}
            except ValueError as exc:
                raise ValueError(
                    f"invalid {type(self).__name__}: label2id has the value {exc.args[0]!r}; expected integer class "
                    "indices"
                ) from None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"num_labels = {value!r}; expected an int >= 1")
        if self.id2label is None or len(self.id2label) != value:
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    def validate(self) -> None:
        name = type(self).__name__
        names = {f.name for f in fields(self)}
        rules = dict(_FIELD_RULES)
        if self.backbone_family == "dinov3":
            rules.update(_DINOV3_RULES)
        for key, (ok, expected) in rules.items():
            if key not in names:
                continue
            value = getattr(self, key)
            if not ok(value):
                raise ValueError(f"invalid {name}: {key} = {value!r}; expected {expected}")
        checks = [
            (
                self.hidden_size % self.num_attention_heads == 0,
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})",
            ),
            (
                self.num_blocks <= self.num_hidden_layers,
                f"num_blocks ({self.num_blocks}) must be in [1, num_hidden_layers={self.num_hidden_layers}]",
            ),
        ]
        if self.backbone_family == "dinov3":
            checks.append((
                self.head_dim % 4 == 0,
                f"the head dim hidden_size / num_attention_heads = {self.hidden_size / self.num_attention_heads:g} must "
                "be a multiple of 4 (DINOv3's rotary embedding turns head_dim / 4 frequencies per axis)",
            ))
        image, patch = _pair(self.image_size), _pair(self.patch_size)
        checks.append(
            (
                image[0] % patch[0] == 0 and image[1] % patch[1] == 0,
                f"image_size {image} must be a multiple of patch_size {patch}",
            )
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid {name}: {message}")

    def structure(self) -> dict[str, Any]:
        """What decides the computation and its shapes: every field except :attr:`NON_STRUCTURAL`, plus the
        model type and the label count. Equal for a config and its round trip through transformers (which
        adds fields of its own), so it keys what is measured per model shape (execution plans)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.NON_STRUCTURAL}
        out.update(model_type=self.model_type, num_labels=len(self.id2label))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

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
    def backbone_family(self) -> str:
        """``"dinov2"`` (learned absolute position table, fused QKV with biases) or ``"dinov3"`` (rotary
        embeddings on the patch tokens, optional gated MLP)."""
        return "dinov2"

    @property
    def mlp_hidden_size(self) -> int:
        if self.backbone_family == "dinov3":
            return self.intermediate_size
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def gated_mlp(self) -> bool:
        """The MLP is ``down(act(gate(x)) * up(x))`` (DINOv2's SwiGLU, DINOv3's gated MLP)."""
        return bool(self.use_gated_mlp if self.backbone_family == "dinov3" else self.use_swiglu_ffn)

    @property
    def mlp_activation(self) -> str:
        """The MLP's activation: DINOv2's SwiGLU is SiLU-gated, its plain MLP GELU; DINOv3 uses ``hidden_act``."""
        if self.backbone_family == "dinov3":
            return self.hidden_act
        return "silu" if self.use_swiglu_ffn else "gelu"

    @property
    def head_activation(self) -> str:
        """The activation of the mask head and the upscale blocks: GELU (transformers' EoMT-DINOv3: ``hidden_act``)."""
        return "gelu"

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 100.0))

    def _hidden_fields(self) -> set[str]:
        """Fields ``to_dict`` leaves out (another backbone family's)."""
        return set()

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        hidden = self._hidden_fields() | {k for k, v in _PRETRAINED_DEFAULTS.items() if getattr(self, k) == v}
        for f in fields(self):
            if f.name != "extra" and f.name not in hidden:
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
    def coerce(cls, config: Any) -> "_SegmenterConfig":
        """``config`` as this class: itself, or converted from transformers' config of the same model type
        (any object with ``to_dict()`` and a matching ``model_type``; its values are copied)."""
        if isinstance(config, cls):
            return config
        to_dict = getattr(config, "to_dict", None)
        if getattr(config, "model_type", None) == cls.model_type and callable(to_dict):
            data = {k: v for k, v in to_dict().items() if not k.startswith("_") and v is not None}
            # transformers keeps these switches on the config object, not always in to_dict()
            for key in ("return_dict", "output_hidden_states", "output_attentions", "_attn_implementation"):
                if getattr(config, key, None) is not None:
                    data[key] = getattr(config, key)
            return cls.from_dict(data)
        raise TypeError(
            f"needs a {cls.__name__} (ours or transformers'), got {type(config).__name__} "
            f"with model_type {getattr(config, 'model_type', None)!r}"
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "_SegmenterConfig":
        """Read ``config.json``; a field that is missing its type or range raises :class:`CheckpointError`
        naming the file, the field, the value and what is expected."""
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"config file {path} holds a {type(data).__name__}; expected a JSON object")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"config file {path}: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "_SegmenterConfig":
        from videomt_fast.model.loading import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(path, **kwargs)
        return cls.from_json_file(os.path.join(directory, "config.json"))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        from videomt_fast.model.loading import atomic_write_text

        atomic_write_text(os.fspath(path), self.to_json_string())

    def to_diff_dict(self) -> dict[str, Any]:
        """transformers' ``to_diff_dict``: the fields that differ from the defaults, plus ``model_type``."""
        defaults = type(self)().to_dict()
        out = {k: v for k, v in self.to_dict().items() if defaults.get(k, object()) != v}
        out["model_type"] = self.model_type
        return out

    # transformers' PreTrainedConfig surface that callers read on single-model configs
    is_encoder_decoder: ClassVar[bool] = False
    _commit_hash: ClassVar[str | None] = None  # the hub revision transformers' pipelines read (none: local)
    sub_configs: ClassVar[dict[str, Any]] = {}

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    def get_text_config(self, *args: Any, **kwargs: Any) -> "_SegmenterConfig":
        return self

    def __iter__(self):
        """The attribute names, as transformers' configs iterate."""
        yield from self.__dict__

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from videomt_fast.model.loading import atomic_write_text

        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "config.json"), self.to_json_string())

    def __repr__(self) -> str:
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_blocks", "num_queries", "num_labels")
        inner = ", ".join(f"{k}={getattr(self, k)}" for k in keys)
        return f"{type(self).__name__}({inner}, ...)"

    def __eq__(self, other: object) -> bool:
        """Same type and same fields; bookkeeping that saving adds (``architectures``, ``dtype``) is not compared."""
        if type(self) is not type(other):
            return False
        mine, theirs = self.to_dict(), other.to_dict()  # type: ignore[union-attr]
        for data in (mine, theirs):
            data.pop("architectures", None)
            data.pop("dtype", None)
        return mine == theirs


@dataclass(init=False, eq=False, repr=False)
class _Dinov2Fields(_SegmenterConfig):
    """DINOv2's MLP fields (transformers' ``EomtConfig`` / ``VideomtConfig``)."""

    mlp_ratio: int = 4
    use_swiglu_ffn: bool = False


@dataclass(init=False, eq=False, repr=False)
class _Dinov3Fields(_SegmenterConfig):
    """DINOv3's fields (transformers' ``EomtDinov3Config``), same names and defaults. The position-embedding
    shift / jitter / rescale are training-time augmentations: inference never applies them (as transformers'
    eval mode)."""

    intermediate_size: int = 4096
    rope_parameters: dict[str, Any] | None = None
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    use_gated_mlp: bool = False
    pos_embed_shift: float | None = None
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = 2.0


_DINOV2_NAMES = ("mlp_ratio", "use_swiglu_ffn")
_DINOV3_NAMES = tuple(f.name for f in fields(_Dinov3Fields) if f.name not in {g.name for g in fields(_SegmenterConfig)})


@dataclass(init=False, eq=False, repr=False)
class VideomtConfig(_Dinov3Fields, _Dinov2Fields):
    """transformers' ``VideomtConfig``: same fields, same defaults (ViT-L shapes).

    Two fields of our own, written to ``config.json`` only when they differ from transformers' model:
    ``backbone_type`` (``"dinov2"``, transformers' VidEoMT; ``"dinov3"``, the research code's VidEoMT on
    DINOv3, which transformers has no class for: then the DINOv3 fields of :class:`EomtDinov3Config` apply
    and ``mlp_ratio`` / ``use_swiglu_ffn`` do not) and ``norm_queries`` (the research code's
    ``NORM_QUERIES``: the queries carried to the next frame are taken after the final LayerNorm).
    """

    model_type: ClassVar[str] = "videomt"

    backbone_type: str = "dinov2"
    norm_queries: bool = False

    @property
    def backbone_family(self) -> str:
        return self.backbone_type

    def validate(self) -> None:
        if self.backbone_type not in BACKBONES:
            raise ValueError(f"invalid {type(self).__name__}: backbone_type = {self.backbone_type!r}; expected one "
                             f"of {list(BACKBONES)}")
        if not isinstance(self.norm_queries, bool):
            raise ValueError(f"invalid {type(self).__name__}: norm_queries = {self.norm_queries!r}; expected true or false")
        super().validate()

    def _hidden_fields(self) -> set[str]:
        if self.backbone_type == "dinov3":
            return set(_DINOV2_NAMES) | ({"norm_queries"} if not self.norm_queries else set())
        return set(_DINOV3_NAMES) | {"backbone_type"} | ({"norm_queries"} if not self.norm_queries else set())


@dataclass(init=False, eq=False, repr=False)
class EomtConfig(_Dinov2Fields):
    """transformers' ``EomtConfig``: same fields, same defaults (ViT-L shapes)."""

    model_type: ClassVar[str] = "eomt"


@dataclass(init=False, eq=False, repr=False)
class EomtDinov3Config(_Dinov3Fields):
    """transformers' ``EomtDinov3Config``: same fields, same defaults (ViT-L shapes); no ``mlp_ratio`` /
    ``use_swiglu_ffn`` (``intermediate_size`` and ``use_gated_mlp`` instead)."""

    model_type: ClassVar[str] = "eomt_dinov3"

    @property
    def backbone_family(self) -> str:
        return "dinov3"

    @property
    def head_activation(self) -> str:
        return self.hidden_act


# The published backbones: DINOv2 with registers (VidEoMT, EoMT) and DINOv3 (its ViT-S/B/L, 4 registers,
# rotary embeddings, LayerNorm eps 1e-5), for benchmarks and random-weight models.
PRESETS: dict[str, dict[str, Any]] = {
    "vit-s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}
_DINOV3_COMMON = dict(layer_norm_eps=1e-5, rope_parameters={"rope_theta": 100.0, "rope_type": "default"})
PRESETS.update({
    "dinov3-s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, **_DINOV3_COMMON),
    "dinov3-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     **_DINOV3_COMMON),
    "dinov3-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     **_DINOV3_COMMON),
})


def config_from_preset(name: str, cls: type[_SegmenterConfig] = VideomtConfig, **overrides: Any) -> _SegmenterConfig:
    """A config with the published shapes of ``name`` (``vit-s``, ``vit-b``, ``vit-l``: DINOv2; ``dinov3-s``,
    ``dinov3-b``, ``dinov3-l``: DINOv3). With a DINOv3 preset, ``VideomtConfig`` gets ``backbone_type="dinov3"``
    and ``EomtConfig`` becomes an :class:`EomtDinov3Config`."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    fields_ = dict(PRESETS[key])
    if key.startswith("dinov3"):
        if issubclass(cls, VideomtConfig):
            fields_["backbone_type"] = "dinov3"
        elif issubclass(cls, EomtConfig):
            cls = EomtDinov3Config
    return cls(**{**fields_, **overrides})
