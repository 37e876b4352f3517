"""The fast path's static-buffer session (CUDA graphs on GPU) and optimize()."""

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode, resolve_name

import videomt_fast
from videomt_fast import ops
from videomt_fast.runtime.fast import GraphedSession
from videomt_fast.runtime.session import VideomtSession

from helpers import TINY, hf_videomt, max_abs, randomize_, video


@pytest.fixture()
def model():
    pytest.importorskip("transformers")
    return videomt_fast.from_transformers(randomize_(hf_videomt()))


@pytest.fixture()
def lean_model():
    """The same tiny model without transformers (the CPU fast-path checks need only videomt_fast)."""
    return randomize_(videomt_fast.VideomtForUniversalSegmentation(videomt_fast.VideomtConfig(**TINY)))


def test_static_buffer_session_equals_clip(model):
    x = video(2, 4)
    with torch.no_grad():
        clip = model(pixel_values_videos=x)
    session = GraphedSession(model, batch_size=2, use_graphs=False)
    for t in range(4):
        out = session.step(x[:, t])
        assert max_abs(out.masks_queries_logits, clip.masks_queries_logits[2 * t : 2 * t + 2]) < 1e-5
    session.reset()
    again = session.step(x[:, 0])
    assert max_abs(again.class_queries_logits, clip.class_queries_logits[:2]) < 1e-5
    with pytest.raises(ValueError, match="48x48"):
        session.step(video(2, 1, height=32)[:, 0])


def test_static_buffer_session_runs_in_and_out_of_inference_mode(lean_model):
    """Static buffers made under inference_mode must still take copies outside it (and the reverse)."""
    session = GraphedSession(lean_model, batch_size=1, use_graphs=False)
    x = video(1, 3)
    with torch.no_grad():
        want = lean_model(pixel_values_videos=x).masks_queries_logits
    outs = []
    for t, mode in enumerate((torch.inference_mode, torch.no_grad, torch.inference_mode)):
        with mode():
            outs.append(session.step(x[:, t]).masks_queries_logits)
    assert max_abs(torch.cat(outs), want) < 1e-5


def test_optimize_casts_and_keeps_mask_probs(model):
    model.optimize(dtype=torch.bfloat16, check_finite=False)
    assert model.dtype == torch.bfloat16
    assert model.attn_mask_probs.dtype == torch.float32
    assert model.check_finite is False
    assert isinstance(model.new_session(), videomt_fast.runtime.session.VideomtSession)  # CPU: no graphs
    with torch.no_grad():
        out = model(pixel_values_videos=video())
    assert out.masks_queries_logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        model.optimize(dtype=torch.int8)


def test_from_pretrained_fast(tmp_path):
    pytest.importorskip("transformers")
    hf_videomt().save_pretrained(tmp_path)
    model = videomt_fast.VideomtForUniversalSegmentation.from_pretrained(tmp_path, fast=True)
    assert model.dtype == torch.float32 and model.fast_settings.cuda_graphs  # a CPU keeps the reference dtype
    model = videomt_fast.VideomtForUniversalSegmentation.from_pretrained(tmp_path, fast=True, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert videomt_fast.VideomtForUniversalSegmentation.from_pretrained(tmp_path).optimize().dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be"):
        model.optimize(dtype="bf16")


@pytest.mark.gpu
def test_graphed_session_on_gpu_matches_eager():
    pytest.importorskip("transformers")
    model = videomt_fast.from_transformers(randomize_(hf_videomt())).cuda()
    x = video(1, 5).cuda()
    with torch.no_grad():
        clip = model(pixel_values_videos=x)
    model.optimize(dtype=torch.float32)
    a, b = model.new_session(), model.new_session()
    assert isinstance(a, GraphedSession) and a.use_graphs
    for t in range(5):
        out_a = a.step(x[:, t])
        out_b = b.step(x[:, t])
        assert max_abs(out_a.masks_queries_logits, clip.masks_queries_logits[t : t + 1]) < 1e-3
        assert max_abs(out_b.class_queries_logits, clip.class_queries_logits[t : t + 1]) < 1e-3


@pytest.mark.gpu
def test_graphed_clip_forward_on_gpu_matches_eager():
    """After optimize() the clip forward replays the query layers from CUDA graphs, per shape."""
    from videomt_fast.runtime.fast import GraphedQueryStep

    pytest.importorskip("transformers")
    model = videomt_fast.from_transformers(randomize_(hf_videomt())).cuda()
    clips = [video(2, 5).cuda(), video(1, 3, height=32).cuda()]
    with torch.no_grad():
        eager = [model(pixel_values_videos=x) for x in clips]
        model.optimize(dtype=torch.float32)
        for x, ref in zip(clips, eager):
            for chunk in (None, 2):
                out = model(pixel_values_videos=x, chunk_size=chunk)
                for name in ("masks_queries_logits", "class_queries_logits", "last_hidden_state"):
                    assert max_abs(getattr(out, name), getattr(ref, name)) < 1e-3, (name, chunk)
    steps = model._graphed_query_steps[1]
    assert len(steps) == 2 and all(isinstance(s, GraphedQueryStep) and len(s._graphs) == 2 for s in steps.values())
    model.optimize(dtype=torch.float32)
    assert not hasattr(model, "_graphed_query_steps")  # re-optimizing drops graphs of the old weights
    with torch.no_grad():
        model(pixel_values_videos=clips[0])  # graphs of the fp32 weights again
        model.to(torch.float16)  # new weight tensors behind optimize()'s back: those graphs must not replay
        out = model(pixel_values_videos=clips[0].half()).masks_queries_logits
        model.fast_settings.cuda_graphs = False
        eager = model(pixel_values_videos=clips[0].half()).masks_queries_logits
    # graph and eager run the same plan's kernels on the same fp16 weights: equal bit for bit (a tolerance
    # of 1e-2 would pass a replay of graphs that read some of the fp32 weights' old memory)
    assert out.dtype == torch.float16 and torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_eager_step_bit_for_bit(dtype):
    """Graph and eager run the same kernels of the same plan: the outputs must be identical."""
    pytest.importorskip("transformers")
    model = videomt_fast.from_transformers(randomize_(hf_videomt())).cuda().optimize(dtype=dtype)
    x = video(1, 4).cuda()
    graphed = model.new_session()
    eager = GraphedSession(model, use_graphs=False)
    assert graphed.use_graphs
    for t in range(4):
        a, b = graphed.step(x[:, t]), eager.step(x[:, t])
        for key in ("class_queries_logits", "masks_queries_logits", "last_hidden_state"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (t, key)


@pytest.mark.gpu
def test_graphs_never_replay_replaced_weights():
    pytest.importorskip("transformers")
    model = videomt_fast.from_transformers(randomize_(hf_videomt())).cuda().optimize(dtype=torch.float32)
    x = video(1, 3).cuda()
    session = model.new_session()
    session.step(x[:, 0])
    session.step(x[:, 1])
    middle = model.layers[len(model.layers) // 2].mlp.fc1
    middle.weight = torch.nn.Parameter(middle.weight.detach() * 2)  # a middle layer, new storage
    with pytest.raises(RuntimeError, match="replaced"):
        session.step(x[:, 2])  # mid-video: refuse, never replay the old graph
    session.reset()
    out = session.step(x[:, 0])  # a new video captures again, reading the new weights
    want = GraphedSession(model, use_graphs=False).step(x[:, 0])
    assert torch.equal(out.masks_queries_logits, want.masks_queries_logits)


def test_model_traces_under_torch_compile(model):
    x = video(1, 2)
    with torch.no_grad():
        eager = model(pixel_values_videos=x)
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(pixel_values_videos=x)
    assert max_abs(out.masks_queries_logits, eager.masks_queries_logits) < 1e-4


# ---------------------------------------------------------------------------------- CPU: optimize() changes nothing


class _RecordTorchCalls(TorchFunctionMode):
    """Every torch function / tensor method called, with the shapes and dtypes of its tensor arguments
    (attribute reads such as ``tensor.device`` compute nothing and are left out)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
        if not name.endswith(".__get__"):
            tensors = tuple((tuple(a.shape), a.dtype) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            self.calls.append((name, tensors))
        return func(*args, **kwargs)


def _trace(model, monkeypatch, x):
    """Outputs of a clip forward and of a session over ``x``, the backends ops.call chose, and every torch call."""
    chosen = []
    real_choose = ops.choose

    def choose(name, *args, **kwargs):
        backend, fn, reason = real_choose(name, *args, **kwargs)
        chosen.append((name, backend))
        return backend, fn, reason

    monkeypatch.setattr(ops.registry, "choose", choose)
    session = model.new_session(x.shape[0])
    recorder = _RecordTorchCalls()
    with torch.inference_mode(), recorder:
        clip = model(pixel_values_videos=x)
        steps = [session.step(x[:, t]) for t in range(x.shape[1])]
    monkeypatch.setattr(ops.registry, "choose", real_choose)
    return clip, steps, type(session), chosen, recorder.calls


def test_optimize_on_cpu_runs_exactly_the_reference_path(lean_model, monkeypatch, tmp_path):
    """``--fast`` on a CPU must cost what the plain model costs: the same torch calls on the same shapes,
    no other session, cast or copy, and no per-call dispatch at all (the plan's references are called
    directly).

    Guards the ``videomt-fast segment --fast --dtype float32`` CPU path against a slow path (a graphed or
    static-buffer session, a fast backend that emulates kernels on CPU, extra casts or clones) sneaking in.
    """
    monkeypatch.setenv("VIDEOMT_FAST_PLAN_CACHE", str(tmp_path))
    plain = lean_model
    fast = copy.deepcopy(plain)
    before = {name: (t.data_ptr(), t.dtype) for name, t in fast.fused_state_dict().items()}
    assert fast.optimize(dtype=torch.float32, check_finite=True) is fast
    after = {name: (t.data_ptr(), t.dtype) for name, t in fast.fused_state_dict().items()}
    assert after == before  # same dtype: optimize() casts and copies nothing
    assert fast.fast_settings.dtype == torch.float32

    x = video(2, 3)
    _trace(fast, monkeypatch, x)  # the first calls of each shape build (and cache) their plans
    clip_p, steps_p, session_p, chosen_p, calls_p = _trace(plain, monkeypatch, x)
    clip_f, steps_f, session_f, chosen_f, calls_f = _trace(fast, monkeypatch, x)
    assert session_p is session_f is VideomtSession
    assert chosen_p and {backend for _, backend in chosen_p} == {"reference"}
    assert chosen_f == []  # planned: nothing dispatched per call
    assert calls_f == calls_p  # the same torch calls on the same shapes and dtypes, in the same order
    for a, b in [(clip_p, clip_f), *zip(steps_p, steps_f)]:
        for key in ("class_queries_logits", "masks_queries_logits", "last_hidden_state"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_optimize_low_precision_on_cpu_still_uses_references(lean_model, monkeypatch, tmp_path, dtype):
    from videomt_fast.runtime.fast import plan_for

    monkeypatch.setenv("VIDEOMT_FAST_PLAN_CACHE", str(tmp_path))
    lean_model.optimize(dtype=dtype)
    assert isinstance(lean_model.new_session(), VideomtSession)
    _trace(lean_model, monkeypatch, video(1, 2).to(dtype))  # builds the plans (the gate's float32 copy dispatches)
    _, steps, _, chosen, _ = _trace(lean_model, monkeypatch, video(1, 2).to(dtype))
    assert chosen == []
    plan = plan_for(lean_model, 1, (48, 48))
    assert plan.dtype == str(dtype).replace("torch.", "")
    assert set(plan.choices().values()) == {"reference"}
    assert steps[-1].masks_queries_logits.dtype == dtype
