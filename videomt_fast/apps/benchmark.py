"""``videomt-fast bench``: videomt_fast against transformers, side by side, in one process.

Every provider runs the same inputs (several random clips, rotated between repeats, never zeros) on
the same device, one after the other, each built fresh and freed after its rows:

    hf-eager-fp32   transformers, attn_implementation="eager", float32 (the agreement reference)
    hf-sdpa-bf16    transformers, attn_implementation="sdpa", in ``--dtype`` (default bf16 on CUDA, float32
                    on a CPU, where its rows are labelled hf-sdpa-fp32)
    hf-compile      torch.compile(transformers sdpa model), mode="max-autotune" (CUDA; opt-in on CPU)
    fast-ref        videomt_fast, float32, every op forced to the reference backend
    fast            videomt_fast after model.optimize(): on CUDA bf16, Triton/CUDA kernels, CUDA-graph sessions;
                    on a CPU the plan decides the dtype (bf16 where it proves faster and agrees, else float32)
                    unless --dtype sets it. Every row's label ends in the dtype that ran (fast-bf16, fast-fp32)
    peers           Mask2Former Swin-T (per frame) and EdgeTAM video (streaming): FPS only

On a CPU the default run is short (about a minute or two): transformers eager and SDPA against
videomt_fast, no fast-ref (on a CPU ``fast`` runs the very same reference ops) and no peers; name them
with ``--providers`` and ``--peers`` to add them.

Modes: ``online`` (batch 1, one frame per call, queries carried between calls), ``offline`` (one clip
of T frames per call) and ``end-to-end`` (uint8 frames of the video's own size in, instance maps out:
pre-processing, the clip forward and instance post-processing all inside the timed region).

``--model eomt`` benchmarks EoMT, VidEoMT's image parent, the same way: ``online`` is one image per call
(batch 1), ``offline`` a batch of ``--frames`` images per call, ``end-to-end`` uint8 images in (resized to
the model's size and padded, as transformers' EoMT processor does for panoptic models), panoptic maps
out. Masked attention follows the model (a fresh EoMT keeps it on, trained checkpoints usually have
it annealed off); ``--masked-attention on|off`` sets it for every provider.

transformers has no streaming API. Its online row runs transformers' own modules frame by frame,
exactly the loop body of its clip forward, carrying the raw last-layer query rows into
``query_updater`` as the clip forward does; the cost is transformers' forward on a one-frame clip plus
one ``d x d`` Linear, and the outputs equal its clip forward (``--hf-online stateless`` times the bare
one-frame forward instead, which cannot carry queries).

Each run prints progress with an ETA (stderr), then the table with a legend and any warnings, and
writes ``<out-dir>/<arch>_<modes>_<device>_<time>.json`` atomically (``--out-dir`` defaults to
:func:`results_dir`, outside any source tree) and prints its path.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from videomt_fast.model.cost import frame_flops, layer_flops  # noqa: F401 (layer_flops: part of this module's API)
from videomt_fast.model.configuration import PRESETS

ARCHS = tuple(PRESETS)  # vit-s/b/l (DINOv2), dinov3-s/b/l
PROVIDERS = ("hf-eager-fp32", "hf-sdpa-bf16", "hf-compile", "fast-ref", "fast")
BASELINES = ("hf-eager-fp32", "hf-sdpa-bf16", "hf-compile")
PEERS = ("mask2former-swin-t", "edgetam-video")
MODES = ("online", "offline", "end-to-end")
REFERENCE = "hf-eager-fp32"
# A CPU's default: the fast path against transformers, nothing that repeats work (on a CPU "fast" runs the
# reference ops, so fast-ref would time the same code twice; hf-compile and the peers take minutes there).
CPU_PROVIDERS = ("hf-eager-fp32", "hf-sdpa-bf16", "fast")
SCHEMA_VERSION = 2  # 2: rows carry label, fps_min/fps_max/fps_spread; report carries warnings and plan
NOISY_SPREAD = 0.10  # a row whose per-repeat FPS spreads wider than +-10% of its median gets a warning

# The --tiny model: small enough for tests to run every provider and mode in seconds on a CPU.
TINY_CONFIG = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_blocks=2, num_queries=8, num_labels=5
)

# Dense bf16 peak used for MFU when --peak-tflops is not given (DESIGN.md section 2), by device name.
PEAK_TFLOPS_BY_NAME = (("H200", 790.0), ("H100", 790.0), ("A100", 312.0))


# --------------------------------------------------------------------------------------------
# FLOP model (DESIGN.md section 2)


def mfu(flops_per_frame: float, fps: float | None, peak_tflops: float | None) -> float | None:
    """Achieved FLOP/s over the peak; None when there is no peak (e.g. on a CPU)."""
    if not peak_tflops or not fps:
        return None
    return flops_per_frame * fps / (peak_tflops * 1e12)


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS_BY_NAME:
        if key in name:
            return value
    return None


# --------------------------------------------------------------------------------------------
# arguments


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 640x640), got {text!r}")
    h, w = int(match.group(1)), int(match.group(2))
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def _names(choices: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if text.strip().lower() in ("none", ""):
            return []
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {list(choices)}")
        return items

    return parse


def add_model_arguments(p: argparse.ArgumentParser, threads_default: str = "torch's") -> None:
    """The arguments the benchmark and the profiler share: which model, where, in which dtype."""
    model = p.add_mutually_exclusive_group()
    model.add_argument("--arch", choices=ARCHS, default=None,
                       help="published backbone shape with random weights (default vit-s): vit-s/b/l are DINOv2, "
                            "dinov3-s/b/l DINOv3 (rotary attention; --model eomt: EoMT-DINOv3)")
    model.add_argument("--checkpoint", default=None, help="a transformers VidEoMT checkpoint folder or hub id")
    model.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-labels", type=int, default=None,
                   help="classes of the random-weight model (default 40 for VidEoMT, 133 for EoMT)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of transformers' SDPA rows and of the fast path (default: bfloat16 on CUDA; on a CPU "
                        "float32 for transformers, and for the fast path what its plan measures best, bf16 or float32; "
                        "each row's label names the dtype that ran)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--threads", type=int, default=None, help=f"torch CPU threads (default: {threads_default})")


def resolve_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, eomt: bool = False) -> bool:
    """Fill in the defaults of :func:`add_model_arguments` (device, arch, labels, dtype); True on CUDA."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    args.device = device
    cuda = device.type == "cuda"
    if args.tiny:
        args.arch = "tiny"
    elif args.arch is None and args.checkpoint is None:
        args.arch = "vit-s"
    if args.num_labels is None:
        args.num_labels = 133 if eomt else 40
    # the fast path's dtype: as given, else "auto" (bf16 on CUDA; on a CPU the execution plan decides)
    args.fast_dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return cuda


def build_parser(prog: str = "videomt-fast bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_model_arguments(p, threads_default="1 on a CPU: steady ratios, no oversubscribed cores")
    p.add_argument("--model", choices=("videomt", "eomt"), default="videomt",
                   help="VidEoMT (video, default) or EoMT (images: online = one image per call, offline = a batch)")
    p.add_argument("--masked-attention", choices=("model", "on", "off"), default="model",
                   help="EoMT: keep the model's attn_mask_probs (default), or set them all to 1 (on) or 0 (off)")
    p.add_argument("--size", type=_size, action="append", default=None, metavar="HxW",
                   help="model input size, repeatable (default 640x640 and 448x800 on CUDA, 224x224 on CPU)")
    p.add_argument("--mode", choices=MODES, action="append", default=None,
                   help="repeatable (default: all three)")
    p.add_argument("--providers", type=_names(PROVIDERS, "providers"), default=None,
                   help=f"comma list from {','.join(PROVIDERS)} (default: all on CUDA; on CPU "
                        f"{','.join(CPU_PROVIDERS)})")
    p.add_argument("--ort", default="none", metavar="EPS",
                   help="ONNX Runtime rows on the exported graphs (videomt_fast.apps.bench_ort): comma list of "
                        "cpu, cuda, tensorrt, or auto (those installed), or none (default)")
    p.add_argument("--peers", type=_names(PEERS, "peers"), default=None,
                   help=f"comma list from {','.join(PEERS)}, or none (default: both on CUDA, none on CPU)")
    p.add_argument("--frames", type=int, default=None, help="offline clip length (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--online-frames", type=int, default=None,
                   help="frames per online repeat, state carried (default 16 on CUDA, 4 on CPU)")
    p.add_argument("--e2e-frames", type=int, default=None, help="end-to-end clip length (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--e2e-size", type=_size, default=None, metavar="HxW",
                   help="size of the decoded uint8 frames in end-to-end mode (default 720x1280 on CUDA, 180x320 on CPU)")
    p.add_argument("--threshold", type=float, default=None,
                   help="instance threshold (default 0.5 with --checkpoint; 0.0 with random weights, whose "
                        "near-uniform class scores would otherwise keep nothing)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls first (default 5 on CUDA, 0 on CPU); the untimed agreement call runs after them, "
                        "so every case has at least one call before its timed repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--num-inputs", type=int, default=3, help="random input buffers rotated between calls")
    p.add_argument("--agree-frames", type=int, default=8, help="frames compared with hf-eager-fp32 (default 8)")
    p.add_argument("--hf-online", choices=("carry", "stateless"), default="carry",
                   help="transformers' online baseline: its modules frame by frame with queries carried "
                        "(default), or its forward on a one-frame clip")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of hf-compile (default max-autotune on CUDA, default on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default: 790 on H100/H200, by device name; none on CPU)")
    p.add_argument("--out-dir", default=None,
                   help="folder for the JSON file with every row, setting and the environment (default: "
                        "$VIDEOMT_FAST_RESULTS_DIR, else ~/.cache/videomt_fast/results); its path is printed at the end")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="build every provider first and alternate them repeat by repeat, so a noisy machine "
                        "slows all alike (default on CPU; off on CUDA, where each provider's peak memory is "
                        "measured alone)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    eomt = args.model == "eomt"
    cuda = resolve_model_arguments(parser, args, eomt)
    device = args.device
    if args.masked_attention != "model" and not eomt:
        parser.error("--masked-attention applies to --model eomt only")
    default_sizes = [(640, 640)] if eomt else [(640, 640), (448, 800)]
    args.sizes = args.size or ([(32, 32)] if args.tiny else default_sizes if cuda else [(224, 224)])
    args.modes = list(dict.fromkeys(args.mode or MODES))
    if args.interleave is None:
        args.interleave = not cuda
    if args.providers is None:
        args.providers = list(PROVIDERS if cuda else CPU_PROVIDERS)
    from videomt_fast.apps import bench_ort

    try:
        args.providers = list(args.providers) + bench_ort.resolve(args.ort)  # ort-* rows, built by bench_ort
    except ValueError as exc:
        parser.error(str(exc))
    if args.peers is None:
        video_peers = [p for p in PEERS if not eomt or p == "mask2former-swin-t"]  # EdgeTAM is a video model
        args.peers = video_peers if cuda and not args.tiny else []
    elif eomt and "edgetam-video" in args.peers:
        parser.error("--peers edgetam-video is a video model; with --model eomt use mask2former-swin-t")
    defaults = dict(frames=(16, 2) if eomt else (64, 4), online_frames=(16, 4), e2e_frames=(8, 2),
                    e2e_size=((720, 1280), (180, 320)), warmup=(5, 0), repeats=(30, 3),
                    threshold=(0.5 if args.checkpoint else 0.0,) * 2)
    for name, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    args.compile_mode = args.compile_mode or ("max-autotune" if cuda else "default")
    if not cuda and args.threads is None:
        # one thread: steady ratios, and a shared or small machine is not oversubscribed (two threads on two
        # busy cores ran 3-4x slower than one); --threads N uses more
        args.threads = 1
    args.peak_tflops = args.peak_tflops if args.peak_tflops is not None else detect_peak_tflops(device)
    for name in ("frames", "online_frames", "e2e_frames", "repeats", "num_inputs", "agree_frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


# --------------------------------------------------------------------------------------------
# timing and memory


class Timer:
    """Per-call wall times: CUDA events on a GPU (read after one sync at the end), ``clock`` (seconds,
    default ``time.perf_counter``) on a CPU."""

    def __init__(self, device: torch.device, clock: Callable[[], float] | None = None):
        self.cuda = device.type == "cuda"
        self.clock = clock or time.perf_counter
        self._pairs: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pairs.append((start, end))
        else:
            start = self.clock()
            yield
            self._pairs.append((start, self.clock()))

    def milliseconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self._pairs]
        return [(e - s) * 1e3 for s, e in self._pairs]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """Peak memory of one provider: CUDA ``max_memory_allocated`` (weights + activations), or on a
    CPU the rise of the process' peak RSS over its RSS before the provider was built (Linux: the peak
    is reset through ``/proc/self/clear_refs``; None where that is not possible)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss_increase"
        self._base_kb: int | None = None
        self._reset_ok = False

    def start(self) -> None:
        """Before the provider is built: remember the baseline."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        else:
            self._base_kb = _proc_status_kb("VmRSS")
        self.reset_peak()

    def reset_peak(self) -> None:
        """Before each case: the peak restarts from what is allocated now (the weights included)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            self._reset_ok = True
        except OSError:
            self._reset_ok = False

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _proc_status_kb("VmHWM")
        if not self._reset_ok or peak is None or self._base_kb is None:
            return None
        return max(peak - self._base_kb, 0) / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# agreement


@dataclass
class Outputs:
    """The first frames of a provider's outputs, on the CPU, for comparison with the reference."""

    masks: torch.Tensor | None = None  # (F, Q, h, w) float32
    classes: torch.Tensor | None = None  # (F, Q, C+1) float32
    maps: torch.Tensor | None = None  # (F, H, W) instance ids (end-to-end)


def _keep(masks: torch.Tensor | None, classes: torch.Tensor | None, frames: int, maps=None) -> Outputs:
    def cut(x):
        return None if x is None else x[:frames].detach().float().cpu().clone()

    return Outputs(cut(masks), cut(classes), None if maps is None else maps[:frames].detach().cpu().clone())


def agreement(out: Outputs, ref: Outputs, map_key: str = "instance_map") -> dict[str, Any]:
    """Fraction of mask pixels whose sign agrees, of queries whose class argmax agrees, and max errors;
    ``map_key``: the fraction of equal pixels of the end-to-end segmentation maps (when both have them)."""
    result: dict[str, Any] = {"reference": REFERENCE}
    if out.masks is not None and ref.masks is not None and out.masks.shape == ref.masks.shape:
        result["frames_compared"] = int(out.masks.shape[0])
        result["mask_sign"] = float(((out.masks > 0) == (ref.masks > 0)).float().mean())
        result["mask_max_abs_err"] = float((out.masks - ref.masks).abs().max())
        result["mask_rel_err"] = float((out.masks - ref.masks).norm() / ref.masks.norm().clamp_min(1e-30))
    if out.classes is not None and ref.classes is not None and out.classes.shape == ref.classes.shape:
        result["class_argmax"] = float((out.classes.argmax(-1) == ref.classes.argmax(-1)).float().mean())
        result["class_max_abs_err"] = float((out.classes - ref.classes).abs().max())
    if out.maps is not None and ref.maps is not None and out.maps.shape == ref.maps.shape:
        result[map_key] = float((out.maps == ref.maps).float().mean())
    for value in list(result.values()):
        if isinstance(value, float) and not math.isfinite(value):
            result["nonfinite"] = True
    return result


# --------------------------------------------------------------------------------------------
# transformers' post-processing (its own code, loaded without torchvision when that is missing)


def transformers_postprocessor() -> tuple[Any, str]:
    """``(processor, how)``: transformers' ``VideomtVideoProcessor`` (see :mod:`videomt_fast.apps.hf_source`)."""
    from videomt_fast.apps.hf_source import videomt_video_processor

    return videomt_video_processor()


def fast_processor() -> tuple[Any | None, str]:
    try:
        from videomt_fast.processing.video_processor import VideomtVideoProcessor
    except Exception as exc:  # noqa: BLE001
        return None, f"videomt_fast.processing.video_processor unavailable: {type(exc).__name__}: {exc}"
    return VideomtVideoProcessor, "videomt_fast.processing.video_processor.VideomtVideoProcessor"


# --------------------------------------------------------------------------------------------
# providers


class Skip(Exception):
    """A provider or case that cannot run here; the message goes into the row."""


@dataclass
class Runner:
    """One provider, built for one size: offline clip forward and an online session."""

    name: str
    kind: str  # the benchmarked model ("videomt" or "eomt") or "peer"
    dtype: torch.dtype
    backend: str
    offline: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    new_online: Callable[[], Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] | None
    end_to_end: Callable[[torch.Tensor], tuple[Any, torch.Tensor, torch.Tensor]] | None = None
    notes: list[str] = field(default_factory=list)
    input_size: tuple[int, int] | None = None  # peers with a fixed input size
    context: Callable[[], Any] = contextlib.nullcontext

    @property
    def label(self) -> str:
        return provider_label(self.name, self.dtype)


_SHORT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def provider_label(name: str, dtype: torch.dtype) -> str:
    """What the table calls a provider: its name ending in the dtype that ran (``hf-sdpa-bf16`` runs float32
    on a CPU by default and is shown as ``hf-sdpa-fp32``; ``fast`` in bf16 is ``fast-bf16``)."""
    short = _SHORT_DTYPES.get(dtype, str(dtype).replace("torch.", ""))
    return f"{re.sub(r'-(fp32|bf16|fp16)$', '', name)}-{short}"


def building_label(name: str, args: argparse.Namespace) -> str:
    """A provider's name before it runs, in the dtype it will run (the fast path's may still be decided)."""
    if name == "hf-eager-fp32" or name == "fast-ref":
        return name
    if name.startswith("hf-"):
        return provider_label(name, args.dtype)
    if name == "fast" and getattr(args, "fast_dtype", None) == "auto" and args.device.type != "cuda":
        return "fast (dtype decided by its plan)"
    if name == "fast":
        return provider_label(name, args.dtype)
    return name


def _hf_config(config: Any, attn: str):
    """transformers' config of ``config``'s model (a VidEoMT on DINOv3: the EoMT-DINOv3 config its modules use)."""
    import transformers

    values = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "extra", "backbone_type", "norm_queries")}
    if config.backbone_family == "dinov3":
        cls = transformers.EomtDinov3Config
    else:
        cls = transformers.EomtConfig if config.model_type == "eomt" else transformers.VideomtConfig
    hf_config = cls(**values)
    hf_config._attn_implementation = attn
    return hf_config


def _hf_videomt_dinov3(config: Any):
    """VidEoMT on DINOv3 from transformers' own modules. transformers has no such class; the research code
    (tue-mps/videomt) builds it from transformers' DINOv3 ViT and runs the VidEoMT query loop around it. Here:
    transformers' EoMT-DINOv3 (the same DINOv3 layers, rotary embedding, final norm and head) with the
    ``query_updater`` Linear, its masked attention off, driven by :func:`_hf_online_step` /
    :func:`_hf_clip_forward`."""
    import transformers

    model = transformers.EomtDinov3ForUniversalSegmentation(_hf_config(config, "eager"))
    model.query_updater = torch.nn.Linear(config.hidden_size, config.hidden_size)
    model.attn_mask_probs.zero_()
    model.videomt_norm_queries = bool(config.norm_queries)
    return model


def _hf_frame_layers(model: Any, frames: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """transformers' embeddings of ``frames`` and the keyword its layers take (DINOv3's rotary tables)."""
    hidden = model.embeddings(frames)
    rope = getattr(model, "rope_embeddings", None)
    return hidden, ({} if rope is None else {"position_embeddings": rope(frames.to(hidden.dtype))})


def _hf_query_layers(model: Any, hidden: torch.Tensor, prev: torch.Tensor | None, extra: dict):
    """One frame through transformers' query layers and head, queries carried (the clip forward's loop body)."""
    query_start = model.num_hidden_layers - model.config.num_blocks
    num_queries = model.config.num_queries
    query = model.query.weight[None].expand(hidden.shape[0], -1, -1)
    if prev is not None:
        query = model.query_updater(prev) + query
    hidden = torch.cat((query, hidden), dim=1)
    for layer in model.layers[query_start:]:
        hidden = layer(hidden, **extra)
    normed = model.layernorm(hidden)
    masks, classes = model.predict(normed)
    carried = normed if getattr(model, "videomt_norm_queries", False) else hidden
    return masks, classes, carried[:, :num_queries]


def _hf_online_step(model: Any) -> Callable:
    """transformers' clip-forward loop body for one frame, on its own modules (queries carried)."""
    query_start = model.num_hidden_layers - model.config.num_blocks

    def step(frame: torch.Tensor, prev: torch.Tensor | None):
        hidden, extra = _hf_frame_layers(model, frame)
        for layer in model.layers[:query_start]:
            hidden = layer(hidden, **extra)
        return _hf_query_layers(model, hidden, prev, extra)

    return step


def _hf_clip_forward(model: Any) -> Callable:
    """A VidEoMT clip forward on transformers' DINOv3 modules (:func:`_hf_videomt_dinov3`), as the research code
    runs it: embeddings and early layers batched over the clip's frames, then frame by frame the query layers
    and the head; rows frame-major, as transformers' VidEoMT returns them."""
    from types import SimpleNamespace

    query_start = model.num_hidden_layers - model.config.num_blocks

    def forward(pixel_values_videos: torch.Tensor):
        batch, frames = pixel_values_videos.shape[:2]
        hidden, extra = _hf_frame_layers(model, pixel_values_videos.flatten(0, 1))
        for layer in model.layers[:query_start]:
            hidden = layer(hidden, **extra)
        hidden = hidden.view(batch, frames, *hidden.shape[1:])
        masks, classes, prev = [], [], None
        for t in range(frames):
            m, c, prev = _hf_query_layers(model, hidden[:, t], prev, extra)
            masks.append(m)
            classes.append(c)
        return SimpleNamespace(masks_queries_logits=torch.cat(masks), class_queries_logits=torch.cat(classes))

    return forward


class Bench:
    """Builds the models for a size and runs the cases."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        self.eomt = args.model == "eomt"
        self.notes: list[str] = []
        self._hf_master: dict[tuple[int, int], Any] = {}
        self._hf_pp = None
        self._fast_pp_cls = None
        self.warnings: list[str] = []  # printed under the table and kept in the JSON
        self.progress: Progress | None = None  # set by run()
        self._optimized: list[Any] = []  # the fast provider's models: their plans go into the JSON

    @property
    def plan(self) -> dict[str, Any] | None:
        """The execution plans the fast provider ran (per op site the implementation chosen, every
        candidate's time and error, exclusions), what failed to load, the CUDA extension's state and a
        CPU's dtype decision; None when no fast row ran. Goes into the JSON as "plan"."""
        if not self._optimized:
            return None
        from videomt_fast import ops
        from videomt_fast.ops import _ext
        from videomt_fast.runtime.fast import plans_of

        return {"plans": [p.to_json() for m in self._optimized for p in plans_of(m)],
                "exclusions": ops.exclusions(), "load_errors": ops.load_errors(),
                "cuda_extension": ("loaded" if _ext.load() is not None else _ext.error())
                if self.device.type == "cuda" else None,
                "cpu_dtype": [m.fast_settings.cpu_dtype_report for m in self._optimized
                              if m.fast_settings.cpu_dtype_report] or None}

    # ------------------------------------------------------------------ the weight source
    def model_config(self, size: tuple[int, int]):
        from videomt_fast.model.configuration import EomtConfig, VideomtConfig, config_from_preset

        args = self.args
        cls = EomtConfig if self.eomt else VideomtConfig
        if args.checkpoint:
            from videomt_fast.model.configuration import EomtDinov3Config
            from videomt_fast.model.loading import checkpoint_model_type

            if self.eomt and checkpoint_model_type(args.checkpoint) == "eomt_dinov3":
                cls = EomtDinov3Config
            return cls.from_pretrained(args.checkpoint)
        square = size[0] == size[1]
        image = size[0] if square else 640
        if args.tiny:
            return cls(**TINY_CONFIG, image_size=image if square else 32)
        return config_from_preset(args.arch, cls, num_labels=args.num_labels, image_size=image)

    @property
    def videomt_dinov3(self) -> bool:
        """VidEoMT on a DINOv3 backbone: transformers' baselines are its DINOv3 modules in the VidEoMT loop."""
        return not self.eomt and self.model_config((32, 32)).backbone_family == "dinov3"

    def masked_blocks(self, size: tuple[int, int]) -> int:
        """Query layers that run masked attention (EoMT with ``attn_mask_probs`` on)."""
        if not self.eomt:
            return 0
        return int((self.hf_master(size).attn_mask_probs > 0).sum())

    def flops(self, size: tuple[int, int], height: int, width: int) -> dict[str, int]:
        config = self.model_config(size)
        return frame_flops(config, height, width, first_frame=self.eomt, masked_blocks=self.masked_blocks(size))

    def hf_master(self, size: tuple[int, int]):
        """transformers' fp32 model on the CPU whose weights every VidEoMT provider copies."""
        import transformers

        config = self.model_config(size)
        key = config.image_hw
        if key not in self._hf_master:
            self._hf_master.clear()
            gc.collect()
            if config.model_type == "eomt_dinov3":
                cls = transformers.EomtDinov3ForUniversalSegmentation
            else:
                cls = (transformers.EomtForUniversalSegmentation if self.eomt
                       else transformers.VideomtForUniversalSegmentation)
            if self.videomt_dinov3:
                torch.manual_seed(self.args.seed)
                model = _hf_videomt_dinov3(config)
                if self.args.checkpoint:  # our save_pretrained folder: transformers' names, query_updater beside
                    from videomt_fast.model.loading import read_state_dict, resolve_checkpoint_dir

                    state = read_state_dict(resolve_checkpoint_dir(self.args.checkpoint))
                    state.setdefault("criterion.empty_weight", model.criterion.empty_weight)
                    model.load_state_dict(state, strict=True)
            elif self.args.checkpoint:
                model = cls.from_pretrained(self.args.checkpoint, dtype=torch.float32)
            else:
                torch.manual_seed(self.args.seed)
                model = cls(_hf_config(config, "eager"))
            if self.eomt and self.args.masked_attention != "model":
                model.attn_mask_probs.fill_(1.0 if self.args.masked_attention == "on" else 0.0)
            self._hf_master[key] = model.eval()
        return self._hf_master[key]

    def lean_model(self, size: tuple[int, int]):
        """A videomt_fast model (float32, CPU) with the weights of :meth:`hf_master`, its own copy."""
        from videomt_fast import from_transformers

        master = self.hf_master(size)
        if self.videomt_dinov3:  # transformers has no class to convert from: its modules' state dict, our config
            from videomt_fast.model.modeling import VideomtForUniversalSegmentation

            state = {k: v.detach().clone() for k, v in master.state_dict().items()}
            return VideomtForUniversalSegmentation.from_pretrained(None, config=self.model_config(size),
                                                                   state_dict=state, strict=True)
        return from_transformers(copy.deepcopy(master))

    # ------------------------------------------------------------------ builders
    def build(self, name: str, size: tuple[int, int]) -> Runner:
        if name.startswith("hf-"):
            return self._build_hf(name, size)
        if name.startswith("fast"):
            return self._build_fast(name, size)
        if name.startswith("ort-"):
            from videomt_fast.apps import bench_ort

            return bench_ort.build(self, name, size)
        if name == "mask2former-swin-t":
            return self._build_mask2former(size)
        if name == "edgetam-video":
            return self._build_edgetam(size)
        raise ValueError(name)

    def _build_hf(self, name: str, size: tuple[int, int]) -> Runner:
        master = self.hf_master(size)
        config = master.config
        if size != (config.image_size, config.image_size):
            raise Skip(
                f"transformers' VidEoMT runs only its config's square image_size "
                f"({config.image_size}x{config.image_size}: fixed position grid), not {size[0]}x{size[1]}"
            )
        attn, dtype = ("eager", torch.float32) if name == "hf-eager-fp32" else ("sdpa", self.args.dtype)
        model = copy.deepcopy(master)
        model.set_attn_implementation(attn)
        model = model.to(device=self.device, dtype=dtype).eval()
        notes = []
        forward = model
        compiled = name == "hf-compile"
        if compiled:
            forward = torch.compile(model, mode=self.args.compile_mode)
            notes.append(f"torch.compile(mode={self.args.compile_mode!r}) of the sdpa model; compile time is in warmup_s")
        backend = {"hf-eager-fp32": "transformers eager", "hf-sdpa-bf16": "transformers sdpa",
                   "hf-compile": "transformers sdpa + torch.compile"}[name]
        if self.eomt:
            return self._eomt_runner(name, dtype, backend, notes, size, lambda images: forward(pixel_values=images),
                                     self.eomt_hf_postprocessor)
        step = _hf_online_step(model)
        if self.videomt_dinov3:  # no transformers class: its DINOv3 modules in the research code's clip loop
            notes.append("transformers has no VidEoMT on DINOv3: its EoMT-DINOv3 modules (DINOv3 layers, rotary "
                         "embedding, head) and a query_updater run the VidEoMT clip loop (research code's structure)")
            forward = _hf_clip_forward(model)
            if compiled:
                forward = torch.compile(forward, mode=self.args.compile_mode)
        if compiled:
            step = torch.compile(step, mode=self.args.compile_mode)

        def offline(clip):
            out = forward(pixel_values_videos=clip.to(dtype))
            return out.masks_queries_logits, out.class_queries_logits

        if self.args.hf_online == "carry":
            def new_online():
                state = {"prev": None}

                def call(frame):
                    masks, classes, prev = step(frame.to(dtype), state["prev"])
                    # a compiled step may replay CUDA graphs that reuse their output buffers: keep a copy
                    state["prev"] = prev.clone() if compiled else prev
                    return masks, classes

                return call
        else:
            notes.append("online: transformers' forward on a one-frame clip per call (queries not carried)")

            def new_online():
                def call(frame):
                    out = forward(pixel_values_videos=frame.to(dtype)[:, None])
                    return out.masks_queries_logits, out.class_queries_logits

                return call

        def end_to_end(frames_uint8):
            pp, _ = self.hf_postprocessor()
            pre = self.preprocess(frames_uint8, size)
            out = forward(pixel_values_videos=pre.to(dtype))
            target = [tuple(frames_uint8.shape[1:3])] * frames_uint8.shape[0]
            results = pp.post_process_instance_segmentation(out, target_sizes=target, threshold=self.args.threshold)
            return results, out.masks_queries_logits, out.class_queries_logits

        return Runner(name, self.args.model, dtype, backend, offline, new_online, end_to_end, notes)

    def _eomt_runner(self, name: str, dtype: torch.dtype, backend: str, notes: list[str], size: tuple[int, int],
                     forward: Callable, postprocessor: Callable[[], Any], context: Callable[[], Any] = contextlib.nullcontext) -> Runner:
        """EoMT: online = one image per call, offline = the clip's frames as one batch of images,
        end-to-end = uint8 images -> processor (resize, pad) -> forward -> panoptic maps."""

        def offline(clip):
            out = forward(clip[0].to(dtype))
            return out.masks_queries_logits, out.class_queries_logits

        def new_online():
            def call(image):
                out = forward(image.to(dtype))
                return out.masks_queries_logits, out.class_queries_logits

            return call

        def end_to_end(images_uint8):
            pre = self.eomt_preprocess(images_uint8, size)
            out = forward(pre.to(dtype))
            target = [tuple(images_uint8.shape[1:3])] * images_uint8.shape[0]
            results = postprocessor().post_process_panoptic_segmentation(
                out, target_sizes=target, threshold=self.args.threshold,
                size={"shortest_edge": size[0], "longest_edge": size[0]},
            )
            return results, out.masks_queries_logits, out.class_queries_logits

        return Runner(name, "eomt", dtype, backend, offline, new_online, end_to_end, notes, context=context)

    def _build_fast(self, name: str, size: tuple[int, int]) -> Runner:
        from videomt_fast import ops

        model = self.lean_model(size).to(self.device)
        notes = []
        context: Callable[[], Any] = contextlib.nullcontext
        if name == "fast-ref":
            dtype = torch.float32
            backend = "videomt_fast reference ops"
            context = functools.partial(ops.use_backend, "reference")
        else:
            from videomt_fast.runtime.fast import plans_of

            # plan the frame step now: calibration (and a CPU's dtype decision) stays out of the timings, and
            # the row names the dtype that really ran; the offline clip's batched early layers get their plan
            # in the warm-up
            model = model.optimize(dtype=getattr(self.args, "fast_dtype", self.args.dtype),
                                   cuda_graphs=self.device.type == "cuda", shapes=[(1, *size)])
            dtype = model.dtype
            built = plans_of(model)
            backend = "videomt_fast optimize(): " + "; ".join(
                f"{p.rows}x{p.size[0]}x{p.size[1]} {p.mode}, fast ops: "
                + (", ".join(sorted({f"{s.op}={s.chosen}" for s in p.sites.values() if s.chosen != "reference"}))
                   or "none") for p in built)
            self._optimized.append(model)
            notes.append(f"execution plans: {backend}")
        model.eval()
        if self.eomt:
            processor = self.eomt_fast_processor(size)
            predictor = model.new_predictor()
            notes.append(f"calls: {predictor!r}")
            return self._eomt_runner(name, dtype, backend, notes, size, predictor, lambda: processor, context)

        def offline(clip):
            out = model(pixel_values_videos=clip)
            return out.masks_queries_logits, out.class_queries_logits

        # one session for all repeats, reset per sequence: a graphed session keeps its captured graphs
        # across reset(), as a user streaming video after video would (capture stays out of the timings)
        session = model.new_session(batch_size=1)
        if name == "fast":
            notes.append(f"online session: {type(session).__name__}")

        def new_online():
            session.reset()

            def call(frame):
                out = session.step(frame)
                return out.masks_queries_logits, out.class_queries_logits

            return call

        def end_to_end(frames_uint8):
            cls, _ = self.fast_processor_cls()
            processor = cls(size={"height": size[0], "width": size[1]})
            pre = processor(frames_uint8[None], device=self.device).pixel_values_videos
            out = model(pixel_values_videos=pre)
            target = [tuple(frames_uint8.shape[1:3])] * frames_uint8.shape[0]
            results = processor.post_process_instance_segmentation(out, target_sizes=target, threshold=self.args.threshold)
            return results, out.masks_queries_logits, out.class_queries_logits

        return Runner(name, self.args.model, dtype, backend, offline, new_online, end_to_end, notes, context=context)

    def _peer_dtype(self) -> torch.dtype:
        return self.args.dtype

    def _build_mask2former(self, size: tuple[int, int]) -> Runner:
        import transformers

        backbone = transformers.SwinConfig(
            image_size=size[0], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        )
        config = transformers.Mask2FormerConfig(backbone_config=backbone, num_labels=self.args.num_labels)
        torch.manual_seed(self.args.seed)
        dtype = self._peer_dtype()
        model = transformers.Mask2FormerForUniversalSegmentation(config).to(self.device, dtype).eval()

        def offline(clip):
            out = model(pixel_values=clip.flatten(0, 1).to(dtype))
            return out.masks_queries_logits, out.class_queries_logits

        def new_online():
            def call(frame):
                out = model(pixel_values=frame.to(dtype))
                return out.masks_queries_logits, out.class_queries_logits

            return call

        notes = ["peer: transformers Mask2Former with a Swin-T backbone (depths 2-2-6-2, 96 channels), random "
                 f"weights, {config.num_queries} queries; image model run per frame (Video Mask2Former's "
                 "per-frame cost); FPS only"]
        return Runner("mask2former-swin-t", "peer", dtype, "transformers", offline, new_online, None, notes)

    def _build_edgetam(self, size: tuple[int, int]) -> Runner:
        import transformers

        config = transformers.EdgeTamVideoConfig()
        native = int(config.vision_config.image_size) if hasattr(config.vision_config, "image_size") else 1024
        torch.manual_seed(self.args.seed)
        dtype = self._peer_dtype()
        model = transformers.EdgeTamVideoModel(config).to(self.device, dtype).eval()
        device = self.device

        def new_online():
            session = transformers.EdgeTamVideoInferenceSession(
                video_height=native, video_width=native, inference_device=device,
                inference_state_device=device, video_storage_device=device, dtype=dtype,
            )
            state = {"first": True}

            def call(frame):
                frame = frame.to(dtype)
                if state["first"]:
                    state["first"] = False
                    idx = session.add_new_frame(frame)
                    obj = session.obj_id_to_idx(1)
                    point = torch.tensor([[[[native / 2, native / 2]]]], dtype=torch.float32)
                    session.add_point_inputs(obj, idx, {"point_coords": point,
                                                        "point_labels": torch.ones(1, 1, 1, dtype=torch.int32)})
                    session.obj_with_new_inputs = [1]
                    out = model(inference_session=session, frame_idx=idx)
                else:
                    out = model(inference_session=session, frame=frame)
                return out.pred_masks, out.object_score_logits

            return call

        notes = [f"peer: transformers EdgeTAM video, random weights, streaming with one point-prompted object; "
                 f"runs at its fixed {native}x{native} input (frames of that size), not {size[0]}x{size[1]}; FPS only"]
        return Runner("edgetam-video", "peer", dtype, "transformers", None, new_online, None, notes,
                      input_size=(native, native))

    # ------------------------------------------------------------------ processors
    def eomt_fast_processor(self, size: tuple[int, int]):
        from videomt_fast.processing.eomt_processor import EomtImageProcessor

        return EomtImageProcessor(size={"shortest_edge": size[0], "longest_edge": size[0]}, do_pad=True)

    def eomt_hf_postprocessor(self):
        """transformers' EoMT image processor (its post-processing; see :mod:`videomt_fast.apps.hf_source`)."""
        if self._hf_pp is None:
            from videomt_fast.apps.hf_source import eomt_image_processor_class

            cls, how = eomt_image_processor_class()
            self._hf_pp = (cls(do_pad=True), how)
        return self._hf_pp[0]

    def eomt_preprocess(self, images_uint8: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """transformers' EoMT pre-processing when its torchvision class runs here, else videomt_fast's
        (the same resize, pad and normalization; see videomt_fast.processing.eomt_processor)."""
        self.eomt_hf_postprocessor()
        if self._hf_pp[1] == "transformers.EomtImageProcessor" and not getattr(self, "_hf_pre_failed", False):
            try:
                batch = self._hf_pp[0](images=list(images_uint8.permute(0, 3, 1, 2)), return_tensors="pt",
                                       size={"shortest_edge": size[0], "longest_edge": size[0]}, do_pad=True,
                                       device=str(self.device))
                return batch["pixel_values"].to(self.device)
            except Exception as exc:  # noqa: BLE001 - fall back to ours, and say so in the notes
                self._hf_pre_failed = True
                self.warnings.append(f"transformers' pre-processing failed ({type(exc).__name__}: {exc}); "
                                     "its end-to-end rows use videomt_fast's pre-processing")
        processor = self.eomt_fast_processor(size)
        return processor(images_uint8, return_tensors="pt", device=self.device)["pixel_values"]

    def hf_postprocessor(self):
        if self._hf_pp is None:
            self._hf_pp = transformers_postprocessor()
        return self._hf_pp

    def fast_processor_cls(self):
        if self._fast_pp_cls is None:
            self._fast_pp_cls = fast_processor()
        if self._fast_pp_cls[0] is None:
            raise Skip(self._fast_pp_cls[1])
        return self._fast_pp_cls

    def preprocess(self, frames_uint8: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """transformers' pre-processing when its processor imports (torchvision), else videomt_fast's
        (the same resize and normalization; see videomt_fast.processing.video_processor)."""
        pp, how = self.hf_postprocessor()
        if how == "transformers.VideomtVideoProcessor" and not getattr(self, "_hf_pre_failed", False):
            try:
                batch = pp(videos=[frames_uint8], size={"height": size[0], "width": size[1]},
                           return_tensors="pt", device=str(self.device))
                return batch["pixel_values_videos"].to(self.device)
            except Exception as exc:  # noqa: BLE001 - fall back to ours, and say so in the notes
                self._hf_pre_failed = True
                self.warnings.append(f"transformers' pre-processing failed ({type(exc).__name__}: {exc}); "
                                     "its end-to-end rows use videomt_fast's pre-processing")
        cls, _ = self.fast_processor_cls()
        return cls(size={"height": size[0], "width": size[1]})(frames_uint8[None], device=self.device).pixel_values_videos


# --------------------------------------------------------------------------------------------
# running the cases


def _inputs(args: argparse.Namespace, shape: tuple[int, ...], device: torch.device, seed: int) -> list[torch.Tensor]:
    """``--num-inputs`` distinct random buffers (normalized-pixel scale), none of them zeros."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device) for _ in range(args.num_inputs)]


def _uint8_inputs(args, frames: int, size: tuple[int, int], device_seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(device_seed)
    h, w = size
    out = []
    for _ in range(args.num_inputs):
        # smooth random images (a coarse noise field upsampled), so masks are not pure salt and pepper
        coarse = torch.rand(frames, 3, max(h // 16, 1), max(w // 16, 1), generator=gen)
        img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        img = (img * 255).round().clamp(1, 255).to(torch.uint8)
        out.append(img.permute(0, 2, 3, 1).contiguous())  # (T, H, W, 3), as a decoder gives them
    return out


class Case:
    """One (provider, mode, size) measurement, in steps so that cases can run one after another or
    interleaved repeat by repeat: :meth:`warm` (warm-up + the untimed agreement call), :meth:`repeat`
    (one timed repeat), :meth:`finish` (the row)."""

    def __init__(self, bench: Bench, runner: Runner, mode: str, size: tuple[int, int]):
        args, device = bench.args, bench.device
        self.bench, self.runner, self.mode, self.size = bench, runner, mode, size
        self.input_hw = runner.input_size or size
        h, w = self.input_hw
        self.row: dict[str, Any] = {
            "provider": runner.name, "label": runner.label, "kind": runner.kind, "mode": mode, "size": f"{size[0]}x{size[1]}",
            "input_size": f"{h}x{w}", "batch": 1, "dtype": str(runner.dtype).replace("torch.", ""),
            "backend": runner.backend, "notes": list(runner.notes),
        }
        agree_frames = args.agree_frames
        if mode == "online":
            if runner.new_online is None:
                raise Skip("no online API")
            frames = args.online_frames
            self.clips = _inputs(args, (1, frames, 3, h, w), device, args.seed + 1)

            def one(clip, timer=None):
                step = runner.new_online()
                masks, classes = [], []
                for t in range(frames):
                    with (timer() if timer is not None else contextlib.nullcontext()):
                        m, c = step(clip[:, t])
                    if len(masks) < agree_frames:  # copies (untimed): compiled or graphed steps reuse buffers
                        masks.append(m.clone())
                        classes.append(c.clone())
                return torch.cat(masks), torch.cat(classes)

            self.row.update(frames_per_call=1, latency_unit="frame", frames_per_repeat=frames)
        elif mode == "offline":
            if runner.offline is None:
                raise Skip("no clip API (streaming model)")
            frames = args.frames
            self.clips = _inputs(args, (1, frames, 3, h, w), device, args.seed + 2)

            def one(clip, timer=None):
                with (timer() if timer is not None else contextlib.nullcontext()):
                    m, c = runner.offline(clip)
                return m[:agree_frames], c[:agree_frames]

            self.row.update(frames_per_call=frames, latency_unit="clip", frames_per_repeat=frames)
        else:
            if runner.end_to_end is None:
                raise Skip("no end-to-end path (peer)")
            frames = args.e2e_frames
            # decoded frames live on the host, as a decoder hands them over; the copy is part of the cost
            self.clips = _uint8_inputs(args, frames, args.e2e_size, args.seed + 3)

            def one(clip, timer=None):
                with (timer() if timer is not None else contextlib.nullcontext()):
                    results, m, c = runner.end_to_end(clip)
                    maps = torch.stack([r["segmentation"] for r in results])
                return m[:agree_frames], c[:agree_frames], maps[:agree_frames]

            self.row.update(frames_per_call=frames, latency_unit="clip", frames_per_repeat=frames,
                            e2e_frame_size=f"{args.e2e_size[0]}x{args.e2e_size[1]}", threshold=args.threshold)
        self.frames = frames
        self.one = one
        self.timer = Timer(device)
        self.outputs: Outputs | None = None

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(self.runner.context())
        return stack

    def warm(self) -> None:
        args, device = self.bench.args, self.bench.device
        with self._context():
            started = time.perf_counter()
            for i in range(args.warmup):
                self.one(self.clips[i % len(self.clips)])
            _sync(device)
            self.row["warmup_s"] = round(time.perf_counter() - started, 4)
            kept = self.one(self.clips[0])  # outputs for agreement (untimed)
            self.outputs = _keep(kept[0], kept[1], args.agree_frames, kept[2] if len(kept) > 2 else None)

    def repeat(self, r: int) -> None:
        nvtx = self.bench.device.type == "cuda"
        with self._context():
            if nvtx:
                torch.cuda.nvtx.range_push(f"{self.runner.name}/{self.mode}/{r}")
            self.one(self.clips[(r + 1) % len(self.clips)], self.timer)
            if nvtx:
                torch.cuda.nvtx.range_pop()

    def finish(self, reference: Outputs | None) -> dict[str, Any]:
        args, row, frames = self.bench.args, self.row, self.frames
        times = self.timer.milliseconds()
        repeats = len(times) // (frames if self.mode == "online" else 1)
        if self.mode == "online":
            # per-frame latencies; FPS from each repeat's whole sequence
            seq = [sum(times[i * frames:(i + 1) * frames]) for i in range(repeats)]
            fps_values = [frames * 1e3 / t for t in seq]
        else:
            fps_values = [frames * 1e3 / t for t in times]
        fps = percentile(fps_values, 50)
        row.update(
            repeats=repeats, warmup=args.warmup, fps=fps, fps_min=min(fps_values), fps_max=max(fps_values),
            fps_spread=(max(fps_values) - min(fps_values)) / (2 * fps),
            latency_ms_p50=percentile(times, 50), latency_ms_p90=percentile(times, 90), latency_ms_min=min(times),
            frame_ms_p50=1e3 / fps,
        )
        if self.runner.kind != "peer":
            h, w = self.input_hw
            flops = self.bench.flops(self.size, h, w)["total"]
            row["gflop_per_frame"] = flops / 1e9
            row["achieved_tflops"] = flops * fps / 1e12
            row["mfu"] = mfu(flops, fps, args.peak_tflops)
            if self.runner.name == REFERENCE:
                row["agreement"] = {"reference": "itself"}
            elif reference is not None:
                map_key = "panoptic_map" if self.bench.eomt else "instance_map"
                row["agreement"] = agreement(self.outputs, reference, map_key)
        row["status"] = "ok"
        return row


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _clock(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"


def case_frames(args: argparse.Namespace, mode: str) -> int:
    """Frames one call sequence of ``mode`` processes (the unit of work for the ETA)."""
    return {"online": args.online_frames, "offline": args.frames, "end-to-end": args.e2e_frames}[mode]


class Progress:
    """Progress lines on stderr: what runs now, the time so far, and an ETA from the frames processed so
    far (every case of every provider counts its warm-up, agreement and timed frames)."""

    def __init__(self, args: argparse.Namespace, cases: int, stream: Any = None, clock: Callable[[], float] | None = None):
        self.args = args
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock or time.perf_counter
        per_case = sum(case_frames(args, m) for m in args.modes) / max(len(args.modes), 1)
        self.total = cases * per_case * (args.warmup + 1 + args.repeats)
        self.done = 0.0
        self.started = self.clock()
        self.work_started: float | None = None  # the first case: building the shared weights is not a rate

    def units(self, mode: str, calls: int) -> float:
        return calls * case_frames(self.args, mode)

    def drop(self, mode: str) -> None:
        """A case that will not run (skipped provider or mode): take its work out of the total."""
        self.total -= self.units(mode, self.args.warmup + 1 + self.args.repeats)

    def advance(self, units: float) -> None:
        self.done += units

    def say(self, what: str, case: bool = True) -> None:
        now = self.clock()
        elapsed = now - self.started
        if case and self.work_started is None:
            self.work_started = now
        if self.done > 0 and self.work_started is not None:
            left = max(self.total - self.done, 0.0) * (now - self.work_started) / self.done
            eta = f"ETA {_clock(left)}"
        else:
            eta = "ETA after the first case"
        share = 100.0 * self.done / self.total if self.total > 0 else 100.0
        print(f"  [{share:3.0f}%] {what:48s} {_clock(elapsed)} elapsed, {eta}", file=self.stream, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    bench.load_start = _load()
    names_by_size = []
    for size in args.sizes:
        names = list(args.providers)
        if REFERENCE in names:  # the reference goes first so every other row can be compared with it
            names.remove(REFERENCE)
            names.insert(0, REFERENCE)
        names_by_size.append((size, names + list(args.peers)))
    bench.progress = Progress(args, sum(len(names) for _, names in names_by_size) * len(args.modes))
    rows: list[dict[str, Any]] = []
    for size, names in names_by_size:
        if any(n.startswith(("hf-", "fast", "ort-")) for n in names):
            bench.progress.say(f"building the shared weights ({size[0]}x{size[1]})", case=False)
            bench.hf_master(size)  # the shared CPU weight source exists before any provider's memory is probed
        if args.interleave:
            rows += _run_interleaved(bench, names, size)
        else:
            rows += _run_sequential(bench, names, size)
    for row in rows:
        if row["kind"] == "model":  # rows of providers that never built
            row["kind"] = args.model
    _add_speedups(rows)
    return _report(args, bench, rows)


def _build_or_rows(bench: Bench, name: str, size: tuple[int, int]) -> tuple[Runner | None, list[dict[str, Any]]]:
    try:
        return bench.build(name, size), []
    except Skip as exc:
        rows = [_skipped(name, mode, size, str(exc)) for mode in bench.args.modes]
    except Exception as exc:  # noqa: BLE001 - a provider that cannot be built is a row, not a crash
        why = f"build failed: {type(exc).__name__}: {exc}"
        rows = [_skipped(name, mode, size, why, "error") for mode in bench.args.modes]
    for mode in bench.args.modes:
        bench.progress.drop(mode)
    return None, rows


def _case_error(name: str, mode: str, size: tuple[int, int], exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, Skip):
        return _skipped(name, mode, size, str(exc))
    return _skipped(name, mode, size, f"{type(exc).__name__}: {exc}", "error")


def _run_sequential(bench: Bench, names: list[str], size: tuple[int, int]) -> list[dict[str, Any]]:
    """One provider at a time, built fresh and freed after its cases; peak memory per case."""
    rows: list[dict[str, Any]] = []
    references: dict[str, Outputs] = {}
    progress, args = bench.progress, bench.args
    for name in names:
        memory = MemoryProbe(bench.device)
        memory.start()
        progress.say(f"building {building_label(name, args)} ({size[0]}x{size[1]})", case=False)
        runner, skipped = _build_or_rows(bench, name, size)
        rows += skipped
        if runner is None:
            continue
        for mode in args.modes:
            progress.say(f"{runner.label} {mode} {size[0]}x{size[1]}")
            memory.reset_peak()
            try:
                case = Case(bench, runner, mode, size)
                case.warm()
                for r in range(args.repeats):
                    case.repeat(r)
                row = case.finish(references.get(mode))
                row["peak_mem_mb"], row["peak_mem_kind"] = memory.peak_mb(), memory.kind
                if name == REFERENCE:
                    references[mode] = case.outputs
                progress.advance(progress.units(mode, args.warmup + 1 + args.repeats))
            except Exception as exc:  # noqa: BLE001 - a failing case is a row, not a crash
                row = _case_error(name, mode, size, exc)
                progress.drop(mode)
            rows.append(row)
            case = None
        del runner
        gc.collect()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _run_interleaved(bench: Bench, names: list[str], size: tuple[int, int]) -> list[dict[str, Any]]:
    """Every provider built at once, then repeat r of every case before repeat r+1 of any: on a shared
    or throttling machine, slow spells hit all providers alike. Peak memory is not measured here."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    cases: list[Case] = []
    progress, args = bench.progress, bench.args
    for name in names:
        progress.say(f"building {building_label(name, args)} ({size[0]}x{size[1]})", case=False)
        runner, skipped = _build_or_rows(bench, name, size)
        for row in skipped:
            rows[(name, row["mode"])] = row
        if runner is None:
            continue
        for mode in args.modes:
            progress.say(f"{runner.label} {mode} {size[0]}x{size[1]} warm-up")
            try:
                case = Case(bench, runner, mode, size)
                case.warm()
                cases.append(case)
                progress.advance(progress.units(mode, args.warmup + 1))
            except Exception as exc:  # noqa: BLE001
                rows[(name, mode)] = _case_error(name, mode, size, exc)
                progress.drop(mode)
    for r in range(args.repeats):
        progress.say(f"timed repeat {r + 1}/{args.repeats} of {len(cases)} cases ({size[0]}x{size[1]})")
        for case in list(cases):
            try:
                case.repeat(r)
                progress.advance(progress.units(case.mode, 1))
            except Exception as exc:  # noqa: BLE001
                rows[(case.runner.name, case.mode)] = _case_error(case.runner.name, case.mode, size, exc)
                cases.remove(case)
                progress.advance(progress.units(case.mode, args.repeats - r))
    references = {c.mode: c.outputs for c in cases if c.runner.name == REFERENCE}
    for case in cases:
        row = case.finish(references.get(case.mode))
        row["peak_mem_mb"], row["peak_mem_kind"] = None, "not measured (interleaved run)"
        rows[(case.runner.name, case.mode)] = row
    return [rows[(n, m)] for n in names for m in args.modes if (n, m) in rows]


def _skipped(name: str, mode: str, size: tuple[int, int], why: str, status: str = "skipped") -> dict[str, Any]:
    return {"provider": name, "label": name, "kind": "peer" if name in PEERS else "model", "mode": mode,
            "size": f"{size[0]}x{size[1]}", "status": status, "reason": why}


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup[b]`` = this row's FPS over baseline ``b``'s FPS in the same mode and size."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        row["speedup"] = {}
        for base in rows:
            if (base.get("status") == "ok" and base["provider"] in BASELINES and base["mode"] == row["mode"]
                    and base["size"] == row["size"] and base["input_size"] == row["input_size"]):
                row["speedup"][base["provider"]] = row["fps"] / base["fps"]


# --------------------------------------------------------------------------------------------
# environment and report


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    from videomt_fast import __version__

    env: dict[str, Any] = {
        "device_type": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "videomt_fast": __version__,
        "git_commit": _git_commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=torch.cuda.get_device_name(device),
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda_runtime=torch.version.cuda,
            driver=_nvidia_driver(),
        )
    else:
        env.update(device_name=f"CPU: {env['cpu']} ({os.cpu_count()} cores visible)", driver=None)
    return env


def _report(args: argparse.Namespace, bench: Bench, rows: list[dict[str, Any]]) -> dict[str, Any]:
    config = bench.model_config(args.sizes[0])
    config_dict = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id", "extra")}
    flop_model = {
        f"{h}x{w}": {k: v / 1e9 for k, v in bench.flops((h, w), h, w).items()} for h, w in args.sizes
    }
    notes = list(bench.notes)
    if bench.eomt:
        masked = bench.masked_blocks(args.sizes[0])
        notes.append(
            "EoMT: online = batch 1, one image per call; offline = the frames as one batch of images; fps = images/s. "
            f"Masked attention in {masked} of {config.num_blocks} query layers "
            f"({'as the model has it' if args.masked_attention == 'model' else '--masked-attention ' + args.masked_attention})"
        )
    else:
        notes.append(
            "online: batch 1, one frame per call, queries carried; fps = frames / time of each repeat's sequence "
            "(median); latency percentiles are per frame"
        )
    if args.interleave:
        notes.append("interleaved: all providers built first, repeat r of every case before repeat r+1 of any "
                     "(a shared machine's slow spells hit all alike); peak memory not measured")
    notes.append("offline and end-to-end: one clip per call; fps = clip frames / clip time (median); latency per clip")
    if not bench.eomt and ("hf-eager-fp32" in args.providers or "hf-sdpa-bf16" in args.providers):
        notes.append(
            "transformers online = " + (
                "its own modules frame by frame, the loop body of its clip forward, raw last-layer query rows "
                "carried into query_updater (cost: its one-frame forward + one d x d Linear)"
                if args.hf_online == "carry" else
                "its forward on a one-frame clip per call (queries not carried, so frames after the first differ)"
            )
        )
    if "end-to-end" in args.modes:
        what, task = ("images", "panoptic") if bench.eomt else ("frames", "instance")
        notes.append(
            f"end-to-end: uint8 {args.e2e_size[0]}x{args.e2e_size[1]} {what} on the host in, "
            f"{task} maps at that size out (threshold {args.threshold}); pre-processing, forward and "
            f"post_process_{task}_segmentation timed together"
        )
        if bench._hf_pp is not None:
            notes.append(f"transformers end-to-end: post-processing by {bench._hf_pp[1]}")
            if not bench._hf_pp[1].startswith("transformers.") or getattr(bench, "_hf_pre_failed", False):
                notes.append("transformers end-to-end: pre-processing by videomt_fast's processor (transformers' "
                             "needs torchvision; ours gives the same resized uint8 values)")
    warnings = list(bench.warnings)
    load_end = _load()
    busy = [(when, load[0]) for when, load in (("start", getattr(bench, "load_start", None)), ("end", load_end))
            if load and load[0] > (os.cpu_count() or 1) * 0.75]
    if bench.device.type == "cpu" and busy:
        when = " and ".join(f"{load} at the {w}" for w, load in busy)
        warnings.append(f"the machine was busy (1-minute load {when}, {os.cpu_count()} cores): CPU timings are "
                        "slow and noisy; compare ratios with the rows' spread" +
                        ("" if args.threads == 1 and args.interleave else " (--threads 1 and --interleave steady them)"))
    noisy = [r for r in rows if r.get("status") == "ok" and r.get("fps_spread", 0) > NOISY_SPREAD]
    if noisy:
        worst = max(noisy, key=lambda r: r["fps_spread"])
        warnings.append(f"{len(noisy)} row(s) varied more than ±{NOISY_SPREAD:.0%} between repeats (worst: "
                        f"{worst['label']} {worst['mode']} ±{worst['fps_spread']:.0%}); a speed-up within the "
                        "spread of its two rows is noise (more --repeats steady the median)")
    for row in rows:
        if (row.get("agreement") or {}).get("nonfinite"):
            warnings.append(f"{row['label']} {row['mode']} {row['size']}: non-finite outputs or errors in the agreement")
        if row.get("status") == "error":
            warnings.append(f"{row['label']} {row['mode']} {row['size']} failed: {row['reason']}")
    if not args.checkpoint:
        notes.append("random weights: class logits are nearly tied, so class_argmax agreement of low-precision "
                     "rows understates what a trained checkpoint gives")
    if args.peak_tflops is None:
        notes.append("mfu is null: no peak FLOP/s for this device (pass --peak-tflops)")
    notes.append("agreement: against hf-eager-fp32 on the same input, first agree_frames frames: mask_sign = fraction "
                 "of mask-logit pixels of equal sign, class_argmax = fraction of queries with the same argmax class")
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "videomt_fast.apps.benchmark",
        "argv": list(getattr(args, "argv", [])),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "environment": {**environment(bench.device), "load_avg_1_5_15_start": getattr(bench, "load_start", None),
                        "load_avg_1_5_15_end": load_end},
        "model": args.model,
        "arch": args.arch,
        "checkpoint": args.checkpoint,
        "weights": "checkpoint" if args.checkpoint else f"random (seed {args.seed}), shared by all {args.model} providers",
        "config": config_dict,
        "dtype": str(args.dtype).replace("torch.", ""),
        "modes": args.modes,
        "sizes": [f"{h}x{w}" for h, w in args.sizes],
        "settings": {
            "frames": args.frames, "online_frames": args.online_frames, "e2e_frames": args.e2e_frames,
            "e2e_size": f"{args.e2e_size[0]}x{args.e2e_size[1]}", "warmup": args.warmup, "repeats": args.repeats,
            "num_inputs": args.num_inputs, "agree_frames": args.agree_frames, "hf_online": args.hf_online,
            "compile_mode": args.compile_mode, "threshold": args.threshold,
            "timer": "cuda events" if bench.device.type == "cuda" else "time.perf_counter",
            "interleaved": args.interleave,
        },
        "peak_tflops": args.peak_tflops,
        "flop_model_gflop_per_frame": flop_model,
        "plan": bench.plan,
        "notes": notes,
        "warnings": warnings,
        "rows": rows,
    }


def results_dir() -> str:
    """Where benchmark JSON goes unless asked otherwise: ``$VIDEOMT_FAST_RESULTS_DIR``, else
    ``$XDG_CACHE_HOME/videomt_fast/results`` (``~/.cache/...``): never into the working tree."""
    explicit = os.environ.get("VIDEOMT_FAST_RESULTS_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "videomt_fast", "results")


def result_path(args: argparse.Namespace, report: dict[str, Any]) -> str:
    env = report["environment"]
    device = env["device_name"] if env["device_type"] == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:40] or "device"
    arch = args.arch or os.path.basename(os.path.normpath(str(args.checkpoint))) or "checkpoint"
    if args.model == "eomt" and not arch.startswith("eomt"):
        arch = f"eomt-{arch}"
    modes = "+".join(m.replace("end-to-end", "e2e") for m in args.modes)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(args.out_dir or results_dir(), f"{arch}_{modes}_{slug}_{stamp}.json")


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        from videomt_fast.model.loading import _umask

        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _agree(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: (row.get("agreement") or {}).get(key)


def _speedup(base: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: (row.get("speedup") or {}).get(base)


def _spread(row: dict[str, Any]) -> str | None:
    spread = row.get("fps_spread")
    return None if spread is None or not math.isfinite(spread) else f"±{spread:.0%}"


# (header, value of an "ok" row, format, legend). Columns empty in every row (e.g. MFU and memory on a
# CPU, x compile without hf-compile) are left out of the table and of its legend.
COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], Any], str, str], ...] = (
    ("provider", lambda r: r["label"] + (" (peer)" if r["kind"] == "peer" else ""), "",
     "hf-* = transformers (eager attention, SDPA, torch.compile), fast-ref = videomt_fast on its reference "
     "ops, fast = videomt_fast after optimize(), ort-* = the exported ONNX graphs on ONNX Runtime (--ort); the suffix is "
     "the dtype that ran"),
    ("mode", lambda r: r["mode"], "",
     "online = one frame per call, queries carried; offline = one clip per call; end-to-end = uint8 frames "
     "in, segmentation maps out (pre- and post-processing timed)"),
    ("size", lambda r: r["size"], "", "model input height x width"),
    ("FPS", lambda r: r["fps"], ".2f", "frames (EoMT: images) per second, median over the timed repeats"),
    ("spread", _spread, "",
     "half the min-max range of the repeats' FPS, relative to FPS: a ratio within the spread of its two rows is noise"),
    ("p50 ms", lambda r: r["latency_ms_p50"], ".2f", "median latency of one call (online: a frame; otherwise a clip)"),
    ("p90 ms", lambda r: r["latency_ms_p90"], ".2f", "90th percentile latency of one call"),
    ("x eager", _speedup("hf-eager-fp32"), ".2f", "FPS over the hf-eager-fp32 row's (same mode and size)"),
    ("x sdpa", _speedup("hf-sdpa-bf16"), ".2f", "FPS over the hf-sdpa row's (its dtype as in its label)"),
    ("x compile", _speedup("hf-compile"), ".2f", "FPS over the hf-compile row's"),
    ("MFU", lambda r: r.get("mfu"), ".1%", "model FLOP/s (DESIGN.md FLOP model) over the device's peak (--peak-tflops)"),
    ("mem MB", lambda r: r.get("peak_mem_mb"), ".0f", "peak memory of the case (CUDA allocated, or CPU peak RSS rise)"),
    ("mask agree", _agree("mask_sign"), ".4f",
     "fraction of mask-logit pixels whose sign equals hf-eager-fp32's on the same input"),
    ("cls agree", _agree("class_argmax"), ".3f", "fraction of queries whose argmax class equals hf-eager-fp32's"),
    ("map agree", lambda r: _agree("instance_map")(r) if _agree("instance_map")(r) is not None
     else _agree("panoptic_map")(r), ".4f",
     "end-to-end: fraction of pixels of the instance (EoMT: panoptic) maps equal to hf-eager-fp32's"),
)


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) if spec else str(value)


def format_table(report: dict[str, Any], legend: bool = True) -> str:
    """The rows as an aligned table, a legend of the columns shown, then the warnings."""
    rows = report["rows"]
    ok = [r for r in rows if r.get("status") == "ok"]
    columns = [c for i, c in enumerate(COLUMNS) if i < 4 or any(c[1](r) is not None for r in ok)]
    cells = [[_cell(get(r), spec) for _, get, spec, _ in columns] for r in ok]
    widths = [max([len(c[0])] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    label_width = max([widths[0]] + [len(r.get("label", r["provider"])) for r in rows])
    widths[0] = label_width

    def line(values: list[str]) -> str:
        parts = [v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return "  ".join(parts).rstrip()

    env = report["environment"]
    settings = report.get("settings", {})
    head = line([c[0] for c in columns])
    out = [f"device: {env['device_name']}   model: {report.get('model', 'videomt')}   "
           f"arch: {report['arch'] or report['checkpoint']}   torch threads: {env.get('torch_threads')}   "
           f"repeats: {settings.get('repeats')}", head, "-" * len(head)]
    cell_iter = iter(cells)
    for row in rows:
        if row.get("status") == "ok":
            out.append(line(next(cell_iter)))
        else:
            fixed = line([row.get("label", row["provider"]), row["mode"], row["size"]])
            out.append(f"{fixed}  {row['status']}: {row['reason']}")
    if legend:
        out.append("")
        for name, _, _, text in columns:
            out += textwrap.wrap(text, 110, initial_indent=f"  {name:10s} ", subsequent_indent=" " * 13)
    for warning in report.get("warnings", []):
        out.append(f"warning: {warning}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    torch.manual_seed(args.seed)
    report = run(args)
    print(format_table(report))
    if not args.no_save:
        path = os.path.abspath(result_path(args, report))
        write_json_atomic(path, report)
        print(f"results: {path}\n  (every row, setting and note, and the environment; --out-dir DIR to put it "
              "elsewhere, --no-save to skip)")
    failed = [r for r in report["rows"] if r.get("status") == "error" and r["kind"] != "peer"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
