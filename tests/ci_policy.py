"""The suite's skip policy: under CI a skip is a failure unless it is one of the few listed here.

A test that skips because a test dependency is missing (transformers' processor module, Pillow,
pycocotools, Ray, nvcc, g++) proves nothing while looking green. With ``CI`` set (``.ci/run`` and the
usual CI services set it; ``CI=0`` or ``false`` turns it off) such a skip in a fixture or in the test
is reported as a failure naming the reason; a skipped module is listed at the end and fails the exit
status (failing its collection would stop the whole run). Without ``CI`` the run is not changed,
but the end of the report lists every skip that CI would fail, so the README's test command never
skips them quietly.

Allowed skips (they need hardware CI does not have, or are the long sweep with a cheaper CI twin):
see ``ALLOWED``.
"""

from __future__ import annotations

import os

import pytest

# (node id prefix, substring of the skip reason, why the skip is accepted)
ALLOWED: tuple[tuple[str, str, str], ...] = (
    ("tests/test_kernels_attention.py", "runs on the GPU", "GPU-sized attention case; smaller ones run on CPU"),
    ("tests/test_kernels_mask_bits.py", "large for the interpreter", "GPU-sized case; smaller ones run on CPU"),
    ("tests/test_gpu_graphs.py", "needs two CUDA devices", "multi-GPU case"),
    ("tests/test_postprocess_cuda.py", "needs two CUDA devices", "multi-GPU case"),
    ("tests/test_readme.py::test_readme_python_runs_as_written", "marked in README.md as skipped: ",
     "README blocks marked <!-- readme-test: skip REASON --> in README.md itself (e.g. they need a GPU)"),
    ("tests/test_postprocess.py::test_preprocess_matches_transformers_processor", "needs torchvision",
     "not a declared dependency; PyPI's torchvision does not load with a CPU torch (torchvision::nms missing). "
     "The settings and the arithmetic are still checked against transformers' processor class"),
    ("tests/test_segment_hostile.py::test_unreadable_folder_is_reported", "cannot take away the right to read",
     "root in a container without CAP_SETPCAP can read every folder, so none can be made unreadable there"),
    ("tests/test_dinov3_fast.py::test_compiled_frame_step_is_chosen_and_matches", "-m slow",
     "a second AOTInductor compile (DINOv3); CI compiles a DINOv2 step (test_compiled_step.py) and exports the "
     "DINOv3 step (test_compiled_frame_step_exports_and_matches)"),
    ("tests/test_triton_compile.py::test_full_sweep_compiles_for_sm90_and_sm80", "-m slow",
     "ViT-S/B/L x batch 1, 2 sweep; CI compiles the ViT-L launches for sm_90 and sm_80 (test_triton_compile_sm80.py)"),
)
# the skips conftest.py gives `gpu`-marked tests: no CUDA device, or a GPU machine whose CPU run leaves
# them to a run of their own (`-m gpu`: Triton is either interpreted or compiled in one process)
GPU_REASONS = ("needs a CUDA device", "gpu tests need compiled Triton")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def allowed(nodeid: str, keywords, reason: str) -> str | None:
    """Why this skip is accepted, or None when CI must fail it."""
    if "gpu" in keywords and any(r in reason for r in GPU_REASONS):
        return "gpu test: runs on a GPU machine with -m gpu"
    for prefix, fragment, why in ALLOWED:
        if nodeid.startswith(prefix) and fragment in reason:
            return why
    return None


_UNEXPECTED: list[tuple[str, str]] = []
_FAILED_MODULES: list[str] = []


def _judge(report, keywords, collecting: bool) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _reason(report)
    if allowed(report.nodeid, keywords, reason) is not None:
        return
    _UNEXPECTED.append((report.nodeid or "(collection)", reason))
    if not in_ci():
        return
    if collecting:  # failing the collection would stop the whole run: the exit status fails instead
        _FAILED_MODULES.append(report.nodeid)
        return
    report.outcome = "failed"
    report.longrepr = (f"CI: skipped tests fail under CI ({reason}); install the test dependencies "
                       f"(pip install -e '.[test]', nvcc and g++ on PATH) or list the skip in tests/ci_policy.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _judge(outcome.get_result(), item.keywords, collecting=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _judge(outcome.get_result(), getattr(collector, "keywords", {}), collecting=True)


def pytest_sessionfinish(session, exitstatus):
    if _FAILED_MODULES and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if not _UNEXPECTED:
        return
    title = "skipped, failing the run under CI" if in_ci() else "skips that CI fails"
    terminalreporter.section(f"{title} (tests/ci_policy.py)", red=in_ci(), yellow=not in_ci())
    for nodeid, reason in _UNEXPECTED:
        terminalreporter.line(f"{nodeid}: {reason}")
