"""Streaming sessions: frame-by-frame equals the clip forward; sessions never share state."""

import pytest
import torch

import videomt_fast

from helpers import hf_videomt, max_abs, randomize_, video

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    return videomt_fast.from_transformers(randomize_(hf_videomt()))


@pytest.mark.parametrize("batch,frames", [(1, 4), (2, 3)])
def test_steps_equal_clip_forward(model, batch, frames):
    x = video(batch, frames)
    with torch.no_grad():
        clip = model(pixel_values_videos=x)
    session = model.new_session(batch_size=batch)
    for t in range(frames):
        out = session.step(x[:, t])
        rows = slice(t * batch, (t + 1) * batch)
        assert out.class_queries_logits.shape == (batch, 7, 6)
        assert out.masks_queries_logits.shape == (batch, 7, 12, 12)
        assert max_abs(out.masks_queries_logits, clip.masks_queries_logits[rows]) < 1e-5
        assert max_abs(out.class_queries_logits, clip.class_queries_logits[rows]) < 1e-5
        assert max_abs(out.last_hidden_state, clip.last_hidden_state[rows]) < 1e-5
    assert session.frame_index == frames


def test_interleaved_sessions_do_not_mix(model):
    a, b = video(1, 3, seed=5), video(1, 3, seed=6)
    with torch.no_grad():
        clip_a, clip_b = model(pixel_values_videos=a), model(pixel_values_videos=b)
    sa, sb = model.new_session(), model.new_session()
    for t in range(3):
        out_a = sa.step(a[:, t])
        out_b = sb.step(b[:, t])
        assert max_abs(out_a.masks_queries_logits, clip_a.masks_queries_logits[t : t + 1]) < 1e-5
        assert max_abs(out_b.masks_queries_logits, clip_b.masks_queries_logits[t : t + 1]) < 1e-5


def test_reset_starts_a_new_video(model):
    x = video(1, 3)
    session = model.new_session()
    first = session.step(x[:, 0]).masks_queries_logits
    session.step(x[:, 1])
    assert session.propagated_queries is not None
    session.reset()
    assert session.propagated_queries is None and session.frame_index == 0
    again = session.step(x[:, 0]).masks_queries_logits
    assert max_abs(first, again) == 0.0
    # a later frame differs from the first once queries propagate (state really is carried)
    assert max_abs(session.step(x[:, 0]).masks_queries_logits, first) > 1e-4


def test_session_rejects_other_batch_or_size(model):
    session = model.new_session(batch_size=2)
    with pytest.raises(ValueError, match="batch_size=2"):
        session.step(video(1, 1)[:, 0])
    session.step(video(2, 1)[:, 0])
    with pytest.raises(ValueError, match="48x48"):
        session.step(video(2, 1, height=32, width=48)[:, 0])
    with pytest.raises(ValueError, match="4-D"):
        session.step(video(2, 1))
    with pytest.raises(ValueError, match="positive int"):
        model.new_session(batch_size=0)


def test_session_after_the_model_changes_dtype_names_reset():
    """A session used after ``model.to(torch.float64)`` failed with torch's raw "mat1 and mat2 must have the
    same dtype"; it now says the session belongs to the old dtype and names reset() and new_session()."""
    model = videomt_fast.VideomtForUniversalSegmentation(videomt_fast.VideomtConfig(**{
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "num_blocks": 2, "num_queries": 7,
        "image_size": 48, "num_labels": 5}))
    session = model.new_session(1)
    session.step(video(1, 1)[:, 0])
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"torch\.float32.*torch\.float64.*reset\(\).*new_session\(\)"):
        session.step(video(1, 1)[:, 0].double())
    session.reset()  # a new video in the same session runs in the model's new dtype
    out = session.step(video(1, 1)[:, 0].double())
    assert out.class_queries_logits.dtype == torch.float64
    assert model.new_session(1).step(video(1, 1)[:, 0].double()).class_queries_logits.dtype == torch.float64
