"""Checkpoints in and out: transformers directories (single, sharded), research .pth, errors by name."""

import json
import os

import pytest
import torch

import videomt_fast
from videomt_fast import VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast.model.loading import CheckpointError

from helpers import hf_videomt, max_abs, randomize_, to_research_keys, video

_to_research_keys = to_research_keys  # the former name, still imported by other test modules

pytest.importorskip("transformers")


def _outputs_match(model, hf, x, tol=1e-4):
    with torch.no_grad():
        ours, ref = model(pixel_values_videos=x), hf(pixel_values_videos=x)
    assert max_abs(ours.masks_queries_logits, ref.masks_queries_logits) <= tol
    assert max_abs(ours.class_queries_logits, ref.class_queries_logits) <= tol


def test_sharded_safetensors(tmp_path):
    hf = randomize_(hf_videomt())
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _outputs_match(VideomtForUniversalSegmentation.from_pretrained(tmp_path), hf, video())


def test_save_pretrained_round_trips_to_transformers(tmp_path):
    import transformers

    hf = randomize_(hf_videomt())
    ours = videomt_fast.from_transformers(hf)
    ours.save_pretrained(tmp_path)
    back = transformers.VideomtForUniversalSegmentation.from_pretrained(tmp_path).eval()
    _outputs_match(ours, back, video(frames=3))
    again = VideomtForUniversalSegmentation.from_pretrained(tmp_path)
    assert again.config == ours.config
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")], "temporary files left behind"


def test_research_checkpoint(tmp_path):
    hf = randomize_(hf_videomt(num_register_tokens=4, num_blocks=2, num_hidden_layers=4))
    hf.config.num_attention_heads = hf.config.hidden_size // 64  # research configs: head dim 64
    path = tmp_path / "yt_2019_vit_tiny.pth"
    torch.save({"model": to_research_keys(hf), "epoch": torch.tensor(3)}, path)
    model = VideomtForUniversalSegmentation.from_pretrained(path)
    assert model.config.num_queries == hf.config.num_queries
    assert model.config.num_labels == hf.config.num_labels
    assert model.config.image_size == hf.config.image_size
    # the research model runs with 1 head of 64 for hidden 64: compare with transformers at that head count
    import transformers

    same = transformers.VideomtForUniversalSegmentation(
        transformers.VideomtConfig(**{**hf.config.to_dict(), "num_attention_heads": 1})
    ).eval()
    same.load_state_dict(hf.state_dict())
    _outputs_match(model, same, video(frames=2))


def test_research_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        VideomtForUniversalSegmentation.from_pretrained(path)


class _Opaque:
    pass


def test_research_checkpoint_unknown_keys_named(tmp_path):
    hf = hf_videomt()
    state = to_research_keys(hf)
    state["backbone.something.new"] = torch.zeros(2)
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="something.new"):
        VideomtForUniversalSegmentation.from_pretrained(path)


def test_config_mismatch_names_keys(tmp_path):
    hf_videomt().save_pretrained(tmp_path)
    wrong = VideomtConfig(**{**json.load(open(tmp_path / "config.json")), "num_queries": 9})
    with pytest.raises(CheckpointError, match=r"query\.weight: checkpoint \(7, 64\) vs model \(9, 64\)"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path, config=wrong)


def test_config_json_mismatching_weights(tmp_path):
    hf_videomt().save_pretrained(tmp_path)
    data = json.load(open(tmp_path / "config.json"))
    data["num_hidden_layers"] = 5
    json.dump(data, open(tmp_path / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"missing keys .*layers\.4\."):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path, strict=True)


def test_missing_and_unexpected_keys_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_videomt().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["class_predictor.bias"]
    state["extra.head.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="class_predictor.bias") as info:
        VideomtForUniversalSegmentation.from_pretrained(tmp_path, strict=True)
    assert "extra.head.weight" in str(info.value)


def test_truncated_safetensors(tmp_path):
    hf_videomt().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path)
    hf_videomt().save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path / "absent.pth")


def test_missing_shard(tmp_path):
    hf_videomt().save_pretrained(tmp_path, max_shard_size="50KB")
    os.remove(sorted(tmp_path.glob("model-*.safetensors"))[0])
    with pytest.raises(FileNotFoundError, match="shard"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match="offline"):
        VideomtForUniversalSegmentation.from_pretrained("tue-mps/videomt-dinov2-small-ytvis2019")


def test_wrong_model_type(tmp_path):
    from helpers import hf_eomt

    hf_eomt().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type is 'eomt'"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path)


def test_config_matches_transformers_defaults():
    import transformers

    ours, theirs = VideomtConfig().to_dict(), transformers.VideomtConfig().to_dict()
    for key, value in ours.items():
        if key in theirs and key not in ("id2label", "label2id"):
            assert theirs[key] == value, key
    assert VideomtConfig().num_labels == transformers.VideomtConfig().num_labels


# ---------------------------------------------------------------------------------------------
# the research checkpoints' real key names and shapes, ViT-S (timm vit_small_patch14_reg4_dinov2 run at
# patch 16 and 640x640: 40x40 = 1600 patches, 4 registers, 12 blocks of width 384, qkv with bias,
# layer scale), written out from tue-mps/videomt (detectron2: `backbone.` = VidEoMT, `criterion.`) and
# tue-mps/eomt (Lightning: `network.` = EoMT, whose ViT wrapper keeps pixel_mean / pixel_std buffers)
# ---------------------------------------------------------------------------------------------

_VIT_S_BLOCK = [  # per block N of encoder.backbone.blocks.N
    ("norm1.weight", (384,)), ("norm1.bias", (384,)),
    ("attn.qkv.weight", (1152, 384)), ("attn.qkv.bias", (1152,)),
    ("attn.proj.weight", (384, 384)), ("attn.proj.bias", (384,)),
    ("ls1.gamma", (384,)),
    ("norm2.weight", (384,)), ("norm2.bias", (384,)),
    ("mlp.fc1.weight", (1536, 384)), ("mlp.fc1.bias", (1536,)),
    ("mlp.fc2.weight", (384, 1536)), ("mlp.fc2.bias", (384,)),
    ("ls2.gamma", (384,)),
]
_VIT_S_ENCODER = [
    ("encoder.backbone.cls_token", (1, 1, 384)),
    ("encoder.backbone.reg_token", (1, 4, 384)),
    ("encoder.backbone.pos_embed", (1, 1600, 384)),
    ("encoder.backbone.patch_embed.proj.weight", (384, 3, 16, 16)),
    ("encoder.backbone.patch_embed.proj.bias", (384,)),
    *[(f"encoder.backbone.blocks.{i}.{name}", shape) for i in range(12) for name, shape in _VIT_S_BLOCK],
    ("encoder.backbone.norm.weight", (384,)), ("encoder.backbone.norm.bias", (384,)),
]


def _vit_s_head(num_classes):
    return [
        ("attn_mask_probs", (3,)),  # num_blocks 3: blocks 9, 10, 11 see the queries
        ("q.weight", (200, 384)),
        ("class_head.weight", (num_classes + 1, 384)), ("class_head.bias", (num_classes + 1,)),
        *[(f"mask_head.{i}.{kind}", (384, 384) if kind == "weight" else (384,)) for i in (0, 2, 4) for kind in ("weight", "bias")],
        *[item for i in (0, 1) for item in (
            (f"upscale.{i}.conv1.weight", (384, 384, 2, 2)), (f"upscale.{i}.conv1.bias", (384,)),  # ConvTranspose2d
            (f"upscale.{i}.conv2.weight", (384, 1, 3, 3)),  # depthwise, no bias
            (f"upscale.{i}.norm.weight", (384,)), (f"upscale.{i}.norm.bias", (384,)))],
    ]


RESEARCH_VIT_S = {
    # tue-mps/videomt, configs/ytvis19/videomt/dinov2/vit-small: 40 classes, 200 queries, SEGMENTER_BLOCKS [9, 10, 11]
    "videomt_ytvis19": [*[("backbone." + k, s) for k, s in _VIT_S_ENCODER + _vit_s_head(40)],
                        ("backbone.query_updater.weight", (384, 384)), ("backbone.query_updater.bias", (384,)),
                        ("criterion.empty_weight", (41,))],
    # tue-mps/eomt, configs/dinov2/coco/panoptic/eomt_small_640: 133 classes, 200 queries, num_blocks 3
    "eomt_coco_panoptic": [*[("network." + k, s) for k, s in _VIT_S_ENCODER + _vit_s_head(133)],
                           ("network.encoder.pixel_mean", (1, 3, 1, 1)), ("network.encoder.pixel_std", (1, 3, 1, 1)),
                           ("criterion.empty_weight", (134,))],
}


@pytest.mark.parametrize("name", sorted(RESEARCH_VIT_S))
def test_research_vit_s_key_names_and_shapes(tmp_path, name):
    """A checkpoint with exactly the research code's keys and shapes loads into the right config, and each
    tensor lands where the transformers model keeps it (qkv fused as ours, pos_embed without its batch dim)."""
    from videomt_fast import EomtForUniversalSegmentation

    keys = RESEARCH_VIT_S[name]
    assert len(keys) == len({k for k, _ in keys}) == 198  # 5 + 12 x 14 + 2 encoder, 20 head, 3 more
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in keys}
    state[keys[0][0].split(".")[0] + ".attn_mask_probs"] = torch.zeros(3)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": state} if name.startswith("videomt") else {"state_dict": state}, path)
    cls = VideomtForUniversalSegmentation if name.startswith("videomt") else EomtForUniversalSegmentation
    model = cls.from_pretrained(path)
    cfg = model.config
    labels = 40 if name.startswith("videomt") else 133
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_register_tokens) == (384, 12, 6, 4)
    assert (cfg.patch_size, cfg.image_size, cfg.num_queries, cfg.num_labels, cfg.num_blocks) == (16, 640, 200, labels, 3)
    assert (cfg.mlp_ratio, cfg.use_swiglu_ffn, cfg.num_upscale_blocks) == (4, False, 2)
    ours = model.fused_state_dict()
    prefix = keys[0][0].split(".")[0] + "."
    expected = {
        "embeddings.cls_token": "encoder.backbone.cls_token",
        "embeddings.register_tokens": "encoder.backbone.reg_token",
        "layers.7.attention.qkv.weight": "encoder.backbone.blocks.7.attn.qkv.weight",
        "layers.11.attention.out_proj.bias": "encoder.backbone.blocks.11.attn.proj.bias",
        "layers.3.layer_scale2.lambda1": "encoder.backbone.blocks.3.ls2.gamma",
        "layernorm.weight": "encoder.backbone.norm.weight",
        "query.weight": "q.weight",
        "class_predictor.weight": "class_head.weight",
        "mask_head.fc3.bias": "mask_head.4.bias",
        "upscale_block.block.1.conv1.weight": "upscale.1.conv1.weight",
        "upscale_block.block.0.layernorm2d.bias": "upscale.0.norm.bias",
        "attn_mask_probs": "attn_mask_probs",
    }
    if name.startswith("videomt"):
        expected["query_updater.weight"] = "query_updater.weight"
    for mine, research in expected.items():
        assert torch.equal(ours[mine], state[prefix + research]), (mine, research)
    assert torch.equal(ours["embeddings.position_embeddings.weight"], state[prefix + "encoder.backbone.pos_embed"][0])
