"""The DINOv3 family: EoMT-DINOv3 against transformers' ``EomtDinov3ForUniversalSegmentation`` (the oracle),
VidEoMT on a DINOv3 backbone against the research code rebuilt on the CPU (``research_dinov3``), and their
checkpoints (transformers' folders, research ``.pth`` files), configs and drop-in entry points."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import videomt_fast
from videomt_fast import EomtDinov3Config, EomtDinov3ForUniversalSegmentation, VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast.model.configuration import CheckpointError, config_from_preset
from videomt_fast.model.loading import LoadingWarning

from helpers import assert_outputs_close, hf_eomt_dinov3, images, max_abs, randomize_, video
from research_dinov3 import ResearchVideomtDinov3

transformers = pytest.importorskip("transformers")

LOGITS = ("class_queries_logits", "masks_queries_logits")

# (config overrides, batch, masked): gated MLP on and off, SiLU, registers 0 / 4 / 3, biases off, heads 1 / 2 / 4,
# num_blocks 1..3, batch 1 and 2
EOMT_SWEEP = [
    (dict(), 2, True),
    (dict(use_gated_mlp=True, num_register_tokens=0), 1, False),
    (dict(use_gated_mlp=True, hidden_act="silu", num_register_tokens=3), 2, True),
    (dict(key_bias=True, query_bias=False, proj_bias=False, mlp_bias=False, num_blocks=3), 1, True),
    (dict(num_attention_heads=4, num_blocks=1), 2, False),
    (dict(num_attention_heads=1, use_gated_mlp=True, mlp_bias=False), 1, True),
]


@pytest.mark.parametrize("overrides,batch,masked", EOMT_SWEEP)
def test_eomt_dinov3_parity(tmp_path, overrides, batch, masked):
    hf = randomize_(hf_eomt_dinov3(**overrides), seed=len(str(overrides)))
    if not masked:
        hf.attn_mask_probs.zero_()
    hf.save_pretrained(tmp_path)
    x = images(batch, 48, seed=batch)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        for model in (EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path), videomt_fast.from_transformers(hf)):
            assert type(model) is EomtDinov3ForUniversalSegmentation
            assert model.attn_mask_probs.tolist() == hf.attn_mask_probs.tolist()
            assert_outputs_close(model(pixel_values=x), ref, atol=1e-4)


def _at_grid(hf, grid):
    """transformers' model at another grid: its rotary tables follow the input; only the head's reshape and the
    mask resize read ``grid_size``, which the instance is told."""
    import copy

    other = copy.deepcopy(hf)
    other.grid_size = tuple(grid)
    return other


@pytest.mark.parametrize("masked", [True, False])
def test_eomt_dinov3_non_square(masked):
    """48x80 frames (a 3x5 grid; the config's size is 48x48): the rotary tables are the input's."""
    hf = randomize_(hf_eomt_dinov3(num_blocks=3), seed=5)
    if not masked:
        hf.attn_mask_probs.zero_()
    model = videomt_fast.from_transformers(hf)
    x = images(2, 48, 80, seed=5)
    with torch.no_grad():
        assert_outputs_close(model(pixel_values=x), _at_grid(hf, (3, 5))(pixel_values=x), atol=1e-4)


def test_masked_attention_decides():
    """The masks of the masked layers are neither all-on nor all-off, so the parity above tests masking."""
    hf = randomize_(hf_eomt_dinov3(num_blocks=2), seed=0)
    model = videomt_fast.from_transformers(hf)
    x = images(1, 48, seed=0)
    with torch.no_grad():
        on = model(pixel_values=x).masks_queries_logits
        model.attn_mask_probs.zero_()
        off = model(pixel_values=x).masks_queries_logits
    assert max_abs(on, off) > 1e-3


def test_hidden_states_and_attentions_match_transformers_eager():
    hf = randomize_(hf_eomt_dinov3(), seed=2)  # masked attention on
    hf.config._attn_implementation = "eager"
    model = videomt_fast.from_transformers(hf)
    x = images(2, 48)
    with torch.no_grad():
        a = model(pixel_values=x, output_hidden_states=True, output_attentions=True)
        b = hf(pixel_values=x, output_hidden_states=True, output_attentions=True)
    assert_outputs_close(a, b)
    assert len(a.hidden_states) == len(b.hidden_states) == hf.config.num_hidden_layers + 1
    for h, g in zip(a.hidden_states, b.hidden_states):
        assert max_abs(h, g) < 1e-4
    assert len(a.attentions) == len(b.attentions) == hf.config.num_hidden_layers
    for h, g in zip(a.attentions, b.attentions):
        assert max_abs(h, g) < 1e-5


def test_predictor_equals_forward():
    model = videomt_fast.from_transformers(randomize_(hf_eomt_dinov3(), seed=4))
    x = images(2, 48)
    with torch.no_grad():
        ref = model(pixel_values=x)
        out = model.new_predictor()(x)
    assert_outputs_close(out, ref, atol=0.0)


def test_save_pretrained_loads_in_transformers(tmp_path):
    hf = randomize_(hf_eomt_dinov3(use_gated_mlp=True), seed=7)
    ours = videomt_fast.from_transformers(hf)
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "eomt_dinov3" and "mlp_ratio" not in data and data["use_gated_mlp"] is True
    back = transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path).eval()
    x = images(1, 48)
    with torch.no_grad():
        assert_outputs_close(back(pixel_values=x), hf(pixel_values=x), atol=0.0)
    assert EomtDinov3Config.from_pretrained(tmp_path) == ours.config


def test_patch_transformers_covers_eomt_dinov3(tmp_path):
    randomize_(hf_eomt_dinov3()).save_pretrained(tmp_path)
    with videomt_fast.patch_transformers():
        a = transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path)
        b = transformers.AutoModelForUniversalSegmentation.from_pretrained(tmp_path)
    assert type(a) is type(b) is EomtDinov3ForUniversalSegmentation
    assert type(transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(tmp_path)).__module__.startswith(
        "transformers")


def test_config_fields_and_errors():
    ours, theirs = EomtDinov3Config(), transformers.EomtDinov3Config()
    for key, value in theirs.to_diff_dict().items():
        if key not in ("transformers_version",):
            assert getattr(ours, key) == value, key
    assert not hasattr(ours, "mlp_ratio") and not hasattr(ours, "use_swiglu_ffn")
    with pytest.raises(ValueError, match="rope_parameters"):
        EomtDinov3Config(rope_parameters={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="multiple of 4"):
        EomtDinov3Config(hidden_size=60, num_attention_heads=6)
    with pytest.raises(ValueError, match="hidden_act"):
        EomtDinov3Config(hidden_act="relu")
    with pytest.raises(ValueError, match="backbone_type"):
        VideomtConfig(backbone_type="dinov4")


# ------------------------------------------------------------------------------------------ research .pth


def _eomt_research_state(hf) -> dict[str, torch.Tensor]:
    """transformers' EoMT-DINOv3 weights under tue-mps/eomt's names (transformers' DINOv3 ViT renamed timm-style
    inside ``network.encoder.backbone``)."""
    renames = [("embeddings.", "encoder.backbone.patch_embed."), ("layers.", "encoder.backbone.blocks."),
               ("layernorm.", "encoder.backbone.norm."), ("query.weight", "q.weight"), ("class_predictor", "class_head"),
               ("mask_head.fc1", "mask_head.0"), ("mask_head.fc2", "mask_head.2"), ("mask_head.fc3", "mask_head.4"),
               ("upscale_block.block.", "upscale."), ("layernorm2d", "norm")]
    out = {}
    for key, value in hf.state_dict().items():
        if key.startswith("criterion."):
            continue
        for old, new in renames:
            if key.startswith(old) or (old in key and not old.endswith(".")):
                key = key.replace(old, new, 1) if key.startswith(old) else key.replace(old, new)
        out["network." + key] = value.detach().clone()
    return out


def test_eomt_dinov3_research_checkpoint(tmp_path):
    hf = randomize_(hf_eomt_dinov3(num_attention_heads=1), seed=9)  # head dim 64, as the config inference assumes
    state = _eomt_research_state(hf)
    assert "network.encoder.backbone.blocks.0.attention.k_proj.weight" in state
    assert "network.encoder.backbone.blocks.0.attention.k_proj.bias" not in state
    path = tmp_path / "eomt_dinov3.pth"
    torch.save({"state_dict": state}, path)
    model = EomtDinov3ForUniversalSegmentation.from_pretrained(path, image_size=48, layer_norm_eps=1e-5)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.key_bias, cfg.query_bias, cfg.num_register_tokens) == (96, False, True, 4)
    x = images(1, 48)
    with torch.no_grad():
        assert_outputs_close(model(pixel_values=x), hf(pixel_values=x), atol=1e-4)
    with pytest.raises(CheckpointError, match="EomtDinov3ForUniversalSegmentation"):
        videomt_fast.EomtForUniversalSegmentation.from_pretrained(path)


# (oracle settings, batch of frames (T), frame size): gated MLP (SiLU as published, GELU given by hand), normalized
# queries, registers, non-square
VIDEOMT_SWEEP = [
    (dict(), 3, (48, 48)),
    (dict(use_gated_mlp=True, norm_queries=True), 4, (48, 64)),
    (dict(num_register_tokens=0, num_blocks=1, hidden_act="silu", use_gated_mlp=True), 2, (40, 56)),
    (dict(num_blocks=4, norm_queries=True, patch_size=16), 3, (64, 48)),
]


def _research_model(tmp_path, seed=3, **settings):
    research = randomize_(ResearchVideomtDinov3(**settings), seed=seed)
    path = tmp_path / "videomt_dinov3.pth"
    torch.save({"model": research.research_state_dict()}, path)
    return research, path


@pytest.mark.parametrize("settings,frames,size", VIDEOMT_SWEEP)
def test_videomt_dinov3_matches_the_research_code(tmp_path, settings, frames, size):
    research, path = _research_model(tmp_path, **settings)
    gated = settings.get("use_gated_mlp", False)
    activation = settings.get("hidden_act", "gelu")
    given = {} if activation == ("silu" if gated else "gelu") else {"hidden_act": activation}  # else inferred
    model = VideomtForUniversalSegmentation.from_pretrained(
        path, num_attention_heads=2, image_size=48, norm_queries=settings.get("norm_queries", False), **given)
    cfg = model.config
    assert cfg.backbone_type == "dinov3" and cfg.gated_mlp == gated
    assert cfg.mlp_activation == activation and cfg.head_activation == "gelu"
    x = video(1, frames, *size, seed=frames)
    masks, classes = research(x[0])
    with torch.no_grad():
        out = model(pixel_values_videos=x)
        chunked = model(pixel_values_videos=x, chunk_size=2)
        session = model.new_session()
        steps = [session.step(x[:, t]) for t in range(frames)]
    assert max_abs(out.masks_queries_logits, masks) <= 1e-4
    assert max_abs(out.class_queries_logits, classes) <= 1e-4
    assert_outputs_close(chunked, out, atol=1e-5)
    for t, step in enumerate(steps):
        assert max_abs(step.masks_queries_logits, out.masks_queries_logits[t:t + 1]) <= 1e-5


def test_videomt_dinov3_research_norm_queries_default_follows_the_published_configs(tmp_path):
    _, path = _research_model(tmp_path, num_classes=124)
    with pytest.warns(LoadingWarning, match="norm_queries=True"):
        assert VideomtForUniversalSegmentation.from_pretrained(path).config.norm_queries is True
    _, path = _research_model(tmp_path, num_classes=40)
    with pytest.warns(LoadingWarning, match="norm_queries=False"):
        assert VideomtForUniversalSegmentation.from_pretrained(path).config.norm_queries is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VideomtForUniversalSegmentation.from_pretrained(path, norm_queries=False)


def test_videomt_dinov3_research_keys_named_on_mismatch(tmp_path):
    research, path = _research_model(tmp_path)
    state = research.research_state_dict()
    del state["backbone.encoder.backbone.blocks.1.mlp.down_proj.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down_proj\.weight"):
        VideomtForUniversalSegmentation.from_pretrained(path)
    state = research.research_state_dict()
    state["backbone.encoder.backbone.blocks.0.attention.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attention\.extra\.weight"):
        VideomtForUniversalSegmentation.from_pretrained(path)


def test_videomt_dinov3_config_round_trips(tmp_path):
    config = config_from_preset("dinov3-s", num_labels=40, norm_queries=True)
    assert (config.backbone_type, config.intermediate_size, config.layer_norm_eps) == ("dinov3", 1536, 1e-5)
    data = config.to_dict()
    assert "mlp_ratio" not in data and data["backbone_type"] == "dinov3" and data["norm_queries"] is True
    assert VideomtConfig.from_dict(json.loads(config.to_json_string())) == config
    plain = VideomtConfig().to_dict()  # a DINOv2 config.json stays transformers' own
    assert not {"backbone_type", "norm_queries", "intermediate_size", "rope_parameters"} & set(plain)
    assert isinstance(config_from_preset("dinov3-l", videomt_fast.EomtConfig), EomtDinov3Config)
    small = VideomtConfig(**{**config.to_dict(), "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                             "intermediate_size": 96, "num_queries": 5, "image_size": 32, "num_blocks": 2})
    model = VideomtForUniversalSegmentation(small)
    model.save_pretrained(tmp_path)
    again = VideomtForUniversalSegmentation.from_pretrained(tmp_path)
    assert again.config == small
    x = video(1, 2, 32, 32)
    with torch.no_grad():
        assert_outputs_close(again(pixel_values_videos=x), model(pixel_values_videos=x), atol=0.0)


def test_segment_a_video_with_a_research_videomt_dinov3_checkpoint(tmp_path):
    """``videomt-fast segment VIDEO --model X.pth``: a research VidEoMT-DINOv3 checkpoint segments a video; the
    instances match the model run on the same frames by hand."""
    import numpy as np

    pytest.importorskip("av")
    from videomt_fast.apps import cli, video_io
    from videomt_fast.processing.tracks import VideoInstanceAccumulator
    from videomt_fast.processing.video_processor import VideomtVideoProcessor

    _, path = _research_model(tmp_path, num_attention_heads=1, hidden_size=64, num_classes=40)
    video_io.write_test_video(str(tmp_path / "clip.mp4"), 6, 40, 56, seed=4)
    with pytest.warns(LoadingWarning, match="norm_queries=False"):
        code = cli.main(["segment", str(tmp_path / "clip.mp4"), "--model", str(path), "--task", "instance",
                         "--size", "48", "--threshold", "0.0", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "clip" / "youtube_vis.json").read_text())  # every top-k pair
    assert result and {"score", "label_id", "id"} <= set(result[0])
    tracks_json = json.loads((tmp_path / "out" / "clip" / "instances.json").read_text())["tracks"]
    assert sorted(t["id"] for t in tracks_json) == sorted({r["id"] for r in result})
    with pytest.warns(LoadingWarning):
        model = VideomtForUniversalSegmentation.from_pretrained(path)
    frames = np.concatenate(list(video_io.iter_chunks(video_io.VideoSource(str(tmp_path / "clip.mp4"), "video"), 100)))
    pixels = VideomtVideoProcessor(size={"height": 48, "width": 48}).preprocess(
        torch.from_numpy(frames).permute(0, 3, 1, 2))["pixel_values_videos"]
    with torch.inference_mode():
        out = model(pixel_values_videos=pixels)
    tracks = VideoInstanceAccumulator(top_k=10)
    tracks.update(out, target_sizes=[frames.shape[1:3]] * frames.shape[0])
    want = sorted((i.track_id + 1, i.label_id) for i in tracks.finalize())
    assert sorted((r["id"], r["label_id"]) for r in result) == want
