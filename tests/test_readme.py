"""README.md's Python examples run as written, on a CPU.

Every ```python block of README.md runs in a fresh Python process, from the repository root, unless a
marker (an HTML comment, invisible on GitHub) on the line just before the block says otherwise:

    <!-- readme-test: continue -->       the block goes on from the block before it (same process, its names
                                         defined); a chain of such blocks is one test
    <!-- readme-test: skip REASON -->    the block is not run (say why: e.g. it needs a GPU or the network)

The examples run as a newcomer without the network runs them: offline (``HF_HUB_OFFLINE=1``) with an
empty Hugging Face cache, so an example that needs a download fails here (the README's examples use the
packaged demo model; a block that truly needs the network says so with a skip marker).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(continue|skip)\b\s*(.*?)\s*-->")
TIMEOUT_S = 300


def readme_blocks(text: str) -> list[tuple[int, str, str, str]]:
    """``(line, marker, reason, code)`` of every ```python block; ``line`` is 1-based, of the opening fence."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise ValueError(f"README.md:{start + 1}: ```python block is never closed")
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            match = MARKER.search(lines[k]) if k >= 0 else None
            marker, reason = (match.group(1), match.group(2)) if match else ("", "")
            blocks.append((start + 1, marker, reason, "\n".join(lines[start + 1:j]) + "\n"))
            i = j
        i += 1
    return blocks


def readme_programs(text: str) -> list[tuple[str, str, str]]:
    """``(test id, code, skip reason)``: a standalone block with the ``continue`` blocks that follow it."""
    programs: list[list] = []
    for line, marker, reason, code in readme_blocks(text):
        if marker == "continue":
            if not programs:
                raise ValueError(f"README.md:{line}: 'readme-test: continue' on the first python block")
            programs[-1][1] += f"\n# README.md:{line}\n" + code
            programs[-1][0] += f"+{line}"
        else:
            programs.append([f"README.md:{line}", f"# README.md:{line}\n" + code,
                             (reason or "no reason given") if marker == "skip" else ""])
    return [tuple(p) for p in programs]


PROGRAMS = readme_programs(README.read_text(encoding="utf-8"))


def test_readme_has_python_examples_and_the_markers_parse():
    """The parser sees every block (a block that is not found would pass silently)."""
    text = README.read_text(encoding="utf-8")
    assert len(readme_blocks(text)) == text.count("```python") > 0
    sample = "a\n<!-- readme-test: skip needs a GPU -->\n```python\nx = 1\n```\n\n" \
             "<!-- readme-test: continue -->\n\n```python\ny = x\n```\n```python\nz = 2\n```\n"
    assert [(m, r) for _, m, r, _ in readme_blocks(sample)] == [("skip", "needs a GPU"), ("continue", ""), ("", "")]
    programs = readme_programs(sample)
    assert [p[0] for p in programs] == ["README.md:3+9", "README.md:12"]
    assert programs[0][2] == "needs a GPU" and "y = x" in programs[0][1] and programs[1][2] == ""


@pytest.mark.parametrize("name,code,skip", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_readme_python_runs_as_written(name, code, skip, tmp_path):
    if skip:
        pytest.skip(f"{name}: marked in README.md as skipped: {skip}")  # tests/ci_policy.py allows this one only
    script = tmp_path / "readme_example.py"
    script.write_text(code, encoding="utf-8")
    # run outside the checkout (its kernels/ folder must not shadow the PyPI package of that name)
    empty = tmp_path / "hf-cache"
    empty.mkdir()
    env = dict(os.environ, HF_HOME=str(empty), HF_HUB_CACHE=str(empty), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{name} failed as written:\n{code}\n--- output ---\n{proc.stdout}\n{proc.stderr}"


def test_results_folder_holds_what_the_readme_cites():
    """bench/results/ holds exactly the files the README cites as evidence: none missing, none stray (the
    benchmark writes elsewhere unless asked)."""
    text = README.read_text(encoding="utf-8")
    kept = {p.name for p in (ROOT / "bench" / "results").iterdir() if p.is_file()}
    cited = set(re.findall(r"bench/results/([A-Za-z0-9_.+\-]+\.json)", text))
    assert cited <= kept, f"cited but missing: {sorted(cited - kept)}"
    assert kept <= cited, f"in bench/results/ but not cited by the README: {sorted(kept - cited)}"
