"""Video-level instances: top-k rule, per-frame masks, streaming = batch, YouTube-VIS RLE."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_postprocess import random_outputs
from videomt_fast.tracks import VideoInstanceAccumulator, rle_decode, rle_encode_batch


def test_rle_round_trip_and_pycocotools_agree():
    mask_utils = pytest.importorskip("pycocotools.mask")
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 13, 17, generator=g) > 0.6
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0] = True
    for m, runs in zip(masks, rle_encode_batch(masks)):
        rle = {"size": [13, 17], "counts": runs}
        assert np.array_equal(rle_decode(rle), m.numpy())
        ref = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        ours = mask_utils.frPyObjects(rle, 13, 17)
        assert ours["counts"] == ref["counts"]


@pytest.mark.parametrize("average", ["logits", "probs"])
def test_topk_and_masks_match_direct_computation(average):
    frames, queries, labels = 5, 12, 6
    out = random_outputs(frames, queries, labels, 10, 12, seed=7)
    sizes = [(40, 47)] * frames
    acc = VideoInstanceAccumulator(top_k=7, class_average=average)
    for t in range(frames):  # one frame per call, as a streaming session would
        acc.update(SimpleNamespace(class_queries_logits=out.class_queries_logits[t : t + 1],
                                   masks_queries_logits=out.masks_queries_logits[t : t + 1]), sizes[t : t + 1])
    got = acc.finalize()
    cls = out.class_queries_logits
    probs = cls.mean(0).softmax(-1) if average == "logits" else cls.softmax(-1).mean(0)
    probs = probs[:, :-1]
    top, idx = probs.flatten().topk(7)
    assert [(i.track_id, i.label_id) for i in got] == [(int(j) // labels, int(j) % labels) for j in idx]
    np.testing.assert_allclose([i.score for i in got], top.numpy(), rtol=1e-5, atol=1e-6)
    binary = F.interpolate(out.masks_queries_logits, size=sizes[0], mode="bilinear", align_corners=False) > 0
    for inst in got:
        assert torch.equal(inst.masks(), binary[:, inst.track_id])


def test_batch_update_equals_streaming_and_sizes_vary():
    out = random_outputs(4, 9, 3, 8, 8, seed=9)
    sizes = [(20, 30), (31, 17), (8, 8), (64, 40)]
    a = VideoInstanceAccumulator(top_k=5)
    a.update(out, sizes)
    b = VideoInstanceAccumulator(top_k=5)
    b.update(SimpleNamespace(class_queries_logits=out.class_queries_logits[:2], masks_queries_logits=out.masks_queries_logits[:2]), sizes[:2])
    b.update(SimpleNamespace(class_queries_logits=out.class_queries_logits[2:], masks_queries_logits=out.masks_queries_logits[2:]), sizes[2:])
    fa, fb = a.finalize(), b.finalize()
    assert [(i.track_id, i.label_id) for i in fa] == [(i.track_id, i.label_id) for i in fb]
    for ia, ib in zip(fa, fb):
        assert ia.rles == ib.rles
        for t, rle in enumerate(ia.rles):
            expected = F.interpolate(out.masks_queries_logits[t : t + 1, ia.track_id : ia.track_id + 1], size=sizes[t], mode="bilinear") > 0
            assert np.array_equal(rle_decode(rle), expected[0, 0].numpy())


def test_youtube_vis_entries():
    mask_utils = pytest.importorskip("pycocotools.mask")
    out = random_outputs(3, 8, 4, 8, 8, seed=2)
    acc = VideoInstanceAccumulator(top_k=3)
    acc.update(out, [(16, 24)] * 3)
    entries = acc.to_youtube_vis(video_id=42, label_to_category=[1, 2, 3, 4])
    assert len(entries) == 3
    for entry, inst in zip(entries, acc.finalize()):
        assert entry["video_id"] == 42 and entry["category_id"] == inst.label_id + 1
        assert len(entry["segmentations"]) == 3
        for rle, ours in zip(entry["segmentations"], inst.rles):
            assert isinstance(rle["counts"], str)
            decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert np.array_equal(decoded.astype(bool), rle_decode(ours))


def test_errors():
    with pytest.raises(ValueError, match="class_average"):
        VideoInstanceAccumulator(class_average="max")
    acc = VideoInstanceAccumulator()
    with pytest.raises(RuntimeError, match="no frames"):
        acc.finalize()
    out = random_outputs(2, 8, 4, 8, 8, seed=2)
    with pytest.raises(ValueError, match="len\\(target_sizes\\)"):
        acc.update(out, [(8, 8)])
    acc.update(out, [(8, 8)] * 2)
    other = random_outputs(1, 9, 4, 8, 8, seed=2)
    with pytest.raises(ValueError, match="through the video"):
        acc.update(other, [(8, 8)])
