"""Each exported graph run on ONNX Runtime against the PyTorch model in float32, at the listed sizes:
the maximum absolute error of each output, written into the sidecar (``verified``)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from videomt_fast.export.runner import OrtModel

VERIFY_FRAMES = 3  # frames of the stream checked through the step graph (the first and two carried)


def _err(a: Any, b: torch.Tensor) -> float:
    return float((torch.as_tensor(a).float() - b.float()).abs().max())


def verify_export(model, folder: str, sidecar: dict) -> list[dict[str, Any]]:
    import json
    import os

    from videomt_fast.export.exporter import SIDECAR, _prepared

    with open(os.path.join(folder, SIDECAR), "w", encoding="utf-8") as fh:  # the runner reads the sidecar
        json.dump(sidecar, fh)
    reference = _prepared(model, torch.float32)
    if reference is model:
        reference = copy.copy(model)  # the same tensors; the runtime's per-instance state is not touched
    sizes = ([tuple(int(v) for v in s.split("x")) for s in sidecar["frame_sizes"]["verified"]]
             if sidecar["frame_sizes"]["dynamic"] else
             [tuple(int(v) for v in s.split("x")) for s in sidecar["frame_sizes"]["sizes"]])
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    results = []
    for dtype in sorted({g["dtype"] for g in sidecar["graphs"]}):
        ort_model = OrtModel(folder, dtype=dtype)
        kinds = {g["graph"] for g in sidecar["graphs"] if g["dtype"] == dtype}
        for size in sizes:
            clip = torch.randn(1, VERIFY_FRAMES, cfg.num_channels, *size, generator=gen)
            with torch.inference_mode():
                if "step" in kinds:
                    ours, theirs = reference.new_session(1), ort_model.new_session(1)
                    errs = {"class_queries_logits": 0.0, "masks_queries_logits": 0.0, "queries": 0.0}
                    for t in range(VERIFY_FRAMES):
                        a, b = ours.step(clip[:, t]), theirs.step(clip[:, t])
                        errs["class_queries_logits"] = max(errs["class_queries_logits"],
                                                           _err(b.class_queries_logits, a.class_queries_logits))
                        errs["masks_queries_logits"] = max(errs["masks_queries_logits"],
                                                           _err(b.masks_queries_logits, a.masks_queries_logits))
                        errs["queries"] = max(errs["queries"], _err(theirs.propagated_queries, ours.propagated_queries))
                    results.append({"graph": "step", "dtype": dtype, "size": f"{size[0]}x{size[1]}",
                                    "frames": VERIFY_FRAMES, "max_abs_err": errs})
                if "clip" in kinds:
                    a, b = reference(pixel_values_videos=clip), ort_model(pixel_values_videos=clip)
                    results.append({"graph": "clip", "dtype": dtype, "size": f"{size[0]}x{size[1]}",
                                    "frames": VERIFY_FRAMES, "max_abs_err": {
                                        "class_queries_logits": _err(b.class_queries_logits, a.class_queries_logits),
                                        "masks_queries_logits": _err(b.masks_queries_logits, a.masks_queries_logits)}})
                if "image" in kinds:
                    images = clip[0, :2]
                    a, b = reference(pixel_values=images), ort_model(pixel_values=images)
                    results.append({"graph": "image", "dtype": dtype, "size": f"{size[0]}x{size[1]}", "images": 2,
                                    "max_abs_err": {
                                        "class_queries_logits": _err(b.class_queries_logits, a.class_queries_logits),
                                        "masks_queries_logits": _err(b.masks_queries_logits, a.masks_queries_logits)}})
    for row in results:
        row["against"] = "the PyTorch model in float32 on the CPU, same inputs"
    return results
