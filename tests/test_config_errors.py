"""Checkpoint errors name what is wrong: config.json fields, research keys, shard paths; hub requests that
never answer time out and say which step; saved files get the umask's permissions."""

import json
import socket
import time

import pytest
import torch

from videomt_fast import VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast.model.loading import CheckpointError, HubTimeoutError, resolve_checkpoint_dir

from helpers import hf_videomt, to_research_keys

pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("hidden_size", "32", "a positive int"),
        ("patch_size", 0, "positive int"),
        ("mlp_ratio", -1, "a positive number"),
        ("id2label", ["a", "b"], "a mapping"),
        ("layer_norm_eps", "x", "a positive finite number"),
        ("num_queries", 2.5, "an int >= 1"),
        ("use_swiglu_ffn", "yes", "true or false"),
        ("image_size", [48], "pair"),
    ],
)
def test_config_json_field_errors_name_field_value_and_expectation(tmp_path, field, value, expected):
    hf_videomt().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data[field] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        VideomtForUniversalSegmentation.from_pretrained(tmp_path)
    message = str(info.value)
    assert "config.json" in message and f"{field} = {value!r}" in message and expected in message, message


def test_config_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        VideomtConfig.from_json_file(tmp_path / "config.json")


@pytest.mark.parametrize("key", ["q.weight", "class_head.weight"])
def test_research_checkpoint_missing_key_is_named(tmp_path, key):
    state = to_research_keys(hf_videomt())
    del state["backbone." + key]
    torch.save(state, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path / "ckpt.pth")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_shard_paths_stay_inside_the_checkpoint(tmp_path, shard):
    folder = tmp_path / "ckpt"
    hf_videomt().save_pretrained(folder, max_shard_size="50KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    if shard == "link.safetensors":  # a readable shard, but reached through a link that leaves the folder
        real = folder / index["weight_map"][first]
        (tmp_path / "elsewhere.safetensors").write_bytes(real.read_bytes())
        (folder / shard).symlink_to(tmp_path / "elsewhere.safetensors")
        index["weight_map"] = {k: (shard if v == real.name else v) for k, v in index["weight_map"].items()}
    else:
        index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="(resolves outside|expected a file name inside)"):
        VideomtForUniversalSegmentation.from_pretrained(folder)


def test_hub_that_never_answers_times_out(monkeypatch, tmp_path):
    """A server that accepts connections and never sends a byte: a bounded wait and a message saying so."""
    import huggingface_hub.constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        start = time.monotonic()
        with pytest.raises(HubTimeoutError, match=r"timed out \(the Hub sent no data for 0\.3 s\).*hf download"):
            resolve_checkpoint_dir("org/never-answers", cache_dir=str(tmp_path), timeout=(0.3, 0.3))
        assert time.monotonic() - start < 30
    finally:
        server.close()


def test_cli_model_loader_times_out(monkeypatch, tmp_path):
    """``videomt-fast segment`` loads through the same path: its default limits bound the wait too."""
    import huggingface_hub.constants

    from videomt_fast.apps import segment
    from videomt_fast.model import loading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(loading, "HUB_CONNECT_TIMEOUT", 0.3)
        monkeypatch.setattr(loading, "HUB_READ_TIMEOUT", 0.3)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        settings = segment.SegmentSettings(model="org/never-answers-cli", task="semantic", out=str(tmp_path / "out"))
        with pytest.raises(HubTimeoutError, match="timed out"):
            segment.load_model(settings, "cpu")
    finally:
        server.close()


def test_offline_hint_names_hf_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match="hf download org/absent") as info:
        VideomtForUniversalSegmentation.from_pretrained("org/absent")
    assert "huggingface-cli" not in str(info.value)


def test_timeout_argument_checked():
    with pytest.raises(ValueError, match="timeout"):
        resolve_checkpoint_dir("org/x", timeout=(1, -1))


def test_hub_timeouts_nest_and_restore_the_client_factory():
    from huggingface_hub.utils import _http

    from videomt_fast.model.loading import _HubClientTimeouts

    before = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if before is None:
        pytest.skip("this huggingface_hub has no client factory")
    with _HubClientTimeouts(1, 2):
        installed = _http._GLOBAL_CLIENT_FACTORY
        with _HubClientTimeouts(3, 4):  # a second load (another thread) shares the installation
            assert _http._GLOBAL_CLIENT_FACTORY is installed
        assert _http._GLOBAL_CLIENT_FACTORY is installed  # still in use by the outer load
    assert installed is not before and _http._GLOBAL_CLIENT_FACTORY is before
