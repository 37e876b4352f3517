"""EoMT (image) against transformers' EoMT: masked attention on (fresh model) and off."""

import pytest
import torch

import videomt_fast
from videomt_fast import EomtForUniversalSegmentation

from videomt_fast.ops import reference

from helpers import BackendRecorder, assert_outputs_close, hf_eomt, images, max_abs, randomize_, resized_hf_oracle

pytest.importorskip("transformers")


def _images(batch, size=48, seed=3):
    return images(batch, size, seed=seed)


# every num_blocks masked and unmasked; batch 1 and 2 alternate (not the full product: half the runs)
@pytest.mark.parametrize("num_blocks,masked,batch", [(n, m, 1 + (n + m) % 2) for n in (1, 2, 3, 4) for m in (True, False)])
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


@pytest.mark.parametrize("size", [(96, 96), (80, 112)], ids=["native-6x6", "resized-5x7"])
def test_masked_attention_parity_with_mixed_two_word_masks(monkeypatch, size):
    """36 and 35 patches: each query's mask spans two 32-bit words, and in every masked layer 10-90% of
    the (query, patch) pairs are allowed, so the masks decide; at the native square grid and at a
    non-square, non-native one (transformers run with its position table resized the same way).
    The attention op is ``attention(qkv, heads, bits, num_queries, prefix)``; patches follow the prefix."""
    hf = randomize_(hf_eomt(image_size=96, num_blocks=3), seed=6)  # seed picked for mixed masks, checked below
    model = videomt_fast.from_transformers(hf)
    grid = (size[0] // 16, size[1] // 16)
    oracle = hf if grid == (6, 6) else resized_hf_oracle(hf, grid)
    x = images(2, *size, seed=6)
    recorder = BackendRecorder(monkeypatch, keep=("attention",))
    with torch.no_grad():
        out = model(pixel_values=x)
        ref = oracle(pixel_values=x)
    masked = [(args[2], args[0].shape[1] - args[4]) for args in recorder.calls["attention"] if args[2] is not None]
    assert len(masked) == 3, "one masked attention per query layer"
    for layer, (bits, patches) in enumerate(masked):
        assert patches == grid[0] * grid[1] and bits.shape == (2, hf.config.num_queries, 2)
        share = reference.unpack_mask_bits(bits, patches).float().mean().item()
        assert 0.1 <= share <= 0.9, f"masked layer {layer}: {share:.0%} of the mask bits set"
    assert_outputs_close(out, ref, atol=1e-4)
