"""The demo: a small VidEoMT trained by this project on synthetic videos, shipped with the package.

``videomt-fast demo`` writes a synthetic clip and segments it; ``videomt-fast segment --model demo``
uses the same model on any input (the name ``demo`` always means this model; pass ``./demo`` for a
local folder of that name). :mod:`videomt_fast.demo.synthetic` draws the clips and scores results
against their ground truth; ``python -m videomt_fast.demo.train`` trains the model again.
"""

from __future__ import annotations

import os

DEMO_MODEL = "demo"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def resolve_model(name: str) -> str:
    """``"demo"`` -> the packaged demo checkpoint's folder; any other name unchanged."""
    return WEIGHTS_DIR if name == DEMO_MODEL else name


__all__ = ["DEMO_MODEL", "WEIGHTS_DIR", "resolve_model"]
