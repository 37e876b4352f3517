"""``videomt-fast``: one entry point, one subcommand per job.

    videomt-fast bench     side-by-side benchmark (videomt_fast.apps.benchmark)
    videomt-fast profile   per-stage latency profile (videomt_fast.apps.profiler)
    videomt-fast segment   offline video segmentation (videomt_fast.apps.segment)
    videomt-fast export    ONNX graphs (frame step, clip, EoMT image) and their JSON sidecar (videomt_fast.apps.export)
    videomt-fast demo      segment a synthetic clip with the packaged demo model (videomt_fast.apps.demo)
    videomt-fast plan      the execution plan of a model on this device: per op site the implementation
                           chosen, every candidate's time and error, why any was excluded (videomt_fast.apps.plan)
    videomt-fast backends  which backend each op runs on a device (named in the header), and why
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

_SUBCOMMANDS = {
    "bench": ("videomt_fast.apps.benchmark", "side-by-side benchmark against transformers"),
    "profile": ("videomt_fast.apps.profiler", "per-stage latency profile and a Chrome trace"),
    "segment": ("videomt_fast.apps.segment", "offline segmentation of videos and frame folders"),
    "export": ("videomt_fast.apps.export", "ONNX graphs of the frame step, the clip or EoMT's image forward"),
    "demo": ("videomt_fast.apps.demo", "segment a synthetic clip with the packaged demo model, offline"),
    "plan": ("videomt_fast.apps.plan", "the execution plan on this device: choices, candidates' times and errors"),
}


def backends_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videomt-fast backends",
        description="Which implementation (reference, triton, cuda) each op runs for tensors on a device, and why.",
    )
    parser.add_argument("--device", default=None,
                        help="device whose tensors the report is for: cpu, cuda or cuda:N (default: cuda when "
                             "torch sees a GPU, else cpu)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON instead of the table: the device, and per op its backend, the reason, "
                             "the available implementations and what the op does")
    return parser


def _backends(argv: list[str]) -> int:
    parser = backends_parser()
    args = parser.parse_args(argv)
    import torch

    from videomt_fast import ops
    from videomt_fast.ops import reference  # noqa: F401

    try:
        device = torch.device(args.device or ("cuda" if _cuda() else "cpu"))
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    report = ops.backend_report(device)
    name = _device_name(device)
    if args.json:
        print(json.dumps({"device": str(device), "device_name": name, "ops": report}, indent=2))
        return 0
    print(f"backends for tensors on {device}: {name}")
    width = max([len("op")] + [len(op) for op in report])
    print(f"{'op':{width}s}  {'backend':10s} reason")
    for op, row in report.items():
        print(f"{op:{width}s}  {row['backend']:10s} {row['reason']}")
    return 0


def _device_name(device) -> str:
    """What the device is, in words: the GPU's name, or the CPU's model and core count."""
    import os

    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch sees no CUDA device here (every op runs its reference)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return f"no such GPU (torch sees {torch.cuda.device_count()})"
        return f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda})"
    if device.type == "cpu":
        from videomt_fast.apps.benchmark import cpu_name

        return f"CPU: {cpu_name()} ({os.cpu_count()} cores visible)"
    return device.type


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def usage() -> str:
    """The top-level help: plain text, one line per command."""
    commands = {**{name: what for name, (_, what) in _SUBCOMMANDS.items()},
                "backends": "which implementation each op runs for tensors on a device, and why"}
    width = max(len(name) for name in commands)
    lines = ["usage: videomt-fast COMMAND [options]    (videomt-fast COMMAND --help: the options of one)", "",
             "commands:"]
    lines += [f"  {name:{width}s}  {what}" for name, what in commands.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)  # no command: usage on stderr, exit 2
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "backends":
        return _backends(rest)
    if command not in _SUBCOMMANDS:
        print(f"videomt-fast: unknown command {command!r}; choose from {sorted(_SUBCOMMANDS) + ['backends']}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(_SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
