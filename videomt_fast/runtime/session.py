"""Online (frame-by-frame) inference with the propagated queries kept in an explicit object."""

from __future__ import annotations

import torch

from videomt_fast.model.modeling import VideomtForUniversalSegmentation, VideomtForUniversalSegmentationOutput, check_frames


def check_step_frames(
    model: VideomtForUniversalSegmentation,
    frames: torch.Tensor,
    batch_size: int,
    frame_size: tuple[int, int] | None,
) -> tuple[int, int]:
    """Validate the next frame of a session; return its ``(height, width)``.

    ``frame_size`` is the session's video size (None before its first frame): a frame of another
    size is an error until the session is reset.
    """
    check_frames(frames, "frames", 4, model.config, "(batch_size, channels, height, width)", model.check_finite)
    if frames.shape[0] != batch_size:
        raise ValueError(f"frames has batch size {frames.shape[0]}; this session was started with batch_size={batch_size}")
    size = (int(frames.shape[-2]), int(frames.shape[-1]))
    if frame_size is not None and size != frame_size:
        raise ValueError(
            f"frames are {size[0]}x{size[1]}; this session's video is {frame_size[0]}x{frame_size[1]} "
            "(call reset() to start a new video)"
        )
    if frames.device != model.device:
        raise ValueError(f"frames are on {frames.device}; the model is on {model.device}")
    return size


class VideomtSession:
    """One video stream (or ``batch_size`` streams in lockstep) through a VidEoMT model.

    ``step(frames)`` takes the next frame ``(B, 3, H, W)`` and returns that frame's outputs
    (``class_queries_logits`` ``(B, Q, C+1)``, ``masks_queries_logits`` ``(B, Q, H/4, W/4)``,
    ``last_hidden_state``). The propagated queries live here, not on the model, so sessions are
    independent: interleaving two videos never mixes their state. Stepping through a clip frame by
    frame gives the clip forward's outputs.
    """

    def __init__(self, model: VideomtForUniversalSegmentation, batch_size: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        self.frame_size: tuple[int, int] | None = None  # fixed by the first frame
        self.frame_index = 0
        self._queries: torch.Tensor | None = None
        self._started_with: tuple[torch.dtype, torch.device] | None = None

    def reset(self) -> None:
        """Start a new video: forget the propagated queries and the frame size."""
        self._queries = None
        self.frame_size = None
        self.frame_index = 0

    @property
    def propagated_queries(self) -> torch.Tensor | None:
        """``(B, Q, d)`` last-layer query rows of the previous frame, raw (normalized with ``config.norm_queries``);
        None before the first step."""
        return self._queries

    @torch.no_grad()
    def step(self, frames: torch.Tensor) -> VideomtForUniversalSegmentationOutput:
        model = self.model
        size = check_step_frames(model, frames, self.batch_size, self.frame_size)
        if self._queries is not None and self._started_with != (model.dtype, model.device):
            dtype, device = self._started_with
            raise ValueError(
                f"this session's video was started with the model in {dtype} on {device}; the model is now "
                f"{model.dtype} on {model.device} (moved or cast since): call reset() to start the video again, "
                "or model.new_session() for a new one"
            )
        step = None
        if getattr(model, "fast_settings", None) is not None:  # optimized: the execution plan of this shape
            from videomt_fast.runtime.fast import compiled_step, current_plan

            plan = current_plan(model, self.batch_size, size)
            if frames.dtype != torch.float64:
                step = compiled_step(model, plan)  # the frame as one compiled call, where the plan chose it
        if step is not None:
            masks, classes, sequence, queries = step(frames, self._queries, check_all=self._queries is None)
        else:
            hidden = model.encode_frames(frames)
            masks, classes, sequence, queries = model.query_step(hidden, self._queries, model.grid_for(*size))
        if self._queries is None:
            self._started_with = (model.dtype, model.device)  # the propagated queries belong to these
        self._queries = queries
        self.frame_size = size
        self.frame_index += 1
        return VideomtForUniversalSegmentationOutput(
            class_queries_logits=classes, masks_queries_logits=masks, last_hidden_state=sequence
        )

    __call__ = step

    def __repr__(self) -> str:
        return f"VideomtSession(batch_size={self.batch_size}, frame_size={self.frame_size}, frames_seen={self.frame_index})"
