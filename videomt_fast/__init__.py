"""videomt_fast: transformers' VidEoMT, EoMT and EoMT-DINOv3, same outputs, many times faster.

Change one import::

    from videomt_fast import VideomtForUniversalSegmentation  # was: from transformers import ...
"""

from videomt_fast import ops
from videomt_fast.ops import postprocess  # postprocess declares the post-processing ops
from videomt_fast.model.configuration import PRESETS, EomtConfig, EomtDinov3Config, VideomtConfig, config_from_preset
from videomt_fast.processing.eomt_processor import EomtImageProcessor
from videomt_fast.model.modeling import (
    EomtDinov3ForUniversalSegmentation,
    EomtDinov3ForUniversalSegmentationOutput,
    EomtForUniversalSegmentation,
    EomtForUniversalSegmentationOutput,
    VideomtForUniversalSegmentation,
    VideomtForUniversalSegmentationOutput,
)
from videomt_fast.processing.video_processor import VideomtVideoProcessor
from videomt_fast.runtime.session import VideomtSession
from videomt_fast.processing.tracks import VideoInstance, VideoInstanceAccumulator

__version__ = "0.1.0"


def backend_report(device="cpu"):
    """Which backend (reference / triton / cuda) each op runs on ``device``, and why."""
    return ops.backend_report(device)


def from_transformers(hf_model):
    """Convert a loaded transformers VidEoMT / EoMT / EoMT-DINOv3 model; parameters share its storage where they can."""
    from videomt_fast.model.loading import from_transformers as _convert

    return _convert(hf_model)


def patch_transformers():
    """Make transformers' ``VideomtForUniversalSegmentation.from_pretrained`` (and EoMT's, EoMT-DINOv3's, and
    ``AutoModelForUniversalSegmentation``'s for those model types) return videomt_fast models.

    Returns a handle; ``handle.undo()`` or :func:`unpatch_transformers` restores transformers. Also a
    context manager: ``with videomt_fast.patch_transformers(): ...``.
    """
    from videomt_fast.model.patching import patch

    return patch()


def unpatch_transformers():
    """Undo :func:`patch_transformers` (no-op when not patched)."""
    from videomt_fast.model.patching import unpatch

    unpatch()


__all__ = [
    "VideomtConfig",
    "EomtConfig",
    "EomtDinov3Config",
    "VideomtForUniversalSegmentation",
    "VideomtForUniversalSegmentationOutput",
    "EomtForUniversalSegmentation",
    "EomtForUniversalSegmentationOutput",
    "EomtDinov3ForUniversalSegmentation",
    "EomtDinov3ForUniversalSegmentationOutput",
    "VideomtVideoProcessor",
    "EomtImageProcessor",
    "VideomtSession",
    "VideoInstance",
    "VideoInstanceAccumulator",
    "PRESETS",
    "config_from_preset",
    "backend_report",
    "from_transformers",
    "patch_transformers",
    "unpatch_transformers",
    "ops",
]
