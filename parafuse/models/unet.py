"""A U-Net in miniature of SDXL's shape: 3x3 convs, GroupNorm, residual blocks with a time
embedding, transformer blocks (self-attention, optional cross-attention) at chosen levels,
stride-2 downsampling and nearest-neighbour upsampling. A plain module: no parallelism here."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from parafuse.models.layers import Attention, TimestepMLP


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention and MLP on tokens, each pre-normed and residual."""

    def __init__(self, ch: int, heads: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(ch)
        self.attn1 = Attention(ch, heads)
        self.norm2 = nn.LayerNorm(ch) if context_dim else None
        self.attn2 = Attention(ch, heads, context_dim) if context_dim else None
        self.norm3 = nn.LayerNorm(ch)
        self.ff = nn.Sequential(nn.Linear(ch, 4 * ch), nn.GELU(), nn.Linear(4 * ch, ch))

    def layer_forward(self, t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        t = t + self.attn1(self.norm1(t))
        if self.attn2 is not None and context is not None:
            t = t + self.attn2(self.norm2(t), context)
        return t + self.ff(self.norm3(t))


class TransformerBlock(TransformerLayer):
    """GroupNorm -> 1x1 in -> `depth` transformer layers on tokens -> 1x1 out, residual (SDXL's
    Transformer2D). The first layer's modules sit on the block itself, the others in `layers`."""

    def __init__(self, ch: int, heads: int, groups: int, context_dim: int | None, depth: int = 1):
        super().__init__(ch, heads, context_dim)
        self.norm = nn.GroupNorm(groups, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.layers = nn.ModuleList(TransformerLayer(ch, heads, context_dim) for _ in range(depth - 1))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, h*w, C], row-major, made contiguous once: the transposed view is strided, and a
        # residual add keeps its first operand's strides, so every LayerNorm of every layer would
        # copy it again and every add would run strided (3 copies a layer on an H100 profile)
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2).contiguous()
        t = self.layer_forward(t, context)
        for layer in self.layers:
            t = layer.layer_forward(t, context)
        # back to NCHW before the 1x1: a channels-last input takes another convolution algorithm
        # (on CPU not bit for bit the same)
        return x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w).contiguous())


class UNet(nn.Module):
    def __init__(self, in_channels: int, channels: int = 64, channel_mult=(1, 2, 2), blocks_per_level: int = 1,
                 attention_levels=(2,), heads: int = 4, groups: int = 16, num_classes: int = 0,
                 context_dim: int | None = None, transformer_depth=None, head_dim: int | None = None):
        """`transformer_depth`: layers per transformer block at each level (default 1; the middle
        block takes the last level's); `head_dim`: attention heads of width head_dim (SDXL: 64)
        instead of a fixed `heads` at every level."""
        super().__init__()
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.num_classes = num_classes
        self.context_dim = context_dim
        emb_dim = 4 * channels
        self.time_embed = TimestepMLP(channels, emb_dim)
        # index num_classes is the "no label" class used for the unconditional CFG branch.
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        depth = tuple(transformer_depth) if transformer_depth is not None else (1,) * len(channel_mult)

        def n_heads(ch):
            return ch // head_dim if head_dim else heads

        def attn(level, ch):
            if level not in attention_levels:
                return None
            return TransformerBlock(ch, n_heads(ch), groups, context_dim, depth[level])

        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(blocks_per_level):
                block = nn.ModuleDict({"res": ResBlock(ch, channels * mult, emb_dim, groups)})
                ch = channels * mult
                if (a := attn(level, ch)) is not None:
                    block["attn"] = a
                self.down.append(block)
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleDict({"downsample": nn.Conv2d(ch, ch, 3, stride=2, padding=1)}))
                skips.append(ch)
        self.mid_res1 = ResBlock(ch, ch, emb_dim, groups)
        self.mid_attn = TransformerBlock(ch, n_heads(ch), groups, context_dim, depth[-1])
        self.mid_res2 = ResBlock(ch, ch, emb_dim, groups)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(blocks_per_level + 1):
                block = nn.ModuleDict({"res": ResBlock(ch + skips.pop(), channels * mult, emb_dim, groups)})
                ch = channels * mult
                if (a := attn(level, ch)) is not None:
                    block["attn"] = a
                self.up.append(block)
            if level > 0:
                self.up.append(nn.ModuleDict({"upsample": nn.Conv2d(ch, ch, 3, padding=1)}))
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).expand(x.shape[0])
        emb = self.time_embed(t)
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_embed(class_labels)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            if "downsample" in block:
                h = block["downsample"](h)
            else:
                h = block["res"](h, emb)
                if "attn" in block:
                    h = block["attn"](h, context)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb), context), emb)
        for block in self.up:
            if "upsample" in block:
                # nearest keeps upsampling row-local, so a strip upsamples on its own.
                h = block["upsample"](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                h = block["res"](torch.cat([h, skips.pop()], dim=1), emb)
                if "attn" in block:
                    h = block["attn"](h, context)
        return self.conv_out(F.silu(self.norm_out(h)))
