"""Model adapters: what the patch runtime needs to know of a model family.

An adapter names, by module type and behaviour (never by class name strings that a library
release can rename), which modules are parallel sites and of what kind (`site_kind` returns a
`parafuse.parallel.plan.SiteKind`: CONV, NORM, ATTN, POSITIONS; what each needs is said there),
and what example conditioning a shape trace needs. Everything else (1x1 convs, linear layers,
LayerNorm, cross-attention, nearest upsampling) is row-local and runs unchanged on a strip. The
built-in models are the first family; the diffusers families add adapters of their own.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from parafuse.models.layers import Attention, GridPositions
from parafuse.parallel.geometry import conv_halo
from parafuse.parallel.plan import SiteKind


class BuiltinAdapter:
    name = "builtin"
    tracing = False              # set during a shape trace (the built-in patch layers need not know)

    def site_kind(self, module: nn.Module) -> SiteKind | None:
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"conv with padding {module.padding!r}/{module.padding_mode!r} is not supported "
                                 f"by the patch runtime (only explicit zero padding)")
            top, bottom = conv_halo(module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0])
            return SiteKind.CONV if top or bottom else None
        if isinstance(module, nn.GroupNorm):
            return SiteKind.NORM
        if isinstance(module, Attention) and not module.is_cross:
            return SiteKind.ATTN
        if isinstance(module, GridPositions):
            return SiteKind.POSITIONS
        return None

    # ---- what the shape trace (parafuse.parallel.trace) asks a model family ----------------------
    def attention_site(self, module, args, kwargs, x, grids) -> dict | None:
        """A self-attention site's positions and width (cross-attention is no site: `site_kind`)."""
        return {"positions": x.shape[1], "channels": x.shape[-1]}

    def grid_positions(self, module, args, out) -> int:
        return args[0] * args[1]                   # GridPositions(h, w)

    def counts_flops(self, module: nn.Module) -> bool:
        return isinstance(module, Attention)

    def attention_flops(self, module, args, kwargs, x) -> tuple[float, bool] | None:
        """(FLOPs of softmax(q kᵀ) v, whether it is self-attention), for the profile's count."""
        if not isinstance(module, Attention):
            return None
        ctx = kwargs.get("context", args[1] if len(args) > 1 else None)
        keys = x.shape[1] if ctx is None else ctx.shape[1]
        return 4 * x.shape[0] * x.shape[1] * keys * x.shape[2], ctx is None

    def refuse(self, name: str, module: nn.Module, why: str) -> Exception:
        return ValueError(f"parafuse cannot parallelise module {name!r} ({type(module).__name__}): {why}")

    def shape_run(self, model: nn.Module):
        """What `model` needs around a shape-only run under FakeTensorMode: nothing."""
        return nullcontext()

    def example_kwargs(self, spec, device: torch.device, dtype: torch.dtype) -> dict:
        """Conditioning for a shape trace: a short text context for cross-attention models."""
        if spec.context_dim:
            return {"context": torch.zeros(1, 4, spec.context_dim, device=device, dtype=dtype)}
        return {}


BUILTIN = BuiltinAdapter()
