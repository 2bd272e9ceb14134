"""A DiT in miniature of PixArt/SD3/Flux's shape: patchify conv, adaLN blocks (self-attention,
optional cross-attention, MLP), 2-D sin-cos positions that work at any resolution, unpatchify.
A plain module: no parallelism here."""
from __future__ import annotations

import torch
import torch.nn as nn

from parafuse.models.layers import Attention, GridPositions, TimestepMLP


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross = Attention(dim, heads, context_dim) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(nn.functional.silu(c)).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm_cross(x), context)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiT(nn.Module):
    def __init__(self, in_channels: int, patch_size: int = 2, dim: int = 128, depth: int = 4, heads: int = 4,
                 num_classes: int = 0, context_dim: int | None = None):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.downsample_factor = patch_size
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.positions = GridPositions(dim)
        self.time_embed = TimestepMLP(256, dim)
        self.label_embed = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, context_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)

    def forward(self, x: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, height, width = x.shape
        p = self.patch_size
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).expand(b)
        c = self.time_embed(t)
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((b,), self.num_classes, device=x.device, dtype=torch.long)
            c = c + self.label_embed(class_labels)
        tokens = self.patch_embed(x)                                     # [B, dim, h, w]
        h, w = tokens.shape[-2:]
        # positions first: an add takes its first operand's strides, and the transposed view is
        # strided; with it first the token stream is contiguous, so no LayerNorm copies it and no
        # residual add runs strided (the same sum, bit for bit)
        tokens = self.positions(h, w, x.device).to(tokens.dtype)[None] + tokens.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, c, context)
        shift, scale = self.ada_out(nn.functional.silu(c)).chunk(2, dim=-1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))  # [B, h*w, p*p*C]
        out = out.view(b, h, w, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.in_channels, height, width)
