"""Diffusion ODE solvers as explicit steppers (k-diffusion style).

    from parafuse.solvers import make_schedule, make_solver, SOLVERS, LocalReduce
    schedule = make_schedule("flow", shift=3.0)
    solver = make_solver("dpmpp-2m", schedule, num_steps=20)   # 20 model evaluations
    x = solver.init_noise_sigma * noise
    state = solver.init_state()
    for k in range(solver.num_evals):
        raw = model(x, solver.model_time(k))
        x, state = solver.step(k, x, raw, state, reduce=reduce)

Every update is ``x_next = a·x + Σ b_k·m_k`` (``combine``), elementwise, so it runs on a strip
of the latent; only dynamic thresholding and guidance rescale reduce across strips (``reduce``).
"""
from __future__ import annotations

from .base import Solver
from .deis import DEIS, DEIS3M
from .dpmpp import DDIM, DPMSolverPP, DPMSolverPP2S, DPMSolverPP3M, DPMSolverPPHeavyBall, Euler
from .ghvb import GHVB
from .guidance import cfg, rescale
from .options import translate
from .schedules import FlowSchedule, VPSchedule, dynamic_shift, make_schedule
from .stepper import LocalReduce, combine
from .threshold import dynamic_threshold
from .unipc import UniPC, UniPCBh1

SOLVERS: dict[str, type[Solver]] = {
    cls.name: cls
    for cls in (DDIM, Euler, DPMSolverPP, DPMSolverPP3M, DPMSolverPP2S, DEIS, DEIS3M,
                UniPCBh1, UniPC, DPMSolverPPHeavyBall, GHVB)
}


def make_solver(name: str, schedule, num_steps: int | None = None, **opts) -> Solver:
    """Build solver ``name`` (a key of SOLVERS) over ``schedule``, making ``num_steps`` model
    evaluations whatever the solver (diffusers' num_inference_steps).

    Common options: spacing ("linspace" | "leading" | "trailing" | "karras", as diffusers'
    timestep_spacing; see schedules.py for flow schedules), flow_table, final_sigmas_type
    ("zero" | "sigma_min"), sigmas= / timesteps= (custom grid), lower_order_final,
    thresholding / dynamic_thresholding_ratio / sample_max_value, start_index / strength,
    round_timesteps.
    Solver options: dpmpp-3m: variant ("diffusers" default | "taylor", see DPMSolverPP);
    unipc-*: order (1..3, default 2; the method has order + 1), disable_corrector (grid indices);
    dpmpp-2m-hb: beta (default 0.8); ghvb: order (1..4, default 2), beta (default 0.8).
    diffusers' option names (solver_order, prediction_type, timestep_spacing, use_karras_sigmas,
    solver_type, algorithm_type) are mapped or refused by ``options.translate``.
    """
    try:
        cls = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose from {sorted(SOLVERS)}") from None
    schedule, opts = translate(cls, schedule, opts)
    return cls(schedule, num_steps, **opts)


__all__ = [
    "SOLVERS", "make_solver", "make_schedule", "LocalReduce", "combine", "Solver",
    "VPSchedule", "FlowSchedule", "dynamic_shift", "cfg", "rescale", "dynamic_threshold",
]
