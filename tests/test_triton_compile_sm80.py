"""The Triton launches of ViT-L on DINOv2 and DINOv3 (batch 2, bf16 / fp16 / fp32, masked and unmasked attention,
plain and rotary, the gated MLP) compile for
Ampere (sm_80) as well, on a CPU: no compile error, shared memory within sm_80's per-block limit, no
register spills. test_triton_compile.py compiles every launch for sm_90 (and the ViT-S/B/L sweep for
both with -m slow); this is the sm_80 check CI runs. To keep it cheap it compiles, per kernel, dtype and
mask flag, the one launch with the most features on (bias, GELU, scale, add, residual): variants that
differ only in those flags or in argument specialization share tiles, warps and stages, and the one
with all features holds the most registers."""

from __future__ import annotations

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

from videomt_fast.testing import triton_compile as cc  # noqa: E402


def _heaviest(launches):
    """Per (kernel, dtype, HAS_MASK, ROPE, tiles / warps / stages), the launch with the most flags on."""
    picked = {}
    for x in launches:
        flags = {k: v for k, v in x.constexprs.items() if isinstance(v, bool)}
        tiles = tuple(sorted((k, v) for k, v in x.constexprs.items() if not isinstance(v, bool)))
        dtype = next(v for v in x.signature.values() if v.startswith("*"))
        key = (x.name, dtype, flags.get("HAS_MASK"), flags.get("ROPE"), tiles, x.options["num_warps"],
               x.options["num_stages"])
        if key not in picked or sum(flags.values()) > sum(v for v in picked[key].constexprs.values() if isinstance(v, bool)):
            picked[key] = x
    return list(picked.values())


def test_vit_l_launches_compile_for_sm80_without_spills():
    every = cc.dedupe(cc.capture(cc.launch_cases(models=("vit-l", "dinov3-l"), batches=(2,), dtypes=tuple(cc.DTYPES))))
    launches = _heaviest(every)
    kinds = {(x.name, next(v for v in x.signature.values() if v.startswith("*"))) for x in every}
    assert kinds == {(x.name, next(v for v in x.signature.values() if v.startswith("*"))) for x in launches}
    assert {(x.constexprs["HAS_MASK"], x.constexprs["ROPE"]) for x in launches if x.name == "_attention_kernel"} == {
        (True, False), (False, False), (True, True), (False, True)}
    rows = cc.compile_in_subprocess(launches, archs=(80,))
    assert len(rows) == len(launches) and {r["arch"] for r in rows} == {80}
    failed = [f"{r['config']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "sm_80 compile errors:\n" + "\n\n".join(failed)
    too_big = [f"{r['config']}: {r['dynamic_shared']} B" for r in rows if not r["fits_shared"]]
    assert not too_big, f"sm_80 shared memory over the per-block limit: {too_big}"
    spills = [f"{r['config']}: {r['registers']} registers, {r['spill_stores']} B spill stores" for r in rows if r["spills"]]
    assert not spills, "sm_80 register spills:\n" + "\n".join(spills)
