"""ONNX export (videomt_fast.export): every graph passes onnx.checker and runs on ONNX Runtime with
PyTorch's results: the step graph frame by frame over a 20-frame video with its state outside the graph,
the clip graph at two clip lengths and two frame sizes, EoMT with masked attention inside the graph,
the fp16 graphs within the plans' fp16 rule; misuse raises a named error. Each model-level test runs on
both backbones: DINOv2 (VidEoMT, EoMT) and DINOv3 (VidEoMT-DINOv3 with the gated MLP and norm_queries,
EoMT-DINOv3), the rotary tables following the frame size inside a dynamic graph. Tiny models, CPU only."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from helpers import TINY, TINY_DINOV3, max_abs, randomize_

onnx = pytest.importorskip("onnx", reason="needs onnx (the test extra)")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (the test extra)")

from videomt_fast import (EomtConfig, EomtDinov3Config, EomtDinov3ForUniversalSegmentation,  # noqa: E402
                          EomtForUniversalSegmentation, VideomtConfig, VideomtForUniversalSegmentation)
from videomt_fast.export import ExportError, FrameSizeError, StateError, export, load  # noqa: E402
from videomt_fast.runtime import plans  # noqa: E402

ATOL = 1e-4
SIZES = [(48, 48), (32, 64)]  # the config's size (48) and one whose grid is resized in the graph


def _dynamo():
    pytest.importorskip("onnxscript", reason="needs onnxscript (the test extra): torch's dynamo exporter")


def _dynamic() -> bool:
    """Whether exports here make height and width dynamic (torch's dynamo exporter, with onnxscript); without
    onnxscript the TorchScript exporter writes one graph per size, and the same tests run on those."""
    from videomt_fast.export.exporter import resolve_exporter

    return resolve_exporter() == "dynamo"


BACKBONES = ("dinov2", "dinov3")


def _video_model(seed=0, backbone="dinov2"):
    if backbone == "dinov3":  # rotary attention, the gated MLP and normalized carried queries
        config = VideomtConfig(**TINY_DINOV3, backbone_type="dinov3", use_gated_mlp=True, norm_queries=True)
    else:
        config = VideomtConfig(**TINY)
    return randomize_(VideomtForUniversalSegmentation(config), seed).eval()


def _eomt_model(seed=1, backbone="dinov2"):
    if backbone == "dinov3":
        return randomize_(EomtDinov3ForUniversalSegmentation(EomtDinov3Config(**TINY_DINOV3)), seed).eval()
    return randomize_(EomtForUniversalSegmentation(EomtConfig(**TINY)), seed).eval()


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request):
    """The backbone of the module's exports (one parameter for all of them, so each export is made once per
    backbone)."""
    return request.param


@pytest.fixture(scope="module")
def video_export(tmp_path_factory, backbone):
    model = _video_model(backbone=backbone)
    out = tmp_path_factory.mktemp("onnx") / f"videomt-{backbone}"
    sidecar = model.export(out, dtypes=["float32", "float16"], sizes=SIZES, verify=False)
    return model, out, sidecar


@pytest.fixture(scope="module")
def eomt_export(tmp_path_factory, backbone):
    model = _eomt_model(backbone=backbone)
    assert model.attn_mask_probs.tolist() == [1.0, 1.0]  # masked attention on in both query layers
    out = tmp_path_factory.mktemp("onnx") / f"eomt-{backbone}"
    sidecar = export(model, out, sizes=SIZES, verify=True)
    return model, out, sidecar


@pytest.fixture(scope="module")
def fixed_export(tmp_path_factory, backbone):
    """The TorchScript exporter (what runs where onnxscript is missing): one graph per listed size."""
    model = _video_model(seed=2, backbone=backbone)
    out = tmp_path_factory.mktemp("onnx") / f"fixed-{backbone}"
    sidecar = export(model, out, graphs_=["step"], sizes=[(32, 64)], exporter="torchscript", verify=False)
    return model, out, sidecar


def _frames(n, size, batch=1, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, 3, *size, generator=gen)


def test_the_test_extra_exports_dynamic_sizes():
    """onnxscript is in the test extra: there, height and width are dynamic (elsewhere the tests below run on
    the TorchScript exporter's fixed-size graphs)."""
    _dynamo()
    assert _dynamic()


def test_every_graph_passes_the_checker(video_export, eomt_export, fixed_export):
    seen = 0
    for _, folder, sidecar in (video_export, eomt_export, fixed_export):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".onnx"))
        assert files == sorted(g["file"] for g in sidecar["graphs"])
        for name in files:
            onnx.checker.check_model(onnx.load(os.path.join(folder, name)), full_check=True)
            seen += 1
    assert seen == (4 + 1 if _dynamic() else 8 + 2) + 1


def test_sidecar_names_every_input_and_output(video_export):
    _, folder, sidecar = video_export
    with open(os.path.join(folder, "export.json"), encoding="utf-8") as fh:
        assert json.load(fh) == json.loads(json.dumps(sidecar))
    if _dynamic():
        assert sidecar["frame_sizes"]["dynamic"] is True and sidecar["frame_sizes"]["multiple_of"] == [16, 16]
    else:
        assert sidecar["frame_sizes"] == {**sidecar["frame_sizes"], "dynamic": False, "sizes": ["48x48", "32x64"]}
    positions = sidecar["frame_sizes"]["position_embeddings"]
    dinov3 = sidecar["model"]["config"].get("backbone_type") == "dinov3"
    assert ("rotary" in positions) == dinov3
    assert ("inside the graph" in positions) == _dynamic() and ("stored" in positions) == (not _dynamic())
    assert sidecar["normalization"]["mean"] == [0.485, 0.456, 0.406]
    for entry in sidecar["graphs"]:
        graph = onnx.load(os.path.join(folder, entry["file"])).graph
        for values, docs in ((graph.input, entry["inputs"]), (graph.output, entry["outputs"])):
            assert [v.name for v in values] == [d["name"] for d in docs]
            for value, doc in zip(values, docs):
                dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
                assert doc["dtype"] == dtype and doc["doc"]
                assert len(doc["shape"]) == len(value.type.tensor_type.shape.dim)
        assert bool(entry["fp32_inside"]) == (entry["dtype"] == "float16")
        if entry["fp32_inside"]:
            assert any("rotary" in line for line in entry["fp32_inside"]) == dinov3
    step = next(g for g in sidecar["graphs"] if g["graph"] == "step" and g["dtype"] == "float32")
    assert [d["name"] for d in step["inputs"]] == ["frames", "queries", "first"]
    assert step["inputs"][0]["shape"] == ["batch", 3, "height", "width"] if _dynamic() else ["batch", 3, 48, 48]
    assert step["inputs"][1]["shape"] == ["batch", TINY["num_queries"], TINY["hidden_size"]]
    assert "first" in step["first_frame"]


@pytest.mark.parametrize("size", SIZES)
def test_step_graph_follows_a_session_over_20_frames(video_export, size):
    model, folder, _ = video_export
    clip = _frames(20, size)
    ours, theirs = model.new_session(1), load(folder).new_session(1)
    worst = {"classes": 0.0, "masks": 0.0, "queries": 0.0}
    with torch.inference_mode():
        for t in range(20):
            a, b = ours.step(clip[:, t]), theirs.step(clip[:, t])
            assert isinstance(b.masks_queries_logits, torch.Tensor)
            worst["classes"] = max(worst["classes"], max_abs(b.class_queries_logits, a.class_queries_logits))
            worst["masks"] = max(worst["masks"], max_abs(b.masks_queries_logits, a.masks_queries_logits))
            worst["queries"] = max(worst["queries"], max_abs(theirs.propagated_queries, ours.propagated_queries))
    assert theirs.frame_index == 20
    assert all(v <= ATOL for v in worst.values()), worst


def test_state_is_the_callers_and_each_row_starts_its_own_video(video_export):
    """Row 0 starts a video on the third frame while row 1 goes on: the same as two sessions."""
    model, folder, _ = video_export
    runner = load(folder)
    clip = _frames(4, (32, 64), batch=2)
    with torch.inference_mode():
        sessions = [model.new_session(1), model.new_session(1)]
        queries = np.zeros((2, TINY["num_queries"], TINY["hidden_size"]), np.float32)
        for t in range(4):
            first = np.array([t in (0, 2), t == 0])
            if t == 2:
                sessions[0].reset()
            classes, masks, queries = runner.step(clip[:, t].numpy(), queries, first)
            assert isinstance(masks, np.ndarray)
            for row, session in enumerate(sessions):
                ref = session.step(clip[row : row + 1, t])
                assert max_abs(torch.from_numpy(masks[row : row + 1]), ref.masks_queries_logits) <= ATOL
                assert max_abs(torch.from_numpy(queries[row : row + 1]), session.propagated_queries) <= ATOL


@pytest.mark.parametrize("num_frames", [1, 5])
@pytest.mark.parametrize("size", SIZES)
def test_clip_graph_equals_the_clip_forward(video_export, num_frames, size):
    model, folder, _ = video_export
    clip = _frames(num_frames, size, batch=2, seed=7)
    with torch.inference_mode():
        ref = model(pixel_values_videos=clip)
    out = load(folder)(pixel_values_videos=clip)
    assert out.masks_queries_logits.shape == ref.masks_queries_logits.shape == (2 * num_frames, TINY["num_queries"],
                                                                                size[0] // 4, size[1] // 4)
    assert max_abs(out.class_queries_logits, ref.class_queries_logits) <= ATOL
    assert max_abs(out.masks_queries_logits, ref.masks_queries_logits) <= ATOL


@pytest.mark.parametrize("size", SIZES)
def test_eomt_image_graph_with_masked_attention(eomt_export, size):
    model, folder, sidecar = eomt_export
    assert sidecar["graphs"][0]["attn_mask_probs"] == [1.0, 1.0]
    images = _frames(1, size, batch=3, seed=11)[0]
    with torch.inference_mode():
        ref = model(pixel_values=images)
        model.attn_mask_probs.fill_(0.0)
        try:
            unmasked = model(pixel_values=images)
        finally:
            model.attn_mask_probs.fill_(1.0)
    out = load(folder)(pixel_values=images)
    assert max_abs(out.class_queries_logits, ref.class_queries_logits) <= ATOL
    assert max_abs(out.masks_queries_logits, ref.masks_queries_logits) <= ATOL
    assert max_abs(unmasked.masks_queries_logits, ref.masks_queries_logits) > 100 * ATOL  # the masks matter here
    verified = [v for v in sidecar["verified"] if v["size"] == f"{size[0]}x{size[1]}"]
    assert verified and max(verified[0]["max_abs_err"].values()) <= ATOL


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), b.double()
    return float((a - b).norm() / b.norm())


def test_fp16_graphs_meet_the_plans_fp16_rule(video_export):
    """Relative error against float64 at most FACTOR x PyTorch's own fp16 error + FLOOR (plans.tolerance),
    per output, on a later frame and a clip."""
    model, folder, _ = video_export
    clip = _frames(3, (32, 64), seed=13)
    with torch.inference_mode():
        truth = copy.deepcopy(model).double()(pixel_values_videos=clip.double())
        half = copy.deepcopy(model).half()(pixel_values_videos=clip.half())
    ours = load(folder, dtype="float16")(pixel_values_videos=clip)
    for field in ("class_queries_logits", "masks_queries_logits"):
        ref_err = _rel(getattr(half, field), getattr(truth, field))
        ort_err = _rel(getattr(ours, field), getattr(truth, field))
        assert np.isfinite(ort_err) and ort_err <= plans.tolerance(torch.float16, ref_err), (field, ort_err, ref_err)


def test_fp16_graph_keeps_attention_and_norm_statistics_in_fp32(video_export):
    """... and, with DINOv3, the rotary rotation of q and k (rotate_half's negation, once per layer)."""
    torch_model, folder, sidecar = video_export
    name = next(g["file"] for g in sidecar["graphs"] if g["graph"] == "step" and g["dtype"] == "float16")
    model = onnx.shape_inference.infer_shapes(onnx.load(os.path.join(folder, name)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert softmax and norms
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in softmax)
    for n in norms:  # float32 input, or half input with float32 statistics (stash_type 1, the default)
        stash = next((a.i for a in n.attribute if a.name == "stash_type"), 1)
        assert types[n.input[0]] == onnx.TensorProto.FLOAT or stash == 1
    assert any(types.get(n.input[0]) == onnx.TensorProto.FLOAT16 for n in matmuls)  # the rest is fp16
    negations = [n for n in model.graph.node if n.op_type == "Neg"]
    if torch_model.config.backbone_family == "dinov3":
        assert len(negations) == torch_model.config.num_hidden_layers
        assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in negations)
        tables = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
        assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in tables)
        assert bool(tables) == _dynamic()  # computed in the graph from the frame size, or stored per size
    else:
        assert not negations


def test_export_table_rotation_equals_the_reference():
    """The export table's rotary rotation (tables padded to every row, no symbolic slice) gives the
    reference's values exactly, float32 and float16, the rows before the patches untouched."""
    from videomt_fast.export.graphs import ExportTable
    from videomt_fast.model.modeling import RotaryTable
    from videomt_fast.ops.reference import rotate_patch_rows

    gen = torch.Generator().manual_seed(3)
    rotary = RotaryTable(VideomtConfig(**TINY_DINOV3, backbone_type="dinov3"))
    for dtype in (torch.float32, torch.float16):
        for grid, prefix in (((3, 5), 12), ((2, 2), 5)):
            cos, sin = rotary.tables(grid, torch.device("cpu"))
            qkv = torch.randn(2, prefix + grid[0] * grid[1], 3 * TINY_DINOV3["hidden_size"], generator=gen).to(dtype)
            ours = ExportTable._rotate(qkv, TINY_DINOV3["num_attention_heads"], cos, sin)
            ref = rotate_patch_rows(qkv, TINY_DINOV3["num_attention_heads"], cos, sin)
            assert ours.dtype == dtype and torch.equal(ours, ref)
            assert torch.equal(ours[:, :prefix], qkv[:, :prefix])


def test_fixed_size_export_with_the_torchscript_exporter(fixed_export):
    model, folder, sidecar = fixed_export
    assert sidecar["frame_sizes"]["dynamic"] is False and sidecar["frame_sizes"]["sizes"] == ["32x64"]
    assert [g["file"] for g in sidecar["graphs"]] == ["step-fp32-32x64.onnx"]
    graph = onnx.load(os.path.join(folder, "step-fp32-32x64.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Resize"]  # the position table is stored, not resized
    clip = _frames(3, (32, 64), batch=2)
    ours, theirs = model.new_session(2), load(folder).new_session(2)
    with torch.inference_mode():
        for t in range(3):
            a, b = ours.step(clip[:, t]), theirs.step(clip[:, t])
            assert max_abs(b.masks_queries_logits, a.masks_queries_logits) <= ATOL
    with pytest.raises(FrameSizeError, match=r"48x48.*graphs for 32x64 only"):
        load(folder).new_session(1).step(torch.randn(1, 3, 48, 48))


def test_named_errors(video_export, tmp_path):
    model, folder, _ = video_export
    with pytest.raises(ExportError, match=r"40x48 is not a multiple of the patch size 16x16"):
        export(model, tmp_path / "bad", sizes=[(40, 48)])
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(model, folder)
    with pytest.raises(ExportError, match="exports graphs"):
        export(model, tmp_path / "x", graphs_=["image"])
    runner = load(folder)
    session = runner.new_session(1)
    with pytest.raises(FrameSizeError, match=r"40x48.*multiples of the patch size 16x16"):
        session.step(torch.randn(1, 3, 40, 48))
    if not _dynamic():
        with pytest.raises(FrameSizeError, match=r"64x64.*graphs for 48x48, 32x64 only"):
            session.step(torch.randn(1, 3, 64, 64))
    with pytest.raises(StateError, match=r"must have shape \(1, 7, 64\)"):
        session.propagated_queries = torch.zeros(1, 6, 64)
    with pytest.raises(StateError, match=r"must have shape \(2, 7, 64\)"):
        runner.step(torch.randn(2, 3, 48, 48), torch.zeros(1, 7, 64), [True, True])
    with pytest.raises(StateError, match="one flag per stream"):
        runner.step(torch.randn(2, 3, 48, 48), torch.zeros(2, 7, 64), [True])
    session.step(torch.randn(1, 3, 48, 48))
    with pytest.raises(FrameSizeError, match="call reset"):
        session.step(torch.randn(1, 3, 32, 64))
    with pytest.raises(ExportError, match="no float16 graphs|has no"):
        load(tmp_path / "nothing")


def test_cli_misuse_is_one_line_and_exit_2(tmp_path, capsys):
    from videomt_fast.apps.cli import main

    assert main(["export", "--model", "demo", "--out", str(tmp_path / "o"), "--size", "100x100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a multiple of the patch size" in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["export", "--model", "demo", "--out", str(tmp_path / "o"), "--dtype", "int8"])
    assert exc.value.code == 2


@pytest.mark.parametrize("backbone_type", BACKBONES)
def test_segment_runtime_onnxruntime_matches_the_torch_session(tmp_path, backbone_type):
    pytest.importorskip("av", reason="needs av (the test extra): the test video")
    from videomt_fast.apps import segment, video_io

    model_dir, video = tmp_path / "model", tmp_path / "clip.mp4"
    _video_model(seed=4, backbone=backbone_type).save_pretrained(str(model_dir))
    video_io.write_test_video(str(video), 6, 40, 56, seed=1)
    maps = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / runtime
        argv = [str(video), "--model", str(model_dir), "--task", "semantic", "--out", str(out), "--engine", "session",
                "--runtime", runtime, "--no-progress", "--decoder", "pyav"]
        assert segment.main(argv) == 0
        folder = out / "clip" / "semantic"
        maps[runtime] = np.stack([video_io.read_png(str(folder / n)) for n in sorted(os.listdir(folder))])
        done = json.loads((out / "clip" / "done.json").read_text())
        assert done["identity"]["settings"].get("runtime") == (None if runtime == "torch" else "onnxruntime")
    assert maps["torch"].shape == maps["onnxruntime"].shape == (6, 40, 56)
    assert (maps["torch"] == maps["onnxruntime"]).mean() >= 0.999


def test_export_cli_takes_an_eomt_dinov3_checkpoint(tmp_path, capsys):
    """The checkpoint's config.json says EoMT-DINOv3: the image graph of that class, verified against it."""
    from videomt_fast.apps import export as export_cli

    model_dir, out = tmp_path / "model", tmp_path / "out"
    _eomt_model(seed=6, backbone="dinov3").save_pretrained(str(model_dir))
    argv = ["--model", str(model_dir), "--out", str(out), "--size", "32x64", "--exporter", "torchscript"]
    assert export_cli.main(argv) == 0
    sidecar = json.loads((out / "export.json").read_text())
    assert sidecar["model"]["class"] == "EomtDinov3ForUniversalSegmentation"
    assert [g["file"] for g in sidecar["graphs"]] == ["image-fp32-32x64.onnx"]
    assert max(sidecar["verified"][0]["max_abs_err"].values()) <= ATOL
    assert "verified image float32 32x64" in capsys.readouterr().out
    args = export_cli.build_parser().parse_args(["--arch", "dinov3-s", "--model-type", "eomt", "--out", "x"])
    assert type(export_cli.load_model(args)).__name__ == "EomtDinov3ForUniversalSegmentation"
    with pytest.raises(SystemExit):
        export_cli.build_parser().parse_args(["--arch", "dinov3-xl", "--out", "x"])


def test_segment_runtime_misuse(tmp_path, capsys):
    from videomt_fast.apps import segment

    argv = ["x.mp4", "--model", "demo", "--out", str(tmp_path), "--runtime", "onnxruntime"]
    assert segment.main(argv + ["--fast"]) == 2
    assert segment.main(argv + ["--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--fast applies to the torch runtime" in err[0] and "not bfloat16" in err[1]


def test_export_knows_the_model_class_of_a_hub_id(tmp_path, monkeypatch):
    """A hub id is read like a folder (its config.json's model_type), as from_pretrained and patch_transformers
    read it: an EoMT-DINOv3 checkpoint named by hub id exports as EoMT-DINOv3, not as VidEoMT."""
    import json
    import types

    import videomt_fast
    from videomt_fast.apps import export as export_cli
    from videomt_fast.model import loading

    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "eomt_dinov3"}))
    monkeypatch.setattr(loading, "resolve_checkpoint_dir", lambda name, **hub: str(folder))
    args = types.SimpleNamespace(model="org/eomt-dinov3", model_type="auto")
    assert export_cli._model_class(args) is videomt_fast.EomtDinov3ForUniversalSegmentation
    assert export_cli._model_class(types.SimpleNamespace(model=str(folder), model_type="auto")) \
        is videomt_fast.EomtDinov3ForUniversalSegmentation


def test_onnxruntime_settings_are_checked_where_every_caller_passes(tmp_path):
    """The library call refuses what the command line refuses (the check lives in SegmentSettings.validate),
    and ``dtype="auto"`` resolves to float32 for ONNX Runtime on any device (its graphs are exported from
    float32 weights; bf16 is the torch runtime's CUDA default only)."""
    import torch

    from videomt_fast.apps import segment
    from videomt_fast.apps.segment.engine import resolve_dtype
    from videomt_fast.apps.segment.settings import SegmentSettings

    with pytest.raises(segment.UsageError, match="not bfloat16"):
        segment.run(SegmentSettings(model="demo", task="semantic", out=str(tmp_path / "o"), dtype="bfloat16",
                                    runtime="onnxruntime"), [str(tmp_path / "x.mp4")])
    assert not (tmp_path / "o").exists()  # refused before any work
    assert resolve_dtype("auto", "cuda:0", "onnxruntime") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16 and resolve_dtype("auto", "cpu", "onnxruntime") == torch.float32


def test_bench_rows_for_onnxruntime(tmp_path):
    """ONNX Runtime rows in the same run as transformers and our path, with the agreement columns."""
    from videomt_fast.apps import benchmark

    args = benchmark.parse_args(["--tiny", "--providers", "hf-eager-fp32,fast", "--ort", "cpu", "--mode", "online",
                                 "--mode", "offline", "--repeats", "1", "--online-frames", "3", "--frames", "3",
                                 "--no-save", "--agree-frames", "3", "--dtype", "float32"])  # not a timed decision
    report = benchmark.run(args)
    rows = {(r["label"], r["mode"]): r for r in report["rows"]}
    for mode in ("online", "offline"):
        row = rows[("ort-cpu-fp32", mode)]
        assert row["status"] == "ok" and "onnxruntime" in row["backend"] and "CPUExecutionProvider" in row["backend"]
        assert row["agreement"]["mask_max_abs_err"] <= ATOL and row["agreement"]["class_max_abs_err"] <= ATOL
        assert row["speedup"]["hf-eager-fp32"] > 0 and ("fast-fp32", mode) in rows
    assert "ort-cpu-fp32" in benchmark.format_table(report)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--tiny", "--ort", "gpu"])


def test_bench_rows_for_onnxruntime_on_videomt_dinov3():
    """VidEoMT-DINOv3, which transformers has no class for: the ONNX Runtime row exports the same weights as
    the fast row (the benchmark's own model of them) and agrees with transformers' DINOv3 modules."""
    from videomt_fast.apps import benchmark

    args = benchmark.parse_args(["--arch", "dinov3-s", "--size", "32x32", "--device", "cpu", "--providers",
                                 "hf-eager-fp32", "--ort", "cpu", "--mode", "online", "--repeats", "1", "--warmup",
                                 "0", "--online-frames", "2", "--agree-frames", "2", "--no-save"])
    report = benchmark.run(args)
    row = next(r for r in report["rows"] if r["label"] == "ort-cpu-fp32")
    assert row["status"] == "ok", row
    assert row["agreement"]["mask_max_abs_err"] <= 1e-3 and row["agreement"]["class_max_abs_err"] <= 1e-3


def test_the_library_never_imports_onnx_until_an_export_runs():
    import subprocess
    import sys

    code = ("import sys, videomt_fast, videomt_fast.export, videomt_fast.apps.segment.ort, videomt_fast.apps.bench_ort; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
