"""Multi-scale patch sliced-Wasserstein distance (SWD) between two sets of images, as in Karras et al. 2018.

A Laplacian pyramid of each image (band-pass levels, then the low-pass residual), random 7x7 patches
of every level as descriptors, each level's descriptors normalised per channel with the reference
set's mean and std (so a colour or contrast shift counts), then the sliced Wasserstein-1 distance
(mean over random unit directions of the 1-D distance between the projected sets, on fixed
quantiles) x 1e3 at every level. It compares distributions, not pixels: two different images of
the same texture are close.

Used by benchmarks/bottleneck.py (against held-out photographs) and benchmarks/quality.py (each
parallel mode's images against the serial images of the same seeds).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PATCH, MIN_LEVEL, PATCHES_PER_LEVEL, DIRECTIONS, QUANTILES = 7, 16, 256, 512, 256
PHOTO_CROP = 256      # pyramid depth is that of a 256² image at most, so larger images get the same bands
BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def pyramid_depth(size: int) -> int:
    """Levels for an image of side `size`: band-pass levels down to MIN_LEVEL px, then the residual
    (256 px: 4 bands + the 16 px residual); larger images keep a 256² image's depth."""
    return int(math.log2(min(size, PHOTO_CROP) // MIN_LEVEL)) + 1


def _blur(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    k = BINOMIAL.to(x)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def laplacian_pyramid(x: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """`depth` levels of [B, 3, H, W] from fine to coarse: depth − 1 band-pass levels, then the
    low-pass residual (pyrDown: binomial blur, drop every other pixel; pyrUp: zero-insert, blur x 4).
    Band i is the same band in cycles per pixel whatever the image size."""
    levels = []
    while len(levels) < depth - 1:
        down = _blur(x)[..., ::2, ::2]
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = down
        levels.append(x - 4 * _blur(up))
        x = down
    return levels + [x]


def patches(x: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """`count` random 7x7 patches of every image in [B, 3, H, W], as [B*count, 3, 7, 7]."""
    b, c, h, w = x.shape
    top = torch.randint(h - PATCH + 1, (b, count), generator=g)
    left = torch.randint(w - PATCH + 1, (b, count), generator=g)
    r = top[..., None, None] + torch.arange(PATCH)[:, None]
    q = left[..., None, None] + torch.arange(PATCH)
    idx = torch.arange(b)[:, None, None, None]
    return x.permute(0, 2, 3, 1)[idx, r, q].permute(0, 1, 4, 2, 3).reshape(b * count, c, PATCH, PATCH)


def pyramid_patches(images: torch.Tensor, count: int, seed: int, depth: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [patches(level, count, g) for level in laplacian_pyramid(images.float(), depth)]


def swd(a: list[torch.Tensor], ref: list[torch.Tensor], seed: int = 0) -> list[float]:
    """Sliced Wasserstein-1 distance x 1e3 at every pyramid level (fine to coarse); each level's descriptors
    normalised per channel by the reference's mean and std; 1-D distances on QUANTILES quantiles,
    so the two sets need not be the same size."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.arange(QUANTILES, dtype=torch.float64) + 0.5) / QUANTILES
    out = []
    for x, y in zip(a, ref):
        mean, std = y.mean((0, 2, 3), keepdim=True), y.std((0, 2, 3), keepdim=True)
        x, y = ((x - mean) / std).flatten(1).double(), ((y - mean) / std).flatten(1).double()
        d = torch.randn(x.shape[1], DIRECTIONS, generator=g, dtype=torch.float64)
        d /= d.norm(dim=0, keepdim=True)
        out.append((torch.quantile(x @ d, u, dim=0) - torch.quantile(y @ d, u, dim=0)).abs().mean().item())
    return [1e3 * v for v in out]
