"""Video-level instances: top-k rule, per-frame masks, streaming = batch, YouTube-VIS RLE."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import random_outputs
from videomt_fast.processing.tracks import VideoInstanceAccumulator, rle_decode, rle_encode_batch, rle_encode_packed


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


# ---------------------------------------------------------------------------------------------
# packed run storage: compact, exact, and the same output as the former list-of-lists storage
# ---------------------------------------------------------------------------------------------


def reference_runs(mask: np.ndarray) -> list[int]:
    """Straightforward COCO run lengths of one bool mask (column-major, starting with a zero run)."""
    runs, value, count = [], False, 0
    for pixel in mask.T.reshape(-1):
        if pixel != value:
            runs.append(count)
            value, count = pixel, 0
        count += 1
    runs.append(count)
    return runs


def reference_finalize(cls, mask_logits, sizes, top_k, average):
    """The former implementation, spelled out: top-k (query, label) of the video scores, per frame each
    query's upsampled mask > 0 as a list of runs."""
    values = cls.float() if average == "logits" else cls.float().softmax(-1)
    mean = (values.double().sum(0) / cls.shape[0]).float()
    scores = (mean.softmax(-1) if average == "logits" else mean)[:, :-1]
    top, idx = scores.flatten().topk(min(top_k, scores.numel()))
    result = []
    for score, flat in zip(top.tolist(), idx.tolist()):
        query, label = divmod(flat, scores.shape[1])
        rles = []
        for t, (h, w) in enumerate(sizes):
            mask = F.interpolate(mask_logits[t : t + 1, query : query + 1].float(), size=(h, w), mode="bilinear",
                                 align_corners=False)[0, 0] > 0
            rles.append({"size": [h, w], "counts": reference_runs(mask.numpy())})
        result.append((query, label, score, rles))
    return result


def edge_case_masks(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(10, h, w, generator=g) > torch.rand(10, 1, 1, generator=g)
    masks[0] = False
    masks[1] = True
    masks[2:6] = False
    masks[2, 0, 0] = True  # first pixel only
    masks[3, -1, -1] = True  # last pixel only
    masks[4, h // 2, w // 2] = True  # one pixel inside
    masks[5, -1, 0] = True  # end of the first column
    masks[6] = True
    masks[6, 0, 0] = False  # everything but the first pixel
    masks[7] = ~masks[2]  # everything but the first and the last pixel
    masks[7, -1, -1] = False
    return masks


@pytest.mark.parametrize("shape", [(13, 17), (1, 1), (1, 9), (9, 1), (2, 3), (64, 48)])
def test_round_trip_edge_cases(shape):
    h, w = shape
    masks = edge_case_masks(h, w, seed=h * 100 + w)
    runs, offsets = rle_encode_packed(masks)
    assert isinstance(runs, np.ndarray) and runs.dtype == np.int32 and offsets.shape == (len(masks) + 1,)
    assert offsets[0] == 0 and offsets[-1] == len(runs) and (np.diff(offsets) >= 1).all()
    lists = rle_encode_batch(masks)
    assert all(type(r) is list and all(type(v) is int for v in r) for r in lists)
    for i, (m, r) in enumerate(zip(masks, lists)):
        assert r == runs[offsets[i] : offsets[i + 1]].tolist() == reference_runs(m.numpy())
        assert sum(r) == h * w
        assert np.array_equal(rle_decode({"size": [h, w], "counts": r}), m.numpy())
    assert lists[0] == [h * w] and lists[1] == [0, h * w]
    empty_runs, empty_offsets = rle_encode_packed(masks[:0])
    assert empty_runs.size == 0 and empty_offsets.tolist() == [0] and rle_encode_batch(masks[:0]) == []


def test_round_trip_random_masks_match_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    g = torch.Generator().manual_seed(3)
    for h, w in [(31, 45), (7, 5), (120, 90)]:
        masks = F.interpolate(torch.randn(1, 12, 6, 5, generator=g), size=(h, w), mode="bilinear")[0] > 0.3
        masks[0] = False
        masks[1] = True
        for m, r in zip(masks, rle_encode_batch(masks)):
            assert np.array_equal(rle_decode({"size": [h, w], "counts": r}), m.numpy())
            ref = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
            assert mask_utils.frPyObjects({"size": [h, w], "counts": r}, h, w)["counts"] == ref["counts"]


def test_stored_runs_are_packed_arrays_and_compact():
    frames, queries = 6, 40
    out = random_outputs(frames, queries, 5, 24, 32, seed=11)
    out.masks_queries_logits[:, ::5] = -1.0  # some empty queries between the others
    sizes = [(90, 120)] * 3 + [(45, 61)] * 3
    acc = VideoInstanceAccumulator(top_k=5)
    acc.update(out, sizes)
    assert len(acc._runs) == len(acc._offsets) == frames
    packed_bytes = list_bytes = 0
    for t, (runs, offsets) in enumerate(zip(acc._runs, acc._offsets)):
        assert isinstance(runs, np.ndarray) and isinstance(offsets, np.ndarray)
        assert runs.dtype == np.int32 and offsets.dtype == np.int32 and offsets.shape == (queries + 1,)
        as_lists = [runs[offsets[q] : offsets[q + 1]].tolist() for q in range(queries)]
        h, w = sizes[t]
        assert all(as_lists[q] == [h * w] for q in range(0, queries, 5))
        assert all(sum(r) == h * w for r in as_lists)
        packed_bytes += runs.nbytes + offsets.nbytes
        # what the list-of-lists storage held: the outer list and each query's list (slots only; the
        # int objects past the small-int cache would add 28 bytes each on top)
        list_bytes += sys.getsizeof(as_lists) + sum(sys.getsizeof(r) for r in as_lists)
        assert runs.nbytes == 4 * len(runs) and offsets.nbytes == 4 * (queries + 1)
    assert packed_bytes < list_bytes / 2


@pytest.mark.parametrize("average", ["logits", "probs"])
def test_finalize_equals_reference_implementation(average, monkeypatch):
    # a tiny block budget: several upsampling blocks per frame, with empty blocks skipped in between
    monkeypatch.setenv("VIDEOMT_FAST_POSTPROCESS_BLOCK_MB", "0.05")
    frames, queries = 5, 70
    out = random_outputs(frames, queries, 4, 12, 14, seed=5)
    out.masks_queries_logits[:, 16:32] = -2.0  # one whole block with no mask
    out.masks_queries_logits[:, 40] = -2.0
    out.masks_queries_logits[:, 41] = 5.0  # full masks
    out.class_queries_logits[:, 16, 0] += 20.0  # an empty query among the top instances
    out.class_queries_logits[:, 41, 1] += 20.0
    sizes = [(33, 41), (33, 41), (20, 70), (1, 5), (57, 30)]
    acc = VideoInstanceAccumulator(top_k=12, class_average=average)
    for t in range(frames):
        acc.update(SimpleNamespace(class_queries_logits=out.class_queries_logits[t : t + 1],
                                   masks_queries_logits=out.masks_queries_logits[t : t + 1]), sizes[t : t + 1])
    got = acc.finalize()
    expected = reference_finalize(out.class_queries_logits, out.masks_queries_logits, sizes, 12, average)
    assert [(i.track_id, i.label_id) for i in got] == [(q, label) for q, label, _, _ in expected]
    assert {16, 41} <= {i.track_id for i in got}
    np.testing.assert_allclose([i.score for i in got], [s for _, _, s, _ in expected], rtol=1e-6)
    for inst, (_, _, _, rles) in zip(got, expected):
        assert inst.rles == rles
        assert all(type(r["counts"]) is list for r in inst.rles)


# ---------------------------------------------------------------------------------------------
# a synthetic clip with known moving objects, fed in uneven chunks
# ---------------------------------------------------------------------------------------------

# (query, label, class logit boost, centre (y, x) at frame 0 and its velocity per frame, radius), all in
# pixels of the 48x64 output; query 5 leaves the picture after frame 4 (its mask is then empty)
OBJECTS = [(1, 2, 6.0, (14.0, 12.0), (1.5, 4.0), 7.0), (3, 0, 5.0, (34.0, 50.0), (-2.0, -3.0), 8.0),
           (5, 1, 4.0, (24.0, 30.0), (0.0, 2.5), 6.0)]
CLIP_FRAMES, CLIP_QUERIES, CLIP_LABELS, OUT_SIZE, LOW = 9, 8, 4, (48, 64), (12, 16)


def _centre(obj, t):
    _, _, _, (y0, x0), (vy, vx), _ = obj
    return y0 + vy * t, x0 + vx * t


def _synthetic_clip():
    """Mask logits on the 12x16 grid (model output resolution) of cones ``radius - distance`` measured in
    output pixels (a low-res cell centre u is output pixel (u + 0.5) * 4 - 0.5, as bilinear upsampling
    with align_corners=False places it), so each upsampled mask > 0 is a disk around the known centre."""
    scale = OUT_SIZE[0] / LOW[0]
    yy = (torch.arange(LOW[0], dtype=torch.float64) + 0.5) * scale - 0.5
    xx = (torch.arange(LOW[1], dtype=torch.float64) + 0.5) * scale - 0.5
    masks = torch.full((CLIP_FRAMES, CLIP_QUERIES, *LOW), -5.0, dtype=torch.float64)
    cls = torch.zeros(CLIP_FRAMES, CLIP_QUERIES, CLIP_LABELS + 1, dtype=torch.float64)
    cls[..., -1] = 3.0  # every query says "no object" unless it is one of the objects
    for obj in OBJECTS:
        query, label, boost, _, _, radius = obj
        cls[:, query, label] = boost
        for t in range(CLIP_FRAMES):
            if query == 5 and t > 4:
                continue  # gone
            cy, cx = _centre(obj, t)
            masks[t, query] = radius - ((yy[:, None] - cy) ** 2 + (xx[None, :] - cx) ** 2).sqrt()
    return cls.float(), masks.float()


def test_synthetic_clip_in_uneven_chunks_tracks_the_moving_objects():
    cls, masks = _synthetic_clip()
    acc = VideoInstanceAccumulator(top_k=3)
    start = 0
    for size in (1, 4, 2, 2):  # uneven chunks, as segment's chunk engine sends them
        chunk = SimpleNamespace(class_queries_logits=cls[start : start + size], masks_queries_logits=masks[start : start + size])
        acc.update(chunk, [OUT_SIZE] * size)
        start += size
    assert start == CLIP_FRAMES
    got = acc.finalize()
    # ids are the query indices, stable through the video; best score first (the larger class boost)
    assert [(i.track_id, i.label_id) for i in got] == [(q, label) for q, label, *_ in OBJECTS]
    assert all(a.score > b.score for a, b in zip(got, got[1:]))
    ys, xs = np.mgrid[0 : OUT_SIZE[0], 0 : OUT_SIZE[1]]
    for inst, obj in zip(got, OBJECTS):
        assert len(inst.rles) == CLIP_FRAMES
        for t, rle in enumerate(inst.rles):
            mask = rle_decode(rle)
            assert rle["size"] == list(OUT_SIZE)
            if inst.track_id == 5 and t > 4:
                assert not mask.any(), f"frame {t}: the object that left is still painted"
                continue
            radius = obj[-1]
            cy, cx = _centre(obj, t)
            assert abs(mask.sum() - np.pi * radius**2) < 0.2 * np.pi * radius**2, (t, mask.sum())
            got_centre = (ys[mask].mean(), xs[mask].mean())
            assert np.hypot(got_centre[0] - cy, got_centre[1] - cx) < 0.75, (inst.track_id, t, got_centre, (cy, cx))


def test_youtube_vis_category_ids_are_one_based():
    """YouTube-VIS numbers its categories from 1 (``{"id": 1, "name": "person"}``, ...); its evaluation
    (ytvoseval, and the research code's ytvis_eval mapping contiguous label l to dataset id l + 1)
    matches results by ``category_id``. Label 0 must therefore be written as category 1."""
    pytest.importorskip("pycocotools.mask", reason="needs pycocotools (the video extra): YouTube-VIS entries are RLE")
    cls, masks = _synthetic_clip()
    acc = VideoInstanceAccumulator(top_k=3)
    acc.update(SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks), [OUT_SIZE] * CLIP_FRAMES)
    entries = acc.to_youtube_vis("clip", label_to_category={label: label + 1 for label in range(CLIP_LABELS)})
    assert [e["category_id"] for e in entries] == [label + 1 for _, label, *_ in OBJECTS] == [3, 1, 2]
