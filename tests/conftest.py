import os

import pytest
import torch

from videomt_fast.testing.pytest_mode import triton_mode

pytest_plugins = ["ci_policy"]  # skips CI must not accept (tests/ci_policy.py)


def _cuda_available() -> bool:
    # VIDEOMT_FAST_TEST_ASSUME_CUDA=1 lets a CPU machine take the CUDA branch of the mode decision
    # (tests/test_gpu_smoke.py checks that branch that way); it never makes a CUDA device appear.
    return torch.cuda.is_available() or os.environ.get("VIDEOMT_FAST_TEST_ASSUME_CUDA") == "1"


_MODE = None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    # Triton reads TRITON_INTERPRET when a kernel is decorated: this runs before any test module is
    # imported, so before anything imports videomt_fast.kernels.
    global _MODE
    _MODE = triton_mode(_cuda_available(), os.environ.get("TRITON_INTERPRET"), config.getoption("markexpr"))
    os.environ["TRITON_INTERPRET"] = _MODE.env_value


def pytest_report_header(config):
    return f"videomt_fast triton: {_MODE.why}"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        reason = "needs a CUDA device"
    elif _MODE.skip_gpu is not None:
        reason = _MODE.skip_gpu
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
