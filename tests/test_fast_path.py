"""The fast path's static-buffer session (CUDA graphs on GPU) and optimize()."""

import pytest
import torch

import videomt_fast
from videomt_fast.fast import GraphedSession

from helpers import hf_videomt, max_abs, randomize_, video

pytest.importorskip("transformers")


@pytest.fixture()
def model():
    return videomt_fast.from_transformers(randomize_(hf_videomt()))


def test_static_buffer_session_equals_clip(model):
    x = video(2, 4)
    with torch.no_grad():
        clip = model(pixel_values_videos=x)
    session = GraphedSession(model, batch_size=2, use_graphs=False)
    for t in range(4):
        out = session.step(x[:, t])
        assert max_abs(out.masks_queries_logits, clip.masks_queries_logits[2 * t : 2 * t + 2]) < 1e-5
    session.reset()
    again = session.step(x[:, 0])
    assert max_abs(again.class_queries_logits, clip.class_queries_logits[:2]) < 1e-5
    with pytest.raises(ValueError, match="48x48"):
        session.step(video(2, 1, height=32)[:, 0])


def test_optimize_casts_and_keeps_mask_probs(model):
    model.optimize(dtype=torch.bfloat16, check_finite=False)
    assert model.dtype == torch.bfloat16
    assert model.attn_mask_probs.dtype == torch.float32
    assert model.check_finite is False
    assert isinstance(model.new_session(), videomt_fast.session.VideomtSession)  # CPU: no graphs
    with torch.no_grad():
        out = model(pixel_values_videos=video())
    assert out.masks_queries_logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        model.optimize(dtype=torch.int8)


def test_from_pretrained_fast(tmp_path):
    hf_videomt().save_pretrained(tmp_path)
    model = videomt_fast.VideomtForUniversalSegmentation.from_pretrained(tmp_path, fast=True)
    assert model.dtype == torch.bfloat16 and model.fast_settings.cuda_graphs


@pytest.mark.gpu
def test_graphed_session_on_gpu_matches_eager():
    model = videomt_fast.from_transformers(randomize_(hf_videomt())).cuda()
    x = video(1, 5).cuda()
    with torch.no_grad():
        clip = model(pixel_values_videos=x)
    model.optimize(dtype=torch.float32)
    a, b = model.new_session(), model.new_session()
    assert isinstance(a, GraphedSession) and a.use_graphs
    for t in range(5):
        out_a = a.step(x[:, t])
        out_b = b.step(x[:, t])
        assert max_abs(out_a.masks_queries_logits, clip.masks_queries_logits[t : t + 1]) < 1e-3
        assert max_abs(out_b.class_queries_logits, clip.class_queries_logits[t : t + 1]) < 1e-3


def test_model_traces_under_torch_compile(model):
    x = video(1, 2)
    with torch.no_grad():
        eager = model(pixel_values_videos=x)
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(pixel_values_videos=x)
    assert max_abs(out.masks_queries_logits, eager.masks_queries_logits) < 1e-4
