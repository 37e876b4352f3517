"""``videomt-fast segment`` run overnight on many videos: no exit 0 with wrong or missing results, no
hangs, misuse answered with one line and exit status 2. Each test reproduces one reported case with a
tiny random model and tiny videos made here; anything that could hang runs in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from videomt_fast import VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast.apps import segment as seg
from videomt_fast.apps import video_io
from videomt_fast.processing.tracks import VideoInstanceAccumulator
from videomt_fast.processing.video_processor import VideomtVideoProcessor

from segment_helpers import CHUNK, ENV, REPO, TINY, tiny_model
from segment_helpers import argv as _argv
from segment_helpers import pngs as _pngs
from segment_helpers import run as _run
from segment_helpers import visible as _visible

pytest.importorskip("av", reason="segment decodes with PyAV (av); pip install -e '.[test]'")



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("trust"), seed=11)


# ---------------------------------------------------------------------------------- silent wrong results


def test_truncated_video_fails_by_name(model_dir, tmp_path, capsys):
    """1. An MP4 cut to half its bytes (index first) used to decode part of its frames and be marked done."""
    full = tmp_path / "full.mp4"
    video_io.write_test_video(str(full), 30, 32, 32, seed=1, faststart=True)
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    assert video_io.probe(video_io.VideoSource(str(cut), "video")).num_frames == 30  # the index survives
    out = tmp_path / "out"
    assert _run(model_dir, out, cut, full) == 1
    text = capsys.readouterr().out
    assert "1 done" in text and "1 failed" in text
    assert "FAILED cut" in text and "of 30" in text
    assert _visible(out) == ["full"]
    assert not (out / "cut").exists()
    assert _run(model_dir, out, cut) == 1  # a rerun fails it again instead of skipping it


def test_resume_checks_task_settings_model_and_source(model_dir, tmp_path, capsys):
    """2. A rerun with another task, size or model, or a changed source, used to skip with stale results."""
    video = tmp_path / "clip.mp4"
    video_io.write_test_video(str(video), 3, 32, 32, seed=2)
    out = tmp_path / "out"
    assert _run(model_dir, out, video) == 0
    marker = json.loads((out / "clip" / "done.json").read_text())
    ident = marker["identity"]
    assert ident["source"]["path"] == os.path.realpath(video) and ident["source"]["bytes"] == video.stat().st_size
    assert ident["model"]["path"] == os.path.realpath(model_dir) and len(ident["model"]["sha256"]) == 64
    assert ident["settings"]["task"] == "semantic"
    assert ident["settings"]["dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")  # not "auto"
    before = (out / "clip" / "done.json").read_text()
    capsys.readouterr()
    assert _run(model_dir, out, video) == 0 and "1 skipped" in capsys.readouterr().out  # same everything: skipped

    torch.manual_seed(12)
    other_model = tmp_path / "other-model"
    VideomtForUniversalSegmentation(VideomtConfig(**TINY)).save_pretrained(str(other_model))
    for extra, model, what in (
        (["--task", "panoptic"], model_dir, "task 'semantic' -> 'panoptic'"),
        (["--size", "32"], model_dir, "settings (size None -> 32)"),
        ([], other_model, "model (path"),
    ):
        argv = _argv(model, out, video, extra=extra)
        assert seg.main(argv) == 1, extra
        text = capsys.readouterr().out
        assert "FAILED clip" in text and what in text and "--overwrite" in text, text
        assert (out / "clip" / "done.json").read_text() == before  # untouched
    # the source changed at the same path
    video_io.write_test_video(str(video), 3, 32, 32, seed=3)
    assert _run(model_dir, out, video) == 1
    text = capsys.readouterr().out
    assert "another source" in text and "--overwrite" in text
    # --overwrite redoes it with what was asked
    assert _run(model_dir, out, video, task="panoptic", extra=["--overwrite"]) == 0
    marker = json.loads((out / "clip" / "done.json").read_text())
    assert marker["task"] == "panoptic" and marker["identity"]["source"]["sha256"] != ident["source"]["sha256"]
    assert sorted(os.listdir(out / "clip")) == ["done.json", "panoptic", "panoptic.json"]
    assert _visible(out) == ["clip"]


def test_same_name_from_another_folder_gets_its_own_results(model_dir, tmp_path, capsys):
    """2. ``camB/clip.mp4`` after ``camA/clip.mp4`` used to be skipped with camA's results."""
    cam_a, cam_b = tmp_path / "camA", tmp_path / "camB"
    cam_a.mkdir(), cam_b.mkdir()
    video_io.write_test_video(str(cam_a / "clip.mp4"), 3, 32, 32, seed=4)
    video_io.write_test_video(str(cam_b / "clip.mp4"), 3, 32, 32, seed=5)
    out = tmp_path / "out"
    assert _run(model_dir, out, cam_a / "clip.mp4") == 0
    first = (out / "clip" / "done.json").read_text()
    assert _run(model_dir, out, cam_b / "clip.mp4") == 0
    assert "1 done" in capsys.readouterr().out
    names = _visible(out)
    assert len(names) == 2 and names[0] == "clip" and names[1].startswith("clip-")
    assert (out / "clip" / "done.json").read_text() == first
    assert json.loads((out / names[1] / "done.json").read_text())["identity"]["source"]["path"] == os.path.realpath(cam_b / "clip.mp4")
    # both at once (a run alone would name them clip-<hash> each): each keeps the folder that records it
    assert _run(model_dir, out, cam_a / "clip.mp4", cam_b / "clip.mp4") == 0
    assert "2 skipped" in capsys.readouterr().out
    assert _visible(out) == names


_KILL_IN_RMTREE = """
import os, shutil, signal, sys
from videomt_fast.apps import segment as seg
real = shutil.rmtree
def rmtree(path, *args, **kwargs):
    if os.path.isfile(os.path.join(path, "done.json")):  # removing a finished folder: die half-way through it
        for root, _, files in os.walk(path):
            for name in files:
                if name.endswith(".png"):
                    os.remove(os.path.join(root, name))
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)
shutil.rmtree = rmtree
sys.exit(seg.main(sys.argv[1:]))
"""


def test_overwrite_killed_midway_never_leaves_a_half_deleted_done_folder(model_dir, tmp_path, capsys):
    """3. ``--overwrite`` removed the old PNGs before its ``done.json``; a kill in between left a "done" folder."""
    video = tmp_path / "v.mp4"
    video_io.write_test_video(str(video), 5, 32, 32, seed=6)
    out = tmp_path / "out"
    assert _run(model_dir, out, video) == 0
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_RMTREE, *_argv(model_dir, out, video, extra=["--overwrite"])],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    marker = json.loads((out / "v" / "done.json").read_text())
    names, maps = _pngs(out / "v" / "semantic")
    assert len(names) == marker["frames"] == 5  # the new folder, complete
    assert any(e.startswith(".v.old-") for e in os.listdir(out))  # the old one, set aside
    capsys.readouterr()
    assert _run(model_dir, out, video) == 0 and "1 skipped" in capsys.readouterr().out
    assert os.listdir(out) == ["v"]  # leftovers of the finished video removed


def test_frames_with_the_same_stem_keep_both_results(model_dir, tmp_path):
    """4. ``1.png`` and ``1.ppm`` in one frame folder used to write one output file."""
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in range(2))
    video_io.write_png(str(frames / "1.png"), a)
    (frames / "1.ppm").write_bytes(b"P6\n40 32\n255\n" + b.tobytes())
    video_io.write_png(str(frames / "2.png"), a)
    out = tmp_path / "out"
    assert _run(model_dir, out, frames) == 0
    names, _ = _pngs(out / "frames" / "semantic")
    assert names == ["1.png.png", "1.ppm.png", "2.png.png"]
    assert json.loads((out / "frames" / "done.json").read_text())["frames"] == 3


def test_out_inside_an_input_folder_is_not_rediscovered(model_dir, tmp_path, capsys):
    """5. ``--out`` inside an input folder used to be segmented as input on the next run."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    video_io.write_test_video(str(inputs / "v.mp4"), 3, 32, 32, seed=7)
    out = inputs / "results"
    assert _run(model_dir, out, inputs) == 0
    capsys.readouterr()
    assert _run(model_dir, out, inputs) == 0
    text = capsys.readouterr().out
    assert "1 videos: 0 done, 1 skipped" in text, text
    assert _visible(out) == ["v"]


def test_rotated_video_is_segmented_as_displayed(model_dir, tmp_path):
    """6. A display-matrix rotation (as phones write) used to be ignored: maps in coded orientation."""
    import av

    video = tmp_path / "phone.mp4"
    video_io.write_test_video(str(video), 4, 32, 48, seed=8, rotation=90)  # coded 48 wide, 32 high
    info = video_io.probe(video_io.VideoSource(str(video), "video"))
    assert (info.height, info.width, info.rotation) == (48, 32, 90)
    out = tmp_path / "out"
    assert _run(model_dir, out, video) == 0
    marker = json.loads((out / "phone" / "done.json").read_text())
    assert marker["rotation"] == 90 and (marker["height"], marker["width"]) == (48, 32)
    _, got = _pngs(out / "phone" / "semantic")
    # reference: the coded frames turned 90 degrees counter-clockwise (PyAV's rotation convention)
    with av.open(str(video)) as c:
        coded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    upright = np.ascontiguousarray(np.rot90(coded, 1, axes=(1, 2)))
    model = VideomtForUniversalSegmentation.from_pretrained(str(model_dir))
    proc = VideomtVideoProcessor(size={"height": 48, "width": 48})
    pixels = proc.preprocess(torch.from_numpy(upright).permute(0, 3, 1, 2))["pixel_values_videos"]
    with torch.inference_mode():
        o = model(pixel_values_videos=pixels, chunk_size=CHUNK)
    expected = torch.stack(proc.post_process_semantic_segmentation(o, [(48, 32)] * 4)).numpy()
    assert got.shape == (4, 48, 32)
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------------- hangs and leaks


def test_stderr_closed_midway_does_not_hang(model_dir, tmp_path):
    """7. stderr piped into ``head -n 1``: the progress line that hit the closed pipe killed the writer
    thread and the run then blocked forever."""
    corrupt = tmp_path / "a-corrupt.mp4"
    corrupt.write_bytes(b"\0" * 4000)
    videos = [tmp_path / f"v{i}.mp4" for i in range(3)]
    for i, v in enumerate(videos):
        video_io.write_test_video(str(v), 8, 32, 32, seed=20 + i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "videomt_fast", "segment", *_argv(model_dir, out, corrupt, *videos)]
    cmd.remove("--no-progress")
    quoted = " ".join(f"'{c}'" for c in cmd)
    script = f"{quoted} 2>&1 >'{tmp_path / 'stdout.txt'}' | head -n 1 >/dev/null; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", script], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=150)
    summary = (tmp_path / "stdout.txt").read_text()
    assert proc.returncode == 1, summary + proc.stderr  # the corrupt video failed; nothing else
    assert "3 done" in summary and "1 failed" in summary
    assert _visible(out) == ["v0", "v1", "v2"]


_RAISING_CALLBACK = """
import sys, threading
from videomt_fast.apps import segment as seg, video_io
settings = seg.SegmentSettings(model=sys.argv[1], task="semantic", out=sys.argv[2], chunk_size=2, threads=1)
sources, _ = video_io.discover_inputs(sys.argv[3:])
jobs = [seg.Job(s, sys.argv[2] + "/" + s.name) for s in sources]
seen = []
def on_event(kind, payload):
    if threading.current_thread().name == "segment-writer":
        raise BrokenPipeError("callback failed")
    seen.append((kind, payload))
seg.segment_videos(jobs, settings, "cpu", on_event)
results = [p for k, p in seen if k == "result"]
print("RESULTS", len(results), sorted(r["status"] for r in results))
print("ERRORS", all("output writer stopped" in (r["error"] or "") for r in results))
"""


def test_dead_writer_fails_the_run_at_once(model_dir, tmp_path):
    """7. A writer thread that died (here: its result callback raised) left the producer blocked forever."""
    videos = [tmp_path / f"v{i}.mp4" for i in range(3)]
    for i, v in enumerate(videos):
        video_io.write_test_video(str(v), 12, 32, 32, seed=30 + i)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", _RAISING_CALLBACK, str(model_dir), str(out), *map(str, videos)],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RESULTS 3 ['failed', 'failed', 'failed']" in proc.stdout and "ERRORS True" in proc.stdout, proc.stdout
    assert [e for e in os.listdir(out) if e.startswith(".")] == []  # no temporary folders, no claims left behind


def _worker_pids(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read().decode(errors="replace")
            except OSError:
                continue
            if "worker_main" in cmdline and marker in cmdline:
                pids.append(int(entry))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_workers_exit_when_their_parent_dies(model_dir, tmp_path):
    """7. With ``--devices cpu,cpu`` a killed parent left its workers running (then hanging) with their devices."""
    videos = [tmp_path / f"v{i}.mp4" for i in range(4)]
    for i, v in enumerate(videos):
        video_io.write_test_video(str(v), 40, 32, 32, seed=40 + i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "videomt_fast", "segment", *_argv(model_dir, out, *videos, extra=["--devices", "cpu,cpu"])]
    parent = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while len(_worker_pids(str(out))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _worker_pids(str(out))
        assert len(workers) == 2, "workers did not start"
        while not any(e.endswith(".claims") and os.listdir(out / e) for e in os.listdir(out)):
            assert time.monotonic() < deadline, "workers claimed nothing"
            time.sleep(0.2)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while _worker_pids(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _worker_pids(str(out))
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers outlived their parent"


@pytest.mark.slow
def test_dead_workers_videos_go_back_to_the_queue(model_dir, tmp_path):
    """7. A worker that died used to fail its claimed videos; they are now run by another worker."""
    videos = [tmp_path / f"v{i}.mp4" for i in range(3)]
    for i, v in enumerate(videos):
        video_io.write_test_video(str(v), 6, 32, 32, seed=50 + i)
    out = tmp_path / "out"
    env = {**ENV, seg.KILL_AFTER_FRAMES_ENV: "4", seg.KILL_ONCE_ENV: str(tmp_path / "killed")}
    cmd = [sys.executable, "-m", "videomt_fast", "segment", *_argv(model_dir, out, *videos, extra=["--devices", "cpu,cpu"])]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert (tmp_path / "killed").exists()  # one worker did die mid-video
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 done" in proc.stdout
    assert _visible(out) == ["v0", "v1", "v2"]
    for name in ("v0", "v1", "v2"):
        assert len(os.listdir(out / name / "semantic")) == 6


def test_branching_symlink_loop_is_walked_once(tmp_path):
    """8. Two links back to a parent made discovery run forever (exponential ``os.walk(followlinks=True)``)."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "v.mp4").write_bytes(b"x")
    os.symlink(root, root / "a" / "up1")
    os.symlink(root, root / "a" / "up2")
    os.symlink(root / "a", root / "same")
    # video_io alone (numpy and the standard library): the child starts fast, the timeout catches a loop
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('video_io', sys.argv[2]); "
            "video_io = sys.modules['video_io'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(video_io); "
            "s, p = video_io.discover_inputs([sys.argv[1]]); print(sorted(x.name for x in s), p)")
    proc = subprocess.run([sys.executable, "-c", code, str(root), video_io.__file__], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['a__v'] []"


def test_failure_in_finish_removes_its_temporary_folder(model_dir, tmp_path, monkeypatch, capsys):
    """10. A disk-full ``finish()`` (instance task) leaked its temporary folder; stale ones of finished videos stayed."""
    pytest.importorskip("pycocotools", reason="instance RLEs need pycocotools; pip install -e '.[test]'")
    videos = [tmp_path / f"v{i}.mp4" for i in range(2)]
    for i, v in enumerate(videos):
        video_io.write_test_video(str(v), 3, 32, 32, seed=60 + i)
    real = seg.VideoOutput._instances

    def full_disk(self, *args):
        if self.job.name == "v0":
            raise OSError(28, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(seg.VideoOutput, "_instances", full_disk)
    out = tmp_path / "out"
    assert _run(model_dir, out, *videos, task="instance") == 1
    text = capsys.readouterr().out
    assert "FAILED v0" in text and "No space left" in text and "1 done" in text
    assert os.listdir(out) == ["v1"]
    # a dead run's temporary folder of a finished video goes on the next run
    (out / ".v1.tmp-host-1-dead").mkdir()
    monkeypatch.setattr(seg.VideoOutput, "_instances", real)
    assert _run(model_dir, out, *videos, task="instance") == 0
    assert sorted(os.listdir(out)) == ["v0", "v1"]


def test_runs_sharing_out_wait_for_each_others_claims(model_dir, tmp_path):
    """11. Two runs on one ``--out`` deleted each other's live temporary folders and did videos twice."""
    videos = [tmp_path / "held.mp4", tmp_path / "free.mp4"]
    for i, v in enumerate(videos):
        video_io.write_test_video(str(v), 3, 32, 32, seed=70 + i)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".free.lock").write_bytes(b"")  # a dead process's lock file: not a claim
    other_run = seg.VideoLock.acquire(str(out), "held", wait=False)  # a live run working on "held"
    (out / ".held.tmp-otherhost-1-live").mkdir()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", _run(model_dir, out, *videos)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (out / "free" / "done.json").exists():
            assert time.monotonic() < deadline and thread.is_alive(), "the unclaimed video was not done"
            time.sleep(0.1)
        time.sleep(0.5)
        assert (out / ".held.tmp-otherhost-1-live").is_dir()  # the live run's work is left alone
        assert not (out / "held").exists() and thread.is_alive()  # and waited for
    finally:
        other_run.release()  # the other run ends without finishing it
    thread.join(60)
    assert result.get("rc") == 0
    assert sorted(os.listdir(out)) == ["free", "held"]


# ---------------------------------------------------------------------------------- misuse


def _main_rc(argv):
    try:
        return seg.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("case", ["cuda", "bogus-device", "out-file", "out-uncreatable", "list-not-utf8",
                                  "threshold-nan", "threshold-range", "mask-threshold", "unknown-option"])
def test_misuse_is_one_line_and_exit_2(model_dir, tmp_path, capsys, case):
    """12. These used to raise tracebacks (or run)."""
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    (tmp_path / "file").write_text("x")
    (tmp_path / "list.txt").write_bytes(b"v.mp4\n\xff\xfe\x00bad\n")
    inputs, out, extra = [video], tmp_path / "out", []
    if case == "cuda":  # the reported case without CUDA; one GPU past the last where there is CUDA
        extra = ["--devices", f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda:0"]
    elif case == "bogus-device":
        extra = ["--devices", "bogus"]
    elif case == "out-file":
        out = tmp_path / "file"
    elif case == "out-uncreatable":
        out = tmp_path / "file" / "sub"
    elif case == "list-not-utf8":
        inputs = [tmp_path / "list.txt"]
    elif case == "threshold-nan":
        extra = ["--threshold", "nan"]
    elif case == "threshold-range":
        extra = ["--threshold", "1.5"]
    elif case == "mask-threshold":
        extra = ["--mask-threshold", "-0.1"]
    elif case == "unknown-option":
        extra = ["--no-such-option"]
    capsys.readouterr()
    assert _main_rc(_argv(model_dir, out, *inputs, extra=extra)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("videomt-fast segment: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    hint = {"cuda": "cuda", "bogus-device": "bogus", "out-file": "is a file", "out-uncreatable": "cannot create",
            "list-not-utf8": "UTF-8", "threshold-nan": "--threshold", "threshold-range": "--threshold",
            "mask-threshold": "--mask-threshold", "unknown-option": "--no-such-option"}[case]
    assert hint in (lines[0].lower() if case == "cuda" else lines[0])


# ---------------------------------------------------------------------------------- video instances


def test_video_instances_refuse_no_frames_and_skip_nan_scores():
    """Also: ``finalize()`` after an empty update returned NaN-score instances; NaN logits took top-k slots."""
    acc = VideoInstanceAccumulator(top_k=5)
    empty = {"class_queries_logits": torch.zeros(0, 4, 3), "masks_queries_logits": torch.zeros(0, 4, 8, 8)}
    acc.update(empty, [])
    with pytest.raises(RuntimeError, match="no frames"):
        acc.finalize()
    torch.manual_seed(0)
    cls = torch.randn(2, 4, 3)
    cls[:, 1] = float("nan")  # query 1: NaN logits
    masks = torch.randn(2, 4, 8, 8)
    acc.update({"class_queries_logits": cls, "masks_queries_logits": masks}, [(8, 8)] * 2)
    instances = acc.finalize()
    assert len(instances) == 5 and all(np.isfinite(i.score) for i in instances)
    assert 1 not in {i.track_id for i in instances}
    scores = [i.score for i in instances]
    assert scores == sorted(scores, reverse=True)
