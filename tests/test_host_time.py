"""bench/host_time.py: the per-frame host-time benchmark runs and writes what it measured."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("transformers")

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "host_time.py")


def _tool():
    spec = importlib.util.spec_from_file_location("host_time", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_time_writes_both_ratios_and_what_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDEOMT_FAST_PLAN_CACHE", str(tmp_path / "plans"))
    out = tmp_path / "ht.json"
    assert _tool().main(["--device", "cpu", "--hidden", "32", "--layers", "2", "--queries", "4", "--steps", "3",
                         "--repeats", "1", "--compile", "off", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["host_ms_per_frame"]) == {"hf", "plain", "fast"}
    assert set(data["steady_ms_per_frame"]) == {"hf", "plain", "fast"}
    assert data["ratio_fast_over_hf"] > 0 and data["steady_ratio_fast_over_hf"] > 0
    assert data["fast_step"] == "ops" and data["compile"] == "off" and data["fast_dtype"] == "torch.float32"
    assert data["fast_plans"] and data["config"]["num_queries"] == 4


def test_host_time_refuses_a_one_frame_video():
    with pytest.raises(SystemExit) as exit_info:
        _tool().main(["--steps", "1"])
    assert exit_info.value.code == 2
