"""EomtImageProcessor vs transformers' EoMT image processors.

Oracles: transformers' default ``EomtImageProcessor`` module (``image_processing_eomt.py``) imports
torchvision at the top, which may be missing; its split / pad / merge / un-pad and all post-processing
code is plain torch, so ``videomt_fast.apps.hf_source`` runs that file's own code without torchvision
(``_torch_oracle``). The resize needs a real backend: transformers'
``EomtImageProcessorPil`` (Pillow) is the pre-processing oracle when Pillow is installed.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from videomt_fast.processing.eomt_processor import EomtImageProcessor, resized_size, window_offsets

from helpers import paired

transformers = pytest.importorskip("transformers")

_CACHE: dict = {}


def _torch_oracle():
    """transformers' ``EomtImageProcessor`` class (its source run without torchvision where it is missing)."""
    if "torch" not in _CACHE:
        from videomt_fast.apps import hf_source

        cls, how = hf_source.eomt_image_processor_class()
        _CACHE["torch"] = SimpleNamespace(cls=cls, how=how)
    return _CACHE["torch"]


def _hf_post(size):
    proc = _torch_oracle().cls()
    proc.size = dict(size)
    return proc


def _pil_oracle(**kwargs):
    pytest.importorskip("PIL")
    from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

    return EomtImageProcessorPil(**kwargs)


def _outputs(batch, queries, classes, mask_hw, seed, scale=4.0, offsets=None):
    gen = torch.Generator().manual_seed(seed)
    cls = torch.randn(batch, queries, classes + 1, generator=gen) * scale
    # smooth blobs plus noise, so that queries own regions and the area rules have something to decide
    coarse = torch.randn(batch, queries, 4, 4, generator=gen) * 6 - 7
    masks = torch.nn.functional.interpolate(coarse, size=mask_hw, mode="bilinear") + torch.randn(
        batch, queries, *mask_hw, generator=gen
    )
    return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks, patch_offsets=offsets)


def _same_segments(ours, theirs, exact_dtype=True):
    for o, t in paired(ours, theirs):
        so, st = o["segmentation"], t["segmentation"]
        assert so.shape == st.shape
        if exact_dtype and st.dtype == so.dtype:
            assert torch.equal(so, st)
        else:
            assert torch.equal(so.to(st.dtype), st)
        assert [(s["id"], s["label_id"]) for s in o["segments_info"]] == [(s["id"], s["label_id"]) for s in t["segments_info"]]
        for a, b in paired(o["segments_info"], t["segments_info"], allow_empty=True):  # (ids compared above)
            assert abs(a["score"] - b["score"]) <= 1e-5


# ------------------------------------------------------------------------------------------------ sizes


def test_resized_size_matches_transformers():
    from transformers.image_transforms import get_size_with_aspect_ratio

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        h, w = (int(v) for v in rng.integers(1, 3000, size=2))
        short = int(rng.choice([32, 384, 512, 640, 1024]))
        long = [None, short, int(short * rng.uniform(1, 2.5))][int(rng.integers(0, 3))]
        assert resized_size((h, w), short, long) == tuple(get_size_with_aspect_ratio((h, w), short, long)), (h, w, short, long)
        checked += 1
    assert resized_size((480, 1920), 640, 1024) == (256, 1024)  # by hand: 1920/480*640 > 1024, so short = 1024*480/1920


def test_window_offsets_match_transformers_split():
    oracle = _torch_oracle()
    from transformers.image_utils import SizeDict

    proc = oracle.cls()
    for h, w, window in [(64, 64, 64), (64, 150, 64), (200, 64, 64), (64, 129, 64), (512, 683, 512), (512, 2000, 512)]:
        img = torch.randn(1, 3, h, w)
        patches, offsets = proc._split_image(img, SizeDict(shortest_edge=window), [0])
        assert [tuple(o[1:]) for o in offsets] == window_offsets(h, w, window)
        ours = EomtImageProcessor(size={"shortest_edge": window, "longest_edge": None}, do_resize=False,
                                  do_rescale=False, do_normalize=False, do_split_image=True)(img[0])
        assert len(ours["pixel_values"]) == len(patches)
        for a, b in paired(ours["pixel_values"], patches):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ pre-processing


def _random_images(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]


PRE_CASES = [
    # (processor kwargs, image shapes)
    (dict(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True), [(48, 80), (90, 61), (64, 64), (130, 40)]),
    (dict(size={"shortest_edge": 64, "longest_edge": None}, do_split_image=True), [(50, 120), (150, 70), (64, 64), (64, 200)]),
    (dict(size={"shortest_edge": 48, "longest_edge": 96}), [(30, 70), (100, 41)]),
    (dict(size={"shortest_edge": 32, "longest_edge": 32}, do_pad=True, image_mean=0.5, image_std=0.25), [(120, 75)]),
]


@pytest.mark.parametrize("case", range(len(PRE_CASES)))
def test_preprocess_matches_transformers_pil_backend(case):
    """Shapes, patch_offsets identical; pixels within one uint8 level (Pillow's fixed-point resize vs torch's)."""
    kwargs, shapes = PRE_CASES[case]
    hf = _pil_oracle(**kwargs)
    ours = EomtImageProcessor(**kwargs)
    images = _random_images(case, shapes)
    theirs = hf(images=images, return_tensors=None)
    mine = ours(images=images, return_tensors=None)
    assert len(mine["pixel_values"]) == len(theirs["pixel_values"])
    assert [o.tolist() for o in mine["patch_offsets"]] == [list(map(int, o)) for o in theirs["patch_offsets"]]
    std = kwargs.get("image_std", 0.224)  # one uint8 level after normalisation, smallest std
    level = 1.0 / (255 * std)
    total = differing = 0
    for a, b in paired(mine["pixel_values"], theirs["pixel_values"]):
        b = torch.as_tensor(np.asarray(b))
        assert a.shape == b.shape and a.dtype == torch.float32
        diff = (a - b).abs()
        assert diff.max().item() <= level * 1.0001 + 1e-5, diff.max().item()
        total += diff.numel()
        differing += int((diff > 1e-4).sum())
    # noise images, the worst case for resampling: 0.07% to 7% of values differ here, each by one level
    assert differing / total < 0.10, differing / total


def test_preprocess_identical_when_no_resize_is_needed():
    """Without a resize (image already at its resized size) we match transformers to float rounding."""
    hf = _pil_oracle(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True)
    ours = EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True)
    images = _random_images(5, [(48, 64), (64, 30), (64, 64)])
    theirs = hf(images=images, return_tensors="pt")["pixel_values"]
    mine = ours(images=images, return_tensors="pt")["pixel_values"]
    assert mine.shape == theirs.shape == (3, 3, 64, 64)
    assert (mine - theirs).abs().max().item() <= 1e-5


def test_preprocess_input_forms_agree():
    img = _random_images(7, [(40, 70)])[0]
    proc = EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}, do_pad=True)
    ref = proc(images=img, return_tensors="pt")["pixel_values"]
    assert ref.shape == (1, 3, 32, 32)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    for form in (torch.from_numpy(img), chw, [chw], chw[None], [img]):
        assert torch.equal(proc(images=form, return_tensors="pt")["pixel_values"], ref)
    # grayscale with do_convert_rgb: the channel is repeated
    gray = chw[:1]
    rgb = proc(images=gray, do_convert_rgb=True, return_tensors="pt")["pixel_values"]
    assert torch.equal(rgb, proc(images=gray.expand(3, -1, -1), return_tensors="pt")["pixel_values"])
    # float input in [0, 255] is resized without rounding: close to, not equal to, the uint8 path
    flt = proc(images=chw.float(), return_tensors="pt")["pixel_values"]
    assert (flt - ref).abs().max().item() < 0.02
    # padding is applied before normalisation: the pad value is -mean/std
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(ref[0, :, -1, :], (-mean / std)[:, None].expand(3, 32), atol=1e-6)


def test_preprocess_segmentation_maps_match_transformers():
    hf = _pil_oracle(size={"shortest_edge": 32, "longest_edge": 32}, do_pad=True, ignore_index=255)
    ours = EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}, do_pad=True, ignore_index=255)
    rng = np.random.default_rng(3)
    images = _random_images(3, [(32, 32), (32, 20)])
    maps = [rng.integers(0, 4, size=(32, 32)).astype(np.int64), rng.integers(0, 6, size=(32, 20)).astype(np.int64)]
    theirs = hf(images=images, segmentation_maps=maps, return_tensors="pt")
    mine = ours(images=images, segmentation_maps=maps, return_tensors="pt")
    for a, b in paired(mine["mask_labels"], theirs["mask_labels"]):
        assert torch.equal(a, torch.as_tensor(b).float())
    for a, b in paired(mine["class_labels"], theirs["class_labels"]):
        assert torch.equal(a, torch.as_tensor(b).long())


# ------------------------------------------------------------------------------------------------ post-processing

SIZES = [
    {"shortest_edge": 64, "longest_edge": 64},
    {"shortest_edge": 48, "longest_edge": 80},
]
TARGETS = [[(48, 64), (64, 40)], [(100, 37), (64, 64)], [(31, 200), (200, 31)]]


@pytest.mark.parametrize("size", SIZES, ids=["64x64", "48x80"])
@pytest.mark.parametrize("targets", range(len(TARGETS)))
def test_semantic_padded_matches_transformers(size, targets):
    targets = TARGETS[targets]
    out_hw = (size["shortest_edge"] // 4, (size["longest_edge"] or size["shortest_edge"]) // 4)
    outputs = _outputs(len(targets), 20, 6, out_hw, seed=targets[0][0])
    hf = _hf_post(size)
    ours = EomtImageProcessor(size=size)
    mine = ours.post_process_semantic_segmentation(outputs, target_sizes=targets)
    theirs = hf.post_process_semantic_segmentation(outputs, target_sizes=targets)
    for a, b in paired(mine, theirs):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    mine = ours.post_process_semantic_segmentation(outputs, target_sizes=targets, return_segmentation_scores=True)
    theirs = hf.post_process_semantic_segmentation(outputs, target_sizes=targets, return_segmentation_scores=True)
    for a, b in paired(mine, theirs):
        assert torch.equal(a.segmentation, b.segmentation)
        assert (a.segmentation_scores - b.segmentation_scores).abs().max().item() <= 1e-6


@pytest.mark.parametrize("targets", [[(64, 150), (170, 64), (64, 64)], [(40, 100)], [(128, 300), (90, 64)]])
def test_semantic_sliding_windows_match_transformers(targets):
    """Split with our pre-processing, random window logits, stitch: same maps as transformers' merge."""
    size = {"shortest_edge": 64, "longest_edge": None}
    proc = EomtImageProcessor(size=size, do_split_image=True)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in targets]
    inputs = proc(images=images, return_tensors="pt")
    windows = inputs["pixel_values"].shape[0]
    offsets = inputs["patch_offsets"]
    hf = _hf_post(size)
    outputs = _outputs(windows, 12, 5, (16, 16), seed=windows, offsets=offsets)
    # transformers' own split of the same resized images gives the same offsets
    assert [o.tolist() for o in offsets] == [
        [i, s, e] for i, (h, w) in enumerate(targets) for s, e in window_offsets(*resized_size((h, w), 64), 64)
    ]
    mine = proc.post_process_semantic_segmentation(outputs, target_sizes=targets)
    theirs = hf.post_process_semantic_segmentation(outputs, target_sizes=targets)
    for a, b, t in paired(mine, theirs, targets):
        assert a.shape == t and torch.equal(a, b)
    mine = proc.post_process_semantic_segmentation(outputs, target_sizes=targets, return_segmentation_scores=True)
    theirs = hf.post_process_semantic_segmentation(outputs, target_sizes=targets, return_segmentation_scores=True)
    for a, b in paired(mine, theirs):
        assert torch.equal(a.segmentation, b.segmentation)
        assert (a.segmentation_scores - b.segmentation_scores).abs().max().item() <= 1e-6
    # the public merge helper on its own
    logits = torch.randn(windows, 4, 64, 64)
    for a, b in paired(proc.merge_image_patches(logits, offsets, targets, size), hf.merge_image_patches(logits, offsets, targets, size)):
        assert (a - b).abs().max().item() <= 1e-6


def test_unpad_image_matches_transformers():
    size = {"shortest_edge": 64, "longest_edge": 64}
    logits = torch.randn(3, 5, 64, 64)
    targets = [(48, 64), (90, 31), (64, 64)]
    for a, b in paired(EomtImageProcessor(size=size).unpad_image(logits, targets, size), _hf_post(size).unpad_image(logits, targets, size)):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("size", SIZES, ids=["64x64", "48x80"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("targets", range(len(TARGETS)))
def test_instance_matches_transformers(size, threshold, targets):
    targets = TARGETS[targets]
    out_hw = (size["shortest_edge"] // 4, (size["longest_edge"] or size["shortest_edge"]) // 4)
    outputs = _outputs(len(targets), 24, 4, out_hw, seed=int(threshold * 10) + targets[0][1])
    mine = EomtImageProcessor(size=size).post_process_instance_segmentation(outputs, target_sizes=targets, threshold=threshold)
    theirs = _hf_post(size).post_process_instance_segmentation(outputs, target_sizes=targets, threshold=threshold)
    _same_segments(mine, theirs)
    for m in mine:
        assert m["segmentation"].dtype == torch.float32
    if threshold <= 0.3:
        assert any(m["segments_info"] for m in mine)  # the case exercises kept instances


@pytest.mark.parametrize("size", SIZES, ids=["64x64", "48x80"])
@pytest.mark.parametrize(
    "threshold,mask_threshold,overlap,stuff",
    [(0.8, 0.5, 0.8, None), (0.3, 0.5, 0.8, [0, 2]), (0.2, 0.3, 0.5, None), (0.5, 0.6, 0.2, [1]), (0.0, 0.5, 0.0, [0, 1, 2, 3])],
)
@pytest.mark.parametrize("targets", range(len(TARGETS)))
def test_panoptic_matches_transformers(size, threshold, mask_threshold, overlap, stuff, targets):
    targets = TARGETS[targets]
    out_hw = (size["shortest_edge"] // 4, (size["longest_edge"] or size["shortest_edge"]) // 4)
    outputs = _outputs(len(targets), 24, 4, out_hw, seed=int(threshold * 10) + targets[0][0])
    kw = dict(threshold=threshold, mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap, stuff_classes=stuff)
    mine = EomtImageProcessor(size=size).post_process_panoptic_segmentation(outputs, target_sizes=targets, **kw)
    theirs = _hf_post(size).post_process_panoptic_segmentation(outputs, target_sizes=targets, **kw)
    # transformers returns a float32 CPU map for an image with no kept query; ours is int64 throughout
    _same_segments(mine, theirs, exact_dtype=False)
    for m in mine:
        assert m["segmentation"].dtype == torch.int64
    if threshold <= 0.3:
        assert any(m["segments_info"] for m in mine)


def test_post_processing_defaults_use_processor_size():
    size = {"shortest_edge": 48, "longest_edge": 80}
    outputs = _outputs(2, 16, 3, (12, 20), seed=11)
    targets = [(30, 50), (80, 48)]
    ours, hf = EomtImageProcessor(size=size), _hf_post(size)
    _same_segments(ours.post_process_panoptic_segmentation(outputs, targets, threshold=0.2),
                   hf.post_process_panoptic_segmentation(outputs, targets, threshold=0.2), exact_dtype=False)
    _same_segments(ours.post_process_instance_segmentation(outputs, targets, threshold=0.2),
                   hf.post_process_instance_segmentation(outputs, targets, threshold=0.2))


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    proc = EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32})
    with pytest.raises(ValueError, match="size"):
        EomtImageProcessor(size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match="resample"):
        EomtImageProcessor(resample=5)
    with pytest.raises(ValueError, match="image_std"):
        EomtImageProcessor(image_std=(1.0, 2.0))
    with pytest.raises(TypeError, match="images"):
        proc(images="not an image")
    with pytest.raises(ValueError, match="images\\[0\\].*3 channels"):
        proc(images=torch.zeros(1, 20, 20))
    with pytest.raises(ValueError, match="images\\[0\\].*channel dimension"):
        proc(images=torch.zeros(2, 20, 20))
    with pytest.raises(ValueError, match="images"):
        proc(images=torch.zeros(1, 1, 3, 20, 20))
    with pytest.raises(ValueError, match="return_tensors='pt'"):
        proc(images=[torch.zeros(3, 20, 40, dtype=torch.uint8), torch.zeros(3, 40, 20, dtype=torch.uint8)], return_tensors="pt")
    with pytest.raises(TypeError, match="unexpected"):
        proc(images=torch.zeros(3, 20, 20), do_magic=True)
    outputs = _outputs(2, 5, 3, (8, 8), seed=0)
    with pytest.raises(ValueError, match="target_sizes"):
        proc.post_process_panoptic_segmentation(outputs, target_sizes=[(10, 10)])
    with pytest.raises(ValueError, match="target_sizes\\[1\\]"):
        proc.post_process_instance_segmentation(outputs, target_sizes=[(10, 10), (0, 4)])
    with pytest.raises(ValueError, match="masks_queries_logits"):
        proc.post_process_semantic_segmentation(
            SimpleNamespace(class_queries_logits=outputs.class_queries_logits, masks_queries_logits=torch.zeros(2, 5, 8)), [(8, 8)] * 2
        )
    with pytest.raises(ValueError, match="outputs"):
        proc.post_process_semantic_segmentation(object(), [(8, 8)])
    bad = SimpleNamespace(class_queries_logits=outputs.class_queries_logits, masks_queries_logits=outputs.masks_queries_logits,
                          patch_offsets=[torch.tensor([0, 0, 32])])
    with pytest.raises(ValueError, match="patch_offsets"):
        proc.post_process_semantic_segmentation(bad, [(32, 64)])


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_end_to_end_matches_transformers(task):
    """Our model + our processor vs transformers' model + transformers' processor on one image."""
    import videomt_fast
    from helpers import hf_eomt, randomize_

    hf_model = randomize_(hf_eomt(image_size=48, num_labels=4, num_queries=9), seed=3)
    with torch.no_grad():  # confident classes, so the maps hold several classes / segments
        hf_model.class_predictor.weight.mul_(10)
    model = videomt_fast.from_transformers(hf_model).eval()
    if task == "semantic":
        kwargs = dict(size={"shortest_edge": 48, "longest_edge": None}, do_split_image=True)
        shape = (48, 130)  # short side already 48: windows without a resize
    else:
        kwargs = dict(size={"shortest_edge": 48, "longest_edge": 48}, do_pad=True)
        shape = (36, 48)  # long side already 48: padded without a resize
    image = _random_images(21, [shape])[0]
    hf_proc = _pil_oracle(**kwargs)
    hf_inputs = hf_proc(images=[image], return_tensors="pt")
    ours_proc = EomtImageProcessor(**kwargs)
    inputs = ours_proc(images=[image], return_tensors="pt")
    assert (inputs["pixel_values"] - hf_inputs["pixel_values"]).abs().max().item() <= 1e-5
    with torch.no_grad():
        hf_out = hf_model(pixel_values=hf_inputs["pixel_values"], patch_offsets=hf_inputs["patch_offsets"] or None)
        out = model(pixel_values=inputs["pixel_values"], patch_offsets=inputs["patch_offsets"] or None)
    hf_post = _hf_post(kwargs["size"])
    targets = [shape]
    if task == "semantic":
        a = ours_proc.post_process_semantic_segmentation(out, targets)[0]
        b = hf_post.post_process_semantic_segmentation(hf_out, targets)[0]
        assert a.shape == shape and (a == b).float().mean().item() == 1.0
        assert len(torch.unique(a)) > 1
    elif task == "instance":
        a = ours_proc.post_process_instance_segmentation(out, targets, threshold=0.1)
        b = hf_post.post_process_instance_segmentation(hf_out, targets, threshold=0.1)
        _same_segments(a, b)
        assert a[0]["segments_info"]
    else:
        a = ours_proc.post_process_panoptic_segmentation(out, targets, threshold=0.2, stuff_classes=[0])
        b = hf_post.post_process_panoptic_segmentation(hf_out, targets, threshold=0.2, stuff_classes=[0])
        _same_segments(a, b, exact_dtype=False)
        assert a[0]["segments_info"]
