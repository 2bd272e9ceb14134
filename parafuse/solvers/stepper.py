"""The one update every solver is made of, and the reduce interface for the few global operations.

Every solver step is ``x_next = a·x + Σ_k b_k·m_k``: ``a`` and ``b_k`` are python floats computed
from the σ grid (identical on every rank), ``m_k`` are x̂0 predictions or other history tensors
shaped like ``x``. The update is elementwise, so it runs unchanged on a horizontal strip of the
latent. ``combine`` is the single place where tensors are touched; a fused kernel replaces it.
"""
from __future__ import annotations

from typing import Sequence

import torch


def combine(a: float, x: torch.Tensor, coeffs: Sequence[float], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return ``a·x + Σ coeffs[k]·tensors[k]``, accumulated in at least float32, in ``x``'s dtype."""
    if len(coeffs) != len(tensors):
        raise ValueError(f"{len(coeffs)} coefficients for {len(tensors)} tensors")
    acc = torch.promote_types(x.dtype, torch.float32)
    out = x.to(acc) * float(a)
    for c, t in zip(coeffs, tensors):
        if c != 0.0:  # skipped terms cost nothing and cannot turn 0·inf into nan
            out.add_(t.to(acc), alpha=float(c))
    return out.to(x.dtype)


class LocalReduce:
    """Reductions over strips when there is one strip: the identity.

    The parallel runtime passes an object with the same two methods that reduces across ranks:
    ``sum(t)``: all-reduce sum, every rank gets the total;
    ``cat(t, dim)``: all-gather, concatenated in rank order along ``dim``.
    """

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def cat(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t


LOCAL = LocalReduce()
