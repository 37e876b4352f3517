"""ONNX Runtime rows of ``videomt-fast bench`` (``--ort``): the same weights exported to ONNX
(:mod:`videomt_fast.export`) and run on an execution provider, beside transformers and our path.

    ort-cpu        CPUExecutionProvider, the float32 graphs
    ort-cuda       CUDAExecutionProvider, the float16 graphs (attention and norm statistics in float32)
    ort-tensorrt   TensorrtExecutionProvider (CUDA for what TensorRT does not take), the float16 graphs

Online runs the step graph through :class:`videomt_fast.export.OrtSession` (the carried queries held by
the session); offline runs the clip graph (EoMT: the image graph on the batch); end-to-end wraps the
clip graph in videomt_fast's pre- and post-processing, as the fast rows do. The export happens when
the provider is built (untimed; its time is in the row's notes). Inputs are copied to the host and
outputs back as torch tensors, inside the timed region.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

from videomt_fast.apps.benchmark import Runner, Skip

CHOICES = ("cpu", "cuda", "tensorrt")
EXECUTION_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                       "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}
DTYPES = {"cpu": torch.float32, "cuda": torch.float16, "tensorrt": torch.float16}


def resolve(text: str) -> list[str]:
    """``--ort`` value -> provider names (``ort-cpu``, ...): a comma list from :data:`CHOICES`, ``auto``
    (every one whose execution provider is installed) or ``none``."""
    text = text.strip().lower()
    if text in ("", "none"):
        return []
    if text == "auto":
        try:
            import onnxruntime
        except ImportError:
            return []
        have = set(onnxruntime.get_available_providers())
        return [f"ort-{c}" for c in CHOICES if EXECUTION_PROVIDERS[c][0] in have]
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in CHOICES]
    if unknown:
        raise ValueError(f"unknown --ort execution providers {unknown}; choose from {list(CHOICES)}, auto or none")
    return [f"ort-{c}" for c in items]


def build(bench, name: str, size: tuple[int, int]) -> Runner:
    """The Runner of ``ort-<ep>`` at ``size`` on ``bench``'s shared weights."""
    try:
        import onnxruntime
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install -e \".[onnx]\")") from None
    from videomt_fast.export import export, load

    ep = name.split("-", 1)[1]
    providers = EXECUTION_PROVIDERS[ep]
    if providers[0] not in onnxruntime.get_available_providers():
        raise Skip(f"{providers[0]} is not installed (onnxruntime {onnxruntime.__version__} has "
                   f"{onnxruntime.get_available_providers()})")
    dtype = DTYPES[ep]
    dtype_name = str(dtype).replace("torch.", "")
    model = bench.lean_model(size).eval()  # the shared weights (VidEoMT-DINOv3 included: no transformers class)
    folder = tempfile.mkdtemp(prefix="videomt-fast-bench-onnx-")
    out = os.path.join(folder, "export")
    started = time.perf_counter()
    sidecar = export(model, out, dtypes=[dtype_name], sizes=[size], verify=False)
    took = time.perf_counter() - started
    threads = torch.get_num_threads() if ep == "cpu" else None
    runner = load(out, dtype=dtype_name, providers=providers, threads=threads)
    how = sidecar["exporter"]["name"]
    backend = f"onnxruntime {onnxruntime.__version__} {providers[0]}, {dtype_name} graphs ({how})"
    notes = [f"exported in {took:.1f} s (untimed) to {out}; frame sizes "
             f"{'dynamic' if sidecar['frame_sizes']['dynamic'] else sidecar['frame_sizes']['sizes']}"
             + (f"; ONNX Runtime intra-op threads {threads} (as torch)" if threads else "")]
    device = bench.device

    def on_device(value: Any):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    if bench.eomt:
        processor = bench.eomt_fast_processor(size)

        def forward(images):
            out = runner(pixel_values=images.float())
            out.class_queries_logits = on_device(out.class_queries_logits)
            out.masks_queries_logits = on_device(out.masks_queries_logits)
            return out

        return bench._eomt_runner(name, dtype, backend, notes, size, forward, lambda: processor)

    def clip_forward(clip):
        out = runner(pixel_values_videos=clip.float())
        out.class_queries_logits = on_device(out.class_queries_logits)
        out.masks_queries_logits = on_device(out.masks_queries_logits)
        return out

    def offline(clip):
        out = clip_forward(clip)
        return out.masks_queries_logits, out.class_queries_logits

    session = runner.new_session(1)

    def new_online():
        session.reset()

        def call(frame):
            out = session.step(frame.float())
            return on_device(out.masks_queries_logits), on_device(out.class_queries_logits)

        return call

    def end_to_end(frames_uint8):
        cls, _ = bench.fast_processor_cls()
        processor = cls(size={"height": size[0], "width": size[1]})
        pre = processor(frames_uint8[None], device=device).pixel_values_videos
        out = clip_forward(pre)
        target = [tuple(frames_uint8.shape[1:3])] * frames_uint8.shape[0]
        results = processor.post_process_instance_segmentation(out, target_sizes=target, threshold=bench.args.threshold)
        return results, out.masks_queries_logits, out.class_queries_logits

    return Runner(name, bench.args.model, dtype, backend, offline, new_online, end_to_end, notes)
