"""The demo model, ``videomt-fast demo``, palette PNGs and overlays.

The quality test runs the packaged demo model through ``segment``'s own pipeline (pre-processing,
model, video-level tracks, painting of the track-id PNGs) on held-out synthetic clips and scores
the PNGs against the generator's ground truth; a model with random weights must fail the same bar.
"""

import json
import os
import struct

import numpy as np
import pytest
import torch

from videomt_fast.apps import cli, video_io, visualize
from videomt_fast.demo import WEIGHTS_DIR, resolve_model
from videomt_fast.demo.synthetic import CLASSES, make_clip, score_clip
from videomt_fast.demo.train import HELD_OUT_SEED, demo_config, evaluate

# Held-out clips (seeds never used in training), the first four from HELD_OUT_SEED + 100 on with three or
# four objects (the object count does not depend on the frame size), 12 frames at 128x128. The packaged
# model measured mean IoU 0.683 and track consistency 0.901 on them (torch 2.13 CPU); random weights
# score IoU 0.03 and consistency 0.33 (test_random_weights_fail_the_quality_bar; 0 and 0 with the
# training's small initialisation, which paints nothing). The bars sit below the measurement, with room
# for other CPUs' rounding, and far above what random weights reach.
QUALITY_SEEDS = [s for s in range(HELD_OUT_SEED + 100, HELD_OUT_SEED + 200) if make_clip(s, 1, 16).masks.shape[1] >= 3][:4]
MIN_IOU = 0.55
MIN_TRACK_CONSISTENCY = 0.75


def _quality(model_dir: str) -> dict:
    # the evaluation writes and segments videos (PyAV); a machine without it skips here, and CI fails the skip
    pytest.importorskip("av", reason="needs PyAV (the video extra) to write and decode the clips")
    return evaluate(model_dir, QUALITY_SEEDS, frames=12, size=128, threads=1)


def test_demo_model_segments_and_tracks_held_out_clips():
    scores = _quality(WEIGHTS_DIR)
    detail = {name: (round(s["iou"], 3), round(s["track_consistency"], 3)) for name, s in scores["clips"].items()}
    assert scores["iou"] >= MIN_IOU, f"mean IoU {scores['iou']:.3f} < {MIN_IOU}; per clip (IoU, consistency): {detail}"
    assert scores["track_consistency"] >= MIN_TRACK_CONSISTENCY, (
        f"track consistency {scores['track_consistency']:.3f} < {MIN_TRACK_CONSISTENCY}; per clip: {detail}"
    )


def test_random_weights_fail_the_quality_bar(tmp_path):
    from videomt_fast.demo.train import init_weights
    from videomt_fast.model.modeling import VideomtForUniversalSegmentation

    torch.manual_seed(1)
    model = VideomtForUniversalSegmentation(demo_config())
    init_weights(model, std=0.5)  # large weights: confident, arbitrary classes and masks
    model.save_pretrained(tmp_path / "random")
    scores = _quality(str(tmp_path / "random"))
    assert scores["iou"] < MIN_IOU or scores["track_consistency"] < MIN_TRACK_CONSISTENCY, scores


def test_packaged_weights_are_small_and_labelled():
    with open(os.path.join(WEIGHTS_DIR, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    assert [config["id2label"][str(i)] for i in range(len(CLASSES))] == list(CLASSES)
    assert os.path.getsize(os.path.join(WEIGHTS_DIR, "model.safetensors")) < 5 * 2**20


def test_model_name_demo_means_the_packaged_model(tmp_path):
    from videomt_fast.apps import segment

    args = segment.build_parser().parse_args(["in.mp4", "--model", "demo", "--out", str(tmp_path)])
    assert segment.settings_from_args(args).model == WEIGHTS_DIR
    assert resolve_model("./demo") == "./demo"


# ---------------------------------------------------------------------------------- generator and scoring


def test_synthetic_clips_are_deterministic_and_scale_free():
    a, b = make_clip(7, 3, 64), make_clip(7, 3, 64)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(make_clip(8, 3, 64).frames, a.frames)
    big = make_clip(7, 3, 256)
    assert np.array_equal(big.class_ids, a.class_ids)
    # the same scene: the 256 px masks pooled to 64 px agree with the 64 px masks almost everywhere
    pooled = big.masks.reshape(3, -1, 64, 4, 64, 4).mean((3, 5)) > 0.5
    assert (pooled == a.masks).mean() > 0.99


def test_score_clip_counts_iou_and_id_switches():
    clip = make_clip(11, 6, 64, max_objects=4)
    while clip.masks.shape[1] < 2:  # a clip with two objects at least
        clip = make_clip(int(clip.frames.sum()) % 1000 + 12, 6, 64)
    truth = clip.id_maps()
    assert score_clip(truth, clip)["iou"] == 1.0 and score_clip(truth, clip)["track_consistency"] == 1.0
    empty = score_clip(np.zeros_like(truth), clip)
    assert empty["iou"] == 0.0 and empty["track_consistency"] == 0.0
    switched = truth.copy()
    switched[3:][truth[3:] == 1] = 9  # object 1 changes id halfway: masks still right, ids not
    scores = score_clip(switched, clip)
    assert scores["track_consistency"] < 1.0 and scores["iou"] < 1.0


# ---------------------------------------------------------------------------------- CLI end to end


def test_demo_command_end_to_end(tmp_path, capsys):
    pytest.importorskip("av", reason="needs PyAV (the video extra): the demo writes and segments a video")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--frames", "5", "--size", "128", "--devices", "cpu"]) == 0
    printed = capsys.readouterr().out
    results = out / "segment" / "clip"
    for path in (out / "clip.mp4", results / "instances.json", results / "overlay.mp4", results / "done.json"):
        assert path.is_file(), path
        assert str(path.parent) in printed or path.name == "done.json"
    pngs = sorted((results / "instance_ids").iterdir())
    overlays = sorted((out / "overlay").iterdir())
    assert len(pngs) == 5 and len(overlays) == 5
    with open(pngs[0], "rb") as fh:
        header = fh.read(33)
    assert header[25] == 3, "track-id PNGs are palette PNGs"
    ids = np.stack([video_io.read_png(str(p)) for p in pngs])
    assert ids.shape == (5, 128, 128) and ids.max() > 0, "the demo model finds objects"
    frame = video_io.read_png(str(overlays[0]))
    assert frame.shape == (128, 128, 3)
    assert "against the clip's ground truth" in printed
    # one entry per track (the former list repeated a track id per class: "circle 0.99", "triangle 0.006")
    tracks = json.loads((results / "instances.json").read_text())["tracks"]
    assert len({t["id"] for t in tracks}) == len(tracks) > 0
    assert all(t["label"] in CLASSES and len(t["segmentations"]) == 5 for t in tracks)
    shown = [line for line in printed.splitlines() if line.strip().startswith("track ")]
    assert len({line.split()[1] for line in shown}) == len(shown) > 0


def test_demo_command_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--frames", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--frames must be at least 1" in err
    (tmp_path / "file").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--devices", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nonsense" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists(), "nothing is written before the arguments are checked"


# ---------------------------------------------------------------------------------- palette PNG and overlay


def test_palette_png_round_trip(tmp_path):
    pytest.importorskip("av", reason="needs PyAV (the video extra): PNGs are read back with it")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(37, 53)).astype(np.uint8)
    ids[0, 0], ids[-1, -1] = 0, 255
    path = str(tmp_path / "ids.png")
    video_io.write_png(path, ids, palette=visualize.colours(256))
    back = video_io.read_png(path)
    assert back.dtype == np.uint8 and np.array_equal(back, ids)
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[25] == 3  # IHDR colour type: palette
    start = data.index(b"PLTE")
    (length,) = struct.unpack(">I", data[start - 4 : start])
    assert np.array_equal(np.frombuffer(data[start + 4 : start + 4 + length], np.uint8).reshape(-1, 3), visualize.colours(256))
    with pytest.raises(ValueError, match="no palette entry"):
        video_io.encode_png(ids, palette=visualize.colours(16))
    wide = ids.astype(np.uint16) * 200  # 16-bit ids: grayscale, unchanged
    video_io.write_png(path, wide, palette=visualize.colours(256))
    assert np.array_equal(video_io.read_png(path), wide)


def test_colours_are_distinct_and_background_black():
    palette = visualize.colours(256)
    assert palette.shape == (256, 3) and palette.dtype == np.uint8 and not palette[0].any()
    assert len({tuple(c) for c in palette[1:32]}) == 31
    assert (palette[1:].max(1) >= 150).all()  # bright enough to see on a dark frame


def test_draw_overlay_outlines_tags_and_legend():
    frame = np.full((120, 160, 3), 100, np.uint8)
    ids = np.zeros((120, 160), np.int64)
    ids[40:100, 60:120] = 3
    ids[10:30, 130:150] = 7
    palette = visualize.colours(256)
    before = frame.copy()
    out = visualize.draw_overlay(frame, ids, legend={3: "3 circle 0.97", 7: "7 square 0.60", 5: "5 gone"})
    assert np.array_equal(frame, before), "the input frame is not modified"
    assert np.array_equal(out[40, 90], palette[3]) and np.array_equal(out[99, 90], palette[3])  # outline
    inner = out[60, 65]
    assert not np.array_equal(inner, frame[60, 65]) and not np.array_equal(inner, palette[3])  # tinted
    assert np.array_equal(out[110, 20], frame[110, 20])  # background untouched
    # the track id "3" is written on the region's centre in white on black
    centre = out[64:76, 84:96]
    assert (centre == 255).all(-1).any() and (centre == 0).all(-1).any()
    # legend: a swatch per entry, white text for ids in the frame, grey for the others
    assert np.array_equal(out[4, 4], palette[3]) and np.array_equal(out[14, 4], palette[7])
    legend_rows = out[22:29, 10:60]
    assert (legend_rows == 140).all(-1).any() and not (legend_rows == 255).all(-1).any()
    with pytest.raises(ValueError, match=r"ids must be \(H, W\)"):
        visualize.draw_overlay(frame, ids[:10])


def test_legend_goes_where_it_hides_no_object_and_tags_do_not_collide():
    """The legend takes the corner that covers the fewest object pixels (here the top-left is full, the
    bottom-right free); two objects whose centres are a few pixels apart get tags that do not overlap.
    Mutations caught: the legend always top-left (the former layout), tags drawn at the centres."""
    frame = np.full((120, 160, 3), 100, np.uint8)
    ids = np.zeros((120, 160), np.int64)
    ids[0:60, 0:80] = 4  # an object where the legend used to go
    ids[70:90, 20:60] = 5
    ids[70:90, 62:100] = 6  # centres 41 px apart: "5" and "6" tags side by side at scale 1 fit
    ids[95:100, 20:60] = 8
    ids[101:106, 20:60] = 9  # centres 6 px apart: tags 7 px tall must be moved apart
    legend = {4: "4 circle 0.9", 5: "5 square 0.8", 6: "6 tri 0.7", 8: "8 a 0.6", 9: "9 b 0.6"}
    size = visualize.legend_size(legend, 1)
    assert visualize.legend_corner(ids > 0, size) == "top-right"
    assert visualize.legend_corner(np.zeros((120, 160), bool), size, previous="bottom-left") == "bottom-left"
    out = visualize.draw_overlay(frame, ids, legend=legend, palette=visualize.colours(256))
    bare = visualize.draw_overlay(frame, ids, palette=visualize.colours(256))
    assert np.array_equal(out[0:40, 0:60], bare[0:40, 0:60])  # the object in the top-left is not covered
    assert (out[0 : size[0], 160 - size[1] :] == 0).all(-1).mean() > 0.5  # the legend box, top-right
    # each tag's black box: none overlaps another (the 8 and 9 tags were moved apart)
    placed = []
    taken = [visualize._corner_box("top-right", size, (120, 160))]
    for value in (4, 5, 6, 8, 9):
        y, x = visualize._anchor(ids == value)
        ty, tx, box = visualize._place(y, x, visualize.text_size(str(value), 1), (120, 160), taken, 1)
        assert not any(visualize._overlaps(box, other) for other in taken), value
        taken.append(box)
        placed.append((ty, tx))
    assert len(set(placed)) == 5


def test_a_videos_tracks_get_the_most_separated_colours():
    """Track ids are query indices (up to 200): two tracks with distant ids could get close hues from the
    id-indexed palette; a video's tracks take the first colours in rank order instead."""
    palette = visualize.ranked_palette([143, 12, 88])
    base = visualize.colours(256)
    assert [tuple(palette[i]) for i in (143, 12, 88)] == [tuple(base[i]) for i in (1, 2, 3)]
    assert palette.shape == (256, 3) and not palette[0].any()
    assert visualize.ranked_palette([300]).shape == (301, 3)


def test_draw_text_renders_each_glyph():
    seen = set()
    for ch in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.:-#()/%":
        image = np.zeros((9, 7, 3), np.uint8)
        visualize.draw_text(image, ch, 1, 1)
        seen.add(image[..., 0].tobytes())
        assert image.any(), ch
    assert len(seen) == 44  # every glyph differs
    big = np.zeros((20, 40, 3), np.uint8)
    visualize.draw_text(big, "a", 0, 0, scale=2)
    assert visualize.text_size("ab", 2) == (14, 22) and big[:14, :10].any() and not big[14:].any()
