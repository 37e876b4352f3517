"""Shared tools of the CPU test suite: tiny configs, random models and inputs, comparisons, recorders.

Imported as ``helpers`` (pytest puts ``tests/`` on the path for any working directory); test modules
import from here, never from each other.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from videomt_fast.testing.kernel_checks import FP32_REL_TOL, rel_err  # noqa: F401 - one definition, re-exported

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("class_queries_logits", "masks_queries_logits", "last_hidden_state")

TINY = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_blocks=2,
    num_queries=7,
    image_size=48,
    num_labels=5,
)

# norm weights are drawn around 1, like trained ones, so no layer collapses its input
_NORM_WEIGHTS = ("norm1.weight", "norm2.weight", "layernorm.weight")


# ----------------------------------------------------------------------------------- models and inputs


def hf_videomt(**overrides):
    import transformers

    config = transformers.VideomtConfig(**{**TINY, **overrides})
    return transformers.VideomtForUniversalSegmentation(config).eval()


def hf_eomt(**overrides):
    import transformers

    config = transformers.EomtConfig(**{**TINY, **overrides})
    return transformers.EomtForUniversalSegmentation(config).eval()


# EoMT-DINOv3: TINY's shapes, an MLP size of its own, DINOv3's LayerNorm eps
TINY_DINOV3 = dict(TINY, intermediate_size=96, layer_norm_eps=1e-5)


def hf_eomt_dinov3(**overrides):
    import transformers

    config = transformers.EomtDinov3Config(**{**TINY_DINOV3, **overrides})
    return transformers.EomtDinov3ForUniversalSegmentation(config).eval()


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter fresh non-trivial values (layer scales, norms, registers, query table and
    updater included), reproducibly, so parity tests cannot pass on identity-like initialisations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 0.5 if param.ndim <= 1 or "token" in name else max(param.shape[-1], 1) ** -0.5
            offset = 1.0 if name.endswith(_NORM_WEIGHTS) else 0.0
            param.copy_(torch.randn(param.shape, generator=gen) * std + offset)
        for module in model.modules():  # a fused bias keeps zeros where the config has no bias (DINOv3's key)
            if getattr(module, "qkv_biases", None) and module.qkv.bias is not None:
                for part, real in enumerate(module.qkv_biases):
                    if not real:
                        module.qkv.bias.view(3, -1)[part] = 0
    return model


def resized_hf_oracle(hf, grid):
    """transformers' own model (VidEoMT or EoMT) run at another patch grid: its position table resized as
    timm/DINOv2 do (bicubic, antialiased) and its head told the new grid. transformers itself only runs
    its native size."""
    import copy

    big = copy.deepcopy(hf)
    gh0 = hf.config.image_size // hf.config.patch_size
    weight = hf.embeddings.position_embeddings.weight.detach()
    table = weight.reshape(1, gh0, gh0, -1).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(table, size=grid, mode="bicubic", antialias=True, align_corners=False)
    big.embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(
        table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    )
    big.embeddings.position_ids = torch.arange(grid[0] * grid[1])[None]
    big.grid_size = tuple(grid)
    return big


def video(batch=1, frames=2, height=48, width=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, height, width, generator=gen)


def images(batch=1, height=48, width=None, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, height if width is None else width, generator=gen)


# ------------------------------------------------------------------------------------------ comparisons


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a.double() - b.double()).abs().max().item()


def assert_outputs_close(out, ref, atol: float = 1e-4, fields=FIELDS) -> None:
    """Every output field within ``atol`` (max abs) of ``ref``'s; the message names the field."""
    for field in fields:
        err = max_abs(getattr(out, field), getattr(ref, field))
        assert err <= atol, f"{field}: max abs error {err:.3g} > {atol}"


def assert_outputs_equal(out, ref, fields=FIELDS) -> None:
    for field in fields:
        a, b = getattr(out, field), getattr(ref, field)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{field} differs (max abs {max_abs(a, b):.3g})"


def agreement(out, ref) -> tuple[float, float]:
    """(fraction of mask pixels whose sign agrees, fraction of queries whose class argmax agrees)."""
    masks = ((out.masks_queries_logits > 0) == (ref.masks_queries_logits > 0)).float().mean().item()
    classes = (out.class_queries_logits.argmax(-1) == ref.class_queries_logits.argmax(-1)).float().mean().item()
    return masks, classes


# --------------------------------------------------------------------------------- dispatch recording


class BackendRecorder:
    """Counts which backend every ``ops.call`` picked (``picked[(op, backend)]``) and keeps the
    arguments of the calls of the ops named in ``keep`` (``calls[op]``: list of argument tuples)."""

    def __init__(self, monkeypatch, keep: tuple[str, ...] = ()):
        from videomt_fast import ops

        self.picked: collections.Counter = collections.Counter()
        self.calls: dict[str, list] = collections.defaultdict(list)
        real = ops.registry.choose

        def choose(name, *args, **kwargs):
            backend, fn, why = real(name, *args, **kwargs)
            self.picked[(name, backend)] += 1
            if name in keep:
                self.calls[name].append(args)
            return backend, fn, why

        monkeypatch.setattr(ops.registry, "choose", choose)

    def backends(self, name: str) -> set[str]:
        return {b for (n, b) in self.picked if n == name}


# ----------------------------------------------------------------------------------------- checkpoints


def to_research_keys(hf):
    """transformers names -> tue-mps research-code names (timm DINOv2 with registers inside the wrapper)."""
    cfg = hf.config
    out = {}
    for key, value in hf.state_dict().items():
        if key.startswith("criterion") or key == "embeddings.mask_token":
            continue
        rk = (
            key.replace("embeddings.cls_token", "encoder.backbone.cls_token")
            .replace("embeddings.register_tokens", "encoder.backbone.reg_token")
            .replace("embeddings.patch_embeddings.projection", "encoder.backbone.patch_embed.proj")
            .replace("attention.out_proj", "attn.proj")
            .replace(".attention.", ".attn.")
            .replace("layer_scale1.lambda1", "ls1.gamma")
            .replace("layer_scale2.lambda1", "ls2.gamma")
            .replace("upscale_block.block.", "upscale.")
            .replace("layernorm2d", "norm")
            .replace("mask_head.fc1", "mask_head.0")
            .replace("mask_head.fc2", "mask_head.2")
            .replace("mask_head.fc3", "mask_head.4")
            .replace("class_predictor", "class_head")
            .replace("query.weight", "q.weight")
        )
        if rk.startswith("layers."):
            rk = "encoder.backbone.blocks." + rk[len("layers.") :]
        if rk.startswith("layernorm."):
            rk = "encoder.backbone.norm." + rk[len("layernorm.") :]
        if key == "embeddings.position_embeddings.weight":
            rk, value = "encoder.backbone.pos_embed", value[None]
        out["backbone." + rk] = value
    fused = {}
    for key in list(out):
        if ".attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            base = key.split(".attn.")[0]
            fused[f"{base}.attn.qkv.{kind}"] = torch.cat(
                [out.pop(f"{base}.attn.{p}_proj.{kind}") for p in "qkv"], dim=0
            )
    out.update(fused)
    assert not [k for k in out if "_proj" in k]
    return out


# ---------------------------------------------------------------------------------- post-processing


def random_outputs(frames, queries, num_labels, h, w, seed, dtype=torch.float32, layout="blobs"):
    """Logits that make real segments: peaked classes for half the queries, then either overlapping
    blob masks ("blobs", the instance case) or near-partition Voronoi cells with some duplicated,
    shifted centres ("cells", so panoptic has valid segments and overlap rejections), plus noise."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(frames, queries, num_labels + 1, generator=g) * 1.5
    confident = torch.rand(frames, queries, generator=g) < 0.5
    peak = torch.randint(0, num_labels, (frames, queries), generator=g)
    boost = 4.0 + 4.0 * torch.rand(frames, queries, generator=g)
    cls.scatter_add_(2, peak[..., None], (confident * boost)[..., None])
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    cy, cx = torch.rand(2, frames, queries, 1, 1, generator=g)
    noise = 0.8 * torch.randn(frames, queries, h, w, generator=g)
    if layout == "blobs":
        radius = 0.1 + 0.35 * torch.rand(frames, queries, 1, 1, generator=g)
        dist = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        masks = 12.0 * (radius - dist) / radius + noise
    else:
        dist = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()  # (F, Q, h, w)
        two = dist.topk(2, dim=1, largest=False).values
        other = torch.where(dist <= two[:, :1], two[:, 1:2], two[:, :1])  # distance to the nearest other centre
        masks = 40.0 * (other - dist) + noise
        # a quarter of the queries repeat another query's cell, a little dilated: one of each pair loses
        dup = torch.rand(frames, queries, 1, 1, generator=g) < 0.25
        src = torch.randint(0, queries, (frames, queries, 1, 1), generator=g).expand(-1, -1, h, w)
        masks = torch.where(dup, masks.gather(1, src) + 1.5, masks)
    return SimpleNamespace(class_queries_logits=cls.to(dtype), masks_queries_logits=masks.to(dtype))


def paired(*sequences, allow_empty: bool = False):
    """``zip`` for parity loops: the sequences must have the same length (and, unless ``allow_empty``, not be
    empty), so a result that is truncated, or empty on both sides, cannot pass by having nothing to compare.
    Mutations it catches (each applied once): semantic post-processing returning only the first frame (the
    3- and 5-frame parity cases of tests/test_postprocess.py fail), ``EomtImageProcessor`` dropping every
    ``mask_labels``/``class_labels`` (tests/test_dropin_processors.py's segmentation-map cases fail), EoMT
    instance/panoptic post-processing returning ``[]`` (its empty-results cases fail)."""
    lists = [list(s) for s in sequences]
    lengths = [len(s) for s in lists]
    assert len(set(lengths)) == 1, f"lengths differ: {lengths}"
    assert allow_empty or lengths[0] > 0, "nothing to compare"
    return zip(*lists)


def assert_segments_equal(expected, got, tol=1e-5):
    for f, (e, o) in enumerate(paired(expected, got)):
        assert o["segmentation"].dtype == torch.long
        assert o["segmentation"].shape == e["segmentation"].shape
        diff = (o["segmentation"] != e["segmentation"]).sum().item()
        assert diff == 0, f"frame {f}: {diff} pixels differ"
        ei, oi = e["segments_info"], o["segments_info"]
        assert [(s["id"], s["label_id"]) for s in oi] == [(s["id"], s["label_id"]) for s in ei], f"frame {f}"
        for s_e, s_o in paired(ei, oi, allow_empty=True):  # (ids compared above)
            assert abs(s_e["score"] - s_o["score"]) <= tol, (f, s_e, s_o)
            assert s_o["score"] == round(s_o["score"], 6)


# ------------------------------------------------------------------------------------------- scripts


def load_bench(name: str):
    """``bench/<name>.py`` as a module, found from this file (not from the working directory), without
    putting the checkout on ``sys.path`` (its ``kernels/`` folder would shadow the PyPI ``kernels``)."""
    key = f"_videomt_fast_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def assert_plans_ran_verified_kernels(model) -> dict:
    """A GPU test's check of what ran: the model holds plans (calibrated in this run), every Triton and CUDA
    candidate at every op site was verified on the device (none excluded as wrong, raising or NaN: a plan
    that dropped them would pass the comparisons on reference ops alone), and each plan's tables hold the
    chosen implementations. Returns ``{site: chosen}`` of the last plan."""
    from videomt_fast import ops
    from videomt_fast.runtime import plans as plans_mod
    from videomt_fast.runtime.fast import plans_of

    built = [p for p in plans_of(model) if p.mode in ("calibrated", "cached")]
    assert built, "no calibrated plan: the test ran unplanned code"
    for plan in built:
        for site in plan.sites.values():
            for c in site.candidates:
                if c.name.startswith(("triton", "cuda")):
                    assert c.status != "excluded" or c.reason.startswith("refuses"), \
                        f"{site.key}: {c.name} excluded on the device ({c.reason})\n{plan.format()}"
            if site.stage not in plans_mod.UNTABLED:
                chosen = ops.candidates(site.op, plan.device)[site.chosen][0]
                assert getattr(plan.table(site.stage), site.op) is chosen, f"{site.key} runs another implementation"
    return built[-1].choices()
