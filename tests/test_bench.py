"""The benchmark and the profiler: FLOP model, arguments, tiny CPU runs end to end, atomic results."""

import collections
import contextlib
import glob
import json
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from videomt_fast import config_from_preset  # noqa: E402
from videomt_fast.apps import benchmark, profiler  # noqa: E402
from videomt_fast.model.configuration import VideomtConfig  # noqa: E402

TINY_RUN = ["--tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--num-inputs", "2",
            "--frames", "3", "--online-frames", "3", "--e2e-frames", "2", "--agree-frames", "3"]


# ------------------------------------------------------------------ FLOP model


def test_layer_flops_is_design_formula():
    for n, d in [(1605, 1024), (201, 384), (1805, 768), (7, 64)]:
        assert benchmark.layer_flops(n, d) == 24 * n * d * d + 4 * n * n * d


def test_frame_flops_by_hand_vit_s_224():
    c = config_from_preset("vit-s", num_labels=40, image_size=224)
    f = benchmark.frame_flops(c, 224, 224)
    d, p, n, q = 384, 14 * 14, 1 + 4 + 14 * 14, 200
    assert f["patch_embed"] == 2 * p * d * 3 * 16 * 16
    assert f["early_layers"] == 8 * (24 * n * d**2 + 4 * n**2 * d)
    assert f["query_layers"] == 4 * (24 * (n + q) * d**2 + 4 * (n + q) ** 2 * d)
    assert f["query_update"] == 2 * q * d * d
    assert f["head"] == 2 * q * (3 * d * d + d * 41)
    # two upscale blocks: 28x28 then 56x56 output pixels, transposed conv d*d + depthwise 9*d per pixel
    assert f["upscale"] == 2 * (28 * 28 + 56 * 56) * (d * d + 9 * d)
    assert f["mask_einsum"] == 2 * q * d * 56 * 56
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    assert benchmark.frame_flops(c, 224, 224, first_frame=True)["total"] == f["total"] - 2 * q * d * d


@pytest.mark.parametrize("arch,design_tflop", [("vit-s", 0.13), ("vit-b", 0.41), ("vit-l", 1.28)])
def test_frame_flops_matches_design_table(arch, design_tflop):
    total = benchmark.frame_flops(config_from_preset(arch, num_labels=40), 640, 640)["total"] / 1e12
    assert abs(total - design_tflop) / design_tflop < 0.07, total


def test_frame_flops_non_square_and_swiglu():
    c = config_from_preset("vit-b", num_labels=40)
    f = benchmark.frame_flops(c, 448, 800)
    n = 5 + 28 * 50
    assert f["early_layers"] == 8 * benchmark.layer_flops(n, 768)
    s = VideomtConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_blocks=1,
                      use_swiglu_ffn=True, image_size=32)
    m = s.mlp_hidden_size
    assert benchmark.layer_flops(10, 64, m, swiglu=True) == 2 * 10 * (4 * 64 * 64 + 3 * 64 * m) + 4 * 100 * 64


def test_mfu():
    assert benchmark.mfu(1e12, 100.0, 1000.0) == pytest.approx(0.1)
    assert benchmark.mfu(1e12, 100.0, None) is None
    assert benchmark.mfu(1e12, None, 790.0) is None
    assert benchmark.detect_peak_tflops(torch.device("cpu")) is None


def test_percentile_and_agreement():
    assert benchmark.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert benchmark.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    ref = benchmark.Outputs(masks=torch.tensor([[[[1.0, -1.0], [2.0, -2.0]]]]), classes=torch.tensor([[[0.1, 0.9], [0.8, 0.2]]]))
    out = benchmark.Outputs(masks=torch.tensor([[[[1.0, 1.0], [2.0, -2.0]]]]), classes=torch.tensor([[[0.1, 0.9], [0.1, 0.2]]]))
    a = benchmark.agreement(out, ref)
    assert a["mask_sign"] == 0.75 and a["class_argmax"] == 0.5
    assert a["mask_max_abs_err"] == 2.0 and a["class_max_abs_err"] == pytest.approx(0.7)
    assert benchmark.agreement(ref, ref)["mask_sign"] == 1.0


# ------------------------------------------------------------------ the arithmetic, on a stubbed clock

# hand-computed FLOPs of one TINY_CONFIG frame at 32x32 (d=64, 2 early + 2 query layers, Q=8, 5 labels, 4 registers):
# 2x2 patches, 9 tokens (17 with the queries); upscale 2x2 -> 4x4 -> 8x8
TINY_FRAME_FLOPS = (
    2 * 4 * 64 * 3 * 16 * 16  # patch embedding             393,216
    + 2 * (24 * 9 * 64**2 + 4 * 9**2 * 64)  # early layers  1,810,944
    + 2 * 8 * 64 * 64  # query update                        65,536
    + 2 * (24 * 17 * 64**2 + 4 * 17**2 * 64)  # query layers 3,490,304
    + 2 * 8 * (3 * 64 * 64 + 64 * 6)  # head                 202,752
    + 2 * (16 + 64) * 64 * (64 + 9)  # upscale               747,520
    + 2 * 8 * 64 * 8 * 8  # mask product                     65,536
)


class StubClock:
    """Seconds that move only when a stubbed provider runs: each call spends the next scheduled milliseconds."""

    def __init__(self, schedule_ms):
        self.now, self.schedule = 0.0, iter(schedule_ms)

    def __call__(self):
        return self.now

    def spend(self):
        self.now += next(self.schedule) / 1e3


def _stub_row(name, mode, schedule_ms, extra=()):
    """One Case of a stub provider whose calls take the scheduled times: warm-up (1 call sequence) and the
    agreement call first (untimed), then 3 timed repeats."""
    args = benchmark.parse_args(["--tiny", "--device", "cpu", "--warmup", "1", "--repeats", "3", "--num-inputs", "1",
                                 "--frames", "4", "--online-frames", "2", "--agree-frames", "1", *extra])
    bench = benchmark.Bench(args)
    clock = StubClock(schedule_ms)

    def call(x):
        clock.spend()
        return torch.ones(1, 8, 8, 8), torch.ones(1, 8, 6)

    runner = benchmark.Runner(name, "videomt", torch.float32, "stub", offline=call, new_online=lambda: call)
    case = benchmark.Case(bench, runner, mode, (32, 32))
    case.timer = benchmark.Timer(torch.device("cpu"), clock=clock)
    case.warm()
    for r in range(args.repeats):
        case.repeat(r)
    row = case.finish(None)
    assert next(clock.schedule, None) is None, "every scheduled call ran"
    return args, bench, row


def test_offline_arithmetic_on_known_times():
    """Clips of 4 frames timed at 100, 200 and 400 ms: 40, 20 and 10 FPS."""
    _, _, row = _stub_row("fast", "offline", [999, 999, 100, 200, 400], ["--peak-tflops", "0.001"])
    assert row["repeats"] == 3 and row["frames_per_call"] == 4
    assert row["fps"] == pytest.approx(20.0) and row["fps_min"] == pytest.approx(10.0) and row["fps_max"] == pytest.approx(40.0)
    assert row["fps_spread"] == pytest.approx(0.75)  # (40 - 10) / 2 / 20
    assert row["latency_ms_p50"] == pytest.approx(200.0) and row["latency_ms_min"] == pytest.approx(100.0)
    assert row["latency_ms_p90"] == pytest.approx(360.0)  # 200 + 0.8 * (400 - 200)
    assert row["frame_ms_p50"] == pytest.approx(50.0)
    assert row["gflop_per_frame"] == pytest.approx(TINY_FRAME_FLOPS / 1e9) == pytest.approx(0.006775808)
    assert row["achieved_tflops"] == pytest.approx(TINY_FRAME_FLOPS * 20 / 1e12)
    assert row["mfu"] == pytest.approx(0.13551616)  # 6,775,808 FLOP x 20 FPS / 1e9 FLOP/s


def test_online_arithmetic_on_known_times():
    """Two frames per repeat, per-frame times (10, 30), (20, 20), (50, 50) ms: sequences of 40, 40 and 100 ms,
    so 50, 50 and 20 FPS; latency percentiles are per frame."""
    warm = [999] * 4  # a warm-up sequence and the agreement sequence, 2 frames each
    _, _, row = _stub_row("fast", "online", warm + [10, 30, 20, 20, 50, 50], ["--peak-tflops", "0.001"])
    assert row["frames_per_call"] == 1 and row["repeats"] == 3
    assert row["fps"] == pytest.approx(50.0) and row["fps_min"] == pytest.approx(20.0)
    assert row["fps_spread"] == pytest.approx(0.3)  # (50 - 20) / 2 / 50
    assert row["latency_ms_p50"] == pytest.approx(25.0)  # frames 10 20 20 30 50 50
    assert row["latency_ms_p90"] == pytest.approx(50.0)
    assert row["mfu"] == pytest.approx(0.3387904)


def test_speedups_and_table_on_known_times():
    """Speed-up = FPS over the baseline's (20 / 8 = 2.5); the table shows the dtype that ran, leaves out the
    columns that are empty on a CPU (MFU, memory, baselines that did not run), explains every column it
    shows, and prints the warnings."""
    args, bench, fast = _stub_row("fast", "offline", [9, 9, 100, 200, 400])
    _, _, eager = _stub_row("hf-eager-fp32", "offline", [9, 9, 500, 500, 500])
    _, _, sdpa = _stub_row("hf-sdpa-bf16", "offline", [9, 9, 250, 250, 250])
    rows = [eager, sdpa, fast]
    benchmark._add_speedups(rows)
    assert fast["speedup"] == {"hf-eager-fp32": pytest.approx(2.5), "hf-sdpa-bf16": pytest.approx(1.25)}
    assert eager["fps"] == pytest.approx(8.0) and eager["fps_spread"] == 0.0 and fast["mfu"] is None
    for row in rows:
        row["peak_mem_mb"] = None
    report = benchmark._report(args, bench, rows)
    assert "plan" in report and report["plan"] is None
    assert any("±75%" in w and "fast-fp32" in w for w in report["warnings"])
    table = benchmark.format_table(report)
    assert "hf-sdpa-fp32" in table and "hf-sdpa-bf16" not in table and "fast-fp32" in table
    header = table.splitlines()[1].split()
    assert header[:4] == ["provider", "mode", "size", "FPS"] and "spread" in header
    assert "MFU" not in header and "mem" not in header and "compile" not in header
    fast_line = next(line for line in table.splitlines() if line.startswith("fast-fp32"))
    assert fast_line.split()[3:8] == ["20.00", "±75%", "200.00", "360.00", "2.50"], fast_line
    lines = table.splitlines()
    for name, *_ in benchmark.COLUMNS:  # a legend line for every column shown, none for those left out
        assert (name in lines[1]) == any(line.startswith(f"  {name} ") for line in lines), name
    assert any(line.startswith("warning: ") and "±75%" in line for line in table.splitlines())


# ------------------------------------------------------------------ arguments


def test_parse_defaults_on_cpu():
    args = benchmark.parse_args(["--device", "cpu"])
    assert args.arch == "vit-s" and args.sizes == [(224, 224)] and args.modes == list(benchmark.MODES)
    # a short CPU default that still sets the fast path against transformers in every mode
    assert args.providers == ["hf-eager-fp32", "hf-sdpa-bf16", "fast"] and args.peers == []
    assert args.dtype == torch.float32 and args.peak_tflops is None and args.threshold == 0.0
    assert args.compile_mode == "default" and args.interleave is True
    assert args.threads == 1 and args.warmup == 0 and args.repeats == 3


def test_parse_explicit():
    args = benchmark.parse_args(["--device", "cpu", "--arch", "vit-l", "--size", "640x640", "--size", "448X800",
                                 "--mode", "online", "--providers", "hf-compile,fast", "--peers", "none",
                                 "--peak-tflops", "790", "--dtype", "bfloat16", "--frames", "5"])
    assert args.sizes == [(640, 640), (448, 800)] and args.modes == ["online"]
    assert args.providers == ["hf-compile", "fast"] and args.peers == []
    assert args.peak_tflops == 790.0 and args.dtype == torch.bfloat16 and args.frames == 5


@pytest.mark.parametrize("bad,says", [
    (["--size", "640"], "size must look like HxW"), (["--size", "0x640"], "size must be positive"),
    (["--providers", "hf-eager-fp32,nope"], "unknown providers ['nope']"), (["--mode", "batch"], "invalid choice: 'batch'"),
    (["--arch", "vit-s", "--checkpoint", "x"], "not allowed with argument"), (["--repeats", "0"], "--repeats must be at least 1"),
    (["--peers", "sam"], "unknown peers ['sam']"),
])
def test_parse_rejects(bad, says, capsys):
    """Misuse: exit 2 and one message naming the input and what was expected."""
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(["--device", "cpu"] + bad)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_parse_eomt():
    args = benchmark.parse_args(["--device", "cpu", "--model", "eomt"])
    assert args.model == "eomt" and args.num_labels == 133 and args.sizes == [(224, 224)]
    assert args.peers == [] and args.frames == 2 and args.masked_attention == "model"
    assert benchmark.parse_args(["--device", "cpu"]).num_labels == 40
    for bad in (["--masked-attention", "on"], ["--model", "eomt", "--peers", "edgetam-video"],
                ["--model", "eomt", "--masked-attention", "sometimes"]):
        with pytest.raises(SystemExit) as exc:
            benchmark.parse_args(["--device", "cpu"] + bad)
        assert exc.value.code == 2, bad


def test_frame_flops_masked_blocks_add_one_head_pass_each():
    from videomt_fast.model.configuration import EomtConfig

    config = config_from_preset("vit-s", EomtConfig, image_size=640)
    plain = benchmark.frame_flops(config, 640, 640, first_frame=True)
    masked = benchmark.frame_flops(config, 640, 640, first_frame=True, masked_blocks=3)
    assert plain["query_update"] == 0 and plain["masked_attention_heads"] == 0
    head_pass = plain["head"] + plain["upscale"] + plain["mask_einsum"]
    assert masked["masked_attention_heads"] == 3 * head_pass
    assert masked["total"] - plain["total"] == 3 * head_pass


# ------------------------------------------------------------------ tiny CPU runs


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    # float32 forced: a CPU's own dtype decision for the fast path is timed, so it may go either way on a busy
    # machine (the label of a decided dtype: test_fast_row_is_labelled_with_the_dtype_its_plan_decided)
    rc = benchmark.main(TINY_RUN + ["--size", "32x32", "--size", "32x48", "--out-dir", str(out), "--dtype", "float32",
                                    "--providers", "hf-eager-fp32,hf-sdpa-bf16,fast-ref,fast", "--peers", "none"])
    assert rc == 0
    files = os.listdir(out)
    assert len(files) == 1 and files[0].startswith("tiny_online+offline+e2e_cpu_") and files[0].endswith(".json"), files
    with open(out / files[0], encoding="utf-8") as fh:
        return json.load(fh)


def _rows(report, provider, size="32x32"):
    return {r["mode"]: r for r in report["rows"] if r["provider"] == provider and r["size"] == size}


def test_tiny_report_keys(tiny_report):
    for key in ("environment", "config", "dtype", "modes", "sizes", "settings", "rows", "flop_model_gflop_per_frame",
                "notes", "warnings", "plan", "created_utc", "peak_tflops"):
        assert key in tiny_report, key
    env = tiny_report["environment"]
    for key in ("device_name", "driver", "torch", "triton", "transformers", "cpu"):
        assert key in env, key
    assert env["device_type"] == "cpu" and env["device_name"].startswith("CPU")
    assert tiny_report["config"]["hidden_size"] == benchmark.TINY_CONFIG["hidden_size"]
    assert tiny_report["peak_tflops"] is None


def test_tiny_rows_and_agreement(tiny_report):
    for provider in ("hf-eager-fp32", "hf-sdpa-bf16", "fast-ref", "fast"):
        rows = _rows(tiny_report, provider)
        assert set(rows) == set(benchmark.MODES), (provider, rows)
        for mode, row in rows.items():
            assert row["status"] == "ok", row
            assert row["label"] == benchmark.provider_label(provider, torch.float32)
            assert row["fps_min"] <= row["fps"] <= row["fps_max"] and row["fps_spread"] >= 0
            assert row["fps"] > 0 and math.isfinite(row["fps"])
            assert 0 < row["latency_ms_p50"] <= row["latency_ms_p90"]
            assert row["mfu"] is None and row["gflop_per_frame"] > 0
            assert row["speedup"]["hf-eager-fp32"] == pytest.approx(row["fps"] / _rows(tiny_report, "hf-eager-fp32")[mode]["fps"])
            assert row["peak_mem_mb"] is None and row["peak_mem_kind"].startswith("not measured")  # interleaved
    for mode, row in _rows(tiny_report, "fast-ref").items():
        agree = row["agreement"]
        assert agree["reference"] == "hf-eager-fp32"
        assert agree["mask_sign"] == 1.0 and agree["class_argmax"] == 1.0, (mode, agree)
        assert agree["mask_max_abs_err"] < 1e-4 and agree["frames_compared"] == (2 if mode == "end-to-end" else 3)
        if mode == "end-to-end":
            assert agree["instance_map"] == 1.0
    assert _rows(tiny_report, "hf-eager-fp32")["online"]["frames_per_call"] == 1
    assert _rows(tiny_report, "fast")["offline"]["frames_per_call"] == 3


def test_tiny_non_square_size_skips_transformers(tiny_report):
    hf = _rows(tiny_report, "hf-eager-fp32", "32x48")
    assert all(r["status"] == "skipped" and "square" in r["reason"] for r in hf.values())
    fast = _rows(tiny_report, "fast-ref", "32x48")
    assert all(r["status"] == "ok" and "agreement" not in r and r["speedup"] == {} for r in fast.values())


def test_stateless_transformers_online_does_not_carry_queries(tmp_path, capsys):
    """With --hf-online stateless the reference forgets the queries each frame, so the session that carries
    them (fast-ref) disagrees after frame 0; with the default (carry) they agree exactly (tiny_report)."""
    rc = benchmark.main(TINY_RUN + ["--mode", "online", "--providers", "hf-eager-fp32,fast-ref", "--hf-online",
                                    "stateless", "--out-dir", str(tmp_path), "--peers", "none", "--no-interleave"])
    assert rc == 0
    (path,) = glob.glob(str(tmp_path / "*.json"))
    printed = capsys.readouterr()
    assert f"results: {path}" in printed.out  # the absolute path of the JSON
    assert "hf-eager-fp32 online 32x32" in printed.err and "ETA" in printed.err  # progress
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    assert report["settings"]["hf_online"] == "stateless" and report["settings"]["interleaved"] is False
    for row in report["rows"]:  # sequential runs measure each provider's memory alone
        assert row["peak_mem_kind"] == "cpu_peak_rss_increase"
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0
    agree = _rows(report, "fast-ref")["online"]["agreement"]
    assert agree["mask_max_abs_err"] > 1e-3 and agree["mask_sign"] < 1.0


@pytest.mark.parametrize("masked", ["on", "off"])
def test_eomt_tiny_rows_agree_with_transformers(tmp_path, masked):
    """EoMT rows: images per call, masked attention as asked, the reference path equal to transformers'
    (logits and panoptic maps), the FLOP model counting the extra mask predictions."""
    rc = benchmark.main(TINY_RUN + ["--model", "eomt", "--masked-attention", masked, "--out-dir", str(tmp_path),
                                    "--providers", "hf-eager-fp32,fast-ref,fast", "--peers", "none"])
    assert rc == 0
    (path,) = glob.glob(str(tmp_path / "*.json"))
    assert os.path.basename(path).startswith("eomt-tiny_online+offline+e2e_cpu_")
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    assert report["model"] == "eomt" and report["config"]["model_type"] == "eomt"
    blocks = benchmark.TINY_CONFIG["num_blocks"]
    assert any(f"Masked attention in {blocks if masked == 'on' else 0} of {blocks}" in n for n in report["notes"])
    heads = report["flop_model_gflop_per_frame"]["32x32"]["masked_attention_heads"]
    assert (heads > 0) == (masked == "on")
    for provider in ("hf-eager-fp32", "fast-ref", "fast"):
        rows = _rows(report, provider)
        assert set(rows) == set(benchmark.MODES)
        assert all(r["status"] == "ok" and r["kind"] == "eomt" and r["fps"] > 0 for r in rows.values()), rows
    assert _rows(report, "fast")["offline"]["frames_per_call"] == 3
    for mode, row in _rows(report, "fast-ref").items():
        agree = row["agreement"]
        assert agree["mask_sign"] == 1.0 and agree["class_argmax"] == 1.0 and agree["mask_max_abs_err"] < 1e-4, (mode, agree)
        if mode == "end-to-end":
            assert agree["panoptic_map"] == 1.0 and "instance_map" not in agree


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    path = tmp_path / "r.json"
    benchmark.write_json_atomic(str(path), {"a": 1})
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular reference"):
        benchmark.write_json_atomic(str(path), circular)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_profiler_tiny(tmp_path, capsys):
    trace, out = tmp_path / "trace.json", tmp_path / "profile.json"
    rc = profiler.main(["--tiny", "--device", "cpu", "--frames", "2", "--warmup", "0", "--trace-frames", "1",
                        "--trace", str(trace), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert list(report["stages"]) == list(profiler.STAGES)
    for stage in report["stages"].values():
        assert stage["median_ms"] > 0
    assert report["session_step_ms_median"] > 0
    assert report["session_step"] == "ops"  # the tests run with VIDEOMT_FAST_COMPILE=off (conftest)
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert set(profiler.STAGES) <= names, sorted(n for n in names if n)[:40]
    assert sorted(os.listdir(tmp_path)) == ["profile.json", "trace.json"]
    printed = capsys.readouterr().out
    assert "early_layers" in printed and "%" in printed


class _OpRecorder(TorchDispatchMode):
    """The aten ops that run while ``active()`` is true."""

    def __init__(self, active=lambda: True):
        super().__init__()
        self.active, self.ops = active, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active():
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class _RecordingClock(profiler.StageClock):
    """A stage clock that knows whether a stage is open."""

    inside = False

    @contextlib.contextmanager
    def stage(self, name):
        with super().stage(name):
            self.inside = True
            try:
                yield
            finally:
                self.inside = False


@pytest.mark.parametrize("provider", ["fast-ref", "fast"])
def test_profiler_stages_compute_what_a_session_step_computes(provider):
    """The profiler splits a frame into stages itself; its split must stay the model's own step: the same
    mask logits, class logits and carried queries as session.step, bit for bit, and inside its stages
    exactly the ops of one step (nothing left out of the stages, nothing timed twice)."""
    args = profiler.parse_args(["--tiny", "--device", "cpu", "--no-postprocess", "--provider", provider])
    model, _ = profiler.build_model(args)
    model.check_finite = False  # session.step's input scan is not a stage
    frame_fn = profiler._frame_fn(model, None, args)
    frames = [torch.randn(1, 3, 32, 32) for _ in range(3)]
    session = model.new_session(batch_size=1)
    prev = None
    with torch.inference_mode():
        for t, frame in enumerate(frames):
            clock = _RecordingClock(torch.device("cpu"))
            with _OpRecorder(lambda: clock.inside) as staged:
                masks, classes, prev = frame_fn(frame, prev, clock)
            with _OpRecorder() as stepped:
                out = session.step(frame)
            assert torch.equal(masks, out.masks_queries_logits), t
            assert torch.equal(classes, out.class_queries_logits), t
            assert torch.equal(prev, session.propagated_queries), t
            assert list(clock.milliseconds()[0]) == ["patch_embed", "early_layers", "query_layers", "head_upscale"]
            assert staged.ops == stepped.ops, (t, staged.ops - stepped.ops, stepped.ops - staged.ops)
            assert sum(stepped.ops.values()) > 20


# ------------------------------------------------------------------ command line


def test_every_command_line_option_has_help():
    """Every option of every subcommand explains itself in --help (argparse.SUPPRESS hides an option on purpose)."""
    import argparse
    import importlib

    from videomt_fast.apps import cli

    parsers = {"backends": cli.backends_parser()}
    for name, (module, _) in cli._SUBCOMMANDS.items():
        build = getattr(importlib.import_module(module), "build_parser", None)
        if build is not None:
            parsers[name] = build()
    assert {"backends", "bench", "profile", "segment"} <= set(parsers)
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, parser in parsers.items() for action in parser._actions
               if not (action.help or "").strip()]
    assert not missing, missing


def test_backends_names_the_device(capsys):
    from videomt_fast.apps import cli

    assert cli.main(["backends", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("backends for tensors on cpu: CPU: ") and lines[1].split() == ["op", "backend", "reason"]
    assert any(line.split()[:2] == ["attention", "reference"] for line in lines[2:])
    assert cli.main(["backends", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["ops"]["attention"]["backend"] == "reference"
    with pytest.raises(SystemExit) as exc:
        cli.main(["backends", "--device", "nonsense"])
    assert exc.value.code == 2 and "--device 'nonsense' is not a device" in capsys.readouterr().err


def test_progress_eta_from_the_frames_done():
    """Three cases of 4 calls (no warm-up, the agreement call, 3 repeats) over online/offline/end-to-end
    clips of 2/4/2 frames: 32 frames in all; 8 done in 10 s of case time leaves 24, so 30 s."""
    import io

    args = benchmark.parse_args(["--tiny", "--device", "cpu", "--warmup", "0", "--repeats", "3",
                                 "--online-frames", "2", "--frames", "4", "--e2e-frames", "2"])
    now = [100.0]
    out = io.StringIO()
    progress = benchmark.Progress(args, cases=3, stream=out, clock=lambda: now[0])
    assert progress.total == 32
    now[0] += 7  # building is not counted in the rate
    progress.say("building", case=False)
    progress.say("fast-fp32 online 32x32")
    progress.advance(progress.units("online", 4))
    now[0] += 10
    progress.say("fast-fp32 offline 32x32")
    progress.drop("end-to-end")  # 8 frames that will not run
    progress.say("next")
    lines = out.getvalue().splitlines()
    assert "ETA after the first case" in lines[1] and "0:07 elapsed" in lines[1]
    assert lines[2].split()[:3] == ["[", "25%]", "fast-fp32"] and lines[2].endswith("0:17 elapsed, ETA 0:30")
    assert lines[3].endswith("ETA 0:20")  # 16 frames left at 0.8 frames/s


def test_results_go_outside_the_working_tree_unless_asked(tmp_path, monkeypatch, capsys):
    """``python -m bench`` in a checkout leaves ``git status`` clean: without ``--out-dir`` the JSON goes to
    the results folder ($VIDEOMT_FAST_RESULTS_DIR, else the user's cache), never under the current folder.
    Mutation caught: the former default ``bench/results`` under the current directory."""
    work, results = tmp_path / "checkout", tmp_path / "results"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("VIDEOMT_FAST_RESULTS_DIR", str(results))
    assert benchmark.main(TINY_RUN + ["--size", "32x32", "--providers", "fast-ref", "--peers", "none",
                                      "--mode", "online"]) == 0
    assert os.listdir(work) == []
    (path,) = results.glob("*.json")
    assert str(path) in capsys.readouterr().out
    monkeypatch.delenv("VIDEOMT_FAST_RESULTS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert benchmark.results_dir() == str(tmp_path / "cache" / "videomt_fast" / "results")


@pytest.mark.parametrize("decided", ["bfloat16", "float32"])
def test_fast_row_is_labelled_with_the_dtype_its_plan_decided(decided, tmp_path, monkeypatch):
    """On a CPU the fast path's dtype is its plan's (timed) decision: the rows name and carry the dtype that
    decision chose, whichever it was (the decision stubbed here; its own tests are in test_plans.py)."""
    from videomt_fast.runtime import plans

    monkeypatch.setenv("VIDEOMT_FAST_PLAN_CACHE", str(tmp_path / "plans"))  # the stub's verdict stays here

    def decide(model, rows, size, timer=None, budget=None, times=None):
        return {"dtype": decided, "reason": "stub", "float32_ms": 2.0, "bfloat16_ms": 1.0,
                "weights": plans.weights_fingerprint(model)}

    monkeypatch.setattr(plans, "choose_cpu_dtype", decide)
    rc = benchmark.main(TINY_RUN + ["--mode", "online", "--mode", "offline", "--providers", "hf-eager-fp32,fast",
                                    "--peers", "none", "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    (path,) = (tmp_path / "out").glob("*.json")
    rows = [r for r in json.loads(path.read_text())["rows"] if r["provider"] == "fast"]
    assert {r["mode"] for r in rows} == {"online", "offline"}
    label = benchmark.provider_label("fast", getattr(torch, decided))
    assert all(r["label"] == label and r["dtype"] == decided and r["status"] == "ok" for r in rows), rows


def test_progress_names_the_dtype_that_will_run():
    """The progress line and the row agree on the dtype (on a CPU transformers' SDPA rows run float32 and
    are labelled so; the fast path's dtype is its plan's decision)."""
    import argparse

    cpu = argparse.Namespace(dtype=torch.float32, fast_dtype="auto", device=torch.device("cpu"))
    assert benchmark.building_label("hf-sdpa-bf16", cpu) == "hf-sdpa-fp32"
    assert benchmark.building_label("hf-eager-fp32", cpu) == "hf-eager-fp32"
    assert benchmark.building_label("fast", cpu) == "fast (dtype decided by its plan)"
    gpu = argparse.Namespace(dtype=torch.bfloat16, fast_dtype="auto", device=torch.device("cuda"))
    assert benchmark.building_label("hf-sdpa-bf16", gpu) == "hf-sdpa-bf16"
    assert benchmark.building_label("fast", gpu) == "fast-bf16"
