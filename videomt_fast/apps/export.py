"""``videomt-fast export``: a VidEoMT or EoMT model to ONNX graphs and their JSON sidecar.

    videomt-fast export --model DIR_OR_HUB_ID --out exported/ --size 640x640 --dtype float32,float16

writes ``step-fp32.onnx``, ``clip-fp32.onnx`` (VidEoMT) or ``image-fp32.onnx`` (EoMT), either backbone
(DINOv2 or DINOv3; an EoMT-DINOv3 checkpoint is recognised by its config.json), their fp16 twins
and ``export.json`` (every input and output with its shape and dtype, the frame sizes, the normalization,
what stays float32 in fp16 graphs, and each graph's error against PyTorch at the listed sizes). See
:mod:`videomt_fast.export`.
"""

from __future__ import annotations

import argparse
import os
import sys

from videomt_fast.apps.benchmark import ARCHS, _names, _size
from videomt_fast.export.exporter import DTYPES, EXPORTERS, IMAGE_GRAPHS, OPSET, VIDEO_GRAPHS

GRAPHS = VIDEO_GRAPHS + IMAGE_GRAPHS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videomt-fast export", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="save_pretrained folder, hub id, research .pth, or demo (the packaged model)")
    source.add_argument("--arch", choices=ARCHS,
                        help="published backbone shape with random weights (for trying the export): vit-s/b/l "
                             "DINOv2, dinov3-s/b/l DINOv3 (--model-type eomt: EoMT-DINOv3)")
    p.add_argument("--model-type", choices=("auto", "videomt", "eomt"), default="auto",
                   help="which model the weights are (auto: the checkpoint's config.json; VidEoMT otherwise)")
    p.add_argument("--out", required=True, help="output folder (written beside, then renamed into place)")
    p.add_argument("--graph", type=_names(GRAPHS, "graphs"), default=None,
                   help="comma list: step,clip (VidEoMT; default both) or image (EoMT)")
    p.add_argument("--dtype", type=_names(DTYPES, "dtypes"), default=["float32"],
                   help="comma list of graph dtypes: float32, float16 (default float32)")
    p.add_argument("--size", type=_size, action="append", default=None, metavar="HxW",
                   help="frame size, repeatable (default the config's image size): verified sizes of a dynamic "
                        "export; with --fixed-sizes or the TorchScript exporter, one graph per size")
    p.add_argument("--fixed-sizes", action="store_true",
                   help="one graph per --size with its position table stored (static shapes, e.g. for TensorRT)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="torch's exporter (auto: dynamo where onnxscript is installed, else TorchScript)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--no-verify", action="store_true", help="skip running the graphs against PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--seed", type=int, default=0, help="seed of --arch's random weights")
    return p


def _model_class(args):
    from videomt_fast.model.loading import checkpoint_model_type
    from videomt_fast.model.modeling import (EomtDinov3ForUniversalSegmentation, EomtForUniversalSegmentation,
                                             VideomtForUniversalSegmentation)

    declared = checkpoint_model_type(args.model) if args.model else None
    kind = args.model_type
    if kind == "auto":
        kind = "eomt" if declared in ("eomt", "eomt_dinov3") else "videomt"
    if kind != "eomt":
        return VideomtForUniversalSegmentation
    return EomtDinov3ForUniversalSegmentation if declared == "eomt_dinov3" else EomtForUniversalSegmentation


def load_model(args):
    import torch

    from videomt_fast.demo import resolve_model
    from videomt_fast.model.configuration import EomtConfig, VideomtConfig, config_from_preset
    from videomt_fast.model.modeling import model_class_for

    cls = _model_class(args)
    if args.arch:
        torch.manual_seed(args.seed)
        config = config_from_preset(args.arch, EomtConfig if cls.__name__.startswith("Eomt") else VideomtConfig)
        return model_class_for(config)(config).eval()
    return cls.from_pretrained(resolve_model(args.model), dtype=torch.float32, device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from videomt_fast.export import ExportError, MissingDependency, export

    try:
        model = load_model(args)
        sidecar = export(model, args.out, graphs_=args.graph, dtypes=args.dtype, sizes=args.size,
                         fixed_sizes=args.fixed_sizes, exporter=args.exporter, opset=args.opset,
                         verify=not args.no_verify, overwrite=args.overwrite)
    except (ExportError, MissingDependency) as exc:
        print(f"videomt-fast export: {exc}", file=sys.stderr)
        return 2
    for graph in sidecar["graphs"]:
        print(f"{os.path.join(args.out, graph['file'])}: {graph['graph']} {graph['dtype']}, frame sizes "
              f"{graph['frame_sizes'] if isinstance(graph['frame_sizes'], str) else ', '.join(graph['frame_sizes'])}")
    for row in sidecar.get("verified", []):
        errs = ", ".join(f"{k} {v:.2g}" for k, v in row["max_abs_err"].items())
        print(f"  verified {row['graph']} {row['dtype']} {row['size']}: max abs error vs PyTorch fp32: {errs}")
    print(f"{os.path.join(args.out, 'export.json')}: inputs, outputs, sizes, normalization")
    return 0


if __name__ == "__main__":
    sys.exit(main())
