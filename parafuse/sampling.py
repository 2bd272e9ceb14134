"""The one denoising loop: stages x steps.

A stage is one resolution with its own solver (its own grid, shift and start index;
`parafuse.stages`); the plain schedule is a single stage. The loop works on whatever tensor it is
given - the whole latent, or one rank's strip of it: solver updates are elementwise, and the few
global operations go through `reduce`. What a stage change does to the geometry (gather, resize,
re-noise, a new patch plan) is the caller's, passed in as two functions.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from parafuse.solvers import LocalReduce, cfg, dynamic_threshold

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]


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
            after_step: Callable[[int], None] | None = None, evals: int | None = None) -> torch.Tensor:
    """Run the first `evals` evaluations of `solver` (default: every one) from the noisy `x`;
    returns the sample after them (at σ = solver.sigma(evals): the final sample after every one)."""
    reduce = reduce or LocalReduce()
    state = solver.init_state()
    for k in range(solver.num_evals if evals is None else evals):
        if before_step is not None:
            before_step(k)
        raw = model_fn(x, solver.model_time(k))
        x, state = solver.step(k, x, raw, state, reduce=reduce)
        if after_step is not None:
            after_step(k)
    return x


def denoise_stages(solvers: Sequence, x: torch.Tensor, start_stage: Callable[[int], ModelFn],
                   change: Callable[[int, torch.Tensor], torch.Tensor], reduce=None,
                   before_step: Callable[[int], None] | None = None,
                   after_step: Callable[[int], None] | None = None, noisy: Sequence[bool] = ()) -> torch.Tensor:
    """Run stage after stage; `solvers[i]` is stage i's solver, `x` stage 0's starting sample.

    `start_stage(i)` prepares stage i and returns the model for it; `change(i, x)` turns what
    stage i−1 hands over into stage i's starting sample. What it hands over (parafuse.stages):
    with `noisy[i]`, its noisy sample before its last evaluation, which then does not run; else
    the clean estimate x̂0 of its last evaluation. Every stage's solver starts from its own empty
    history. `before_step`/`after_step` see evaluations numbered across all stages. One stage is
    exactly `denoise`."""
    done, handed = 0, None
    for i, solver in enumerate(solvers):
        if i > 0:
            x = change(i, handed)
        model_fn, last = start_stage(i), {}

        def evaluate(x, t, model_fn=model_fn, last=last):
            last["x"], last["raw"] = x, model_fn(x, t)     # the last one gives x̂0 at the stage change
            return last["raw"]

        offset, hands_noisy = done, i + 1 < len(solvers) and i + 1 < len(noisy) and noisy[i + 1]
        evals = solver.num_evals - 1 if hands_noisy else solver.num_evals
        x = denoise(evaluate, x, solver, reduce,
                    None if before_step is None else (lambda k: before_step(offset + k)),
                    None if after_step is None else (lambda k: after_step(offset + k)), evals)
        done += evals
        if hands_noisy:
            handed = x
        elif i + 1 < len(solvers):
            handed = solver.data_prediction(solver.num_evals - 1, last["x"], last["raw"])
            if solver.thresholding:        # the x̂0 the solver's own update used
                handed = dynamic_threshold(handed, solver.dynamic_thresholding_ratio, solver.sample_max_value,
                                           reduce or LocalReduce())
    return x
