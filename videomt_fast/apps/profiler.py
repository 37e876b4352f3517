"""``videomt-fast profile``: where one frame's time goes, stage by stage.

Runs a stream frame by frame (batch 1, queries carried, as a session does) and times each stage of
every frame: patch embedding, the query-free early layers, the query layers (query update, layers,
final norm), the head with the upscale path, and instance post-processing to the video's own size.
Stages are timed with CUDA events on a GPU (one sync at the end) and ``time.perf_counter`` on a CPU;
on a GPU each stage is also an NVTX range (for Nsight Systems). ``--trace out.json`` adds a
``torch.profiler`` Chrome trace of a few more frames, every stage a labelled range.

The stages run eagerly, one after another; the whole ``session.step`` (CUDA graphs when the model was
optimized with them) is timed separately and shown beside their sum.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch

from videomt_fast.apps.benchmark import (
    Bench,
    Timer,
    add_model_arguments,
    _size,
    environment,
    fast_processor,
    frame_flops,
    percentile,
    resolve_model_arguments,
    write_json_atomic,
)

STAGES = ("patch_embed", "early_layers", "query_layers", "head_upscale", "postprocess")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videomt-fast profile", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--size", type=_size, default=None, metavar="HxW",
                   help="model input size (default 640x640 on CUDA, 224x224 on CPU)")
    p.add_argument("--provider", choices=("fast", "fast-ref"), default="fast",
                   help="fast: model.optimize() (default); fast-ref: float32, reference ops")
    p.add_argument("--frames", type=int, default=None, help="timed frames (default 100 on CUDA, 6 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed frames first (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--target-size", type=_size, default=None, metavar="HxW",
                   help="post-processing output size (default 720x1280 on CUDA, 180x320 on CPU)")
    p.add_argument("--threshold", type=float, default=None,
                   help="instance threshold (default 0.5 with --checkpoint, 0.0 with random weights)")
    p.add_argument("--no-postprocess", action="store_true", help="leave post-processing out")
    p.add_argument("--trace", default=None, metavar="PATH", help="write a torch.profiler Chrome trace here")
    p.add_argument("--trace-frames", type=int, default=3, help="frames in the trace (default 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON here")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    cuda = resolve_model_arguments(parser, args)
    args.size = args.size or ((32, 32) if args.tiny else (640, 640) if cuda else (224, 224))
    args.frames = args.frames if args.frames is not None else (100 if cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.target_size = args.target_size or ((720, 1280) if cuda else ((48, 64) if args.tiny else (180, 320)))
    if args.threshold is None:
        args.threshold = 0.5 if args.checkpoint else 0.0
    if args.frames < 1 or args.trace_frames < 1 or args.warmup < 0:
        parser.error("--frames and --trace-frames must be >= 1, --warmup >= 0")
    return args


def build_model(args: argparse.Namespace):
    """The videomt_fast model to profile: the benchmark's weights (random through transformers, or the checkpoint)."""
    source = Bench(argparse.Namespace(**{**vars(args), "model": "videomt", "masked_attention": "model"}))
    model = source.lean_model(args.size).to(args.device)
    if args.provider == "fast":
        from videomt_fast.runtime.fast import current_plan

        model = model.optimize(dtype=getattr(args, "fast_dtype", args.dtype), cuda_graphs=args.device.type == "cuda",
                               shapes=[(1, *args.size)])
        current_plan(model, 1, tuple(args.size))  # the stages below call the plan's implementations
    return model.eval(), []


def _plan_json(model) -> list[dict] | None:
    """The execution plans the profiled model ran (None for the reference provider)."""
    from videomt_fast.runtime.fast import plans_of

    return [p.to_json() for p in plans_of(model)] or None


class StageClock:
    """Marks stage boundaries of one frame: CUDA events (GPU) or perf_counter (CPU), plus NVTX ranges on
    a GPU and ``record_function`` labels for torch.profiler everywhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.frames: list[list[tuple[str, Any, Any]]] = []
        self._current: list[tuple[str, Any, Any]] | None = None

    def new_frame(self) -> None:
        self._current = []
        self.frames.append(self._current)

    @contextlib.contextmanager
    def stage(self, name: str):
        assert self._current is not None, "call new_frame() first"
        if self.cuda:
            torch.cuda.nvtx.range_push(name)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            if self.cuda:
                end.record()
                torch.cuda.nvtx.range_pop()
            else:
                end = time.perf_counter()
            self._current.append((name, start, end))

    def milliseconds(self) -> list[dict[str, float]]:
        if self.cuda:
            torch.cuda.synchronize()
            return [{n: s.elapsed_time(e) for n, s, e in frame} for frame in self.frames]
        return [{n: (e - s) * 1e3 for n, s, e in frame} for frame in self.frames]


def _frame_fn(model, processor, args) -> Callable[[torch.Tensor, Any, StageClock | None], tuple[Any, Any, Any]]:
    """One frame through the stages, computing exactly what ``session.step`` computes (tests/test_bench.py
    checks outputs and ops); returns ``(mask logits, class logits, queries to carry)``."""
    from videomt_fast import ops

    grid = model.grid_for(*args.size)
    split = hasattr(model, "_new_token_buffer") and hasattr(model, "_final_norm")
    target = [tuple(args.target_size)]

    def stage(clock, name):
        return clock.stage(name) if clock is not None else contextlib.nullcontext()

    def frame(x: torch.Tensor, prev: Any, clock: StageClock | None):
        if clock is not None:
            clock.new_frame()
        with stage(clock, "patch_embed"):
            hidden = model.embeddings(x)
            rope = model.rope(grid)  # DINOv3's rotary tables (cached per grid), else None
        with stage(clock, "early_layers"):
            for layer in model.layers[: model.query_start]:
                hidden = layer(hidden, rope=rope)
        if split:
            with stage(clock, "query_layers"):
                tokens = model._new_token_buffer(hidden)
                ops.call("query_update", tokens, model.query.weight, prev, model.query_updater.weight,
                         model.query_updater.bias)
                for layer in model.layers[model.query_start:]:
                    tokens = layer(tokens, rope=rope)
                sequence = model._final_norm(tokens)
                queries = (sequence if model.config.norm_queries else tokens)[:, : model.config.num_queries]
            with stage(clock, "head_upscale"):
                masks, classes = model.predict(sequence, grid)
        else:  # a model without the split points: query layers and head as one stage
            with stage(clock, "query_layers+head"):
                masks, classes, sequence, queries = model.query_step(hidden, prev, grid)
        if processor is not None:
            with stage(clock, "postprocess"):
                processor.post_process_instance_segmentation(
                    {"class_queries_logits": classes, "masks_queries_logits": masks}, target_sizes=target,
                    threshold=args.threshold)
        return masks, classes, queries

    return frame


def profile(args: argparse.Namespace) -> dict[str, Any]:
    from videomt_fast import ops
    from videomt_fast.runtime.fast import session_step_kind

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    model, notes = build_model(args)
    processor = None
    if not args.no_postprocess:
        cls, how = fast_processor()
        if cls is None:
            notes.append(f"post-processing left out: {how}")
        else:
            processor = cls()
    gen = torch.Generator().manual_seed(args.seed + 1)
    h, w = args.size
    frames = [torch.randn(1, 3, h, w, generator=gen).to(device) for _ in range(max(args.frames, 4))]
    context = ops.use_backend("reference") if args.provider == "fast-ref" else contextlib.nullcontext()
    step_fn = _frame_fn(model, processor, args)
    with torch.inference_mode(), context:
        prev = None
        for i in range(args.warmup):
            prev = step_fn(frames[i % len(frames)], prev, None)[2]
        clock = StageClock(device)
        prev = None
        for i in range(args.frames):
            prev = step_fn(frames[i % len(frames)], prev, clock)[2]
        per_frame = clock.milliseconds()

        # the whole session step (graph-captured when the model was optimized that way), for comparison
        session = model.new_session(batch_size=1)
        for i in range(args.warmup):
            session.step(frames[i % len(frames)])
        session.reset()
        timer = Timer(device)
        for i in range(args.frames):
            with timer():
                session.step(frames[i % len(frames)])
        step_ms = timer.milliseconds()

        trace_path = None
        if args.trace:
            trace_path = _write_trace(args, step_fn, frames)

    names = list(per_frame[0])
    stages = {}
    for name in names:
        values = [f[name] for f in per_frame]
        stages[name] = {"median_ms": percentile(values, 50), "p90_ms": percentile(values, 90),
                        "mean_ms": sum(values) / len(values)}
    total = sum(s["median_ms"] for s in stages.values())
    for s in stages.values():
        s["percent"] = 100.0 * s["median_ms"] / total if total > 0 else float("nan")
    flops = frame_flops(model.config, h, w)
    return {
        "tool": "videomt_fast.apps.profiler",
        "environment": environment(device),
        "arch": args.arch,
        "checkpoint": args.checkpoint,
        "provider": args.provider,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "size": f"{h}x{w}",
        "postprocess_target_size": None if processor is None else f"{args.target_size[0]}x{args.target_size[1]}",
        "threshold": args.threshold,
        "frames": args.frames,
        "warmup": args.warmup,
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "stages": stages,
        "plan": _plan_json(model),
        "sum_of_stages_ms": total,
        "session_step": session_step_kind(model),
        "session_step_ms_median": percentile(step_ms, 50),
        "session_step_ms_p90": percentile(step_ms, 90),
        "gflop_per_frame": {k: v / 1e9 for k, v in flops.items()},
        "trace": trace_path,
        "notes": notes + [
            "stages run eagerly with a boundary between each; session_step excludes post-processing",
            "median per stage over the timed frames; percent = stage median / sum of stage medians",
        ],
    }


def _write_trace(args: argparse.Namespace, step_fn, frames) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if args.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    clock = StageClock(args.device)  # labels + NVTX for the traced frames too
    with warnings.catch_warnings(), torch_profile(activities=activities) as prof:
        # one profiling cycle, so "events are cleared at the end of each cycle" (torch 2.11) says nothing
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        prev = None
        for i in range(args.trace_frames):
            with torch.profiler.record_function(f"frame_{i}"):
                prev = step_fn(frames[i % len(frames)], prev, clock)[2]
        if args.device.type == "cuda":
            torch.cuda.synchronize()
    path = os.path.abspath(args.trace)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"device: {report['environment']['device_name']}   arch: {report['arch'] or report['checkpoint']}   "
        f"provider: {report['provider']} ({report['dtype']})   size: {report['size']}   frames: {report['frames']}",
        f"{'stage':20s} {'median ms':>10s} {'p90 ms':>10s} {'%':>7s} {'GFLOP':>9s}",
        "-" * 60,
    ]
    gflop = report["gflop_per_frame"]
    stage_flops = {
        "patch_embed": gflop["patch_embed"],
        "early_layers": gflop["early_layers"],
        "query_layers": gflop["query_update"] + gflop["query_layers"],
        "head_upscale": gflop["head"] + gflop["upscale"] + gflop["mask_einsum"],
    }
    for name, s in report["stages"].items():
        f = stage_flops.get(name)
        lines.append(f"{name:20s} {s['median_ms']:10.3f} {s['p90_ms']:10.3f} {s['percent']:6.1f}% "
                     f"{(format(f, '9.3f') if f is not None else '-'):>9s}")
    lines.append("-" * 60)
    lines.append(f"{'sum of stages':20s} {report['sum_of_stages_ms']:10.3f}")
    lines.append(f"{'session.step':20s} {report['session_step_ms_median']:10.3f} {report['session_step_ms_p90']:10.3f}"
                 "   (no post-processing)")
    if report.get("postprocess_target_size"):
        lines.append(f"post-processing to {report['postprocess_target_size']}, threshold {report['threshold']}")
    if report.get("trace"):
        lines.append(f"trace: {report['trace']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    report = profile(args)
    report["argv"] = argv
    print(format_table(report))
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
