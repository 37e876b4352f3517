"""Helpers shared by the Triton kernels: guards' building blocks and launch-time flags."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from videomt_fast.ops import registry as ops

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return ops.triton_interpreting()


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a loop bound with ``int()`` of a one-element array,
    which NumPy 2.4 and newer refuse ("only 0-dimensional arrays can be converted to Python scalars"), so
    every kernel that loops to a runtime bound fails there; Triton 3.7 squeezes the array first. Same
    fix for older versions, in the interpreter only (compiled kernels never see it)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreting() and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7):
    _fix_interpreter_index()


def interp_bf16(dtype: torch.dtype) -> bool:
    """Whether kernels must work around the CPU interpreter's bf16 support (constexpr ``INTERP_BF16``).

    Triton's interpreter (3.x, numpy underneath) has two bf16 defects: ``tl.dot`` on bf16 operands
    returns garbage, and fp32 -> bf16 conversion truncates instead of rounding to nearest even. Under
    ``TRITON_INTERPRET=1`` with bf16 tensors, kernels therefore upcast bf16 tiles to fp32 before
    ``tl.dot`` (exact) and round to bf16 with :func:`to_bf16_rne` before converting (exact too), so the
    interpreter computes what the GPU computes. On a GPU the flag is never set and the code is plain.
    """
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def to_bf16_rne(x):
    """fp32 -> fp32 value rounded to the nearest bf16 (ties to even); its bf16 conversion is then exact."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_to(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``x.to(dtype)`` that rounds to nearest under the interpreter's bf16 too."""
    if INTERP_BF16:
        x = to_bf16_rne(x.to(tl.float32))
    return x.to(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 ("ieee") for fp32 tensors, never silent TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_reason(*tensors: torch.Tensor) -> str | None:
    """None when every tensor lives where a Triton kernel can read it (CUDA, or CPU in the interpreter)."""
    first = tensors[0].device
    for t in tensors:
        if t.device != first:
            return f"tensors on different devices ({first} and {t.device})"
    if first.type == "cuda":
        return None
    if first.type == "cpu" and interpreting():
        return None
    return f"tensors on {first.type}; triton kernels need CUDA (or TRITON_INTERPRET=1)"


# VIDEOMT_FAST_CHECK_LAUNCHES=1 (read at import): wait for every kernel after its launch, so that a kernel
# that faults is named in the error instead of surfacing in whatever CUDA call comes next (debugging only)
CHECK_LAUNCHES = os.environ.get("VIDEOMT_FAST_CHECK_LAUNCHES", "0") == "1"


def launch_device(device: torch.device, kernel: str = ""):
    """The context every launcher wraps its ``kernel[grid](...)`` in: ``device`` made current.

    Triton launches on ``torch.cuda.current_device()`` and that device's current stream, not on the
    tensors' device, so tensors on ``cuda:1`` with ``cuda:0`` current would be read by a kernel on the
    wrong GPU. CPU tensors (the interpreter) need nothing. With :data:`CHECK_LAUNCHES` the launch is also
    synchronized (outside graph capture) and a failure names ``kernel``.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    if CHECK_LAUNCHES:
        return _checked_launch(device, kernel)
    return torch.cuda.device(device)


@contextlib.contextmanager
def _checked_launch(device: torch.device, kernel: str):
    with torch.cuda.device(device):
        yield
        if torch.cuda.is_current_stream_capturing():
            return
        try:
            torch.cuda.current_stream(device).synchronize()
        except RuntimeError as exc:
            raise RuntimeError(f"videomt_fast Triton kernel {kernel} failed on {device} "
                               f"(VIDEOMT_FAST_CHECK_LAUNCHES=1): {exc}") from exc


INDEX_MARGIN = 256  # the last block of a launch indexes up to one block (<= 256 rows or words) past the end


def int32_offsets_ok(*extents: int) -> bool:
    """True when every index a kernel computes in 32-bit arithmetic (each ``extent``: the largest such
    index + 1) fits in int32 with :data:`INDEX_MARGIN` to spare; the kernels form offsets that scale with
    the batch or the row count in int64, so those are not passed here."""
    return all(0 <= e <= 2**31 - INDEX_MARGIN for e in extents)


def span(t: torch.Tensor, dims: slice = slice(None)) -> int:
    """1 + the largest element offset of ``t`` over dimensions ``dims`` (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[dims], t.stride()[dims]))


def dtype_reason(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> str | None:
    if dtype is None:
        if t.dtype not in FLOAT_DTYPES:
            return f"{name} dtype {t.dtype} (needs float32, float16 or bfloat16)"
        return None
    if t.dtype != dtype:
        return f"{name} dtype {t.dtype} differs from {dtype}"
    return None


def first_reason(*reasons: str | None) -> str | None:
    for r in reasons:
        if r is not None:
            return r
    return None


def env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower() or default
