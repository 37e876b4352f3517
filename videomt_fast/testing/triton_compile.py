"""Ahead-of-time compile check: every Triton launch our launchers make, compiled for a GPU target on any host.

The kernel tests run the kernels in Triton's CPU interpreter, which accepts code that real compilation
rejects (layouts, shared memory, register pressure are never looked at). This module closes that gap
without a GPU:

1. :func:`capture` calls the public kernel entry points (:func:`launch_cases`: the op calls a ViT-S/B/L
   VidEoMT / EoMT forward makes, DINOv2 and DINOv3 backbones (rotary attention, gated MLP), at 640x640, patch 16, batch 1 and 2, bf16 / fp16 / fp32) with
   uninitialized CPU tensors of the real shapes. Every ``kernel[grid](...)`` is intercepted and
   recorded, never executed (nor is the cuBLAS ``F.linear`` of the ``"cublas"`` GEMM epilogues), so a
   ViT-L sweep takes seconds. Each record (:class:`Launch`) holds what ``JITFunction.run`` would hand
   to the compiler on a CUDA device: the signature after Triton's own argument specialization (pointer
   dtypes, ``i32``/``i64``, ints equal to 1 folded into constants, 16-divisibility attributes), the
   constexprs and the options (``num_warps``, ``num_stages``). While launching, ``TRITON_INTERPRET`` is
   ``0`` so the launchers choose what they choose on a GPU (``INTERP_BF16`` is off), while each call's
   guard is checked with the interpreter on (CPU tensors pass only there), so a shape the kernel would
   refuse is reported instead of silently captured. Autotuned kernels (none today) record every config.
2. :func:`compile_launches` compiles each unique launch for ``GPUTarget("cuda", arch, 32)`` with
   ``triton.compile`` (``ASTSource`` of the real ``JITFunction``; this needs a process where
   ``TRITON_INTERPRET`` is unset, see :func:`compile_in_subprocess`) and reads the resources back:
   registers, stack frame and spill stores/loads from ``ptxas -v`` (re-run on the PTX with Triton's own
   ptxas and flags), static shared / local memory from ``cuobjdump --dump-resource-usage`` of the cubin,
   dynamic shared memory from the kernel metadata (checked against the arch's per-block limit, which
   ``triton.compile`` itself does not enforce: Triton raises ``OutOfResources`` only when loading).

Command line (JSON table with ``--json``; nothing is written unless asked)::

    python -m videomt_fast.testing.triton_compile --arch 90 --arch 80 --json /tmp/kernels_sm90.json
    python -m videomt_fast.testing.triton_compile --models vit-l --batches 2 --dtypes bf16   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelInterface, KernelParam, create_function_from_signature

# Triton's argument specialization imports gluon on first use, and gluon's import checks the interpreter
# flag of that moment; import it now, while TRITON_INTERPRET still has this process's own value.
import triton.experimental.gluon  # noqa: E402,F401

from videomt_fast import ops
from videomt_fast.model.configuration import PRESETS, EomtConfig, config_from_preset

from videomt_fast.kernels import attention, layer_norm, linear, mask_bits, query_update

KERNEL_MODULES = {"attention": attention, "mask_bits": mask_bits, "layer_norm": layer_norm, "linear": linear,
                  "query_update": query_update}
# op (what a launch was captured for) -> the kernel module whose launcher it goes through
OP_MODULES = {
    "attention": "attention",
    "rope_attention": "attention",
    "mask_bits": "mask_bits",
    "layer_norm": "layer_norm",
    "residual_layer_norm": "layer_norm",
    "linear_gelu[cublas]": "linear",
    "linear_gelu[triton]": "linear",
    "linear_residual[cublas]": "linear",
    "linear_residual[triton]": "linear",
    "linear_gated[cublas]": "linear",
    "linear_gated[triton]": "linear",
    "query_update": "query_update",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = tuple(PRESETS)  # vit-s, vit-b, vit-l (DINOv2); dinov3-s, dinov3-b, dinov3-l
BATCHES = (1, 2)
IMAGE_SIZE = 640
# opt-in shared memory per block (bytes), the limit Triton checks when it loads a kernel (not when it
# compiles one): H100 227 KB, A100 163 KB, sm_86 / sm_89 99 KB
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


# ------------------------------------------------------------------ what a launch is


@dataclasses.dataclass
class Launch:
    """One kernel launch as the CUDA driver path of ``JITFunction.run`` would compile it."""

    kernel: str  # "module:function", e.g. "videomt_fast.kernels.attention:_attention_kernel"
    signature: dict[str, str]  # parameter -> "*bf16", "i32", "fp32", "constexpr", ...
    constexprs: dict[str, Any]  # parameter -> value (declared constexprs and ints specialized to 1)
    attrs: dict[str, list]  # parameter -> [["tt.divisibility", 16]] (or [])
    options: dict[str, Any]  # num_warps, num_stages, debug, ...
    grid: list[int]
    cases: list[str]  # "op | model batch dtype | variant" of every call that made this launch

    @property
    def name(self) -> str:
        return self.kernel.split(":")[-1]

    @property
    def module(self) -> str:
        return self.kernel.split(":")[0].rsplit(".", 1)[-1]

    @property
    def ops(self) -> list[str]:
        return sorted({c.split(" | ")[0] for c in self.cases})

    def key(self) -> str:
        """What makes two launches the same compiled kernel (Triton's cache key minus the source)."""
        return json.dumps([self.kernel, self.signature, self.constexprs, self.attrs, self.options], sort_keys=True)

    def describe(self) -> str:
        """Pointer dtypes, constexprs (ints equal to 1 included), options, and the int arguments that are
        not 16-divisible (the rest are, which is what tells otherwise equal launches apart)."""
        ce = {k: v for k, v in self.constexprs.items() if self.signature.get(k) == "constexpr"}
        ptrs = sorted({v for v in self.signature.values() if v.startswith("*")})
        odd = [k for k, ty in self.signature.items() if ty in ("i32", "i64") and not self.attrs.get(k)]
        return (f"{self.name} [{','.join(ptrs)}] "
                + " ".join(f"{k}={v}" for k, v in ce.items())
                + f" warps={self.options['num_warps']} stages={self.options['num_stages']}"
                + (f" not%16:{','.join(odd)}" if odd else ""))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Launch":
        return cls(**data)


def dedupe(launches: Sequence[Launch]) -> list[Launch]:
    """One launch per compiled kernel; ``cases`` merged, first-seen order kept."""
    unique: dict[str, Launch] = {}
    for launch in launches:
        key = launch.key()
        if key in unique:
            unique[key].cases.extend(c for c in launch.cases if c not in unique[key].cases)
        else:
            unique[key] = dataclasses.replace(launch, cases=list(launch.cases))
    return list(unique.values())


# ------------------------------------------------------------------ recording launches


_SPEC_TARGET = GPUTarget("cuda", 90, 32)  # argument specialization is the same for every CUDA arch
_backend_cache: dict[Any, Any] = {}


def _cuda_backend(arch: int = 90):
    """Triton's CUDA backend object for ``sm_<arch>`` (no GPU needed)."""
    if arch not in _backend_cache:
        from triton.compiler import make_backend

        _backend_cache[arch] = make_backend(GPUTarget("cuda", arch, 32))
    return _backend_cache[arch]


def _params(kernel) -> tuple[inspect.Signature, list[KernelParam], Callable]:
    """(signature, KernelParams, python function) of a JITFunction or an interpreter-mode kernel."""
    if isinstance(kernel, JITFunction):
        return kernel.signature, kernel.params, kernel.fn
    fn = kernel.fn
    sig = inspect.signature(fn)
    kw = getattr(kernel, "kwargs", {}) or {}
    dns = kw.get("do_not_specialize") or []
    dnsa = kw.get("do_not_specialize_on_alignment") or []
    params = [KernelParam(i, p, i in dns or p.name in dns, i in dnsa or p.name in dnsa)
              for i, p in enumerate(sig.parameters.values())]
    return sig, params, fn


def specialize(kernel, args: tuple, kwargs: dict, grid) -> Launch:
    """The :class:`Launch` that ``kernel[grid](*args, **kwargs)`` compiles to on a CUDA device.

    Uses Triton's own binder (``create_function_from_signature``) with the CUDA backend, i.e. the same
    specialization ``JITFunction.run`` computes; then the equivalent of ``JITFunction._pack_args``.
    """
    from triton import knobs

    backend = _cuda_backend(_SPEC_TARGET.arch)
    sig, params, fn = _params(kernel)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", getattr(kernel, "debug", None)) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(sig, params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    names = [p.name for p in params]
    values = list(bound_args.values())
    signature, constexprs, attrs = {}, {}, {}
    for name, value, (ty, attr) in zip(names, values, specialization):
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = value
        elif isinstance(attr, str):
            attrs[name] = backend.parse_attr(attr)
    defaults = backend.parse_options({}).__dict__
    unknown = [k for k in options if k not in defaults]
    if unknown:
        raise KeyError(f"{fn.__name__}: unrecognised launch keyword(s) {unknown}")
    # what the launcher left out is Triton's default; spelled out so that reports show it
    options = {"num_warps": defaults["num_warps"], "num_stages": defaults["num_stages"], **options}
    if callable(grid):
        grid = grid(bound_args)
    grid = [int(g) for g in (tuple(grid) + (1, 1))[:3]]
    return Launch(
        kernel=f"{fn.__module__}:{fn.__qualname__}",
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options=dict(options),
        grid=grid,
        cases=[],
    )


_active: list[list[Launch]] = []
_current_case: list[str] = []


def _recording_run(self, *args, grid, warmup, **kwargs):
    launch = specialize(self, args, kwargs, grid)
    launch.cases.append(_current_case[-1] if _current_case else "?")
    _active[-1].append(launch)
    return None  # not executed


def _recording_autotuner_run(self, *args, **kwargs):
    """An autotuned kernel: record the launch of every config (the one picked depends on timing)."""
    grid = kwargs.pop("grid")
    warmup = kwargs.pop("warmup", False)
    for config in self.configs:
        self.fn.run(*args, grid=grid, warmup=warmup, **{**kwargs, **config.all_kwargs()})
    return None


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within: every Triton kernel launch (JIT or interpreter) is recorded into the yielded list, not run."""
    launches: list[Launch] = []
    _active.append(launches)
    try:
        with mock.patch.object(JITFunction, "run", _recording_run), \
                mock.patch.object(InterpretedFunction, "run", _recording_run), \
                mock.patch.object(Autotuner, "run", _recording_autotuner_run):
            yield launches
    finally:
        _active.pop()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _shape_only_linear(x, weight, bias=None):
    """``F.linear`` without the arithmetic: the contiguous output cuBLAS would return, uninitialized."""
    return torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------ the calls a forward makes


@dataclasses.dataclass
class Case:
    op: str  # key of OP_MODULES
    label: str  # "model batch dtype | variant"
    make: Callable[[], tuple]  # -> the arguments (fresh, uninitialized tensors)
    call: Callable[..., Any]  # the public entry point
    guard: Callable[..., "str | None"]

    @property
    def name(self) -> str:
        return f"{self.op} | {self.label}"


def launch_cases(models: Sequence[str] = MODELS, batches: Sequence[int] = BATCHES,
                 dtypes: Sequence[str] = tuple(DTYPES), image_size: int = IMAGE_SIZE,
                 device: str | torch.device = "cpu") -> list[Case]:
    """The op calls of VidEoMT / EoMT forwards at these shapes, as in :mod:`videomt_fast.model.modeling`.

    Per model/batch/dtype: LayerNorm and residual LayerNorm on the query-free (1 + R + P tokens) and the
    query (Q + 1 + R + P) sequences; attention unmasked (early layers, VidEoMT query layers, EoMT with
    masks off) and with EoMT's mask bits; mask bits of the (B, Q, 4 gh, 4 gw) mask logits; fc1 + GELU and
    fc2 + residual of the MLP and the mask head's GELU layers on the strided query rows, each through
    both GEMM epilogues (``cublas`` and ``triton``); the query update of EoMT (table only) and of
    VidEoMT (frame 0 and frame t > 0, previous queries strided and contiguous). DINOv3 models (``dinov3-*``)
    run the rotary attention instead (same four forms) and add the gated MLP's ``linear_gated`` at their
    MLP size (both activations, both GEMM variants; the published S/B/L are not gated, the ViT-S+/H+ of the
    family are). ``make()`` allocates on
    ``device``, uninitialized (``bench/gpu_smoke.py`` fills the tensors and runs the cases on the GPU).
    """
    return [case for model in models for batch in batches for dtype in dtypes
            for case in _model_cases(model, batch, dtype, image_size, device)]


# a model with the published structure at toy sizes (head dim 32, 8 queries): the op calls of a forward
# in seconds under the CPU interpreter (``bench/gpu_smoke.py --dry``)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_blocks=1, num_queries=8)


def model_config(model: str, image_size: int) -> EomtConfig:
    """The config of a preset (``vit-s``, ``vit-b``, ``vit-l``, ``dinov3-*``: an :class:`EomtDinov3Config`) or of
    ``tiny`` at this image size."""
    if model == "tiny":
        return EomtConfig(**TINY, image_size=image_size)
    return config_from_preset(model, EomtConfig, image_size=image_size)


def _model_cases(model: str, batch: int, dtype: str, image_size: int, device: str | torch.device = "cpu") -> list[Case]:
    cfg = model_config(model, image_size)
    d, heads, nq = cfg.hidden_size, cfg.num_attention_heads, cfg.num_queries
    gh, gw = cfg.grid_size
    patches = gh * gw
    prefix = cfg.num_prefix_tokens
    s_enc, s_q = prefix + patches, nq + prefix + patches
    mlp = cfg.mlp_hidden_size
    up = 2**cfg.num_upscale_blocks
    eps = cfg.layer_norm_eps
    words = math.ceil(patches / 32)
    dt = DTYPES[dtype]
    tag = f"{model} b{batch} {dtype}"
    cases: list[Case] = []

    def e(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dt, device=device)

    def add(op: str, variant: str, make: Callable[[], tuple], call: Callable, guard: Callable) -> None:
        cases.append(Case(op, f"{tag} | {variant}", make, call, guard))

    gemms = (
        ("cublas", linear.make_linear_gelu(False), linear.make_linear_residual(False)),
        ("triton", linear.make_linear_gelu(True), linear.make_linear_residual(True)),
    )
    for seq, where in ((s_enc, f"N={s_enc} (early layers)"), (s_q, f"N={s_q} (query layers)")):
        add("layer_norm", where, lambda seq=seq: (e(batch, seq, d), e(d), e(d), eps),
            layer_norm.layer_norm, layer_norm.layer_norm_guard)
        add("residual_layer_norm", where, lambda seq=seq: (e(batch, seq, d), e(batch, seq, d), e(d), e(d), e(d), eps),
            layer_norm.residual_layer_norm, layer_norm.residual_layer_norm_guard)
        for impl, gelu, residual in gemms:
            add(f"linear_gelu[{impl}]", f"fc1 {where}", lambda seq=seq: (e(batch, seq, d), e(mlp, d), e(mlp)),
                gelu, linear.linear_gelu_guard)
            add(f"linear_residual[{impl}]", f"fc2 {where}",
                lambda seq=seq: (e(batch, seq, mlp), e(d, mlp), e(d), e(d), e(batch, seq, d)),
                residual, linear.linear_residual_guard)
    for impl, gelu, _ in gemms:
        add(f"linear_gelu[{impl}]", f"mask head on the query rows of N={s_q}",
            lambda: (e(batch, s_q, d)[:, :nq], e(d, d), e(d)), gelu, linear.linear_gelu_guard)

    if cfg.backbone_family == "dinov3":
        op, att = "rope_attention", (attention.rope_attention, attention.rope_attention_guard)
        hd = cfg.head_dim

        def rope() -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.empty(patches, hd, dtype=torch.float32, device=device),
                    torch.empty(patches, hd, dtype=torch.float32, device=device))
        for impl in ("cublas", "triton"):
            for act in ("gelu", "silu"):
                add(f"linear_gated[{impl}]", f"gate * up ({act}) N={s_q} (query layers)",
                    lambda act=act: (e(batch, s_q, d), e(mlp, d), e(mlp), e(mlp, d), e(mlp), act),
                    linear.make_linear_gated(impl == "triton"), linear.linear_gated_guard)
    else:
        op, att = "attention", (attention.attention, attention.attention_guard)

        def rope() -> tuple:
            return ()

    def qkv_args(seq: int, *rest) -> tuple:
        return (e(batch, seq, 3 * d), heads, *rope(), *rest)

    add(op, f"unmasked N={s_enc} (early layers)", lambda: qkv_args(s_enc, None, 0, 0), *att)
    add(op, f"unmasked N={s_q} (VidEoMT query layers)", lambda: qkv_args(s_q, None, 0, 0), *att)
    add(op, f"unmasked N={s_q} (EoMT, masks off)", lambda: qkv_args(s_q, None, nq, nq + prefix), *att)
    add(op, f"masked N={s_q} (EoMT mask bits)",
        lambda: qkv_args(s_q, torch.empty(batch, nq, words, dtype=torch.int32, device=device), nq, nq + prefix), *att)
    add("mask_bits", f"logits ({batch},{nq},{up * gh},{up * gw}) -> grid {gh}x{gw}",
        lambda: (e(batch, nq, up * gh, up * gw), (gh, gw)), mask_bits.mask_bits, mask_bits.mask_bits_guard)
    qu = (query_update.query_update, query_update.query_update_guard)
    add("query_update", "table only (EoMT, VidEoMT frame 0)", lambda: (e(batch, s_q, d), e(nq, d)), *qu)
    add("query_update", "prev = query rows of the last buffer (VidEoMT t > 0)",
        lambda: (e(batch, s_q, d), e(nq, d), e(batch, s_q, d)[:, :nq], e(d, d), e(d)), *qu)
    add("query_update", "prev contiguous (VidEoMT t > 0, graphed session)",
        lambda: (e(batch, s_q, d), e(nq, d), e(batch, nq, d), e(d, d), e(d)), *qu)
    return cases


class GuardRejected(RuntimeError):
    pass


def capture(cases: Sequence[Case] | None = None, *, check_guards: bool = True) -> list[Launch]:
    """Run every case's entry point with launches recorded (not executed); returns every launch made.

    Raises :class:`GuardRejected` when a guard refuses a case's inputs (on a GPU the dispatcher would
    run the reference there, so the kernel launch captured would not be the one that runs).
    """
    cases = launch_cases() if cases is None else cases
    launches: list[Launch] = []
    with recording() as recorded, mock.patch.object(torch.nn.functional, "linear", _shape_only_linear), \
            torch.no_grad():
        for case in cases:
            args = case.make()
            if check_guards:
                with _env("TRITON_INTERPRET", "1"):  # CPU tensors pass the device check only here
                    why = case.guard(*args)
                if why is not None:
                    raise GuardRejected(f"{case.name}: the triton guard refuses these inputs: {why}")
            _current_case.append(case.name)
            start = len(recorded)
            try:
                with _env("TRITON_INTERPRET", "0"):  # launch parameters as on a GPU (no INTERP_BF16)
                    case.call(*args)
            finally:
                _current_case.pop()
            if len(recorded) == start:
                raise RuntimeError(f"{case.name}: no kernel launch recorded")
            del args
        launches.extend(recorded)
    return launches


def assert_no_unsupported_wrappers() -> None:
    """The kernel modules hold only plain ``@triton.jit`` kernels or autotuners (which :func:`recording`
    expands into every config); anything else would need its own capture."""
    for mod in KERNEL_MODULES.values():
        for name, obj in vars(mod).items():
            if isinstance(obj, KernelInterface) and not isinstance(
                    obj, (JITFunction, InterpretedFunction, Autotuner, Heuristics)):
                raise TypeError(f"{mod.__name__}.{name}: {type(obj).__name__} launches are not captured")


# ------------------------------------------------------------------ compiling


def _triton_bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_CUOBJDUMP_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def ptxas_usage(ptx: str, arch: int, options) -> dict[str, int]:
    """``ptxas -v`` on the PTX with the ptxas binary and flags Triton's ``make_cubin`` uses."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        debug = ["-lineinfo", "-suppress-debug-info"] if knobs.compilation.disable_line_info else ["-lineinfo"]
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        extra = options.ptx_options.split(" ") if options.ptx_options else []
        cmd = [get_ptxas(arch).path, *debug, *fmad, "-v", "--regAllocOptLevel=2", *extra,
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", out]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    if _PTXAS_RE["registers"].search(log) is None:
        raise RuntimeError(f"ptxas -v: no register count in {log!r}")
    usage = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        usage[key] = int(m.group(1)) if m else 0  # ptxas leaves out the spill line of a spill-free kernel
    return usage


def cuobjdump_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_triton_bin("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    m = _CUOBJDUMP_RE.search(text)
    if m is None:
        raise RuntimeError(f"cuobjdump: no resource usage in {text!r}")
    reg, stack, shared, local = (int(g) for g in m.groups())
    return {"cuobjdump_registers": reg, "cuobjdump_stack": stack, "static_shared": shared, "local": local}


def _jit_function(kernel: str) -> JITFunction:
    import importlib

    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{kernel} is a {type(fn).__name__}, not a JITFunction: compile in a process without "
                           "TRITON_INTERPRET=1 (see compile_in_subprocess)")
    return fn


def compile_launch(launch: Launch, arch: int = 90, *, resources: bool = True) -> dict[str, Any]:
    """Compile one launch for ``sm_<arch>``; a result row (``ok`` False with ``error`` on failure)."""
    from triton.compiler import ASTSource

    row: dict[str, Any] = {
        "kernel": launch.name,
        "module": launch.module,
        "arch": arch,
        "config": launch.describe(),
        "num_warps": launch.options.get("num_warps"),
        "num_stages": launch.options.get("num_stages"),
        "constexprs": {k: v for k, v in launch.constexprs.items() if launch.signature.get(k) == "constexpr"},
        "signature": launch.signature,
        "ops": launch.ops,
        "cases": launch.cases,
    }
    start = time.perf_counter()
    quiet = io.StringIO()  # Triton prints the whole PTX when ptxas fails; keep it for the error only
    try:
        fn = _jit_function(launch.kernel)
        names = fn.arg_names
        src = ASTSource(fn, dict(launch.signature),
                        constexprs={(names.index(k),): v for k, v in launch.constexprs.items()},
                        attrs={(names.index(k),): v for k, v in launch.attrs.items()})
        with contextlib.redirect_stdout(quiet):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
        cubin = compiled.asm.get("cubin", b"")
        if not cubin:
            raise RuntimeError("no cubin produced")
        shared = int(compiled.metadata.shared)
        limit = SHARED_LIMIT.get(arch)
        row.update(ok=True, error=None, cubin_bytes=len(cubin), dynamic_shared=shared, shared_limit=limit,
                   fits_shared=limit is None or shared <= limit)
        if resources:
            options = _cuda_backend(arch).parse_options(dict(launch.options))
            row.update(ptxas_usage(compiled.asm["ptx"], arch, options))
            row.update(cuobjdump_usage(cubin))
            row["spills"] = row["spill_stores"] > 0 or row["spill_loads"] > 0
    except Exception as exc:  # noqa: BLE001 - every failure is a result row
        text = f"{type(exc).__name__}: {exc}"
        printed = quiet.getvalue()
        if printed:
            text += "\n" + printed[:2000]
        row.update(ok=False, error=text[:8000])
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _compile_task(item):
    launch_json, arch, resources = item
    return compile_launch(Launch.from_json(launch_json), arch, resources=resources)


def compile_launches(launches: Sequence[Launch], archs: Sequence[int] = (90,), *, jobs: int | None = None,
                     resources: bool = True) -> list[dict[str, Any]]:
    """Compile every launch for every arch (``jobs`` worker processes, default one per CPU)."""
    items = [(launch.to_json(), arch, resources) for arch in archs for launch in launches]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(items)))
    if jobs == 1:
        return [_compile_task(item) for item in items]
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(_compile_task, items))


def compile_in_subprocess(launches: Sequence[Launch], archs: Sequence[int] = (90,), *, jobs: int | None = None,
                          timeout: float = 1800) -> list[dict[str, Any]]:
    """:func:`compile_launches` in a fresh Python without ``TRITON_INTERPRET`` (usable from an interpreter-mode
    process, e.g. pytest on a CPU-only machine)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__import__("videomt_fast").__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "launches.json"), os.path.join(tmp, "results.json")
        with open(src, "w") as f:
            json.dump([launch.to_json() for launch in launches], f)
        cmd = [sys.executable, "-m", "videomt_fast.testing.triton_compile", "--launches", src, "--json", out,
               "--quiet", *[a for arch in archs for a in ("--arch", str(arch))]]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode not in (0, 1) or not os.path.exists(out):
            raise RuntimeError(f"compile subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                               f"{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)["results"]


# ------------------------------------------------------------------ reporting


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'arch':>4} {'kernel':<20} {'ok':<4} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem dyn':>8} " \
           f"{'smem st':>7} {'secs':>5}  config"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (-r["arch"], r["kernel"], r["config"])):
        if r["ok"]:
            lines.append(
                f"{r['arch']:>4} {r['kernel']:<20} {'ok':<4} {r.get('registers', ''):>4} "
                f"{str(r.get('spill_stores', '')) + '/' + str(r.get('spill_loads', '')):>11} "
                f"{r.get('stack_frame', ''):>5} {r.get('dynamic_shared', ''):>8} {r.get('static_shared', ''):>7} "
                f"{r['seconds']:>5.1f}  {r['config']}")
        else:
            lines.append(f"{r['arch']:>4} {r['kernel']:<20} FAIL {'':>4} {'':>11} {'':>5} {'':>8} {'':>7} "
                         f"{r['seconds']:>5.1f}  {r['config']}\n      {r['error'].splitlines()[0][:300]}")
    return "\n".join(lines)


def write_json(path: str, rows: Sequence[dict[str, Any]], **meta: Any) -> None:
    data = {"triton": triton.__version__, "torch": torch.__version__, **meta, "results": list(rows)}
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videomt_fast.testing.triton_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable; "
                        "default 90)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--launches", help="compile the launches in this JSON file (from capture) instead")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per CPU)")
    parser.add_argument("--json", help="write the result table here")
    parser.add_argument("--no-resources", action="store_true", help="skip ptxas -v / cuobjdump")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if ops.triton_interpreting():
        parser.error("run without TRITON_INTERPRET=1 (kernels must be JITFunctions to compile)")
    archs = args.arch or [90]
    start = time.perf_counter()
    if args.launches:
        with open(args.launches) as f:
            launches = [Launch.from_json(d) for d in json.load(f)]
    else:
        launches = dedupe(capture(launch_cases(args.models, args.batches, args.dtypes)))
    rows = compile_launches(launches, archs, jobs=args.jobs, resources=not args.no_resources)
    elapsed = time.perf_counter() - start
    if args.json:
        write_json(args.json, rows, archs=archs, seconds=round(elapsed, 1), unique_launches=len(launches))
    if not args.quiet:
        print(format_table(rows))
        failed = sum(not r["ok"] for r in rows)
        spills = sum(bool(r.get("spills")) for r in rows)
        print(f"\n{len(launches)} unique launches x {len(archs)} arch(s): {failed} failed, {spills} spill; "
              f"{elapsed:.1f} s")
    return 1 if any(not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
