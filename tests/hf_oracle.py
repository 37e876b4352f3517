"""transformers' VidEoMT post-processing as the oracle, run without torchvision where it is missing.

See :mod:`videomt_fast.apps.hf_source`: the methods that run are transformers' own, unmodified.
"""

from __future__ import annotations

from types import SimpleNamespace

from videomt_fast.apps import hf_source

_CACHE: dict[str, SimpleNamespace] = {}


def load() -> SimpleNamespace:
    """``SimpleNamespace(processor=<transformers' VideomtVideoProcessor instance>, how=<where it came from>)``."""
    if "oracle" not in _CACHE:
        processor, how = hf_source.videomt_video_processor()
        _CACHE["oracle"] = SimpleNamespace(processor=processor, how=how)
    return _CACHE["oracle"]
