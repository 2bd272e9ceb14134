"""Patch-aware versions of the layers that see across strip boundaries.

Each class subclasses the layer it replaces and shares its parameters (state_dict keys do not
change); `forward` asks the exchange engine for what the strip lacks. Everything else in a
model (1x1 convs, linear layers, LayerNorm, cross-attention, nearest upsampling) is row-local
and runs unchanged on the strip.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from parafuse.attention import attention
from parafuse.models.layers import Attention, GridPositions
from parafuse.parallel.engine import ExchangeEngine
from parafuse.parallel.geometry import conv_halo


def _adopt(cls, module: nn.Module, engine: ExchangeEngine, key: str):
    """A `cls` instance that shares `module`'s parameters, buffers and settings."""
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    new.engine = engine
    new.key = key
    return new


class PatchConv2d(nn.Conv2d):
    """Conv2d on a strip: attaches the neighbours' halo rows, then convolves without row padding."""

    @property
    def halo(self) -> tuple[int, int]:
        return conv_halo(self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self.halo
        x = self.engine.conv_input(self.key, x, top, bottom)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, self.padding[1]), self.dilation, self.groups)


class PatchGroupNorm(nn.GroupNorm):
    """GroupNorm over the whole image: count-weighted float32 sums across strips, biased variance,
    exactly as torch.nn.GroupNorm (uneven strips included)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        g = x.float().reshape(b, self.num_groups, -1)
        count = torch.full((b, self.num_groups), float(g.shape[-1]), device=x.device)
        local = torch.stack([count, g.sum(-1), (g * g).sum(-1)])
        stats, fallback = self.engine.norm_stats(self.key, local)

        def moments(s):
            mean = s[1] / s[0]
            return mean, s[2] / s[0] - mean * mean

        mean, var = moments(stats)
        if fallback is not None:   # a stale-corrected variance can come out negative: use this strip's own
            lmean, lvar = moments(fallback)
            bad = var < 0
            mean, var = torch.where(bad, lmean, mean), torch.where(bad, lvar, var)
        y = (g - mean[..., None]) * torch.rsqrt(var.clamp_min(0)[..., None] + self.eps)
        y = y.reshape(x.shape).to(x.dtype)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class PatchAttention(Attention):
    """Self-attention of a strip's queries over the engine's K/V buffer.

    The local K/V projection is written straight into the middle of the buffer, neighbours'
    rows land around it, and attention reads the buffer as strided views: no concatenation."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            return super().forward(x, context)
        b, tokens, dim = x.shape
        level = self.engine.geometry.level_of_tokens(tokens, self.engine.rank)
        buf, start, end = self.engine.kv_buffer(self.key, level, b, 2 * dim, x.dtype, x.device)
        # one fused K|V projection; concatenated per call (a [2*dim, dim] copy, small next to the
        # attention itself) so that weights loaded after parallelize() are the ones used
        weight = torch.cat([self.to_k.weight, self.to_v.weight])
        torch.matmul(x.transpose(0, 1), weight.t(), out=buf[start:end])
        buf[start:end] += torch.cat([self.to_k.bias, self.to_v.bias])
        self.engine.exchange_kv(self.key, level, before=True)

        def heads(t):                                   # [T, B, dim] view -> [B, heads, T, d] view
            return t.permute(1, 0, 2).unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = attention(self.split_heads(self.to_q(x)), heads(buf[..., :dim]), heads(buf[..., dim:]))
        self.engine.exchange_kv(self.key, level, before=False)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class PatchGridPositions(GridPositions):
    """Positions of the whole grid, sliced to the strip's rows (never recomputed from the strip's
    own size, which would restart every strip at row 0)."""

    def forward(self, h: int, w: int, device=None) -> torch.Tensor:
        level = self.engine.geometry.level_of_width(w)
        off = level.offsets[self.engine.rank]
        return self.grid(level.height, w, 0, device)[off * w: (off + h) * w]
