"""``videomt-fast``: one entry point, one subcommand per job.

    videomt-fast bench     side-by-side benchmark (videomt_fast.apps.benchmark)
    videomt-fast profile   per-stage latency profile (videomt_fast.apps.profiler)
    videomt-fast segment   offline video segmentation (videomt_fast.apps.segment)
    videomt-fast demo      segment a synthetic clip with the packaged demo model (videomt_fast.apps.demo)
    videomt-fast backends  which backend each op runs, and why
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
    "demo": ("videomt_fast.apps.demo", "segment a synthetic clip with the packaged demo model, offline"),
}


def _backends(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="videomt-fast backends", description="which backend each op runs")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from videomt_fast import ops
    from videomt_fast.ops import reference  # noqa: F401

    report = ops.backend_report(args.device)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, row in report.items():
            print(f"{name:22s} {row['backend']:10s} {row['reason']}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
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
