"""What the ``videomt-fast segment`` tests share: a tiny random model, the command line run in this process
or in a child, and the files it writes read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import torch

from videomt_fast import VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast.apps import segment as seg
from videomt_fast.apps import video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_blocks=2, num_queries=7, image_size=48, num_labels=5)
CHUNK = 4
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)}


def interruptible() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: a shell that starts a job in the background
    hands it SIGINT ignored, and an ignored signal stays ignored across exec (Python then installs no
    KeyboardInterrupt handler); the child starts with the default disposition wherever the suite runs."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tiny_model(folder, seed: int):
    """A tiny random VidEoMT saved under ``folder/model``; returns that path."""
    torch.manual_seed(seed)
    VideomtForUniversalSegmentation(VideomtConfig(**TINY)).save_pretrained(str(folder / "model"))
    return folder / "model"


def argv(model_dir, out, *inputs, task="semantic", extra=()):
    return [*map(os.fspath, inputs), "--model", str(model_dir), "--task", task, "--out", str(out),
            "--chunk-size", str(CHUNK), "--no-progress", "--threads", "1", *extra]


def run(model_dir, out, *inputs, task="semantic", extra=()):
    """``videomt-fast segment`` in this process: its exit status."""
    return seg.main(argv(model_dir, out, *inputs, task=task, extra=extra))


def cli(model_dir, out, *inputs, extra=(), timeout=180, **kw):
    """``videomt-fast segment`` in a child process (``env`` replaces the environment)."""
    cmd = [sys.executable, "-m", "videomt_fast", "segment", *argv(model_dir, out, *inputs, extra=extra)]
    return subprocess.run(cmd, env=kw.pop("env", ENV), cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def pngs(folder):
    names = sorted(os.listdir(folder), key=video_io._natural_key)
    return names, np.stack([video_io.read_png(os.path.join(folder, n)) for n in names])


def visible(folder):
    return sorted(e for e in os.listdir(folder) if not e.startswith("."))
