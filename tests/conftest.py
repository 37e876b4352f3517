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
    if _MODE.interpret and _MODE.skip_gpu is not None:
        # A CPU run on a CUDA machine: the devices are hidden, so that a test that takes CUDA when it is there
        # (a default device) runs on the CPU as in CI, never interpreted Triton on CUDA tensors.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        _HIDDEN = not torch.cuda.is_available()


def pytest_report_header(config):
    hidden = {None: "", True: "; CUDA devices hidden from this run",
              False: "; CUDA was initialized before the devices could be hidden"}[_HIDDEN]
    return f"videomt_fast triton: {_MODE.why}{hidden}"


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
