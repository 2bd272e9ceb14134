"""Classifier-free guidance and guidance rescale, the latter exact across strips."""
from __future__ import annotations

import torch

from .stepper import LOCAL


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale·(cond − uncond). Elementwise."""
    return uncond + scale * (cond - uncond)


def _moments(t: torch.Tensor) -> torch.Tensor:
    """Per-sample [count, Σx, Σx²] of the local strip, float64 so that sums over strips stay exact
    to double rounding (the one-pass variance below would lose digits in float32)."""
    flat = t.reshape(t.shape[0], -1).double()
    n = torch.full((flat.shape[0],), float(flat.shape[1]), dtype=torch.float64, device=t.device)
    return torch.stack([n, flat.sum(1), (flat * flat).sum(1)], dim=1)


def per_sample_std(tensors, reduce=LOCAL) -> list[torch.Tensor]:
    """Unbiased std over all non-batch dims of each tensor, over the whole image (all strips),
    with a single ``reduce.sum`` for all of them. Returns float64 tensors shaped [B, 1, 1, ...]."""
    tensors = list(tensors)
    total = reduce.sum(torch.cat([_moments(t) for t in tensors], dim=1))
    out = []
    for i, t in enumerate(tensors):
        n, s1, s2 = total[:, 3 * i], total[:, 3 * i + 1], total[:, 3 * i + 2]
        var = (s2 - s1 * s1 / n) / (n - 1)  # Bessel-corrected, like torch.std's default
        out.append(var.clamp_min(0).sqrt().reshape(-1, *([1] * (t.dim() - 1))))
    return out


def rescale(guided: torch.Tensor, cond: torch.Tensor, phi: float, reduce=LOCAL) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
    flawed", §3.4): scale the guided prediction to the per-sample std of the conditional one, then
    blend: phi·guided·(std_cond/std_guided) + (1−phi)·guided. phi = 0 returns ``guided``."""
    if phi == 0:
        return guided
    std_cond, std_guided = per_sample_std([cond, guided], reduce)
    ratio = (std_cond / std_guided).to(guided.dtype)
    return phi * (guided * ratio) + (1 - phi) * guided
