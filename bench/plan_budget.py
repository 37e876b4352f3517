"""Does planning keep its wall-clock promise? Times, on an empty plan cache, what a user waits for:

* ``videomt-fast plan --arch A --size HxW`` (a child process, start to exit);
* ``optimize()`` and the first call after it, against the second call (the same work, planned): their
  difference is what planning cost. Cases: the packaged demo model on a 4-frame clip (the clip forward
  plans two shapes: the batched early layers and the per-frame query layers) and a random model of the
  preset's shapes stepping one frame through a session (one shape).

Each shape has ``--budget`` seconds (``optimize(budget_s=)``, default 60). Writes
``<results folder>/plan_budget_<device>_<time>.json`` (or ``--out``) and prints each case against its
budget.

    python bench/plan_budget.py [--arch vit-l] [--size 640x640] [--budget 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch


def _time(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def case(name: str, model, call, shapes: int, budget: float) -> dict:
    from videomt_fast.runtime.fast import plans_of

    optimize_s, _ = _time(lambda: model.optimize(budget_s=budget))
    with torch.inference_mode():
        first_s, _ = _time(call)
        second_s, _ = _time(call)
    planning_s = optimize_s + first_s - second_s
    plans = plans_of(model)
    settings = model.fast_settings
    return {"case": name, "shapes_planned": len(plans), "budget_s_per_shape": budget,
            "promise_s": budget * shapes, "optimize_s": round(optimize_s, 2), "first_call_s": round(first_s, 2),
            "second_call_s": round(second_s, 2), "planning_s": round(planning_s, 2),
            "kept": planning_s <= budget * shapes, "dtype": str(model.dtype).replace("torch.", ""),
            "cpu_dtype": settings.cpu_dtype_report.get("reason") if settings.cpu_dtype_report else None,
            "plans": [{"shape": f"{p.rows}x{p.size[0]}x{p.size[1]}", "calibration_s": p.calibration_s,
                       "notes": p.notes} for p in plans]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/plan_budget.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit-l")
    p.add_argument("--size", default="640x640")
    p.add_argument("--budget", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = tempfile.mkdtemp(prefix="videomt_fast-plan-budget-")
    os.environ["VIDEOMT_FAST_PLAN_CACHE"] = cache  # empty: everything is measured
    import videomt_fast
    from videomt_fast.apps.benchmark import environment, results_dir, write_json_atomic
    from videomt_fast.demo import WEIGHTS_DIR
    from videomt_fast.model.configuration import config_from_preset

    rows = []
    # the plan command, as a user runs it
    cmd = [sys.executable, "-m", "videomt_fast", "plan", "--arch", args.arch, "--size", args.size,
           "--budget", str(args.budget)]
    env = dict(os.environ, VIDEOMT_FAST_PLAN_CACHE=tempfile.mkdtemp(prefix="videomt_fast-plan-budget-"))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    rows.append({"case": f"videomt-fast plan --arch {args.arch} --size {args.size}", "seconds": round(seconds, 2),
                 "promise_s": args.budget, "rc": proc.returncode, "kept": proc.returncode == 0 and seconds <= args.budget,
                 "output": proc.stdout.strip().splitlines()})
    print(f"{rows[-1]['case']}: {seconds:.1f} s (budget {args.budget:.0f} s, rc {proc.returncode})", flush=True)
    # the demo model on a 4-frame clip: two shapes
    demo = videomt_fast.VideomtForUniversalSegmentation.from_pretrained(WEIGHTS_DIR)
    clip = torch.randn(1, 4, 3, h, w)
    rows.append(case(f"demo model, clip forward 1x4x3x{h}x{w}", demo, lambda: demo(pixel_values_videos=clip), 2,
                     args.budget))
    print(f"{rows[-1]['case']}: planning {rows[-1]['planning_s']} s of {rows[-1]['promise_s']:.0f} s", flush=True)
    # the preset's shapes, a session's first frame: one shape
    torch.manual_seed(0)
    big = videomt_fast.VideomtForUniversalSegmentation(config_from_preset(args.arch, num_labels=40, image_size=h))
    frame = torch.randn(1, 3, h, w)
    session_holder = {}

    def step():
        session = session_holder.setdefault("s", big.new_session())
        session.reset()
        return session.step(frame)

    rows.append(case(f"{args.arch} session step 1x3x{h}x{w}", big, step, 1, args.budget))
    print(f"{rows[-1]['case']}: planning {rows[-1]['planning_s']} s of {rows[-1]['promise_s']:.0f} s "
          f"(the frame itself {rows[-1]['second_call_s']} s)", flush=True)
    report = {"tool": "bench/plan_budget.py", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(torch.device("cpu")), "threads": torch.get_num_threads(),
              "load_average": list(os.getloadavg()), "budget_s_per_shape": args.budget, "rows": rows}
    out = args.out or os.path.join(results_dir(), f"plan_budget_cpu_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    write_json_atomic(out, report)
    print(f"results: {out}")
    return 0 if all(r["kept"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
