"""diffusers' scheduler option names, as ``make_solver`` takes them: each mapped to ours or refused
with what to use instead, before a grid is built.

    solver_order           the solver's order: checked against a fixed-order solver (naming the
                           solver of that order), ``order=`` for unipc-* and ghvb
    prediction_type        "epsilon" | "v_prediction" | "sample" | "flow_prediction": the schedule's
                           prediction (ours: eps, v, x0, flow)
    timestep_spacing       spacing (on flow schedules: see schedules.py)
    use_karras_sigmas      spacing="karras"
    solver_type            unipc-*: "bh1" | "bh2" (which is the solver's name); DPM-Solver++:
                           "midpoint" ("heun" is ghvb with order=2, beta=1)
    algorithm_type         "dpmsolver++" (DPM-Solver++, DDIM), "deis" (DEIS); nothing else
Schedule options (betas, shifts, steps_offset, ...) belong to ``make_schedule``.
"""
from __future__ import annotations

import inspect

from .base import Solver
from .schedules import with_prediction

# solvers of one family by order, to name the right one when solver_order does not fit
FAMILIES = ({1: "ddim", 2: "dpmpp-2m", 3: "dpmpp-3m"}, {2: "deis-2m", 3: "deis-3m"})
SCHEDULE_OPTIONS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "trained_betas", "steps_offset",
                    "use_flow_sigmas", "flow_shift", "shift", "use_dynamic_shifting", "prediction")
ALGORITHMS = {"dpmsolver++": ("ddim", "euler", "dpmpp-2m", "dpmpp-3m", "dpmpp-2s", "dpmpp-2m-hb"),
              "deis": ("deis-2m", "deis-3m")}


def own_options(cls: type[Solver]) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {p.name for p in inspect.signature(klass.__init__).parameters.values()
                      if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    return names - {"self", "schedule"}


def translate(cls: type[Solver], schedule, opts: dict):
    """(schedule, options) with diffusers' names replaced by ours; ValueError for what does not map."""
    opts, name = dict(opts), cls.name

    def set_ours(key, value, theirs):
        if key in opts and opts[key] != value:
            raise ValueError(f"{name}: diffusers' {theirs} and {key}={opts[key]!r} disagree; give one")
        opts[key] = value

    if "prediction_type" in opts:
        schedule = with_prediction(schedule, opts.pop("prediction_type"))
    if "timestep_spacing" in opts:
        set_ours("spacing", opts.pop("timestep_spacing"), "timestep_spacing")
    if opts.pop("use_karras_sigmas", False):
        set_ours("spacing", "karras", "use_karras_sigmas=True")
    if "solver_order" in opts:
        order = opts.pop("solver_order")
        if "order" in own_options(cls):
            set_ours("order", order, f"solver_order={order}")
        elif order != cls.order:
            family = next((f for f in FAMILIES if name in f.values()), {})
            instead = f"use {family[order]!r}" if order in family else "there is no such variant here"
            raise ValueError(f"{name} is of order {cls.order}; for diffusers' solver_order={order} {instead}")
    if "solver_type" in opts:
        kind = opts.pop("solver_type")
        variant = getattr(cls, "variant", None)
        if variant is not None:       # UniPC
            if kind != variant:
                raise ValueError(f"{name} is UniPC {variant}; for diffusers' solver_type={kind!r} use 'unipc-{kind}'"
                                 if kind in ("bh1", "bh2") else f"UniPC's solver_type is 'bh1' or 'bh2', got {kind!r}")
        elif name in ALGORITHMS["dpmsolver++"] and name not in ("ddim", "euler"):
            if kind == "heun":
                raise ValueError(f"{name} is diffusers' solver_type='midpoint'; its 'heun' form of DPM-Solver++(2M) "
                                 f"is 'ghvb' with order=2, beta=1.0")
            if kind != "midpoint":
                raise ValueError(f"DPM-Solver++'s solver_type is 'midpoint' or 'heun', got {kind!r}")
        else:
            raise ValueError(f"{name} has no solver_type (diffusers' DPM-Solver++ and UniPC option)")
    if "algorithm_type" in opts:
        algorithm = opts.pop("algorithm_type")
        if name not in ALGORITHMS.get(algorithm, ()):
            raise ValueError(f"{name} is not diffusers' algorithm_type={algorithm!r}; supported: "
                             + "; ".join(f"{a!r} for {', '.join(s)}" for a, s in ALGORITHMS.items()))
    for key in opts:
        if key in SCHEDULE_OPTIONS:
            raise ValueError(f"{key} is a schedule option: give it to make_schedule, not make_solver")
        if key not in own_options(cls):
            raise ValueError(f"{name} has no option {key!r}; its options: {', '.join(sorted(own_options(cls)))}, "
                             f"and diffusers' solver_order, prediction_type, timestep_spacing, use_karras_sigmas, "
                             f"solver_type, algorithm_type")
    return schedule, opts

