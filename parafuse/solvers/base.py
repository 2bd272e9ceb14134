"""Solver base: the σ grid, model time, x̂0 from the raw model output, step-order rules.

A solver is an explicit stepper. ``step(k, x, raw, state)`` turns the raw model output at
evaluation k into x̂0 (the data prediction), then updates x with ``combine`` from x̂0 and an
explicit ``state``: a dict whose tensors all have x's shape (so they are sharded exactly like x)
plus a few python numbers (identical on every rank).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .stepper import LOCAL, combine
from .threshold import dynamic_threshold


class Solver:
    name = "base"
    order = 1            # nominal order of accuracy of the update (without lower-order steps)
    flow_table = "dpmsolver"  # on flow schedules, the σ table of the diffusers scheduler of this solver
    init_noise_sigma = 1.0

    def __init__(self, schedule, num_steps: int | None = None, spacing: str | None = None,
                 final_sigmas_type: str = "zero", sigmas=None, timesteps=None, lower_order_final: bool = True,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, start_index: int = 0, strength: float | None = None,
                 round_timesteps: bool = True, flow_table: str | None = None):
        """A step is one model evaluation, for every solver (diffusers' num_inference_steps):
        ``num_steps`` evaluations on a grid of ``num_steps`` intervals.
        ``sigmas``: a custom grid (our convention, incl. the final σ; length num_steps + 1),
        overriding ``num_steps``/``spacing``/``final_sigmas_type``; ``timesteps``: the model times
        for it (default: the schedule's time of each σ, unrounded).
        ``flow_table`` (flow schedules only): another diffusers scheduler's σ table than this
        solver's own (schedules.FLOW_TABLES).
        ``start_index`` / ``strength`` (img2img, diffusers' rule start = N − int(N·strength)):
        begin at that grid index; the caller starts from x = α₀·x0 + σ₀·ε (``solver.add_noise``).
        ``num_steps``/``num_evals``/``sigmas``/``timesteps`` then describe what this run does; the
        order rules still see the full grid, like diffusers."""
        self.schedule = schedule
        if flow_table is not None and schedule.kind != "flow":
            raise ValueError(f"flow_table applies to flow schedules; this one is {schedule.kind!r}")
        if sigmas is not None:
            sig = np.asarray(torch.as_tensor(sigmas, dtype=torch.float64).cpu(), dtype=np.float64)
            if (sig < 0).any() or (sig > 1).any() or (np.diff(sig) > 0).any():
                raise ValueError("custom sigmas must be non-increasing in [0, 1]")
            alp = schedule.alpha(sig)
            ts = schedule.t_from_sigma(sig[:-1]) if timesteps is None else np.asarray(timesteps, dtype=np.float64)
        else:
            if num_steps is None or num_steps < 1:
                raise ValueError("num_steps must be >= 1 (or pass sigmas=)")
            g = schedule.grid(num_steps, spacing, final_sigmas_type, round_timesteps,
                              flow_table=flow_table or self.flow_table)
            sig, alp, ts = g.sigmas, g.alphas, g.timesteps
        if sigmas is not None and num_steps is not None and num_steps != len(sig) - 1:
            raise ValueError(f"num_steps={num_steps} does not fit {len(sig) - 1} custom grid intervals")
        if len(ts) != len(sig) - 1:
            raise ValueError("need one timestep per evaluation (len(sigmas) - 1)")
        n_grid = len(sig) - 1
        if strength is not None:
            start_index = n_grid - min(int(n_grid * strength), n_grid)
        if not 0 <= start_index < n_grid:
            raise ValueError(f"start_index {start_index} leaves no step of {n_grid}"
                             + (f" (strength {strength} is too small)" if strength is not None else ""))

        # Full grid as python floats: every coefficient is computed in float64 on the host.
        self._sig = [float(v) for v in sig]
        self._alp = [float(v) for v in alp]
        with np.errstate(divide="ignore"):
            self._lam = [float(v) for v in np.log(alp) - np.log(sig)]  # ±inf at σ = 1 (flow) / σ = 0
        self._ts = [float(v) for v in ts]
        self.n_grid = n_grid
        self.start_index = start_index
        self.lower_order_final = lower_order_final
        self.thresholding = thresholding
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value

        self.num_evals = n_grid - start_index
        self.num_steps = self.num_evals  # a step is one model evaluation
        self.sigmas = torch.tensor(sig[start_index:], dtype=torch.float64)
        self.alphas = torch.tensor(alp[start_index:], dtype=torch.float64)
        self.lambdas = torch.tensor(self._lam[start_index:], dtype=torch.float64)
        self.timesteps = torch.tensor(ts[start_index:], dtype=torch.float64)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, steps={self.num_steps}, {self.schedule})"

    # -- what the sampling loop asks ---------------------------------------------------------
    def model_time(self, k: int) -> float:
        return self._ts[self.start_index + k]

    def sigma(self, k: int) -> float:
        """σ at evaluation k (k = num_evals: the final σ)."""
        return self._sig[self.start_index + k]

    def alpha(self, k: int) -> float:
        """α at evaluation k (x = α·x0 + σ·ε)."""
        return self._alp[self.start_index + k]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, k: int = 0) -> torch.Tensor:
        """x = α_k·x0 + σ_k·ε: the starting point for img2img / a new stage at evaluation k."""
        i = self.start_index + k
        return combine(self._alp[i], x0, [self._sig[i]], [noise])

    def init_state(self) -> dict:
        return {}

    def data_prediction(self, k: int, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """x̂0 from the raw model output at evaluation k (elementwise), in at least float32."""
        i = self.start_index + k
        a, s = self._alp[i], self._sig[i]
        acc = torch.promote_types(x.dtype, torch.float32)
        x, raw = x.to(acc), raw.to(acc)
        p = self.schedule.prediction
        if p == "x0":
            return raw
        if p == "eps":    # x = αx0 + σε
            return combine(1 / a, x, [-s / a], [raw])
        if p == "v":      # VP v = αε − σx0  ⇒  x0 = αx − σv
            return combine(a, x, [-s], [raw])
        if p == "flow":   # v = ε − x0, x = (1−σ)x0 + σε  ⇒  x0 = x − σv
            return combine(1.0, x, [-s], [raw])
        raise ValueError(f"unknown prediction {p!r}")

    def step(self, k: int, x: torch.Tensor, raw: torch.Tensor, state: dict, reduce=LOCAL):
        """One model evaluation's update: returns (x at evaluation k+1, new state)."""
        x0 = self.data_prediction(k, x, raw)
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value, reduce)
        # history tensors derived from x (DEIS's ε, UniPC's corrected x) stay in x0's precision
        x_next, state = self._update(self.start_index + k, k, x.to(x0.dtype), x0, dict(state))
        return x_next.to(x.dtype), state

    def _update(self, i: int, k: int, x, x0, state):
        """Grid index i (= start_index + k), k-th evaluation of this run."""
        raise NotImplementedError

    # -- shared pieces -------------------------------------------------------------------------
    def _ddim(self, s: int, t: int):
        """First-order step s → t in data prediction (DDIM = DPM-Solver++(1), flow Euler):
        x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂0, with α_t(1 − e^{−h}) = α_t − α_s·σ_t/σ_s
        written without λ so that σ_s = 1 (α_s = 0) and σ_t = 0 are exact."""
        a = self._sig[t] / self._sig[s]
        return a, self._alp[t] - self._alp[s] * a

    def _h(self, s: int, t: int) -> float:
        return self._lam[t] - self._lam[s]

    def _multistep_order(self, i: int, k: int, n_hist: int) -> int:
        """Order of the multistep update at grid index i (diffusers' DPMSolverMultistep rules).

        * warm-up: at most 1 + (number of earlier x̂0 of this run);
        * the last step is first order if lower_order_final and fewer than 15 steps, or if it
          lands on σ = 0 (λ = ∞: higher-order terms are undefined there); the second-to-last
          step is at most second order if lower_order_final and fewer than 15 steps;
        * a zero-length step (repeated σ) is first order, i.e. x does not move;
        * history points at λ = −∞ (flow σ = 1) carry no information in λ and are dropped —
          the IEEE limit of the higher-order formulas there is exactly the lower-order one.
        """
        p = min(self.order, n_hist + 1)
        n, short = self.n_grid, self.lower_order_final and self.n_grid < 15
        if i == n - 1 and (short or self._sig[n] == 0.0):
            p = 1
        if i == n - 2 and short:
            p = min(p, 2)
        return min(p, self._finite_depth(i, p))

    def _finite_depth(self, i: int, p: int) -> int:
        """Largest q ≤ p such that λ is finite at i, i−1, …, i−q+1 and the step i → i+1 moves."""
        if self._sig[i + 1] == self._sig[i] or not math.isfinite(self._lam[i]):
            return 1
        q = 1
        while q < p and math.isfinite(self._lam[i - q]):
            q += 1
        return q


def solve(matrix, rhs) -> np.ndarray:
    return np.linalg.solve(np.asarray(matrix, dtype=np.float64), np.asarray(rhs, dtype=np.float64))
