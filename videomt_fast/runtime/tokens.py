"""Tokens of the weights a compiled artifact (a CUDA graph, a compiled frame step) reads by address.

A graph or a compiled step that binds the model's tensors must not run on weights that were replaced
since (a move, a cast, ``module.weight = Parameter(...)``, ``param.data = ...``). Per call the owner
compares the cheap :func:`weights_token`; at capture or binding, and at the first frame of each video,
the addresses of every tensor (:func:`full_weights_token`).
"""

from __future__ import annotations

from typing import Any

import torch

_REGISTRATIONS = [0]  # bumped by every parameter or buffer (re)registration, process-wide


def _bump(*_: Any) -> None:
    _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump)


def registrations() -> int:
    """How many parameter or buffer (re)registrations this process has seen."""
    return _REGISTRATIONS[0]


def weights_token(model) -> tuple:
    """Cheap per-step token of the weights: the registration counter, and the first and last weight's
    address, dtype and device (a move or cast changes them)."""
    first, last = model.embeddings.cls_token, model.class_predictor.weight
    return _REGISTRATIONS[0], first.data_ptr(), last.data_ptr(), first.dtype, first.device


def full_weights_token(model) -> tuple:
    """The address, dtype and device of every parameter and buffer."""
    return tuple((t.data_ptr(), t.dtype, t.device) for t in list(model.parameters()) + list(model.buffers()))
