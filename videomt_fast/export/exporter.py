"""Export a VidEoMT or EoMT model to ONNX graphs with a JSON sidecar (``export.json``).

Graphs (file ``<graph>-<dtype>.onnx``, or ``<graph>-<dtype>-<H>x<W>.onnx`` for fixed frame sizes):

* ``step`` (VidEoMT): one frame of a stream. Inputs ``frames`` ``(B, 3, H, W)`` float32, ``queries``
  ``(B, Q, d)`` (the carried state) and ``first`` ``(B,)`` bool; outputs ``class_queries_logits``,
  ``masks_queries_logits`` and ``queries_out`` (the state for the next frame). **First frame of a
  video:** set ``first`` for that row; its ``queries`` are not read (pass zeros, or anything of the
  shape). Frame by frame this equals ``model.new_session().step``.
* ``clip`` (VidEoMT): ``pixel_values_videos`` ``(B, T, 3, H, W)``, T dynamic, the clip forward's outputs
  with frame-major rows (``t * B + b``), and the last frame's ``queries_out``. As the clip forward does, the
  query-free layers run on all frames at once, then the query layers and the head frame by frame inside an
  ONNX ``Loop`` (``first`` set on the loop's first iteration).

Both VidEoMT graphs are composed from two traced ones, the encode graph (``encode_frames``) and the query
graph (``query_step``), so the step and the clip run the same exported operations.
* ``image`` (EoMT): ``pixel_values`` ``(B, 3, H, W)`` -> class and mask logits, masked attention (as the
  model's ``attn_mask_probs`` say) computed inside the graph.

Either backbone exports: DINOv2 (learned position table) and DINOv3 (rotary embeddings on the patch
tokens, gated MLP). The batch is dynamic. Height and width are dynamic (multiples of the patch size) with
torch's dynamo exporter: DINOv2's antialiased bicubic resize of the position embeddings becomes an ONNX
``Resize``, DINOv3's rotary cos/sin tables are computed in the graph from the frame size. With the
TorchScript exporter (used where onnxscript is missing) or ``fixed_sizes=True``, one graph per listed size
is written with its position tables (DINOv2's resized table, DINOv3's rotary tables) computed here and
stored, and the sidecar lists those sizes and says so (``frame_sizes.position_embeddings``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from videomt_fast.export import graphs
from videomt_fast.export.errors import ExportError, require
from videomt_fast.model.loading import _umask

FORMAT = "videomt_fast.onnx-export"
FORMAT_VERSION = 1
SIDECAR = "export.json"
OPSET = 18  # LayerNormalization and Resize(antialias) are there; ONNX Runtime 1.16+ runs it
DTYPES = {"float32": torch.float32, "float16": torch.float16}
SHORT = {"float32": "fp32", "float16": "fp16"}
EXPORTERS = ("auto", "dynamo", "torchscript")
VIDEO_GRAPHS = ("step", "clip")
IMAGE_GRAPHS = ("image",)
NORMALIZATION = {
    "layout": "NCHW, RGB",
    "scale": "pixel values / 255, then (x - mean) / std per channel (VideomtVideoProcessor / "
             "EomtImageProcessor do this, after resizing to the graph's frame size)",
    "mean": None,  # filled from the processors' defaults
    "std": None,
}


def _is_video(model) -> bool:
    return hasattr(model, "query_updater")


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def check_sizes(config, sizes: Iterable[Sequence[int]]) -> list[tuple[int, int]]:
    """``sizes`` as ``(H, W)`` pairs, each a positive multiple of the patch size, else :class:`ExportError`."""
    ph, pw = config.patch_hw
    out = []
    for size in sizes:
        if len(size) != 2:
            raise ExportError(f"frame size {size!r} must be (height, width)")
        h, w = int(size[0]), int(size[1])
        if h <= 0 or w <= 0 or h % ph or w % pw:
            raise ExportError(
                f"frame size {h}x{w} is not a multiple of the patch size {ph}x{pw}: the graphs take frames whose "
                f"height and width are positive multiples of it (e.g. {max(ph, h // ph * ph)}x{max(pw, w // pw * pw)})"
            )
        if (h, w) not in out:
            out.append((h, w))
    return out


def resolve_exporter(requested: str = "auto") -> str:
    """``dynamo`` (torch.onnx's default, needs onnxscript) or ``torchscript``; ``auto`` picks dynamo where
    onnxscript is installed."""
    if requested not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {requested!r}")
    if requested != "auto":
        return requested
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return "torchscript"
    return "dynamo"


# --------------------------------------------------------------------------------------------
# one torch module -> one ONNX model


@dataclass
class _Spec:
    """A traced graph: its module, example inputs, names and readable dims per input/output."""

    module: torch.nn.Module
    args: tuple
    inputs: list[tuple[str, list]]  # (name, dims: int or a name for a dynamic dim)
    outputs: list[tuple[str, list]]


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _torch_export(spec: _Spec, exporter: str, dynamic_hw: bool, opset: int, patch: tuple[int, int]):
    """``torch.onnx.export`` of ``spec``; returns the ``onnx.ModelProto`` with readable dim names."""
    onnx = require("onnx", "ONNX export")
    names = [n for n, _ in spec.inputs]
    out_names = [n for n, _ in spec.outputs]
    with _quiet(), torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph.onnx")
        if exporter == "dynamo":
            require("onnxscript", "torch's dynamo ONNX exporter")
            dims: dict[str, Any] = {}
            shapes = {}
            for name, layout in spec.inputs:
                axes = {}
                for axis, dim in enumerate(layout):
                    if isinstance(dim, int):
                        continue
                    if dim == "tokens":  # 1 + registers + patches: follows height and width
                        if dynamic_hw:
                            axes[axis] = torch.export.Dim.AUTO
                        continue
                    if dim in ("height", "width"):
                        if not dynamic_hw:
                            continue
                        step = patch[0] if dim == "height" else patch[1]
                        key = f"grid_{dim[0]}"
                        dims.setdefault(key, torch.export.Dim(key, min=1))
                        axes[axis] = step * dims[key]
                    else:
                        dims.setdefault(dim, torch.export.Dim(dim, min=1))
                        axes[axis] = dims[dim]
                shapes[name] = axes or None
            torch.onnx.export(spec.module, spec.args, path, input_names=names, output_names=out_names,
                              dynamic_shapes=shapes, opset_version=opset, dynamo=True, external_data=False,
                              verbose=False)
        else:
            axes = {name: {axis: dim for axis, dim in enumerate(layout) if isinstance(dim, str)
                           and dim not in ("height", "width", "height/4", "width/4", "tokens")}
                    for name, layout in spec.inputs + spec.outputs}
            torch.onnx.export(spec.module, spec.args, path, input_names=names, output_names=out_names,
                              dynamic_axes={k: v for k, v in axes.items() if v}, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        model = onnx.load(path)
    _name_dims(model, spec, dynamic_hw)
    return model


def _name_dims(model, spec: _Spec, dynamic_hw: bool) -> None:
    """Readable names for the dynamic dims of the graph's inputs and outputs (``batch``, ``height``, ...)."""
    layouts = dict(spec.inputs + spec.outputs)
    for value in list(model.graph.input) + list(model.graph.output):
        layout = layouts.get(value.name)
        if layout is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, layout):
            if isinstance(want, str) and (dynamic_hw or want not in ("height", "width", "height/4", "width/4", "tokens")):
                dim.dim_param = want


# --------------------------------------------------------------------------------------------
# composing the step and clip graphs from the encode and query graphs


def _renamed(graph, prefix: str, mapping: dict[str, str]):
    """``graph``'s nodes and initializers with every value name prefixed (``mapping`` names the values wired
    to outside names instead)."""

    def rename(name: str) -> str:
        return name if not name else mapping.get(name, prefix + name)

    nodes = []
    for node in graph.node:
        new = copy.deepcopy(node)
        new.input[:] = [rename(n) for n in node.input]
        new.output[:] = [rename(n) for n in node.output]
        new.name = prefix + (node.name or node.op_type)
        nodes.append(new)
    inits = []
    for tensor in graph.initializer:
        new = copy.deepcopy(tensor)
        new.name = rename(tensor.name)
        inits.append(new)
    return nodes, inits


def _model(graph, parts):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=list(parts[0].opset_import), producer_name="videomt_fast")
    model.ir_version = max(p.ir_version for p in parts)
    for part in parts:
        model.functions.extend(part.functions)
    return model


def compose_step(encode, query):
    """The step graph: ``frames -> hidden`` (encode) then the query graph on ``(frames, hidden, queries,
    first)``, one frame per row."""
    from onnx import helper

    enc_nodes, enc_inits = _renamed(encode.graph, "encode/", {"frames": "frames", "hidden": "step/hidden"})
    keep = {"frames": "frames", "hidden": "step/hidden", "queries": "queries", "first": "first"}
    keep.update({o.name: o.name for o in query.graph.output})
    q_nodes, q_inits = _renamed(query.graph, "query/", keep)
    inputs = [next(i for i in encode.graph.input if i.name == "frames")]
    inputs += [i for i in query.graph.input if i.name in ("queries", "first")]
    graph = helper.make_graph(enc_nodes + q_nodes, "videomt_step", inputs, list(query.graph.output),
                              initializer=enc_inits + q_inits)
    return _model(graph, [encode, query])


def compose_clip(encode, query, num_queries: int, hidden: int, state_dtype: int):
    """The clip graph ``pixel_values_videos (B, T, 3, H, W) -> (class logits (T*B, ...), mask logits
    (T*B, ...), queries_out (B, Q, d))``: the encode graph on all ``B*T`` frames at once (the clip
    forward's batched early layers), then the query graph per frame as the body of an ONNX ``Loop`` over
    T with the carried queries as the loop state and ``first`` set on iteration 0. Rows are frame-major.
    The query graph's weights are the body's initializers (shape inference reads their values there)."""
    from onnx import TensorProto, helper

    int64 = TensorProto.INT64
    enc_nodes, enc_inits = _renamed(encode.graph, "encode/", {"frames": "clip/frames_bt", "hidden": "clip/hidden_flat"})
    outs = [o.name for o in query.graph.output]  # class_queries_logits, masks_queries_logits, queries_out
    wired = {"frames": "clip/frame", "hidden": "clip/hidden_t", "queries": "clip/queries_in", "first": "clip/first"}
    q_nodes, q_inits = _renamed(query.graph, "query/", wired)
    head = [
        helper.make_node("Gather", ["pixel_values_videos", "clip/iter"], ["clip/frame"], axis=1),
        helper.make_node("Gather", ["clip/hidden_bt", "clip/iter"], ["clip/hidden_t"], axis=1),
        helper.make_node("Constant", [], ["clip/zero"], value=helper.make_tensor("zero", int64, [], [0])),
        helper.make_node("Equal", ["clip/iter", "clip/zero"], ["clip/is_first"]),
        helper.make_node("Expand", ["clip/is_first", "clip/batch"], ["clip/first"]),
        helper.make_node("Identity", ["clip/cond_in"], ["clip/cond_out"]),
    ]
    types = {o.name: o.type.tensor_type.elem_type for o in query.graph.output}
    body = helper.make_graph(
        head + q_nodes, "clip_query_step",
        [helper.make_tensor_value_info("clip/iter", int64, []),
         helper.make_tensor_value_info("clip/cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("clip/queries_in", state_dtype, None)],
        [helper.make_tensor_value_info("clip/cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(f"query/{outs[2]}", state_dtype, None),
         helper.make_tensor_value_info(f"query/{outs[0]}", types[outs[0]], None),
         helper.make_tensor_value_info(f"query/{outs[1]}", types[outs[1]], None)],
        initializer=q_inits,
    )
    nodes = [
        helper.make_node("Shape", ["pixel_values_videos"], ["clip/shape"]),
        helper.make_node("Slice", ["clip/shape", "clip/c0", "clip/c1"], ["clip/batch"]),
        helper.make_node("Slice", ["clip/shape", "clip/c0", "clip/c2"], ["clip/batch_frames"]),
        helper.make_node("Slice", ["clip/shape", "clip/c1", "clip/c2"], ["clip/frames_1d"]),
        helper.make_node("Squeeze", ["clip/frames_1d"], ["clip/num_frames"]),
        helper.make_node("Slice", ["clip/shape", "clip/c2", "clip/c5"], ["clip/chw"]),
        helper.make_node("Concat", ["clip/minus1", "clip/chw"], ["clip/frames_shape"], axis=0),
        helper.make_node("Reshape", ["pixel_values_videos", "clip/frames_shape"], ["clip/frames_bt"]),
        *enc_nodes,
        helper.make_node("Shape", ["clip/hidden_flat"], ["clip/token_dims"], start=1),
        helper.make_node("Concat", ["clip/batch_frames", "clip/token_dims"], ["clip/hidden_shape"], axis=0),
        helper.make_node("Reshape", ["clip/hidden_flat", "clip/hidden_shape"], ["clip/hidden_bt"]),
        helper.make_node("Concat", ["clip/batch", "clip/state_dims"], ["clip/state_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["clip/state_shape"], ["clip/queries0"],
                         value=helper.make_tensor("v", state_dtype, [1], [0])),
        helper.make_node("Loop", ["clip/num_frames", "clip/true", "clip/queries0"],
                         [outs[2], "clip/classes_tb", "clip/masks_tb"], body=body),
    ]
    for src, dst in (("clip/classes_tb", outs[0]), ("clip/masks_tb", outs[1])):
        nodes += [
            helper.make_node("Shape", [src], [f"{src}/shape"], start=2),
            helper.make_node("Concat", ["clip/minus1", f"{src}/shape"], [f"{src}/target"], axis=0),
            helper.make_node("Reshape", [src, f"{src}/target"], [dst]),
        ]
    consts = [helper.make_tensor(f"clip/c{i}", int64, [1], [i]) for i in (0, 1, 2, 5)] + [
        helper.make_tensor("clip/minus1", int64, [1], [-1]),
        helper.make_tensor("clip/state_dims", int64, [2], [num_queries, hidden]),
        helper.make_tensor("clip/true", TensorProto.BOOL, [], [True]),
    ]
    frames_in = next(i for i in encode.graph.input if i.name == "frames")
    video = helper.make_tensor_value_info("pixel_values_videos", frames_in.type.tensor_type.elem_type, None)
    dims = list(frames_in.type.tensor_type.shape.dim)
    for d in [dims[0], None, *dims[1:]]:
        new = video.type.tensor_type.shape.dim.add()
        if d is None:
            new.dim_param = "num_frames"
        elif d.dim_param:
            new.dim_param = d.dim_param
        else:
            new.dim_value = d.dim_value
    outputs = []
    for o in query.graph.output:
        value = copy.deepcopy(o)
        if o.name != "queries_out":
            value.type.tensor_type.shape.dim[0].dim_param = "num_frames*batch"
        outputs.append(value)
    graph = helper.make_graph(nodes, "videomt_clip", [video], outputs, initializer=enc_inits + consts)
    return _model(graph, [encode, query])


# --------------------------------------------------------------------------------------------
# the export


def _prepared(model, dtype: torch.dtype, copy_always: bool = False):
    """``model`` on the CPU in ``dtype`` in eval mode: itself when it already is (and not ``copy_always``),
    else a copy."""
    if model.device.type == "cpu" and model.dtype == dtype and not model.training and not copy_always:
        return model
    twin = copy.deepcopy(model)
    return twin.to(device="cpu", dtype=dtype).eval()


@contextlib.contextmanager
def _table_for(model, size: tuple[int, int], fixed: bool):
    """With ``fixed``: the model's position tables replaced, for the trace, by those of ``size``, computed here
    as the model computes them (DINOv2: the resized position table; DINOv3: the rotary cos/sin tables), so
    the graph stores them instead of computing them in the graph."""
    if not fixed:
        yield
        return
    grid = model.grid_for(*size)
    if model.rope_embeddings is not None:
        before = model.rope_embeddings
        model.rope_embeddings = graphs.PinnedRotary(before, grid, model.device)
        try:
            yield
        finally:
            model.rope_embeddings = before
        return
    embeddings = model.embeddings
    before = embeddings.position_embeddings, embeddings.grid_size
    weight = embeddings.position_embedding(grid).detach().clone()
    embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(weight, freeze=True)
    embeddings.grid_size = grid
    try:
        yield
    finally:
        embeddings.position_embeddings, embeddings.grid_size = before


def _trace_size(config, sizes: list[tuple[int, int]], dynamic_hw: bool) -> list[tuple[int, int]]:
    """Sizes to trace at. Dynamic: one size whose grid differs from the config's in both directions and
    whose sides differ (so the trace specializes no side to a constant); fixed: each listed size."""
    if not dynamic_hw:
        return sizes
    (gh, gw), (ph, pw) = config.grid_size, config.patch_hw
    h, w = gh + 1, gw + 2
    if h == w:
        w += 1
    return [(max(h, 2) * ph, max(w, 2) * pw)]


def _video_specs(model, table, size) -> tuple[_Spec, _Spec]:
    """The encode graph ``frames -> hidden`` and the query graph ``(frames, hidden, queries, first) ->
    (class logits, mask logits, queries_out)``, traced at ``size`` with a batch of 2 (one row starting a
    video, one carrying)."""
    cfg = model.config
    q, d = cfg.num_queries, cfg.hidden_size
    frames = torch.randn(2, cfg.num_channels, *size)
    with torch.no_grad(), graphs.export_tables(model, table):
        hidden = model.encode_frames(frames)
    queries = torch.randn(2, q, d).to(model.dtype)
    first = torch.tensor([True, False])
    frames_layout = ("frames", ["batch", cfg.num_channels, "height", "width"])
    hidden_layout = ("hidden", ["batch", "tokens", d])
    encode = _Spec(graphs.EncodeGraph(model), (frames,), inputs=[frames_layout], outputs=[hidden_layout])
    query = _Spec(
        graphs.QueryGraph(model, table), (frames, hidden, queries, first),
        inputs=[frames_layout, hidden_layout, ("queries", ["batch", q, d]), ("first", ["batch"])],
        outputs=[("class_queries_logits", ["batch", q, cfg.num_labels + 1]),
                 ("masks_queries_logits", ["batch", q, "height/4", "width/4"]), ("queries_out", ["batch", q, d])],
    )
    return encode, query


def _image_spec(model, size) -> _Spec:
    cfg = model.config
    q = cfg.num_queries
    return _Spec(
        graphs.ImageGraph(model), (torch.randn(2, cfg.num_channels, *size),),
        inputs=[("pixel_values", ["batch", cfg.num_channels, "height", "width"])],
        outputs=[("class_queries_logits", ["batch", q, cfg.num_labels + 1]),
                 ("masks_queries_logits", ["batch", q, "height/4", "width/4"])],
    )


def _value_doc(value, docs: dict[str, str]) -> dict[str, Any]:
    onnx = require("onnx", "ONNX export")
    tensor = value.type.tensor_type
    return {
        "name": value.name,
        "shape": [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim],
        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
        "doc": docs.get(value.name, ""),
    }


DOCS = {
    "frames": "normalized frames of one time step, one row per stream (see normalization)",
    "queries": "the carried state: queries_out of this stream's previous frame; not read where first is set",
    "first": "true where this frame starts a video (the learned queries are used, queries is ignored)",
    "class_queries_logits": "class logits per query (last class = no object)",
    "masks_queries_logits": "mask logits per query at a quarter of the frame size",
    "queries_out": "the raw last-layer query rows: pass as queries with the stream's next frame",
    "pixel_values_videos": "normalized clips, (batch, frames, channels, height, width); rows of the outputs are "
                           "frame-major (t * batch + b)",
    "pixel_values": "normalized images",
}


# How the graphs get the position information of a frame size: (backbone family, dynamic height and width)
_POSITIONS = {
    ("dinov2", True): "resized inside the graph (ONNX Resize, cubic, antialiased, coefficient -0.5: PyTorch's "
                      "bicubic antialias)",
    ("dinov2", False): "computed at export for each listed size and stored in that size's graph; frames of other "
                       "sizes are refused",
    ("dinov3", True): "DINOv3's rotary embedding: the cos/sin tables of the patch grid computed inside the graph "
                      "from the frame size (float32, as the model computes them)",
    ("dinov3", False): "DINOv3's rotary embedding: the cos/sin tables computed at export for each listed size "
                       "(float32, as the model computes them) and stored in that size's graph; frames of other "
                       "sizes are refused",
}


def export(
    model,
    out_dir: str | os.PathLike,
    graphs_: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32",),
    sizes: Sequence[Sequence[int]] | None = None,
    fixed_sizes: bool = False,
    exporter: str = "auto",
    opset: int = OPSET,
    verify: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``model``'s ONNX graphs and ``export.json`` into ``out_dir``; returns the sidecar.

    ``graphs_``: ``step`` and/or ``clip`` (VidEoMT; default both), ``image`` (EoMT). ``dtypes``: ``float32``
    and/or ``float16``. ``sizes``: frame sizes ``(H, W)`` (default the config's image size): with dynamic
    height and width they are the sizes verified; with ``fixed_sizes`` (or the TorchScript exporter) one
    graph per size. ``verify`` runs each graph on ONNX Runtime against PyTorch at each size and records the
    errors. The folder appears complete or not at all (written beside it, then renamed into place);
    an existing non-empty ``out_dir`` needs ``overwrite=True``.
    """
    require("onnx", "ONNX export")
    config = model.config
    video = _is_video(model)
    allowed = VIDEO_GRAPHS if video else IMAGE_GRAPHS
    kinds = list(dict.fromkeys(graphs_ or allowed))
    wrong = [k for k in kinds if k not in allowed]
    if wrong:
        raise ExportError(f"{type(model).__name__} exports graphs {list(allowed)}, not {wrong}")
    dtype_names = list(dict.fromkeys(dtypes))
    bad = [d for d in dtype_names if d not in DTYPES]
    if bad or not dtype_names:
        raise ExportError(f"dtypes must be from {sorted(DTYPES)}, got {list(dtypes)}")
    sizes = check_sizes(config, sizes or [config.image_hw])
    exporter = resolve_exporter(exporter)
    dynamic_hw = exporter == "dynamo" and not fixed_sizes
    if opset < OPSET:
        raise ExportError(f"opset must be at least {OPSET} (LayerNormalization, antialiased Resize), got {opset}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or (os.listdir(out_dir) and not overwrite)):
        raise ExportError(f"output folder {out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the export is meant to be shared
    try:
        sidecar = _export_into(model, tmp, kinds, dtype_names, sizes, dynamic_hw, exporter, opset, verify, video)
        _write_json(os.path.join(tmp, SIDECAR), sidecar)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sidecar


def _export_into(model, folder, kinds, dtype_names, sizes, dynamic_hw, exporter, opset, verify, video):
    onnx = require("onnx", "ONNX export")
    from videomt_fast.processing.video_processor import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    config = model.config
    entries = []
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        prepared = _prepared(model, dtype, copy_always=not dynamic_hw)
        table = graphs.ExportTable()
        for trace_size in _trace_size(config, sizes, dynamic_hw):
            with _table_for(prepared, trace_size, not dynamic_hw):
                specs = _video_specs(prepared, table, trace_size) if video else [_image_spec(prepared, trace_size)]
                with graphs.export_tables(prepared, table), prepared.fused_names(), torch.no_grad():
                    traced = [_torch_export(spec, exporter, dynamic_hw, opset, config.patch_hw) for spec in specs]
            suffix = "" if dynamic_hw else f"-{_size_text(trace_size)}"
            state_dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype_name))
            for kind in kinds:
                if kind == "image":
                    graph = traced[0]
                elif kind == "step":
                    graph = compose_step(*traced)
                else:
                    graph = compose_clip(*traced, config.num_queries, config.hidden_size, state_dtype)
                onnx.checker.check_model(graph, full_check=True)
                name = f"{kind}-{SHORT[dtype_name]}{suffix}.onnx"
                onnx.save(graph, os.path.join(folder, name))
                entry = {
                    "graph": kind, "file": name, "dtype": dtype_name,
                    "frame_sizes": "dynamic" if dynamic_hw else [_size_text(trace_size)],
                    "inputs": [_value_doc(v, DOCS) for v in graph.graph.input],
                    "outputs": [_value_doc(v, DOCS) for v in graph.graph.output],
                    "fp32_inside": graphs.fp32_inside(prepared) if dtype != torch.float32 else [],
                }
                if kind == "step":
                    entry["first_frame"] = ("set first[b] on a stream's first frame: that row starts from the "
                                            "learned queries and its queries input is not read (pass zeros); "
                                            "afterwards pass the previous frame's queries_out with first[b] unset")
                if kind == "clip":
                    entry["loop"] = ("the query-free layers on all batch*T frames at once (no chunking: split long "
                                     "videos into clips, or use the step graph), then the query layers and the head "
                                     "per frame in an ONNX Loop over T, queries carried, first set on frame 0")
                if not video:
                    entry["attn_mask_probs"] = [float(p) for p in graphs.ImageGraph(prepared).probs]
                    entry["masked_attention"] = ("computed inside the graph in the query layers whose "
                                                 "attn_mask_probs is 1")
                entries.append(entry)
    sidecar = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"class": type(model).__name__, "config": _config_dict(config)},
        "exporter": _exporter_info(exporter, opset),
        "frame_sizes": ({"dynamic": True, "multiple_of": list(config.patch_hw), "verified": [_size_text(s) for s in sizes],
                         "position_embeddings": _POSITIONS[config.backbone_family, True]}
                        if dynamic_hw else
                        {"dynamic": False, "sizes": [_size_text(s) for s in sizes],
                         "position_embeddings": _POSITIONS[config.backbone_family, False]}),
        "batch": "dynamic",
        "normalization": {**NORMALIZATION, "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)},
        "graphs": entries,
    }
    if verify:
        from videomt_fast.export.verify import verify_export

        sidecar["verified"] = verify_export(model, folder, sidecar)
    return sidecar


def _config_dict(config) -> dict[str, Any]:
    data = config.to_dict()
    return json.loads(json.dumps(data, default=str))


def _exporter_info(exporter: str, opset: int) -> dict[str, Any]:
    import onnx

    info = {"name": f"torch.onnx.export ({exporter})", "opset": opset, "torch": torch.__version__,
            "onnx": onnx.__version__}
    if exporter == "dynamo":
        import onnxscript

        info["onnxscript"] = onnxscript.__version__
    return info


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing one is renamed aside first and removed after."""
    aside = None
    if os.path.exists(out_dir):
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.rmdir(aside)
        os.replace(out_dir, aside)
    os.replace(tmp, out_dir)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
