"""``videomt-fast segment``: real encoded videos in, files out that decode back to what the model produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from videomt_fast import VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast.apps import video_io
from videomt_fast.apps import segment as seg
from videomt_fast.processing.video_processor import VideomtVideoProcessor
from videomt_fast.runtime.session import VideomtSession

pytest.importorskip("av", reason="segment decodes with PyAV (av); pip install -e '.[test]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_blocks=2, num_queries=7, image_size=48, num_labels=5)
CHUNK = 5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    torch.manual_seed(3)
    model = VideomtForUniversalSegmentation(VideomtConfig(**TINY))
    model.save_pretrained(str(root / "model"))
    videos = root / "videos"
    (videos / "nested").mkdir(parents=True)
    video_io.write_test_video(str(videos / "shapes.mp4"), 12, 50, 70, seed=1)
    video_io.write_test_video(str(videos / "nested" / "odd.mp4"), 7, 51, 71, seed=2)  # odd size: H.264 4:4:4
    frames_dir = root / "frames" / "clip"
    frames_dir.mkdir(parents=True)
    for i, frame in enumerate(video_io.write_test_video(str(root / "src.mkv"), 6, 40, 56, codec="ffv1", pix_fmt="yuv444p", seed=3)):
        video_io.write_png(str(frames_dir / f"img{i}.png"), frame)  # natural order: img10 would sort after img9
    bad = root / "bad"
    bad.mkdir()
    video_io.write_test_video(str(bad / "empty.mkv"), 0, 50, 70)
    with open(bad / "corrupt.mp4", "wb") as fh:
        fh.write(open(videos / "shapes.mp4", "rb").read()[:200] + os.urandom(3000))
    return root


def _run(workspace, out, *inputs, task="semantic", extra=()):
    argv = [*map(str, inputs), "--model", str(workspace / "model"), "--task", task, "--out", str(out),
            "--chunk-size", str(CHUNK), "--no-progress", *extra]
    return seg.main(argv)


def _reference(workspace, source: video_io.VideoSource, task: str, size=None, **kw):
    """The model on the whole video in one call (same chunking), post-processed by the processor."""
    model = VideomtForUniversalSegmentation.from_pretrained(str(workspace / "model"))
    frames = np.concatenate(list(video_io.iter_chunks(source, 1000)))
    height, width = frames.shape[1:3]
    proc = VideomtVideoProcessor(size={"height": size[0], "width": size[1]} if size else {"height": 48, "width": 48})
    pixels = proc.preprocess(torch.from_numpy(frames).permute(0, 3, 1, 2))["pixel_values_videos"]
    with torch.inference_mode():
        out = model(pixel_values_videos=pixels, chunk_size=CHUNK)
    sizes = [(height, width)] * frames.shape[0]
    if task == "semantic":
        return frames, torch.stack(proc.post_process_semantic_segmentation(out, sizes)).numpy()
    return frames, proc.post_process_panoptic_segmentation(out, sizes, **kw)


def _pngs(folder):
    names = sorted(os.listdir(folder), key=video_io._natural_key)
    return names, np.stack([video_io.read_png(os.path.join(folder, n)) for n in names])


# ---------------------------------------------------------------------------------- I/O helpers


def test_png_round_trip_through_pyav_decoder(tmp_path):
    rng = np.random.default_rng(0)
    for image in (
        rng.integers(0, 256, (13, 7), dtype=np.uint8),
        rng.integers(0, 65536, (9, 11), dtype=np.uint16),
        rng.integers(0, 256, (5, 9, 3), dtype=np.uint8),
        np.zeros((1, 1), np.uint8),
    ):
        path = str(tmp_path / "x.png")
        video_io.write_png(path, image)
        back = video_io.read_png(path)
        assert back.dtype == image.dtype and back.shape == image.shape
        np.testing.assert_array_equal(back, image)
    assert video_io.label_map_image(np.array([[0, 255]])).dtype == np.uint8
    assert video_io.label_map_image(np.array([[0, 256]])).dtype == np.uint16
    with pytest.raises(ValueError):
        video_io.label_map_image(np.array([[-1, 0]]))
    ids = rng.integers(0, 2**24, (4, 6))
    np.testing.assert_array_equal(video_io.rgb_to_ids(video_io.ids_to_rgb(ids)), ids)


def test_discover_inputs_folders_lists_frames(workspace, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{workspace / 'videos' / 'shapes.mp4'}\n\n{workspace / 'frames'}\n{tmp_path / 'missing.mp4'}\n")
    sources, problems = video_io.discover_inputs([str(listing), str(workspace / "videos"), str(tmp_path / "nope")])
    by_name = {s.name: s for s in sources}
    assert set(by_name) == {"shapes", "clip", "nested__odd"}  # shapes.mp4 listed twice -> once
    clip = by_name["clip"]
    assert clip.kind == "frames" and [os.path.basename(p) for p in clip.frames] == [f"img{i}.png" for i in range(6)]
    assert {p for p, _ in problems} == {str(tmp_path / "missing.mp4"), str(tmp_path / "nope")}
    # the same base name from two folders gets two distinct output names
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for d in (a, b):
        (d / "v.mp4").write_bytes(b"x")
    sources, _ = video_io.discover_inputs([str(a / "v.mp4"), str(b / "v.mp4")])
    assert len({s.name for s in sources}) == 2


def test_plan_geometry():
    config = VideomtConfig(**TINY)
    s = seg.SegmentSettings(model="m", task="semantic", out="o")
    g = seg.plan_geometry(50, 70, s, config)
    assert g.resize == g.padded == (48, 48) and g.valid == (12, 12)
    s.short_side = 40
    g = seg.plan_geometry(50, 70, s, config)
    assert g.resize == (40, 56) and g.padded == (48, 64) and g.valid == (10, 14)
    s.short_side, s.size = None, 40
    with pytest.raises(ValueError, match="multiple of the patch size"):
        seg.plan_geometry(50, 70, s, config)


# ---------------------------------------------------------------------------------- end to end


def test_semantic_outputs_equal_model(workspace, tmp_path):
    out = tmp_path / "out"
    assert _run(workspace, out, workspace / "videos", workspace / "frames", extra=["--overlay"]) == 0
    assert sorted(os.listdir(out)) == ["clip", "nested__odd", "shapes"]
    for name, path, kind in (("shapes", "videos/shapes.mp4", "video"), ("nested__odd", "videos/nested/odd.mp4", "video")):
        frames, expected = _reference(workspace, video_io.VideoSource(str(workspace / path), kind), "semantic")
        names, got = _pngs(out / name / "semantic")
        assert names == [f"{i:06d}.png" for i in range(len(frames))]
        assert got.dtype == np.uint8 and got.shape == expected.shape == frames.shape[:3]
        np.testing.assert_array_equal(got, expected)
        marker = json.loads((out / name / "done.json").read_text())
        assert marker["frames"] == len(frames) and marker["height"] == frames.shape[1]
        # overlay: one frame per input frame, even-padded size
        with __import__("av").open(str(out / name / "overlay.mp4")) as c:
            decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(decoded) == len(frames)
        assert decoded[0].shape[:2] == (frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2)
    clip = video_io.discover_inputs([str(workspace / "frames")])[0][0]
    frames, expected = _reference(workspace, clip, "semantic")
    names, got = _pngs(out / "clip" / "semantic")
    assert names == [f"img{i}.png" for i in range(6)]  # frame folders keep their frame names
    np.testing.assert_array_equal(got, expected)


def test_panoptic_outputs_equal_model(workspace, tmp_path):
    out = tmp_path / "out"
    video = workspace / "videos" / "shapes.mp4"
    assert _run(workspace, out, video, task="panoptic", extra=["--threshold", "0.2"]) == 0
    frames, results = _reference(workspace, video_io.VideoSource(str(video), "video"), "panoptic", threshold=0.2)
    names, rgb = _pngs(out / "shapes" / "panoptic")
    ids = video_io.rgb_to_ids(rgb)
    info = json.loads((out / "shapes" / "panoptic.json").read_text())
    assert info["video"]["length"] == len(frames) == len(info["annotations"])
    assert [c["id"] for c in info["categories"]] == list(range(5))
    nonempty = 0
    for f, (result, ann) in enumerate(zip(results, info["annotations"])):
        np.testing.assert_array_equal(ids[f], result["segmentation"].numpy() + 1)
        assert ann["file_name"] == names[f]
        expected = [(s["id"] + 1, s["label_id"]) for s in result["segments_info"]]
        assert [(s["id"], s["category_id"]) for s in ann["segments_info"]] == expected
        for s in ann["segments_info"]:
            assert s["area"] == int((ids[f] == s["id"]).sum())
        nonempty += bool(expected)
    assert nonempty > 0, "threshold too high for the random model: the test would not check segments"


def test_short_side_keeps_aspect(workspace, tmp_path):
    out = tmp_path / "out"
    video = workspace / "videos" / "shapes.mp4"
    assert _run(workspace, out, video, extra=["--short-side", "40"]) == 0
    marker = json.loads((out / "shapes" / "done.json").read_text())
    assert marker["model_input"] == [48, 64]
    # reference: resize to 40x56, pad to 48x64, crop the logits to 10x14, post-process at 50x70
    model = VideomtForUniversalSegmentation.from_pretrained(str(workspace / "model"))
    frames = np.concatenate(list(video_io.iter_chunks(video_io.VideoSource(str(video), "video"), 100)))
    proc = VideomtVideoProcessor(size={"height": 40, "width": 56})
    pixels = proc.preprocess(torch.from_numpy(frames).permute(0, 3, 1, 2))["pixel_values_videos"]
    pixels = torch.nn.functional.pad(pixels, (0, 8, 0, 8))
    with torch.inference_mode():
        o = model(pixel_values_videos=pixels, chunk_size=CHUNK)
    o = {"class_queries_logits": o.class_queries_logits, "masks_queries_logits": o.masks_queries_logits[..., :10, :14]}
    expected = torch.stack(proc.post_process_semantic_segmentation(o, [(50, 70)] * len(frames))).numpy()
    np.testing.assert_array_equal(_pngs(out / "shapes" / "semantic")[1], expected)


def test_bad_inputs_reported_others_processed_and_resume(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    inputs = [workspace / "bad" / "corrupt.mp4", workspace / "videos" / "shapes.mp4", workspace / "bad" / "empty.mkv",
              tmp_path / "does-not-exist.mp4"]
    assert _run(workspace, out, *inputs) == 1
    text = capsys.readouterr().out
    assert "corrupt.mp4" in text and "empty.mkv" in text and "does-not-exist.mp4" in text
    assert "1 done" in text and "3 failed" in text
    assert os.listdir(out) == ["shapes"]  # nothing for the failures, no temporary leftovers
    marker = (out / "shapes" / "done.json").read_text()
    # rerun: the finished video is skipped, untouched; the failures are reported again
    assert _run(workspace, out, *inputs) == 1
    text = capsys.readouterr().out
    assert "1 skipped" in text and "0 done" in text
    assert (out / "shapes" / "done.json").read_text() == marker
    assert _run(workspace, out, inputs[1]) == 0
    assert "1 skipped" in capsys.readouterr().out


def test_leftovers_of_a_killed_run_are_removed_and_foreign_folders_kept(workspace, tmp_path):
    out = tmp_path / "out"
    video = workspace / "videos" / "nested" / "odd.mp4"
    (out / ".odd.tmp-host-1-abc" / "semantic").mkdir(parents=True)  # a killed run's temporary folder
    (out / ".odd.tmp-host-1-abc" / "semantic" / "000000.png").write_bytes(b"junk")
    (out / ".odd.tmp-x.tmp-host-2-def").mkdir()  # not odd's: the temporary folder of a video named "odd.tmp-x"
    assert _run(workspace, out, video) == 0
    assert sorted(os.listdir(out)) == [".odd.tmp-x.tmp-host-2-def", "odd"]
    assert len(os.listdir(out / "odd" / "semantic")) == 7
    # a folder segment did not write (no marker: someone else's) is never replaced; the results go beside it
    other = tmp_path / "other"
    (other / "odd" / "semantic").mkdir(parents=True)
    (other / "odd" / "semantic" / "stale.png").write_bytes(b"junk")
    assert _run(workspace, other, video) == 0
    names = sorted(os.listdir(other))
    assert names[0] == "odd" and names[1].startswith("odd-") and len(names) == 2
    assert os.listdir(other / "odd" / "semantic") == ["stale.png"]
    assert len(os.listdir(other / names[1] / "semantic")) == 7


def test_kill_and_resume(workspace, tmp_path):
    """SIGKILL mid-run, then rerun: every video exactly once, complete, nothing half-written."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        video_io.write_test_video(str(inputs / f"v{i}.mp4"), 10, 34, 46, seed=10 + i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "videomt_fast", "segment", str(inputs), "--model", str(workspace / "model"),
           "--task", "semantic", "--out", str(out), "--chunk-size", str(CHUNK), "--no-progress", "--decode-workers", "1"]
    env = {**os.environ, seg.KILL_AFTER_FRAMES_ENV: "25", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    entries = os.listdir(out)
    finished = sorted(e for e in entries if not e.startswith("."))
    assert finished == ["v0", "v1"], entries  # the third video was being written when the process died
    assert all((out / e / "done.json").is_file() for e in finished)
    assert any(e.startswith(".v2.tmp-") for e in entries)  # its partial output stays hidden
    markers = {e: (out / e / "done.json").read_text() for e in finished}
    del env[seg.KILL_AFTER_FRAMES_ENV]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 done, 2 skipped" in proc.stdout
    assert sorted(os.listdir(out)) == ["v0", "v1", "v2", "v3"]
    for name in ("v0", "v1"):
        assert (out / name / "done.json").read_text() == markers[name]
    for i in range(4):
        _, expected = _reference(workspace, video_io.VideoSource(str(inputs / f"v{i}.mp4"), "video"), "semantic")
        names, got = _pngs(out / f"v{i}" / "semantic")
        assert len(names) == 10
        np.testing.assert_array_equal(got, expected)


def test_several_devices_share_the_list(workspace, tmp_path):
    """Two worker processes (on the CPU here, one per GPU in real use) over one shared list."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    inputs = [workspace / "videos", workspace / "frames"]
    assert _run(workspace, single, *inputs) == 0
    assert _run(workspace, multi, *inputs, workspace / "bad" / "corrupt.mp4", extra=["--devices", "cpu,cpu"]) == 1
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single)) == ["clip", "nested__odd", "shapes"]
    for name in os.listdir(single):
        a, b = _pngs(single / name / "semantic"), _pngs(multi / name / "semantic")
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])


def test_cli_entry_point(workspace, tmp_path):
    from videomt_fast.apps import cli

    out = tmp_path / "out"
    rc = cli.main(["segment", str(workspace / "frames"), "--model", str(workspace / "model"), "--task", "semantic",
                   "--out", str(out), "--no-progress"])
    assert rc == 0 and (out / "clip" / "done.json").is_file()
    assert cli.main(["segment", str(workspace / "frames"), "--model", "m", "--out", str(out), "--chunk-size", "0"]) == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_instance_tracks_rle_and_id_maps_equal_model(workspace, tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask", reason="instance RLEs need pycocotools; pip install -e '.[test]'")

    out = tmp_path / "out"
    video = workspace / "videos" / "nested" / "odd.mp4"
    # reference straight from the model: video-level scores = softmax of the frame-mean logits, top-k
    # (query, class) pairs, masks = bilinear upsampling of each frame's logits to 51x71, > 0
    model = VideomtForUniversalSegmentation.from_pretrained(str(workspace / "model"))
    frames = np.concatenate(list(video_io.iter_chunks(video_io.VideoSource(str(video), "video"), 100)))
    pixels = VideomtVideoProcessor(size={"height": 48, "width": 48}).preprocess(
        torch.from_numpy(frames).permute(0, 3, 1, 2))["pixel_values_videos"]
    with torch.inference_mode():
        o = model(pixel_values_videos=pixels, chunk_size=CHUNK)
    probs = o.class_queries_logits.double().mean(0).softmax(-1)[:, :-1]
    top, flat = probs.flatten().topk(6)
    masks = torch.nn.functional.interpolate(o.masks_queries_logits, size=(51, 71), mode="bilinear", align_corners=False) > 0
    threshold = float(top[2] + top[3]) / 2  # paint some tracks, leave others out of the id maps
    assert _run(workspace, out, video, task="instance", extra=["--top-k", "6", "--threshold", str(threshold), "--overlay"]) == 0
    info = json.loads((out / "odd" / "instances.json").read_text())
    anns = json.loads((out / "odd" / "youtube_vis.json").read_text())  # every top-k (track, class) pair
    assert info["video"]["length"] == len(frames) == 7 and len(anns) == 6
    # instances.json: one entry per track, its class its best pair's, the others listed, the same masks
    tracks = info["tracks"]
    assert len({t["id"] for t in tracks}) == len(tracks) == len({a["id"] for a in anns})
    for track in tracks:
        pairs = [a for a in anns if a["id"] == track["id"]]  # best first, as in youtube_vis.json
        assert (track["category_id"], track["score"]) == (pairs[0]["category_id"], pairs[0]["score"])
        assert [c["score"] for c in track["classes"]] == [a["score"] for a in pairs]
        assert track["label"] == f"LABEL_{track['label_id']}" and track["segmentations"] == pairs[0]["segmentations"]
    assert [t["score"] for t in tracks] == sorted((t["score"] for t in tracks), reverse=True)
    painted = np.zeros((7, 51, 71), np.int64)
    for ann, score, index in sorted(zip(anns, top.tolist(), flat.tolist()), key=lambda x: x[1]):
        query, label = divmod(index, 5)
        assert (ann["id"], ann["category_id"], ann["label_id"]) == (query + 1, label + 1, label)  # YouTube-VIS ids are 1-based
        assert abs(ann["score"] - score) < 1e-5
        assert ann["video_id"] == "odd" and len(ann["segmentations"]) == 7
        for t, rle in enumerate(ann["segmentations"]):
            assert rle["size"] == [51, 71]
            decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            np.testing.assert_array_equal(decoded.astype(bool), masks[t, query].numpy())
    # the id maps: kept tracks painted lowest score first, track id = query index + 1
    order = sorted(zip(top.tolist(), flat.tolist()))
    assert any(s >= threshold for s, _ in order) and any(s < threshold for s, _ in order)
    for score, index in order:
        if score >= threshold:
            query = index // 5
            painted[masks[:, query].numpy()] = query + 1
    names, got = _pngs(out / "odd" / "instance_ids")
    assert len(names) == 7
    np.testing.assert_array_equal(got, painted)
    assert (painted > 0).any()
    with __import__("av").open(str(out / "odd" / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 7


def test_ray_local_cluster(workspace, tmp_path):
    ray = pytest.importorskip("ray")
    single, distributed = tmp_path / "single", tmp_path / "ray"
    inputs = [workspace / "videos", workspace / "frames", workspace / "bad" / "corrupt.mp4"]
    assert _run(workspace, single, *inputs) == 1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}})
    try:
        assert _run(workspace, distributed, *inputs, extra=["--ray"]) == 1
        assert sorted(os.listdir(distributed)) == ["clip", "nested__odd", "shapes"]
        for name in os.listdir(single):
            a, b = _pngs(single / name / "semantic"), _pngs(distributed / name / "semantic")
            assert a[0] == b[0]
            np.testing.assert_array_equal(a[1], b[1])
        marker = (distributed / "shapes" / "done.json").read_text()
        assert _run(workspace, distributed, workspace / "videos", extra=["--ray"]) == 0  # resume: skipped
        assert (distributed / "shapes" / "done.json").read_text() == marker
    finally:
        ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_instance_ids_above_255_use_16_bit_pngs(tmp_path):
    torch.manual_seed(5)
    model = VideomtForUniversalSegmentation(VideomtConfig(**{**TINY, "num_queries": 300, "num_labels": 2}))
    model.save_pretrained(str(tmp_path / "model"))
    video = tmp_path / "v.mp4"
    video_io.write_test_video(str(video), 3, 32, 32, seed=4)
    out = tmp_path / "out"
    rc = seg.main([str(video), "--model", str(tmp_path / "model"), "--task", "instance", "--out", str(out),
                   "--top-k", "600", "--threshold", "0", "--no-progress"])
    assert rc == 0
    anns = json.loads((out / "v" / "youtube_vis.json").read_text())
    assert len(anns) == 600
    _, ids = _pngs(out / "v" / "instance_ids")
    assert ids.dtype == np.uint16 and ids.max() > 255
    # every painted id is a track whose mask covers that pixel in that frame
    mask_utils = pytest.importorskip("pycocotools.mask", reason="instance RLEs need pycocotools; pip install -e '.[test]'")

    by_id = {}
    for ann in anns:
        by_id.setdefault(ann["id"], ann)
    for t in range(3):
        for track in np.unique(ids[t]):
            if track == 0:
                continue
            rle = by_id[int(track)]["segmentations"][t]
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            assert mask[ids[t] == track].all()


def test_unloadable_model_fails_every_video_by_name(workspace, tmp_path, capsys):
    rc = seg.main([str(workspace / "videos" / "shapes.mp4"), "--model", str(tmp_path / "no-model"), "--task", "semantic",
                   "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1
    text = capsys.readouterr().out
    assert "FAILED shapes" in text and "no-model" in text
    assert not any(not e.startswith(".") for e in os.listdir(tmp_path / "out"))


def test_decode_error_mid_video_discards_partial_output(workspace, tmp_path, monkeypatch, capsys):
    real = video_io.iter_chunks

    def flaky(source, chunk, *args, **kwargs):
        for i, frames in enumerate(real(source, chunk, *args, **kwargs)):
            if i == 1 and source.path.endswith("shapes.mp4"):
                raise video_io.VideoReadError(f"{source.path}: decoding failed (simulated)")
            yield frames

    monkeypatch.setattr(seg.video_io, "iter_chunks", flaky)
    out = tmp_path / "out"
    assert _run(workspace, out, workspace / "videos", task="panoptic") == 1
    text = capsys.readouterr().out
    assert "FAILED shapes" in text and "simulated" in text and "1 done" in text
    assert os.listdir(out) == ["nested__odd"]  # the failed video's temporary folder is gone
    assert len(os.listdir(out / "nested__odd" / "panoptic")) == 7


def test_session_engine_matches_reference(workspace, tmp_path):
    out = tmp_path / "out"
    video = workspace / "videos" / "nested" / "odd.mp4"
    assert _run(workspace, out, video, extra=["--engine", "session", "--decoder", "pyav"]) == 0
    _, expected = _reference(workspace, video_io.VideoSource(str(video), "video"), "semantic")
    np.testing.assert_array_equal(_pngs(out / "odd" / "semantic")[1], expected)


def _engine_logits(workspace, video, engine, fast):
    """Class and mask logits of the segment engine on the whole video (float32 on CPU), and its engine."""
    settings = seg.SegmentSettings(model=str(workspace / "model"), task="semantic", out="unused", dtype="float32",
                                   fast=fast, engine=engine, chunk_size=CHUNK)
    eng = seg.Engine(settings, "cpu")
    source = video_io.VideoSource(str(video), "video")
    eng.start(video_io.probe(source))
    outs = [eng.forward(eng.preprocess(chunk)) for chunk in video_io.iter_chunks(source, CHUNK)]
    return torch.cat([c for c, _ in outs]), torch.cat([m for _, m in outs]), eng


@pytest.mark.parametrize("engine", ["chunk", "session"])
def test_fast_on_cpu_is_the_plain_model(workspace, tmp_path, engine):
    """``--fast --dtype float32`` on a CPU: the same model, session type, backends and bit-identical outputs."""
    video = workspace / "videos" / "shapes.mp4"
    classes, masks, plain = _engine_logits(workspace, video, engine, fast=False)
    fast_classes, fast_masks, fast = _engine_logits(workspace, video, engine, fast=True)
    assert fast.model.fast_settings.dtype == torch.float32 and fast.model.dtype == torch.float32
    assert all(row["backend"] == "reference" for row in fast.model.backend_report().values())
    if engine == "session":
        assert type(fast.session) is type(plain.session) is VideomtSession
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), fast.model.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(fast_classes, classes) and torch.equal(fast_masks, masks)
    # the CLI end to end: the same files
    outs = {}
    for flag in ([], ["--fast"]):
        outs[bool(flag)] = out = tmp_path / ("fast" if flag else "plain")
        assert _run(workspace, out, video, extra=["--engine", engine, "--dtype", "float32", *flag]) == 0
    np.testing.assert_array_equal(_pngs(outs[True] / "shapes" / "semantic")[1],
                                  _pngs(outs[False] / "shapes" / "semantic")[1])


def test_threads_option(workspace, tmp_path, monkeypatch):
    """``--threads N`` sets PyTorch's CPU threads while segmenting, and gives the caller its count back."""
    with pytest.raises(ValueError, match="--threads"):
        seg.settings_from_args(seg.build_parser().parse_args(["v.mp4", "--model", "m", "--out", "o", "--threads", "-1"]))
    seen = []
    real_forward = seg.Engine.forward

    def forward(self, pixels):
        seen.append(torch.get_num_threads())
        return real_forward(self, pixels)

    monkeypatch.setattr(seg.Engine, "forward", forward)
    before = torch.get_num_threads()
    out = tmp_path / "out"
    assert _run(workspace, out, workspace / "videos" / "shapes.mp4", extra=["--threads", "1"]) == 0
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
