"""How the test suite runs the Triton kernels: in the CPU interpreter or compiled for the GPU.

Triton decides once per process, when a kernel is decorated, whether ``@triton.jit`` kernels are
interpreted (``TRITON_INTERPRET=1``) or compiled; the dispatcher runs Triton on CPU tensors only in the
interpreter. The suite needs both kinds of run:

* the CPU tests force the Triton backend on CPU tensors: they need the interpreter, on every machine;
* the ``gpu`` tests (CUDA graphs, compiled kernels, timings) need compiled Triton: an interpreted kernel
  copies its tensors to the host, which is not the kernel under test and breaks graph capture.

So on a CUDA machine one pytest process runs one kind: ``python -m pytest tests`` runs the CPU suite in
the interpreter, with the CUDA devices hidden (``CUDA_VISIBLE_DEVICES=""``, so that no test picks CUDA by
default and runs interpreted kernels on it), and skips the ``gpu`` tests with a reason; ``python -m pytest
tests -m gpu`` runs the GPU tests compiled. ``tests/conftest.py`` applies :func:`triton_mode` before any test module imports a
kernel; the function itself takes the machine as arguments, so a CPU can test every branch.
"""

from __future__ import annotations

import dataclasses

GPU_RUN = "python -m pytest tests -m gpu"
NON_GPU_MARKS = (set(), {"slow"})  # the marker sets a CPU test of this suite can carry


@dataclasses.dataclass(frozen=True)
class TritonMode:
    interpret: bool  # the value TRITON_INTERPRET gets ("1" / "0")
    skip_gpu: str | None  # why the gpu-marked tests are skipped in this run (None: they run)
    why: str  # one line for the report header

    @property
    def env_value(self) -> str:
        return "1" if self.interpret else "0"


def gpu_only(markexpr: str | None) -> bool:
    """True when ``-m markexpr`` selects gpu-marked tests and no test without the gpu mark (e.g. ``-m gpu``,
    ``-m "gpu and not slow"``); False without ``-m``, or when a test that is unmarked or only ``slow``
    would pass the expression (``-m "gpu or slow"`` also runs CPU tests)."""
    if not markexpr or not markexpr.strip():
        return False
    from _pytest.mark.expression import Expression

    expr = Expression.compile(markexpr)
    if not any(expr.evaluate(lambda name, **_: name in marks | {"gpu"}) for marks in NON_GPU_MARKS):
        return False
    return not any(expr.evaluate(lambda name, **_: name in marks) for marks in NON_GPU_MARKS)


def triton_mode(cuda_available: bool, interpret_env: str | None, markexpr: str | None) -> TritonMode:
    """The run's Triton mode from the machine (``cuda_available``), an explicit ``TRITON_INTERPRET``
    (``interpret_env``, None when unset) and the ``-m`` expression."""
    if interpret_env is not None and interpret_env.strip() != "":
        interpret = interpret_env.strip() == "1"
        if interpret and cuda_available:
            return TritonMode(True, "TRITON_INTERPRET=1 is set: the gpu tests need compiled Triton "
                              f"(unset it and run {GPU_RUN})", "interpreter (TRITON_INTERPRET=1 set)")
        return TritonMode(interpret, None, f"{'interpreter' if interpret else 'compiled'} "
                          f"(TRITON_INTERPRET={interpret_env.strip()} set)")
    if not cuda_available:
        return TritonMode(True, None, "interpreter (no CUDA device)")
    if gpu_only(markexpr):
        return TritonMode(False, None, f"compiled for the GPU (-m {markexpr!r} selects gpu tests only)")
    return TritonMode(True, f"gpu tests need compiled Triton and run on their own: {GPU_RUN}",
                      f"interpreter for the CPU tests; the gpu tests run with {GPU_RUN}")
