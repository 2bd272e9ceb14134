"""The one denoising loop: stages x steps.

A stage is one resolution with its own step count and noise-schedule shift; the plain schedule is
a single stage (the bottleneck schedule adds more). The loop works on whatever tensor it is given
- the whole latent, or one rank's strip of it: solver updates are elementwise, and the few global
operations go through `reduce`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from parafuse.solvers import LocalReduce, cfg

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    height: int            # latent rows
    width: int             # latent columns
    steps: int
    shift: float | None = None     # flow-schedule shift (None: the model's own)
    strength: float = 1.0          # re-noise strength at the stage start (1: from pure noise)


def guided(model: torch.nn.Module, guidance: float, cond: dict, uncond: dict | None) -> ModelFn:
    """Model output with classifier-free guidance; both branches in one batch.

    `cond` / `uncond` are keyword arguments of the model (class_labels, context) for one sample;
    their batched form is built once, so every evaluation passes the same conditioning tensors."""
    if uncond is None or guidance == 1.0:
        return lambda x, t: model(x, t, **cond)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def fn(x, t):
        out_cond, out_uncond = model(torch.cat([x, x]), t, **both).chunk(2)
        return cfg(out_cond, out_uncond, guidance)
    return fn


def denoise(model_fn: ModelFn, x: torch.Tensor, solver, reduce=None,
            before_step: Callable[[int], None] | None = None,
            after_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run every evaluation of `solver` from the noisy `x`; returns the final sample."""
    reduce = reduce or LocalReduce()
    state = solver.init_state()
    for k in range(solver.num_evals):
        if before_step is not None:
            before_step(k)
        raw = model_fn(x, solver.model_time(k))
        x, state = solver.step(k, x, raw, state, reduce=reduce)
        if after_step is not None:
            after_step(k)
    return x
