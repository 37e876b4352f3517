"""transformers' VidEoMT post-processing, loaded without torchvision.

``transformers.models.videomt.video_processing_videomt`` imports ``BaseVideoProcessor``, which needs
torchvision. The post-processing methods need none of it, so we parse that file, drop its relative
imports, supply the few names they provided (the real ``SemanticSegmentationPostProcessorOutput``, an
empty base class, a no-op ``auto_docstring``) and execute the rest in a fresh namespace. The result
is transformers' own code, unmodified, as the oracle.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from types import SimpleNamespace

_CACHE: dict[str, SimpleNamespace] = {}


def _source_path() -> str:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("transformers is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "videomt", "video_processing_videomt.py")
    if not os.path.isfile(path):
        raise ImportError(f"this transformers has no VidEoMT video processor ({path} missing)")
    return path


def load() -> SimpleNamespace:
    """Return ``SimpleNamespace(processor=<transformers' VideomtVideoProcessor instance>, module=<namespace dict>)``."""
    if "oracle" in _CACHE:
        return _CACHE["oracle"]
    import torch
    import torch.nn.functional as F
    from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

    path = _source_path()
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=path)
    names_dropped = set()
    body = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            names_dropped.update(alias.asname or alias.name for alias in node.names)
            continue
        body.append(node)
    tree.body = body

    class _Base:  # stands in for BaseVideoProcessor; the post-processing methods use none of it
        pass

    provided = {
        "SemanticSegmentationPostProcessorOutput": SemanticSegmentationPostProcessorOutput,
        "IMAGENET_DEFAULT_MEAN": [0.485, 0.456, 0.406],
        "IMAGENET_DEFAULT_STD": [0.229, 0.224, 0.225],
        "PILImageResampling": SimpleNamespace(BILINEAR=2),
        "auto_docstring": lambda obj=None, **_: obj if obj is not None else (lambda o: o),
        "is_torch_available": lambda: True,
        "BaseVideoProcessor": _Base,
    }
    missing = names_dropped - set(provided)
    if missing:
        raise ImportError(f"transformers' video_processing_videomt.py now imports {sorted(missing)}; update tests/hf_oracle.py")
    namespace = {"__name__": "hf_videomt_oracle", "__file__": path, "torch": torch, "F": F, **provided}
    exec(compile(tree, path, "exec"), namespace)
    cls = namespace["VideomtVideoProcessor"]
    oracle = SimpleNamespace(processor=cls(), module=namespace, path=path)
    _CACHE["oracle"] = oracle
    return oracle
