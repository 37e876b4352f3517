"""README.md's Python examples run as written, on a CPU.

Every ```python block of README.md runs in a fresh Python process, from the repository root, unless a
marker (an HTML comment, invisible on GitHub) on the line just before the block says otherwise:

    <!-- readme-test: continue -->       the block goes on from the block before it (same process, its names
                                         defined); a chain of such blocks is one test
    <!-- readme-test: skip REASON -->    the block is not run (say why: e.g. it needs a GPU or the network)

Hub ids the examples load (``from_pretrained("org/name")``) come from a Hugging Face cache built for the
test, offline (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``): each id holds a tiny random checkpoint of the
same kind (EoMT when the id names eomt, EoMT-DINOv3 when it also names dinov3, else VidEoMT) saved by
transformers, so the code runs unchanged, as it does for a user who has the real model in their cache.
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
HUB_ID = re.compile(r"""from_pretrained\(\s*["']([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)["']""")
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


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding a tiny random checkpoint under every hub id the README loads."""
    transformers = pytest.importorskip("transformers")
    cache = tmp_path_factory.mktemp("hf-cache")
    ids = sorted({m for _, code, _ in PROGRAMS for m in HUB_ID.findall(code)})
    small = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_blocks=2, num_queries=8,
                 num_labels=5, image_size=640)
    for repo_id in ids:
        eomt = "eomt" in repo_id.lower() and "videomt" not in repo_id.lower()
        name = "EomtDinov3" if eomt and "dinov3" in repo_id.lower() else "Eomt" if eomt else "Videomt"
        config = getattr(transformers, f"{name}Config")(**small)
        cls = getattr(transformers, f"{name}ForUniversalSegmentation")
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        import torch

        torch.manual_seed(0)
        cls(config).eval().save_pretrained(repo / "snapshots" / commit)
    return cache


@pytest.mark.parametrize("name,code,skip", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_readme_python_runs_as_written(name, code, skip, hub_cache, tmp_path):
    if skip:
        pytest.skip(f"{name}: {skip}")
    script = tmp_path / "readme_example.py"
    script.write_text(code, encoding="utf-8")
    # run outside the checkout (its kernels/ folder must not shadow the PyPI package of that name)
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{name} failed as written:\n{code}\n--- output ---\n{proc.stdout}\n{proc.stderr}"
