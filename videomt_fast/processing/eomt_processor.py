"""``EomtImageProcessor``: transformers' EoMT image processor, without torchvision, on the images' device.

Usage::

    import torch
    from videomt_fast import EomtForUniversalSegmentation
    from videomt_fast.processing.eomt_processor import EomtImageProcessor

    processor = EomtImageProcessor()                       # size {"shortest_edge": 640, "longest_edge": 640}
    image = torch.randint(0, 256, (480, 720, 3), dtype=torch.uint8)   # HWC or CHW, uint8 or float, CPU or CUDA
    inputs = processor(images=image, do_pad=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)                          # model: an EomtForUniversalSegmentation
    panoptic = processor.post_process_panoptic_segmentation(outputs, target_sizes=[(480, 720)])[0]
    panoptic["segmentation"], panoptic["segments_info"]   # (480, 720) segment ids (-1 = none), [{"id", "label_id", "score"}]

    # semantic segmentation with sliding windows over the short-side-resized image
    semantic_processor = EomtImageProcessor(size={"shortest_edge": 512, "longest_edge": None}, do_split_image=True)
    inputs = semantic_processor(images=image, return_tensors="pt")   # pixel_values (windows, 3, 512, 512) + patch_offsets
    outputs = model(**inputs)
    semantic = semantic_processor.post_process_semantic_segmentation(outputs, target_sizes=[(480, 720)])[0]

Pre-processing (transformers' ``EomtImageProcessor`` semantics):

* resize: ``size["shortest_edge"]`` for the short side, the long side capped at ``size["longest_edge"]``
  (then the short side shrinks to keep the aspect ratio, with transformers' integer rounding);
* ``do_split_image``: overlapping square windows of side ``shortest_edge`` along the long side, evenly
  spread (``patch_offsets`` rows ``[image_index, start, end]``, image-major);
* ``do_pad``: zeros at the bottom / right up to ``(shortest_edge, longest_edge or shortest_edge)``, padded
  before normalization as transformers does (padding becomes ``-mean / std``);
* rescale and normalize fused as transformers does (``(x - mean * 255) / (std * 255)`` in float32).

Resizing numerics: transformers' default class resizes with torchvision, which on CPU resizes uint8 images
with torch's uint8 antialiased kernel and elsewhere resizes in float32 and rounds back to uint8. We make
the same ``torch.nn.functional.interpolate`` calls (``antialias=True``), so the resized uint8 values are
those torchvision gives; float images are resized in float without rounding, as torchvision does.
transformers' PIL-backend class (``EomtImageProcessorPil``) resizes with Pillow's fixed-point kernel: its
pixels differ from ours by at most one uint8 level, i.e. ``1 / (255 * std) < 0.018`` after normalization,
on a small fraction of pixels.

Post-processing has transformers' three methods, signatures and outputs:

* ``post_process_semantic_segmentation``: query masks upsampled to ``(shortest_edge, longest_edge)``,
  ``softmax(classes)[:-1] x sigmoid(masks)`` summed over queries, windows stitched back by averaging
  (``merge_image_patches``) and resized to the target size, argmax. Computed one image / window at a time
  and, unless scores are requested, the final upsample + argmax runs over blocks of classes, so the
  ``(classes, H, W)`` map at target size never exists at once.
* ``post_process_instance_segmentation`` / ``post_process_panoptic_segmentation``: the kept queries only
  are upsampled to the padded input size, un-padded (cropped to the resized image) and handed to the fused
  ``instance_segmentation`` / ``panoptic_segmentation`` ops of :mod:`videomt_fast.ops.postprocess` (dispatched
  by :mod:`videomt_fast.ops`; CUDA kernels on GPU tensors when built), which upsample to the target size,
  score, threshold and paint without a per-query Python loop. ``segments_info`` comes from one host
  transfer per image.

Every map has transformers' dtype and device: instance maps float32, panoptic maps int64, semantic maps
int64 on the logits' device; an image where no query passes the threshold gets transformers' empty result
(``segments_info`` ``[]`` and a map of -1: float32 on the logits' device for instance, float32 on the CPU
for panoptic, as transformers returns there).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence, TypedDict

import numpy as np
import torch
import torch.nn.functional as F

from videomt_fast import ops
from videomt_fast.ops import postprocess as _pp  # noqa: F401  (defines the fused post-processing ops)
from videomt_fast.processing.video_processor import BatchFeature, ProcessorConfigMixin, per_channel

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# PIL resampling codes (transformers' ``PILImageResampling``) -> F.interpolate modes
_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {"nearest": 0, "bilinear": 2, "bicubic": 3}


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------


def resized_size(image_size: Sequence[int], shortest_edge: int, longest_edge: int | None = None) -> tuple[int, int]:
    """``(height, width)`` after resizing: short side to ``shortest_edge``, long side capped at ``longest_edge``.

    The arithmetic (float ratios, ``round`` for the capped short side, ``int`` truncation for the other
    side) is transformers' ``get_size_with_aspect_ratio``, so the sizes agree to the pixel.
    """
    height, width = int(image_size[0]), int(image_size[1])
    size = int(shortest_edge)
    exact_short = None
    if longest_edge is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > longest_edge:
            exact_short = longest_edge * short / long
            size = int(round(exact_short))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        other = exact_short if exact_short is not None else size
        return int(other * height / width), size
    other = exact_short if exact_short is not None else size
    return size, int(other * width / height)


def padded_size(size: dict) -> tuple[int, int]:
    """The model's input size for padded inference: ``(shortest_edge, longest_edge or shortest_edge)``."""
    return int(size["shortest_edge"]), int(size.get("longest_edge") or size["shortest_edge"])


def window_offsets(height: int, width: int, window: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the sliding windows along the long side of a ``height x width`` image.

    ``ceil(long / window)`` windows, the overlap spread evenly, starts truncated to int (transformers'
    ``_split_image``).
    """
    longer = max(height, width)
    count = math.ceil(longer / window)
    overlap = (count * window - longer) / (count - 1) if count > 1 else 0
    starts = [int(i * (window - overlap)) for i in range(count)]
    return [(s, s + window) for s in starts]


def _check_size(size: Any, name: str = "size") -> dict:
    if not isinstance(size, dict) or "shortest_edge" not in size:
        raise ValueError(
            f"{name} must be a dict with 'shortest_edge' (and optionally 'longest_edge'), got {size!r}"
        )
    extra = set(size) - {"shortest_edge", "longest_edge"}
    if extra:
        raise ValueError(f"{name} may only hold 'shortest_edge' and 'longest_edge', got extra keys {sorted(extra)}")
    short = size["shortest_edge"]
    long = size.get("longest_edge")
    if not isinstance(short, (int, np.integer)) or isinstance(short, bool) or short <= 0:
        raise ValueError(f"{name}['shortest_edge'] must be a positive int, got {short!r}")
    if long is not None and (not isinstance(long, (int, np.integer)) or isinstance(long, bool) or long <= 0):
        raise ValueError(f"{name}['longest_edge'] must be a positive int or None, got {long!r}")
    return {"shortest_edge": int(short), "longest_edge": None if long is None else int(long)}


def _resample_code(resample: Any) -> int:
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        value = _RESAMPLE_NAMES.get(value.lower(), value)
    if value not in _RESAMPLE_MODES:
        raise ValueError(
            f"resample must be one of nearest (0), bilinear (2) or bicubic (3) (PIL codes or names), got {resample!r}"
        )
    return int(value)


# ------------------------------------------------------------------------------------------------
# image inputs
# ------------------------------------------------------------------------------------------------


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "convert") and hasattr(x, "size")


def _to_tensor(x: Any, index: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_ or x.dtype.kind not in "uif":
            raise TypeError(f"images[{index}]: expected a numeric array, got dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x))
    if _is_pil(x):
        return torch.from_numpy(np.array(x.convert("RGB")))  # HWC uint8
    raise TypeError(
        f"images[{index}]: expected a torch tensor, a numpy array or a PIL image, got {type(x).__name__}"
    )


def _image_list(images: Any) -> list[tuple[torch.Tensor, bool]]:
    """Images -> list of ``(tensor, channels_last_known)``; a 4-D tensor / array is a batch."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim == 4:
            return [(_to_tensor(img, i), False) for i, img in enumerate(images)]
        if images.ndim in (2, 3):
            return [(_to_tensor(images, 0), False)]
        raise ValueError(
            f"images: expected an image (H, W), (H, W, C), (C, H, W) or a batch (B, C, H, W) / (B, H, W, C), "
            f"got shape {tuple(images.shape)}"
        )
    if _is_pil(images):
        return [(_to_tensor(images, 0), True)]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: expected at least one image, got an empty list")
        out = []
        for i, img in enumerate(images):
            if isinstance(img, (list, tuple)):
                raise ValueError(f"images[{i}]: nested lists are not images; pass a flat list of images")
            t = _to_tensor(img, i)
            if t.ndim not in (2, 3):
                raise ValueError(
                    f"images[{i}]: expected an image of shape (H, W), (H, W, C) or (C, H, W), got {tuple(t.shape)}"
                )
            out.append((t, _is_pil(img)))
        return out
    raise TypeError(
        f"images: expected a torch tensor, a numpy array, a PIL image or a list of them, got {type(images).__name__}"
    )


def _channels_first(image: torch.Tensor, index: int, input_data_format: str | None, channels_last: bool) -> torch.Tensor:
    if image.ndim == 2:
        return image[None]
    fmt = None if input_data_format is None else str(getattr(input_data_format, "value", input_data_format)).lower()
    if channels_last:
        fmt = "channels_last"
    if fmt is None:  # transformers' inference: the first dim wins when both could be channels
        if image.shape[0] in (1, 3, 4):
            fmt = "channels_first"
        elif image.shape[-1] in (1, 3, 4):
            fmt = "channels_last"
        else:
            raise ValueError(
                f"images[{index}]: cannot find the channel dimension of shape {tuple(image.shape)} "
                "(1, 3 or 4 channels first or last); pass input_data_format"
            )
    if fmt in ("channels_last", "last"):
        return image.permute(2, 0, 1)
    if fmt in ("channels_first", "first"):
        return image
    raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}")


def _to_rgb(image: torch.Tensor, index: int) -> torch.Tensor:
    """transformers' array conversion: 1 channel -> 3, RGBA composited over white."""
    if image.shape[0] == 1:
        return image.expand(3, -1, -1)
    if image.shape[0] == 4:
        if image.is_floating_point():
            if image.min() < 0 or image.max() > 1:
                raise ValueError(f"images[{index}]: an RGBA float image must hold values in [0, 1]")
            return image[:3] * image[3:] + (1 - image[3:])
        if image.dtype != torch.uint8:
            raise ValueError(f"images[{index}]: RGBA conversion takes uint8 or float images, got {image.dtype}")
        rgba = image.float().mul_(1.0 / 255)  # torchvision's uint8 -> float conversion
        rgb = rgba[:3] * rgba[3:] + (1 - rgba[3:])
        return rgb.mul(255.999).to(torch.uint8)  # torchvision's float -> uint8 conversion (truncating)
    return image


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Batched ``(N, C, H, W)`` resize with torchvision's numerics (see the module docstring)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode == "nearest":  # transformers maps PIL NEAREST to torchvision's NEAREST_EXACT (pixel centers, as Pillow)
        return F.interpolate(images, size=size, mode="nearest-exact")
    if images.dtype == torch.uint8 and images.device.type == "cpu":
        return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True)
    out = F.interpolate(images if images.is_floating_point() else images.float(), size=size, mode=mode,
                        align_corners=False, antialias=True)
    if not images.is_floating_point():
        out = out.round_().clamp_(0, 255 if images.dtype == torch.uint8 else torch.iinfo(images.dtype).max)
        out = out.to(images.dtype)
    return out


# ------------------------------------------------------------------------------------------------
# model outputs
# ------------------------------------------------------------------------------------------------


def _logits(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(outputs, dict):
        cls, masks = outputs.get("class_queries_logits"), outputs.get("masks_queries_logits")
    else:
        cls = getattr(outputs, "class_queries_logits", None)
        masks = getattr(outputs, "masks_queries_logits", None)
    if not isinstance(cls, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise ValueError(
            "outputs must carry class_queries_logits (batch, queries, classes + 1) and masks_queries_logits "
            f"(batch, queries, height, width) tensors; got {type(outputs).__name__}"
        )
    _pp.check_logits(cls, masks)
    return cls, masks


def _target_sizes(target_sizes: Any, count: int) -> list[tuple[int, int]]:
    return _pp.normalize_target_sizes(target_sizes, count, what="image")


def _patch_offsets(patch_offsets: Any, num_windows: int, num_images: int) -> list[tuple[int, int, int]] | None:
    """``outputs.patch_offsets`` -> list of ``(image, start, end)`` python ints (None when there are none)."""
    if patch_offsets is None:
        return None
    if isinstance(patch_offsets, torch.Tensor):
        if patch_offsets.numel() == 0:
            return None
        if patch_offsets.ndim != 2 or patch_offsets.shape[1] != 3:
            raise ValueError(f"patch_offsets as a tensor must have shape (windows, 3), got {tuple(patch_offsets.shape)}")
        rows = patch_offsets.tolist()
    else:
        if len(patch_offsets) == 0:
            return None
        rows = []
        for i, row in enumerate(patch_offsets):
            if isinstance(row, torch.Tensor):
                row = row.tolist()
            if len(row) != 3:
                raise ValueError(f"patch_offsets[{i}] must be [image_index, start, end], got {row!r}")
            rows.append(row)
    rows = [tuple(int(v) for v in row) for row in rows]
    if len(rows) != num_windows:
        raise ValueError(
            f"patch_offsets has {len(rows)} windows but the outputs hold {num_windows}; pass the preprocess output's "
            "patch_offsets to the model unchanged"
        )
    for i, (img, start, end) in enumerate(rows):
        if not 0 <= img < num_images or start < 0 or end <= start:
            raise ValueError(
                f"patch_offsets[{i}] = {[img, start, end]}: expected an image index in [0, {num_images}) "
                "and 0 <= start < end"
            )
    return rows


def _segments(flags: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> list[dict]:
    """``segments_info`` of one image from ``(K,)`` tables (one host transfer); ids 0, 1, ... in query order."""
    table = torch.stack([flags.double(), labels.double(), scores.double()], dim=-1).cpu()
    rows = table[table[:, 0] > 0].tolist()
    return [{"id": i, "label_id": int(label), "score": round(score, 6)} for i, (_, label, score) in enumerate(rows)]


class EomtImageProcessorKwargs(TypedDict, total=False):
    """Keyword arguments ``EomtImageProcessor`` takes at construction and per call: transformers'
    ``ImagesKwargs`` plus ``do_split_image`` and ``ignore_index`` (its ``EomtImageProcessorKwargs``)."""

    do_convert_rgb: bool | None
    do_resize: bool | None
    size: int | list[int] | tuple[int, ...] | dict[str, int] | None
    default_to_square: bool | None
    crop_size: int | list[int] | tuple[int, ...] | dict[str, int] | None
    resample: Any
    do_rescale: bool | None
    rescale_factor: float | None
    do_normalize: bool | None
    image_mean: float | list[float] | tuple[float, ...] | None
    image_std: float | list[float] | tuple[float, ...] | None
    do_pad: bool | None
    pad_size: int | list[int] | tuple[int, ...] | dict[str, int] | None
    do_center_crop: bool | None
    data_format: str | None
    input_data_format: str | None
    device: str | torch.device | None
    return_tensors: str | None
    disable_grouping: bool | None
    do_split_image: bool
    ignore_index: int | None


class EomtImageProcessor(ProcessorConfigMixin):
    """Drop-in for ``transformers.EomtImageProcessor`` (pre- and post-processing), no torchvision needed.

    Configuration (constructor arguments, ``to_dict``, ``save_pretrained`` / ``from_pretrained`` with
    ``preprocessor_config.json``) follows transformers: both libraries load each other's files. Like
    transformers' EoMT processor, it does not center-crop: ``do_center_crop`` / ``crop_size`` / ``pad_size``
    are kept in the configuration and a call that asks for them warns that they have no effect.
    """

    valid_kwargs = EomtImageProcessorKwargs
    model_input_names = ["pixel_values"]
    _config_file = "preprocessor_config.json"
    _read_files = ("preprocessor_config.json",)
    _nested_key = "image_processor"
    _type_key = "image_processor_type"

    # transformers' defaults (class attributes, as there: to_dict keeps a None only over a non-None default)
    default_to_square = False
    do_resize = True
    size = {"shortest_edge": 640, "longest_edge": 640}
    resample = 2
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_split_image = False
    do_pad = False
    ignore_index = None

    def __init__(self, **kwargs: Any) -> None:
        self._set_config(kwargs)
        self._check_options(self.__dict__)

    @staticmethod
    def _check_options(opts: dict) -> None:
        if opts.get("size") is not None:
            _check_size(opts["size"])
        if opts.get("resample") is not None:
            _resample_code(opts["resample"])
        for key in ("image_mean", "image_std"):
            values = opts.get(key)
            if isinstance(values, tuple) and len(values) != 3:
                raise ValueError(f"{key} must be one float or 3 (one per RGB channel), got {len(values)} values")
        std = opts.get("image_std")
        if std is not None and any(v == 0 for v in ((std,) if isinstance(std, float) else std)):
            raise ValueError(f"image_std must not contain zeros, got {std}")

    # -------------------------------------------------------------------------- pre-processing

    def _options(self, kwargs: dict) -> dict:
        opts = self._call_options(kwargs)
        self._check_options(opts)
        if opts["size"] is None:
            raise ValueError("size must be set: {'shortest_edge': int, 'longest_edge': int or None}")
        opts["size"] = _check_size(dict(opts["size"]))
        opts["resample"] = _resample_code(opts["resample"] if opts["resample"] is not None else 2)
        ignored = [k for k in ("do_center_crop", "pad_size") if opts.get(k)]
        if ignored:
            warnings.warn(
                f"EomtImageProcessor: {ignored} have no effect (transformers' EoMT processor does not center-crop "
                "and pads to size when do_pad=True)", stacklevel=3,
            )
        if opts["data_format"] not in (None, "channels_first") and str(opts["data_format"]).lower() not in ("channeldimension.first", "first"):
            raise ValueError(f"data_format must be channels_first, got {opts['data_format']!r}")
        return opts

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: dict[int, int] | list[dict[int, int]] | None = None,
        return_tensors: str | None = None,
        device: str | torch.device | None = None,
        input_data_format: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Images -> ``BatchFeature(pixel_values, patch_offsets[, mask_labels, class_labels])``.

        ``images``: one image or a list (torch tensors on any device, numpy arrays, PIL images), HWC or CHW,
        or a 4-D batch. ``return_tensors="pt"`` stacks ``pixel_values`` (all must share a shape: use
        ``do_pad`` or ``do_split_image`` for images of different sizes); otherwise a list is returned.
        ``patch_offsets`` is a list of ``[image_index, start, end]`` int64 tensors when ``do_split_image``,
        else ``[]``. Work happens on each image's device (or ``device``).
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        opts = self._options(dict(kwargs))
        device = device if device is not None else opts["device"]
        input_data_format = input_data_format if input_data_format is not None else opts["input_data_format"]
        items = _image_list(images)
        prepared = []
        for i, (img, channels_last) in enumerate(items):
            if device is not None:
                img = img.to(device)
            if img.dtype == torch.bool or img.is_complex():
                raise TypeError(f"images[{i}]: expected a real numeric dtype, got {img.dtype}")
            img = _channels_first(img, i, input_data_format, channels_last)
            if opts["do_convert_rgb"]:
                img = _to_rgb(img, i)
            if img.shape[0] != 3:
                raise ValueError(
                    f"images[{i}]: expected 3 channels, got {img.shape[0]} (shape {tuple(img.shape)}); "
                    "pass do_convert_rgb=True for grayscale or RGBA images"
                )
            if img.shape[1] == 0 or img.shape[2] == 0:
                raise ValueError(f"images[{i}]: empty image of shape {tuple(img.shape)}")
            prepared.append(img.contiguous())

        pixel_values, patch_offsets = self._pipeline(prepared, opts, opts["resample"], normalize=True)
        data: dict[str, Any] = {"pixel_values": pixel_values, "patch_offsets": patch_offsets}

        if segmentation_maps is not None:
            data.update(self._segmentation_targets(segmentation_maps, instance_id_to_semantic_id, opts, device, len(prepared)))

        if return_tensors == "pt":
            shapes = {tuple(p.shape) for p in pixel_values}
            if len(shapes) > 1:
                raise ValueError(
                    f"images: cannot stack pixel_values of shapes {sorted(shapes)} with return_tensors='pt'; "
                    "pass do_pad=True (or do_split_image=True) or return_tensors=None"
                )
            data["pixel_values"] = torch.stack(pixel_values)
        return BatchFeature(data)

    def __call__(self, images: Any = None, segmentation_maps: Any = None, **kwargs: Any) -> BatchFeature:
        if images is None:
            raise ValueError("images is required")
        return self.preprocess(images, segmentation_maps=segmentation_maps, **kwargs)

    def _pipeline(self, images: list[torch.Tensor], opts: dict, resample: int, normalize: bool):
        """resize -> split / pad -> rescale + normalize, batching images of one shape and device together."""
        size = opts["size"]
        if opts["do_resize"]:
            resized: list[torch.Tensor | None] = [None] * len(images)
            groups: dict[tuple, list[int]] = {}
            for i, img in enumerate(images):
                groups.setdefault((tuple(img.shape), img.dtype, img.device), []).append(i)
            for (shape, _, _), idx in groups.items():
                target = resized_size(shape[-2:], size["shortest_edge"], size["longest_edge"])
                out = _resize(torch.stack([images[i] for i in idx]), target, _RESAMPLE_MODES[resample])
                for j, i in enumerate(idx):
                    resized[i] = out[j]
            images = resized  # type: ignore[assignment]

        patch_offsets: list[torch.Tensor] = []
        if opts["do_split_image"]:
            windows = []
            window = size["shortest_edge"]
            for i, img in enumerate(images):
                h, w = img.shape[-2:]
                for start, end in window_offsets(h, w, window):
                    windows.append(img[:, start:end, :] if h > w else img[:, :, start:end])
                    patch_offsets.append(torch.tensor([i, start, end]))
            images = windows

        if opts["do_pad"]:
            ph, pw = padded_size(size)
            images = [
                F.pad(img, (0, max(0, pw - img.shape[-1]), 0, max(0, ph - img.shape[-2])), value=0)
                for img in images
            ]

        if normalize:
            images = [self._rescale_normalize(img, opts) for img in images]
        return images, patch_offsets

    @staticmethod
    def _rescale_normalize(img: torch.Tensor, opts: dict) -> torch.Tensor:
        if opts["do_normalize"]:
            mean = per_channel(opts["image_mean"], img.shape[0], "image_mean", img.device)
            std = per_channel(opts["image_std"], img.shape[0], "image_std", img.device)
            if opts["do_rescale"]:  # transformers' fused form
                mean, std = mean * (1.0 / opts["rescale_factor"]), std * (1.0 / opts["rescale_factor"])
            return (img.to(torch.float32) - mean) / std
        if opts["do_rescale"]:
            return img * opts["rescale_factor"]
        return img

    def _segmentation_targets(self, maps: Any, mapping: Any, opts: dict, device: Any, num_images: int) -> dict:
        """Training targets: per image binary masks ``(N, H, W)`` float32 and class ids ``(N,)`` int64."""
        def as_map(m: Any, i: int) -> torch.Tensor:  # a PIL map keeps its values (no RGB conversion)
            return torch.from_numpy(np.array(m)) if _is_pil(m) else _to_tensor(m, i)

        if isinstance(maps, (torch.Tensor, np.ndarray)) and maps.ndim == 3:
            items = [_to_tensor(m, i) for i, m in enumerate(maps)]
        elif (isinstance(maps, (torch.Tensor, np.ndarray)) and maps.ndim == 2) or _is_pil(maps):
            items = [as_map(maps, 0)]
        elif isinstance(maps, (list, tuple)):
            items = [as_map(m, i) for i, m in enumerate(maps)]
        else:
            raise TypeError(
                f"segmentation_maps: expected (H, W) maps as tensors / arrays / PIL images or a list of them, got {type(maps).__name__}"
            )
        if len(items) != num_images:
            raise ValueError(f"segmentation_maps: expected {num_images} maps (one per image), got {len(items)}")
        prepared = []
        for i, m in enumerate(items):
            if m.ndim == 3 and m.shape[0] == 1:
                m = m[0]
            if m.ndim != 2:
                raise ValueError(f"segmentation_maps[{i}]: expected shape (H, W), got {tuple(m.shape)}")
            if device is not None:
                m = m.to(device)
            prepared.append(m[None].contiguous())
        map_opts = dict(opts, do_rescale=False, do_normalize=False)
        maps_out, _ = self._pipeline(prepared, map_opts, 0, normalize=False)
        ignore_index = opts["ignore_index"]
        mask_labels, class_labels = [], []
        for i, m in enumerate(maps_out):
            m = m[0].to(torch.int64)
            if ignore_index is not None:
                m = torch.where(m == 0, ignore_index, m - 1)
            ids = torch.unique(m)
            if ignore_index is not None:
                ids = ids[ids != ignore_index]
            masks = (m[None] == ids[:, None, None]).float()
            inst = mapping[i] if isinstance(mapping, (list, tuple)) else mapping
            if inst is not None:
                shift = 1 if ignore_index is not None else 0
                try:
                    classes = [inst[v + shift] - shift for v in ids.tolist()]
                except KeyError as exc:
                    raise ValueError(f"instance_id_to_semantic_id has no entry for instance id {exc.args[0]} (map {i})") from None
                labels = torch.tensor(classes, dtype=torch.int64, device=m.device)
            else:
                labels = ids
            mask_labels.append(masks)
            class_labels.append(labels.long())
        return {"mask_labels": mask_labels, "class_labels": class_labels}

    # -------------------------------------------------------------------------- post-processing helpers

    def merge_image_patches(
        self,
        segmentation_logits: torch.Tensor,
        patch_offsets: Any,
        target_sizes: Any,
        size: dict[str, int],
    ) -> list[torch.Tensor]:
        """Window logits ``(windows, C, S, S)`` -> per image ``(C, H, W)`` at its target size.

        Windows are averaged where they overlap on the resized image, then resized bilinearly to the target
        (transformers' ``merge_image_patches``; the long side is the target's).
        """
        size = _check_size(dict(size))
        sizes = _target_sizes(target_sizes, len(target_sizes) if target_sizes is not None else 0)
        offsets = _patch_offsets(patch_offsets, segmentation_logits.shape[0], len(sizes)) or []
        return [
            F.interpolate(self._merge_one(segmentation_logits, offsets, i, sizes[i], size)[None], size=sizes[i],
                          mode="bilinear", align_corners=False)[0]
            for i in range(len(sizes))
        ]

    @staticmethod
    def _merge_one(window_logits, offsets, image, target, size, window_fn=None) -> torch.Tensor:
        """Average the windows of one image on its resized canvas ``(C, h, w)``; ``window_fn(k)`` makes window k."""
        h, w = resized_size(target, size["shortest_edge"], size["longest_edge"])
        total = count = None
        tall = target[0] > target[1]
        for k, (img, start, end) in enumerate(offsets):
            if img != image:
                continue
            logits = window_logits[k] if window_fn is None else window_fn(k)
            if total is None:
                total = torch.zeros((logits.shape[0], h, w), dtype=logits.dtype, device=logits.device)
                count = torch.zeros((1, h, w), dtype=logits.dtype, device=logits.device)
            if tall:
                total[:, start:end, :] += logits
                count[:, start:end, :] += 1
            else:
                total[:, :, start:end] += logits
                count[:, :, start:end] += 1
        if total is None:
            raise ValueError(f"patch_offsets holds no window for image {image}")
        return total / count.clamp(min=1)

    def unpad_image(self, segmentation_logits: torch.Tensor, target_sizes: Any, size: dict[str, int]) -> list[torch.Tensor]:
        """Padded-size logits ``(B, C, S, L)`` -> per image ``(C, H, W)``: crop the resized image, resize to target."""
        size = _check_size(dict(size))
        sizes = _target_sizes(target_sizes, segmentation_logits.shape[0])
        out = []
        for i, target in enumerate(sizes):
            h, w = resized_size(target, size["shortest_edge"], size["longest_edge"])
            cropped = segmentation_logits[i][:, :h, :w]
            out.append(F.interpolate(cropped[None], size=target, mode="bilinear", align_corners=False)[0])
        return out

    @staticmethod
    def _class_maps(classes: torch.Tensor, masks: torch.Tensor, k: int, output_size: tuple[int, int]) -> torch.Tensor:
        """Window / image k's class map ``(C, S, L)``: transformers' upsample, sigmoid and einsum, one row at a time."""
        probs = F.interpolate(masks[k : k + 1], size=output_size, mode="bilinear").sigmoid()
        return torch.einsum("bqc, bqhw -> bchw", classes[k : k + 1], probs)[0]

    @staticmethod
    def _upsample_argmax(class_map: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
        """argmax over classes of the bilinear upsample of ``(C, h, w)``, in blocks of classes (no ``(C, H, W)``)."""
        num_classes = class_map.shape[0]
        block = _pp.block_channels(num_classes, *target)
        best = best_idx = None
        for start in range(0, num_classes, block):
            up = F.interpolate(class_map[None, start : start + block], size=target, mode="bilinear", align_corners=False)[0]
            val, idx = up.max(dim=0)  # argmax's index (first maximum, NaN wins) and its value, in one pass
            if best is None:
                best, best_idx = val, idx
            else:
                better = _pp._better(val, best)  # ties keep the earlier class, as argmax does
                best = torch.where(better, val, best)
                best_idx = torch.where(better, idx + start, best_idx)
        return best_idx

    def _kept_queries(self, masks: torch.Tensor, image: int, keep: torch.Tensor, output_size, crop) -> torch.Tensor:
        """Masks of the kept queries of one image, upsampled to the padded size and cropped: ``(K, h, w)``."""
        idx = keep.nonzero()[:, 0]
        up = F.interpolate(masks[image, idx][None], size=output_size, mode="bilinear")[0]
        return up[:, : crop[0], : crop[1]]

    # -------------------------------------------------------------------------- post-processing

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Any,
        size: dict[str, int] | None = None,
        return_segmentation_scores: bool = False,
    ):
        """Per image a ``(H, W)`` int64 class map (or outputs with ``segmentation`` and ``segmentation_scores``).

        With ``outputs.patch_offsets`` (sliding windows) the windows are stitched back per image; otherwise each
        image's ``(shortest_edge, longest_edge)`` class map is resized to its target size as a whole.
        """
        size = _check_size(dict(size) if size is not None else dict(self.size))
        cls, masks = _logits(outputs)
        raw_offsets = outputs.get("patch_offsets") if isinstance(outputs, dict) else getattr(outputs, "patch_offsets", None)
        output_size = padded_size(size)
        classes = cls.softmax(dim=-1)[..., :-1]
        if raw_offsets is not None and len(raw_offsets) > 0:
            if target_sizes is None:
                raise ValueError("target_sizes is required: one (height, width) per original image")
            sizes = _target_sizes(target_sizes, len(target_sizes))
            offsets = _patch_offsets(raw_offsets, cls.shape[0], len(sizes))
            canvases = (
                self._merge_one(None, offsets, i, sizes[i], size,
                                window_fn=lambda k: self._class_maps(classes, masks, k, output_size))
                for i in range(len(sizes))
            )
        else:
            sizes = _target_sizes(target_sizes, cls.shape[0])
            canvases = (self._class_maps(classes, masks, i, output_size) for i in range(len(sizes)))
        results = []
        for target, class_map in zip(sizes, canvases):
            if return_segmentation_scores:
                up = F.interpolate(class_map[None], size=target, mode="bilinear", align_corners=False)[0]
                results.append((up.argmax(dim=0), up))
            else:
                results.append((self._upsample_argmax(class_map, target), None))
        if not return_segmentation_scores:
            return [seg for seg, _ in results]
        try:  # transformers' own output class when it is installed
            from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput as _Out

            return [_Out(data={"segmentation": seg, "segmentation_scores": sc}) for seg, sc in results]
        except Exception:  # pragma: no cover - transformers is optional
            return [BatchFeature(segmentation=seg, segmentation_scores=sc) for seg, sc in results]

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        target_sizes: Any,
        threshold: float = 0.8,
        size: dict[str, int] | None = None,
    ) -> list[dict]:
        """Per image ``{"segmentation": (H, W) float32 ids or -1, "segments_info": [{"id", "label_id", "score"}]}``.

        A query is kept when it has a positive pixel (at target size, after un-padding) and
        ``class probability x mean sigmoid over its positive pixels >= threshold``; later queries paint over
        earlier ones (transformers' rules).
        """
        threshold = float(threshold)

        def candidates(cls: torch.Tensor) -> torch.Tensor:
            # a query's score is at most its class probability: only those can pass (the op's own pre-filter)
            return cls.softmax(dim=-1)[..., :-1].max(-1).values.double() >= threshold

        def paint(cls: torch.Tensor, kept: torch.Tensor, target: tuple[int, int]):
            return ops.call("instance_segmentation", cls, kept, [target], threshold)

        def empty(target: tuple[int, int], device: torch.device) -> torch.Tensor:
            return torch.full(target, -1.0, dtype=torch.float32, device=device)  # transformers': float32 -1 on device

        return self._segment_kept_queries(outputs, target_sizes, size, candidates, paint, empty, torch.float32)

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        target_sizes: Any,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        stuff_classes: list[int] | None = None,
        size: dict[str, int] | None = None,
    ) -> list[dict]:
        """Per image ``{"segmentation": (H, W) int64 ids or -1, "segments_info": [{"id", "label_id", "score"}]}``.

        Queries whose best class (no-object included) is a real class with probability ``> threshold`` compete
        per pixel by ``score x sigmoid``; a segment needs its assigned area over its ``>= mask_threshold`` area
        ``> overlap_mask_area_threshold``; ``stuff_classes`` segments of one class share one id.
        """
        fuse = {int(c) for c in stuff_classes} if stuff_classes else None

        def competing(cls: torch.Tensor) -> torch.Tensor:
            return _pp.panoptic_selection(cls, float(threshold))[2]

        def paint(cls: torch.Tensor, kept: torch.Tensor, target: tuple[int, int]):
            return ops.call("panoptic_segmentation", cls, kept, [target], float(threshold), float(mask_threshold),
                            float(overlap_mask_area_threshold), fuse)

        def empty(target: tuple[int, int], device: torch.device) -> torch.Tensor:
            return torch.zeros(target) - 1  # transformers' empty panoptic map: float32 -1 on the CPU

        return self._segment_kept_queries(outputs, target_sizes, size, competing, paint, empty, torch.long)

    def _segment_kept_queries(self, outputs, target_sizes, size, select, paint, empty, seg_dtype) -> list[dict]:
        """Shared by instance and panoptic: ``select(cls) -> (B, Q) bool`` picks each image's queries, whose
        masks are upsampled to the padded size and cropped to the image's resized size; ``paint(cls (1, K, C+1),
        masks (1, K, h, w), target)`` returns the op's ``(segs, flags, labels, scores)`` at ``target``."""
        size = _check_size(dict(size) if size is not None else dict(self.size))
        cls, masks = _logits(outputs)
        sizes = _target_sizes(target_sizes, cls.shape[0])
        output_size = padded_size(size)
        keep_all = select(cls)
        results = []
        for i, target in enumerate(sizes):
            if not bool(keep_all[i].any()):  # no query passes: transformers' empty result, nothing upsampled
                results.append({"segmentation": empty(target, masks.device), "segments_info": []})
                continue
            crop = resized_size(target, size["shortest_edge"], size["longest_edge"])
            kept = self._kept_queries(masks, i, keep_all[i], output_size, crop)
            segs, flags, labels, scores = paint(cls[i, keep_all[i]][None], kept[None], target)
            results.append({"segmentation": segs[0].to(seg_dtype), "segments_info": _segments(flags[0], labels[0], scores[0])})
        return results


__all__ = ["EomtImageProcessor", "resized_size", "window_offsets", "padded_size"]
