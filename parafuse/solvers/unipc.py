"""UniPC (Zhao et al. 2023, arXiv 2302.04867), data prediction, B(h) = h ("bh1") or e^h − 1 ("bh2").

Predictor UniP-p from s to t (h = λ_t − λ_s, hh = −h, r_j = (λ_{s−j} − λ_s)/h, D_j = (m_j − m0)/r_j):
    x_t = (σ_t/σ_s)x_s + α_t(1 − e^{−h})·m0 − α_t·B(h)·Σ_j ρ_j·D_j
with ρ = ½ for p = 2, else the solution of R ρ = g over the p − 1 history points, where
R[n][j] = r_j^n and g_n = n!·hh·φ_{n+1}(hh)/B(h) (φ_k the exponential-integrator φ functions).
Corrector UniC-p, applied when the next evaluation arrives (no extra model call): the same
formula from the *corrected* x_s with the fresh x̂0 at t as one more point (r = 1), ρ = ½ for
p = 1, else the full p×p system; the predictor then continues from the corrected x_t.
UniP-p + UniC-p has order p + 1. Order rules as diffusers' UniPCMultistepScheduler: warm-up,
and with lower_order_final the order is min(p, steps left), so the final step is first order.
"""
from __future__ import annotations

import math

from .base import Solver, solve
from .stepper import combine


class UniPC(Solver):
    name, variant, flow_table = "unipc-bh2", "bh2", "unipc"

    def __init__(self, *args, order: int = 2, disable_corrector=(), **kw):
        if order not in (1, 2, 3):
            raise ValueError("UniPC order must be 1, 2 or 3")
        super().__init__(*args, **kw)
        self.order = order  # predictor order p; with the corrector the method has order p + 1
        self.disable_corrector = set(disable_corrector)

    def _order(self, i, k):
        p = min(self.order, self.n_grid - i) if self.lower_order_final else self.order
        p = min(p, k + 1)
        if i == self.n_grid - 1 and self._sig[-1] == 0.0:
            p = 1  # landing on σ = 0: B(h) and the r_j degenerate
        return min(p, self._finite_depth(i, p))

    def _update(self, i, k, x, x0, state):
        hist = state.get("x0s", [])
        if k > 0 and (i - 1) not in self.disable_corrector:
            x_corr = self._correct(i, state["x_last"], x0, hist, state["p_last"])
            if x_corr is not None:
                x = x_corr
        p = self._order(i, k)
        a, coeffs = self._predict_coeffs(i, p)
        x_next = combine(a, x, coeffs, [x0] + hist[: p - 1])
        state.update(x0s=[x0] + hist[: self.order - 1], x_last=x, p_last=p)
        return x_next, state

    def _bh(self, h: float, p: int):
        """B(h) and g_1..g_p (the right-hand side of the order conditions)."""
        hh = -h
        B = hh if self.variant == "bh1" else math.expm1(hh)
        h_phi = math.expm1(hh) / hh - 1.0  # hh·φ_2(hh)
        g, fact = [], 1.0
        for n in range(1, p + 1):
            g.append(h_phi * fact / B)
            fact *= n + 1
            h_phi = h_phi / hh - 1.0 / fact  # hh·φ_{n+2}(hh)
        return B, g

    def _rks(self, s: int, h: float, p: int):
        return [(self._lam[s - j] - self._lam[s]) / h for j in range(1, p)]

    def _predict_coeffs(self, i: int, p: int):
        """(a, [b_m0, b_m1, …]) of UniP-p from grid index i to i + 1."""
        a, phi = self._ddim(i, i + 1)
        if p == 1:
            return a, [phi]
        h = self._h(i, i + 1)
        rks = self._rks(i, h, p)
        B, g = self._bh(h, p)
        if p == 2:
            rhos = [0.5]
        else:
            rhos = solve([[r ** n for r in rks] for n in range(p - 1)], g[: p - 1])
        scale = self._alp[i + 1] * B
        coeffs = [phi + scale * sum(rho / r for rho, r in zip(rhos, rks))]  # −α_t·B·Σρ_j(m_j − m0)/r_j
        coeffs += [-scale * rho / r for rho, r in zip(rhos, rks)]
        return a, coeffs

    def _correct(self, t: int, x_s, x0_t, hist, p: int):
        """UniC-p for the step t−1 → t, from x_s (the corrected x at t−1) with the new x̂0 at t."""
        s = t - 1
        h = self._h(s, t)
        if h == 0:
            return None
        B, g = self._bh(h, p)
        if not math.isfinite(B):
            return None  # bh1 from λ = −∞ (flow σ = 1): B(h) = h is infinite, no correction
        rks = self._rks(s, h, p) + [1.0]
        rhos = [0.5] if p == 1 else solve([[r ** n for r in rks] for n in range(p)], g)
        a, phi = self._ddim(s, t)
        scale = self._alp[t] * B
        # x_t = (σ_t/σ_s)x_s + φ·m0 − α_t·B·(Σ_j ρ_j (m_j − m0)/r_j + ρ_last·(x̂0_t − m0))
        coeffs = [phi + scale * (sum(rho / r for rho, r in zip(rhos[:-1], rks[:-1])) + rhos[-1])]
        coeffs += [-scale * rho / r for rho, r in zip(rhos[:-1], rks[:-1])]
        coeffs += [-scale * rhos[-1]]
        return combine(a, x_s, coeffs, hist[:p] + [x0_t])


class UniPCBh1(UniPC):
    name, variant = "unipc-bh1", "bh1"
