"""Weights in and out: transformers checkpoints, research-code ``.pth`` files, loaded transformers models.

Everything is mapped to this package's parameter names by explicit key maps, checked key by key
(missing, unexpected, shape) before a single tensor is assigned, and reported by name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Callable

import torch

from videomt_fast.model.configuration import EomtConfig, VideomtConfig, _SegmenterConfig

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"

# keys that transformers' checkpoints carry but inference never needs
_IGNORED_KEYS = re.compile(r"^(criterion\.|embeddings\.position_ids$)")
# keys that may be absent from a checkpoint, with the value transformers would initialise them to
_OPTIONAL_KEYS: dict[str, Callable[[_SegmenterConfig], torch.Tensor]] = {
    # a checkpoint converted without the buffer keeps transformers' initial ones (masked attention on)
    "attn_mask_probs": lambda c: torch.ones(c.num_blocks),
    "embeddings.mask_token": lambda c: torch.zeros(1, 1, c.hidden_size),
}

_QKV = re.compile(r"^(layers\.\d+\.attention\.)(q|k|v)_proj\.(weight|bias)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names every key that is missing, unexpected or misshapen."""


# --------------------------------------------------------------------------------------------
# files


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    **_: Any,
) -> str:
    """A local directory holding the checkpoint: ``name_or_path`` itself, or a hub snapshot."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; expected a checkpoint directory, a hub id or a research-code .pth")
    if path.count("/") > 1 or path.startswith((".", "/", "~")) or os.sep in path.replace("/", ""):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"{path} is not a local directory and huggingface_hub is not installed") from None
    try:
        return snapshot_download(
            repo_id=path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True"),
            token=token,
            allow_patterns=["*.json", "*.safetensors"],
        )
    except Exception as exc:
        raise OSError(
            f"cannot load {path!r}: it is not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). If you are offline, download "
            "the checkpoint first (huggingface-cli download ...) and pass its directory."
        ) from None


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"weight file not found: {path}") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CheckpointError(
            f"{path} ({size} bytes) is not a readable safetensors file; it is probably truncated or corrupt: {exc}"
        ) from None


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint directory (single file, sharded, or pytorch_model.bin)."""
    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.exists(single):
        return _load_safetensors(single)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {exc}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(f"shard {shard} listed in {index} is missing from {directory}")
            state.update(_load_safetensors(shard_path))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise CheckpointError(f"{index} lists tensors that its shards do not hold: {absent[:8]}")
        return state
    legacy = os.path.join(directory, TORCH_WEIGHTS_NAME)
    if os.path.exists(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no weights in {directory}: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} (+ shards) or {TORCH_WEIGHTS_NAME}"
    )


# --------------------------------------------------------------------------------------------
# key maps


def hf_to_fast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names -> ours: drop training-only keys, fuse q/k/v projections into ``qkv``."""
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if _IGNORED_KEYS.match(key):
            continue
        match = _QKV.match(key)
        if match:
            prefix, which, kind = match.groups()
            qkv_parts.setdefault((prefix, kind), {})[which] = value
            continue
        out[key] = value
    for (prefix, kind), parts in qkv_parts.items():
        absent = [p for p in "qkv" if p not in parts]
        if absent:
            raise CheckpointError(
                "missing keys: " + ", ".join(f"{prefix}{p}_proj.{kind}" for p in absent)
            )
        out[f"{prefix}qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def fast_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> transformers names (splits ``qkv``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^(layers\.\d+\.attention\.)qkv\.(weight|bias)$", key)
        if match:
            prefix, kind = match.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}{name}_proj.{kind}"] = part.contiguous()
        else:
            out[key] = value.contiguous()
    return out


# research code (tue-mps/videomt, tue-mps/eomt): timm DINOv2-with-registers ViT inside a wrapper
_RESEARCH_MAP: list[tuple[str, str]] = [
    (r"^encoder\.backbone\.cls_token$", "embeddings.cls_token"),
    (r"^encoder\.backbone\.reg_token$", "embeddings.register_tokens"),
    (r"^encoder\.backbone\.pos_embed$", "embeddings.position_embeddings.weight"),
    (r"^encoder\.backbone\.patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.norm1\.(weight|bias)$", r"layers.\1.norm1.\2"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"layers.\1.attention.qkv.\2"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"layers.\1.attention.out_proj.\2"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.ls1\.gamma$", r"layers.\1.layer_scale1.lambda1"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.norm2\.(weight|bias)$", r"layers.\1.norm2.\2"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.mlp\.fc(1|2)\.(weight|bias)$", r"layers.\1.mlp.fc\2.\3"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.ls2\.gamma$", r"layers.\1.layer_scale2.lambda1"),
    (r"^encoder\.backbone\.norm\.(weight|bias)$", r"layernorm.\1"),
    (r"^q\.weight$", "query.weight"),
    (r"^query_updater\.(weight|bias)$", r"query_updater.\1"),
    (r"^class_head\.(weight|bias)$", r"class_predictor.\1"),
    (r"^mask_head\.0\.(weight|bias)$", r"mask_head.fc1.\1"),
    (r"^mask_head\.2\.(weight|bias)$", r"mask_head.fc2.\1"),
    (r"^mask_head\.4\.(weight|bias)$", r"mask_head.fc3.\1"),
    (r"^upscale\.(\d+)\.conv1\.(weight|bias)$", r"upscale_block.block.\1.conv1.\2"),
    (r"^upscale\.(\d+)\.conv2\.weight$", r"upscale_block.block.\1.conv2.weight"),
    (r"^upscale\.(\d+)\.norm\.(weight|bias)$", r"upscale_block.block.\1.layernorm2d.\2"),
    (r"^attn_mask_probs$", "attn_mask_probs"),
]
_RESEARCH_IGNORED = re.compile(r"^(criterion\.|encoder\.pixel_(mean|std)$|encoder\.backbone\.(head|fc_norm)\.)")


def research_to_fast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Research-code keys (``backbone.`` / ``network.`` prefixed or not) -> ours. Unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        bare = re.sub(r"^(module\.)?(backbone\.|network\.)?", "", key)
        if _RESEARCH_IGNORED.match(bare):
            continue
        for pattern, replacement in _RESEARCH_MAP:
            if re.match(pattern, bare):
                out[re.sub(pattern, replacement, bare)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"research checkpoint has keys with no mapping: {unknown[:10]}" + (
            f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    pos = out.get("embeddings.position_embeddings.weight")
    if pos is not None and pos.ndim == 3:
        out["embeddings.position_embeddings.weight"] = pos[0]
    return out


def infer_research_config(
    state: dict[str, torch.Tensor], cls: type[_SegmenterConfig], patch_size: int | None = None, **overrides: Any
) -> _SegmenterConfig:
    """A config from the shapes of a mapped research state dict (heads: head dim 64, as DINOv2)."""
    try:
        hidden = state["embeddings.cls_token"].shape[-1]
        layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.norm1\.weight$", k)))
        proj = state["embeddings.patch_embeddings.projection.weight"]
        num_patches = state["embeddings.position_embeddings.weight"].shape[0]
        mlp = state["layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"research checkpoint lacks a tensor needed to infer the config: {exc}") from None
    patch = patch_size or proj.shape[-1]
    side = int(round(num_patches**0.5))
    if side * side != num_patches and "image_size" not in overrides:
        raise CheckpointError(f"position embeddings hold {num_patches} patches (not a square grid); pass image_size")
    fields = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        mlp_ratio=mlp // hidden,
        patch_size=patch,
        image_size=side * patch,
        num_register_tokens=state["embeddings.register_tokens"].shape[1],
        num_queries=state["query.weight"].shape[0],
        num_labels=state["class_predictor.weight"].shape[0] - 1,
        num_upscale_blocks=1 + max(int(m.group(1)) for k in state if (m := re.match(r"upscale_block\.block\.(\d+)\.", k))),
    )
    if "attn_mask_probs" in state:
        fields["num_blocks"] = state["attn_mask_probs"].shape[0]
    fields.update(overrides)
    return cls(**fields)


# --------------------------------------------------------------------------------------------
# building models


def _resolve_dtype(dtype: torch.dtype | str | None, state: dict[str, torch.Tensor]) -> torch.dtype:
    if dtype is None or dtype == "auto":
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        return max(set(floats), key=floats.count) if floats else torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
        return value
    return dtype


def build_model(
    cls: type,
    config: _SegmenterConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    source: str = "checkpoint",
):
    """Instantiate ``cls`` on the meta device and assign ``state`` (our names) after checking every key."""
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    state = dict(state)
    for key, make in _OPTIONAL_KEYS.items():
        if key in expected and key not in state:
            state[key] = make(config)
    for key in list(state):
        if key not in expected and key in _OPTIONAL_KEYS:
            del state[key]  # e.g. a VidEoMT mask_token offered to EoMT
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shape mismatches (the config does not match the weights): " + "; ".join(mismatched[:12]))
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:12]))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:12]))
        raise CheckpointError(f"{source} does not fit {cls.__name__}({config!r}): " + " | ".join(parts))
    target_dtype = _resolve_dtype(dtype, state)
    target_device = torch.device(device) if device is not None else None
    cast = {}
    for key, value in state.items():
        if value.is_floating_point() and key != "attn_mask_probs":
            value = value.to(target_dtype)
        if target_device is not None:
            value = value.to(target_device)
        cast[key] = value
    model.load_state_dict(cast, strict=True, assign=True)
    for module in model.modules():  # non-persistent state created on meta
        if hasattr(module, "_pos_cache"):
            module._pos_cache = {}
    return model.eval()


def _config_class_for(cls: type) -> type[_SegmenterConfig]:
    return getattr(cls, "config_class", VideomtConfig)


def load_pretrained(
    cls: type,
    name_or_path: str | os.PathLike,
    config: _SegmenterConfig | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    **kwargs: Any,
):
    """``from_pretrained``: a checkpoint directory, a hub id, or a research-code ``.pth`` file."""
    if torch_dtype is not None:
        dtype = torch_dtype
    if device is None and isinstance(device_map, (str, torch.device)) and str(device_map) != "auto":
        device = device_map
    path = os.fspath(name_or_path)
    config_cls = _config_class_for(cls)
    if path.endswith((".pth", ".pt", ".ckpt")):
        return load_research_checkpoint(cls, path, config=config, dtype=dtype, device=device, **kwargs)
    directory = resolve_checkpoint_dir(path, **kwargs)
    if config is None:
        config_path = os.path.join(directory, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json in {directory}; expected a transformers save_pretrained directory")
        config = config_cls.from_json_file(config_path)
    elif not isinstance(config, config_cls):
        raise TypeError(f"config must be a {config_cls.__name__}, got {type(config).__name__}")
    state = hf_to_fast(read_state_dict(directory))
    return build_model(cls, config, state, dtype=dtype, device=device, source=directory)


def load_research_checkpoint(
    cls: type,
    path: str,
    config: _SegmenterConfig | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    **config_overrides: Any,
):
    """A tue-mps research ``.pth`` (plain tensors only: loaded with ``weights_only=True``)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read as a tensors-only checkpoint (weights_only=True refuses pickled objects; "
            f"truncated files fail here too): {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state = research_to_fast(checkpoint)
    if config is None:
        allowed = {k: v for k, v in config_overrides.items() if k not in ("revision", "cache_dir", "token")}
        config = infer_research_config(state, _config_class_for(cls), **allowed)
    return build_model(cls, config, state, dtype=dtype, device=device, source=path)


def from_transformers(hf_model: Any):
    """A videomt_fast model from a loaded transformers VidEoMT / EoMT model, sharing parameter storage
    (all but the fused QKV projections, which are concatenated once)."""
    from videomt_fast.model.modeling import EomtForUniversalSegmentation, VideomtForUniversalSegmentation

    name = type(hf_model).__name__
    targets = {
        "VideomtForUniversalSegmentation": (VideomtForUniversalSegmentation, VideomtConfig),
        "EomtForUniversalSegmentation": (EomtForUniversalSegmentation, EomtConfig),
    }
    if name not in targets:
        raise TypeError(f"from_transformers takes a transformers VideomtForUniversalSegmentation or "
                        f"EomtForUniversalSegmentation, got {name}")
    cls, config_cls = targets[name]
    config = config_cls.from_dict({**hf_model.config.to_dict(), "model_type": config_cls.model_type})
    state = hf_to_fast({k: v.detach() for k, v in hf_model.state_dict().items()})
    weight = next(iter(hf_model.parameters()))
    model = build_model(cls, config, state, dtype=weight.dtype, device=None, source=f"transformers {name}")
    return model


def save_pretrained(model: Any, directory: str | os.PathLike) -> None:
    """``config.json`` + ``model.safetensors`` with transformers' names; each file written atomically."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = fast_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()})
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    data = model.config.to_dict()
    data.setdefault("architectures", [type(model).__name__])
    atomic_write_text(os.path.join(directory, "config.json"), json.dumps(data, indent=2, sort_keys=True) + "\n")
