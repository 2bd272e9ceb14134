"""Building blocks shared by the built-in denoisers.

These are plain modules. The patch-parallel runtime recognises `Attention` (self-attention, by
behaviour: called without a context) and `GridPositions` by type and swaps in strip-aware
versions; Conv2d and GroupNorm are the torch classes themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from parafuse.attention import attention


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a float timestep tensor [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # the sinusoids are computed in float32, then run in the model's own dtype
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention over tokens [B, L, dim] laid out row-major on a (h, w) grid.

    Self-attention when `context` is None (keys and values come from the same tokens);
    cross-attention to `context` [B, Lc, context_dim] otherwise.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.is_cross = context_dim is not None
        kv_dim = context_dim if context_dim is not None else dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        src = x if context is None else context
        q, k, v = self.split_heads(self.to_q(x)), self.split_heads(self.to_k(src)), self.split_heads(self.to_v(src))
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class GridPositions(nn.Module):
    """2-D sin-cos position embedding of an (h, w) token grid -> [h*w, dim].

    Positions are absolute grid coordinates scaled by `base_size / h`-free constants, so a model
    runs at any resolution: a larger image simply has more rows and columns. The patch runtime
    swaps this module for one that computes the full grid and slices the strip's rows.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"position embedding dim {dim} must be divisible by 4")
        self.dim = dim

    def grid(self, h: int, w: int, row_offset: int = 0, device=None) -> torch.Tensor:
        quarter = self.dim // 4
        omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
        rows = torch.arange(row_offset, row_offset + h, dtype=torch.float32, device=device)
        cols = torch.arange(w, dtype=torch.float32, device=device)
        ry = rows[:, None] * omega[None]                       # [h, quarter]
        rx = cols[:, None] * omega[None]                       # [w, quarter]
        ey = torch.cat([ry.sin(), ry.cos()], -1)[:, None, :].expand(h, w, 2 * quarter)
        ex = torch.cat([rx.sin(), rx.cos()], -1)[None, :, :].expand(h, w, 2 * quarter)
        return torch.cat([ey, ex], -1).reshape(h * w, self.dim)

    def forward(self, h: int, w: int, device=None) -> torch.Tensor:
        return self.grid(h, w, 0, device)


def nonzero_init_(module: nn.Module, std: float = 0.02) -> None:
    """Re-initialise zero-initialised output layers with small random weights.

    adaLN-zero and zero output convolutions make an untrained model output exactly zero, which
    would let every equality test pass vacuously; untrained configs use this instead.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and torch.count_nonzero(m.weight) == 0:
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=std)
