"""EoMT (image) against transformers' EoMT: masked attention on (fresh model) and off."""

import pytest
import torch

import videomt_fast
from videomt_fast import EomtForUniversalSegmentation

from helpers import hf_eomt, max_abs, randomize_

pytest.importorskip("transformers")


def _images(batch, size=48, seed=3):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_eomt_parity(tmp_path, num_blocks, masked, batch):
    hf = randomize_(hf_eomt(num_blocks=num_blocks, num_hidden_layers=4), seed=num_blocks)
    if not masked:
        hf.attn_mask_probs.zero_()
    hf.save_pretrained(tmp_path)
    x = _images(batch)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        for model in (EomtForUniversalSegmentation.from_pretrained(tmp_path), videomt_fast.from_transformers(hf)):
            out = model(pixel_values=x)
            for field in ("class_queries_logits", "masks_queries_logits", "last_hidden_state"):
                err = max_abs(getattr(out, field), getattr(ref, field))
                assert err <= 1e-4, f"{field}: {err}"


def test_masking_changes_the_output():
    hf = randomize_(hf_eomt())
    model = videomt_fast.from_transformers(hf)
    x = _images(1)
    with torch.no_grad():
        on = model(pixel_values=x).masks_queries_logits
        model.attn_mask_probs.zero_()
        off = model(pixel_values=x).masks_queries_logits
    assert max_abs(on, off) > 1e-3


def test_fractional_mask_probability_is_refused():
    model = videomt_fast.from_transformers(hf_eomt())
    with torch.no_grad():
        model.attn_mask_probs[1] = 0.5
    with pytest.raises(ValueError, match=r"attn_mask_probs\[1\] = 0.5"):
        model(pixel_values=_images(1))


def test_mask_probs_come_from_the_checkpoint(tmp_path):
    hf = hf_eomt()
    hf.attn_mask_probs.zero_()
    hf.save_pretrained(tmp_path)
    model = EomtForUniversalSegmentation.from_pretrained(tmp_path)
    assert model.attn_mask_probs.tolist() == [0.0, 0.0]


def test_eomt_input_errors():
    model = videomt_fast.from_transformers(hf_eomt())
    with pytest.raises(ValueError, match="pixel_values must be 4-D"):
        model(pixel_values=torch.randn(1, 1, 3, 48, 48))
