"""The engine: one device's model, with pre-processing, queries carried across chunks and post-processing.

The main thread uploads a chunk, resizes and normalizes it on the device, runs the early layers on the
whole chunk and the query layers frame by frame with the propagated queries carried across chunks
(memory is bounded by the chunk, not the video), and post-processes on the device.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from videomt_fast.apps import video_io
from videomt_fast.apps.segment.settings import SegmentSettings

_MODEL_CACHE: dict[tuple, Any] = {}


def resolve_dtype(name: str, device: str, runtime: str = "torch"):
    """The model's dtype: ``auto`` is bfloat16 on CUDA for the torch runtime, else float32 (ONNX Runtime runs
    float32 graphs exported from float32 weights)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") and runtime == "torch" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_model(settings: SegmentSettings, device: str):
    """The model on ``device`` (cached per process: Ray workers and repeated calls reuse it)."""
    key = (settings.model, device, settings.dtype, settings.fast, settings.runtime)
    if key not in _MODEL_CACHE:
        from videomt_fast.model.modeling import VideomtForUniversalSegmentation

        dtype = resolve_dtype(settings.dtype, device, settings.runtime)
        model = VideomtForUniversalSegmentation.from_pretrained(settings.model, dtype=dtype, device=device)
        check_weights(model, settings.model)
        if settings.fast and hasattr(model, "optimize"):
            model.optimize(dtype=dtype)
        model.eval()
        _MODEL_CACHE.clear()  # one model per process
        _MODEL_CACHE[key] = model
    return _MODEL_CACHE[key]


def check_weights(model, name: str) -> None:
    """Refuse a checkpoint whose weights hold NaN or infinite values: every map it made would be noise.

    (Loading itself accepts them, as transformers does; segment will not write results with them.)"""
    import torch

    bad = [key for key, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f"{name}: the checkpoint's weights hold NaN or infinite values in {len(bad)} tensor(s) "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


@contextlib.contextmanager
def torch_threads(threads: int, device: str) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` while segmenting on a CPU device (0 = leave it).

    The count is process-wide: it is restored afterwards so that a library caller keeps its own.
    """
    import torch

    if threads <= 0 or torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Geometry:
    height: int  # source frame size
    width: int
    resize: tuple[int, int]  # frames are resized to this ...
    padded: tuple[int, int]  # ... then padded (bottom/right) to this multiple of the patch size
    valid: tuple[int, int]  # mask-logit rows/cols that cover the resized (unpadded) frame


def plan_geometry(height: int, width: int, settings: SegmentSettings, config) -> Geometry:
    ph, pw = config.patch_hw
    if settings.short_side:
        scale = settings.short_side / min(height, width)
        # multiples of 4 so that the unpadded region is a whole number of mask-logit pixels (stride 4)
        rh = max(4, int(round(height * scale / 4)) * 4)
        rw = max(4, int(round(width * scale / 4)) * 4)
        padded = (math.ceil(rh / ph) * ph, math.ceil(rw / pw) * pw)
        return Geometry(height, width, (rh, rw), padded, (rh // 4, rw // 4))
    if settings.size:
        side = (settings.size, settings.size)
    else:
        side = tuple(config.image_hw)
    if side[0] % ph or side[1] % pw:
        raise ValueError(f"--size {side[0]}x{side[1]} must be a multiple of the patch size {ph}x{pw}")
    return Geometry(height, width, side, side, (side[0] // 4, side[1] // 4))


class Engine:
    """One device: preprocessing, the model with queries carried across chunks, post-processing."""

    def __init__(self, settings: SegmentSettings, device: str):
        import torch

        from videomt_fast.processing.video_processor import VideomtVideoProcessor

        self.torch = torch
        self.settings = settings
        self.device = torch.device(device)
        self.model = load_model(settings, device)
        self.config = self.model.config
        self.processor_cls = VideomtVideoProcessor
        self.processor = VideomtVideoProcessor()
        self.labels = dict(self.config.id2label)

    # --- per video
    def start(self, info: video_io.VideoInfo) -> Geometry:
        geometry = plan_geometry(info.height, info.width, self.settings, self.config)
        self.geometry = geometry
        self.processor = self.processor_cls(size={"height": geometry.resize[0], "width": geometry.resize[1]})
        self.prev_queries = None
        self.session = self.model.new_session(1) if self.settings.engine == "session" else None
        if self.settings.runtime == "onnxruntime":
            from videomt_fast.apps.segment import ort

            self.session = ort.new_session(self.model, geometry.padded, self.settings.dtype, str(self.device))
        self.tracker = None
        if self.settings.task == "instance":
            from videomt_fast.processing.tracks import VideoInstanceAccumulator

            self.tracker = VideoInstanceAccumulator(top_k=self.settings.top_k)
        return geometry

    def preprocess(self, chunk: np.ndarray):
        torch = self.torch
        frames = torch.from_numpy(chunk)
        if self.device.type == "cuda":
            frames = frames.pin_memory().to(self.device, non_blocking=True)
        frames = frames.permute(0, 3, 1, 2)  # (t, 3, H, W) uint8 on the device
        pixels = self.processor.preprocess(frames)["pixel_values_videos"][0]
        ph, pw = self.geometry.padded
        if pixels.shape[-2:] != (ph, pw):
            pixels = torch.nn.functional.pad(pixels, (0, pw - pixels.shape[-1], 0, ph - pixels.shape[-2]))
        return pixels.to(self.model.dtype)

    def forward(self, pixels):
        """``(t, 3, H, W)`` -> class logits ``(t, Q, C+1)`` and mask logits ``(t, Q, h, w)`` (float32, cropped)."""
        torch = self.torch
        with torch.inference_mode():
            classes, masks = [], []
            if self.session is not None:
                for i in range(pixels.shape[0]):
                    out = self.session.step(pixels[i : i + 1])
                    classes.append(out.class_queries_logits)
                    masks.append(out.masks_queries_logits)
            else:
                grid = self.model.grid_for(*pixels.shape[-2:])
                hidden = self.model.frame_encoder(pixels)(pixels)  # with --fast: the plan of this many frames
                step = self.model.query_stepper(hidden[:1], grid)  # with --fast: its plan, CUDA graphs on a GPU
                for i in range(pixels.shape[0]):
                    mask_logits, class_logits, _, self.prev_queries = step(hidden[i : i + 1], self.prev_queries, grid)
                    classes.append(class_logits)
                    masks.append(mask_logits)
                del hidden
            vh, vw = self.geometry.valid
            classes = torch.cat(classes).float()
            masks = torch.cat(masks)[:, :, :vh, :vw].float()
        return classes, masks

    def postprocess(self, start: int, classes, masks) -> tuple[np.ndarray | None, list | None]:
        """Maps ``(t, H, W)`` int32 on the host (0 = none) and per-frame extras (None for instance)."""
        torch = self.torch
        outputs = {"class_queries_logits": classes, "masks_queries_logits": masks}
        sizes = [(self.geometry.height, self.geometry.width)] * classes.shape[0]
        s = self.settings
        with torch.inference_mode():
            if s.task == "semantic":
                maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
                return torch.stack(maps).to(torch.int32).cpu().numpy(), None
            if s.task == "panoptic":
                results = self.processor.post_process_panoptic_segmentation(
                    outputs, target_sizes=sizes, threshold=s.task_threshold(), mask_threshold=s.mask_threshold,
                    overlap_mask_area_threshold=s.overlap_threshold, label_ids_to_fuse=set(s.fuse_labels) or None,
                )
                ids = torch.stack([r["segmentation"] for r in results]).to(torch.int32) + 1
                return ids.cpu().numpy(), [r["segments_info"] for r in results]
            # instance: masks are kept as run lengths; id maps are painted once the video's tracks are known
            self.tracker.update(outputs, sizes)
            return None, None
