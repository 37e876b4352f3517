"""Micro-benchmark of every Triton kernel against its PyTorch counterpart, at ViT-S/B/L shapes.

    python -m bench.bench_kernels                       # all ops, S/B/L, N = 1605 and 1805, bf16
    python -m bench.bench_kernels --ops attention,layer_norm --models B --dtype fp16
    python -m bench.bench_kernels --list                # print the cases (works without a GPU)

Providers per op (one JSON row each, timed with ``triton.testing.do_bench``: median and 20/80 %
quantiles in ms):

* attention: ``triton`` vs ``sdpa_flash`` (SDPA pinned to its flash backend, on the permuted views of
  the fused QKV, output transpose included, i.e. the reference op) and, masked (EoMT, 200 query rows),
  vs ``sdpa_masked`` (SDPA with the boolean mask the reference builds; flash takes no mask);
* mask_bits: ``triton`` vs ``torch`` (F.interpolate + ``> 0`` + bit packing);
* layer_norm / residual_layer_norm: ``triton`` vs ``torch`` (F.layer_norm / eager ``x + s * f`` + norm);
* linear_gelu / linear_residual: ``cublas_epilogue`` (F.linear + one Triton pass) and ``triton_gemm``
  (Triton GEMM with the epilogue) vs ``torch`` (cuBLAS + eager elementwise ops);
* query_update: ``triton`` vs ``torch`` (reference: F.linear + add + copy into the buffer).

Every row also carries the relative error of that provider against the float64 reference of the same
inputs, so a fast wrong kernel cannot hide. Results go to ``<results folder>/kernels_<gpu>_<time>.json``
(``$VIDEOMT_FAST_RESULTS_DIR``, else ``~/.cache/videomt_fast/results``; written to a temporary name, then renamed) with the device name and torch/triton versions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from typing import Callable

import torch

MODELS = {"S": (384, 6), "B": (768, 12), "L": (1024, 16)}  # hidden size, heads (head dim 64)
OPS = ("attention", "mask_bits", "layer_norm", "residual_layer_norm", "linear_gelu", "linear_residual", "query_update")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NUM_QUERIES = 200
PREFIX = 1 + 4  # cls + registers
DEVICE = "cuda"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--models", default="S,B,L", help="comma-separated subset of S,B,L")
    parser.add_argument("--seq", default="1605,1805", help="token counts (1805 = 200 queries + 1605)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--out", default=None, help="output JSON path (default: <results folder>/kernels_<gpu>_<time>.json)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    args = parser.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.models = [m.strip().upper() for m in args.models.split(",") if m.strip()]
    try:
        args.seq = [int(s) for s in args.seq.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seq must be comma-separated integers, got {args.seq!r}")
    for op in args.ops:
        if op not in OPS:
            parser.error(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    for model in args.models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    for seq in args.seq:
        if seq < PREFIX + 1:
            parser.error(f"--seq {seq} is too short (needs at least {PREFIX + 1} tokens)")
    if args.batch < 1:
        parser.error("--batch must be positive")
    return args


def cases(args: argparse.Namespace) -> list[dict]:
    """(op, model, d, heads, N) combinations; token-wise ops use N rows, attention is masked (EoMT) when N
    holds 200 query rows, mask ops use the patch grid of N."""
    out = []
    for op in args.ops:
        for model in args.models:
            dim, heads = MODELS[model]
            for seq in args.seq:
                queries = _num_queries(seq)
                out.append(
                    dict(op=op, model=f"ViT-{model}", dim=dim, heads=heads, seq=seq, queries=queries, batch=args.batch)
                )
    return out


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _providers(case: dict, dtype: torch.dtype) -> tuple[dict[str, Callable], Callable, Callable[[object], torch.Tensor]]:
    """(providers, float64 truth thunk, output -> tensor to compare) for one case, inputs drawn fresh."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from videomt_fast.ops import reference
    from videomt_fast.kernels import attention, layer_norm, linear, mask_bits, query_update

    dev = DEVICE
    op, dim, heads, seq, batch = case["op"], case["dim"], case["heads"], case["seq"], case["batch"]
    queries = _num_queries(seq)
    patches = seq - PREFIX - queries
    grid = _grid(patches)
    rnd = lambda *shape: torch.randn(*shape, device=dev).to(dtype)  # noqa: E731
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731

    if op == "attention":
        qkv = rnd(batch, seq, 3 * dim)
        bits = None
        if queries:
            bits = reference.pack_mask_bits(torch.rand(batch, queries, patches, device=dev) > 0.7)
        provs = {"triton": lambda: attention.attention(qkv, heads, bits, queries, seq - patches)}
        if bits is None and dtype != torch.float32:

            def flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return reference.attention_ref(qkv, heads)

            provs["sdpa_flash"] = flash
        elif bits is None:  # flash takes no fp32: SDPA picks its own backend
            provs["sdpa"] = lambda: reference.attention_ref(qkv, heads)
        else:
            provs["sdpa_masked"] = lambda: reference.attention_ref(qkv, heads, bits, queries, seq - patches)
        truth = lambda: reference.attention_ref(qkv.double(), heads, bits, queries, seq - patches)  # noqa: E731
        case["masked"] = bits is not None
        return provs, truth, first
    if op == "mask_bits":
        q = max(queries, NUM_QUERIES)
        logits = rnd(batch, q, 4 * grid[0], 4 * grid[1])
        provs = {"triton": lambda: mask_bits.mask_bits(logits, grid), "torch": lambda: reference.mask_bits_ref(logits, grid)}
        case["grid"] = list(grid)
        return provs, lambda: reference.mask_bits_ref(logits, grid), lambda out: out.float()
    if op == "layer_norm":
        x, w, b = rnd(batch, seq, dim), rnd(dim), rnd(dim)
        provs = {"triton": lambda: layer_norm.layer_norm(x, w, b, 1e-6), "torch": lambda: reference.layer_norm_ref(x, w, b, 1e-6)}
        return provs, lambda: reference.layer_norm_ref(x.double(), w.double(), b.double(), 1e-6), first
    if op == "residual_layer_norm":
        x, f, s, w, b = rnd(batch, seq, dim), rnd(batch, seq, dim), rnd(dim), rnd(dim), rnd(dim)
        provs = {
            "triton": lambda: layer_norm.residual_layer_norm(x, f, s, w, b, 1e-6),
            "torch": lambda: reference.residual_layer_norm_ref(x, f, s, w, b, 1e-6),
        }
        truth = lambda: reference.residual_layer_norm_ref(*(t.double() for t in (x, f, s, w, b)), 1e-6)  # noqa: E731
        return provs, lambda: truth()[1], lambda out: out[1]
    if op == "linear_gelu":
        x, wt, b = rnd(batch, seq, dim), rnd(4 * dim, dim) * dim**-0.5, rnd(4 * dim)
        provs = {
            "cublas_epilogue": lambda: linear.linear_gelu_cublas(x, wt, b),
            "triton_gemm": lambda: linear.linear_gelu_triton(x, wt, b),
            "torch": lambda: reference.linear_gelu_ref(x, wt, b),
        }
        case["flop"] = 2 * batch * seq * dim * 4 * dim
        return provs, lambda: reference.linear_gelu_ref(x.double(), wt.double(), b.double()), first
    if op == "linear_residual":
        x, wt, b, s, r = rnd(batch, seq, 4 * dim), rnd(dim, 4 * dim) * (4 * dim) ** -0.5, rnd(dim), rnd(dim), rnd(batch, seq, dim)
        provs = {
            "cublas_epilogue": lambda: linear.linear_residual_cublas(x, wt, b, s, r),
            "triton_gemm": lambda: linear.linear_residual_triton(x, wt, b, s, r),
            "torch": lambda: reference.linear_residual_ref(x, wt, b, s, r),
        }
        case["flop"] = 2 * batch * seq * dim * 4 * dim
        truth = lambda: reference.linear_residual_ref(*(t.double() for t in (x, wt, b, s, r)))  # noqa: E731
        return provs, truth, first
    if op == "query_update":
        q = NUM_QUERIES
        rows = seq if queries else seq + q  # the token buffer of a query layer always holds the queries
        buf, table, prev = rnd(batch, rows, dim), rnd(q, dim), rnd(batch, rows, dim)[:, :q]
        wt, b = rnd(dim, dim) * dim**-0.5, rnd(dim)
        provs = {
            "triton": lambda: query_update.query_update(buf, table, prev, wt, b)[:, :q],
            "torch": lambda: reference.query_update_ref(buf, table, prev, wt, b)[:, :q],
        }
        truth = lambda: (F_linear64(prev, wt, b) + table.double())  # noqa: E731
        return provs, truth, first
    raise ValueError(op)


def F_linear64(x, w, b):
    return torch.nn.functional.linear(x.double(), w.double(), b.double())


def _num_queries(seq: int) -> int:
    """N counts 200 query rows when N - 205 is a square patch grid (1805 = 200 + 1 + 4 + 40x40), else none."""
    rest = seq - NUM_QUERIES - PREFIX
    return NUM_QUERIES if rest > 0 and int(rest**0.5) ** 2 == rest else 0


def _grid(patches: int) -> tuple[int, int]:
    """The most square factorisation of the patch count (1600 -> 40x40)."""
    best = (1, patches)
    for h in range(1, int(patches**0.5) + 1):
        if patches % h == 0:
            best = (h, patches // h)
    return best


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "cuda": torch.version.cuda,
        "driver": _driver(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def run(args: argparse.Namespace) -> dict:
    import triton.testing

    dtype = DTYPES[args.dtype]
    rows = []
    for case in cases(args):
        torch.manual_seed(len(rows))
        provs, truth_fn, pick = _providers(case, dtype)
        truth = truth_fn() if case["op"] == "residual_layer_norm" else pick(truth_fn())
        timings = {}
        for name, fn in provs.items():
            out = pick(fn())
            err = _rel(out, truth)
            ms, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
            timings[name] = ms
            row = dict(case, dtype=args.dtype, provider=name, ms=ms, ms_p20=p20, ms_p80=p80, rel_err=err)
            if "flop" in case:
                row["tflops"] = case["flop"] / (ms * 1e-3) / 1e12
            rows.append(row)
        base = next((timings[k] for k in ("torch", "sdpa_flash", "sdpa", "sdpa_masked") if k in timings), None)
        for row in rows[-len(provs) :]:
            row["speedup_vs_torch"] = base / row["ms"] if base else None
            print(
                f"{row['op']:<20} {row['model']:<6} N={row['seq']:<5} {row['provider']:<16} "
                f"{row['ms']:8.4f} ms  x{row['speedup_vs_torch'] or 0:5.2f}  rel_err {row['rel_err']:.2e}",
                flush=True,
            )
    return {"environment": environment(), "args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}


def write(result: dict, path: str | None) -> str:
    if path is None:
        device = re.sub(r"[^A-Za-z0-9]+", "-", result["environment"]["device"]).strip("-").lower()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        from videomt_fast.apps.benchmark import results_dir

        path = os.path.join(results_dir(), f"kernels_{device}_{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for case in cases(args):
            print(json.dumps(case))
        return 0
    if not torch.cuda.is_available():
        print(
            "bench_kernels: needs a CUDA GPU (none found); the kernels are only checked in Triton's CPU "
            "interpreter here. Use --list to see the cases.",
            file=sys.stderr,
        )
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench_kernels: unset TRITON_INTERPRET to time the compiled kernels", file=sys.stderr)
        return 2
    path = write(run(args), args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
