"""Ops: the registry of fused ops, their plain-PyTorch references, and the compiled-kernel bindings.

The bottom layer of the package: it imports nothing else of videomt_fast. Every fused op is declared
here with its reference (:mod:`.reference`, :mod:`.postprocess`); fast implementations register
themselves as backends (Triton in ``videomt_fast.kernels``, CUDA in :mod:`.cuda`).
"""

from videomt_fast.ops.registry import (  # noqa: F401
    BACKENDS,
    DISPATCH,
    OpTable,
    backend_report,
    call,
    candidates,
    choose,
    define_op,
    exclude,
    exclusions,
    explain,
    load_errors,
    op_names,
    preload_backends,
    register_backend_module,
    register_candidate,
    register_impl,
    unregister_candidate,
    triton_interpreting,
    use_backend,
)
from videomt_fast.ops import reference  # noqa: E402,F401  (declares the model ops)
from videomt_fast.ops import postprocess  # noqa: E402,F401  (declares the post-processing ops)
