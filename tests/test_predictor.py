"""EoMT's predictor: the forward replayed from CUDA graphs after optimize(), the plain forward elsewhere."""

import pytest
import torch

import videomt_fast
from videomt_fast.runtime.fast import GraphedPredictor

from helpers import assert_outputs_close, assert_outputs_equal, assert_plans_ran_verified_kernels, hf_eomt, images, randomize_

TINY = dict(num_queries=8, image_size=32)


def _hf(probs=1.0):
    hf = randomize_(hf_eomt(**TINY))
    hf.attn_mask_probs.fill_(probs)
    return hf


def _model(probs=1.0, device="cpu"):
    return videomt_fast.from_transformers(_hf(probs)).to(device)


def _images(batch=2, size=(32, 32), seed=1, device="cpu"):
    return images(batch, *size, seed=seed).to(device)


def _same(a, b, atol=0.0):
    for name in ("class_queries_logits", "masks_queries_logits", "last_hidden_state"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and torch.allclose(x.float(), y.float(), atol=atol, rtol=0), name


@pytest.mark.parametrize("probs", [1.0, 0.0])
def test_cpu_predictor_matches_transformers(probs):
    """On a CPU the predictor runs the checked forward without graphs: transformers' EoMT is the oracle
    at its native size; another size must give the plain forward's outputs bit for bit."""
    hf = _hf(probs)
    model = videomt_fast.from_transformers(hf)
    predictor = model.new_predictor()
    assert isinstance(predictor, GraphedPredictor) and not predictor.use_graphs
    x = _images(size=(32, 32))
    with torch.no_grad():
        assert_outputs_close(predictor(x), hf(pixel_values=x), atol=1e-4)
        y = _images(size=(48, 32), seed=2)
        assert_outputs_equal(predictor(y), model(pixel_values=y))
    assert "graphs=off" in repr(predictor)


def test_predictor_checks_inputs_like_the_forward():
    model = _model()
    predictor = model.new_predictor()
    with pytest.raises(ValueError, match="pixel_values must be 4-D"):
        predictor(torch.randn(3, 32, 32))
    bad = _images()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pixel_values contains 1 NaN"):
        predictor(bad)
    model.attn_mask_probs.fill_(0.5)
    with pytest.raises(ValueError, match=r"attn_mask_probs\[0\] = 0.5"):
        predictor(_images())
    with pytest.raises(ValueError, match="max_shapes"):
        GraphedPredictor(model, max_shapes=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_predictor_matches_eager_forward(dtype):
    """The expected side runs the same plan with graphs off (after optimize() the model's own forward
    replays graphs too, so it would share any graph bug), and both sides are equal bit for bit (the same
    kernels; cuDNN deterministic for gpu tests). Mutation caught: a stale graph replayed after
    ``attn_mask_probs`` changes (the former expected side replayed the same stale graph)."""
    model = _model(1.0, "cuda").optimize(dtype=dtype)
    predictor = model.new_predictor(max_shapes=1)
    eager = GraphedPredictor(model, use_graphs=False)
    assert predictor.use_graphs and not eager.use_graphs
    with torch.no_grad():
        for seed, size in enumerate([(32, 32), (32, 32), (48, 32), (32, 32)]):  # replay, new shape, evicted shape
            x = _images(size=size, seed=seed, device="cuda")
            _same(predictor(x), eager(x))
            assert len(predictor._entries) == 1
        kept = predictor(_images(seed=10, device="cuda")).masks_queries_logits
        again = predictor(_images(seed=11, device="cuda")).masks_queries_logits
        assert not torch.equal(kept, again)  # outputs are copies, not the static buffers
        model.attn_mask_probs.fill_(0.0)  # masked layers are baked into graphs: a change recaptures
        x = _images(seed=12, device="cuda")
        _same(predictor(x), eager(x))
    assert_plans_ran_verified_kernels(model)
