"""The one dispatch point: which implementation runs each fused op.

Every op has a plain-PyTorch reference (``videomt_fast.ops.reference``) and may have fast
implementations registered under a backend name (``"triton"``, ``"cuda"``). For each call the
dispatcher walks the backends in priority order and takes the first one that is enabled, whose
module imports, and whose guard accepts the inputs; otherwise it runs the reference.

Switches (read on every call, so tests can flip them with ``monkeypatch.setenv``):

* ``VIDEOMT_FAST_BACKEND=reference|triton|cuda|auto`` forces one backend for every op
  (an op without that backend runs its reference);
* ``VIDEOMT_FAST_DISABLE=op_or_backend,...`` turns off single ops (``attention``) or whole
  backends (``triton``);
* :func:`use_backend` does the same as the first, as a context manager.

:func:`explain` answers "which backend runs op X on these inputs, and why";
:func:`backend_report` answers it for every op on a device.

Per-call dispatch is the path of code that has no execution plan (tests, the CPU reference, an
unoptimized model). An execution plan (:mod:`videomt_fast.runtime.plans`) instead picks one of
:func:`candidates` per op site, after verifying and timing each on the device, and installs the chosen
callables in the modules' :class:`OpTable`: a planned frame calls them directly, with no environment
read, guard or backend walk. A candidate a plan found wrong is :func:`exclude`-d here, so per-call
dispatch (post-processing, for one) never picks it either.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

BACKENDS = ("cuda", "triton")  # priority order of the fast backends
_ALL_BACKENDS = ("reference",) + BACKENDS

Guard = Callable[..., "str | None"]  # returns None when the inputs are accepted, else a reason


@dataclass
class _Impl:
    fn: Callable | None
    guard: Guard | None
    module: str | None  # module that registers the implementation when imported
    load_error: str | None = None
    devices: tuple[str, ...] = ("cuda",)  # where a plan may try it (plan-only candidates)


@dataclass
class _Op:
    name: str
    ref: Callable
    doc: str
    impls: dict[str, _Impl] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}
# extra implementations only plans choose from: op -> {candidate name: _Impl} (library baselines such as
# SDPA with one backend, or a kernel's second variant); never picked by per-call dispatch
_CANDIDATES: dict[str, dict[str, _Impl]] = {}
_EXCLUDED: dict[tuple[str, str], str] = {}  # (op, backend) -> why a plan excluded it on this machine
_LOCK = threading.Lock()
_forced = threading.local()

# Modules that register fast implementations; imported lazily, on the first call that could
# use them, so that importing videomt_fast never imports Triton or loads a CUDA library.
_BACKEND_MODULES: dict[str, list[str]] = {"triton": [], "cuda": []}
_loaded_modules: dict[str, str | None] = {}  # module -> import error (None when it imported)


def define_op(name: str, ref: Callable, doc: str = "") -> None:
    """Declare an op with its reference implementation."""
    _OPS[name] = _Op(name=name, ref=ref, doc=doc or (ref.__doc__ or "").strip().split("\n")[0])


def register_backend_module(backend: str, module: str) -> None:
    """Name a module that, when imported, calls :func:`register_impl` for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if module not in _BACKEND_MODULES[backend]:
        _BACKEND_MODULES[backend].append(module)


def register_impl(name: str, backend: str, fn: Callable, guard: Guard | None = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of op ``name``.

    ``guard(*args, **kwargs)`` returns ``None`` when ``fn`` can take the inputs, else a short reason.
    """
    if name not in _OPS:
        raise KeyError(f"unknown op {name!r}; known ops: {sorted(_OPS)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _OPS[name].impls[backend] = _Impl(fn=fn, guard=guard, module=None)


def register_candidate(name: str, candidate: str, fn: Callable, guard: Guard | None = None,
                       devices: tuple[str, ...] = ("cuda",)) -> None:
    """Offer ``fn`` to execution plans as implementation ``candidate`` of op ``name`` on ``devices`` (never
    used by per-call dispatch). ``guard`` as in :func:`register_impl`."""
    if name not in _OPS:
        raise KeyError(f"unknown op {name!r}; known ops: {sorted(_OPS)}")
    if candidate in _ALL_BACKENDS:
        raise ValueError(f"candidate name {candidate!r} is a backend name; register it with register_impl")
    _CANDIDATES.setdefault(name, {})[candidate] = _Impl(fn=fn, guard=guard, module=None, devices=tuple(devices))


def unregister_candidate(name: str, candidate: str) -> None:
    _CANDIDATES.get(name, {}).pop(candidate, None)


def candidates(name: str, device: str | torch.device) -> dict[str, tuple[Callable, Guard | None]]:
    """Every implementation of op ``name`` a plan may try on ``device``: ``{name: (fn, guard)}``, the
    reference first. Backends and candidates disabled by ``VIDEOMT_FAST_DISABLE`` are left out, and so
    are the fast ones when ``VIDEOMT_FAST_BACKEND=reference``."""
    device = torch.device(device)
    op = _OPS[name]
    found: dict[str, tuple[Callable, Guard | None]] = {"reference": (op.ref, None)}
    forced, disabled = _forced_backend(), _disabled()
    if forced == "reference" or name in disabled:
        return found
    for backend in BACKENDS:
        if backend in disabled or (forced != "auto" and forced != backend):
            continue
        if device.type != "cuda" and not (backend == "triton" and triton_interpreting() and forced == "triton"):
            continue  # off CUDA, Triton only in its interpreter and only when forced (tests)
        _load_backend(backend)
        impl = op.impls.get(backend)
        if impl is not None:
            found[backend] = (impl.fn, impl.guard)
    if forced == "auto":
        for cand, impl in _CANDIDATES.get(name, {}).items():
            if device.type in impl.devices and cand not in disabled and cand.split("-")[0] not in disabled:
                found[cand] = (impl.fn, impl.guard)
    return found


def exclude(name: str, backend: str, why: str) -> None:
    """Keep per-call dispatch off ``backend`` for op ``name`` in this process (a plan found it wrong)."""
    _EXCLUDED[(name, backend)] = why


def exclusion_count() -> int:
    """How many (op, backend) pairs are excluded in this process (exclusions are only ever added)."""
    return len(_EXCLUDED)


def forced_override() -> str | None:
    """The backend a :func:`use_backend` context forces in this thread (None outside one); no environment read."""
    return getattr(_forced, "value", None)


def exclusions() -> dict[str, str]:
    """``{"op/backend": why}`` for every implementation excluded in this process."""
    return {f"{op}/{backend}": why for (op, backend), why in _EXCLUDED.items()}


class OpTable:
    """The op callables one module calls: attribute ``<op name>``.

    :data:`DISPATCH` (every module's default) resolves each call through :func:`call`; an execution
    plan installs tables whose attributes are the implementations it chose, called directly.
    """

    def __init__(self, fns: dict[str, Callable] | None = None, label: str = "plan"):
        self.__dict__.update(fns or {})
        self._label = label

    def __getattr__(self, name: str) -> Callable:  # only reached for ops the table does not name
        if name.startswith("_") or name not in _OPS:
            raise AttributeError(name)
        fn = _dispatcher(name)
        self.__dict__[name] = fn
        return fn

    def __repr__(self) -> str:
        return f"OpTable({self._label})"

    def __reduce__(self):  # a pickled or copied model dispatches per call: plans belong to a process
        return (_dispatch_table, ())


def _dispatcher(name: str) -> Callable:
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        return call(name, *args, **kwargs)

    dispatch.__name__ = f"dispatch_{name}"
    return dispatch


DISPATCH = OpTable(label="per-call dispatch")


def _dispatch_table() -> OpTable:
    return DISPATCH


def _load_backend(backend: str) -> list[str]:
    """Import the modules of ``backend`` once; return their import errors."""
    errors = []
    for module in _BACKEND_MODULES.get(backend, []):
        if module not in _loaded_modules:
            with _LOCK:
                if module not in _loaded_modules:
                    try:
                        importlib.import_module(module)
                        _loaded_modules[module] = None
                    except Exception as exc:  # a missing triton or a broken build must not break the package
                        _loaded_modules[module] = f"{type(exc).__name__}: {exc}"
        if _loaded_modules[module] is not None:
            errors.append(f"{module}: {_loaded_modules[module]}")
    return errors


def _forced_backend() -> str:
    forced = getattr(_forced, "value", None)
    if forced is None:
        forced = os.environ.get("VIDEOMT_FAST_BACKEND", "auto").strip().lower() or "auto"
    if forced not in _ALL_BACKENDS + ("auto",):
        raise ValueError(f"VIDEOMT_FAST_BACKEND must be one of {_ALL_BACKENDS + ('auto',)}, got {forced!r}")
    return forced


def _disabled() -> set[str]:
    raw = os.environ.get("VIDEOMT_FAST_DISABLE", "")
    return {item.strip().lower() for item in raw.split(",") if item.strip()}


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_reason(backend: str, tensor: torch.Tensor | None) -> str | None:
    """Why ``backend`` cannot run on ``tensor``'s device (None when it can).

    Triton kernels run on CPU tensors only in the interpreter and only when forced
    (``use_backend("triton")`` / ``VIDEOMT_FAST_BACKEND=triton``): tests use that to check them,
    while ``auto`` keeps CPU work on the reference path.
    """
    if tensor is None or tensor.device.type == "cuda":
        return None
    if backend == "triton" and triton_interpreting() and _forced_backend() == "triton":
        return None
    return f"inputs are on {tensor.device.type}, {backend} needs CUDA" + (
        " (or TRITON_INTERPRET=1 with the triton backend forced)" if backend == "triton" else ""
    )


def choose(name: str, *args: Any, **kwargs: Any) -> tuple[str, Callable, str]:
    """Return ``(backend, fn, reason)`` for a call of op ``name`` with these inputs."""
    op = _OPS[name]
    forced = _forced_backend()
    disabled = _disabled()
    if forced == "reference":
        return "reference", op.ref, "forced by VIDEOMT_FAST_BACKEND=reference"
    if name in disabled:
        return "reference", op.ref, f"op disabled by VIDEOMT_FAST_DISABLE={name}"
    tensor = _first_tensor(args, kwargs)
    reasons = []
    candidates = BACKENDS if forced == "auto" else (forced,)
    for backend in candidates:
        if backend in disabled:
            reasons.append(f"{backend}: disabled by VIDEOMT_FAST_DISABLE")
            continue
        if (name, backend) in _EXCLUDED:
            reasons.append(f"{backend}: excluded by a plan ({_EXCLUDED[(name, backend)]})")
            continue
        device_reason = _device_reason(backend, tensor)
        if device_reason is not None:
            reasons.append(f"{backend}: {device_reason}")
            continue
        errors = _load_backend(backend)
        impl = op.impls.get(backend)
        if impl is None:
            reasons.append(f"{backend}: no implementation" + (f" ({'; '.join(errors)})" if errors else ""))
            continue
        if impl.guard is not None:
            why = impl.guard(*args, **kwargs)
            if why is not None:
                reasons.append(f"{backend}: {why}")
                continue
        return backend, impl.fn, "preconditions met"
    return "reference", op.ref, "; ".join(reasons) or "no fast backend"


def call(name: str, *args: Any, **kwargs: Any) -> Any:
    """Run op ``name`` on the backend :func:`choose` picks."""
    _, fn, _ = choose(name, *args, **kwargs)
    return fn(*args, **kwargs)


def explain(name: str, *args: Any, **kwargs: Any) -> str:
    """One line: which backend runs op ``name`` on these inputs, and why."""
    backend, _, reason = choose(name, *args, **kwargs)
    return f"{name}: {backend} ({reason})"


def backend_report(device: str | torch.device = "cpu") -> dict[str, dict[str, Any]]:
    """For every op: the backends it has and the one the dispatcher would try first on ``device``.

    Guards depend on shapes and dtypes, so this is the device-level answer; :func:`explain` gives the
    per-call one.
    """
    device = torch.device(device)
    probe = torch.empty(0) if device.type != "cuda" else None
    report = {}
    forced = _forced_backend()
    disabled = _disabled()
    for backend in BACKENDS:
        if backend not in disabled:
            _load_backend(backend)
    for name, op in sorted(_OPS.items()):
        chosen, why = "reference", "no fast implementation applies"
        if forced == "reference":
            why = "forced by VIDEOMT_FAST_BACKEND=reference"
        elif name in disabled:
            why = f"op disabled by VIDEOMT_FAST_DISABLE={name}"
        else:
            reasons = []
            for backend in BACKENDS if forced == "auto" else (forced,):
                if backend in disabled:
                    reasons.append(f"{backend}: disabled")
                elif (name, backend) in _EXCLUDED:
                    reasons.append(f"{backend}: excluded by a plan ({_EXCLUDED[(name, backend)]})")
                elif backend not in op.impls:
                    reasons.append(f"{backend}: no implementation")
                elif device.type != "cuda" and _device_reason(backend, probe) is not None:
                    reasons.append(f"{backend}: {_device_reason(backend, probe)}")
                else:
                    chosen, why = backend, "available (per-call guards still apply)"
                    break
            else:
                why = "; ".join(reasons) or why
        report[name] = {
            "backend": chosen,
            "reason": why,
            "available": ["reference"] + [b for b in BACKENDS if b in op.impls],
            "doc": op.doc,
        }
    return report


def preload_backends() -> dict[str, str]:
    """Import every enabled fast-backend module now (returns their import errors).

    Backends load lazily on first use; call this before ``torch.compile(..., fullgraph=True)`` so that
    the first traced call does not have to import anything.
    """
    disabled = _disabled()
    for backend in BACKENDS:
        if backend not in disabled:
            _load_backend(backend)
    return load_errors()


def load_errors() -> dict[str, str]:
    """Import errors of the fast-backend modules tried so far (module -> error)."""
    return {module: err for module, err in _loaded_modules.items() if err is not None}


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Force ``backend`` (``reference``, ``triton``, ``cuda`` or ``auto``) for every op in this thread."""
    if backend not in _ALL_BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {_ALL_BACKENDS + ('auto',)}, got {backend!r}")
    previous = getattr(_forced, "value", None)
    _forced.value = backend
    try:
        yield
    finally:
        _forced.value = previous


def op_names() -> list[str]:
    return sorted(_OPS)
