"""Triton kernels of videomt_fast (installed as ``videomt_fast.kernels``).

Importing this module registers every kernel as a ``torch.library`` custom op (namespace
``videomt_fast``, with fake implementations so ``torch.compile`` traces through them) and as the
``"triton"`` backend of the matching op in :mod:`videomt_fast.ops`, each behind a guard that names
the precondition an input fails (the dispatcher then runs the reference). Switch single kernels off
with ``VIDEOMT_FAST_DISABLE=attention,...`` or all of them with ``VIDEOMT_FAST_DISABLE=triton``;
``VIDEOMT_FAST_GEMM=cublas|triton`` picks the GEMM-epilogue implementation (see :mod:`.linear`).

=====================  ===========================  =========================================
op                     kernel file                  fast path
=====================  ===========================  =========================================
attention              attention.py                 flash-style, fused-QKV strides, mask bits
rope_attention         attention.py                 the same, DINOv3's rotary embedding in the Q/K load
mask_bits              mask_bits.py                 bilinear resize + ``> 0`` + bit packing
layer_norm             layer_norm.py                one pass, fp32 statistics
residual_layer_norm    layer_norm.py                ``x += scale * f`` and LayerNorm, one pass
linear_gelu            linear.py                    cuBLAS + GELU pass, or Triton GEMM epilogue
linear_residual        linear.py                    cuBLAS + scale/residual pass, or Triton GEMM
linear_gated           linear.py                    cuBLAS x2 + act(gate)*up pass, or one two-accumulator GEMM
query_update           query_update.py              GEMM + bias + table into the token buffer
=====================  ===========================  =========================================
"""

from __future__ import annotations

# This folder is installed as ``videomt_fast.kernels``. In a source checkout run from its root it is also
# visible as a top-level ``kernels``, the name of another PyPI package that transformers imports when it is
# installed. Under that name this folder hands the import over to that package (found on the rest of
# sys.path), or stays inert when it is not installed: no kernel is registered twice, and transformers
# never mistakes this folder for that package.


def _defer_to_installed_package(name: str) -> bool:
    """Load the installed package ``name`` in place of this folder; False when there is none."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.origin is None or os.path.dirname(os.path.abspath(spec.origin)) == os.path.dirname(
        os.path.abspath(__file__)
    ):
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds when this file ends
    spec.loader.exec_module(module)
    return True

if __name__ == "videomt_fast.kernels":
    from videomt_fast import ops  # noqa: F401  (declares the ops)

    from . import attention, layer_norm, linear, mask_bits, query_update

    _attention, _layer_norm, _linear, _mask_bits, _query_update = attention, layer_norm, linear, mask_bits, query_update

    GEMM = _linear.gemm_choice()  # "cublas" or "triton": the implementation registered for the GEMM epilogues
    _TRITON_GEMM = GEMM == "triton"

    # The package's attributes named after ops are its kernel modules (``videomt_fast.kernels.attention``
    # is the module); the functions registered with ops live in them.
    ops.register_impl("attention", "triton", _attention.attention, _attention.attention_guard)
    ops.register_impl("rope_attention", "triton", _attention.rope_attention, _attention.rope_attention_guard)
    ops.register_impl("mask_bits", "triton", _mask_bits.mask_bits, _mask_bits.mask_bits_guard)
    ops.register_impl("layer_norm", "triton", _layer_norm.layer_norm, _layer_norm.layer_norm_guard)
    ops.register_impl("residual_layer_norm", "triton", _layer_norm.residual_layer_norm, _layer_norm.residual_layer_norm_guard)
    ops.register_impl("linear_gelu", "triton", _linear.make_linear_gelu(_TRITON_GEMM), _linear.linear_gelu_guard)
    ops.register_impl("linear_residual", "triton", _linear.make_linear_residual(_TRITON_GEMM), _linear.linear_residual_guard)
    ops.register_impl("query_update", "triton", _query_update.query_update, _query_update.query_update_guard)
    ops.register_impl("linear_gated", "triton", _linear.make_linear_gated(_TRITON_GEMM), _linear.linear_gated_guard)
    # execution plans time the other GEMM-epilogue variant too, and keep whichever wins on the device
    _OTHER = "triton-epilogue" if _TRITON_GEMM else "triton-gemm"
    ops.register_candidate("linear_gelu", _OTHER, _linear.make_linear_gelu(not _TRITON_GEMM), _linear.linear_gelu_guard)
    ops.register_candidate("linear_residual", _OTHER, _linear.make_linear_residual(not _TRITON_GEMM),
                           _linear.linear_residual_guard)
    ops.register_candidate("linear_gated", _OTHER, _linear.make_linear_gated(not _TRITON_GEMM), _linear.linear_gated_guard)

    __all__ = ["GEMM", "attention", "layer_norm", "linear", "mask_bits", "query_update"]
else:
    __version__ = "N/A"
    __all__ = []
    _defer_to_installed_package(__name__)
