"""The CUDA C++ sources compile: every .cu with nvcc for sm_80 and sm_90, the binding with g++ against
torch's headers and the CUDA runtime headers. Runs without a GPU (CI); skipped without nvcc / g++."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from videomt_fast.ops import _ext

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


def _cuda_include() -> str | None:
    if NVCC is None:
        return None
    root = Path(os.path.realpath(NVCC)).parent.parent
    for candidate in (root / "include", Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"):
        if (candidate / "cuda_runtime_api.h").is_file():
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Start every compile at once (they are independent), return {name: (returncode, output)}."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("csrc")
    jobs = {}
    gencode = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    for cu in sorted(CSRC.glob("*.cu")):
        cmd = [NVCC, "-c", "-std=c++17", "-O3", *gencode, "-Xcompiler", "-Wall", "-Werror", "all-warnings",
               str(cu), "-o", str(out / (cu.stem + ".o"))]
        jobs[cu.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if GXX is not None and _cuda_include() is not None:
        import torch.utils.cpp_extension as cpp

        includes = [f"-I{p}" for p in cpp.include_paths()] + [f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
        cmd = [GXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type", "-DTORCH_EXTENSION_NAME=_C",
               "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, str(CSRC / "bindings.cpp")]
        jobs["bindings.cpp"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, proc in jobs.items():
        text, _ = proc.communicate(timeout=300)
        results[name] = (proc.returncode, text)
    return results


def test_sources_exist_and_are_found():
    assert _ext.sources_dir() == CSRC
    assert {p.name for p in CSRC.glob("*.cu")} == {n for n in _ext.SOURCES if n.endswith(".cu")}


@pytest.mark.parametrize("name", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cu_compiles_for_sm80_and_sm90(compiles, name):
    code, text = compiles[name]
    assert code == 0, f"nvcc failed on {name}:\n{text[-4000:]}"


def test_binding_compiles_against_torch_headers(compiles):
    if "bindings.cpp" not in compiles:
        pytest.skip("g++ or the CUDA runtime headers not found")
    code, text = compiles["bindings.cpp"]
    assert code == 0, f"g++ failed on bindings.cpp:\n{text[-4000:]}"


def test_kernels_use_only_cuda_headers():
    """The .cu files must build against a CPU torch: no ATen/c10/torch includes."""
    for path in list(CSRC.glob("*.cu")) + list(CSRC.glob("*.cuh")) + list(CSRC.glob("*.h")):
        for line in path.read_text().splitlines():
            if line.strip().startswith("#include"):
                assert not any(k in line for k in ("ATen/", "c10/", "torch/")), f"{path.name}: {line}"


def test_package_imports_without_the_extension():
    """Import never touches the extension; CPU calls run the reference with no notice."""
    code = (
        "import sys, warnings; warnings.simplefilter('error');"
        "import videomt_fast.processing.video_processor, videomt_fast.ops.postprocess;"
        "assert 'videomt_fast._C' not in sys.modules and 'videomt_fast.ops.cuda' not in sys.modules;"
        "import torch; from videomt_fast.processing.video_processor import VideomtVideoProcessor as P;"
        "from types import SimpleNamespace as S;"
        "o = S(class_queries_logits=torch.randn(1, 4, 3), masks_queries_logits=torch.randn(1, 4, 6, 6));"
        "P().post_process_panoptic_segmentation(o, [(9, 9)]);"
        "assert 'videomt_fast._C' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(CSRC.parent))


def test_a_stale_build_lock_is_cleared_and_a_live_one_is_not_waited_on_forever(tmp_path, monkeypatch):
    """torch's just-in-time builder waits on another build's lock file forever: a build killed while holding
    it (a phase at its time limit) would hang every later load. A lock older than the longest build is
    removed; a fresh one is waited on for a bounded time, then named in the error. Mutation caught: a load
    that calls torch's builder directly (it never returns here)."""
    import os
    import time

    build = tmp_path / "postprocess-0123"
    build.mkdir()
    lock = build / "lock"
    lock.write_text("")
    old = time.time() - _ext.LOCK_STALE_S - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        _ext.wait_for_lock(build, timeout_s=0)
    assert not lock.exists()
    lock.write_text("")  # a live build's lock
    with pytest.raises(RuntimeError, match="holds .*lock"):
        _ext.wait_for_lock(build, timeout_s=0)
    assert lock.exists()
    monkeypatch.setenv("VIDEOMT_FAST_EXT_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning):
        assert _ext.clear_locks() == [lock]  # the only builder on its machine clears whatever is there
    assert not lock.exists()
