"""Apply patch parallelism to an unmodified model from outside, by swapping layers by type."""
from __future__ import annotations

import torch.nn as nn

from parafuse.parallel.adapter import BUILTIN
from parafuse.parallel.engine import ExchangeEngine
from parafuse.parallel.layers import PatchAttention, PatchConv2d, PatchGridPositions, PatchGroupNorm, _adopt

PATCH_LAYERS = {"conv": PatchConv2d, "norm": PatchGroupNorm, "attn": PatchAttention, "positions": PatchGridPositions}


def parallelize(model: nn.Module, engine: ExchangeEngine, adapter=BUILTIN) -> dict[str, int]:
    """Swap patch-aware layers into `model` in place; returns how many of each kind were swapped.

    The adapter says which modules are sites; the model keeps its parameters and state_dict keys.
    Inference only. Idempotent: patch layers already in place are left alone."""
    counts: dict[str, int] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, tuple(PATCH_LAYERS.values())):
                continue
            kind = adapter.site_kind(child)
            if kind is None:
                continue
            cls = PATCH_LAYERS[kind]
            key = f"{parent_name}.{name}" if parent_name else name
            setattr(parent, name, _adopt(cls, child, engine, key))
            counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
    return counts


def unparallelize(model: nn.Module) -> int:
    """Swap every patch layer of `model` back for the plain layer it replaced (same parameters);
    returns how many were swapped. The model is then the plain model again."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, tuple(PATCH_LAYERS.values())):
                plain = type(child).__mro__[1].__new__(type(child).__mro__[1])
                plain.__dict__ = {k: v for k, v in child.__dict__.items()
                                  if k not in ("engine", "key", "_kv_weight", "_kv_bias", "_affine_key", "_affine_cache")}
                setattr(parent, name, plain)
                swapped += 1
    return swapped
