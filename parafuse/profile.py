"""What a model does at a resolution, read from its layer shapes without running it.

One shape-only trace (FakeTensor: no memory, no compute) at two small resolutions gives, for a
plain model, the resolution level and halo of every convolution (to reject a strip thinner than
a halo before any compute) and a FLOP count that extrapolates exactly to any resolution:
conv/linear FLOPs are affine in the pixel count, self-attention's quadratic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from parafuse.models.layers import Attention
from parafuse.parallel.geometry import StripGeometry, conv_halo


def _trace(model: nn.Module, channels: int, height: int, width: int, call_kwargs: dict):
    from torch._subclasses.fake_tensor import FakeTensorMode

    convs, affine, attn = {}, {}, {}

    def hook(name):
        def fn(mod, args, kwargs, out):
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                convs[name] = width // x.shape[-1]
                macs = out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
                affine[name] = 2 * macs
            elif isinstance(mod, nn.Linear):
                affine[name] = 2 * out.numel() * mod.in_features
            elif isinstance(mod, Attention):
                ctx = kwargs.get("context", args[1] if len(args) > 1 else None)
                lk = x.shape[1] if ctx is None else ctx.shape[1]
                attn[name] = (4 * x.shape[0] * x.shape[1] * lk * x.shape[2], ctx is None)
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, Attention))]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model(torch.empty(1, channels, height, width), 500.0, **call_kwargs)
    finally:
        for h in handles:
            h.remove()
    return convs, affine, attn


@dataclass
class ModelProfile:
    conv_levels: dict[str, tuple[int, int, int]]     # conv name -> (level factor, top halo, bottom halo)
    flops_const: float
    flops_linear: float                               # per latent pixel
    flops_quadratic: float                            # per latent pixel squared (self-attention)

    @classmethod
    def trace(cls, model: nn.Module, channels: int, unit: int, call_kwargs: dict | None = None) -> "ModelProfile":
        call_kwargs = call_kwargs or {}
        h1, w1 = 2 * unit, 2 * unit
        h2, w2 = 4 * unit, 2 * unit
        convs, aff1, att1 = _trace(model, channels, h1, w1, call_kwargs)
        _, aff2, att2 = _trace(model, channels, h2, w2, call_kwargs)
        a1, a2 = h1 * w1, h2 * w2
        lin = sum(aff2.values()) - sum(aff1.values())
        const = sum(aff1.values()) - lin * a1 / (a2 - a1)
        quad, lin_attn = 0.0, 0.0
        for name, (f1, is_self) in att1.items():
            if is_self:
                quad += f1 / a1 ** 2
            else:
                lin_attn += f1 / a1
        levels = {}
        for name, mod in model.named_modules():
            if name in convs:
                top, bottom = conv_halo(mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0])
                if top or bottom:
                    levels[name] = (convs[name], top, bottom)
        return cls(levels, const, lin / (a2 - a1) + lin_attn, quad)

    def flops(self, height: int, width: int, batch: int = 1) -> float:
        """FLOPs of one forward of the whole image (latent height x width) at batch size `batch`."""
        a = height * width
        return batch * (self.flops_const + self.flops_linear * a + self.flops_quadratic * a * a)

    def check_strips(self, geometry: StripGeometry) -> None:
        """Raise GeometryError before any compute if a strip is thinner than a conv's halo."""
        for name, (factor, top, bottom) in self.conv_levels.items():
            geometry.check_halo(factor, top, bottom, f"conv {name}")
