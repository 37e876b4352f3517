"""Per-frame host time of the online step: videomt_fast's planned session vs transformers' one-frame forward.

A tiny VidEoMT (hidden 64, 12 layers, 32x32 frames by default) makes the arithmetic small, so what is
timed is what the host spends per frame: Python, op dispatch, kernel launches. Three providers, interleaved
in one process on the same weights and frames:

* ``hf``: transformers' ``VideomtForUniversalSegmentation`` on a one-frame clip (what a user calls per frame);
* ``plain``: videomt_fast's session without ``optimize()`` (every op dispatched per call);
* ``fast``: videomt_fast's session after ``optimize()`` (the execution plan: on a GPU CUDA graphs; on a CPU
  the plan's op callables, or its compiled frame step where the plan chose one, ``--compile``).

On a GPU the host time is the time until ``step()`` returns, without synchronizing (the launches and the
replay are what the host pays); the device time per frame is reported beside it. Writes JSON under
the benchmark's results folder (``$VIDEOMT_FAST_RESULTS_DIR``, else ``~/.cache/videomt_fast/results``;
or ``--out``) and prints the ratios.

    python bench/host_time.py [--device cpu|cuda] [--queries 200] [--threads 1] [--repeats 7] [--compile auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median reported)")
    p.add_argument("--steps", type=int, default=20, help="frames per video, round and provider (at least 2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                   help="the fast model's dtype: float32 (default, as transformers'), bfloat16, or auto (optimize() "
                        "decides: bf16 on a CPU with native bf16 when it passes the agreement gate and is faster)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="the fast session's compiled frame step on a CPU (optimize(compile=...), default auto)")
    p.add_argument("--out", default=None, help="JSON path (default <results folder>/host_time_<device>_<time>.json)")
    args = p.parse_args(argv)
    if args.steps < 2 or args.repeats < 1:
        p.error("--steps must be at least 2 and --repeats at least 1")

    import torch
    import transformers

    import videomt_fast
    from videomt_fast.runtime.fast import plans_of, session_step_kind

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
               num_blocks=min(4, args.layers), num_queries=args.queries, image_size=args.size, num_labels=10)
    torch.manual_seed(0)
    hf = transformers.VideomtForUniversalSegmentation(transformers.VideomtConfig(**cfg)).eval().to(device)
    plain = videomt_fast.from_transformers(hf).eval().to(device)
    fast = videomt_fast.from_transformers(hf).eval().to(device)
    t0 = time.perf_counter()
    fast.optimize(dtype="auto" if args.dtype == "auto" else getattr(torch, args.dtype), shapes=[(1, args.size, args.size)], compile=args.compile)
    optimize_s = time.perf_counter() - t0
    frames = torch.randn(args.steps, 1, 3, args.size, args.size, device=device)
    sessions = {"plain": plain.new_session(), "fast": fast.new_session()}

    def run(name, timed):
        """One video of ``--steps`` frames, then the same video again with its first frame untimed; appends
        (seconds of all frames, seconds of the later frames) to ``timed``. A session's first frame starts a
        video from the learned queries; transformers' one-frame forward is the same every frame."""
        session = sessions.get(name)

        def step(f):
            if session is None:
                hf(pixel_values_videos=f[:, None])
            else:
                session.step(f)

        if session is not None:
            session.reset()
        t0 = time.perf_counter()
        for f in frames:
            step(f)
        t1 = time.perf_counter()
        if session is not None:
            session.reset()
        step(frames[0])
        t2 = time.perf_counter()
        for f in frames[1:]:
            step(f)
        timed.append((t1 - t0, time.perf_counter() - t2))

    cuda = device.type == "cuda"
    if cuda:  # the host time is the time until the launches return: the video split is not timed on a GPU
        def run(name, timed):  # noqa: F811
            if name == "hf":
                for f in frames:
                    hf(pixel_values_videos=f[:, None])
            else:
                sessions[name].reset()
                for f in frames:
                    sessions[name].step(f)
    host = {n: [] for n in ("hf", "plain", "fast")}
    steady = {n: [] for n in host}
    total = {n: [] for n in host}
    with torch.inference_mode():
        for name in host:  # warm-up: plans, graphs, kernels
            run(name, [])
            run(name, [])
        for _ in range(args.repeats):
            for name in host:
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                timed: list = []
                run(name, timed)
                t1 = time.perf_counter()
                if cuda:
                    torch.cuda.synchronize(device)
                    timed = [(t1 - t0, 0.0)]
                t2 = time.perf_counter()
                host[name].append(timed[0][0] / args.steps * 1e3)
                if not cuda:
                    steady[name].append(timed[0][1] / (args.steps - 1) * 1e3)
                total[name].append(((t2 - t0) if cuda else timed[0][0]) / args.steps * 1e3)
    med = {n: statistics.median(v) for n, v in host.items()}
    med_steady = {n: statistics.median(v) for n, v in steady.items() if v}
    result = {
        "tool": "bench/host_time.py",
        "device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "transformers": transformers.__version__, "videomt_fast": videomt_fast.__version__,
        "threads": args.threads, "config": cfg, "compile": args.compile, "fast_dtype": str(fast.dtype), "optimize_s": round(optimize_s, 2),
        "fast_step": session_step_kind(fast), "frame": [args.size, args.size], "steps": args.steps,
        "repeats": args.repeats, "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "host_ms_per_frame": {n: {"median": med[n], "min": min(v), "max": max(v)} for n, v in host.items()},
        "total_ms_per_frame": {n: statistics.median(v) for n, v in total.items()},
        "ratio_fast_over_hf": med["fast"] / med["hf"], "ratio_plain_over_hf": med["plain"] / med["hf"],
        "steady_ms_per_frame": med_steady or None,
        "steady_ratio_fast_over_hf": med_steady["fast"] / med_steady["hf"] if med_steady else None,
        "fast_plans": [plan.to_json() for plan in plans_of(fast)],
    }
    from videomt_fast.apps.benchmark import results_dir

    out = args.out or os.path.join(results_dir(),
                                   f"host_time_{device.type}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for n in host:
        print(f"{n:6s} host {med[n]:8.3f} ms/frame (min {min(host[n]):.3f}, max {max(host[n]):.3f})")
    if med_steady:
        print(f"later frames only: fast / hf = {result['steady_ratio_fast_over_hf']:.3f}")
    print(f"fast / hf = {result['ratio_fast_over_hf']:.3f}   plain / hf = {result['ratio_plain_over_hf']:.3f}   "
          f"(fast later frames: {result['fast_step']}; optimize() {optimize_s:.1f} s)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
