"""tests/ci_policy.py: under CI a skip fails unless it is an allowed one; without CI it is listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SUITE = '''
import pytest

missing = pytest.importorskip("videomt_fast_no_such_module")
'''
FIXTURE = '''
import pytest

@pytest.fixture
def oracle():
    pytest.skip("transformers' processor unavailable: no Pillow")

def test_parity(oracle):
    pass

def test_runs():
    pass

@pytest.mark.gpu
def test_on_gpu():
    pytest.skip("needs a CUDA device")
'''


def _pytest(tmp_path, files: dict[str, str], ci: str | None):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_policy", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("ci", ["1", "true"])
def test_ci_fails_a_skipped_fixture_and_a_skipped_module(tmp_path, ci):
    proc = _pytest(tmp_path, {"test_fixture.py": FIXTURE, "test_module.py": SUITE}, ci)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "CI: skipped tests fail under CI (Skipped: transformers' processor unavailable: no Pillow)" in out, out
    summary = out.split("skipped, failing the run under CI (tests/ci_policy.py)", 1)[1]
    assert "test_module.py: Skipped: could not import 'videomt_fast_no_such_module'" in summary, out
    assert "1 passed, 2 skipped, 1 error" in out, out  # the rest of the run went on; the gpu skip stays one


def test_without_ci_skips_are_listed_not_failed(tmp_path):
    proc = _pytest(tmp_path, {"test_fixture.py": FIXTURE, "test_module.py": SUITE}, "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 3 skipped" in proc.stdout, proc.stdout
    summary = proc.stdout.split("skips that CI fails (tests/ci_policy.py)", 1)[1]
    assert "test_fixture.py::test_parity: Skipped: transformers' processor unavailable: no Pillow" in summary
    assert "test_module.py" in summary and "test_on_gpu" not in summary


def test_allowed_list_names_real_tests():
    """Every allowed entry points at a file that exists (a renamed test must not widen the policy)."""
    import ci_policy

    for prefix, fragment, why in ci_policy.ALLOWED:
        path = prefix.split("::")[0]
        assert (TESTS.parent / path).is_file(), prefix
        if "::" in prefix:
            assert f"def {prefix.split('::')[1]}(" in (TESTS.parent / path).read_text(), prefix
        assert fragment and why


def test_the_readme_allowance_is_only_for_blocks_the_readme_marks():
    """The README test's allowance matches its own marker's reason only: a missing dependency there (an
    importorskip in its fixture: "could not import 'transformers': ...") still fails CI. Mutation caught:
    an allowance by a fragment as common as ": " (the former one), which let every README example skip."""
    import ci_policy

    node = "tests/test_readme.py::test_readme_python_runs_as_written[README.md:80+95]"
    assert ci_policy.allowed(node, {}, "README.md:80+95: marked in README.md as skipped: needs a GPU")
    assert ci_policy.allowed(node, {}, "could not import 'transformers': No module named 'transformers'") is None
    assert ci_policy.allowed(node, {}, "README.md:80: some other reason") is None


BLOCK = """
import sys
sys.modules["av"] = None  # a machine without PyAV and pycocotools (the GPU image): their imports fail
sys.modules["pycocotools"] = None
"""


@pytest.mark.parametrize("ci", ["0", "1"])
def test_tests_needing_pyav_or_pycocotools_skip_where_missing_and_fail_ci(tmp_path, ci):
    """Where PyAV or pycocotools is missing the tests that need them skip naming it (a GPU machine runs the
    suite without them), and under CI the skip fails (CI installs the test extra). Mutation caught: a
    test that imports them unguarded (it errors instead of skipping)."""
    (tmp_path / "no_video_deps.py").write_text(BLOCK)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CI=ci, PYTHONPATH=str(tmp_path) + os.pathsep + env.get("PYTHONPATH", ""))
    nodes = ["tests/test_demo.py::test_palette_png_round_trip",
             "tests/test_tracks.py::test_youtube_vis_category_ids_are_one_based"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no_video_deps", "-q", "-p", "no:cacheprovider",
                           "-rs", *nodes], capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=300)
    out = proc.stdout + proc.stderr
    if ci == "0":
        assert proc.returncode == 0 and "2 skipped" in out, out
        assert "needs PyAV" in out and "needs pycocotools" in out, out
    else:
        assert proc.returncode == 1 and "2 failed" in out and "CI: skipped tests fail under CI" in out, out
