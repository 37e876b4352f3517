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
mask_bits              mask_bits.py                 bilinear resize + ``> 0`` + bit packing
layer_norm             layer_norm.py                one pass, fp32 statistics
residual_layer_norm    layer_norm.py                ``x += scale * f`` and LayerNorm, one pass
linear_gelu            linear.py                    cuBLAS + GELU pass, or Triton GEMM epilogue
linear_residual        linear.py                    cuBLAS + scale/residual pass, or Triton GEMM
query_update           query_update.py              GEMM + bias + table into the token buffer
=====================  ===========================  =========================================
"""

from __future__ import annotations

# This folder is installed as ``videomt_fast.kernels``. In a source checkout it is also visible as a
# top-level ``kernels``, the name of another PyPI package (transformers probes for it and may import
# it): under that name it stays inert, so no kernel is registered twice and nothing claims to be that
# package.
__version__ = "N/A"

if __name__ == "videomt_fast.kernels":
    from videomt_fast import ops, reference  # noqa: F401  (reference declares the ops)

    from . import attention, layer_norm, linear, mask_bits, query_update

    _attention, _layer_norm, _linear, _mask_bits, _query_update = attention, layer_norm, linear, mask_bits, query_update

    GEMM = _linear.gemm_choice()  # "cublas" or "triton": the implementation registered for the GEMM epilogues
    _TRITON_GEMM = GEMM == "triton"

    # The package's attributes named after ops are its kernel modules (``videomt_fast.kernels.attention``
    # is the module); the functions registered with ops live in them.
    ops.register_impl("attention", "triton", _attention.attention, _attention.attention_guard)
    ops.register_impl("mask_bits", "triton", _mask_bits.mask_bits, _mask_bits.mask_bits_guard)
    ops.register_impl("layer_norm", "triton", _layer_norm.layer_norm, _layer_norm.layer_norm_guard)
    ops.register_impl("residual_layer_norm", "triton", _layer_norm.residual_layer_norm, _layer_norm.residual_layer_norm_guard)
    ops.register_impl("linear_gelu", "triton", _linear.make_linear_gelu(_TRITON_GEMM), _linear.linear_gelu_guard)
    ops.register_impl("linear_residual", "triton", _linear.make_linear_residual(_TRITON_GEMM), _linear.linear_residual_guard)
    ops.register_impl("query_update", "triton", _query_update.query_update, _query_update.query_update_guard)

    __all__ = ["GEMM", "attention", "layer_norm", "linear", "mask_bits", "query_update"]
else:
    __all__ = []
