"""``VideomtVideoProcessor``: transformers' VidEoMT video processor, without torchvision and with fused
post-processing.

Pre-processing follows transformers (resize to 640x640, bilinear with antialias, rescale 1/255,
ImageNet mean/std, ``pixel_values_videos`` of shape ``(B, T, 3, H, W)``) and runs on the device the
frames are on. Numerics: transformers resizes with torchvision, which on CPU resizes uint8 frames
directly with ``torch``'s uint8 antialiased kernel and elsewhere resizes in float32 and rounds back
to uint8; we make the same two calls, so on CPU and CUDA the resized frames are the same uint8
values torchvision gives (float frames are resized in float without rounding, as torchvision does),
and the fused rescale+normalize uses transformers' constants (``mean * 255``, ``std * 255``).

Also as transformers: frame sampling (``do_sample_frames`` with ``num_frames`` or ``fps`` and
``video_metadata``; ``sample_frames``), center crop (``do_center_crop``, ``crop_size``), one float or one value
per channel for ``image_mean`` / ``image_std``, and the configuration surface (``to_dict``, ``to_json_string``,
``save_pretrained`` / ``from_pretrained`` with ``video_preprocessor_config.json``, ``from_dict``; both libraries
load each other's files). Deliberate differences: ``return_tensors`` defaults to ``"pt"`` (stacked videos;
``None`` gives transformers' list), ``video_metadata`` comes back as dicts, unknown call arguments raise
``TypeError`` instead of being logged, and only bilinear resizing is supported.

Post-processing has transformers' three methods, signatures and outputs; each dispatches through
:mod:`videomt_fast.ops` (CUDA kernels on GPU tensors when the extension is available, otherwise the
vectorized PyTorch references in :mod:`videomt_fast.ops.postprocess`) and makes one host transfer for all
frames' ``segments_info``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any, Iterable, Sequence, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from videomt_fast import ops
from videomt_fast.ops import postprocess as _pp

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class BatchFeature(dict):
    """A dict with attribute access and ``.to(device)``, like transformers' ``BatchFeature``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        return BatchFeature(
            {k: (v.to(*args, **kwargs) if isinstance(v, torch.Tensor) else v) for k, v in self.items()}
        )


def _semantic_output_class():
    try:  # transformers' own class when it is installed, so results are interchangeable
        from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

        return lambda seg, scores: SemanticSegmentationPostProcessorOutput(
            data={"segmentation": seg, "segmentation_scores": scores}
        )
    except Exception:  # pragma: no cover - transformers is optional
        return lambda seg, scores: BatchFeature(segmentation=seg, segmentation_scores=scores)


def _logits(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(outputs, dict) and "class_queries_logits" in outputs:
        cls, masks = outputs["class_queries_logits"], outputs.get("masks_queries_logits")
    else:
        cls = getattr(outputs, "class_queries_logits", None)
        masks = getattr(outputs, "masks_queries_logits", None)
    if cls is None or masks is None:
        raise ValueError(
            "outputs must carry class_queries_logits (frames, queries, classes + 1) and masks_queries_logits "
            f"(frames, queries, height, width); got {type(outputs).__name__}"
        )
    _pp.check_logits(cls, masks)
    return cls, masks


class VideomtVideoProcessorKwargs(TypedDict, total=False):
    """Keyword arguments ``VideomtVideoProcessor`` takes at construction and per call: transformers'
    ``VideosKwargs`` (same names, same meaning)."""

    do_convert_rgb: bool | None
    do_resize: bool | None
    size: int | list[int] | tuple[int, ...] | dict[str, int] | None
    default_to_square: bool | None
    resample: int | None
    do_rescale: bool | None
    rescale_factor: float | None
    do_normalize: bool | None
    image_mean: float | list[float] | tuple[float, ...] | None
    image_std: float | list[float] | tuple[float, ...] | None
    do_center_crop: bool | None
    do_pad: bool | None
    crop_size: int | list[int] | tuple[int, ...] | dict[str, int] | None
    data_format: str | None
    input_data_format: str | None
    device: str | torch.device | None
    do_sample_frames: bool | None
    video_metadata: Any
    fps: int | float | None
    num_frames: int | None
    return_metadata: bool | None
    return_tensors: str | None


def size_dict(size: Any, default_to_square: bool = True, name: str = "size") -> dict | None:
    """transformers' ``get_size_dict``: an int is a square (``default_to_square``) or the short side, a
    ``(height, width)`` pair is the two sides, a dict is kept (its keys checked)."""
    if size is None or isinstance(size, dict):  # None entries dropped, as transformers' SizeDict does
        out = None if size is None else {k: v for k, v in dict(size).items() if v is not None}
    elif isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        out = {"height": int(size), "width": int(size)} if default_to_square else {"shortest_edge": int(size)}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        out = {"height": int(size[0]), "width": int(size[1])}
    else:
        raise ValueError(f"{name} must be an int, a (height, width) pair or a dict, got {size!r}")
    if out is not None and set(out) not in _SIZE_KEYS:
        raise ValueError(f"{name} must have one of the key sets {[sorted(k) for k in _SIZE_KEYS]}, got {sorted(out)}")
    return out


_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"longest_edge"},
              {"max_height", "max_width"})


def channel_values(values: Any, name: str) -> float | tuple[float, ...]:
    """``image_mean`` / ``image_std`` as transformers keeps them: a float (all channels) or a tuple."""
    if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
        return float(values)
    try:
        out = tuple(float(v) for v in values)
    except TypeError:
        raise ValueError(f"{name} must be a float or one float per channel, got {values!r}") from None
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def per_channel(values: float | Sequence[float], channels: int, name: str, device: Any) -> torch.Tensor:
    """A ``(channels, 1, 1)`` float32 tensor of ``values`` (a float applies to every channel)."""
    if isinstance(values, float):
        values = (values,) * channels
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values but the images have {channels} channels")
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None, None]


def center_crop(images: torch.Tensor, crop: dict) -> torch.Tensor:
    """transformers' (torchvision backend) center crop of ``(..., H, W)``: zero-pad to the crop size where the
    image is smaller, then take the window at ``int((H - h) / 2), int((W - w) / 2)``."""
    if set(crop) != {"height", "width"}:
        raise ValueError(f"crop_size must have 'height' and 'width', got {sorted(crop)}")
    ch, cw = int(crop["height"]), int(crop["width"])
    h, w = images.shape[-2:]
    if cw > w or ch > h:
        left, top = ((cw - w) // 2, (ch - h) // 2)
        right, bottom = ((cw - w + 1) // 2, (ch - h + 1) // 2)
        images = F.pad(images, (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)), value=0)
        h, w = images.shape[-2:]
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return images[..., top : top + ch, left : left + cw]


class ProcessorConfigMixin:
    """transformers' processor configuration surface, without transformers: attributes from keyword arguments
    and class defaults, ``to_dict`` / ``to_json_string`` / ``to_json_file``, ``from_dict`` / ``from_json_file``,
    ``save_pretrained`` / ``from_pretrained``, with transformers' JSON files and rules (``None`` values whose
    class default is ``None`` are left out; unknown entries are kept as attributes), so either library loads
    the other's files."""

    valid_kwargs: type = dict
    default_to_square = True
    _config_file = ""  # what save_pretrained writes
    _read_files: tuple[str, ...] = ()  # what from_pretrained reads, first found wins
    _nested_key = ""  # this processor's entry in a processor_config.json
    _type_key = ""

    def _set_config(self, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        for key in ("feature_extractor_type", "processor_class", "image_processor_type", "video_processor_type"):
            kwargs.pop(key, None)
        valid = self.valid_kwargs.__annotations__
        for key, value in kwargs.items():
            if key in valid:
                continue
            if key.startswith("_") or callable(getattr(type(self), key, None)):
                raise ValueError(f"{type(self).__name__}: {key!r} cannot be a configuration entry")
            setattr(self, key, value)  # transformers keeps entries it does not know as attributes
        for key in valid:
            if key == "default_to_square":
                continue
            value = kwargs[key] if key in kwargs else copy.deepcopy(getattr(type(self), key, None))
            setattr(self, key, value)
        self.size = size_dict(self.size, self.default_to_square)
        self.crop_size = size_dict(self.crop_size, True, "crop_size")
        for key in ("image_mean", "image_std"):
            if getattr(self, key) is not None:
                setattr(self, key, channel_values(getattr(self, key), key))

    def _call_options(self, kwargs: dict, call_only: Sequence[str] = ()) -> dict:
        """The instance's settings overridden by a call's keyword arguments (unknown names raise)."""
        valid = self.valid_kwargs.__annotations__
        unknown = sorted(k for k in kwargs if k not in valid and k not in call_only)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected arguments {unknown}; valid ones are {sorted(valid)}")
        opts = {k: (kwargs[k] if k in kwargs else getattr(self, k, None)) for k in valid if k != "default_to_square"}
        opts.update({k: kwargs[k] for k in call_only if k in kwargs})
        opts["size"] = size_dict(opts["size"], kwargs.get("default_to_square", self.default_to_square))
        opts["crop_size"] = size_dict(opts["crop_size"], True, "crop_size")
        for key in ("image_mean", "image_std"):
            if opts[key] is not None:
                opts[key] = channel_values(opts[key], key)
        return opts

    # -------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for key, value in self.__dict__.items():
            if key.startswith("_") or (value is None and getattr(type(self), key, None) is None):
                continue
            out[key] = copy.deepcopy(value)
        out[self._type_key] = type(self).__name__
        return out

    def to_json_string(self) -> str:
        values = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.to_dict().items()}
        return json.dumps(values, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        text = self.to_json_string()
        tmp = f"{os.fspath(json_file_path)}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, json_file_path)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Write ``<save_directory>/{video_,}preprocessor_config.json`` (transformers' name and format)."""
        if push_to_hub:
            raise ValueError("push_to_hub is not supported here: save_pretrained, then upload the folder with huggingface_hub")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file; a directory was expected")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self._config_file)
        self.to_json_file(path)
        return [path]

    @classmethod
    def from_dict(cls, config: dict[str, Any], **kwargs: Any):
        """A processor from a configuration dict; ``kwargs`` override it (``return_unused_kwargs=True`` also
        returns the arguments that were neither settings nor attributes)."""
        config = dict(config)
        return_unused = kwargs.pop("return_unused_kwargs", False)
        valid = cls.valid_kwargs.__annotations__
        config.update({k: kwargs.pop(k) for k in list(kwargs) if k in valid})
        processor = cls(**config)
        for key in list(kwargs):
            if key in processor.__dict__:
                setattr(processor, key, kwargs.pop(key))
        if return_unused:
            return processor, kwargs
        if kwargs:
            warnings.warn(f"{cls.__name__}.from_dict: ignored arguments {sorted(kwargs)} (not settings of this processor)", stacklevel=2)
        return processor

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike):
        with open(json_file, encoding="utf-8") as fh:
            return cls(**json.load(fh))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, cache_dir: str | None = None,
                        force_download: bool = False, local_files_only: bool = False, token: Any = None,
                        revision: str | None = None, subfolder: str = "", **kwargs: Any):
        """Load from a folder, a JSON file or a Hub repository, as transformers does: ``processor_config.json``'s
        nested entry first, then the processor's own file names; ``kwargs`` override the loaded values."""
        config = cls._load_config(os.fspath(pretrained_model_name_or_path), cache_dir=cache_dir, force_download=force_download,
                                  local_files_only=local_files_only, token=token, revision=revision, subfolder=subfolder or "")
        return cls.from_dict(config, **kwargs)

    @classmethod
    def _load_config(cls, source: str, subfolder: str, **hub: Any) -> dict:
        names = ("processor_config.json",) + tuple(cls._read_files)
        if os.path.isfile(source):
            return cls._read_json(source)
        if os.path.isdir(source):
            folder = os.path.join(source, subfolder)
            found = {n: os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))}
        else:
            found = cls._hub_files(source, names, subfolder, hub)
        nested = found.pop("processor_config.json", None)
        if nested is not None:
            values = cls._read_json(nested)
            if isinstance(values.get(cls._nested_key), dict):
                return values[cls._nested_key]
        for name in cls._read_files:
            if name in found:
                return cls._read_json(found[name])
        where = os.path.join(source, subfolder) if subfolder else source
        raise OSError(f"{cls.__name__}.from_pretrained: no {' or '.join(cls._read_files)} in {where!r}")

    @staticmethod
    def _read_json(path: str) -> dict:
        try:
            with open(path, encoding="utf-8") as fh:
                values = json.load(fh)
        except json.JSONDecodeError as exc:
            raise OSError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise OSError(f"{path} must hold a JSON object, got {type(values).__name__}")
        return values

    @staticmethod
    def _hub_files(repo: str, names: Sequence[str], subfolder: str, hub: dict) -> dict[str, str]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        found, offline = {}, None
        for name in names:
            try:
                found[name] = hf_hub_download(repo, name, subfolder=subfolder or None, **hub)
            except LocalEntryNotFoundError as exc:  # offline and not cached (a cached sibling may still do)
                offline = exc
            except EntryNotFoundError:
                continue
            except Exception as exc:  # a missing repository, no network: name the source
                raise OSError(f"cannot load a processor from {repo!r}: {type(exc).__name__}: {exc}") from exc
        if offline is not None and not found:
            raise OSError(f"cannot load a processor from {repo!r}: its files are not in the local cache and the Hub "
                          f"cannot be reached ({offline})") from offline
        return found


class VideomtVideoProcessor(ProcessorConfigMixin):
    """Drop-in for ``transformers.VideomtVideoProcessor`` (pre- and post-processing)."""

    valid_kwargs = VideomtVideoProcessorKwargs
    model_input_names = ["pixel_values_videos"]
    _config_file = "video_preprocessor_config.json"
    _read_files = ("video_preprocessor_config.json", "preprocessor_config.json")
    _nested_key = "video_processor"
    _type_key = "video_processor_type"

    # transformers' defaults (class attributes, as there: to_dict keeps a None only over a non-None default)
    default_to_square = True
    do_resize = True
    size = {"height": 640, "width": 640}
    resample = 2  # PIL BILINEAR, the only mode supported here
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_convert_rgb = True
    do_sample_frames = False
    return_metadata = False

    def __init__(self, **kwargs: Any) -> None:
        self._set_config(kwargs)
        self._check_resample(self.resample)

    @staticmethod
    def _check_resample(resample: Any) -> None:
        if getattr(resample, "value", resample) not in (2, "bilinear", None):
            raise ValueError(f"resample must be bilinear (2); got {resample!r}")

    # ------------------------------------------------------------------ frame sampling

    def sample_frames(self, metadata: Any, num_frames: int | None = None, fps: int | float | None = None, **kwargs: Any) -> np.ndarray:
        """Indices of the frames to keep (transformers' ``default_sample_indices_fn``): ``num_frames`` evenly
        spread, or ``fps`` frames per second of the video's duration (needs the metadata's ``fps``); all
        frames when neither is set. ``num_frames`` and ``fps`` are mutually exclusive."""
        if fps is not None and num_frames is not None:
            raise ValueError("`num_frames` and `fps` are mutually exclusive arguments, please use only one!")
        num_frames = num_frames if num_frames is not None else getattr(self, "num_frames", None)
        fps = fps if fps is not None else getattr(self, "fps", None)
        total = _meta(metadata, "total_num_frames")
        if total is None:
            raise ValueError("video metadata needs total_num_frames to sample frames")
        if num_frames is None and fps is not None:
            video_fps = _meta(metadata, "fps")
            if video_fps is None:
                raise ValueError(
                    f"cannot sample fps={fps} frames per second: the video metadata has no fps; pass video_metadata "
                    "with fps, or num_frames"
                )
            num_frames = max(1, int(total / video_fps * fps))
        if num_frames is None:
            return np.arange(0, total, dtype=int)
        if num_frames > total:
            raise ValueError(
                f"cannot sample num_frames={num_frames} frames from a video of total_num_frames={total}; "
                "set num_frames or fps smaller"
            )
        return np.arange(num_frames, dtype=int) * total // num_frames

    @staticmethod
    def _metadata(video_metadata: Any, videos: list[torch.Tensor]) -> list[dict]:
        if video_metadata is None:
            return [{"total_num_frames": len(v), "fps": None, "duration": None, "frames_indices": list(range(len(v)))}
                    for v in videos]
        items = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata]
        if items and isinstance(items[0], (list, tuple)):
            items = [m for group in items for m in group]
        out = [_as_dict(m) for m in items]
        if len(out) != len(videos):
            raise ValueError(f"video_metadata: got {len(out)} entries for {len(videos)} videos; pass one per video")
        return out

    # ------------------------------------------------------------------ pre-processing


    @staticmethod
    def _as_tensor(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x))
        if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
            return torch.from_numpy(np.asarray(x.convert("RGB")).copy())
        raise TypeError(f"videos: expected torch tensors, numpy arrays or PIL images, got {type(x).__name__}")

    def _split_videos(self, videos: Any) -> list[torch.Tensor]:
        """Batch of videos -> list of (T, *, *, *) tensors."""
        if isinstance(videos, (torch.Tensor, np.ndarray)):
            t = self._as_tensor(videos)
            if t.ndim == 5:
                return list(t.unbind(0))
            if t.ndim == 4:
                return [t]
            raise ValueError(f"videos: expected a (T, H, W, C) / (T, C, H, W) video or a (B, T, ...) batch, got shape {tuple(t.shape)}")
        if isinstance(videos, (list, tuple)) and videos:
            first = videos[0]
            if isinstance(first, (list, tuple)):  # list of videos given as lists of frames
                return [torch.stack([self._as_tensor(fr) for fr in v]) for v in videos]
            first_t = self._as_tensor(first)
            if first_t.ndim == 4:
                return [self._as_tensor(v) for v in videos]
            if first_t.ndim in (2, 3):  # one video given as a list of frames
                return [torch.stack([self._as_tensor(fr) for fr in videos])]
            raise ValueError(f"videos: a list of frames (3-D) or of videos (4-D) was expected, got an element of shape {tuple(first_t.shape)}")
        raise ValueError("videos: expected a tensor, an array or a non-empty list")

    @staticmethod
    def _channels_first(video: torch.Tensor, input_data_format: str | None) -> torch.Tensor:
        if video.ndim == 3:  # (T, H, W) grayscale
            video = video[:, None]
        if video.ndim != 4:
            raise ValueError(f"videos: each video must be 4-D (T, H, W, C) or (T, C, H, W), got shape {tuple(video.shape)}")
        fmt = str(input_data_format).lower() if input_data_format is not None else None
        if fmt is None:
            fmt = "channels_first" if video.shape[1] in (1, 3, 4) else ("channels_last" if video.shape[-1] in (1, 3, 4) else None)
        if fmt in ("channels_last", "last", "channeldimension.last"):
            return video.permute(0, 3, 1, 2)
        if fmt in ("channels_first", "first", "channeldimension.first"):
            return video
        raise ValueError(f"videos: cannot find the channel dimension of a video of shape {tuple(video.shape)} (1, 3 or 4 channels)")

    def _resize(self, video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(video.shape[-2:]) == size:
            return video
        if video.dtype == torch.uint8 and video.device.type == "cpu":
            # torchvision's CPU path: torch's uint8 antialiased kernel, rounding inside
            return F.interpolate(video, size=size, mode="bilinear", align_corners=False, antialias=True)
        out = F.interpolate(video.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        if not video.is_floating_point():  # torchvision rounds back to the input's integer type
            out = out.round_().clamp_(0, 255).to(video.dtype)
        return out

    def preprocess(self, videos: Any, **kwargs: Any) -> BatchFeature:
        """Frames -> ``pixel_values_videos`` ``(B, T, 3, H, W)`` float32 on the frames' device (or ``device``).

        Keyword arguments are transformers' (``VideomtVideoProcessorKwargs``) and override the instance's
        settings for this call: frame sampling (``do_sample_frames`` with ``num_frames`` or ``fps`` and
        ``video_metadata``), RGB conversion, resize, center crop (``do_center_crop``, ``crop_size``), rescale
        and normalize (``image_mean`` / ``image_std`` one float or one per channel). ``return_tensors="pt"``
        (the default here) stacks the videos, ``None`` returns a list; ``return_metadata=True`` adds
        ``video_metadata`` (dicts, ``frames_indices`` filled in).
        """
        opts = self._call_options(kwargs)
        self._check_resample(opts["resample"])
        return_tensors = kwargs["return_tensors"] if "return_tensors" in kwargs else (self.return_tensors or "pt")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if opts["data_format"] not in (None, "channels_first") and str(opts["data_format"]).lower() not in ("channeldimension.first", "first"):
            raise ValueError(f"data_format must be channels_first, got {opts['data_format']!r}")
        if opts["do_resize"] and (opts["size"] is None or set(opts["size"]) != {"height", "width"}):
            raise ValueError(f"size must be a dict with 'height' and 'width', got {opts['size']}")
        if opts["do_center_crop"] and opts["crop_size"] is None:
            raise ValueError("do_center_crop=True needs crop_size ({'height': h, 'width': w})")
        videos = self._split_videos(videos)
        metadata = self._metadata(opts["video_metadata"], videos)
        if opts["do_sample_frames"]:
            for i, video in enumerate(videos):
                indices = self.sample_frames(metadata[i], num_frames=opts["num_frames"], fps=opts["fps"])
                metadata[i]["frames_indices"] = [int(j) for j in indices]
                videos[i] = video[torch.as_tensor(indices, dtype=torch.long, device=video.device)]
        out = []
        for video in videos:
            if opts["device"] is not None:
                video = video.to(opts["device"])
            video = self._channels_first(video, opts["input_data_format"])
            if opts["do_convert_rgb"]:
                if video.shape[1] == 1:
                    video = video.expand(-1, 3, -1, -1)
                elif video.shape[1] == 4:
                    video = video[:, :3]
            video = video.contiguous()
            if opts["do_resize"]:
                video = self._resize(video, (int(opts["size"]["height"]), int(opts["size"]["width"])))
            if opts["do_center_crop"]:
                video = center_crop(video, opts["crop_size"])
            out.append(self._rescale_normalize(video, opts))
        if return_tensors == "pt":
            shapes = {tuple(v.shape) for v in out}
            if len(shapes) > 1:
                raise ValueError(f"videos of different shapes cannot be stacked: {sorted(shapes)}; pass return_tensors=None")
            result = BatchFeature(pixel_values_videos=torch.stack(out))
        else:
            result = BatchFeature(pixel_values_videos=out)
        if opts["return_metadata"]:
            result["video_metadata"] = metadata
        return result

    @staticmethod
    def _rescale_normalize(video: torch.Tensor, opts: dict) -> torch.Tensor:
        """transformers' fused rescale + normalize (``(x - mean / factor) / (std / factor)`` in float32)."""
        if opts["do_normalize"]:
            channels = video.shape[-3]
            mean = per_channel(opts["image_mean"], channels, "image_mean", video.device)
            std = per_channel(opts["image_std"], channels, "image_std", video.device)
            if opts["do_rescale"]:
                mean, std = mean * (1.0 / opts["rescale_factor"]), std * (1.0 / opts["rescale_factor"])
            return video.to(torch.float32).sub_(mean).div_(std)
        if opts["do_rescale"]:
            return video * opts["rescale_factor"]
        return video

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    # ------------------------------------------------------------------ post-processing

    def post_process_semantic_segmentation(self, outputs, target_sizes, return_segmentation_scores: bool = False):
        """Per-frame class-id maps ``(H, W)`` (or outputs with ``segmentation`` and ``segmentation_scores``)."""
        cls, masks = _logits(outputs)
        sizes = _pp.normalize_target_sizes(target_sizes, cls.shape[0])
        results = ops.call("semantic_segmentation", cls, masks, sizes, bool(return_segmentation_scores))
        if not return_segmentation_scores:
            return [seg for seg, _ in results]
        make = _semantic_output_class()
        return [make(seg, scores) for seg, scores in results]

    def post_process_instance_segmentation(self, outputs, target_sizes, threshold: float = 0.5) -> list[dict]:
        """Per frame ``{"segmentation": (H, W) ids or -1, "segments_info": [{"id", "label_id", "score"}]}``."""
        cls, masks = _logits(outputs)
        sizes = _pp.normalize_target_sizes(target_sizes, cls.shape[0])
        segs, keep, labels, scores = ops.call("instance_segmentation", cls, masks, sizes, float(threshold))
        return _with_segments(segs, keep, labels, scores)

    def post_process_panoptic_segmentation(
        self,
        outputs,
        target_sizes,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: set[int] | None = None,
    ) -> list[dict]:
        """Per frame ``{"segmentation": (H, W) ids or -1, "segments_info": [{"id", "label_id", "score"}]}``."""
        cls, masks = _logits(outputs)
        sizes = _pp.normalize_target_sizes(target_sizes, cls.shape[0])
        fuse = set(int(i) for i in label_ids_to_fuse) if label_ids_to_fuse else None
        segs, new, labels, scores = ops.call(
            "panoptic_segmentation", cls, masks, sizes, float(threshold), float(mask_threshold),
            float(overlap_mask_area_threshold), fuse,
        )
        return _with_segments(segs, new, labels, scores)


def _meta(metadata: Any, key: str) -> Any:
    if isinstance(metadata, dict):
        return metadata.get(key)
    return getattr(metadata, key, None)


def _as_dict(metadata: Any) -> dict:
    """One video's metadata (a dict, a mapping such as transformers' ``VideoMetadata``, or an object) as a dict."""
    if isinstance(metadata, dict):
        return dict(metadata)
    try:
        return dict(metadata.items()) if hasattr(metadata, "items") else {k: getattr(metadata, k) for k in metadata}
    except TypeError:
        pass
    if hasattr(metadata, "total_num_frames"):
        return {k: v for k, v in vars(metadata).items() if not k.startswith("_")}
    raise TypeError(f"video_metadata entries must be dicts or VideoMetadata, got {type(metadata).__name__}")


def _with_segments(segs, flags, labels, scores) -> list[dict]:
    """Build ``segments_info`` for every frame from ``(F, Q)`` tables with one host transfer."""
    table = torch.stack([flags.double(), labels.double(), scores.double()], dim=-1).cpu()
    results = []
    for f, seg in enumerate(segs):
        rows = table[f][table[f, :, 0] > 0].tolist()
        info = [{"id": i, "label_id": int(label), "score": round(score, 6)} for i, (_, label, score) in enumerate(rows)]
        results.append({"segmentation": seg, "segments_info": info})
    return results


__all__ = ["VideomtVideoProcessor", "VideomtVideoProcessorKwargs", "ProcessorConfigMixin", "BatchFeature"]
