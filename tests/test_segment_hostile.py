"""``videomt-fast segment`` tried as a hostile but fair user would: it never deletes what it did not write,
never calls damaged, truncated or partially read input done, accepts the valid files players play, and
answers every failure with one line naming the input. Each test reproduces one reported case with a tiny
random model and inputs built here with PyAV; anything that could hang runs in a subprocess with a timeout."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from videomt_fast import VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast.apps import segment as seg
from videomt_fast.apps import video_io
from videomt_fast.processing.video_processor import VideomtVideoProcessor

from segment_helpers import CHUNK, ENV, REPO, TINY, interruptible, tiny_model
from segment_helpers import argv as _argv
from segment_helpers import cli as _cli
from segment_helpers import run as _run
from segment_helpers import visible as _visible

av = pytest.importorskip("av", reason="segment decodes with PyAV (av); pip install -e '.[test]'")



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("hostile"), seed=13)


def _marker(folder):
    return json.loads((folder / "done.json").read_text())


def _decode_all(path):
    """Every frame PyAV's decoder gives (the player's view): ``(frames, how many are flagged corrupt)``."""
    frames, corrupt = [], 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for packet in container.demux(stream):
            for frame in packet.decode():
                corrupt += frame.is_corrupt
                frames.append(frame.to_ndarray(format="rgb24"))
    return frames, corrupt


# ---------------------------------------------------------------------------------- 1. data loss


def test_never_deletes_what_it_did_not_write(model_dir, tmp_path, capsys):
    """1. A user's folder ``OUT/<name>`` without ``done.json``, and a plain file ``OUT/<name>``, were removed."""
    one, v1 = tmp_path / "one.mp4", tmp_path / "v1.mp4"
    video_io.write_test_video(str(one), 3, 32, 32, seed=1)
    video_io.write_test_video(str(v1), 3, 32, 32, seed=2)
    out = tmp_path / "o"
    (out / "one" / "sub").mkdir(parents=True)
    (out / "one" / "notes.txt").write_text("x\n")
    (out / "v1").write_text("z\n")
    for extra in ([], ["--overwrite"]):
        assert _run(model_dir, out, one, v1, extra=extra) == 0
        assert (out / "one" / "notes.txt").read_text() == "x\n" and (out / "one" / "sub").is_dir()
        assert (out / "v1").read_text() == "z\n"
    names = _visible(out)
    assert len(names) == 4 and {n.split("-")[0] for n in names} == {"one", "v1"}, names
    for name in names:
        if name not in ("one", "v1"):
            assert _marker(out / name)["frames"] == 3  # the results went beside them, under name-<hash>
    capsys.readouterr()
    assert _run(model_dir, out, one, v1) == 0 and "2 skipped" in capsys.readouterr().out  # and are found again


def test_overwrite_leaves_files_it_did_not_write(model_dir, tmp_path, capsys):
    """1. ``--overwrite`` removed a results folder with everything a user had added to it."""
    video = tmp_path / "v.mp4"
    video_io.write_test_video(str(video), 3, 32, 32, seed=3)
    out = tmp_path / "out"
    assert _run(model_dir, out, video) == 0
    (out / "v" / "notes.txt").write_text("mine\n")
    before = (out / "v" / "done.json").read_text()
    capsys.readouterr()
    assert _run(model_dir, out, video, task="panoptic", extra=["--overwrite"]) == 1
    text = capsys.readouterr().out
    assert "FAILED v" in text and "notes.txt" in text, text
    assert (out / "v" / "notes.txt").read_text() == "mine\n" and (out / "v" / "done.json").read_text() == before
    assert os.listdir(out) == ["v"]  # no temporary or set-aside folder left either
    # a done.json segment did not write (no record of what produced it) is no proof either: the folder is
    # someone else's, left alone, and the results go beside it
    (out / "v" / "notes.txt").unlink()
    (out / "v" / "done.json").write_text("{}")
    assert _run(model_dir, out, video, extra=["--overwrite"]) == 0
    assert (out / "v" / "done.json").read_text() == "{}" and len(os.listdir(out / "v" / "semantic")) == 3
    assert len(_visible(out)) == 2
    # what it wrote, it replaces
    (out / "v" / "done.json").write_text(before)
    assert _run(model_dir, out, video, task="panoptic", extra=["--overwrite"]) == 0
    assert sorted(os.listdir(out / "v")) == ["done.json", "panoptic", "panoptic.json"]


# ---------------------------------------------------------------------------------- 2-4. damaged, truncated, valid


def test_damaged_middle_fails_by_name(model_dir, tmp_path, capsys):
    """2. Random bytes over the middle of an H.264 MP4: every frame decodes (the count matches) but the
    decoder flags one as corrupt; it used to be recorded as done."""
    clean = tmp_path / "clean.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(clean), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height = stream.width = 128
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}  # large frames: the damage lands inside one of them
        for _ in range(24):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(clean.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    frames, corrupt = _decode_all(damaged)
    assert len(frames) == 24 and corrupt >= 1  # the case: nothing missing, one frame concealed
    out = tmp_path / "out"
    assert _run(model_dir, out, damaged, clean) == 1
    text = capsys.readouterr().out
    assert "1 done" in text and "FAILED damaged" in text and "corrupt" in text, text
    assert _visible(out) == ["clean"]


def _cut(path, dest, fraction):
    data = path.read_bytes()
    size = int(len(data) * fraction)
    while any(size % n == 0 for n in (188, 192, 204)):  # not a whole number of transport packets
        size += 1
    dest.write_bytes(data[:size])


@pytest.mark.parametrize("ext,codec", [("ts", "libx264"), ("mkv", "ffv1"), ("webm", "libvpx-vp9")])
def test_truncated_file_without_a_frame_count_fails_by_name(model_dir, tmp_path, capsys, ext, codec):
    """3. A transport stream (or Matroska/WebM file) cut to a third: no frame count to check, so the
    decoded part used to be recorded as done."""
    full = tmp_path / f"full.{ext}"
    video_io.write_test_video(str(full), 30, 32, 48, codec=codec, pix_fmt="yuv420p", seed=4)
    cut = tmp_path / f"cut.{ext}"
    _cut(full, cut, 1 / 3)
    assert video_io.probe(video_io.VideoSource(str(cut), "video")).num_frames is None  # no count to go by
    assert 0 < len(_decode_all(cut)[0]) < 30
    out = tmp_path / "out"
    assert _run(model_dir, out, cut, full) == 1
    text = capsys.readouterr().out
    assert "1 done" in text and "FAILED cut" in text and "truncated" in text, text
    assert _visible(out) == ["full"] and _marker(out / "full")["frames"] == 30
    assert _run(model_dir, out, cut) == 1  # a rerun fails it again


def test_file_cut_while_being_read_fails_by_name(model_dir, tmp_path, monkeypatch, capsys):
    """3. A transport stream cut (at a packet boundary) while it is being read: done.json recorded the
    original size and the frames read before the cut."""
    video = tmp_path / "live.ts"
    video_io.write_test_video(str(video), 40, 32, 48, seed=5)
    real = video_io.iter_chunks

    def cut_after_first_chunk(source, *args, **kwargs):
        for i, chunk in enumerate(real(source, *args, **kwargs)):
            if i == 0:
                with open(source.path, "r+b") as fh:
                    fh.truncate(os.path.getsize(source.path) // 3 // 188 * 188)
            yield chunk

    monkeypatch.setattr(video_io, "iter_chunks", cut_after_first_chunk)
    out = tmp_path / "out"
    assert _run(model_dir, out, video, extra=["--decode-workers", "1"]) == 1
    text = capsys.readouterr().out
    assert "FAILED live" in text and "changed while" in text, text
    assert _visible(out) == []


def _edit_list_mp4(tmp_path):
    """``ffmpeg -ss 2.35 -i mid.mp4 -c copy -t 3 e.mp4`` with PyAV: packets from the keyframe before 2.35 s
    with timestamps shifted so 2.35 s is 0; the muxer writes an edit list hiding the pre-roll."""
    mid, cut = tmp_path / "mid.mp4", tmp_path / "e.mp4"
    with av.open(str(mid), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.options = {"g": "48", "keyint_min": "48", "sc_threshold": "0", "bf": "2"}
        for t in range(144):
            img = np.full((48, 64, 3), (t * 3) % 256, np.uint8)
            img[:, t % 60 : t % 60 + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(mid)) as src, av.open(str(cut), "w") as dst:
        ins = src.streams.video[0]
        outs = dst.add_stream_from_template(ins)
        start, end = int(2.35 / ins.time_base), int(5.35 / ins.time_base)
        packets = [p for p in src.demux(ins) if p.size]
        key = max(p.pts for p in packets if p.is_keyframe and p.pts <= start)
        for p in packets:
            if key <= p.pts < end:
                p.pts -= start
                p.dts -= start
                p.stream = outs
                dst.mux(p)
    return cut


def test_mp4_with_an_edit_list_is_accepted(model_dir, tmp_path):
    """4. A valid stream copy cut at a non-keyframe (an edit list hides the pre-roll) was refused
    ("decoded 72 frames, the container lists 81"); players show 72."""
    video = _edit_list_mp4(tmp_path)
    shown, corrupt = _decode_all(video)
    listed = video_io.probe(video_io.VideoSource(str(video), "video")).num_frames
    assert corrupt == 0 and len(shown) == 72 and listed > len(shown)  # the case: more packets than frames shown
    out = tmp_path / "out"
    assert _run(model_dir, out, video) == 0
    assert _marker(out / "e")["frames"] == 72 and len(os.listdir(out / "e" / "semantic")) == 72


# ---------------------------------------------------------------------------------- 5-7. names, folders, pipes


def test_file_name_that_is_not_utf8(model_dir, tmp_path):
    """5. ``bad\\xff.mp4`` crashed the whole run with a UnicodeEncodeError and processed nothing."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    video_io.write_test_video(str(inputs / "good.mp4"), 3, 32, 32, seed=6)
    shutil.copy(inputs / "good.mp4", os.path.join(os.fsencode(inputs), b"bad\xff.mp4"))
    with open(os.path.join(os.fsencode(inputs), b"worse\xfe.mp4"), "wb") as fh:
        fh.write(b"\0" * 1000)  # fails: its name is in the summary
    out = tmp_path / "out"
    env = {**ENV, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    env.pop("PYTHONIOENCODING", None)
    env.pop("PYTHONUTF8", None)
    proc = _cli(model_dir, out, inputs, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "2 done" in proc.stdout and "1 failed" in proc.stdout, proc.stdout
    assert "worse\\xfe.mp4" in proc.stdout  # named, escaped
    assert _visible(out) == ["bad", "good"]
    assert _marker(out / "bad")["frames"] == 3


def _lose_read_override():
    """A ``preexec_fn`` that takes away root's power to read any folder (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH) in the child; None where the process has no such power to lose."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the child after exec
                os._exit(97)

    return drop


def test_unreadable_folder_is_reported(model_dir, tmp_path):
    """6. An unreadable subfolder was skipped silently (exit 0); named directly it "held no videos"."""
    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    video_io.write_test_video(str(root / "ok.mp4"), 3, 32, 32, seed=7)
    video_io.write_test_video(str(root / "locked" / "hidden.mp4"), 3, 32, 32, seed=8)
    os.chmod(root / "locked", 0)
    try:
        drop = _lose_read_override()
        probe = subprocess.run([sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])", str(root / "locked")],
                               preexec_fn=drop, capture_output=True, text=True)
        if probe.returncode == 0:
            pytest.skip("cannot take away the right to read a folder here (root without CAP_SETPCAP)")
        out = tmp_path / "out"
        proc = _cli(model_dir, out, root, preexec_fn=drop)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "1 done" in proc.stdout and "Permission denied" in proc.stdout and "locked" in proc.stdout, proc.stdout
        proc = _cli(model_dir, out, root / "locked", preexec_fn=drop)
        assert proc.returncode == 1 and "Permission denied" in proc.stdout, proc.stdout
        assert "holds no videos" not in proc.stdout
    finally:
        os.chmod(root / "locked", 0o755)


def test_closed_stdout_is_not_an_error(model_dir, tmp_path):
    """7. stdout closed by its reader (``| head``, a dead log collector): BrokenPipeError traceback and exit
    status 1, though the work was done."""
    video = tmp_path / "v.mp4"
    video_io.write_test_video(str(video), 3, 32, 32, seed=9)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "videomt_fast", "segment", *_argv(model_dir, out, video)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the summary is printed
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        err = proc.stderr.read()
        rc = proc.wait()
    finally:
        watchdog.cancel()
    assert rc == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert _marker(out / "v")["frames"] == 3


# ---------------------------------------------------------------------------------- 8. Ctrl-C


_HOLD_MID_VIDEO = """
import sys, time
from videomt_fast.apps import segment as seg
real = seg.Engine.forward
calls = []
def forward(self, pixels):
    calls.append(1)
    if len(calls) == 4:  # the second chunk of the second video: its first chunk is on its way to disk
        sys.stderr.write("HOLDING\\n")
        sys.stderr.flush()
        while True:
            time.sleep(60)
    return real(self, pixels)
seg.Engine.forward = forward
sys.exit(seg.main(sys.argv[1:]))
"""


def test_ctrl_c_prints_the_summary_and_leaves_nothing_half_done(model_dir, tmp_path):
    """8. Ctrl-C printed a 47-line KeyboardInterrupt traceback, no summary, and left a ``.tmp-*`` folder."""
    videos = [tmp_path / f"v{i}.mp4" for i in range(3)]
    for i, v in enumerate(videos):
        video_io.write_test_video(str(v), 2 * CHUNK, 32, 32, seed=10 + i)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_MID_VIDEO, *_argv(model_dir, out, *videos)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        err = []
        for line in proc.stderr:  # waits for the child to reach the middle of the second video
            err.append(line)
            if "HOLDING" in line:
                break
        assert proc.poll() is None, "".join(err)
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate()
    finally:
        watchdog.cancel()
    stderr = "".join(err) + rest
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "1 done" in stdout and "2 interrupted" in stdout, stdout
    assert os.listdir(out) == ["v0"]  # no temporary folder, no claim left behind
    proc = _cli(model_dir, out, *videos)
    assert proc.returncode == 0 and "2 done, 1 skipped" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_ctrl_c_with_several_devices_leaves_nothing_half_done(model_dir, tmp_path):
    """8. With ``--devices cpu,cpu`` the parent killed its workers on Ctrl-C, leaving their temporary folders;
    it now passes the interrupt on and each worker cleans up and reports before it exits."""
    videos = [tmp_path / f"v{i}.mp4" for i in range(3)]
    for i, v in enumerate(videos):
        video_io.write_test_video(str(v), 24, 32, 32, seed=30 + i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "videomt_fast", "segment", *_argv(model_dir, out, *videos, extra=["--devices", "cpu,cpu"])]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        started = threading.Event()
        while proc.poll() is None and not started.wait(0.05):  # until a worker has a video open
            if out.is_dir() and any(".tmp-" in e for e in os.listdir(out)):
                started.set()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate()
    finally:
        watchdog.cancel()
    # on a fast machine everything may be done before the interrupt lands: then it is a plain success
    assert proc.returncode in (0, 130), stdout + stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr
    assert stdout.startswith("segment: 3 videos:"), stdout
    if proc.returncode == 130:
        assert "interrupted" in stdout
    assert all(not e.startswith(".") for e in os.listdir(out)), os.listdir(out)  # no temporary folder, claim or plan
    proc = _cli(model_dir, out, *videos)
    assert proc.returncode == 0 and _visible(out) == ["v0", "v1", "v2"], proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------- 9-11. frame folders and lists


def test_hidden_files_in_a_frame_folder_are_not_frames(model_dir, tmp_path):
    """9. ``.cover.png`` in a frame folder was taken as a frame (hidden videos and folders are skipped)."""
    frames = tmp_path / "clip"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        video_io.write_png(str(frames / f"{i}.png"), rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    video_io.write_png(str(frames / ".cover.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    only_hidden = tmp_path / "nothing"
    only_hidden.mkdir()
    video_io.write_png(str(only_hidden / ".thumb.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    sources, problems = video_io.discover_inputs([str(frames), str(only_hidden)])
    assert [len(s.frames) for s in sources] == [3] and [p for p, _ in problems] == [str(only_hidden)]
    out = tmp_path / "out"
    assert _run(model_dir, out, frames) == 0
    assert _marker(out / "clip")["frames"] == 3
    assert sorted(os.listdir(out / "clip" / "semantic")) == ["0.png", "1.png", "2.png"]


def test_empty_list_and_empty_folder_fail_alike(model_dir, tmp_path, capsys):
    """10. An empty list file exited 0 with "0 videos"; an empty folder exits 1. One rule for both."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    out = tmp_path / "out"
    for name in ("empty", "empty.txt"):
        capsys.readouterr()
        assert _run(model_dir, out, tmp_path / name) == 1, name
        text = capsys.readouterr().out
        assert "1 failed" in text and f"FAILED {name}" in text, text


def _exif_jpeg(path, rgb, orientation):
    """A baseline JPEG of ``rgb`` (PyAV's MJPEG encoder) with an EXIF APP1 segment holding ``orientation``."""
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj444p"
    codec.time_base = 1
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj444p")
    data = b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])
    # TIFF header (little endian), IFD0 with one entry: Orientation (0x0112), SHORT, count 1
    tiff = b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0\0\0\0"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\0\0" + tiff
    assert data[:2] == b"\xff\xd8"
    path.write_bytes(data[:2] + app1 + data[2:])


def test_exif_orientation_of_photos_is_applied(model_dir, tmp_path):
    """11. JPEG frames with EXIF orientation were segmented as stored, not as displayed (videos get their
    rotation applied; photos did not)."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(2)
    frames = tmp_path / "photos"
    frames.mkdir()
    upright = []
    for i in range(3):
        stored = np.repeat(np.repeat(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), 8, 0), 8, 1)  # 32x48 blocks
        _exif_jpeg(frames / f"{i}.jpg", stored, 6)  # "turn 90 degrees clockwise to display"
        with av.open(str(frames / f"{i}.jpg")) as container:  # as stored, turned clockwise
            upright.append(np.rot90(next(container.decode(video=0)).to_ndarray(format="rgb24"), -1))
        with Image.open(frames / f"{i}.jpg") as im:  # Pillow (an independent reader) agrees on what is displayed
            shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert np.abs(shown.astype(int) - upright[-1].astype(int)).mean() < 4
    out = tmp_path / "out"
    assert _run(model_dir, out, frames) == 0
    marker = _marker(out / "photos")
    assert (marker["height"], marker["width"]) == (48, 32)
    names = sorted(os.listdir(out / "photos" / "semantic"))
    got = np.stack([video_io.read_png(str(out / "photos" / "semantic" / n)) for n in names])
    model = VideomtForUniversalSegmentation.from_pretrained(str(model_dir))
    proc = VideomtVideoProcessor(size={"height": 48, "width": 48})
    pixels = proc.preprocess(torch.from_numpy(np.stack(upright)).permute(0, 3, 1, 2))["pixel_values_videos"]
    with torch.inference_mode():
        o = model(pixel_values_videos=pixels, chunk_size=CHUNK)
    expected = torch.stack(proc.post_process_semantic_segmentation(o, [(48, 32)] * 3)).numpy()
    np.testing.assert_array_equal(got, expected)
    # every orientation, against Pillow
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.jpg"
        _exif_jpeg(path, stored, orientation)
        with Image.open(path) as im:
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        got = video_io.read_image(str(path))
        assert got.shape == expected.shape, orientation
        assert np.abs(got.astype(int) - expected.astype(int)).mean() < 4, orientation


# ---------------------------------------------------------------------------------- also seen


def test_thumbnail_stream_is_not_the_video(model_dir, tmp_path):
    """A file whose first video stream is a one-frame thumbnail: the stream players pick is segmented."""
    video = tmp_path / "two.mkv"
    with av.open(str(video), "w") as container:
        thumb = container.add_stream("libx264", rate=1)
        thumb.height = thumb.width = 16
        thumb.pix_fmt = "yuv420p"
        main = container.add_stream("libx264", rate=10)
        main.height, main.width, main.pix_fmt = 32, 48, "yuv420p"
        for packet in thumb.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in thumb.encode():
            container.mux(packet)
        for t in range(6):
            for packet in main.encode(av.VideoFrame.from_ndarray(np.full((32, 48, 3), 40 * t, np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in main.encode():
            container.mux(packet)
    with av.open(str(video)) as container:
        assert container.streams.video[0].width == 16 and container.streams.best("video").index == 1
    out = tmp_path / "out"
    assert _run(model_dir, out, video) == 0
    marker = _marker(out / "two")
    assert (marker["frames"], marker["height"], marker["width"]) == (6, 32, 48)
    assert marker["stream"] == 1


def test_non_integer_chunk_size_is_refused(model_dir, tmp_path):
    """A chunk size of 2.5 was truncated silently (the model's forward) or made one chunk of a whole video."""
    model = VideomtForUniversalSegmentation(VideomtConfig(**TINY))
    pixels = torch.randn(1, 3, 3, 48, 48)
    with pytest.raises(TypeError, match="chunk_size"):
        model(pixel_values_videos=pixels, chunk_size=2.5)
    model.chunk_size = 2.5
    with pytest.raises(TypeError, match="chunk_size"):
        model(pixel_values_videos=pixels)
    model.chunk_size = None
    video = tmp_path / "v.mp4"
    video_io.write_test_video(str(video), 3, 32, 32, seed=20)
    settings = seg.SegmentSettings(model=str(model_dir), task="semantic", out=str(tmp_path / "out"), chunk_size=2.5)
    with pytest.raises(seg.UsageError, match="chunk_size"):
        seg.run(settings, [str(video)], devices="cpu", progress=False)


def test_checkpoint_with_nan_weights_is_refused(tmp_path, capsys):
    """A checkpoint whose weights are NaN loaded and segmented without a word."""
    model = VideomtForUniversalSegmentation(VideomtConfig(**TINY))
    with torch.no_grad():
        model.query_updater.weight[0, 0] = float("nan")
    model.save_pretrained(str(tmp_path / "model"))
    video = tmp_path / "v.mp4"
    video_io.write_test_video(str(video), 3, 32, 32, seed=21)
    assert _run(tmp_path / "model", tmp_path / "out", video) == 1
    text = capsys.readouterr().out
    assert "FAILED v" in text and "NaN" in text and "query_updater.weight" in text, text
    assert _visible(tmp_path / "out") == []


@pytest.mark.parametrize("progress", [False, True])
def test_a_failed_input_s_reason_is_printed_once(model_dir, tmp_path, capsys, progress):
    """A file that is not a video: its reason appears once, in the summary (with the progress line on, the
    failure is named as it happens, without repeating the reason). Mutation caught: the live line carrying
    the reason as well (printed twice, the former behaviour)."""
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video")
    args = [a for a in _argv(model_dir, tmp_path / "out", fake) if progress is False or a != "--no-progress"]
    assert seg.main(args) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert text.count("cannot open as a video") == 1, text
    assert ("failed: fake (the reason is in the summary)" in captured.err) is progress


def test_a_settings_change_is_named_in_plain_words(model_dir, tmp_path, capsys):
    """Results made with other settings are kept (no --overwrite) and the reason names what changed, in a
    sentence ("made with other settings (threshold ...)", not "another settings")."""
    video = tmp_path / "v.mp4"
    video_io.write_test_video(str(video), 3, 32, 32, seed=2)
    out = tmp_path / "out"
    assert _run(model_dir, out, video, task="instance", extra=["--threshold", "0.5"]) == 0
    capsys.readouterr()
    assert _run(model_dir, out, video, task="instance", extra=["--threshold", "0.3"]) == 1
    text = capsys.readouterr().out
    assert "holds results made with other settings (" in text and "threshold 0.5 -> 0.3" in text, text
    assert "another settings" not in text
