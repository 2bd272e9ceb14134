"""Generalized heavy ball (GHVB, Wizadwongsa et al. 2023, arXiv 2307.11118, §4.2).

GHVB puts the momentum *inside* a multistep method: the velocity is an exponential moving
average of the slope, vel_n = (1 − β)·vel_{n−1} + β·f_n (vel_0 = f_0), and the step uses the
combination of the last q velocities that keeps the method of order q. β = 1 removes the
momentum; β < 1 damps the large high-order coefficients that cause divergence artifacts at few
steps.

The paper applies it to PLMS with uniform steps. Here it runs on the exponential-integrator
form of the data-prediction ODE that DPM-Solver++ integrates (h = λ_{n+1} − λ_n):
    x_{n+1} = (σ_{n+1}/σ_n)·x_n + σ_{n+1}·∫ e^λ·x̂0(λ) dλ  ≈  (σ_{n+1}/σ_n)·x_n + α_{n+1}(1 − e^{−h})·P_n,
    P_n = Σ_{j<q} c_j·vel_{n−j},   f = x̂0.
c solves the order conditions on the actual grid: P_n equals the e^λ-weighted mean of f over
[λ_n, λ_{n+1}] for every polynomial f in λ of degree < q, with vel of each monomial run as
scalars from the first evaluation of the run. Hence β = 1 gives DDIM (q = 1), DPM-Solver++(2M)
in diffusers' "heun" form (q = 2) and the exact-Taylor third-order multistep (q = 3); for small
uniform steps in steady state c tends to the paper's coefficients, e.g. q = 2:
((2 + β)·vel_n − (2 − β)·vel_{n−1})/(2β). Both are checked in the tests.
Order rules as DPM-Solver++ (warm-up, lower-order final). The step that lands on σ = 0 uses x̂0
itself (α·x̂0), not the lagged velocity; an evaluation at λ = −∞ (flow σ = 1) is a DDIM step and
is not part of the velocity (it carries no information as a function of λ).
"""
from __future__ import annotations

import math

import numpy as np

from .base import Solver, solve
from .stepper import combine

_GL_X, _GL_W = np.polynomial.legendre.leggauss(32)
_GL_X, _GL_W = (_GL_X + 1) / 2, _GL_W / 2  # on [0, 1]


def weighted_monomial_means(h: float, q: int) -> list[float]:
    """∫_0^1 w^d e^{hw} dw / ∫_0^1 e^{hw} dw for d < q (Gauss–Legendre, exact to rounding for
    the h of any usable grid; stable as h → 0 where the closed form cancels)."""
    weight = _GL_W * np.exp(h * (_GL_X - 1))
    return [float(np.sum(weight * _GL_X ** d) / np.sum(weight)) for d in range(q)]


class GHVB(Solver):
    name = "ghvb"

    def __init__(self, *args, order: int = 2, beta: float = 0.8, **kw):
        if order not in (1, 2, 3, 4):
            raise ValueError("GHVB order must be 1..4")
        if not 0 < beta <= 1:
            raise ValueError("beta must be in (0, 1]")
        super().__init__(*args, **kw)
        self.order, self.beta = order, beta

    def _update(self, i, k, x, x0, state):
        a, phi = self._ddim(i, i + 1)
        if not math.isfinite(self._lam[i]):
            return combine(a, x, [phi], [x0]), state
        vels = state.get("vels", [])  # previous velocities, newest first
        vel = x0 if not vels else combine(1 - self.beta, vels[0], [self.beta], [x0])
        state["vels"] = [vel] + vels[: self.order - 1]
        if self._sig[i + 1] == 0.0:
            return combine(a, x, [phi], [x0]), state
        q = self._multistep_order(i, k, len(vels))
        c = self.ghvb_coeffs(i, q)
        return combine(a, x, [phi * cj for cj in c], state["vels"][:q]), state

    def ghvb_coeffs(self, i: int, q: int) -> list[float]:
        """c_0..c_{q−1} for vel at grid indices i, i−1, …: exact for f = w^d, d < q, where
        w = (λ − λ_i)/h."""
        if q == 1:
            return [1.0]  # the EMA of a constant is that constant
        h = self._h(i, i + 1)
        first = next(j for j in range(self.start_index, i + 1) if math.isfinite(self._lam[j]))
        w = [(self._lam[j] - self._lam[i]) / h for j in range(first, i + 1)]
        moments = []  # moments[d][m]: vel of w^d at grid index i − m
        for d in range(q):
            v, vd = None, []
            for wj in w:
                v = wj ** d if v is None else (1 - self.beta) * v + self.beta * wj ** d
                vd.append(v)
            moments.append(vd[::-1][:q])
        return list(solve(moments, weighted_monomial_means(h, q)))
