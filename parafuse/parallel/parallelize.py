"""Apply patch parallelism to an unmodified model from outside, by swapping layers by type."""
from __future__ import annotations

import torch.nn as nn

from parafuse.parallel.adapter import BUILTIN
from parafuse.parallel.engine import ExchangeEngine
from parafuse.parallel.layers import (PatchAttention, PatchConv2d, PatchGridPositions, PatchGroupNorm, _adopt,
                                      stand_in)
from parafuse.parallel.plan import SiteKind

PATCH_LAYERS = {SiteKind.CONV: PatchConv2d, SiteKind.NORM: PatchGroupNorm, SiteKind.ATTN: PatchAttention,
                SiteKind.POSITIONS: PatchGridPositions}


def parallelize(model: nn.Module, engine: ExchangeEngine, adapter=BUILTIN) -> dict[str, int]:
    """Swap patch-aware layers into `model` in place; returns how many of each kind were swapped.

    The adapter says which modules are sites; the model keeps its parameters and state_dict keys.
    An adapter with a `patch(kind, module, engine, key)` method makes the replacement itself (the
    diffusers adapter installs an attention processor and returns the module unchanged).
    Inference only. Idempotent: patch layers already in place are left alone."""
    patch = getattr(adapter, "patch", None)
    counts: dict[str, int] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, tuple(PATCH_LAYERS.values())):
                if "engine" in child.__dict__:
                    continue
                # built by calling a patch layer's type (PEFT makes a LoRA conv's lora_A and lora_B
                # as type(base_layer)(...)): the plain layer it stands for
                child = _plain(child)
                setattr(parent, name, child)
            kind = adapter.site_kind(child)
            if kind is None:
                continue
            key = f"{parent_name}.{name}" if parent_name else name
            new = patch(kind, child, engine, key) if patch else _adopt(PATCH_LAYERS[kind], child, engine, key)
            if new is not child:
                setattr(parent, name, new)
            label = type(new).__name__ if new is not child else kind
            counts[label] = counts.get(label, 0) + 1
    return counts


def unparallelize(model: nn.Module) -> int:
    """Swap every patch layer of `model` back for the plain layer it replaced (same parameters);
    returns how many were swapped. The model is then the plain model again."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, tuple(PATCH_LAYERS.values())):
                setattr(parent, name, _plain(child))
                swapped += 1
    return swapped


def _plain(layer: nn.Module) -> nn.Module:
    """The plain layer (the patch layer's base class) with `layer`'s parameters and settings."""
    return stand_in(type(layer).__mro__[1], layer,
                    drop=("engine", "key", "_kv_weight", "_kv_bias", "_affine_key", "_affine_cache"))
