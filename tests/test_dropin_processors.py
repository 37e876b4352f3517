"""Processors as drop-ins: configuration files, frame sampling, center crop, scalar mean/std, empty results.

Oracles are transformers' own classes. Their configuration code (``to_dict``, ``save_pretrained``,
``from_pretrained``, ``from_dict``), the VidEoMT ``sample_frames`` and every post-processing method are plain
Python / torch and run here even without torchvision: transformers' ``VideomtVideoProcessor`` module is then
executed from its source with the real ``BaseVideoProcessor`` (``videomt_fast.apps.hf_source``), and the EoMT
oracle is transformers' Pillow-backend ``EomtImageProcessorPil`` (which also pre-processes).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from videomt_fast import EomtImageProcessor, VideomtVideoProcessor

from helpers import paired

transformers = pytest.importorskip("transformers")


def _hf_video_class():
    """transformers' ``VideomtVideoProcessor`` (its module run from source where torchvision is missing)."""
    try:
        return type(transformers.VideomtVideoProcessor())
    except Exception:  # noqa: BLE001 - torchvision missing: the same source, real BaseVideoProcessor
        from videomt_fast.apps import hf_source

        namespace = hf_source.exec_module_source(
            "models.videomt.video_processing_videomt", {"auto_docstring": hf_source._no_docstring}
        )
        return namespace["VideomtVideoProcessor"]


def _hf_eomt_class():
    pytest.importorskip("PIL")
    from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

    return EomtImageProcessorPil


VIDEO_SETTINGS = [
    {},
    {"size": {"height": 48, "width": 40}, "image_mean": 0.5, "image_std": [0.25, 0.5, 1.0], "do_normalize": False},
    {"size": 36, "do_center_crop": True, "crop_size": {"height": 20, "width": 24}, "do_sample_frames": True, "num_frames": 3},
    {"do_resize": None, "rescale_factor": 0.5, "fps": 2},
]
EOMT_SETTINGS = [
    {},
    {"size": {"shortest_edge": 48, "longest_edge": None}, "do_split_image": True, "ignore_index": 255},
    {"size": 32, "do_pad": True, "image_mean": 0.5, "image_std": 0.25, "do_convert_rgb": True},
    {"do_rescale": False, "crop_size": 20, "do_center_crop": True},
]


def _pairs():
    return [("video", VideomtVideoProcessor, _hf_video_class, s) for s in VIDEO_SETTINGS] + [
        ("eomt", EomtImageProcessor, _hf_eomt_class, s) for s in EOMT_SETTINGS
    ]


@pytest.mark.parametrize("kind, ours_cls, hf_cls, settings", _pairs(), ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_configuration_matches_transformers_both_ways(tmp_path, kind, ours_cls, hf_cls, settings):
    hf_cls = hf_cls()
    ours, theirs = ours_cls(**settings), hf_cls(**settings)
    assert ours.to_dict() == theirs.to_dict()
    assert ours.to_json_string() == theirs.to_json_string()
    name = "video_preprocessor_config.json" if kind == "video" else "preprocessor_config.json"

    saved = ours.save_pretrained(tmp_path / "ours")  # ours -> transformers
    assert saved == [os.path.join(tmp_path / "ours", name)]
    assert hf_cls.from_pretrained(tmp_path / "ours").to_dict() == ours.to_dict()
    theirs.save_pretrained(tmp_path / "theirs")  # transformers -> ours
    loaded = ours_cls.from_pretrained(tmp_path / "theirs")
    assert type(loaded) is ours_cls and loaded.to_dict() == theirs.to_dict()

    ours.to_json_file(tmp_path / "x.json")
    assert ours_cls.from_json_file(tmp_path / "x.json").to_dict() == hf_cls.from_json_file(tmp_path / "x.json").to_dict()
    d = theirs.to_dict()
    assert ours_cls.from_dict(d).to_dict() == hf_cls.from_dict(d).to_dict()
    assert ours_cls.from_dict(d, size=42, do_normalize=False).to_dict() == hf_cls.from_dict(d, size=42, do_normalize=False).to_dict()


def test_from_pretrained_reads_transformers_layouts(tmp_path):
    hf_cls = _hf_video_class()
    # transformers v5 processors save one processor_config.json with the video processor nested in it
    nested = {"video_processor": hf_cls(size={"height": 24, "width": 32}, num_frames=4).to_dict(), "processor_class": "X"}
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "processor_config.json").write_text(json.dumps(nested))
    assert VideomtVideoProcessor.from_pretrained(tmp_path / "nested").to_dict() == nested["video_processor"]
    # older folders: preprocessor_config.json; also under a subfolder, and a JSON file path directly
    hf_cls(size={"height": 16, "width": 16}).to_json_file(tmp_path / "preprocessor_config.json")
    os.makedirs(tmp_path / "repo" / "sub")
    os.replace(tmp_path / "preprocessor_config.json", tmp_path / "repo" / "sub" / "preprocessor_config.json")
    loaded = VideomtVideoProcessor.from_pretrained(tmp_path / "repo", subfolder="sub", do_resize=False)
    assert loaded.size == {"height": 16, "width": 16} and loaded.do_resize is False
    direct = VideomtVideoProcessor.from_pretrained(tmp_path / "repo" / "sub" / "preprocessor_config.json")
    assert direct.size == {"height": 16, "width": 16}
    with pytest.raises(OSError, match="video_preprocessor_config.json"):
        VideomtVideoProcessor.from_pretrained(tmp_path / "repo")
    # an EoMT folder of transformers' with the image processor nested
    eomt = _hf_eomt_class()(size={"shortest_edge": 32, "longest_edge": 64}, do_pad=True).to_dict()
    (tmp_path / "eomt").mkdir()
    (tmp_path / "eomt" / "processor_config.json").write_text(json.dumps({"image_processor": eomt}))
    assert EomtImageProcessor.from_pretrained(tmp_path / "eomt").to_dict() == eomt


def test_explicit_none_survives_a_round_trip(tmp_path):
    hf_cls = _hf_video_class()
    ours, theirs = VideomtVideoProcessor(do_resize=None), hf_cls(do_resize=None)
    assert ours.to_dict() == theirs.to_dict() and ours.to_dict()["do_resize"] is None
    ours.save_pretrained(tmp_path)
    assert VideomtVideoProcessor.from_pretrained(tmp_path).do_resize is None


def _metadata(total, fps=None):
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=total, fps=fps)


@pytest.mark.parametrize(
    "total, fps_video, num_frames, fps",
    [(8, None, 3, None), (9, None, 9, None), (7, 4.0, None, 3), (10, 30.0, None, 1), (11, None, None, None), (5, 2.0, 1, None)],
)
def test_sample_frames_matches_transformers(total, fps_video, num_frames, fps):
    import transformers

    try:
        theirs = _hf_video_class()().sample_frames(metadata=_metadata(total, fps_video), num_frames=num_frames, fps=fps)
    except (ZeroDivisionError, TypeError) as exc:  # transformers 5.17: fps rounding to 0 frames, num_frames None
        pytest.skip(f"transformers {transformers.__version__}'s sample_frames itself fails on these arguments "
                    f"({type(exc).__name__}: {exc}): no oracle to compare with")
    ours = VideomtVideoProcessor().sample_frames(metadata={"total_num_frames": total, "fps": fps_video}, num_frames=num_frames, fps=fps)
    np.testing.assert_array_equal(ours, theirs)
    # transformers' own VideoMetadata objects are accepted too
    np.testing.assert_array_equal(VideomtVideoProcessor().sample_frames(_metadata(total, fps_video), num_frames=num_frames, fps=fps), theirs)


def test_sample_frames_errors_match_transformers():
    hf = _hf_video_class()()
    for kwargs in ({"metadata": {"total_num_frames": 8}, "fps": 3},  # fps needs the video's fps
                   {"metadata": {"total_num_frames": 8, "fps": 4}, "num_frames": 2, "fps": 3},  # exclusive
                   {"metadata": {"total_num_frames": 8}, "num_frames": 9}):  # more than there are
        with pytest.raises(ValueError):
            hf.sample_frames(**{**kwargs, "metadata": _metadata(**{"total": kwargs["metadata"]["total_num_frames"], "fps": kwargs["metadata"].get("fps")})})
        with pytest.raises(ValueError, match="num_frames|fps"):
            VideomtVideoProcessor().sample_frames(**kwargs)


def _video(frames=8, h=30, w=26, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 3, h, w), dtype=torch.uint8, generator=gen)


def test_preprocess_samples_frames_as_transformers():
    proc = VideomtVideoProcessor(size={"height": 16, "width": 16})
    videos = [_video(8, seed=1), _video(6, seed=2)]
    plain = proc(videos, return_tensors=None)["pixel_values_videos"]
    # do_sample_frames off: num_frames is ignored, as in transformers
    assert proc(videos, num_frames=3, return_tensors=None)["pixel_values_videos"][0].shape[0] == 8
    out = proc(videos, do_sample_frames=True, num_frames=3, return_metadata=True)
    hf = _hf_video_class()()
    for i, video in enumerate(videos):
        indices = hf.sample_frames(metadata=_metadata(len(video)), num_frames=3)
        torch.testing.assert_close(out["pixel_values_videos"][i], plain[i][torch.as_tensor(indices)], rtol=0, atol=0)
        assert out["video_metadata"][i]["frames_indices"] == [int(j) for j in indices]
    # fps sampling from per-video metadata (dicts or transformers' VideoMetadata, flat or nested lists)
    meta = [[{"total_num_frames": 8, "fps": 4, "duration": 2.0}], [_metadata(6, 3.0)]]
    out = proc(videos, do_sample_frames=True, fps=3, video_metadata=meta, return_tensors=None)["pixel_values_videos"]
    assert [v.shape[0] for v in out] == [6, 6]
    with pytest.raises(ValueError, match="video_metadata"):
        proc(videos, do_sample_frames=True, fps=3, video_metadata=meta[:1])
    with pytest.raises(ValueError, match="num_frames=10"):
        proc(videos, do_sample_frames=True, num_frames=10)


def _hf_center_crop(monkeypatch):
    """transformers' torchvision-backend ``center_crop`` (the VidEoMT processor's backend). Without torchvision its
    two primitives are stood in for (``pad`` with ``[left, top, right, bottom]`` zeros, ``crop(top, left, h, w)``):
    where to pad and where to crop is transformers' own code."""
    from transformers import image_processing_backends as backends
    from transformers.image_utils import SizeDict

    if not hasattr(backends, "tvF"):
        shim = SimpleNamespace(
            pad=lambda img, ltrb, fill=0, **_: torch.nn.functional.pad(img, (ltrb[0], ltrb[2], ltrb[1], ltrb[3]), value=fill),
            crop=lambda img, top, left, h, w: img[..., top : top + h, left : left + w],
        )
        monkeypatch.setattr(backends, "tvF", shim, raising=False)
    return lambda images, hw: backends.TorchvisionBackend.center_crop(None, images, SizeDict(height=hw[0], width=hw[1]))


@pytest.mark.parametrize("crop", [(20, 24), (31, 40), (7, 26), (30, 27)])
def test_center_crop_matches_transformers(monkeypatch, crop):
    video = _video(3, 30, 26, seed=3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    out = VideomtVideoProcessor(do_resize=False, do_center_crop=True, crop_size={"height": crop[0], "width": crop[1]},
                                image_mean=mean, image_std=std)(video)["pixel_values_videos"][0]
    cropped = _hf_center_crop(monkeypatch)(video, crop).float()
    expected = (cropped - torch.tensor(mean)[:, None, None] * 255) / (torch.tensor(std)[:, None, None] * 255)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    # transformers' numpy center crop agrees where no padding is involved
    if crop[0] <= 30 and crop[1] <= 26:
        from transformers.image_transforms import center_crop

        np_crop = center_crop(video[0].numpy(), crop, data_format="channels_first", input_data_format="channels_first")
        torch.testing.assert_close(cropped[0], torch.from_numpy(np.asarray(np_crop, dtype=np.float32)), rtol=0, atol=0)
    # asking for a crop without a crop size names it
    with pytest.raises(ValueError, match="crop_size"):
        VideomtVideoProcessor(do_center_crop=True)(video)


def test_scalar_mean_std_video():
    video = _video(2, 20, 20, seed=4)
    proc = VideomtVideoProcessor(size={"height": 16, "width": 16})
    scalar = proc(video, image_mean=0.5, image_std=0.25)["pixel_values_videos"]
    listed = proc(video, image_mean=[0.5] * 3, image_std=[0.25] * 3)["pixel_values_videos"]
    torch.testing.assert_close(scalar, listed, rtol=0, atol=0)
    assert VideomtVideoProcessor(image_mean=0.5).to_dict() == _hf_video_class()(image_mean=0.5).to_dict()


@pytest.mark.parametrize("mean, std", [(0.5, 0.25), (0.0, 1.0), ([0.1, 0.2, 0.3], 0.5)])
def test_scalar_mean_std_eomt_matches_transformers(mean, std):
    gen = torch.Generator().manual_seed(5)
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=gen) for _ in range(2)]
    settings = {"size": {"shortest_edge": 32, "longest_edge": 32}, "image_mean": mean, "image_std": std}
    ours = EomtImageProcessor(**settings)(images, return_tensors="pt")["pixel_values"]
    theirs = _hf_eomt_class()(**settings)([i.numpy() for i in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)


def test_eomt_center_crop_warns_as_it_has_no_effect():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    proc = EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32})
    with pytest.warns(UserWarning, match="do_center_crop"):
        cropped = proc(image, do_center_crop=True, crop_size=16, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(cropped, proc(image, return_tensors="pt")["pixel_values"], rtol=0, atol=0)


def _eomt_outputs(batch, queries, classes, hw, seed, hopeless=()):
    """Random logits; images in ``hopeless`` have every query's no-object logit far ahead (nothing passes)."""
    gen = torch.Generator().manual_seed(seed)
    cls = torch.randn(batch, queries, classes + 1, generator=gen) * 3
    for b in hopeless:
        cls[b, :, -1] = 50.0
    masks = torch.randn(batch, queries, *hw, generator=gen) * 4
    return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks, patch_offsets=None)


@pytest.mark.parametrize("task", ["instance", "panoptic"])
@pytest.mark.parametrize("hopeless", [(0, 1), (1,)])
def test_eomt_no_query_passing_gives_transformers_empty_results(task, hopeless):
    size = {"shortest_edge": 32, "longest_edge": 32}
    outputs = _eomt_outputs(2, 5, 3, (8, 8), seed=6, hopeless=hopeless)
    targets = [(20, 24), (32, 16)]
    ours_proc, hf_proc = EomtImageProcessor(size=size), _hf_eomt_class()(size=size)
    method = f"post_process_{task}_segmentation"
    ours = getattr(ours_proc, method)(outputs, targets, threshold=0.5)
    theirs = getattr(hf_proc, method)(outputs, targets, threshold=0.5)
    for b, (o, t) in enumerate(paired(ours, theirs)):
        assert o["segments_info"] == t["segments_info"]
        assert o["segmentation"].dtype == t["segmentation"].dtype and o["segmentation"].device == t["segmentation"].device
        torch.testing.assert_close(o["segmentation"], t["segmentation"], rtol=0, atol=0)
        if b in hopeless:
            assert o["segments_info"] == [] and bool((o["segmentation"] == -1).all())


@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_video_no_query_passing_gives_transformers_empty_results(task):
    outputs = _eomt_outputs(2, 4, 3, (8, 8), seed=7, hopeless=(0,))
    targets = [(12, 10), (12, 10)]
    method = f"post_process_{task}_segmentation"
    ours = getattr(VideomtVideoProcessor(), method)(outputs, targets)
    theirs = getattr(_hf_video_class()(), method)(outputs, targets)
    for o, t in paired(ours, theirs):
        assert o["segments_info"] == t["segments_info"]
        assert o["segmentation"].dtype == t["segmentation"].dtype
        torch.testing.assert_close(o["segmentation"], t["segmentation"], rtol=0, atol=0)
    assert ours[0]["segments_info"] == []


def test_valid_kwargs_and_unknown_arguments():
    assert "num_frames" in VideomtVideoProcessor.valid_kwargs.__annotations__
    assert {"do_split_image", "ignore_index"} <= set(EomtImageProcessor.valid_kwargs.__annotations__)
    with pytest.raises(TypeError, match="do_magic"):
        VideomtVideoProcessor()(_video(2), do_magic=True)
    # unknown configuration entries are kept as attributes and saved again, as transformers does
    proc = VideomtVideoProcessor.from_dict({"size": {"height": 8, "width": 8}, "custom_entry": 3})
    assert proc.custom_entry == 3 and proc.to_dict()["custom_entry"] == 3


@pytest.mark.parametrize("shape", [(90, 120), (47, 33), (20, 64)])
def test_segmentation_maps_resized_as_transformers(shape):
    """Maps are resized with nearest at pixel centers (transformers: PIL NEAREST, torchvision NEAREST_EXACT)."""
    rng = np.random.default_rng(sum(shape))
    # label regions, as real maps have, on a coarse grid
    coarse = rng.integers(0, 7, size=(6, 8)).astype(np.uint8)
    label_map = np.kron(coarse, np.ones((16, 16), dtype=np.uint8))[: shape[0], : shape[1]]
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    settings = {"size": {"shortest_edge": 24, "longest_edge": 40}, "do_pad": True, "ignore_index": 255}
    pytest.importorskip("PIL")
    from PIL import Image

    for maps in (label_map, Image.fromarray(label_map)):  # arrays and PIL maps (kept single-channel)
        ours = EomtImageProcessor(**settings)(images=image, segmentation_maps=maps, return_tensors="pt")
        theirs = _hf_eomt_class()(**settings)(images=image, segmentation_maps=maps, return_tensors="pt")
        for a, b in paired(ours["mask_labels"], theirs["mask_labels"]):
            torch.testing.assert_close(a, torch.as_tensor(b).float(), rtol=0, atol=0)
        for a, b in paired(ours["class_labels"], theirs["class_labels"]):
            assert torch.equal(a, torch.as_tensor(b).long())


def test_from_pretrained_hub_cache_offline(tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache; offline, a missing file is named as such."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--someone--videomt-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    _hf_video_class()(size={"height": 24, "width": 24}, num_frames=5).save_pretrained(snapshot)
    loaded = VideomtVideoProcessor.from_pretrained("someone/videomt-test", cache_dir=tmp_path)
    assert loaded.size == {"height": 24, "width": 24} and loaded.num_frames == 5
    with pytest.raises(OSError, match="local cache"):
        VideomtVideoProcessor.from_pretrained("someone/not-downloaded", cache_dir=tmp_path)
