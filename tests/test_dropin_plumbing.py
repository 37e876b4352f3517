"""The plumbing users' tools touch, for VidEoMT, EoMT and EoMT-DINOv3 alike: ``state_dict()`` with
transformers' key names (loadable by transformers, strict), loading info, the PreTrainedConfig attributes,
the attention switch, ``init_weights()``, the input-grad hooks and the training-only refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

import videomt_fast

from helpers import assert_outputs_close, hf_eomt, hf_eomt_dinov3, hf_videomt, images, randomize_, video

transformers = pytest.importorskip("transformers")

FAMILIES = {"videomt": hf_videomt, "eomt": hf_eomt, "eomt_dinov3": hf_eomt_dinov3}


def _inputs(family):
    return {"pixel_values_videos": video(1, 2)} if family == "videomt" else {"pixel_values": images(2, 48)}


@pytest.fixture(params=sorted(FAMILIES))
def pair(request):
    hf = randomize_(FAMILIES[request.param](), seed=5)
    return request.param, hf, videomt_fast.from_transformers(hf)


def test_state_dict_has_transformers_names_and_loads_into_transformers_strictly(pair):
    family, hf, ours = pair
    state = ours.state_dict()
    theirs = hf.state_dict()
    assert set(state) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(state[key], value), key
    fresh = type(hf)(hf.config).eval()
    fresh.load_state_dict(state, strict=True)
    again = type(ours)(ours.config)
    again.load_state_dict(state, strict=True)  # and back into ours
    kwargs = _inputs(family)
    with torch.no_grad():
        assert_outputs_close(fresh(**kwargs), hf(**kwargs), atol=0.0)
        assert_outputs_close(again(**kwargs), ours(**kwargs), atol=0.0)
    # fused storage stays inside: the q/k/v entries are views of it, not copies
    qkv = ours.layers[0].attention.qkv.weight
    assert state["layers.0.attention.q_proj.weight"].data_ptr() == qkv.data_ptr()
    assert set(ours.fused_state_dict()) == {k for k, _ in ours.named_parameters()} | {"attn_mask_probs"}


def test_safetensors_round_trip_through_transformers_loaders(pair, tmp_path):
    from safetensors.torch import save_file

    family, hf, ours = pair
    hf.config.save_pretrained(tmp_path)
    save_file(ours.state_dict(), os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
    loaded, info = type(hf).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    kwargs = _inputs(family)
    with torch.no_grad():
        assert_outputs_close(loaded.eval()(**kwargs), hf(**kwargs), atol=0.0)


def test_loading_info_names_keys_the_model_has(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    family, hf, ours = pair
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["layers.0.attention.k_proj.weight"], state["layers.1.norm1.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.warns(videomt_fast.model.loading.LoadingWarning):
        model, info = type(ours).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] <= set(model.state_dict())
    assert {"layers.0.attention.k_proj.weight", "layers.1.norm1.bias"} <= info["missing_keys"]


def test_pretrained_config_attributes(pair, tmp_path):
    family, hf, ours = pair
    config = ours.config
    for name, default in (("architectures", None), ("dtype", None), ("chunk_size_feed_forward", 0),
                          ("problem_type", None), ("name_or_path", "")):
        assert getattr(config, name) == default, name
    config.dtype = torch.float16
    assert config.dtype == "float16" and config.to_dict()["dtype"] == "float16"
    config.dtype = None
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["architectures"] == [type(ours).__name__] and data["dtype"] == "float32"
    back = type(config).from_pretrained(tmp_path)
    assert back.architectures == [type(ours).__name__] and back.dtype == "float32"
    theirs = type(hf.config).from_pretrained(tmp_path)
    assert theirs.architectures == [type(ours).__name__]


def test_attention_switch(pair):
    family, hf, ours = pair
    assert ours._supports_sdpa and ours._can_set_attn_implementation()
    assert ours.config._attn_implementation == "sdpa"
    kwargs = _inputs(family)
    with torch.no_grad():
        ref = ours(**kwargs)
        ours.set_attn_implementation("eager")
        assert ours.config._attn_implementation == "eager"
        assert_outputs_close(ours(**kwargs), ref, atol=0.0)
    with pytest.raises(ValueError, match='attn_implementation="foo"'):
        ours.set_attn_implementation("foo")
    assert ours.config._attn_implementation == "eager"
    hf.config._attn_implementation = "eager"
    assert videomt_fast.from_transformers(hf).config._attn_implementation == "eager"
    assert "_attn_implementation" not in ours.config.to_dict()


def test_init_weights_after_to_empty(pair):
    family, hf, ours = pair
    with torch.device("meta"):
        model = type(ours)(ours.config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.attn_mask_probs.tolist() == [1.0] * ours.config.num_blocks
    assert torch.equal(model.layers[0].norm1.weight, torch.ones_like(model.layers[0].norm1.weight))
    assert torch.all(model.layers[0].layer_scale1.lambda1 == ours.config.layerscale_value)
    assert all(torch.isfinite(t).all() for t in model.fused_state_dict().values())
    with torch.no_grad():
        out = model(**_inputs(family))
    assert torch.isfinite(out.masks_queries_logits).all()


def test_input_require_grads_and_training_only_refusals(pair):
    family, _, ours = pair
    for p in ours.parameters():
        p.requires_grad_(False)
    seen = []
    ours.enable_input_require_grads()
    ours.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))  # runs after
    ours(**_inputs(family))
    ours.disable_input_require_grads()
    ours(**_inputs(family))
    assert seen == [True, False]
    for name in ("resize_token_embeddings", "add_adapter", "load_adapter"):
        with pytest.raises(NotImplementedError, match="training API"):
            getattr(ours, name)()


def test_a_nonzero_bias_part_transformers_cannot_hold_is_an_error():
    ours = videomt_fast.from_transformers(hf_eomt_dinov3())  # key_bias=False: the fused k part is zero
    with torch.no_grad():
        ours.layers[1].attention.qkv.bias[ours.config.hidden_size] = 1.0
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.qkv\.bias: the k part"):
        ours.state_dict()
    assert "layers.1.attention.qkv.bias" in ours.fused_state_dict()
