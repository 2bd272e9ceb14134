"""DEIS, the log-ρ multistep variant (Zhang & Chen 2023, arXiv 2204.13902; diffusers' DEISMultistepScheduler).

With ρ = σ/α the probability-flow ODE is d(x/α) = ε dρ. DEIS integrates it exactly after
replacing ε by its Lagrange interpolant in log ρ through the last p evaluations:
    x_t = α_t·(x_s/α_s + Σ_j c_j·ε_j),   c_j = ∫_{ρ_s}^{ρ_t} ℓ_j(log ρ) dρ.
The ε_j are kept as history (ε at s is (x_s − α_s·x̂0)/σ_s). First-order DEIS is DDIM.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.polynomial import Polynomial

from .base import Solver
from .stepper import combine


def exp_poly_integral(poly: Polynomial, w0: float, w1: float) -> float:
    """∫_{w0}^{w1} poly(w)·e^w dw = [e^w·Σ_m (−1)^m poly^{(m)}(w)] (repeated integration by parts)."""
    def antiderivative(w):
        if w == -math.inf:
            return 0.0  # e^w·poly(w) → 0
        return math.exp(w) * sum((-1) ** m * poly.deriv(m)(w) for m in range(poly.degree() + 1))
    return antiderivative(w1) - antiderivative(w0)


class DEIS(Solver):
    name, order = "deis-2m", 2

    def _update(self, i, k, x, x0, state):
        hist = state.get("eps", [])
        p = self._multistep_order(i, k, len(hist))
        alpha_s, sigma_s = self._alp[i], self._sig[i]
        eps = combine(1 / sigma_s, x, [-alpha_s / sigma_s], [x0])
        state["eps"] = [eps] + hist[: self.order - 2]  # the order − 1 most recent ε
        if p == 1:
            a, phi = self._ddim(i, i + 1)
            return combine(a, x, [phi], [x0]), state
        alpha_t = self._alp[i + 1]
        c = self.logrho_coeffs(i, p)
        return combine(alpha_t / alpha_s, x, [alpha_t * cj for cj in c], [eps] + hist[: p - 1]), state

    def logrho_coeffs(self, i: int, p: int) -> list[float]:
        """c_j for nodes at grid indices i, i−1, …, i−p+1, step i → i+1.

        Substituting ρ = ρ_s·e^w (w = log ρ − log ρ_s, so the nodes sit at w_j = λ_i − λ_{i−j}):
        c_j = ρ_s·∫_0^{w_t} ℓ_j(w)·e^w dw with w_t = −h (−∞ when landing on σ = 0)."""
        lam = self._lam
        nodes = [lam[i] - lam[i - j] for j in range(p)]
        rho_s = self._sig[i] / self._alp[i]
        w_t = lam[i] - lam[i + 1]
        coeffs = []
        for j, wj in enumerate(nodes):
            others = [w for m, w in enumerate(nodes) if m != j]
            basis = Polynomial.fromroots(others) / float(np.prod([wj - w for w in others]))
            coeffs.append(rho_s * exp_poly_integral(basis, 0.0, w_t))
        return coeffs


class DEIS3M(DEIS):
    name, order = "deis-3m", 3
