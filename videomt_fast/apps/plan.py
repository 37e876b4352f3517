"""``videomt-fast plan``: the execution plan a model gets on this device, per op site.

Builds (or reads from the plan cache) the plan ``optimize()`` would run for one input shape and prints,
per op site, the implementation chosen, every candidate's time and error against the float64 reference,
and why any candidate was excluded (a kernel that raised, mismatched, returned NaN or refused the
inputs), plus the whole-model agreement gate and, on a CPU, the dtype decision and whether a VidEoMT
session's frame step runs as one compiled call (``step.frame_step``). Backends that could not
be loaded (Triton missing, a CUDA extension that failed to build) are listed with their errors.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videomt-fast plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("videomt", "eomt"), default="videomt", help="model family (default videomt)")
    p.add_argument("--arch", default="vit-s", help="published shapes with random weights: vit-s, vit-b, vit-l (DINOv2) "
                                                    "or dinov3-s, dinov3-b, dinov3-l (default vit-s; ignored with "
                                                    "--checkpoint)")
    p.add_argument("--checkpoint", default=None, help="a save_pretrained folder, hub id or research .pth instead")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--size", default=None, help="frame size HxW (default: the config's image_size)")
    p.add_argument("--rows", type=int, default=1, help="frames per call (default 1: one frame of a stream)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="auto (default): bf16 on CUDA; on a CPU decided by measurement")
    p.add_argument("--mode", choices=("auto", "recalibrate", "static"), default=None,
                   help="auto: use the plan cache (default, or $VIDEOMT_FAST_PLAN); recalibrate: measure again; "
                        "static: no calibration")
    p.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                   help="VidEoMT on a CPU: whether a session's frame step may run as one compiled call (auto: where "
                        "the step is host-bound; default $VIDEOMT_FAST_COMPILE or auto)")
    p.add_argument("--budget", type=float, default=60.0, help="calibration time budget in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _size(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        parser.error(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 640x640")
    if h <= 0 or w <= 0:
        parser.error(f"--size {text!r}: height and width must be positive")
    return h, w


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    import videomt_fast
    from videomt_fast import ops
    from videomt_fast.model.configuration import EomtConfig, VideomtConfig, config_from_preset
    from videomt_fast.model.modeling import model_class_for
    from videomt_fast.runtime.fast import compiled_step, plan_for

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    if args.checkpoint:
        cls = videomt_fast.VideomtForUniversalSegmentation
        if args.model == "eomt":
            from videomt_fast.model.loading import checkpoint_model_type

            dinov3 = checkpoint_model_type(args.checkpoint) == "eomt_dinov3"
            cls = videomt_fast.EomtDinov3ForUniversalSegmentation if dinov3 else videomt_fast.EomtForUniversalSegmentation
        model = cls.from_pretrained(args.checkpoint, dtype=torch.float32, device=device)
    else:
        try:
            config = config_from_preset(args.arch, EomtConfig if args.model == "eomt" else VideomtConfig)
        except ValueError as exc:
            parser.error(f"--arch: {exc}")
        torch.manual_seed(0)
        model = model_class_for(config)(config).to(device)
    size = _size(parser, args.size) if args.size else tuple(
        g * p for g, p in zip(model.config.grid_size, model.config.patch_hw))
    ph, pw = model.config.patch_hw
    if size[0] % ph or size[1] % pw:
        parser.error(f"--size {size[0]}x{size[1]}: height and width must be multiples of the patch size {ph}x{pw}")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model.optimize(dtype=dtype, plan=args.mode, budget_s=args.budget, compile=args.compile)
    with torch.no_grad():
        plan = plan_for(model, args.rows, size)
        if args.model == "videomt":
            compiled_step(model, plan)  # the session's frame step: the plan's ops or one compiled call
    if args.json:
        print(json.dumps({"plan": plan.to_json(), "cpu_dtype": model.fast_settings.cpu_dtype_report or None,
                          "load_errors": ops.load_errors(), "exclusions": ops.exclusions()}, indent=1))
        return 0
    print(plan.format())
    for module, error in ops.load_errors().items():
        print(f"backend not loaded: {module}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
