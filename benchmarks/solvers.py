"""Solver accuracy vs number of model calls.

For every solver and call budget, the final sample is compared with a 200-step reference
(UniPC-bh2 of order 3, i.e. fourth order) on the same kind of grid, started from the same noise.
Error = ‖x − x_ref‖/‖x_ref‖.

    python benchmarks/solvers.py                       # Gaussian data, exact denoiser, VP and flow
    python benchmarks/solvers.py --model unet-small-vp # a parafuse.models denoiser (CPU is fine)

Gaussian case: data x0 ~ N(μ, diag(s²)) of latent shape [4, 32, 32] (s in 0.3..1.3), the ideal
denoiser in closed form, so the reference's own error against the exact ODE solution is reported
too. Five grids: VP (SD betas, eps) ending at σ = 0 and at σ_min; flow (shift 3) on the σ
tables of FlowMatchEuler, UniPC and DPM-Solver/DEIS (flow_table "euler" / "unipc" /
"dpmsolver"), each ending at σ = 0; every solver and the reference on the same grid. A call is
one model evaluation for every solver (dpmpp-2s: ⌊calls/2⌋ two-stage steps, then a first-order
step if calls is odd). Writes
benchmarks/results/solvers_<case>.json and .png (the plot needs matplotlib; --no-plot skips it).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, config_of, hardware, parser, provenance, save_plot, write_result  # noqa: E402
from parafuse.solvers import SOLVERS, make_schedule, make_solver  # noqa: E402
from parafuse.solvers.schedules import FLOW_TABLES  # noqa: E402

CALLS = (5, 8, 10, 15, 20, 25, 50)
REFERENCE = ("unipc-bh2", {"order": 3}, 200)
DEFAULT_SOLVERS = list(SOLVERS) + ["dpmpp-3m:variant=taylor", "unipc-bh2:order=3", "dpmpp-2m-hb:beta=0.5",
                                   "ghvb:order=3"]


def parse_solver(spec: str):
    """'name' or 'name:key=value,key=value' (values parsed as int/float when possible)."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        opts[key] = value
    return name, opts


class GaussianDenoiser:
    """Ideal denoiser for x0 ~ N(μ, diag(s²)), called like a model: raw = model(x, t)."""

    def __init__(self, schedule, shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.schedule = schedule
        self.mu = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
        self.std = torch.rand(shape, generator=g, dtype=torch.float64) + 0.3  # latent-like: 0.3 .. 1.3

    def alpha_sigma(self, t: float):
        if self.schedule.kind == "vp":  # t → VE σ/α by the schedule's own table (t is an integer here)
            ve = float(self.schedule.ve_from_t(t))
            alpha = 1 / math.sqrt(1 + ve * ve)
            return alpha, ve * alpha
        sigma = t / self.schedule.num_train_timesteps
        return 1 - sigma, sigma

    def __call__(self, x, t):
        a, s = self.alpha_sigma(t)
        x0 = self.mu + a * self.std ** 2 / (a * a * self.std ** 2 + s * s) * (x - a * self.mu)
        eps = (x - a * x0) / s
        return {"eps": eps, "v": a * eps - s * x0, "x0": x0, "flow": eps - x0}[self.schedule.prediction]

    def exact(self, x_start, a0, s0, a1, s1):
        """Exact probability-flow ODE solution at (α1, σ1) from x_start at (α0, σ0): the ODE keeps
        (x − αμ)/sqrt(α²s² + σ²) constant."""
        scale = torch.sqrt(a1 ** 2 * self.std ** 2 + s1 ** 2) / torch.sqrt(a0 ** 2 * self.std ** 2 + s0 ** 2)
        return a1 * self.mu + scale * (x_start - a0 * self.mu)


def sample(name, opts, schedule, calls, model, noise, grid):
    solver = make_solver(name, schedule, calls, **grid, **opts)
    x, state = solver.init_noise_sigma * noise, solver.init_state()
    for k in range(solver.num_evals):
        x, state = solver.step(k, x, model(x, solver.model_time(k)), state)
    return x, solver


def run_case(label, schedule, grid, model, noise, solvers, calls, exact=None):
    ref_name, ref_opts, ref_calls = REFERENCE
    t0 = time.perf_counter()
    ref, ref_solver = sample(ref_name, ref_opts, schedule, ref_calls, model, noise, grid)
    result = {"case": label, "schedule": repr(schedule), **grid, "final_sigma": float(ref_solver.sigmas[-1]),
              "reference": {"solver": ref_name, "opts": ref_opts, "calls": ref_calls}, "solvers": {}}
    if exact is not None:
        a0, s0 = float(ref_solver.alphas[0]), float(ref_solver.sigmas[0])
        a1, s1 = float(ref_solver.alphas[-1]), float(ref_solver.sigmas[-1])
        x_exact = exact(noise * ref_solver.init_noise_sigma, a0, s0, a1, s1)
        result["reference"]["error_vs_exact"] = float((ref - x_exact).norm() / x_exact.norm())
    for spec in solvers:
        name, opts = parse_solver(spec)
        rows = []
        for c in calls:
            x, solver = sample(name, opts, schedule, c, model, noise, grid)
            rows.append({"calls": solver.num_evals, "error": float((x - ref).norm() / ref.norm())})
        result["solvers"][spec] = rows
    result["seconds"] = time.perf_counter() - t0
    return result


def grid_label(result) -> str:
    table = f" ({result['flow_table']} σ table)" if result.get("flow_table") else ""
    return f"{result['spacing']}{table}"


def print_table(result, calls):
    print(f"\n== {result['case']}: {result['schedule']}, spacing {grid_label(result)}, "
          f"final σ = {result['final_sigma']:.4g} ({result['final_sigmas_type']})")
    ref = result["reference"]
    line = f"reference: {ref['solver']} {ref['opts']} with {ref['calls']} calls"
    if "error_vs_exact" in ref:
        line += f"; its error vs the exact ODE solution: {ref['error_vs_exact']:.2e}"
    print(line)
    print(f"{'solver':28s}" + "".join(f"{c:>9d} " for c in calls) + "  (model calls; relative error)")
    for spec, rows in result["solvers"].items():
        print(f"{spec:28s}" + "".join(f"{r['error']:9.2e} " for r in rows))


def plot(results, name):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the plot needs matplotlib (pip install matplotlib), or pass --no-plot") from None
    cols = min(2, len(results))
    rows_ = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(7.5 * cols, 5.5 * rows_), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax, result in zip(axes.flat, results):
        colors = plt.get_cmap("tab20").colors
        for j, (spec, rows) in enumerate(result["solvers"].items()):
            ax.loglog([r["calls"] for r in rows], [r["error"] for r in rows], label=spec, ms=4,
                      color=colors[j % 20], marker="os^vDP*X"[j % 8], ls="-" if j < 10 else "--")
        ax.set_title(f"{result['case']}: {result['schedule']}, {grid_label(result)}, "
                     f"final σ {result['final_sigmas_type']}", fontsize=9)
        ax.set_xlabel("model calls")
        ax.set_ylabel("relative error vs 200-step reference")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return save_plot(fig, name, dpi=110)


def model_case(name, latent_size, batch, seed):
    """A parafuse.models denoiser: model(x, timestep_tensor[B]); its schedule from model.spec.schedule
    (a dict of make_schedule arguments) or model.schedule ("vp" / "flow")."""
    try:
        from parafuse.models import load_model
    except ImportError as e:
        raise SystemExit(f"--model needs parafuse.models.load_model ({e})") from None
    model = load_model(name)
    spec = getattr(model, "spec", None)
    config = dict(getattr(spec, "schedule", None) or {"kind": model.schedule})
    schedule = make_schedule(config.pop("kind"), **config)
    channels = getattr(spec, "latent_channels", None) or model.in_channels
    noise = torch.randn(batch, channels, latent_size, latent_size, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def fn(x, t):
        return model(x, torch.full((x.shape[0],), t, dtype=torch.float32))
    return schedule, fn, noise


def main(argv=None):
    p = parser(__doc__, epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="parafuse.models name (default: the Gaussian case)")
    p.add_argument("--solvers", nargs="+", default=DEFAULT_SOLVERS, help="name or name:key=value,...")
    p.add_argument("--calls", type=int, nargs="+", default=list(CALLS))
    p.add_argument("--latent-size", type=int, default=16, help="--model: latent height = width")
    p.add_argument("--spacing", default="linspace", help="--model: timestep spacing")
    p.add_argument("--flow-table", default=None, choices=FLOW_TABLES,
                   help="--model, flow models: one σ table for every solver and the reference (default: each "
                        "solver its diffusers scheduler's table, the reference UniPC's)")
    p.add_argument("--final", default="zero", choices=("zero", "sigma_min"), help="--model: final σ")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=RESULTS, help="folder of the results (default: benchmarks/results)")
    args = p.parse_args(argv)
    prov = provenance(argv)
    torch.set_num_threads(args.threads)

    results = []
    if args.model is None:
        shape = (1, 4, 32, 32)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
        vp, flow = make_schedule("vp", prediction="eps"), make_schedule("flow", shift=3.0)
        for label, schedule, table, final in [
                ("gaussian-vp", vp, None, "zero"),              # diffusers' defaults
                ("gaussian-vp", vp, None, "sigma_min"),         # no final jump to σ = 0
                ("gaussian-flow", flow, "euler", "zero"),       # FlowMatchEuler's σ table (SD3/Flux)
                ("gaussian-flow", flow, "unipc", "zero"),       # UniPC's flow σ table
                ("gaussian-flow", flow, "dpmsolver", "zero")]:  # DPM-Solver's/DEIS' flow σ table
            model = GaussianDenoiser(schedule, shape[1:], seed=args.seed)
            grid = {"spacing": "linspace", "final_sigmas_type": final, **({"flow_table": table} if table else {})}
            results.append(run_case(label, schedule, grid, model, noise, args.solvers, args.calls, exact=model.exact))
        case = "gaussian"
    else:
        schedule, fn, noise = model_case(args.model, args.latent_size, args.batch, args.seed)
        grid = {"spacing": args.spacing, "final_sigmas_type": args.final,
                **({"flow_table": args.flow_table} if args.flow_table else {})}
        results.append(run_case(f"model {args.model}", schedule, grid, fn, noise, args.solvers, args.calls))
        case = args.model

    for r in results:
        print_table(r, args.calls)
    hw = {**hardware(), "torch_threads": torch.get_num_threads(), "numpy": np.__version__}
    name = os.path.join(os.path.abspath(args.out), f"solvers_{case}")
    json_path = write_result(name, "solvers", config_of(args), results, prov, hw,   # a row per grid case
                             error="||x - x_ref|| / ||x_ref|| of the final sample, x_ref = reference solver")
    print(f"\nhardware: {hw['device']} ({hw['platform']}), torch {torch.__version__}, "
          f"{args.threads} thread(s)\nwrote {json_path}")
    if not args.no_plot:
        print(f"wrote {plot(results, name)}")


if __name__ == "__main__":
    main()
