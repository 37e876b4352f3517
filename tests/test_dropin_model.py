"""The model side of the drop-in, judged against transformers itself (tiny random models, CPU): configs,
ModelOutput behaviour, hidden states and attention maps, from_pretrained arguments, checkpoint files
users have, patch_transformers() pass-through, and the training-only refusals."""

import json
import os
import pickle
import warnings

import pytest
import torch

import videomt_fast
from videomt_fast import EomtForUniversalSegmentation, VideomtConfig, VideomtForUniversalSegmentation
from videomt_fast.model.loading import CheckpointError, LoadingWarning

from helpers import TINY, hf_eomt, hf_eomt_dinov3, hf_videomt, max_abs, randomize_, to_research_keys, video

transformers = pytest.importorskip("transformers")


def _same_outputs(ours, ref, tol=1e-4):
    assert max_abs(ours.masks_queries_logits, ref.masks_queries_logits) <= tol
    assert max_abs(ours.class_queries_logits, ref.class_queries_logits) <= tol


# ------------------------------------------------------------------ configs (item 1)


def test_transformers_config_builds_and_loads(tmp_path):
    hf = randomize_(hf_videomt())
    hf.save_pretrained(tmp_path)
    model = VideomtForUniversalSegmentation(hf.config)  # was: TypeError "needs a VideomtConfig, got VideomtConfig"
    assert isinstance(model.config, VideomtConfig) and model.config.num_queries == TINY["num_queries"]
    loaded = VideomtForUniversalSegmentation.from_pretrained(tmp_path, config=hf.config)
    x = video()
    with torch.no_grad():
        _same_outputs(loaded(pixel_values_videos=x), hf(pixel_values_videos=x))
    with pytest.raises(TypeError, match="needs a VideomtConfig"):
        VideomtForUniversalSegmentation(transformers.EomtConfig(**TINY))


def test_num_labels_keeps_label_maps_consistent():
    ours, theirs = VideomtConfig(num_labels=3), transformers.VideomtConfig(num_labels=3)
    ours.num_labels = theirs.num_labels = 7
    assert ours.id2label == theirs.id2label and ours.label2id == theirs.label2id


@pytest.mark.parametrize("flag", ["return_dict", "output_hidden_states"])
def test_config_switches_are_honoured(flag):
    hf = randomize_(hf_videomt())
    setattr(hf.config, flag, not getattr(hf.config, flag))
    ours = videomt_fast.from_transformers(hf)
    assert getattr(ours.config, flag) == getattr(hf.config, flag)
    x = video()
    with torch.no_grad():
        a, b = ours(pixel_values_videos=x), hf(pixel_values_videos=x)
    assert type(a) is tuple if flag == "return_dict" else a.hidden_states is not None
    assert len(a) == len(b)


# ------------------------------------------------------------------ outputs (item 2)


def test_output_is_model_output_like():
    ours = videomt_fast.from_transformers(randomize_(hf_videomt()))
    with torch.no_grad():
        out = ours(pixel_values_videos=video())
    assert list(out.keys()) == ["class_queries_logits", "masks_queries_logits", "last_hidden_state"]
    assert out[0] is out.class_queries_logits is out["class_queries_logits"]
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 3 and torch.utils._pytree.tree_unflatten(leaves, spec).keys() == out.keys()
    out["target_size"] = (48, 48)  # transformers' pipeline does this
    assert out.target_size == (48, 48)
    assert isinstance(out, transformers.utils.ModelOutput)  # pipelines test this, else make a plain dict
    back = pickle.loads(pickle.dumps(out))
    assert torch.equal(back.masks_queries_logits, out.masks_queries_logits)
    with torch.no_grad():
        classes, masks, last = ours(pixel_values_videos=video(), return_dict=False)
    assert torch.equal(masks, out.masks_queries_logits) and torch.equal(last, out.last_hidden_state)


def test_torch_export():
    for hf, kwargs in ((hf_videomt(), {"pixel_values_videos": video()}), (hf_eomt(), {"pixel_values": video()[:, 0]})):
        ours = videomt_fast.from_transformers(randomize_(hf))
        program = torch.export.export(ours, (), kwargs, strict=False)
        with torch.no_grad():
            _same_outputs(program.module()(**kwargs), ours(**kwargs), tol=1e-5)


@pytest.mark.parametrize("make,seed", [(hf_eomt, 0), (hf_eomt_dinov3, 8)], ids=["eomt", "eomt_dinov3"])
def test_image_segmentation_pipeline(make, seed):
    """transformers' EoMT image processor and pipeline take our EoMT and EoMT-DINOv3 unchanged (seeds whose
    random weights leave segments in the panoptic result)."""
    import numpy as np
    from PIL import Image

    hf = randomize_(make(), seed=seed)
    ours = videomt_fast.from_transformers(hf)
    processor = transformers.EomtImageProcessorPil(
        size={"shortest_edge": 48, "longest_edge": 48}, do_split_image=False, do_pad=True
    )
    image = Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8"))
    results = []
    for model in (hf, ours):
        segmenter = transformers.pipeline("image-segmentation", model=model, image_processor=processor)
        results.append(segmenter(image, subtask="panoptic", threshold=0.0))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results):
        assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-4
        assert np.array_equal(np.array(a["mask"]), np.array(b["mask"]))


# ------------------------------------------------------------------ hidden states and attention maps (item 3)


@pytest.mark.parametrize("kind", ["videomt", "eomt"])
def test_hidden_states_and_attentions_match_transformers_eager(kind):
    hf = randomize_(hf_videomt() if kind == "videomt" else hf_eomt())  # EoMT: masked attention on (probs 1)
    hf.config._attn_implementation = "eager"  # transformers returns attention maps only from eager attention
    ours = videomt_fast.from_transformers(hf)
    kwargs = {"pixel_values_videos": video(frames=3)} if kind == "videomt" else {"pixel_values": video(batch=2)[:, 0]}
    with torch.no_grad():
        a = ours(**kwargs, output_hidden_states=True, output_attentions=True)
        b = hf(**kwargs, output_hidden_states=True, output_attentions=True)
        selected = ours(**kwargs, output_hidden_states=[0, -1])
        selected_ref = hf(**kwargs, output_hidden_states=[0, -1])
    _same_outputs(a, b)
    assert len(a.hidden_states) == len(b.hidden_states) > 2
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert max_abs(x, y) < 1e-4
    assert len(a.attentions) == len(b.attentions) > 2
    for x, y in zip(a.attentions, b.attentions):
        assert max_abs(x, y) < 1e-5
    if len(selected_ref.hidden_states) != len(b.hidden_states):
        pytest.skip(f"transformers {transformers.__version__} returns {len(selected_ref.hidden_states)} hidden states "
                    f"for output_hidden_states=[0, -1] but {len(b.hidden_states)} for True (its index selection drops "
                    "the last layer's): the oracle is inconsistent with itself, nothing to compare the selection with")
    assert [h is None for h in selected.hidden_states] == [h is None for h in selected_ref.hidden_states]


# ------------------------------------------------------------------ from_pretrained arguments (item 4)


def test_output_loading_info_and_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = randomize_(hf_eomt())
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["class_predictor.bias"], state["layers.0.attention.q_proj.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    _, ref = transformers.EomtForUniversalSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    with pytest.warns(LoadingWarning, match=r"class_predictor\.bias"):
        model, info = EomtForUniversalSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == ref["missing_keys"]
    assert info["unexpected_keys"] == ref["unexpected_keys"]
    attention = hf.layers[0].attention  # the present k/v rows are loaded beside the initialised q rows
    assert torch.equal(model.layers[0].attention.qkv.weight[64:], torch.cat([attention.k_proj.weight, attention.v_proj.weight]))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight"):
        EomtForUniversalSegmentation.from_pretrained(tmp_path, strict=True)


def test_num_labels_reheading(tmp_path):
    hf_eomt().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        EomtForUniversalSegmentation.from_pretrained(tmp_path, num_labels=3)
    _, ref = transformers.EomtForUniversalSegmentation.from_pretrained(
        tmp_path, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
    )
    with pytest.warns(LoadingWarning, match="shape did not match"):
        model, info = EomtForUniversalSegmentation.from_pretrained(
            tmp_path, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert model.class_predictor.out_features == 4 and model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert {k for k, *_ in info["mismatched_keys"]} == {k for k, *_ in ref["mismatched_keys"]} - {"criterion.empty_weight"}
    model.config.num_labels = 9  # a built model is not re-headed by its config: refused at the next call
    with pytest.raises(ValueError, match="does not re-head a built model"):
        model(pixel_values=video()[:, 0])


def test_loader_arguments(tmp_path):
    hf = randomize_(hf_videomt())
    hf.save_pretrained(tmp_path / "sub")
    x = video()
    with torch.no_grad():
        ref = hf(pixel_values_videos=x)
    for kwargs in (
        {"subfolder": "sub", "device_map": "auto", "attn_implementation": "eager"},
        {"subfolder": "sub", "device_map": {"": "cpu"}, "torch_dtype": torch.float32},
        {"subfolder": "sub", "device_map": "cpu", "output_hidden_states": True},
    ):
        model = VideomtForUniversalSegmentation.from_pretrained(tmp_path, **kwargs)
        assert model.device.type == "cpu" and model.dtype == torch.float32
        with torch.no_grad():
            _same_outputs(model(pixel_values_videos=x), ref)
    assert model.config.output_hidden_states is True
    with pytest.raises(ValueError, match="one device"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path / "sub", device_map={"a": "cpu", "b": "cuda:0"})
    with pytest.raises(TypeError, match="bogus_option"):
        VideomtForUniversalSegmentation.from_pretrained(tmp_path / "sub", bogus_option=1)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    model = VideomtForUniversalSegmentation.from_pretrained(None, config=hf.config, state_dict=state)
    with torch.no_grad():
        _same_outputs(model(pixel_values_videos=x), ref)


# ------------------------------------------------------------------ checkpoint files users have (item 5)


def test_pytorch_model_bin(tmp_path):
    hf = randomize_(hf_eomt())
    hf.save_pretrained(tmp_path, safe_serialization=False) if _bin_supported() else _save_bin(hf, tmp_path)
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    model = EomtForUniversalSegmentation.from_pretrained(tmp_path)
    x = video()[:, 0]
    with torch.no_grad():
        _same_outputs(model(pixel_values=x), hf(pixel_values=x))


def _bin_supported() -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def _save_bin(hf, directory):
    hf.config.save_pretrained(directory)
    torch.save(hf.state_dict(), directory / "pytorch_model.bin")


def test_research_style_folder(tmp_path):
    hf = randomize_(hf_videomt())
    hf.config.num_attention_heads = 1  # research configs: head dim 64
    torch.save(to_research_keys(hf), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"num_classes": 5, "img_size": 48}))  # research fields
    model = VideomtForUniversalSegmentation.from_pretrained(tmp_path)
    same = transformers.VideomtForUniversalSegmentation(transformers.VideomtConfig(**{**TINY, "num_attention_heads": 1}))
    same.load_state_dict(hf.state_dict())
    x = video()
    with torch.no_grad():
        _same_outputs(model(pixel_values_videos=x), same.eval()(pixel_values_videos=x))


def test_packed_swiglu_fc1_is_split(tmp_path):
    """DINOv2-giant's packed SwiGLU: ``mlp.fc1`` (2h x d) = [gate | up], ``mlp.fc2`` = down."""
    hf = randomize_(hf_eomt(use_swiglu_ffn=True))
    state = {}
    for key, value in hf.state_dict().items():
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            up = hf.state_dict()[key.replace("gate_proj", "up_proj")]
            state[key.replace("gate_proj", "fc1")] = torch.cat([value, up])
        else:
            state[key.replace("down_proj", "fc2")] = value
    hf.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model = EomtForUniversalSegmentation.from_pretrained(tmp_path, strict=True)
    x = video()[:, 0]
    with torch.no_grad():
        _same_outputs(model(pixel_values=x), hf(pixel_values=x))


def test_swiglu_names_of_transformers_before_5_2x_load():
    """transformers 5.17 names DINOv2's SwiGLU ``mlp.weights_in`` ([gate | up] packed) and ``mlp.weights_out``
    (5.25: ``gate_proj`` / ``up_proj`` / ``down_proj``): both layouts load, whichever transformers is installed."""
    ours = videomt_fast.VideomtForUniversalSegmentation(videomt_fast.VideomtConfig(**TINY, use_swiglu_ffn=True))
    randomize_(ours)
    state = ours.state_dict()
    old = {}
    for key, value in state.items():
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            old[key.replace("gate_proj", "weights_in")] = torch.cat([value, state[key.replace("gate_proj", "up_proj")]])
        else:
            old[key.replace("down_proj", "weights_out")] = value
    assert any(".mlp.weights_in." in k for k in old)
    x = video()
    loaded = VideomtForUniversalSegmentation.from_pretrained(None, config=ours.config, state_dict=old, strict=True)
    again = VideomtForUniversalSegmentation(ours.config)
    again.load_state_dict(old)
    with torch.no_grad():
        for model in (loaded, again):
            _same_outputs(model(pixel_values_videos=x), ours(pixel_values_videos=x), tol=0.0)


# ------------------------------------------------------------------ patch_transformers() (item 6)


def test_patch_passes_every_argument(tmp_path):
    hf = randomize_(hf_videomt())
    hf.save_pretrained(tmp_path / "sub")
    with videomt_fast.patch_transformers():
        model, info = transformers.VideomtForUniversalSegmentation.from_pretrained(
            pretrained_model_name_or_path=tmp_path, subfolder="sub", output_hidden_states=True,
            output_loading_info=True,
        )
        auto = transformers.AutoModelForUniversalSegmentation.from_pretrained(
            pretrained_model_name_or_path=tmp_path / "sub", config=hf.config, num_labels=5
        )
        with pytest.warns(LoadingWarning):
            relabelled = transformers.VideomtForUniversalSegmentation.from_pretrained(
                tmp_path / "sub", id2label={0: "a", 1: "b"}, ignore_mismatched_sizes=True
            )
    assert isinstance(model, VideomtForUniversalSegmentation) and model.config.output_hidden_states is True
    assert info["missing_keys"] == set()
    assert isinstance(auto, VideomtForUniversalSegmentation)
    assert relabelled.config.id2label == {0: "a", 1: "b"} and relabelled.class_predictor.out_features == 3


# ------------------------------------------------------------------ training-only: loud, never silent


def test_training_only_calls_refused():
    model = videomt_fast.from_transformers(hf_videomt())
    assert model.supports_gradient_checkpointing is False
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="inference-only"):
        model(pixel_values_videos=video(), mask_labels=[torch.zeros(1, 48, 48)], class_labels=[torch.zeros(1)])
    with pytest.raises(TypeError, match="labels"):
        model(pixel_values_videos=video(), labels=torch.zeros(1))


def test_save_pretrained_honours_umask(tmp_path):
    model = videomt_fast.from_transformers(hf_videomt())
    old = os.umask(0o027)
    try:
        model.save_pretrained(tmp_path / "a")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o640, name


def test_no_warning_for_complete_checkpoints(tmp_path):
    hf_videomt().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoadingWarning)
        VideomtForUniversalSegmentation.from_pretrained(tmp_path)


def test_model_and_config_surface_matches_transformers():
    hf = hf_videomt()
    ours = videomt_fast.from_transformers(hf)
    assert ours.can_generate() is hf.can_generate() is False
    assert ours.num_parameters() == hf.num_parameters()
    assert type(ours.get_input_embeddings()).__name__.endswith("PatchEmbeddings")
    assert ours.get_output_embeddings() is None
    fresh = VideomtForUniversalSegmentation._from_config(hf.config, dtype=torch.float64)
    assert fresh.dtype == torch.float64 and fresh.config.num_queries == hf.config.num_queries
    diff = ours.config.to_diff_dict()
    assert diff["model_type"] == "videomt" and diff["hidden_size"] == 64 and "patch_size" not in diff
    assert ours.config.is_encoder_decoder is False and ours.config.get_text_config() is ours.config


def test_load_state_dict_takes_transformers_names():
    hf = randomize_(hf_eomt())
    ours = videomt_fast.from_transformers(hf_eomt())
    result = ours.load_state_dict(hf.state_dict())  # q/k/v_proj fused on the way in, criterion.* dropped
    assert not result.missing_keys and not result.unexpected_keys
    x = video()[:, 0]
    with torch.no_grad():
        _same_outputs(ours(pixel_values=x), hf(pixel_values=x), tol=1e-5)
    ours.load_state_dict(ours.state_dict())  # our own names still load
