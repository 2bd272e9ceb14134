"""Apply patch parallelism to an unmodified model from outside, by swapping layers by type."""
from __future__ import annotations

import torch.nn as nn

from parafuse.models.layers import Attention, GridPositions
from parafuse.parallel.engine import ExchangeEngine
from parafuse.parallel.geometry import conv_halo
from parafuse.parallel.layers import PatchAttention, PatchConv2d, PatchGridPositions, PatchGroupNorm, _adopt


def _patch_class(module: nn.Module):
    if isinstance(module, (PatchConv2d, PatchGroupNorm, PatchAttention, PatchGridPositions)):
        return None
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"conv with padding {module.padding!r}/{module.padding_mode!r} is not supported "
                             f"by the patch runtime (only explicit zero padding)")
        top, bottom = conv_halo(module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0])
        return PatchConv2d if top or bottom else None
    if isinstance(module, nn.GroupNorm):
        return PatchGroupNorm
    if isinstance(module, Attention) and not module.is_cross:
        return PatchAttention
    if isinstance(module, GridPositions):
        return PatchGridPositions
    return None


def parallelize(model: nn.Module, engine: ExchangeEngine) -> dict[str, int]:
    """Swap patch-aware layers into `model` in place; returns how many of each kind were swapped.

    The model keeps its parameters and state_dict keys; a forward pre-hook tells the engine which
    tensor is the model input (its halo is exchanged fresh). Inference only."""
    counts: dict[str, int] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            cls = _patch_class(child)
            if cls is None:
                continue
            key = f"{parent_name}.{name}" if parent_name else name
            setattr(parent, name, _adopt(cls, child, engine, key))
            counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
    model.register_forward_pre_hook(lambda mod, args: engine.begin_forward(args[0]))
    return counts
