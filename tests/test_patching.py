"""patch_transformers(): transformers' loaders return videomt_fast models, and undo restores them."""

import pytest
import torch

import videomt_fast

from helpers import hf_eomt, hf_videomt, max_abs, randomize_, video

transformers = pytest.importorskip("transformers")


def test_patch_and_undo(tmp_path):
    hf = randomize_(hf_videomt())
    hf.save_pretrained(tmp_path / "v")
    hf_eomt().save_pretrained(tmp_path / "e")
    original = transformers.VideomtForUniversalSegmentation.from_pretrained
    handle = videomt_fast.patch_transformers()
    try:
        assert videomt_fast.patch_transformers() is handle  # idempotent
        model = transformers.VideomtForUniversalSegmentation.from_pretrained(tmp_path / "v")
        assert isinstance(model, videomt_fast.VideomtForUniversalSegmentation)
        auto = transformers.AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "v", dtype=torch.float32)
        assert isinstance(auto, videomt_fast.VideomtForUniversalSegmentation)
        eomt = transformers.AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "e")
        assert isinstance(eomt, videomt_fast.EomtForUniversalSegmentation)
        x = video()
        with torch.no_grad():
            assert max_abs(model(pixel_values_videos=x).masks_queries_logits,
                           hf(pixel_values_videos=x).masks_queries_logits) < 1e-4
    finally:
        handle.undo()
    restored = transformers.VideomtForUniversalSegmentation.from_pretrained(tmp_path / "v")
    assert isinstance(restored, transformers.VideomtForUniversalSegmentation)
    assert transformers.VideomtForUniversalSegmentation.from_pretrained == original
    auto = transformers.AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "v")
    assert not isinstance(auto, videomt_fast.VideomtForUniversalSegmentation)


def test_patch_as_context_manager(tmp_path):
    hf_videomt().save_pretrained(tmp_path)
    with videomt_fast.patch_transformers():
        inside = transformers.VideomtForUniversalSegmentation.from_pretrained(tmp_path)
    outside = transformers.VideomtForUniversalSegmentation.from_pretrained(tmp_path)
    assert isinstance(inside, videomt_fast.VideomtForUniversalSegmentation)
    assert isinstance(outside, transformers.VideomtForUniversalSegmentation)
