"""Solver tests: convergence order on a Gaussian with a closed-form ODE solution, trajectories
against diffusers' schedulers, σ tables, momentum variants, and exact strip reductions."""
import math
import threading

import numpy as np
import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from parafuse.solvers import SOLVERS, LocalReduce, cfg, dynamic_shift, make_schedule, make_solver, rescale
from parafuse.solvers.schedules import FLOW_TABLES
from parafuse.solvers.threshold import dynamic_threshold

# diffusers 0.42 hands torch tensors to NumPy 2 functions, which warn on every call
pytestmark = [pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")]

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD 1.x / SDXL betas
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "flow": "flow_prediction"}
STEPS = (5, 10, 25)
TOL = 1e-5  # norm-relative, every step of the trajectory


class FakeModel:
    """Deterministic, nonlinear in x and t, per-pixel (channel mixing only, so strips are exact)."""

    def __init__(self, channels=4, seed=0, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g, dtype=torch.float64) / 2
        self.b = torch.randn(channels, generator=g, dtype=torch.float64) / 4
        self.scale = scale

    def __call__(self, x, t):
        tt = float(t) / 1000
        w, b = self.w.to(x.dtype), self.b.to(x.dtype)
        mixed = (w[None, :, :, None] * x.flatten(2)[:, None]).sum(2).view_as(x) + b[None, :, None, None]
        return self.scale * (0.8 * torch.tanh(mixed * (0.5 + tt)) + 0.3 * torch.sin(2 * x + 3 * tt))


def latent(dtype=torch.float32, seed=1, shape=(2, 4, 8, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def diffusers_nan_on_last_step(sched) -> bool:
    """Known difference, pinned: diffusers' UniPC bh1 returns NaN on its last step when it lands
    on σ = 0. Its predictor is first order there and adds α_t·B(h)·0 with B(h) = h = ∞ (λ = ∞ at
    σ = 0): ∞·0. Without that term its update is x = x̂0 of the last evaluation; ours is that limit."""
    return (isinstance(sched, UniPCMultistepScheduler) and sched.config.solver_type == "bh1"
            and float(sched.sigmas[-1]) == 0.0)


def run_pair(sched, n_evals, solver, model, dtype=torch.float32):
    """Feed both the same model outputs (at diffusers' timestep); return the worst per-step gap.
    Both trajectories must stay finite at every step (a NaN gap would vanish in max());
    diffusers' one known NaN (diffusers_nan_on_last_step) must appear, and our last step is
    compared with its finite limit instead."""
    sched.set_timesteps(n_evals)
    assert solver.num_evals == len(sched.timesteps)
    nan_last = diffusers_nan_on_last_step(sched)
    xd = xo = latent(dtype)
    state, worst = solver.init_state(), 0.0
    for k, t in enumerate(sched.timesteps):
        raw = model(xd, float(t))
        if nan_last and k == len(sched.timesteps) - 1:
            limit = sched.convert_model_output(raw, sample=xd)  # x̂0, from the uncorrected sample as in step()
            assert torch.isnan(sched.step(raw, t, xd).prev_sample).all()
            xd = limit
        else:
            xd = sched.step(raw, t, xd).prev_sample
        xo, state = solver.step(k, xo, model(xo, float(t)), state)
        assert torch.isfinite(xd).all(), f"diffusers' evaluation {k} of {n_evals} is not finite"
        assert torch.isfinite(xo).all(), f"our evaluation {k} of {n_evals} is not finite"
        worst = max(worst, rel(xo, xd))
    return worst, xo, xd


def vp_schedule(pred, **kw):
    return make_schedule("vp", prediction=pred, **SD, **kw)


def to_ours(sched_sigmas, kind):
    """diffusers keeps VE σ/α for VP schedules; ours is σ with α² + σ² = 1."""
    s = sched_sigmas.double()
    return s / torch.sqrt(1 + s * s) if kind == "vp" else s


# --------------------------------------------------------------------------------------------
# 1. Convergence order on a Gaussian
# --------------------------------------------------------------------------------------------
# data x0 ~ N(μ, diag(s²)); x = α·x0 + σ·ε. The ideal denoiser is E[x0|x] = μ + αs²/(α²s² + σ²)·(x − αμ)
# and the probability-flow ODE keeps (x − αμ)/sqrt(α²s² + σ²) constant, so the exact solution
# at σ_min is known in closed form for VP and flow alike.
G = torch.Generator().manual_seed(0)
MU = torch.randn(64, generator=G, dtype=torch.float64) * 0.5
STD = torch.rand(64, generator=G, dtype=torch.float64) * 0.9 + 0.1
Z = torch.randn(4, 64, generator=G, dtype=torch.float64)


def gaussian_raw(schedule, x, alpha, sigma):
    x0 = MU + alpha * STD ** 2 / (alpha ** 2 * STD ** 2 + sigma ** 2) * (x - alpha * MU)
    eps = (x - alpha * x0) / sigma
    return {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0, "flow": eps - x0}[schedule.prediction]


def gaussian_error(name, schedule, sigmas, **opts):
    solver = make_solver(name, schedule, sigmas=sigmas, lower_order_final=False, **opts)
    a0, s0 = float(solver.alphas[0]), float(solver.sigmas[0])
    a1, s1 = float(solver.alphas[-1]), float(solver.sigmas[-1])
    x = a0 * MU + torch.sqrt(a0 ** 2 * STD ** 2 + s0 ** 2) * Z  # exact marginal at σ_max
    exact = a1 * MU + torch.sqrt(a1 ** 2 * STD ** 2 + s1 ** 2) * Z
    state = solver.init_state()
    for k in range(solver.num_evals):
        raw = gaussian_raw(schedule, x, float(solver.alphas[k]), float(solver.sigmas[k]))
        x, state = solver.step(k, x, raw, state)
    return rel(x, exact)


def lambda_uniform(schedule, lam_max, lam_min, n):
    lam = np.linspace(lam_max, lam_min, n + 1)
    if schedule.kind == "vp":
        return torch.tensor(1 / np.sqrt(1 + np.exp(2 * lam)))
    return torch.tensor(1 / (1 + np.exp(lam)))


N_DEFAULT = (24, 34, 48, 68, 96)
# (solver, options, nominal order, step counts)
ORDER_CASES = [
    ("ddim", {}, 1, N_DEFAULT),
    ("euler", {}, 1, N_DEFAULT),
    ("dpmpp-2m", {}, 2, N_DEFAULT),
    # diffusers' 3M weights the quadratic Taylor term by ½ (see DPMSolverPP's docstring and
    # test_dpmpp_3m_quadratic_weight): second order. variant="taylor" is the third-order fix.
    ("dpmpp-3m", {}, 2, N_DEFAULT),
    ("dpmpp-3m", {"variant": "taylor"}, 3, N_DEFAULT),
    ("dpmpp-2s", {}, 2, N_DEFAULT),
    ("deis-2m", {}, 2, N_DEFAULT),
    ("deis-3m", {}, 3, N_DEFAULT),
    ("unipc-bh1", {}, 3, N_DEFAULT),  # UniP-2 + UniC-2: order p + 1
    ("unipc-bh2", {}, 3, N_DEFAULT),
    ("unipc-bh2", {"order": 1}, 2, N_DEFAULT),
    ("unipc-bh2", {"order": 3}, 4, (96, 136, 192, 272, 384)),  # reaches its order late
    ("unipc-bh1", {"order": 3}, 4, (96, 136, 192, 272, 384)),
    ("dpmpp-2m-hb", {"beta": 1.0}, 2, N_DEFAULT),
    ("dpmpp-2m-hb", {"beta": 0.8}, 1, N_DEFAULT),  # momentum lags the slope by O(h)
    ("ghvb", {"order": 1, "beta": 0.8}, 1, N_DEFAULT),
    ("ghvb", {"order": 2, "beta": 0.8}, 2, N_DEFAULT),
    ("ghvb", {"order": 3, "beta": 0.8}, 3, N_DEFAULT),
]


def fitted_order(name, schedule, ns, **opts):
    lam_min = float(np.log(schedule.alpha(schedule.sigma_min) / schedule.sigma_min))
    errs = [gaussian_error(name, schedule, lambda_uniform(schedule, -8.0, lam_min, n), **opts) for n in ns]
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("name,opts,order,ns", ORDER_CASES, ids=[f"{c[0]}{c[1]}" for c in ORDER_CASES])
def test_convergence_order(kind, name, opts, order, ns):
    """λ-uniform grid from λ = −8 (SNR 1e-7: x̂0 is constant there to 1e-7, so the lower-order
    warm-up steps of the multistep methods cannot mask their order) to σ_min; ns = number of
    steps = model evaluations (dpmpp-2s: n/2 two-stage steps). Tolerance: order − 0.3 ≤ slope ≤
    order + 1.25. The lower bound is the claim (at least the nominal order). The upper bound is loose on purpose: on a λ-uniform grid the leading error
    term of the third-order exponential integrators cancels for this linear problem and they
    converge like h⁴ (measured 3.75–4.00 for DEIS-3M and 3M-taylor); on a non-uniform grid they
    measure ≈ 3 (test_third_order_on_warped_grid)."""
    schedule = make_schedule("vp", prediction="eps") if kind == "vp" else make_schedule("flow")
    slope, errs = fitted_order(name, schedule, ns, **opts)
    assert order - 0.3 <= slope <= order + 1.25, (slope, errs)


def test_third_order_on_warped_grid():
    schedule = make_schedule("vp", prediction="eps")
    lam_min = float(np.log(schedule.alpha(schedule.sigma_min) / schedule.sigma_min))
    ns = N_DEFAULT
    for name, opts in [("deis-3m", {}), ("dpmpp-3m", {"variant": "taylor"})]:
        errs = []
        for n in ns:
            u = np.linspace(0, 1, n + 1)
            lam = -8.0 + (lam_min + 8.0) * (u + 0.5 * np.sin(np.pi * u) / np.pi)
            errs.append(gaussian_error(name, schedule, torch.tensor(1 / np.sqrt(1 + np.exp(2 * lam))), **opts))
        slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
        assert 2.7 <= slope <= 3.3, (name, slope)


def test_dpmpp_3m_quadratic_weight():
    """The 3M update applied to x̂0(λ) = (λ − λ_s)^d versus the exact exponential integral
    σ_t∫e^λ x̂0(λ)dλ: exact for d = 0, 1; d = 2 gets exactly half with diffusers' D2, all of it
    with variant="taylor"."""
    from scipy.integrate import quad
    schedule = make_schedule("vp", prediction="x0")
    sig = lambda_uniform(schedule, -1.0, 1.0, 10)
    ratios = {}
    for variant in ("diffusers", "taylor"):
        solver = make_solver("dpmpp-3m", schedule, sigmas=sig, variant=variant)
        i = 5
        lam = solver._lam
        _, coeffs = solver.dpmpp_coeffs(i, 3)
        for d in (0, 1, 2):
            m = [(lam[i - j] - lam[i]) ** d for j in range(3)]
            approx = sum(c * mj for c, mj in zip(coeffs, m))
            exact = solver._sig[i + 1] * quad(lambda l: math.exp(l) * (l - lam[i]) ** d, lam[i], lam[i + 1])[0]
            ratios[variant, d] = approx / exact
    assert ratios["diffusers", 0] == pytest.approx(1, rel=1e-12)
    assert ratios["diffusers", 1] == pytest.approx(1, rel=1e-10)
    assert ratios["diffusers", 2] == pytest.approx(0.5, rel=1e-8)
    assert ratios["taylor", 2] == pytest.approx(1, rel=1e-8)


# --------------------------------------------------------------------------------------------
# 2. Trajectories against diffusers (float32, same model outputs). Ours is built from the same
#    diffusers options (make_solver maps their names), so each case also checks that the same
#    names give the same σ grid and model times; the model always gets diffusers' timestep.
# --------------------------------------------------------------------------------------------
VP_CASES = [
    # (our solver, diffusers class, diffusers kwargs)
    ("ddim", DPMSolverMultistepScheduler, {"solver_order": 1}),
    ("dpmpp-2m", DPMSolverMultistepScheduler, {"solver_order": 2}),
    ("dpmpp-3m", DPMSolverMultistepScheduler, {"solver_order": 3}),
    ("dpmpp-2m", DPMSolverMultistepScheduler, {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    ("dpmpp-3m", DPMSolverMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True}),
    ("dpmpp-2m", DPMSolverMultistepScheduler, {"timestep_spacing": "leading", "steps_offset": 1}),
    ("unipc-bh1", UniPCMultistepScheduler, {"solver_type": "bh1"}),
    ("unipc-bh2", UniPCMultistepScheduler, {"solver_type": "bh2"}),
    ("unipc-bh2", UniPCMultistepScheduler, {"solver_type": "bh2", "solver_order": 3}),
    ("unipc-bh1", UniPCMultistepScheduler,
     {"solver_type": "bh1", "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    ("unipc-bh2", UniPCMultistepScheduler, {"use_karras_sigmas": True}),
    ("unipc-bh2", UniPCMultistepScheduler, {"disable_corrector": [0, 2]}),
]


def ours_from_diffusers(name, kind, prediction_type, dkw, n, **schedule_kw):
    """Our solver from a diffusers scheduler's options; schedule options go to make_schedule."""
    dkw = dict(dkw)
    sched_kw = {k: dkw.pop(k) for k in ("steps_offset", "shift", "flow_shift") if k in dkw}
    dkw.pop("use_flow_sigmas", None)
    if kind == "vp":
        schedule = make_schedule("vp", **SD, **sched_kw, **schedule_kw)
    else:
        schedule = make_schedule("flow", **sched_kw, **schedule_kw)
    return make_solver(name, schedule, n, prediction_type=prediction_type, **dkw)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("name,dcls,dkw", VP_CASES, ids=[f"{c[0]}-{c[1].__name__[:8]}{c[2]}" for c in VP_CASES])
def test_vp_matches_diffusers(name, dcls, dkw, pred, n):
    sched = dcls(prediction_type=DIFFUSERS_PRED[pred], **SD, **dkw)
    solver = ours_from_diffusers(name, "vp", DIFFUSERS_PRED[pred], dkw, n)
    worst, _, _ = run_pair(sched, n, solver, FakeModel())
    assert torch.equal(solver.timesteps, sched.timesteps.double())  # what the model is told
    assert worst <= TOL


@pytest.mark.parametrize("n", STEPS)
def test_x0_prediction_and_thresholding_match_diffusers(n):
    for dkw in ({}, {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}):
        sched = DPMSolverMultistepScheduler(prediction_type="sample", **SD, **dkw)
        solver = ours_from_diffusers("dpmpp-2m", "vp", "sample", dkw, n)
        worst, _, _ = run_pair(sched, n, solver, FakeModel(scale=1.6))
        assert worst <= TOL


@pytest.mark.parametrize("n", STEPS + (1, 2))
@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpmpp_2s_matches_diffusers_singlestep(pred, n, lower_order_final):
    """n steps = n model evaluations, as diffusers' num_inference_steps: ⌊n/2⌋ two-stage steps and
    a first-order step if n is odd. The order list is diffusers' [1, 2, 1, 2, …], including its
    overrides (an odd n switches lower_order_final on; so does a final σ of 0)."""
    final = "zero" if lower_order_final else "sigma_min"
    dkw = dict(solver_order=2, lower_order_final=lower_order_final, final_sigmas_type=final)
    sched = DPMSolverSinglestepScheduler(prediction_type=DIFFUSERS_PRED[pred], **SD, **dkw)
    solver = ours_from_diffusers("dpmpp-2s", "vp", DIFFUSERS_PRED[pred], dkw, n)
    assert solver.num_steps == solver.num_evals == n
    worst, _, _ = run_pair(sched, n, solver, FakeModel())
    assert solver.order_list == sched.order_list
    assert worst <= TOL


@pytest.mark.parametrize("start", [3, 4])
def test_dpmpp_2s_img2img_matches_diffusers(start):
    """Starting at the second evaluation of a two-stage step (odd start) has no x̂0 of the step's
    first point: a first-order step, as in diffusers."""
    n = 11
    sched = DPMSolverSinglestepScheduler(solver_order=2, **SD)
    sched.set_timesteps(n)
    sched.set_begin_index(start)
    solver = make_solver("dpmpp-2s", vp_schedule("eps"), n, start_index=start)
    assert solver.order_list[start] == 1 + start % 2
    xd = xo = latent()
    model, state = FakeModel(), solver.init_state()
    for k, t in enumerate(sched.timesteps[start:]):
        xd = sched.step(model(xd, float(t)), t, xd).prev_sample
        xo, state = solver.step(k, xo, model(xo, float(t)), state)
        assert rel(xo, xd) <= TOL


FLOW_CASES = [
    ("euler", FlowMatchEulerDiscreteScheduler, {"shift": 3.0}),
    ("ddim", FlowMatchEulerDiscreteScheduler, {"shift": 3.0}),
    ("dpmpp-2m", DPMSolverMultistepScheduler, {"solver_order": 2}),
    ("dpmpp-3m", DPMSolverMultistepScheduler, {"solver_order": 3}),
    ("dpmpp-2s", DPMSolverSinglestepScheduler, {"solver_order": 2}),
    ("unipc-bh1", UniPCMultistepScheduler, {"solver_type": "bh1"}),
    ("unipc-bh2", UniPCMultistepScheduler, {"solver_type": "bh2"}),
]
FLOW_DIFFUSERS = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name,dcls,dkw", FLOW_CASES, ids=[f"{c[0]}-{c[1].__name__[:8]}" for c in FLOW_CASES])
def test_flow_matches_diffusers(name, dcls, dkw, n):
    """Every diffusers flow scheduler is configured with timestep_spacing "linspace" (the default,
    which they ignore); so is ours, and each solver takes its diffusers scheduler's σ table."""
    if dcls is not FlowMatchEulerDiscreteScheduler:
        dkw = {**dkw, **FLOW_DIFFUSERS}
    sched = dcls(**dkw)
    own = ours_from_diffusers(name, "flow", "flow_prediction", {k: v for k, v in dkw.items() if k != "prediction_type"}, n)
    sched.set_timesteps(n)
    assert torch.allclose(own.sigmas, sched.sigmas.double(), atol=1e-6, rtol=0)
    # Model time σ·1000: FlowMatchEuler keeps it as float; DPM/UniPC cast it to int64 (truncation).
    if dcls is FlowMatchEulerDiscreteScheduler:
        assert torch.allclose(own.timesteps, sched.timesteps.double(), atol=1e-3, rtol=0)
    else:
        assert torch.equal(torch.floor(own.timesteps + 1e-9), sched.timesteps.double())
    # Trajectories on diffusers' own (float32) σ table. With our float64 grid, unipc-bh1 differs
    # by up to 2.5e-5 at 5 steps: diffusers stores σ0 = 1 − 1e-6 in float32, i.e. α0 = 1.0133e-6
    # instead of 1e-6, and bh1's first corrector weight B(h) = h ≈ 14 amplifies that (bh2: 3e-7).
    solver = make_solver(name, own.schedule, sigmas=sched.sigmas.double(), timesteps=own.timesteps)
    worst, _, _ = run_pair(sched, solver.num_evals, solver, FakeModel())
    assert worst <= TOL


def test_run_pair_catches_nan():
    """max(worst, nan) is worst: run_pair must reject a NaN step rather than skip its gap."""

    class NaNAtStep3(DPMSolverMultistepScheduler):
        def step(self, model_output, timestep, sample, **kw):
            out = super().step(model_output, timestep, sample, **kw)
            if self.step_index == 3:
                out.prev_sample = torch.full_like(out.prev_sample, float("nan"))
            return out

    with pytest.raises(AssertionError, match="diffusers' evaluation 2 of 6 is not finite"):
        run_pair(NaNAtStep3(**SD), 6, make_solver("dpmpp-2m", vp_schedule("eps"), 6), FakeModel())


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_diffusers_unipc_bh1_nan_is_pinned(kind):
    """diffusers' UniPC bh1 landing on σ = 0 returns NaN (see diffusers_nan_on_last_step); ours
    returns the finite limit, x̂0 of the last evaluation, and matches every earlier step."""
    extra = FLOW_DIFFUSERS if kind == "flow" else dict(SD)
    sched = UniPCMultistepScheduler(solver_type="bh1", **extra)
    sched.set_timesteps(8)
    assert diffusers_nan_on_last_step(sched)
    assert not diffusers_nan_on_last_step(UniPCMultistepScheduler(solver_type="bh2", **extra))
    solver = ours_from_diffusers("unipc-bh1", kind, "flow_prediction" if kind == "flow" else "epsilon",
                                 {"solver_type": "bh1"}, 8, **({"shift": 3.0} if kind == "flow" else {}))
    if kind == "flow":  # diffusers' own float32 table (see test_flow_matches_diffusers)
        solver = make_solver("unipc-bh1", solver.schedule, sigmas=sched.sigmas.double(), timesteps=solver.timesteps)
    worst, xo, _ = run_pair(sched, 8, solver, FakeModel())
    assert worst <= TOL and torch.isfinite(xo).all()


class DEIS64(DEISMultistepScheduler):
    """diffusers' DEIS, with its σ table (and so every coefficient) in float64."""

    def set_timesteps(self, *args, **kw):
        super().set_timesteps(*args, **kw)
        self.sigmas = self.sigmas.double()


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("kind,pred", [("vp", "eps"), ("vp", "v"), ("flow", "flow")])
@pytest.mark.parametrize("order", [2, 3])
def test_deis_matches_diffusers(order, kind, pred, n):
    """DEIS in float32 cannot be compared at 1e-5: diffusers computes the log-ρ coefficients in
    float32 as differences of nearly equal antiderivative values (ρ = σ/α reaches ~3000 on flow
    grids), which costs it up to ~3e-5 of its own accuracy. So: (a) with diffusers' σ table in
    float64 the two agree to 1e-10 — the same algorithm; (b) our float32 trajectory stays within
    2e-6 of that float64 reference (diffusers' float32 run is off by up to ~3e-5)."""
    kw = dict(solver_order=order, prediction_type=DIFFUSERS_PRED[pred])
    if kind == "vp":
        kw.update(SD)
        schedule = vp_schedule(pred)
    else:
        kw.update(use_flow_sigmas=True, flow_shift=3.0)
        schedule = make_schedule("flow", shift=3.0)
    name = f"deis-{order}m"
    ref = DEISMultistepScheduler(**kw)
    ref.set_timesteps(n)
    table, ts = to_ours(ref.sigmas, kind), ref.timesteps.double()

    sched64 = DEIS64(**kw)
    solver = make_solver(name, schedule, sigmas=table, timesteps=ts)
    worst64, _, ref64 = run_pair(sched64, n, solver, FakeModel(), dtype=torch.float64)
    assert worst64 <= 1e-10
    _, ours32, _ = run_pair(DEISMultistepScheduler(**kw), n, make_solver(name, schedule, sigmas=table, timesteps=ts),
                            FakeModel(), dtype=torch.float32)
    assert rel(ours32, ref64) <= 2e-6


def test_img2img_start_index_matches_diffusers():
    n, start = 10, 4
    sched = DPMSolverMultistepScheduler(**SD)
    sched.set_timesteps(n)
    sched.set_begin_index(start)
    solver = make_solver("dpmpp-2m", vp_schedule("eps"), n, start_index=start)
    assert solver.num_evals == n - start
    assert float(solver.sigmas[0]) == pytest.approx(float(to_ours(sched.sigmas, "vp")[start]), rel=1e-6)
    x0, noise = latent(seed=3), latent(seed=4)
    xd = sched.add_noise(x0, noise, sched.timesteps[start:start + 1])
    xo = solver.add_noise(x0, noise)
    assert rel(xo, xd) <= 1e-6
    model, state = FakeModel(), solver.init_state()
    for k, t in enumerate(sched.timesteps[start:]):
        assert solver.model_time(k) == float(t)
        xd = sched.step(model(xd, float(t)), t, xd).prev_sample
        xo, state = solver.step(k, xo, model(xo, float(t)), state)
        assert rel(xo, xd) <= TOL
    assert make_solver("dpmpp-2m", vp_schedule("eps"), n, strength=0.6).start_index == start


# --------------------------------------------------------------------------------------------
# 3. σ tables and timesteps
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", (5, 10, 25, 50))
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_vp_spacing_equals_diffusers(n, spacing, final):
    schedule = vp_schedule("eps")
    ours = schedule.grid(n, spacing, final)
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler,
                DPMSolverSinglestepScheduler):
        if cls is DEISMultistepScheduler and final == "zero":
            continue  # diffusers' DEIS has no final_sigmas_type: it always ends at σ_min
        if cls is DPMSolverSinglestepScheduler and spacing in ("leading", "trailing"):
            continue  # diffusers' singlestep scheduler has no timestep_spacing: always linspace
        kw = {} if cls is DEISMultistepScheduler else {"final_sigmas_type": final}
        if cls is not DPMSolverSinglestepScheduler:
            kw["timestep_spacing"] = "linspace" if spacing == "karras" else spacing
        sched = cls(use_karras_sigmas=spacing == "karras", **kw, **SD)
        sched.set_timesteps(n)
        np.testing.assert_array_equal(ours.timesteps, sched.timesteps.double().numpy())
        np.testing.assert_allclose(ours.sigmas, to_ours(sched.sigmas, "vp").numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", (5, 10, 25, 50))
@pytest.mark.parametrize("shift", (1.0, 3.0))
def test_flow_spacing_equals_diffusers(n, shift):
    """On flow schedules diffusers ignores timestep_spacing: each scheduler keeps its own σ table.
    spacing "linspace" (diffusers' default name) gives each solver its scheduler's table;
    flow_table picks another; karras is FlowMatchEuler's."""
    schedule = make_schedule("flow", shift=shift)
    flow = dict(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    tables = {  # (our solver, flow_table, spacing): diffusers scheduler
        ("euler", None, "linspace"): FlowMatchEulerDiscreteScheduler(shift=shift),
        ("dpmpp-2m", None, "karras"): FlowMatchEulerDiscreteScheduler(shift=shift, use_karras_sigmas=True),
        ("unipc-bh2", None, "linspace"): UniPCMultistepScheduler(**flow),
        ("dpmpp-2m", None, "linspace"): DPMSolverMultistepScheduler(**flow),
        ("dpmpp-2s", None, "linspace"): DPMSolverSinglestepScheduler(**flow),
        ("deis-3m", None, "linspace"): DEISMultistepScheduler(**flow),
        ("dpmpp-2m", "unipc", "linspace"): UniPCMultistepScheduler(**flow, timestep_spacing="trailing"),
        ("unipc-bh2", "euler", "linspace"): FlowMatchEulerDiscreteScheduler(shift=shift),
        ("ddim", "dpmsolver", "linspace"): DPMSolverMultistepScheduler(**flow, timestep_spacing="leading"),
    }
    for (name, table, spacing), sched in tables.items():
        sched.set_timesteps(n)
        opts = {"flow_table": table} if table else {}
        ours = make_solver(name, schedule, n, spacing=spacing, **opts).sigmas.numpy()
        theirs = sched.sigmas.double().numpy()
        if isinstance(sched, DEISMultistepScheduler):
            # diffusers' flow DEIS repeats its last σ (a zero-length final step: its sample stays at
            # that σ); ours ends at final_sigmas_type, σ = 0 by default
            assert theirs[-1] == theirs[-2] and ours[-1] == 0
            ours, theirs = ours[:-1], theirs[:-1]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=f"{name} {table} {spacing}")


def test_flow_leading_and_trailing_are_refused():
    for spacing in ("leading", "trailing"):
        with pytest.raises(ValueError, match="diffusers' flow schedulers ignore timestep_spacing"):
            make_solver("dpmpp-2m", make_schedule("flow", shift=3.0), 10, timestep_spacing=spacing)
    with pytest.raises(ValueError, match="flow_table must be one of"):
        make_solver("dpmpp-2m", make_schedule("flow"), 10, flow_table="ddim")
    with pytest.raises(ValueError, match="flow_table applies to flow schedules"):
        make_solver("dpmpp-2m", vp_schedule("eps"), 10, flow_table="euler")


@pytest.mark.parametrize("seq_len", (256, 1024, 2048, 4096))
def test_dynamic_shift_equals_flux_inside_fitted_range(seq_len):
    mu = 0.5 + (seq_len - 256) * (1.15 - 0.5) / (4096 - 256)  # FluxPipeline.calculate_shift
    assert dynamic_shift(seq_len) == pytest.approx(math.exp(mu), rel=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(10, mu=mu)
    ours = make_schedule("flow", image_seq_len=seq_len).grid(10)
    np.testing.assert_allclose(ours.sigmas, sched.sigmas.double().numpy(), rtol=0, atol=1e-6)


def test_dynamic_shift_clamped_at_high_resolution():
    tokens = lambda px: (px // 16) ** 2  # Flux: VAE /8, 2×2 patches
    s1k, s2k, s4k, s8k = (dynamic_shift(tokens(p)) for p in (1024, 2048, 4096, 8192))
    assert s1k == pytest.approx(math.exp(1.15))
    assert s2k == pytest.approx(math.exp(1.15) * 2)   # ∝ sqrt(tokens) beyond the fitted range
    assert s4k == pytest.approx(math.exp(1.15) * 4)
    assert s8k == pytest.approx(16.0)                  # clamp: mu ≤ log 16
    ladder = [dynamic_shift(t) for t in range(64, 10 ** 6, 997)]
    assert all(b >= a for a, b in zip(ladder, ladder[1:])) and min(ladder) >= 1.0


# --------------------------------------------------------------------------------------------
# 4. Momentum variants
# --------------------------------------------------------------------------------------------
def run_solver(solver, model, x):
    state = solver.init_state()
    for k in range(solver.num_evals):
        x, state = solver.step(k, x, model(x, solver.model_time(k)), state)
    return x


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("n", (8, 20))
def test_heavy_ball_beta_one_is_dpmpp_2m(kind, n):
    schedule = vp_schedule("eps") if kind == "vp" else make_schedule("flow", shift=3.0)
    x = latent(torch.float64)
    plain = run_solver(make_solver("dpmpp-2m", schedule, n), FakeModel(), x)
    hb = run_solver(make_solver("dpmpp-2m-hb", schedule, n, beta=1.0), FakeModel(), x)
    damped = run_solver(make_solver("dpmpp-2m-hb", schedule, n, beta=0.5), FakeModel(), x)
    assert rel(hb, plain) <= 1e-12
    assert rel(damped, plain) > 1e-4 and torch.isfinite(damped).all()


def test_ghvb_order1_beta1_is_ddim():
    schedule = vp_schedule("eps")
    x = latent(torch.float64)
    ddim = run_solver(make_solver("ddim", schedule, 12), FakeModel(), x)
    ghvb = run_solver(make_solver("ghvb", schedule, 12, order=1, beta=1.0), FakeModel(), x)
    assert rel(ghvb, ddim) <= 1e-12


@pytest.mark.parametrize("beta", (0.3, 0.6, 0.9, 1.0))
def test_ghvb_coefficients_tend_to_paper_for_small_uniform_steps(beta):
    """On a λ-uniform grid with small h, long after the start, the solved coefficients approach
    the paper's GHVB closed forms (β = 1: Adams–Bashforth); the e^λ weight moves them by O(h)."""
    lam = -1.0 + 1e-4 * np.arange(121)
    solver = make_solver("ghvb", vp_schedule("eps"), sigmas=torch.tensor(1 / np.sqrt(1 + np.exp(2 * lam))),
                         order=3, beta=beta, lower_order_final=False)
    b = beta
    np.testing.assert_allclose(solver.ghvb_coeffs(100, 2), [(2 + b) / (2 * b), -(2 - b) / (2 * b)], rtol=1e-3)
    np.testing.assert_allclose(solver.ghvb_coeffs(100, 3),
                               [(18 + 5 * b) / (12 * b), -(24 - 8 * b) / (12 * b), (6 - b) / (12 * b)], rtol=1e-3)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_ghvb_beta1_order2_is_dpmpp_2m_heun(kind, n):
    """Without momentum, GHVB of order 2 integrates the linear interpolant of x̂0 exactly:
    DPM-Solver++(2M) in diffusers' solver_type="heun" form."""
    if kind == "vp":
        sched = DPMSolverMultistepScheduler(solver_type="heun", **SD)
        solver = make_solver("ghvb", vp_schedule("eps"), n, order=2, beta=1.0)
    else:
        sched = DPMSolverMultistepScheduler(solver_type="heun", prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
        solver = make_solver("ghvb", make_schedule("flow", shift=3.0), n, order=2, beta=1.0)  # DPM-Solver's table
    worst, _, _ = run_pair(sched, n, solver, FakeModel())
    assert worst <= TOL


@pytest.mark.parametrize("n", (8, 20))
def test_ghvb_beta1_order3_is_taylor_3m(n):
    """Third-order steps: same coefficients as the exact-Taylor 3M (their warm-up second-order
    steps differ: 3M uses the midpoint form, GHVB the heun form)."""
    schedule = vp_schedule("eps")
    taylor = make_solver("dpmpp-3m", schedule, n, variant="taylor")
    ghvb = make_solver("ghvb", schedule, n, order=3, beta=1.0)
    for i in range(2, n - 2):
        _, expected = taylor.dpmpp_coeffs(i, 3)
        phi = ghvb._ddim(i, i + 1)[1]
        np.testing.assert_allclose([phi * c for c in ghvb.ghvb_coeffs(i, 3)], expected, rtol=1e-12)


def test_ghvb_damps_overshoot():
    """At few steps the velocity average is smoother than plain AB: the GHVB output with β < 1
    lies between ddim-like and AB-like behaviour and stays finite for every order."""
    schedule = vp_schedule("eps")
    x = latent(torch.float64)
    for order in (1, 2, 3, 4):
        for beta in (0.2, 0.5, 0.8, 1.0):
            out = run_solver(make_solver("ghvb", schedule, 6, order=order, beta=beta), FakeModel(), x)
            assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# 5. API and exact reductions across strips
# --------------------------------------------------------------------------------------------
SCHEDULES = {
    "vp-eps": lambda: vp_schedule("eps"),
    "vp-v": lambda: vp_schedule("v"),
    "vp-x0": lambda: vp_schedule("x0"),
    "flow": lambda: make_schedule("flow", shift=3.0),
    "flow-dyn": lambda: make_schedule("flow", image_seq_len=4096),
}


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
@pytest.mark.parametrize("name", list(SOLVERS))
def test_sampling_loop_api(name, sched_name):
    schedule = SCHEDULES[sched_name]()
    grids = [{"spacing": s} for s in ("linspace", "trailing", "karras")] if schedule.kind == "vp" else \
        [{"flow_table": t} for t in FLOW_TABLES] + [{"spacing": "karras"}]
    for grid in grids:
        solver = make_solver(name, schedule, num_steps=5, **grid)  # odd: dpmpp-2s ends with a first-order step
        assert solver.name == name and solver.num_steps == solver.num_evals == 5
        assert len(solver.sigmas) == solver.num_evals + 1 and solver.sigmas[-1] == 0
        assert torch.all(solver.sigmas[:-1] > solver.sigmas[1:])
        x = solver.init_noise_sigma * latent()
        state = solver.init_state()
        for k in range(solver.num_evals):
            t = solver.model_time(k)
            assert isinstance(t, float)
            raw = FakeModel()(x, t)
            x0 = solver.data_prediction(k, x, raw)
            x, state = solver.step(k, x, raw, state, reduce=LocalReduce())
            assert x.dtype == torch.float32 and x.shape == (2, 4, 8, 8)
        assert torch.isfinite(x).all()
        assert torch.equal(x, x0)  # the last step lands on σ = 0, where x is the last x̂0


def test_bfloat16_latents_accumulate_in_float32():
    solver = make_solver("dpmpp-2m", vp_schedule("eps"), 8)
    x, state = latent().bfloat16(), solver.init_state()
    for k in range(solver.num_evals):
        x, state = solver.step(k, x, FakeModel()(x.float(), solver.model_time(k)).bfloat16(), state)
    assert x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all()


class StripGroup:
    """In-process stand-in for a process group: one thread per strip, a barrier per collective.
    sum: adds the strips' tensors in rank order; cat: concatenates them in rank order."""

    def __init__(self, n):
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n)

    def rank(self, r):
        group = self

        class Reduce:
            def _exchange(self, t):
                group.slots[r] = t
                group.barrier.wait()
                values = list(group.slots)
                group.barrier.wait()
                return values

            def sum(self, t):
                values = self._exchange(t)
                out = values[0].clone()
                for v in values[1:]:
                    out += v
                return out

            def cat(self, t, dim):
                return torch.cat(self._exchange(t), dim)

        return Reduce()


def run_strips(fn, strips):
    group, results, errors = StripGroup(len(strips)), [None] * len(strips), []

    def work(r):
        try:
            results[r] = fn(strips[r], group.rank(r))
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(strips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


ROWS = (3, 5)  # an uneven split of 8 latent rows


def split_rows(x):
    return list(torch.split(x, ROWS, dim=2))


def test_dynamic_threshold_strips_are_exact():
    x0 = 2.5 * latent(seed=7)
    full = dynamic_threshold(x0, 0.9, 2.0)
    parts = run_strips(lambda strip, red: dynamic_threshold(strip, 0.9, 2.0, red), split_rows(x0))
    assert torch.equal(torch.cat(parts, 2), full)
    assert not torch.equal(full, x0.clamp(-1, 1))  # the threshold is active (s > 1)


def test_guidance_rescale_strips_match_unsplit():
    cond, uncond = latent(seed=8), latent(seed=9)
    guided = cfg(cond, uncond, 7.5)
    assert torch.equal(guided, uncond + 7.5 * (cond - uncond))
    full = rescale(guided, cond, 0.7)
    # the reference formula (diffusers' rescale_noise_cfg): torch.std over C, H, W
    std = lambda t: t.std(dim=[1, 2, 3], keepdim=True)
    reference = 0.7 * guided * (std(cond) / std(guided)) + 0.3 * guided
    assert rel(full, reference) <= 1e-6
    parts = run_strips(lambda s, red: rescale(s[0], s[1], 0.7, red),
                       list(zip(split_rows(guided), split_rows(cond))))
    # exact algorithm; float64 partial sums may differ from the unsplit sum in the last bits
    assert rel(torch.cat(parts, 2), full) <= 1e-12 or torch.equal(torch.cat(parts, 2), full)
    assert rescale(guided, cond, 0.0) is guided


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc-bh2", "deis-3m", "dpmpp-2s", "ghvb"])
def test_sharded_sampling_with_thresholding_equals_unsplit(name):
    """Each strip runs the whole loop on its rows; thresholding reduces through the strip group."""
    schedule = vp_schedule("x0")
    opts = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    model = FakeModel(scale=1.6)

    def sample(x, reduce):
        solver = make_solver(name, schedule, 8, **opts)
        state = solver.init_state()
        for k in range(solver.num_evals):
            x, state = solver.step(k, x, model(x, solver.model_time(k)), state, reduce=reduce)
        return x

    x = latent()
    full = sample(x, LocalReduce())
    parts = run_strips(sample, split_rows(x))
    assert torch.equal(torch.cat(parts, 2), full)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("dpm++", vp_schedule("eps"), 10)
    with pytest.raises(ValueError, match="spacing"):
        make_solver("ddim", vp_schedule("eps"), 10, spacing="uniform")
    with pytest.raises(ValueError, match="prediction"):
        make_schedule("flow", prediction="v")
    with pytest.raises(ValueError, match="flow schedule's prediction must be one of"):
        make_schedule("flow", prediction_type="epsilon")
    with pytest.raises(ValueError, match="give either shift= or diffusers' flow_shift="):
        make_schedule("flow", shift=2.0, flow_shift=3.0)
    with pytest.raises(ValueError, match="strength 0.05 is too small"):
        make_solver("dpmpp-2m", vp_schedule("eps"), 10, strength=0.05)


def test_diffusers_option_names_map_to_ours():
    vp_v = vp_schedule("v")
    pairs = [
        (make_solver("dpmpp-2m", vp_schedule("eps"), 9, solver_order=2, prediction_type="v_prediction",
                     timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_type="midpoint"),
         make_solver("dpmpp-2m", vp_v, 9, spacing="trailing")),
        (make_solver("unipc-bh1", vp_v, 9, solver_order=3, solver_type="bh1", use_karras_sigmas=True),
         make_solver("unipc-bh1", vp_v, 9, order=3, spacing="karras")),
        (make_solver("ghvb", vp_v, 9, solver_order=3), make_solver("ghvb", vp_v, 9, order=3)),
        (make_solver("deis-3m", make_schedule("flow", flow_shift=3.0, prediction_type="flow_prediction"), 9,
                     solver_order=3, algorithm_type="deis", prediction_type="sample"),
         make_solver("deis-3m", make_schedule("flow", shift=3.0, prediction="x0"), 9)),
    ]
    x = latent(torch.float64)
    for theirs, ours in pairs:
        assert theirs.schedule.prediction == ours.schedule.prediction
        assert torch.equal(theirs.sigmas, ours.sigmas) and torch.equal(theirs.timesteps, ours.timesteps)
        assert getattr(theirs, "order") == getattr(ours, "order")
        assert torch.equal(run_solver(theirs, FakeModel(), x), run_solver(ours, FakeModel(), x))
    assert vp_v.prediction == "v"  # prediction_type made a new schedule, the given one is unchanged


@pytest.mark.parametrize("name,opts,match", [
    ("dpmpp-2m", {"solver_order": 3}, "order 2; for diffusers' solver_order=3 use 'dpmpp-3m'"),
    ("deis-3m", {"solver_order": 2}, "use 'deis-2m'"),
    ("dpmpp-2s", {"solver_order": 3}, "no such variant"),
    ("dpmpp-2m", {"solver_type": "heun"}, "'ghvb' with order=2, beta=1.0"),
    ("unipc-bh2", {"solver_type": "bh1"}, "use 'unipc-bh1'"),
    ("deis-2m", {"solver_type": "logrho"}, "has no solver_type"),
    ("dpmpp-2m", {"algorithm_type": "sde-dpmsolver++"}, "not diffusers' algorithm_type='sde-dpmsolver\\+\\+'"),
    ("dpmpp-2m", {"prediction_type": "flow_prediction"}, "VP schedule's prediction must be one of"),
    ("dpmpp-2m", {"flow_shift": 3.0}, "flow_shift is a schedule option: give it to make_schedule"),
    ("dpmpp-2m", {"use_lu_lambdas": True}, "dpmpp-2m has no option 'use_lu_lambdas'"),
    ("dpmpp-2m", {"timestep_spacing": "trailing", "spacing": "leading"}, "disagree"),
    ("dpmpp-2m", {"use_karras_sigmas": True, "spacing": "trailing"}, "disagree"),
])
def test_diffusers_option_names_refused_clearly(name, opts, match):
    with pytest.raises(ValueError, match=match):
        make_solver(name, vp_schedule("eps"), 10, **opts)


def test_runtime_steps_are_model_evaluations():
    """--steps 3 with dpmpp-2s is 3 evaluations (one two-stage step, one first-order step): three
    timed steps, FLOPs of 3 evaluations; the warmup counts evaluations too, so with 2 warmup
    steps of 4 the last two evaluations run stale ('full' differs from 'sync'), with 4 none do."""
    from parafuse.models import load_model
    from parafuse.runtime import emulate
    from parafuse.runtime import ParallelConfig, Request, Runtime

    model = load_model("dit-small")
    timing = Runtime(model, ParallelConfig()).generate(Request(32, 32, 3, "dpmpp-2s", label=1)).timing
    assert len(timing["step_seconds"]) == 3 and timing["stages"][0]["steps"] == 3
    assert timing["flops"]["total"] == timing["flops"]["full_schedule"]
    req = Request(32, 32, 4, "dpmpp-2s", label=1)
    latents = {w: emulate(model, 2, ParallelConfig("full" if w is not None else "sync", warmup_steps=w or 0), req)[1]
               [0][0].latent for w in (None, 2, 4)}
    assert torch.equal(latents[4], latents[None])
    assert not torch.equal(latents[2], latents[None])
