"""Noticing non-finite values during denoising, on every rank at once, without a host
synchronisation per step.

After every solver step the runtime hands the new latent strip to `FiniteWatch.observe`, which
only queues device work: the sum of the strip (NaN and ±Inf propagate through a sum; a finite
latent would need |x| summing past 3e38 to overflow it, which no usable latent does), or'd with
the exchange engine's flag of NaN or infinite GroupNorm statistics (at N > 1 an overflowing Σx²
makes the exchanged variance infinite and the normalised output zero: finite garbage, where one
process's GroupNorm makes NaN), and, if either is bad and nothing was seen before, the step's
number into a device scalar. Every `CHECK_EVERY` steps and after the last, `check` exchanges one
float per rank over the whole job (`Transport.agree`, counted as `control` bytes) and reads it on
the host: that read is the only synchronisation, one per CHECK_EVERY steps (on CUDA it waits for the queued work, a stall of one
step's launch lead; the step's exchanges themselves are not waited for). Every rank sees the same
flags, so every rank stops at the same step with the same message: a rank that meets NaN does
not leave its neighbours waiting in the next exchange.
"""
from __future__ import annotations

import torch

CHECK_EVERY = 8


class NonFiniteError(RuntimeError):
    """The latent became NaN or infinite; nothing is written."""


class FiniteWatch:
    def __init__(self, transport, rank: int, world_size: int, device: torch.device, num_evals: int | None,
                 every: int = CHECK_EVERY, engine=None):
        """`num_evals` None: the loop's length is not known in advance (a diffusers pipeline's own
        loop); `observe`/`due` then count evaluations as they come and `finish` checks the last."""
        self.transport, self.rank, self.world_size = transport, rank, world_size
        # the exchange engine's device flag of NaN or infinite GroupNorm statistics (strips), reset here
        self.engine = engine
        if engine is not None and engine.nonfinite is not None:
            engine.nonfinite.zero_()
        self.num_evals, self.every = num_evals, every
        self.first_bad = torch.zeros((), dtype=torch.float32, device=device)   # 0, or 1 + evaluation index
        self.k = 0

    # ---- in the sampling loop: begin(k) before evaluation k, the model wrapped, finish(x) at the end
    def begin(self, k: int) -> None:
        self.k = k

    def wrap(self, model_fn):
        """The model function, observing its input: the latent after the previous evaluation."""
        def fn(x, t):
            if self.k > 0:
                self.observe(self.k - 1, x)
                if self.due(self.k - 1):
                    self.check()
            return model_fn(x, t)
        return fn

    def finish(self, x: torch.Tensor) -> None:
        self.observe(self.k if self.num_evals is None else self.num_evals - 1, x)
        self.check()

    def observe(self, k: int, x: torch.Tensor) -> None:
        """`x` is the latent after evaluation `k` (0-based). Device work only."""
        bad = ~torch.isfinite(x.sum())
        if self.engine is not None and self.engine.nonfinite is not None:
            bad = bad | self.engine.nonfinite
        bad = bad & (self.first_bad == 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, k + 1), self.first_bad)

    def due(self, k: int) -> bool:
        """Check after evaluation k? Every `every` evaluations and after the last."""
        return (k + 1) % self.every == 0 or k + 1 == self.num_evals

    def check(self) -> None:
        """Exchange every rank's flag and raise NonFiniteError on every rank if any is set."""
        flags = torch.zeros(self.world_size, dtype=torch.float32, device=self.first_bad.device)
        flags[self.rank] = self.first_bad
        if self.transport is not None and self.world_size > 1:
            self.transport.agree(flags).wait()
        seen = [(int(v) - 1, r) for r, v in enumerate(flags.tolist()) if v > 0]
        if not seen:
            return
        k, _ = min(seen)
        ranks = sorted(r for kk, r in seen if kk == k)
        where = f" on rank {', '.join(map(str, ranks))}" if self.world_size > 1 else ""
        of = "" if self.num_evals is None else f" of {self.num_evals}"
        raise NonFiniteError(f"the latent became NaN or infinite at step {k + 1}{of}{where}; nothing was written. "
                             f"A schedule, "
                             f"guidance or weights that overflow cause this: try fewer steps, lower guidance or "
                             f"check the weights")
