"""``VideomtVideoProcessor``: transformers' VidEoMT video processor, without torchvision and with fused
post-processing.

Pre-processing follows transformers (resize to 640x640, bilinear with antialias, rescale 1/255,
ImageNet mean/std, ``pixel_values_videos`` of shape ``(B, T, 3, H, W)``) and runs on the device the
frames are on. Numerics: transformers resizes with torchvision, which on CPU resizes uint8 frames
directly with ``torch``'s uint8 antialiased kernel and elsewhere resizes in float32 and rounds back
to uint8; we make the same two calls, so on CPU and CUDA the resized frames are the same uint8
values torchvision gives (float frames are resized in float without rounding, as torchvision does),
and the fused rescale+normalize uses transformers' constants (``mean * 255``, ``std * 255``).

Post-processing has transformers' three methods, signatures and outputs; each dispatches through
:mod:`videomt_fast.ops` (CUDA kernels on GPU tensors when the extension is available, otherwise the
vectorized PyTorch references in :mod:`videomt_fast.ops.postprocess`) and makes one host transfer for all
frames' ``segments_info``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

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


class VideomtVideoProcessor:
    """Drop-in for ``transformers.VideomtVideoProcessor`` (pre- and post-processing)."""

    model_input_names = ["pixel_values_videos"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict | None = None,
        resample: int = 2,  # PIL BILINEAR, the only mode supported here
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        do_convert_rgb: bool = True,
        **kwargs: Any,
    ) -> None:
        size = dict(size) if size is not None else {"height": 640, "width": 640}
        if set(size) != {"height", "width"}:
            raise ValueError(f"size must be a dict with 'height' and 'width', got {size}")
        if resample not in (2, "bilinear"):
            raise ValueError(f"resample must be bilinear (2); got {resample!r}")
        self.do_resize = do_resize
        self.size = size
        self.resample = 2
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.do_convert_rgb = do_convert_rgb
        self.extra = {k: v for k, v in kwargs.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "VideomtVideoProcessor":
        """Read ``video_preprocessor_config.json`` (or ``preprocessor_config.json``) from a folder or the Hub."""
        config = None
        names = ("video_preprocessor_config.json", "preprocessor_config.json")
        if os.path.isdir(name_or_path):
            for name in names:
                path = os.path.join(name_or_path, name)
                if os.path.isfile(path):
                    config = path
                    break
        else:
            from huggingface_hub import hf_hub_download

            for name in names:
                try:
                    config = hf_hub_download(str(name_or_path), name, **{k: kwargs.pop(k) for k in ("revision", "token") if k in kwargs})
                    break
                except Exception:
                    continue
        if config is None:
            raise FileNotFoundError(f"no {names[0]} or {names[1]} found for {name_or_path!r}")
        with open(config, encoding="utf-8") as fh:
            values = json.load(fh)
        known = {"do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb"}
        args = {k: v for k, v in values.items() if k in known}
        args.update(kwargs)
        return cls(**args)

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

    def preprocess(
        self,
        videos: Any,
        return_tensors: str | None = "pt",
        device: str | torch.device | None = None,
        input_data_format: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Frames -> ``pixel_values_videos`` ``(B, T, 3, H, W)`` float32 on the frames' device (or ``device``)."""
        opts = {k: kwargs.pop(k, getattr(self, k)) for k in ("do_resize", "size", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")}
        if kwargs:
            unknown = sorted(k for k in kwargs if k not in ("resample", "do_sample_frames", "do_center_crop"))
            if unknown:
                raise TypeError(f"preprocess() got unexpected arguments {unknown}")
        size = (int(opts["size"]["height"]), int(opts["size"]["width"]))
        out = []
        for video in self._split_videos(videos):
            if device is not None:
                video = video.to(device)
            video = self._channels_first(video, input_data_format)
            if opts["do_convert_rgb"]:
                if video.shape[1] == 1:
                    video = video.expand(-1, 3, -1, -1)
                elif video.shape[1] == 4:
                    video = video[:, :3]
            if video.shape[1] != 3:
                raise ValueError(f"videos: expected 3 channels after RGB conversion, got {video.shape[1]}")
            video = video.contiguous()
            if opts["do_resize"]:
                video = self._resize(video, size)
            if opts["do_rescale"] and opts["do_normalize"]:  # transformers' fused form
                mean = torch.tensor(opts["image_mean"], device=video.device) * (1.0 / opts["rescale_factor"])
                std = torch.tensor(opts["image_std"], device=video.device) * (1.0 / opts["rescale_factor"])
                video = video.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])
            elif opts["do_normalize"]:
                mean = torch.tensor(opts["image_mean"], device=video.device)
                std = torch.tensor(opts["image_std"], device=video.device)
                video = video.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])
            elif opts["do_rescale"]:
                video = video * opts["rescale_factor"]
            out.append(video)
        if return_tensors in ("pt", None) and len({tuple(v.shape) for v in out}) == 1:
            return BatchFeature(pixel_values_videos=torch.stack(out))
        if return_tensors == "pt":
            raise ValueError(f"videos of different shapes cannot be stacked: {[tuple(v.shape) for v in out]}")
        return BatchFeature(pixel_values_videos=out)

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


def _with_segments(segs, flags, labels, scores) -> list[dict]:
    """Build ``segments_info`` for every frame from ``(F, Q)`` tables with one host transfer."""
    table = torch.stack([flags.double(), labels.double(), scores.double()], dim=-1).cpu()
    results = []
    for f, seg in enumerate(segs):
        rows = table[f][table[f, :, 0] > 0].tolist()
        info = [{"id": i, "label_id": int(label), "score": round(score, 6)} for i, (_, label, score) in enumerate(rows)]
        results.append({"segmentation": seg, "segments_info": info})
    return results


__all__ = ["VideomtVideoProcessor", "BatchFeature"]
