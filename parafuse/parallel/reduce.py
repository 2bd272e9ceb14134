"""Exact global reductions over the strips of a patch group, for the solver's few non-elementwise
operations (dynamic thresholding's quantile, guidance rescale's std)."""
from __future__ import annotations

import torch

from parafuse.parallel.engine import ExchangeEngine


class StripReduce:
    """The `reduce` object of the solvers (same methods as parafuse.solvers.LocalReduce)."""

    def __init__(self, engine: ExchangeEngine):
        self.engine = engine

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        n = self.engine.n
        parts = self.engine.gather_rows(t.unsqueeze(0), 0, (1,) * n, kind="reduce")
        return parts.sum(0)          # summed in rank order: identical on every rank

    def cat(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        n = self.engine.n
        size = torch.tensor([float(t.shape[dim])], device=t.device)
        sizes = self.engine.gather_rows(size, 0, (1,) * n, kind="reduce")
        return self.engine.gather_rows(t, dim, tuple(int(s) for s in sizes.tolist()), kind="reduce")
