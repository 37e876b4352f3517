"""The dispatch point: every op has a reference, choices are explained, switches work."""

import subprocess
import sys

import pytest
import torch

from videomt_fast import ops
from videomt_fast.ops import reference


def test_every_op_has_a_reference_and_a_doc():
    names = ops.op_names()
    for name in ("attention", "mask_bits", "layer_norm", "residual_layer_norm", "linear_gelu",
                 "linear_residual", "query_update"):
        assert name in names
    report = ops.backend_report("cpu")
    for name, row in report.items():
        assert row["backend"] == "reference"
        assert "reference" in row["available"]
        assert row["doc"]


def test_cpu_tensors_run_the_reference_with_a_reason():
    x = torch.randn(2, 5, 8)
    w, b = torch.randn(8), torch.randn(8)
    backend, fn, why = ops.choose("layer_norm", x, w, b, 1e-6)
    assert backend == "reference" and fn is reference.layer_norm_ref
    assert "cpu" in why
    assert ops.explain("layer_norm", x, w, b, 1e-6).startswith("layer_norm: reference")


def test_forcing_and_disabling(monkeypatch):
    x = torch.randn(2, 5, 8)
    args = (x, torch.randn(8), torch.randn(8), 1e-6)
    with ops.use_backend("reference"):
        assert "forced" in ops.choose("layer_norm", *args)[2]
    monkeypatch.setenv("VIDEOMT_FAST_DISABLE", "layer_norm")
    assert "disabled" in ops.choose("layer_norm", *args)[2]
    monkeypatch.setenv("VIDEOMT_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VIDEOMT_FAST_BACKEND"):
        ops.choose("layer_norm", *args)
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("bogus"):
            pass


def test_mask_bit_packing_round_trip():
    allowed = torch.rand(2, 3, 77) > 0.5
    packed = reference.pack_mask_bits(allowed)
    assert packed.dtype == torch.int32 and packed.shape == (2, 3, 3)
    assert torch.equal(reference.unpack_mask_bits(packed, 77), allowed)


def test_masked_attention_reference_matches_dense_mask():
    b, q, prefix, p, heads, hd = 2, 3, 5, 11, 2, 8
    n = prefix + p
    qkv = torch.randn(b, n, 3 * heads * hd)
    allowed = torch.rand(b, q, p) > 0.5
    allowed[0, 0] = False  # a query with no patch still sees its non-patch columns
    out = reference.attention_ref(qkv, heads, reference.pack_mask_bits(allowed), q, prefix)
    qh, kh, vh = qkv.view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    scores = qh @ kh.transpose(-1, -2) * hd**-0.5
    mask = torch.zeros(b, n, n)
    mask[:, :q, prefix:] = (~allowed).float() * -1e9
    dense = (scores + mask[:, None]).softmax(-1) @ vh
    assert torch.isfinite(out).all()
    assert (out - dense.transpose(1, 2).reshape(b, n, -1)).abs().max() < 1e-5


def test_package_never_imports_transformers_or_triton():
    code = (
        "import sys, torch, videomt_fast\n"
        "m = videomt_fast.VideomtForUniversalSegmentation(videomt_fast.VideomtConfig(hidden_size=32, "
        "num_hidden_layers=2, num_attention_heads=2, num_blocks=1, num_queries=3, image_size=32))\n"
        "m(pixel_values_videos=torch.randn(1, 2, 3, 32, 32))\n"
        "print(sorted(k for k in ('transformers', 'triton') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_kernels_folder_defers_to_the_pypi_package_under_the_top_level_name():
    """From a source checkout the kernels/ folder is also importable as ``kernels``, the name of another
    PyPI package that transformers imports when installed. Under that name it must register nothing, and
    must hand the import to that package when it is installed (transformers then finds what it expects)."""
    import os

    code = (
        "import sys, os, kernels\n"
        "print(os.path.dirname(os.path.abspath(kernels.__file__)))\n"
        "print('videomt_fast.ops' in sys.modules, [k for k in sys.modules if k.startswith('kernels.')][:1])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    folder, state = out.stdout.strip().splitlines()

    # is the PyPI package installed? asked without this checkout on the path (a run from the checkout by
    # PYTHONPATH, as on the GPU machine, would find this very folder)
    path = os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                           if p and os.path.abspath(p) != root)
    env = dict(os.environ, PYTHONPATH=path)
    spec = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                           "print(s.origin if s else '')"], capture_output=True, text=True, cwd="/", env=env)
    installed = spec.stdout.strip()
    if installed:  # the PyPI package: the top-level name must resolve to it, not to this folder
        assert folder == os.path.dirname(installed) != os.path.join(root, "kernels"), out.stdout
    else:
        assert folder == os.path.join(root, "kernels") and state == "False []", out.stdout
