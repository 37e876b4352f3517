"""Post-processing parity with transformers' VideomtVideoProcessor (CPU, reference path)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import hf_oracle
from helpers import assert_segments_equal, paired, random_outputs
from videomt_fast import ops
from videomt_fast.ops import postprocess as pp
from videomt_fast.processing.video_processor import VideomtVideoProcessor


@pytest.fixture(scope="module")
def oracle():
    try:
        return hf_oracle.load().processor
    except ImportError as exc:
        pytest.skip(f"transformers' VidEoMT processor unavailable: {exc}")


@pytest.fixture
def ours():
    return VideomtVideoProcessor()


SIZES = [
    [(97, 131)],  # up, odd
    [(12, 9), (40, 40), (161, 75)],  # down, same, up; non-uniform per frame
    [(33, 200), (200, 33), (1, 5), (64, 48), (80, 81)],
]


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}frames")
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_instance_matches_transformers(oracle, ours, sizes, threshold):
    out = random_outputs(len(sizes), 37, 7, 20, 24, seed=len(sizes) * 10 + int(threshold * 10))
    expected = oracle.post_process_instance_segmentation(out, sizes, threshold=threshold)
    got = ours.post_process_instance_segmentation(out, sizes, threshold=threshold)
    assert sum(len(r["segments_info"]) for r in expected) >= 2 * len(sizes) or threshold == 0.8
    assert_segments_equal(expected, got)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}frames")
@pytest.mark.parametrize(
    "threshold,mask_threshold,overlap,fuse",
    [(0.8, 0.5, 0.8, None), (0.5, 0.5, 0.8, {0, 1, 2}), (0.6, 0.3, 0.5, {3}), (0.5, 0.7, 0.9, set()), (0.4, 0.5, 0.0, {0, 1, 2, 3, 4, 5, 6})],
)
def test_panoptic_matches_transformers(oracle, ours, sizes, threshold, mask_threshold, overlap, fuse):
    out = random_outputs(len(sizes), 41, 7, 20, 24, seed=len(sizes) + int(threshold * 100) + int(overlap * 7), layout="cells")
    kwargs = dict(threshold=threshold, mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap, label_ids_to_fuse=fuse)
    expected = oracle.post_process_panoptic_segmentation(out, sizes, **kwargs)
    got = ours.post_process_panoptic_segmentation(out, sizes, **kwargs)
    assert sum(len(r["segments_info"]) for r in expected) >= len(sizes)  # the case must exercise the rules
    assert_segments_equal(expected, got)


def test_panoptic_fusing_is_exercised(oracle, ours):
    """Several valid queries of one fused label: they share one id and one segments_info entry."""
    sizes = [(60, 60), (30, 45)]
    out = random_outputs(2, 60, 2, 16, 16, seed=3, layout="cells")
    expected = oracle.post_process_panoptic_segmentation(out, sizes, threshold=0.5, label_ids_to_fuse={0})
    plain = oracle.post_process_panoptic_segmentation(out, sizes, threshold=0.5)
    got = ours.post_process_panoptic_segmentation(out, sizes, threshold=0.5, label_ids_to_fuse={0})
    assert sum(len(r["segments_info"]) for r in expected) < sum(len(r["segments_info"]) for r in plain)
    assert_segments_equal(expected, got)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}frames")
@pytest.mark.parametrize("with_scores", [False, True])
def test_semantic_matches_transformers(oracle, ours, sizes, with_scores):
    out = random_outputs(len(sizes), 23, 19, 20, 24, seed=len(sizes) + 100 * with_scores)
    expected = oracle.post_process_semantic_segmentation(out, sizes, return_segmentation_scores=with_scores)
    got = ours.post_process_semantic_segmentation(out, sizes, return_segmentation_scores=with_scores)
    for e, o in paired(expected, got):
        if with_scores:
            assert torch.equal(o.segmentation, e.segmentation)
            torch.testing.assert_close(o.segmentation_scores, e.segmentation_scores, rtol=0, atol=0)
        else:
            assert o.dtype == torch.long and torch.equal(o, e)


def test_small_blocks_match(monkeypatch, oracle, ours):
    """A tiny memory budget forces many query / class blocks; answers must not change."""
    monkeypatch.setenv("VIDEOMT_FAST_POSTPROCESS_BLOCK_MB", "0.01")
    assert pp.block_channels(200, 100, 100) == pp.QUERY_ALIGN
    sizes = [(90, 70), (50, 120)]
    out = random_outputs(2, 70, 40, 20, 24, seed=11, layout="cells")
    assert_segments_equal(
        oracle.post_process_instance_segmentation(out, sizes, threshold=0.4),
        ours.post_process_instance_segmentation(out, sizes, threshold=0.4),
    )
    assert_segments_equal(
        oracle.post_process_panoptic_segmentation(out, sizes, threshold=0.5, label_ids_to_fuse={1, 5, 9}),
        ours.post_process_panoptic_segmentation(out, sizes, threshold=0.5, label_ids_to_fuse={1, 5, 9}),
    )
    for e, o in paired(oracle.post_process_semantic_segmentation(out, sizes), ours.post_process_semantic_segmentation(out, sizes)):
        assert torch.equal(e, o)


def test_bfloat16_logits_match(oracle, ours):
    out = random_outputs(2, 30, 5, 16, 20, seed=5, dtype=torch.bfloat16, layout="cells")
    sizes = [(40, 50), (17, 23)]
    assert_segments_equal(
        oracle.post_process_instance_segmentation(out, sizes, threshold=0.4),
        ours.post_process_instance_segmentation(out, sizes, threshold=0.4),
    )
    assert_segments_equal(
        oracle.post_process_panoptic_segmentation(out, sizes, threshold=0.5),
        ours.post_process_panoptic_segmentation(out, sizes, threshold=0.5),
    )


def test_no_segments_and_transformers_output_object(oracle, ours):
    out = random_outputs(2, 10, 3, 8, 8, seed=1)
    out.class_queries_logits[..., -1] = 50.0  # every query says "no object"
    for method, kw in (("post_process_instance_segmentation", {}), ("post_process_panoptic_segmentation", {})):
        got = getattr(ours, method)(out, [(5, 6), (7, 3)], **kw)
        assert_segments_equal(getattr(oracle, method)(out, [(5, 6), (7, 3)], **kw), got)
        assert all((r["segmentation"] == -1).all() for r in got)
    from transformers.models.videomt.modeling_videomt import VideomtForUniversalSegmentationOutput

    hf_out = VideomtForUniversalSegmentationOutput(
        class_queries_logits=out.class_queries_logits, masks_queries_logits=out.masks_queries_logits
    )
    assert len(ours.post_process_semantic_segmentation(hf_out, [(4, 4), (4, 4)])) == 2


def test_bad_inputs_name_the_argument(ours):
    out = random_outputs(2, 10, 3, 8, 8, seed=1)
    with pytest.raises(ValueError, match="len\\(target_sizes\\).*2"):
        ours.post_process_instance_segmentation(out, [(4, 4)])
    with pytest.raises(ValueError, match="target_sizes\\[1\\]"):
        ours.post_process_panoptic_segmentation(out, [(4, 4), (4,)])
    with pytest.raises(ValueError, match="masks_queries_logits must have shape"):
        ours.post_process_semantic_segmentation(
            SimpleNamespace(class_queries_logits=out.class_queries_logits, masks_queries_logits=out.masks_queries_logits[0]),
            [(4, 4), (4, 4)],
        )
    with pytest.raises(ValueError, match="class_queries_logits must have shape"):
        ours.post_process_semantic_segmentation(
            SimpleNamespace(class_queries_logits=out.class_queries_logits[0], masks_queries_logits=out.masks_queries_logits),
            [(4, 4), (4, 4)],
        )
    with pytest.raises(ValueError, match="agree on \\(frames, queries\\)"):
        ours.post_process_semantic_segmentation(
            SimpleNamespace(class_queries_logits=out.class_queries_logits[:1], masks_queries_logits=out.masks_queries_logits),
            [(4, 4), (4, 4)],
        )
    with pytest.raises(ValueError, match="class_queries_logits"):
        ours.post_process_semantic_segmentation(object(), [(4, 4)])


def test_ops_are_declared_and_dispatch_to_reference_on_cpu():
    names = set(ops.op_names())
    assert {"semantic_segmentation", "instance_segmentation", "panoptic_segmentation"} <= names
    cls = torch.zeros(1, 2, 3)
    masks = torch.zeros(1, 2, 4, 4)
    line = ops.explain("instance_segmentation", cls, masks, [(4, 4)], 0.5)
    assert line.startswith("instance_segmentation: reference")


def test_panoptic_ratio_compares_in_double():
    """area / original = 4/5 is 0.800000011920929 in float32: transformers' `.item() > 0.8` keeps it."""
    keep = torch.tensor([True])
    labels = torch.tensor([0])
    ids, new = pp.panoptic_segment_ids(keep, labels, torch.tensor([4]), torch.tensor([5]), torch.tensor([4]), 0.8, None, 3)
    assert new.tolist() == [True] and ids.tolist() == [0]
    ids, new = pp.panoptic_segment_ids(keep, labels, torch.tensor([4]), torch.tensor([5]), torch.tensor([4]), 0.8000001, None, 3)
    assert new.tolist() == [False] and ids.tolist() == [-1]


# ----------------------------------------------------------------------------- pre-processing


def _expected_from_transformers(oracle, frames_tchw_uint8: torch.Tensor) -> torch.Tensor:
    """transformers' pre-processing with its settings read from its own VideomtVideoProcessor (size, mean,
    std, rescale factor, resample): torchvision's CPU uint8 resize is torch's uint8 antialiased bilinear
    kernel; transformers fuses rescale and normalize into one normalize with mean and std / rescale."""
    assert oracle.do_resize and oracle.do_rescale and oracle.do_normalize and not oracle.do_center_crop
    assert oracle.resample == 2, "PILImageResampling.BILINEAR"
    size = (oracle.size["height"], oracle.size["width"])
    x = torch.nn.functional.interpolate(frames_tchw_uint8, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(oracle.image_mean) * (1.0 / oracle.rescale_factor)
    std = torch.tensor(oracle.image_std) * (1.0 / oracle.rescale_factor)
    return (x.float() - mean[:, None, None]) / std[:, None, None]


def test_preprocess_settings_are_transformers(oracle, ours):
    assert ours.size == oracle.size and ours.rescale_factor == oracle.rescale_factor
    assert tuple(ours.image_mean) == tuple(oracle.image_mean) and tuple(ours.image_std) == tuple(oracle.image_std)
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_center_crop", "do_convert_rgb"):
        assert getattr(ours, flag) == getattr(oracle, flag), flag


def test_preprocess_layouts_agree(oracle, ours):
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (3, 50, 70, 3), dtype=torch.uint8, generator=g)
    expected = _expected_from_transformers(oracle, video.permute(0, 3, 1, 2).contiguous())[None]
    for inp in (video, video.permute(0, 3, 1, 2), video.numpy(), list(video.numpy()), [video]):
        got = ours(inp)["pixel_values_videos"]
        assert got.shape == (1, 3, 3, 640, 640) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    batch = ours(torch.stack([video, video.flip(0)]))
    assert batch.pixel_values_videos.shape == (2, 3, 3, 640, 640)
    torch.testing.assert_close(batch.pixel_values_videos[1], expected[0].flip(0), rtol=0, atol=1e-6)


def test_preprocess_matches_transformers_processor(ours):
    """transformers' own processor end to end, where its torchvision backend imports."""
    import transformers

    try:
        theirs = transformers.VideomtVideoProcessor()
    except ImportError as exc:
        pytest.skip(f"transformers' VideomtVideoProcessor needs torchvision: {str(exc).strip().splitlines()[0][:100]}")
    g = torch.Generator().manual_seed(1)
    for shape in ((2, 50, 70, 3), (3, 721, 480, 3)):
        video = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        want = theirs(list(video.numpy()), return_tensors="pt")["pixel_values_videos"]
        torch.testing.assert_close(ours(video.numpy())["pixel_values_videos"], want, rtol=0, atol=1e-6)


def test_preprocess_float_path_is_close_to_uint8_path(ours):
    """The float-resize-then-round path (torchvision's path on CUDA) differs from the uint8 kernel by at most 1 level."""
    video = torch.randint(0, 256, (2, 3, 45, 90), dtype=torch.uint8)
    a = ours._resize(video, (64, 64))
    b = torch.nn.functional.interpolate(video.float(), size=(64, 64), mode="bilinear", antialias=True).round().clamp(0, 255)
    assert (a.float() - b).abs().max() <= 1


def test_preprocess_errors(ours):
    with pytest.raises(ValueError, match="videos"):
        ours(torch.zeros(2, 5, 5, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="videos"):
        ours(torch.zeros(5, dtype=torch.uint8))


# ----------------------------------------------------------------------------- blocking and single pass


@pytest.mark.parametrize("cpu_block_mb", ["0.01", "10000"])
def test_cpu_block_budget_does_not_change_answers(monkeypatch, oracle, ours, cpu_block_mb):
    """16-channel blocks (the cache budget's floor) and one block for everything give the same answers."""
    monkeypatch.setenv("VIDEOMT_FAST_POSTPROCESS_CPU_BLOCK_MB", cpu_block_mb)
    assert pp.work_channels(50, 97, 131, torch.device("cpu")) == (16 if cpu_block_mb == "0.01" else 64)
    sizes = [(97, 131), (40, 40)]
    blobs = random_outputs(2, 50, 19, 20, 24, seed=21)
    cells = random_outputs(2, 50, 19, 20, 24, seed=22, layout="cells")
    for threshold in (0.0, 0.3):
        assert_segments_equal(
            oracle.post_process_instance_segmentation(blobs, sizes, threshold=threshold),
            ours.post_process_instance_segmentation(blobs, sizes, threshold=threshold),
        )
    kwargs = dict(threshold=0.5, label_ids_to_fuse={1, 2})
    assert_segments_equal(
        oracle.post_process_panoptic_segmentation(cells, sizes, **kwargs),
        ours.post_process_panoptic_segmentation(cells, sizes, **kwargs),
    )
    for e, o in paired(oracle.post_process_semantic_segmentation(blobs, sizes), ours.post_process_semantic_segmentation(blobs, sizes)):
        assert torch.equal(e, o)


def test_work_channels_caps_cpu_blocks_only(monkeypatch):
    monkeypatch.setenv("VIDEOMT_FAST_POSTPROCESS_CPU_BLOCK_MB", "4")
    cpu = torch.device("cpu")
    assert pp.work_channels(200, 180, 320, cpu) == 16  # 16 x 180 x 320 floats = 3.5 MiB
    assert pp.work_channels(200, 720, 1280, cpu) == pp.QUERY_ALIGN  # never below one alignment unit
    assert pp.work_channels(200, 40, 40, cpu) == 208  # everything fits: one block
    assert pp.work_channels(200, 180, 320, torch.device("meta")) == pp.block_channels(200, 180, 320)


def test_each_block_is_upsampled_once(monkeypatch, ours):
    """Instance and panoptic take everything from one upsampling of each block (no second pass to paint)."""
    monkeypatch.setenv("VIDEOMT_FAST_POSTPROCESS_CPU_BLOCK_MB", "0.01")  # 16-query blocks
    calls = []
    real = pp._upsample
    monkeypatch.setattr(pp, "_upsample", lambda x, size: calls.append(x.shape[0]) or real(x, size))
    out = random_outputs(2, 37, 5, 8, 8, seed=4)
    out.class_queries_logits[..., 0] += 30.0  # every query confident in class 0: a candidate, kept in panoptic
    got = ours.post_process_instance_segmentation(out, [(30, 30)] * 2, threshold=0.0)
    assert sum(len(r["segments_info"]) for r in got) > 37
    assert calls == [16, 16, 5] * 2
    calls.clear()
    ours.post_process_panoptic_segmentation(out, [(30, 30)] * 2, threshold=0.5)
    assert calls == [16, 16, 5] * 2


def test_panoptic_nan_mask_logits_win_as_argmax_decides(monkeypatch, oracle, ours):
    """transformers' argmax picks the first NaN; a NaN in a later query block must beat earlier blocks."""
    monkeypatch.setenv("VIDEOMT_FAST_POSTPROCESS_BLOCK_MB", "0.01")  # 16-query blocks, on any device
    out = random_outputs(2, 40, 5, 16, 16, seed=9, layout="cells")
    out.class_queries_logits[:, [3, 30, 35], 1] += 30.0  # kept queries in the first and the last block
    out.masks_queries_logits[0, 30, 4:7, 5:9] = float("nan")
    out.masks_queries_logits[0, 35, 5:8, 6:9] = float("nan")  # overlaps 30's NaNs: the earlier query wins
    out.masks_queries_logits[1, 3, 8:12, 2:5] = float("nan")
    sizes = [(40, 40), (33, 47)]
    assert_segments_equal(
        oracle.post_process_panoptic_segmentation(out, sizes, threshold=0.5, overlap_mask_area_threshold=0.0),
        ours.post_process_panoptic_segmentation(out, sizes, threshold=0.5, overlap_mask_area_threshold=0.0),
    )


def test_semantic_ties_across_class_blocks(monkeypatch, oracle, ours):
    monkeypatch.setenv("VIDEOMT_FAST_POSTPROCESS_BLOCK_MB", "0.01")  # 16-class blocks
    out = random_outputs(2, 12, 40, 10, 12, seed=8)
    out.class_queries_logits[..., 25] = out.class_queries_logits[..., 5]  # equal class maps in two blocks
    out.class_queries_logits[..., [5, 25]] += 3.0
    sizes = [(30, 20), (17, 23)]
    for with_scores in (False, True):
        expected = oracle.post_process_semantic_segmentation(out, sizes, return_segmentation_scores=with_scores)
        got = ours.post_process_semantic_segmentation(out, sizes, return_segmentation_scores=with_scores)
        for e, o in paired(expected, got):
            e, o = (e.segmentation, o.segmentation) if with_scores else (e, o)
            assert torch.equal(e, o)
