"""Weights in and out: transformers checkpoints, research-code ``.pth`` files, loaded transformers models.

Everything is mapped to this package's parameter names by explicit key maps, checked key by key
(missing, unexpected, shape) before a single tensor is assigned, and reported by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import threading
import warnings
from typing import Any, Callable

import torch
from torch import nn

from videomt_fast.model.configuration import CheckpointError, EomtConfig, VideomtConfig, _SegmenterConfig

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


__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "from_transformers", "resolve_checkpoint_dir"]

# Hub downloads: seconds to connect, and seconds without a byte before a read gives up. A hub id on a
# network that accepts connections but never answers fails after these instead of hanging.
HUB_CONNECT_TIMEOUT = 10.0
HUB_READ_TIMEOUT = 60.0


class HubTimeoutError(TimeoutError):
    """Fetching a checkpoint from the Hugging Face Hub timed out; the message says which step."""


# --------------------------------------------------------------------------------------------
# files


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _timeouts(timeout: float | tuple[float, float] | None) -> tuple[float, float]:
    if timeout is None:
        return HUB_CONNECT_TIMEOUT, HUB_READ_TIMEOUT
    pair = tuple(timeout) if isinstance(timeout, (tuple, list)) else (timeout, timeout)
    if len(pair) != 2 or not all(isinstance(t, (int, float)) and t > 0 for t in pair):
        raise ValueError(f"timeout = {timeout!r}; expected seconds > 0, or a (connect, read) pair of them")
    return float(pair[0]), float(pair[1])


def _timeout_in(exc: BaseException) -> BaseException | None:
    """The timeout exception in ``exc``'s chain (httpx / requests / socket), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


_HUB_LOCK = threading.Lock()
_HUB_STATE: dict[str, Any] = {"depth": 0, "previous": None}


class _HubClientTimeouts:
    """While active, huggingface_hub's shared HTTP client bounds every request's connect and read time
    (its requests default to none, so a server that accepts and never answers blocks forever). The
    previous client factory is wrapped and restored; limits a request sets itself are kept. Loads in
    several threads share one installation (the first one's limits), removed when the last one ends;
    installing and removing it closes the hub client's open connections, as ``set_client_factory`` does."""

    def __init__(self, connect: float, read: float):
        self.connect, self.read = connect, read

    def __enter__(self) -> "_HubClientTimeouts":
        with _HUB_LOCK:
            if _HUB_STATE["depth"] == 0:
                _HUB_STATE["previous"] = self._install()
            _HUB_STATE["depth"] += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        with _HUB_LOCK:
            _HUB_STATE["depth"] -= 1
            previous = _HUB_STATE["previous"]
            if _HUB_STATE["depth"] == 0 and previous is not None:
                from huggingface_hub import set_client_factory

                set_client_factory(previous)
                _HUB_STATE["previous"] = None

    def _install(self) -> Any:
        """Wrap the hub's client factory; returns the previous one (None where there is nothing to do)."""
        try:
            import httpx2 as httpx  # huggingface_hub >= 2 uses its own httpx fork
        except ImportError:
            try:
                import httpx
            except ImportError:  # older huggingface_hub (requests): it sets its own timeouts
                return None
        try:
            from huggingface_hub import set_client_factory
            from huggingface_hub.utils import _http
        except ImportError:
            return None
        previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
        if previous is None:
            return None
        limits = httpx.Timeout(self.read, connect=self.connect).as_dict()

        def bound(request) -> None:  # a request hook: fills the limits a call left unset (None = wait forever)
            current = dict(request.extensions.get("timeout") or {})
            request.extensions = {
                **request.extensions, "timeout": {k: (current.get(k) or v) for k, v in limits.items()}
            }

        def factory():
            client = previous()
            client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks.get("request", []), bound]}
            return client

        set_client_factory(factory)
        return previous


def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
    timeout: float | tuple[float, float] | None = None,
    **_: Any,
) -> str:
    """A local directory holding the checkpoint: ``name_or_path`` itself (``/subfolder``), or a hub snapshot.

    Hub requests time out after ``timeout`` seconds (a number, or ``(connect, read)``; default
    ``(HUB_CONNECT_TIMEOUT, HUB_READ_TIMEOUT)``) with a :class:`HubTimeoutError` naming what timed out.
    """
    path = os.fspath(name_or_path)
    subfolder = os.fspath(subfolder or "")
    if subfolder and (os.path.isabs(subfolder) or ".." in subfolder.replace("\\", "/").split("/")):
        raise ValueError(f"subfolder {subfolder!r} must be a relative path inside the checkpoint")
    if os.path.isdir(path):
        inner = os.path.join(path, subfolder) if subfolder else path
        if not os.path.isdir(inner):
            raise FileNotFoundError(f"subfolder {subfolder!r} not found in {path}")
        return inner
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; expected a checkpoint directory, a hub id or a research-code .pth")
    if path.count("/") > 1 or path.startswith((".", "/", "~")) or os.sep in path.replace("/", ""):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"{path} is not a local directory and huggingface_hub is not installed") from None
    connect, read = _timeouts(timeout)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True")

    def fetch(patterns: list[str]) -> str:
        return snapshot_download(
            repo_id=path, revision=revision, cache_dir=cache_dir, local_files_only=offline, token=token,
            etag_timeout=connect, allow_patterns=patterns,
        )

    try:
        with _HubClientTimeouts(connect, read):
            directory = fetch([f"{prefix}*.json", f"{prefix}*.safetensors"])
            inner = os.path.join(directory, subfolder) if subfolder else directory
            if not any(os.path.exists(os.path.join(inner, n)) for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
                directory = fetch([f"{prefix}{TORCH_WEIGHTS_NAME}"])  # e.g. EoMT's model zoo
    except Exception as exc:
        timed_out = _timeout_in(exc)
        if timed_out is not None:
            kind = type(timed_out).__name__
            what = (
                f"connecting to the Hub took longer than {connect:g} s" if "Connect" in kind
                else f"the Hub sent no data for {read:g} s" if "Read" in kind
                else f"a Hub request timed out ({kind})"
            )
            raise HubTimeoutError(
                f"cannot load {path!r}: fetching it from the Hugging Face Hub timed out ({what}). Check the network "
                "or proxy, pass timeout=(connect_s, read_s) to wait longer, or download the checkpoint first "
                f"(hf download {path} --local-dir DIR) and pass DIR."
            ) from None
        raise OSError(
            f"cannot load {path!r}: it is not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). If you are offline, download "
            f"the checkpoint first (hf download {path} --local-dir DIR) and pass DIR."
        ) from None
    return os.path.join(directory, subfolder) if subfolder else directory


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


def _shard_path(directory: str, shard: Any, index: str) -> str:
    """``directory/shard``, refusing names that would leave ``directory`` (absolute, ``..``, links out)."""
    if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in re.split(r"[\\/]", shard):
        raise CheckpointError(f"{index} names the shard {shard!r}; expected a file name inside {directory}")
    path = os.path.join(directory, shard)
    root = os.path.realpath(directory)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise CheckpointError(f"{index} names the shard {shard!r}, which resolves outside {directory}")
    return path


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
            if not isinstance(weight_map, dict):
                raise KeyError("'weight_map' is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {exc}") from None
        paths = {shard: _shard_path(directory, shard, index) for shard in set(weight_map.values())}
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(paths):
            if not os.path.exists(paths[shard]):
                raise FileNotFoundError(f"shard {shard} listed in {index} is missing from {directory}")
            state.update(_load_safetensors(paths[shard]))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise CheckpointError(f"{index} lists tensors that its shards do not hold: {absent[:8]}")
        return state
    legacy = os.path.join(directory, TORCH_WEIGHTS_NAME)
    if os.path.exists(legacy):
        return _load_torch_file(legacy)
    raise FileNotFoundError(
        f"no weights in {directory}: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} (+ shards) or {TORCH_WEIGHTS_NAME}"
    )


# --------------------------------------------------------------------------------------------
# key maps


def qkv_biases(config: _SegmenterConfig | None) -> dict[str, bool]:
    """Which of q / k / v have a bias in transformers' model (DINOv3: ``query_bias`` / ``key_bias`` /
    ``value_bias``; DINOv2: all three). Our fused bias holds zeros for the others."""
    if config is None or config.backbone_family != "dinov3":
        return {"q": True, "k": True, "v": True}
    return {"q": config.query_bias, "k": config.key_bias, "v": config.value_bias}


_SWIGLU_PACKED = re.compile(r"^(layers\.\d+\.mlp\.)weights_(in|out)\.(weight|bias)$")


def hf_to_fast(state: dict[str, torch.Tensor], missing: list[str] | None = None,
               config: _SegmenterConfig | None = None) -> dict[str, torch.Tensor]:
    """transformers names -> ours: drop training-only keys, fuse q/k/v projections into ``qkv``.

    A q/k/v projection missing beside its siblings raises, or with ``missing`` (a list) is initialised
    as transformers would and its name appended to ``missing``; a bias the ``config`` says transformers
    leaves out (DINOv3's key bias) is a zero part of the fused bias. transformers before 5.2x named
    DINOv2's SwiGLU ``mlp.weights_in`` (``[gate | up]`` packed) and ``mlp.weights_out``: read as
    ``gate_proj`` / ``up_proj`` / ``down_proj``.
    """
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    has_bias = qkv_biases(config)
    for key, value in state.items():
        if _IGNORED_KEYS.match(key):
            continue
        match = _QKV.match(key)
        if match:
            prefix, which, kind = match.groups()
            qkv_parts.setdefault((prefix, kind), {})[which] = value
            continue
        packed = _SWIGLU_PACKED.match(key)
        if packed:
            prefix, which, kind = packed.groups()
            _unpack_swiglu(out, key, value, prefix, which == "out", kind)
            continue
        out[key] = value
    for (prefix, kind), parts in qkv_parts.items():
        if kind == "bias":
            like = next(iter(parts.values()))
            for p in "qkv":
                if not has_bias[p] and p not in parts:
                    parts[p] = torch.zeros_like(like)
        absent = [p for p in "qkv" if p not in parts]
        if absent and missing is None:
            raise CheckpointError("missing keys: " + ", ".join(f"{prefix}{p}_proj.{kind}" for p in absent))
        like = next(iter(parts.values()))
        for p in absent:
            parts[p] = _initial_linear_part(like, kind)
            missing.append(f"{prefix}{p}_proj.{kind}")  # type: ignore[union-attr]
        out[f"{prefix}qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _initial_linear_part(like: torch.Tensor, kind: str) -> torch.Tensor:
    """transformers' initialisation of a square projection's weight or bias, shaped like ``like``."""
    value = torch.empty(like.shape, dtype=torch.float32)
    fan_in = like.shape[-1] if kind == "weight" else like.shape[0]
    if kind == "weight":
        nn.init.kaiming_uniform_(value, a=math.sqrt(5))
    else:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(value, -bound, bound)
    return value.to(like.dtype)


def split_packed_swiglu(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """DINOv2-giant's packed SwiGLU: ``mlp.fc1`` ``(2h, d)`` holds ``[gate | up]`` (timm's SwiGLUPacked and
    DINOv2's ``w12``: ``silu(first half) * second half``), ``mlp.fc2`` is the down projection. Split into
    ``gate_proj`` / ``up_proj`` / ``down_proj`` where the model has those."""
    out = dict(state)
    for key in list(state):
        match = re.match(r"^(layers\.\d+\.mlp\.)fc(1|2)\.(weight|bias)$", key)
        if not match or f"{match.group(1)}gate_proj.{match.group(3)}" not in expected:
            continue
        prefix, which, kind = match.groups()
        _unpack_swiglu(out, key, out.pop(key), prefix, which == "2", kind)
    return out


def _unpack_swiglu(out: dict[str, torch.Tensor], key: str, value: torch.Tensor, prefix: str, down: bool,
                   kind: str) -> None:
    """One packed SwiGLU tensor into ``out``: the down projection as ``down_proj``, else ``[gate | up]``
    split into ``gate_proj`` and ``up_proj``."""
    if down:
        out[f"{prefix}down_proj.{kind}"] = value
        return
    if value.shape[0] % 2:
        raise CheckpointError(f"{key} has {value.shape[0]} rows; a packed SwiGLU holds [gate | up], an even count")
    out[f"{prefix}gate_proj.{kind}"], out[f"{prefix}up_proj.{kind}"] = value.chunk(2, dim=0)


def is_transformers_key(key: str) -> bool:
    """A key only transformers' naming has (split q/k/v, the training-only loss, the older packed SwiGLU)."""
    return bool(_IGNORED_KEYS.match(key) or _QKV.match(key) or _SWIGLU_PACKED.match(key))


def fast_to_hf(state: dict[str, torch.Tensor], config: _SegmenterConfig | None = None,
               contiguous: bool = True) -> dict[str, torch.Tensor]:
    """Ours -> transformers names: ``qkv`` split into ``q_proj`` / ``k_proj`` / ``v_proj`` (views of it unless
    ``contiguous``), leaving out the bias parts transformers' model does not have (``config``: DINOv3's key
    bias)."""
    out: dict[str, torch.Tensor] = {}
    has_bias = qkv_biases(config)
    for key, value in state.items():
        match = re.match(r"^(.*layers\.\d+\.attention\.)qkv\.(weight|bias)$", key)
        if match:
            prefix, kind = match.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                if kind == "weight" or has_bias[name]:
                    out[f"{prefix}{name}_proj.{kind}"] = part.contiguous() if contiguous else part
                elif part.device.type != "meta" and bool(part.detach().ne(0).any()):
                    raise ValueError(f"{key}: the {name} part of the fused bias is not zero, but the config has no "
                                     f"{name} bias ({'query key value'.split()['qkv'.index(name)]}_bias=False): "
                                     "transformers' names cannot hold it")
        else:
            out[key] = value.contiguous() if contiguous else value
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
    # DINOv3: transformers' DINOv3ViTModel renamed timm-style (embeddings -> patch_embed, layer -> blocks); q/k/v
    # keep transformers' names here and are fused with the inferred config's biases (hf_to_fast)
    (r"^encoder\.backbone\.patch_embed\.(cls_token|register_tokens)$", r"embeddings.\1"),
    (r"^encoder\.backbone\.patch_embed\.patch_embeddings\.(weight|bias)$", r"embeddings.patch_embeddings.\1"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.attention\.(q|k|v|o)_proj\.(weight|bias)$", r"layers.\1.attention.\2_proj.\3"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.attention\.qkv_proj\.(weight|bias)$", r"layers.\1.attention.qkv.\2"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.layer_scale(1|2)\.lambda1$", r"layers.\1.layer_scale\2.lambda1"),
    (r"^encoder\.backbone\.blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)$", r"layers.\1.mlp.\2_proj.\3"),
]
_RESEARCH_IGNORED = re.compile(r"^(criterion\.|encoder\.pixel_(mean|std)$|encoder\.backbone\.(head|fc_norm)\.|"
                               r"encoder\.backbone\.rope_embeddings\.|encoder\.backbone\.patch_embed\.mask_token$)")


def research_to_fast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Research-code keys (``backbone.`` / ``network.`` prefixed or not) -> ours (a DINOv3 backbone's q / k / v
    keep transformers' names: fuse them with :func:`hf_to_fast` and the config). Unknown keys raise."""
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


# research key of each tensor the config is inferred from, to name it when it is absent
_RESEARCH_NAMES = {
    "embeddings.cls_token": "encoder.backbone.cls_token",
    "embeddings.register_tokens": "encoder.backbone.reg_token",
    "embeddings.patch_embeddings.projection.weight": "encoder.backbone.patch_embed.proj.weight",
    "embeddings.position_embeddings.weight": "encoder.backbone.pos_embed",
    "layers.0.mlp.fc1.weight": "encoder.backbone.blocks.0.mlp.fc1.weight",
    "layers.0.mlp.fc2.weight": "encoder.backbone.blocks.0.mlp.fc2.weight",
    "query.weight": "q.weight",
    "class_predictor.weight": "class_head.weight",
}
_RESEARCH_NAMES_DINOV3 = {
    "embeddings.cls_token": "encoder.backbone.patch_embed.cls_token",
    "embeddings.register_tokens": "encoder.backbone.patch_embed.register_tokens",
    "embeddings.patch_embeddings.weight": "encoder.backbone.patch_embed.patch_embeddings.weight",
    "layers.0.mlp.up_proj.weight": "encoder.backbone.blocks.0.mlp.up_proj.weight",
    "query.weight": "q.weight",
    "class_predictor.weight": "class_head.weight",
}
# What DINOv3 checkpoints hold that their weights do not show: every published DINOv3 ViT has LayerNorm eps
# 1e-5 and rotary base 100 (facebook/dinov3-vit*16 configs), and SiLU exactly where its MLP is gated (ViT-S+,
# H+, 7B; GELU for S, B, L)
RESEARCH_DINOV3_DEFAULTS: dict[str, Any] = {"layer_norm_eps": 1e-5,
                                             "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}}


def research_backbone(state: dict[str, torch.Tensor]) -> str:
    """``"dinov3"`` when a mapped research state dict holds a DINOv3 backbone (transformers' DINOv3 ViT
    renamed timm-style), else ``"dinov2"`` (timm's DINOv2 with registers)."""
    return "dinov3" if "embeddings.patch_embeddings.weight" in state or any(
        re.match(r"layers\.\d+\.attention\.(o_proj|q_proj)\.", k) for k in state) else "dinov2"


def research_config_class(cls_config: type[_SegmenterConfig], backbone: str) -> type[_SegmenterConfig]:
    """The config class a research checkpoint of ``backbone`` needs where ``cls_config`` was asked for
    (VidEoMT takes both; EoMT on DINOv3 is :class:`EomtDinov3Config`); a mismatch raises, naming the class."""
    from videomt_fast.model.configuration import EomtDinov3Config

    if issubclass(cls_config, VideomtConfig):
        return cls_config
    wanted = EomtDinov3Config if backbone == "dinov3" else EomtConfig
    if not issubclass(cls_config, wanted):
        model = "EomtDinov3ForUniversalSegmentation" if backbone == "dinov3" else "EomtForUniversalSegmentation"
        raise CheckpointError(f"this research checkpoint holds a {backbone.upper()} backbone; load it with "
                              f"videomt_fast.{model} (its config is {wanted.__name__}, not {cls_config.__name__})")
    return cls_config


def infer_research_config(
    state: dict[str, torch.Tensor], cls: type[_SegmenterConfig], patch_size: int | None = None, **overrides: Any
) -> _SegmenterConfig:
    """A config from the shapes of a mapped research state dict (heads: head dim 64, as DINOv2 and DINOv3;
    DINOv3's LayerNorm eps and rotary base from :data:`RESEARCH_DINOV3_DEFAULTS`, its image size 640 unless
    given: a rotary model has no position table to read it from)."""
    backbone = research_backbone(state)
    cls = research_config_class(cls, backbone)
    names = _RESEARCH_NAMES_DINOV3 if backbone == "dinov3" else _RESEARCH_NAMES
    absent = [research for ours, research in names.items() if ours not in state]
    if absent:
        raise CheckpointError(
            "research checkpoint lacks tensors needed to infer the config: " + ", ".join(absent)
            + " (keys may carry a 'network.' / 'backbone.' / 'module.' prefix)"
        )
    layer_ids = [int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.norm1\.weight$", k))]
    upscale_ids = [int(m.group(1)) for k in state if (m := re.match(r"upscale_block\.block\.(\d+)\.", k))]
    if not layer_ids or not upscale_ids:
        what = "encoder.backbone.blocks.N.norm1.weight" if not layer_ids else "upscale.N.* (the upscale blocks)"
        raise CheckpointError(f"research checkpoint lacks tensors needed to infer the config: {what}")
    hidden = state["embeddings.cls_token"].shape[-1]
    fields = dict(
        hidden_size=hidden,
        num_hidden_layers=1 + max(layer_ids),
        num_attention_heads=max(1, hidden // 64),
        num_register_tokens=state["embeddings.register_tokens"].shape[1],
        num_queries=state["query.weight"].shape[0],
        num_labels=state["class_predictor.weight"].shape[0] - 1,
        num_upscale_blocks=1 + max(upscale_ids),
    )
    if backbone == "dinov3":
        fields.update(_dinov3_fields(state), **copy_defaults(RESEARCH_DINOV3_DEFAULTS))
        fields["patch_size"] = patch_size or state["embeddings.patch_embeddings.weight"].shape[-1]
        fields["image_size"] = 640
        if issubclass(cls, VideomtConfig):
            fields["backbone_type"] = "dinov3"
            if "norm_queries" not in overrides:
                # the research code's NORM_QUERIES lives in its yaml, not in the weights: the published DINOv3
                # configs set it for VIPSeg and VSPW (124 classes) and not for YouTube-VIS (40)
                fields["norm_queries"] = fields["num_labels"] == 124
                warnings.warn(
                    f"research VidEoMT-DINOv3 checkpoint with {fields['num_labels']} classes: propagating "
                    f"{'normalized' if fields['norm_queries'] else 'raw'} queries (norm_queries="
                    f"{fields['norm_queries']}, as the published {'VIPSeg/VSPW' if fields['norm_queries'] else 'YouTube-VIS'} "
                    "configs do; the weights cannot say). Pass norm_queries=True/False to choose.",
                    LoadingWarning, stacklevel=4)
    else:
        proj = state["embeddings.patch_embeddings.projection.weight"]
        num_patches = state["embeddings.position_embeddings.weight"].shape[0]
        fc1, fc2 = state["layers.0.mlp.fc1.weight"].shape[0], state["layers.0.mlp.fc2.weight"].shape[1]
        patch = patch_size or proj.shape[-1]
        side = int(round(num_patches**0.5))
        if side * side != num_patches and "image_size" not in overrides:
            raise CheckpointError(f"position embeddings hold {num_patches} patches (not a square grid); pass image_size")
        swiglu = fc1 == 2 * fc2  # packed SwiGLU (DINOv2-giant): fc1 holds [gate | up]
        fields.update(mlp_ratio=4 if swiglu else fc1 // hidden, use_swiglu_ffn=swiglu, patch_size=patch,
                      image_size=side * patch)
    if "attn_mask_probs" in state:
        fields["num_blocks"] = state["attn_mask_probs"].shape[0]
    fields.update(overrides)
    return cls(**fields)


def copy_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}


def _dinov3_fields(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The DINOv3 fields the weights show: MLP size and kind, and which projections have biases."""
    def has(key: str) -> bool:
        return key in state

    fused_bias = has("layers.0.attention.qkv.bias")  # the research code's FUSED_QKV (zeros where absent)
    gated = has("layers.0.mlp.gate_proj.weight")
    return dict(
        intermediate_size=state["layers.0.mlp.up_proj.weight"].shape[0],
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        query_bias=fused_bias or has("layers.0.attention.q_proj.bias"),
        key_bias=fused_bias or has("layers.0.attention.k_proj.bias"),
        value_bias=fused_bias or has("layers.0.attention.v_proj.bias"),
        proj_bias=has("layers.0.attention.o_proj.bias"),
        mlp_bias=has("layers.0.mlp.up_proj.bias"),
    )


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


def hf_names(key: str, config: _SegmenterConfig | None = None) -> list[str]:
    """Our parameter name -> transformers' (a fused ``qkv`` is three, or two where ``config`` leaves a bias out)."""
    match = re.match(r"^(layers\.\d+\.attention\.)qkv\.(weight|bias)$", key)
    if match:
        has_bias = qkv_biases(config)
        return [f"{match.group(1)}{p}_proj.{match.group(2)}" for p in "qkv" if match.group(2) == "weight" or has_bias[p]]
    return [key]


def initial_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers' initial value of every parameter and buffer of ``model`` (our names), on its device and in
    its dtypes; the fused bias parts of biases the config leaves out are zero."""
    return {key: _initial_value(model, key, value.shape, model.config).to(device=value.device, dtype=value.dtype)
            for key, value in model.fused_state_dict().items()}


def _initial_value(model: nn.Module, key: str, shape: torch.Size, config: _SegmenterConfig) -> torch.Tensor:
    """transformers' ``_init_weights`` value for parameter ``key`` (a weight the checkpoint lacks)."""
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    value = torch.empty(shape, dtype=torch.float32)
    if isinstance(owner, nn.LayerNorm):
        nn.init.ones_(value) if leaf == "weight" else nn.init.zeros_(value)
    elif isinstance(owner, nn.Embedding):
        nn.init.normal_(value, mean=0.0, std=1.0)
    elif isinstance(owner, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and leaf == "weight":
        nn.init.kaiming_uniform_(value, a=math.sqrt(5))
    elif isinstance(owner, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(owner.weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(value, -bound, bound)
    elif leaf == "lambda1":
        nn.init.constant_(value, config.layerscale_value)
    elif leaf == "cls_token":
        nn.init.trunc_normal_(value, mean=0.0, std=config.initializer_range)
    elif leaf == "attn_mask_probs":
        nn.init.ones_(value)
    else:  # register and mask tokens
        nn.init.zeros_(value)
    if key.endswith("attention.qkv.bias"):  # the parts of biases transformers' model does not have stay zero
        for part, real in enumerate(qkv_biases(config).values()):
            if not real:
                value.view(3, -1)[part] = 0
    return value


def build_model(
    cls: type,
    config: _SegmenterConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    source: str = "checkpoint",
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
    loading_info: dict[str, Any] | None = None,
    init_missing: list[str] | None = None,
):
    """Instantiate ``cls`` on the meta device and assign ``state`` (our names) after checking every key.

    ``strict``: a missing or unexpected key raises :class:`CheckpointError`. Otherwise, as transformers
    does, missing weights are initialised and unexpected ones dropped, both named in a warning and in
    ``loading_info`` (``missing_keys``, ``unexpected_keys``, ``mismatched_keys``, ``error_msgs``, with
    transformers' key names). A shape mismatch raises unless ``ignore_mismatched_sizes`` (then that weight
    is initialised and reported). ``init_missing`` lists keys already initialised upstream (q/k/v parts).
    """
    with torch.device("meta"):
        model = cls(config)
    expected = model.fused_state_dict()
    state = split_packed_swiglu(state, set(expected))
    for key, make in _OPTIONAL_KEYS.items():
        if key in expected and key not in state:
            state[key] = make(config)
    for key in list(state):
        if key not in expected and key in _OPTIONAL_KEYS:
            del state[key]  # e.g. a VidEoMT mask_token offered to EoMT
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = bool(mismatched and not ignore_mismatched_sizes) or bool(strict and (missing or unexpected))
    if problems:
        parts = []
        if mismatched:
            parts.append(
                "shape mismatches (the config does not match the weights; ignore_mismatched_sizes=True "
                "re-initialises them): " + "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:12])
            )
        if strict and missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:12]))
        if strict and unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:12]))
        raise CheckpointError(f"{source} does not fit {cls.__name__}({config!r}): " + " | ".join(parts))
    target_dtype = _resolve_dtype(dtype, state)
    target_device = torch.device(device) if device is not None else None
    for key in unexpected:
        del state[key]
    fresh = missing + [k for k, _, _ in mismatched]
    for key in fresh:
        state[key] = _initial_value(model, key, expected[key].shape, config)
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
    missing_names = sorted({n for k in missing for n in hf_names(k, config)} | set(init_missing or ()))
    unexpected_names = sorted({n for k in unexpected for n in hf_names(k, config)})
    mismatched_names = sorted((n, a, b) for k, a, b in mismatched for n in hf_names(k, config))
    if missing_names or unexpected_names or mismatched_names:
        lines = [f"{cls.__name__} loaded from {source} with differences:"]
        if missing_names:
            lines.append(f"  newly initialised, missing from the checkpoint ({len(missing_names)}): " + ", ".join(missing_names))
        if mismatched_names:
            lines.append(
                f"  newly initialised, shape did not match ({len(mismatched_names)}): "
                + ", ".join(f"{k} (checkpoint {a}, model {b})" for k, a, b in mismatched_names)
            )
        if unexpected_names:
            lines.append(f"  ignored, not used by the model ({len(unexpected_names)}): " + ", ".join(unexpected_names))
        if missing_names or mismatched_names:
            lines.append("  Outputs that depend on new weights are random until they are trained; strict=True refuses this.")
        warnings.warn("\n".join(lines), LoadingWarning, stacklevel=3)
    if loading_info is not None:
        loading_info.update(
            missing_keys=set(missing_names),
            unexpected_keys=set(unexpected_names),
            mismatched_keys={(k, torch.Size(a), torch.Size(b)) for k, a, b in mismatched_names},
            error_msgs=[],
        )
    return model.eval()


class LoadingWarning(UserWarning):
    """A checkpoint loaded with weights initialised (missing or re-shaped) or ignored (unexpected)."""


def _config_class_for(cls: type) -> type[_SegmenterConfig]:
    return getattr(cls, "config_class", VideomtConfig)


def _device_from_map(device_map: Any) -> torch.device | None:
    """One device from transformers' ``device_map`` (``"auto"``, a device, an index, or ``{module: device}``
    naming a single device): the model is never split."""
    if device_map is None:
        return None

    def one(value: Any) -> torch.device:
        if isinstance(value, int) and not isinstance(value, bool):
            return torch.device("cuda", value)
        if value in ("auto", "balanced", "balanced_low_0", "sequential"):
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(f"device_map = {device_map!r}: {value!r} is not a device") from None
        if device.type in ("meta",):
            raise ValueError(f"device_map = {device_map!r}: weights must live on a real device, not {device.type}")
        return device

    if isinstance(device_map, dict):
        devices = {one(v) for v in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"device_map = {device_map!r} spreads the model over {sorted(map(str, devices))}; videomt_fast keeps "
                "a model on one device (pass one device, or {'': device})"
            )
        return devices.pop()
    return one(device_map)


def _config_with(config: _SegmenterConfig, overrides: dict[str, Any]) -> _SegmenterConfig:
    """A copy of ``config`` with transformers-style ``from_pretrained(**config_kwargs)`` applied."""
    if not overrides:
        return config
    data = config.to_dict()
    if "num_labels" in overrides and "id2label" not in overrides:
        data.pop("id2label", None)
        data.pop("label2id", None)
    if "id2label" in overrides and "label2id" not in overrides:
        data.pop("label2id", None)
    return type(config).from_dict({**data, **overrides})


# from_pretrained arguments transformers takes that need nothing from us, and why
_ACCEPTED_NOOPS = {
    "low_cpu_mem_usage": "weights are always assigned onto a meta-device model",
    "trust_remote_code": "no remote code is ever run",
    "_fast_init": "",
}


def load_pretrained(
    cls: type,
    name_or_path: str | os.PathLike | None,
    *model_args: Any,
    config: Any = None,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    output_loading_info: bool = False,
    ignore_mismatched_sizes: bool = False,
    strict: bool = False,
    subfolder: str = "",
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    timeout: float | tuple[float, float] | None = None,
    **kwargs: Any,
):
    """``from_pretrained``: a checkpoint directory, a hub id, a research-code ``.pth``, or ``None`` with
    ``config=`` and ``state_dict=`` (transformers' names). See the model's ``from_pretrained``."""
    if model_args:
        raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments, got {len(model_args)}")
    if torch_dtype is not None:
        dtype = torch_dtype
    if device is None:
        device = _device_from_map(device_map)
    for key in _ACCEPTED_NOOPS:
        kwargs.pop(key, None)
    attn = kwargs.pop("attn_implementation", None)

    def done(model, info):
        if attn is not None:  # recorded on the model's config (set_attn_implementation)
            model.set_attn_implementation(attn)
        return (model, info) if output_loading_info else model

    config_cls = _config_class_for(cls)
    field_names = {f.name for f in dataclasses.fields(config_cls)} | {"num_labels"}
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names}
    if kwargs:
        raise TypeError(
            f"{cls.__name__}.from_pretrained got unexpected keyword arguments {sorted(kwargs)}; they are neither "
            f"loading options nor {config_cls.__name__} fields"
        )
    if config is not None:
        config = config_cls.coerce(config)
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
               subfolder=subfolder, timeout=timeout)
    build = dict(dtype=dtype, device=device, strict=strict, ignore_mismatched_sizes=ignore_mismatched_sizes)
    info: dict[str, Any] = {}
    if name_or_path is None:
        if config is None:
            raise ValueError("from_pretrained(None, ...) needs config= (and state_dict=, transformers' key names; "
                             "without it every weight is initialised)")
        missing: list[str] = []
        model = build_model(cls, _config_with(config, overrides), hf_to_fast(dict(state_dict or {}), None if strict else missing, config),
                            source="state_dict", loading_info=info, init_missing=missing, **build)
        return done(model, info)
    path = os.fspath(name_or_path)
    if path.endswith((".pth", ".pt", ".ckpt")) and os.path.isfile(path):
        model = load_research_checkpoint(cls, path, config=config, loading_info=info, **build, **overrides)
        return done(model, info)
    if path.endswith((".pth", ".pt", ".ckpt")) and not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    directory = resolve_checkpoint_dir(path, **hub)
    config_path = os.path.join(directory, "config.json")
    if config is None and not os.path.exists(config_path) and not os.path.exists(os.path.join(directory, TORCH_WEIGHTS_NAME)):
        raise FileNotFoundError(f"no config.json in {directory}; expected a transformers save_pretrained directory")
    raw = read_state_dict(directory) if state_dict is None else dict(state_dict)
    if _looks_research(raw):  # a research-style folder: the research model zoo's pytorch_model.bin
        if config is None and declared_model_type(config_path) == config_cls.model_type:
            config = config_cls.from_json_file(config_path)
        state = research_to_fast(raw)
        if config is None:
            config = infer_research_config(state, config_cls)
        state = hf_to_fast(state, config=config)
        model = build_model(cls, _config_with(config, overrides), state, source=directory, loading_info=info,
                            **{**build, "strict": True})
        return done(model, info)
    if config is None:
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json in {directory}; expected a transformers save_pretrained directory")
        config = config_cls.from_json_file(config_path)
    missing = []
    state = hf_to_fast(raw, None if strict else missing, _config_with(config, overrides))
    model = build_model(cls, _config_with(config, overrides), state, source=directory, loading_info=info,
                        init_missing=missing, **build)
    return done(model, info)


def declared_model_type(config_path: str) -> str | None:
    try:
        with open(config_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def checkpoint_model_type(name_or_path: Any, **hub: Any) -> str | None:
    """The ``model_type`` a checkpoint folder or hub id declares in its ``config.json`` (``hub``:
    ``revision``, ``cache_dir``, ``token``, ``subfolder``, ``local_files_only``); None for a file (a research
    checkpoint) or where it cannot be read."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return None
    try:
        directory = resolve_checkpoint_dir(path, **hub)
    except (OSError, ValueError):
        return None
    return declared_model_type(os.path.join(directory, "config.json"))


def _looks_research(state: dict[str, torch.Tensor]) -> bool:
    bare = (re.sub(r"^(module\.)?(backbone\.|network\.)?", "", k) for k in state)
    return any(k.startswith("encoder.backbone.") or k == "q.weight" for k in bare)


def load_research_checkpoint(
    cls: type,
    path: str,
    config: _SegmenterConfig | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
    loading_info: dict[str, Any] | None = None,
    **config_overrides: Any,
):
    """A tue-mps research ``.pth`` (plain tensors only: loaded with ``weights_only=True``). Every key must
    map and every weight be present (``strict`` is always on: a research file lacking one is the wrong file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    checkpoint = _load_torch_file(path)
    state = research_to_fast(checkpoint)
    if config is None:
        config = infer_research_config(state, _config_class_for(cls), **config_overrides)
    else:
        config = _config_with(config, config_overrides)
    state = hf_to_fast(state, config=config)
    return build_model(cls, config, state, dtype=dtype, device=device, source=path, strict=True,
                       ignore_mismatched_sizes=ignore_mismatched_sizes, loading_info=loading_info)


def _load_torch_file(path: str) -> dict[str, torch.Tensor]:
    """A tensors-only ``.pth``, unwrapping a ``{"model": ...}`` / ``{"state_dict": ...}`` training checkpoint."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
    return checkpoint


def from_transformers(hf_model: Any):
    """A videomt_fast model from a loaded transformers VidEoMT / EoMT model, sharing parameter storage
    (all but the fused QKV projections, which are concatenated once)."""
    from videomt_fast.model.modeling import (EomtDinov3ForUniversalSegmentation, EomtForUniversalSegmentation,
                                             VideomtForUniversalSegmentation)

    name = type(hf_model).__name__
    targets = {cls.__name__: cls for cls in (VideomtForUniversalSegmentation, EomtForUniversalSegmentation,
                                             EomtDinov3ForUniversalSegmentation)}
    if name not in targets:
        raise TypeError(f"from_transformers takes a transformers {', '.join(sorted(targets))}, got {name}")
    cls = targets[name]
    config = cls.config_class.coerce(hf_model.config)
    state = hf_to_fast({k: v.detach() for k, v in hf_model.state_dict().items()}, config=config)
    weight = next(iter(hf_model.parameters()))
    model = build_model(cls, config, state, dtype=weight.dtype, device=None, source=f"transformers {name}")
    return model


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (no window for other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pretrained(model: Any, directory: str | os.PathLike) -> None:
    """``config.json`` + ``model.safetensors`` with transformers' names; each file written atomically, with
    the permissions a plain ``open()`` would give (the umask applies)."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    mode = 0o666 & ~_umask()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # transformers' names
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.chmod(tmp, mode)
        os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    data = model.config.to_dict()
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    data["dtype"] = str(model.dtype).removeprefix("torch.")  # as transformers writes it
    atomic_write_text(os.path.join(directory, "config.json"), json.dumps(data, indent=2, sort_keys=True) + "\n")
