import os

import pytest
import torch

from videomt_fast.testing.pytest_mode import triton_mode

pytest_plugins = ["ci_policy"]  # skips CI must not accept (tests/ci_policy.py)

# optimize() on a CPU may compile a session's frame step (tens of seconds per model and shape); the tests
# that exercise it (tests/test_compiled_step.py) choose the mode themselves, the rest run the op plans
os.environ.setdefault("VIDEOMT_FAST_COMPILE", "off")


def _cuda_available() -> bool:
    # torch.cuda.device_count() asks NVML while CUDA is not initialized, so the devices can still be
    # hidden from this process afterwards (pytest_configure). VIDEOMT_FAST_TEST_ASSUME_CUDA=1 lets a CPU
    # machine take the CUDA branch of the decision (tests/test_gpu_smoke.py); it never makes a device appear.
    return torch.cuda.device_count() > 0 or os.environ.get("VIDEOMT_FAST_TEST_ASSUME_CUDA") == "1"


_MODE = None
_HIDDEN = None  # whether this run hid the CUDA devices (None: it did not try)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    # Triton reads TRITON_INTERPRET when a kernel is decorated: this runs before any test module is
    # imported, so before anything imports videomt_fast.kernels.
    global _MODE, _HIDDEN
    _MODE = triton_mode(_cuda_available(), os.environ.get("TRITON_INTERPRET"), config.getoption("markexpr"))
    os.environ["TRITON_INTERPRET"] = _MODE.env_value
    if not _MODE.interpret:
        # the gpu tests compare graphed and eager runs bit for bit: one cuBLAS workspace size on every stream
        # (the capture stream included) so both pick the same algorithms; read when cuBLAS starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if _MODE.interpret and _MODE.skip_gpu is not None:
        # A CPU run on a CUDA machine: the devices are hidden, so that a test that takes CUDA when it is there
        # (a default device) runs on the CPU as in CI, never interpreted Triton on CUDA tensors.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        _HIDDEN = not torch.cuda.is_available()


def pytest_report_header(config):
    hidden = {None: "", True: "; CUDA devices hidden from this run",
              False: "; CUDA was initialized before the devices could be hidden"}[_HIDDEN]
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    same = f"; CUBLAS_WORKSPACE_CONFIG={cublas} (graphed and eager runs pick the same algorithms)" \
        if not _MODE.interpret and cublas else ""
    return f"videomt_fast triton: {_MODE.why}{hidden}{same}"


def pytest_collection_modifyitems(config, items):
    if _MODE.skip_gpu is not None:
        reason = _MODE.skip_gpu
    elif not torch.cuda.is_available():
        reason = "needs a CUDA device"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _plan_cache(tmp_path_factory):
    """Plans (and compiled steps) of this run in a folder of its own, unless the caller named one
    (bench/gpu_smoke.py: one per call): a plan cached by an earlier run of other code never decides what a
    test checks, and the suite leaves the user's cache alone."""
    if "VIDEOMT_FAST_PLAN_CACHE" in os.environ:
        yield
        return
    os.environ["VIDEOMT_FAST_PLAN_CACHE"] = str(tmp_path_factory.mktemp("plans"))
    try:
        yield
    finally:
        os.environ.pop("VIDEOMT_FAST_PLAN_CACHE", None)


@pytest.fixture(autouse=True)
def _gpu_determinism(request):
    """For gpu tests: deterministic cuDNN algorithms, so graphed and eager convolutions agree bit for bit."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    deterministic, benchmark = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark
