"""DDIM / DPM-Solver++ family in data prediction (Lu et al. 2022, arXiv 2211.01095).

Notation: step s → t, h = λ_t − λ_s, m0 = x̂0 at s, m1, m2 earlier x̂0, r0 = h_{prev}/h.
First-order part of every update: x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·(…), see ``Solver._ddim``.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Solver
from .stepper import combine


class DDIM(Solver):
    """DDIM = DPM-Solver++(1); on a flow schedule this is exactly flow Euler x_t = x_s + (σ_t − σ_s)·v,
    diffusers' FlowMatchEulerDiscreteScheduler, whose σ table it takes there."""

    name, order, flow_table = "ddim", 1, "euler"

    def _update(self, i, k, x, x0, state):
        a, phi = self._ddim(i, i + 1)
        return combine(a, x, [phi], [x0]), state


class Euler(DDIM):
    name = "euler"


class DPMSolverPP(Solver):
    """DPM-Solver++(2M) (paper Alg. 2, diffusers' "midpoint" form) and the third-order multistep (3M).

    2M: x_t = (σ_t/σ_s)x_s + φ·(D0 + ½·D1),  φ = α_t(1 − e^{−h}), D0 = m0, D1 = (m0 − m1)/r0.
    3M: x_t = (σ_t/σ_s)x_s + φ·D0 + ψ1·D1 − ψ2·D2 with ψ1 = α_t((e^{−h} − 1)/h + 1),
        ψ2 = α_t((e^{−h} − 1 + h)/h² − ½), D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1,
        D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = κ·(D1_0 − D1_1)/(r0 + r1).

    κ = 1 (``variant="diffusers"``, default) is diffusers' formula (the same D2 appears in other
    public DPM-Solver++(3M) implementations, e.g. k-diffusion-style dpmpp_3m_sde). The Taylor expansion of the exponential integral needs
    D2 ≈ h²·x̂0''(λ), but (D1_0 − D1_1)/(r0 + r1) = h²·x̂0''/2 + O(h³): the quadratic term gets
    half its weight, so the step is exact only up to linear x̂0 and the method is second order
    globally (measured in tests/unit/test_solvers.py). ``variant="taylor"`` uses κ = 2 and is third
    order.
    """

    name, order = "dpmpp-2m", 2

    def __init__(self, *args, variant: str = "diffusers", **kw):
        if variant not in ("diffusers", "taylor"):
            raise ValueError("variant must be 'diffusers' or 'taylor'")
        super().__init__(*args, **kw)
        self.d2_factor = 1.0 if variant == "diffusers" else 2.0

    def _update(self, i, k, x, x0, state):
        hist = state.get("x0s", [])
        p = self._multistep_order(i, k, len(hist))
        ms = [x0] + hist[: p - 1]
        a, coeffs = self.dpmpp_coeffs(i, p)
        state["x0s"] = [x0] + hist[: self.order - 2]  # the order − 1 most recent x̂0
        return combine(a, x, coeffs, ms), state

    def dpmpp_coeffs(self, i: int, p: int):
        """(a, [b_m0, b_m1, b_m2][:p]) of the order-p update from grid index i to i + 1."""
        a, phi = self._ddim(i, i + 1)
        if p == 1:
            return a, [phi]
        h = self._h(i, i + 1)
        e0, e1, e2 = np.eye(3)  # coefficient vectors of m0, m1, m2
        r0 = self._h(i - 1, i) / h
        D1_0 = (e0 - e1) / r0
        if p == 2:
            return a, list(phi * (e0 + 0.5 * D1_0))[:2]
        r1 = self._h(i - 2, i - 1) / h
        D1_1 = (e1 - e2) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = self.d2_factor * (D1_0 - D1_1) / (r0 + r1)
        em1 = math.expm1(-h)  # e^{−h} − 1
        alpha_t = self._alp[i + 1]
        psi1 = alpha_t * (em1 / h + 1.0)
        psi2 = alpha_t * ((em1 + h) / h ** 2 - 0.5)
        return a, list(phi * e0 + psi1 * D1 - psi2 * D2)


class DPMSolverPP3M(DPMSolverPP):
    name, order = "dpmpp-3m", 3


class DPMSolverPP2S(Solver):
    """Singlestep DPM-Solver++(2S) (paper Alg. 1) on the grid's own intermediate points.

    A two-stage step s → t spends two of the grid's evaluations: at s (a first-order move to the
    grid point u between s and t) and at u; then from the *saved* x_s:
        x_t = (σ_t/σ_s)x_s + φ·(D0 + ½·D1),  D0 = x̂0(s), D1 = (x̂0(u) − x̂0(s))/r,  r = (λ_u − λ_s)/h.
    u is where the grid puts it, not the λ-midpoint in general (any r gives order 2).
    Like every solver here (and diffusers), N steps are N evaluations: ⌊N/2⌋ two-stage steps,
    and an odd N ends with a first-order step. The per-evaluation order list is diffusers'
    DPMSolverSinglestepScheduler.get_order_list for solver_order=2, including the overrides in
    its set_timesteps: an odd N or a final σ of 0 switch lower_order_final on, with which an even
    N ends with two first-order steps; landing on σ = 0 is always first order.
    """

    name, order = "dpmpp-2s", 2

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        n = self.n_grid
        orders = [1, 2] * (n // 2) + [1] * (n % 2)
        if (self.lower_order_final or self._sig[n] == 0.0) and n % 2 == 0:
            orders[-1] = 1
        self.order_list = orders

    def _update(self, i, k, x, x0, state):
        p = self.order_list[i]
        if p == 2 and (k == 0 or self._finite_depth(i, 2) < 2):
            # a run starting at u (img2img) has no x̂0(s), as in diffusers; a block starting at
            # λ = −∞ (flow σ = 1) or a zero-length move: a plain step from here
            p = 1
        if p == 1:  # starts a block (diffusers: every first-order step saves its sample)
            state["x_block"], state["x0_block"] = x, x0
            a, phi = self._ddim(i, i + 1)
            return combine(a, x, [phi], [x0]), state
        s, t = i - 1, i + 1
        a, phi = self._ddim(s, t)
        r = self._h(s, i) / self._h(s, t)
        # φ·(D0 + ½D1) = φ(1 − 1/(2r))·x̂0(s) + φ/(2r)·x̂0(u)
        return combine(a, state["x_block"], [phi * (1 - 0.5 / r), phi * 0.5 / r], [state["x0_block"], x0]), state


class DPMSolverPPHeavyBall(DPMSolverPP):
    """DPM-Solver++(2M) with Polyak heavy-ball momentum (Wizadwongsa et al. 2023, arXiv 2307.11118):
        vel = (1 − β)·vel + β·(D0 + ½·D1),   x_t = (σ_t/σ_s)x_s + φ·vel.
    vel starts at the first second-order step's D0 + ½D1; first-order steps (warm-up, lower-order
    final) are plain DDIM and leave vel alone. β = 1 is DPM-Solver++(2M). For β < 1, vel lags the
    true slope by O(h), so the method is first order — the price of damping divergence artifacts.
    """

    name, order = "dpmpp-2m-hb", 2

    def __init__(self, *args, beta: float = 0.8, **kw):
        if not 0 < beta <= 1:
            raise ValueError("beta must be in (0, 1]")
        super().__init__(*args, **kw)
        self.beta = beta

    def _update(self, i, k, x, x0, state):
        hist = state.get("x0s", [])
        p = self._multistep_order(i, k, len(hist))
        state["x0s"] = [x0]
        if p == 1:
            a, phi = self._ddim(i, i + 1)
            return combine(a, x, [phi], [x0]), state
        a, coeffs = self.dpmpp_coeffs(i, 2)
        _, phi = self._ddim(i, i + 1)
        c0, c1 = coeffs[0] / phi, coeffs[1] / phi  # D0 + ½D1 = c0·m0 + c1·m1
        vel = state.get("vel")
        if vel is None:
            vel = combine(c0, x0, [c1], [hist[0]])
        else:
            vel = combine(1 - self.beta, vel, [self.beta * c0, self.beta * c1], [x0, hist[0]])
        state["vel"] = vel
        return combine(a, x, [phi], [vel]), state
