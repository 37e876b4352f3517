"""CUDA post-processing kernels vs the references and transformers (GPU only; skipped without CUDA).

Every comparison is against an independent computation (the PyTorch reference backend, transformers'
processor, ATen's ``F.interpolate``), never the kernels against themselves. Pixel for pixel, except
where a decision sits within rounding of its threshold (:mod:`videomt_fast.testing.postprocess_checks`:
``|upsampled logit| < 1e-5``, or a class gap below ``1e-5``), as the mask-bit kernel tests allow.
"""

from __future__ import annotations

import pytest
import torch

import hf_oracle
from helpers import paired, random_outputs
from videomt_fast import ops
from videomt_fast.ops import _ext
from videomt_fast.processing.video_processor import VideomtVideoProcessor
from videomt_fast.testing.postprocess_checks import (NEAR, assert_maps_match, assert_segments_match, near_class_tie,
                                                     near_mask_threshold)
from videomt_fast.testing.postprocess_checks import upsampled as _upsampled

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ext():
    module = _ext.load()
    assert module is not None, f"the CUDA extension failed to build or import: {_ext.error()}"
    import videomt_fast.ops.cuda  # noqa: F401  registers the implementations

    return module


def _cuda(out):
    out.class_queries_logits = out.class_queries_logits.cuda()
    out.masks_queries_logits = out.masks_queries_logits.cuda()
    return out


def _cpu(results):
    return [{"segmentation": r["segmentation"].cpu(), "segments_info": r["segments_info"]} for r in results]


SIZES = [[(97, 131), (12, 9), (161, 75)], [(480, 854)], [(33, 200), (200, 33), (1, 5)]]


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}frames")
def test_instance_kernels_match(ext, sizes):
    out = _cuda(random_outputs(len(sizes), 45, 7, 40, 48, seed=1))
    proc = VideomtVideoProcessor()
    assert ops.explain("instance_segmentation", out.class_queries_logits, out.masks_queries_logits, sizes, 0.4).startswith(
        "instance_segmentation: cuda"
    )
    with ops.use_backend("cuda"):
        got = proc.post_process_instance_segmentation(out, sizes, threshold=0.4)
    with ops.use_backend("reference"):
        ref = proc.post_process_instance_segmentation(out, sizes, threshold=0.4)
    assert sum(len(r["segments_info"]) for r in ref) >= len(sizes)
    near = near_mask_threshold(out, sizes)
    assert_segments_match(_cpu(ref), _cpu(got), near)
    oracle = hf_oracle.load().processor.post_process_instance_segmentation(out, sizes, threshold=0.4)
    assert_segments_match(_cpu(oracle), _cpu(got), near)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}frames")
@pytest.mark.parametrize("fuse", [None, {0, 1, 2}])
def test_panoptic_kernels_match(ext, sizes, fuse):
    out = _cuda(random_outputs(len(sizes), 41, 7, 40, 48, seed=2, layout="cells"))
    proc = VideomtVideoProcessor()
    kw = dict(threshold=0.5, label_ids_to_fuse=fuse)
    with ops.use_backend("cuda"):
        got = proc.post_process_panoptic_segmentation(out, sizes, **kw)
    oracle = hf_oracle.load().processor.post_process_panoptic_segmentation(out, sizes, **kw)
    assert sum(len(r["segments_info"]) for r in oracle) >= len(sizes)
    assert_segments_match(_cpu(oracle), _cpu(got), near_mask_threshold(out, sizes))


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}frames")
@pytest.mark.parametrize("with_scores", [False, True])
def test_semantic_kernels_match(ext, sizes, with_scores):
    out = _cuda(random_outputs(len(sizes), 23, 19, 40, 48, seed=3))
    proc = VideomtVideoProcessor()
    with ops.use_backend("cuda"):
        got = proc.post_process_semantic_segmentation(out, sizes, return_segmentation_scores=with_scores)
    oracle = hf_oracle.load().processor.post_process_semantic_segmentation(out, sizes, return_segmentation_scores=with_scores)
    near = near_class_tie(out, sizes)
    for f, (e, o) in enumerate(paired(oracle, got)):
        if with_scores:
            assert_maps_match(e.segmentation, o.segmentation, near[f], f"frame {f}")
            # same arithmetic as ATen's kernel; allow one ulp in case nvcc contracts differently
            torch.testing.assert_close(o.segmentation_scores, e.segmentation_scores, rtol=1e-6, atol=1e-6)
        else:
            assert_maps_match(e, o, near[f], f"frame {f}")


def test_raw_kernels_overwrite_poisoned_outputs(ext):
    """Every output element is written: poisoned buffers come back equal to the reference."""
    torch.manual_seed(0)
    Q, h, w, H, W = 37, 20, 24, 77, 91
    masks = (torch.randn(Q, h, w, device="cuda") * 4).contiguous()
    stream = torch.cuda.current_stream().cuda_stream
    up = _upsampled(masks, (H, W))
    near = (up.abs() < NEAR).any(0).cpu()  # pixels where a mask decision may flip (module docstring)
    cand = torch.rand(Q, device="cuda") < 0.6
    tiles = (H + ext.STATS_ROWS - 1) // ext.STATS_ROWS
    cnt = torch.full((Q, tiles), -7, dtype=torch.int32, device="cuda")
    sm = torch.full((Q, tiles), float("nan"), device="cuda")
    ext.instance_stats(masks, cand.to(torch.uint8), H, W, cnt, sm, stream)
    pos = (up > 0).flatten(1)
    torch.testing.assert_close(cnt.sum(1).long(), torch.where(cand, pos.sum(1), 0))
    torch.testing.assert_close(sm.sum(1), torch.where(cand, (up.sigmoid().flatten(1) * pos).sum(1), 0.0), rtol=1e-5, atol=1e-3)
    keep = cand & (torch.rand(Q, device="cuda") < 0.7)
    ids = (torch.cumsum(keep, 0) - 1).to(torch.int32)
    kept = torch.argsort((~keep).to(torch.uint8), stable=True).to(torch.int32)
    out = torch.full((H, W), 99999, dtype=torch.long, device="cuda")
    ext.instance_paint(masks, kept, keep.sum().to(torch.int32).reshape(1), ids, out, stream)
    hits = (up > 0) & keep[:, None, None]
    rank = torch.arange(1, Q + 1, device="cuda")[:, None, None]
    last = torch.where(hits, rank, 0).amax(0)
    expected = torch.where(last > 0, ids.long()[(last - 1).clamp(min=0)], -1)
    assert_maps_match(expected, out, near, "instance_paint")
    sem_out = torch.full((H, W), -5, dtype=torch.long, device="cuda")
    scores = torch.full((Q, H, W), float("nan"), device="cuda")
    ext.semantic_argmax(masks, sem_out, scores, stream)
    torch.testing.assert_close(scores, up, rtol=1e-6, atol=1e-6)
    top = up.topk(2, dim=0).values
    assert_maps_match(up.argmax(0), sem_out, ((top[0] - top[1]) < NEAR).cpu(), "semantic_argmax")
    code = torch.full((H, W), 12345, dtype=torch.int32, device="cuda")
    areas = torch.zeros(3, Q, dtype=torch.int32, device="cuda")
    probs = torch.rand(Q, device="cuda")
    ext.panoptic_assign(masks, kept, keep.sum().to(torch.int32).reshape(1), probs, 0.5, code, areas[0], areas[1], areas[2], stream)
    prob_up = up.sigmoid()
    weighted = torch.where(keep[:, None, None], probs[:, None, None] * prob_up, -1.0)
    win = weighted.argmax(0)
    win_prob = prob_up.gather(0, win[None])[0]
    top = weighted.topk(2, dim=0).values
    tie = ((top[0] - top[1]) < NEAR).cpu()  # the winner itself may go either way
    assert_maps_match(torch.where(win_prob >= 0.5, win, -1), code.long(), near | tie, "panoptic_assign")
    # areas: off by at most the pixels where that query's decision (or the winner) may flip
    near_q = (up.abs() < NEAR).flatten(1).sum(1)
    want = torch.where(keep, (prob_up >= 0.5).flatten(1).sum(1), 0)
    assert ((areas[0].long() - want).abs() <= near_q).all(), (areas[0], want)
    want = torch.bincount(win.flatten(), minlength=Q)
    assert (areas[1].long() - want).abs().sum() <= 2 * int((near | tie).sum()), (areas[1], want)


@pytest.mark.parametrize("task", ["instance", "panoptic", "semantic"])
def test_memory_1080p_200_queries(ext, task):
    """Extra device memory for one 1080p frame with 200 queries stays under 64 MB (output included)."""
    out = _cuda(random_outputs(1, 200, 80, 160, 160, seed=4, layout="cells"))
    proc = VideomtVideoProcessor()
    sizes = [(1080, 1920)]
    call = {
        "instance": lambda: proc.post_process_instance_segmentation(out, sizes, threshold=0.3),
        "panoptic": lambda: proc.post_process_panoptic_segmentation(out, sizes, threshold=0.5),
        "semantic": lambda: proc.post_process_semantic_segmentation(out, sizes),
    }[task]
    with ops.use_backend("cuda"):
        call()  # warm up (extension, cuBLAS handles)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    assert result  # keep the result alive through the measurement
    assert peak <= 64 * 2**20, f"{task}: {peak / 2**20:.1f} MB extra"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_take_the_kernels_widened(ext, dtype):
    """The fast path's bf16/fp16 outputs go through the CUDA kernels and give what the PyTorch reference
    gives on their float32 widening (the reference backend: independent of the kernels)."""
    sizes = [(97, 131), (161, 75)]
    out = _cuda(random_outputs(len(sizes), 45, 7, 40, 48, seed=3))
    low = type(out)(class_queries_logits=out.class_queries_logits.to(dtype),
                    masks_queries_logits=out.masks_queries_logits.to(dtype))
    wide = type(out)(class_queries_logits=low.class_queries_logits, masks_queries_logits=low.masks_queries_logits.float())
    assert ops.explain("instance_segmentation", low.class_queries_logits, low.masks_queries_logits, sizes, 0.4).startswith(
        "instance_segmentation: cuda"
    )
    proc = VideomtVideoProcessor()
    for task, kwargs in (("instance", dict(threshold=0.4)), ("panoptic", dict(threshold=0.3))):
        method = f"post_process_{task}_segmentation"
        with ops.use_backend("cuda"):
            got = getattr(proc, method)(low, sizes, **kwargs)
        with ops.use_backend("reference"):
            want = getattr(proc, method)(wide, sizes, **kwargs)
        assert sum(len(r["segments_info"]) for r in want) >= 1, task
        assert_segments_match(_cpu(want), _cpu(got), near_mask_threshold(wide, sizes))


def test_kernels_run_on_the_tensors_device(ext):
    """Logits on cuda:1 with cuda:0 current: the bindings' device guard launches on cuda:1 (same maps)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    sizes = [(97, 131), (161, 75)]
    proc = VideomtVideoProcessor()
    results = []
    torch.cuda.set_device(0)
    for device in ("cuda:0", "cuda:1"):
        raw = random_outputs(len(sizes), 45, 7, 40, 48, seed=5, layout="cells")
        out = type(raw)(class_queries_logits=raw.class_queries_logits.to(device),
                        masks_queries_logits=raw.masks_queries_logits.to(device))
        with ops.use_backend("cuda"):
            got = proc.post_process_panoptic_segmentation(out, sizes, threshold=0.5)
        torch.cuda.synchronize(device)
        assert torch.cuda.current_device() == 0
        assert all(r["segmentation"].device == torch.device(device) for r in got)
        results.append(_cpu(got))
    near = [torch.zeros(s, dtype=torch.bool) for s in sizes]  # same device model, same kernels: exact
    assert_segments_match(results[0], results[1], near)
