"""Dynamic thresholding of x̂0 (Imagen, Saharia et al. 2022, §2.3), exact across strips."""
from __future__ import annotations

import torch

from .stepper import LOCAL

# torch.quantile refuses inputs above 2**24 elements; beyond that we select with kthvalue.
_QUANTILE_MAX = 1 << 24


def quantile_rows(t: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of a 2-D tensor, linear interpolation (torch.quantile's default)."""
    if t.shape[1] <= _QUANTILE_MAX:
        return torch.quantile(t, q, dim=1)
    pos = q * (t.shape[1] - 1)
    lo, frac = int(pos), pos - int(pos)
    v_lo = torch.kthvalue(t, lo + 1, dim=1).values
    if frac == 0.0:
        return v_lo
    v_hi = torch.kthvalue(t, lo + 2, dim=1).values
    return torch.lerp(v_lo, v_hi, frac)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0, reduce=LOCAL) -> torch.Tensor:
    """Clamp x̂0 to [-s, s] and divide by s, s = clamp(quantile_ratio(|x̂0|), 1, max_value) per sample.

    The quantile runs over all of C×H×W of the *whole* image. An order statistic cannot be
    assembled from per-strip partial results, so every strip's |x̂0| is gathered (``reduce.cat``):
    exact, at the cost of one latent-sized gather per step (only when thresholding is on).
    The quantile does not depend on element order, so strips are concatenated flattened.
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile and clamp need float32 on CPU
    s = quantile_rows(reduce.cat(flat.abs(), dim=1), ratio)
    s = s.clamp(min=1.0, max=max_value).unsqueeze(1)  # s = 1 is plain clipping to [-1, 1]
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)
