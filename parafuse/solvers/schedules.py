"""Noise schedules: where the steps land (α, σ) and which timestep the model is told.

One convention everywhere: x_t = α_t·x0 + σ_t·ε and λ_t = log(α_t/σ_t).
  VP (DDPM):      α = sqrt(ᾱ), σ = sqrt(1 − ᾱ)            (α² + σ² = 1)
  Flow (RF):      α = 1 − σ                                 (x_σ = (1−σ)·x0 + σ·ε)
A grid is a float64 array of σ for every model evaluation plus the final σ, with the matching α
and the model timesteps: VP → DDPM timestep in [0, T) (float allowed); flow → σ·T.

Spacing names mean what diffusers' `timestep_spacing` means (checked in tests/unit/test_solvers.py):
  VP   linspace / leading / trailing  DPMSolverMultistep/DEIS/UniPC `timestep_spacing` (one table
                                      per name, the same in each; DPMSolverSinglestep: linspace only)
       karras                         `use_karras_sigmas` (ρ = 7; timesteps rounded like diffusers)
  flow linspace                       diffusers' flow schedulers ignore `timestep_spacing` (configured
                                      as "linspace"); each has its own σ table, and the solver says
                                      which (``flow_table``), so the same name reproduces diffusers:
         "euler"      FlowMatchEulerDiscreteScheduler (SD3/Flux): n points from σ = 1 to its σ_min
         "dpmsolver"  DPMSolverMultistep/Singlestep/DEIS(use_flow_sigmas): from shift(1 − 1/T)
         "unipc"      UniPCMultistepScheduler(use_flow_sigmas): from σ = 1 (nudged to 1 − 1e-6)
       karras                         FlowMatchEulerDiscreteScheduler(use_karras_sigmas), any solver
       leading / trailing             refused: diffusers ignores them on flow schedules
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("linspace", "leading", "trailing", "karras")
FINAL_SIGMAS = ("zero", "sigma_min")
FLOW_TABLES = ("euler", "dpmsolver", "unipc")
# diffusers' prediction_type names → ours
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
KARRAS_RHO = 7.0


@dataclass
class Grid:
    sigmas: np.ndarray     # [n+1] float64, incl. the final σ
    alphas: np.ndarray     # [n+1]
    timesteps: np.ndarray  # [n] model timestep of each evaluation


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. 2022 eq. 5: uniform in σ^(1/ρ) from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _check(spacing, final):
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if final not in FINAL_SIGMAS:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS}, got {final!r}")


def prediction_name(prediction: str, allowed: tuple[str, ...], kind: str) -> str:
    """Our name of a prediction given by ours or by diffusers' ``prediction_type``; refused when the
    schedule cannot use it."""
    ours = DIFFUSERS_PREDICTIONS.get(prediction, prediction)
    if ours not in allowed:
        theirs = [k for k, v in DIFFUSERS_PREDICTIONS.items() if v in allowed]
        raise ValueError(f"a {'VP' if kind == 'vp' else kind} schedule's prediction must be one of {allowed} (diffusers' prediction_type "
                         f"{tuple(theirs)}), got {prediction!r}")
    return ours


def with_prediction(schedule, prediction: str):
    """``schedule`` for a model that predicts ``prediction`` (ours or diffusers' name) instead."""
    ours = prediction_name(prediction, schedule.predictions, schedule.kind)
    if ours == schedule.prediction:
        return schedule
    other = copy.copy(schedule)
    other.prediction = ours
    return other


class VPSchedule:
    """DDPM discrete schedule (betas → ᾱ_t for t = 0..T−1)."""

    kind = "vp"
    predictions = ("eps", "v", "x0")
    default_spacing = "linspace"

    def __init__(self, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 num_train_timesteps=1000, prediction="eps", steps_offset=0):
        prediction = prediction_name(prediction, self.predictions, self.kind)
        T = num_train_timesteps
        # float32 on purpose: these are the exact ᾱ values the models were trained with.
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(β)
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.beta_schedule, self.prediction = beta_schedule, prediction
        self.num_train_timesteps, self.steps_offset = T, steps_offset
        self.alphas_cumprod = abar.double().numpy()
        # "VE" σ/α per training timestep; increasing in t. Interpolation tables live in this variable.
        self.ve_sigmas = (((1 - abar) / abar) ** 0.5).double().numpy()
        self.log_ve_sigmas = np.log(self.ve_sigmas)

    def __repr__(self):
        return f"VPSchedule({self.beta_schedule!r}, T={self.num_train_timesteps}, prediction={self.prediction!r})"

    # -- conversions ---------------------------------------------------------------------------
    @staticmethod
    def alpha(sigma):
        return np.sqrt(1.0 - np.asarray(sigma, dtype=np.float64) ** 2)

    @staticmethod
    def _from_ve(ve):
        ve = np.asarray(ve, dtype=np.float64)
        alpha = 1.0 / np.sqrt(1.0 + ve ** 2)
        return ve * alpha, alpha

    def t_from_ve(self, ve) -> np.ndarray:
        """Continuous timestep of a VE σ: piecewise linear in log σ between the two neighbouring
        training timesteps, clipped to [0, T−1] (diffusers' `_sigma_to_t`)."""
        log_s = np.log(np.maximum(np.atleast_1d(np.asarray(ve, dtype=np.float64)), 1e-10))
        table = self.log_ve_sigmas
        lo = np.clip(np.searchsorted(table, log_s, side="right") - 1, 0, len(table) - 2)
        w = np.clip((table[lo] - log_s) / (table[lo] - table[lo + 1]), 0, 1)
        return (1 - w) * lo + w * (lo + 1)

    def t_from_sigma(self, sigma) -> np.ndarray:
        sigma = np.asarray(sigma, dtype=np.float64)
        return self.t_from_ve(sigma / self.alpha(sigma))

    def ve_from_t(self, t) -> np.ndarray:
        return np.interp(t, np.arange(self.num_train_timesteps), self.ve_sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self._from_ve(self.ve_sigmas[0])[0])

    # -- grids ---------------------------------------------------------------------------------
    def grid(self, n: int, spacing: str | None = None, final: str = "zero", round_timesteps: bool = True,
             flow_table: str | None = None) -> Grid:
        """``flow_table`` is for flow schedules; diffusers' VP schedulers share one table per spacing."""
        spacing = spacing or self.default_spacing
        _check(spacing, final)
        T = self.num_train_timesteps
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + self.steps_offset
        elif spacing == "trailing":
            ts = np.arange(T, 0, -T / n).round().astype(np.int64) - 1
        if spacing == "karras":
            ve = karras(self.ve_sigmas[0], self.ve_sigmas[-1], n)
            ts = self.t_from_ve(ve)
            if round_timesteps:  # diffusers feeds integer timesteps; the solver keeps the exact σ
                ts = ts.round()
        else:
            ve = self.ve_from_t(ts)
        ve_final = 0.0 if final == "zero" else self.ve_sigmas[0]
        sigmas, alphas = self._from_ve(np.append(ve, ve_final))
        return Grid(sigmas, alphas, np.asarray(ts, dtype=np.float64))


# Flux's fitted range for dynamic shifting (FluxPipeline.calculate_shift defaults).
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15
MAX_MU = math.log(16.0)


def dynamic_shift(image_seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
                  base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT, max_mu: float = MAX_MU) -> float:
    """Resolution-dependent shift s = exp(mu) for an image of ``image_seq_len`` tokens.

    Inside [base_seq_len, max_seq_len] this is Flux's rule: mu linear in the token count
    (0.5 at 256 tokens, 1.15 at 4096 = 1024² Flux), identical to diffusers.
    Outside it we do not extrapolate the line: at 4K (65,536 tokens) it gives mu ≈ 11.6,
    s ≈ 10⁵ and every shifted σ ≈ 1; at 8K, s ≈ 10¹⁹. Instead:
      * above max_seq_len, mu grows like ½·log(tokens) — the SD3 paper's resolution argument
        (shift ∝ sqrt(pixel count), Esser et al. 2024 §5.3.2), continuous at max_seq_len:
        2048² → s ≈ 6.3, 4K → s ≈ 12.6;
      * mu is clamped to [0, max_mu] (default log 16: s ≤ 16, reached at ≈ 6K; 8K → 16);
        s ≥ 1 so tiny images are never shifted towards low noise.
    """
    if image_seq_len <= max_seq_len:
        m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
        mu = base_shift + m * (image_seq_len - base_seq_len)
    else:
        mu = max_shift + 0.5 * math.log(image_seq_len / max_seq_len)
    return math.exp(min(max(mu, 0.0), max_mu))


class FlowSchedule:
    """Rectified flow: x_σ = (1−σ)·x0 + σ·ε; the model predicts the velocity v = ε − x0."""

    kind = "flow"
    predictions = ("flow", "x0")
    default_spacing = "linspace"

    def __init__(self, shift: float = 1.0, prediction: str = "flow", num_train_timesteps: int = 1000,
                 dynamic: bool = False):
        """``dynamic``: the shift came from the resolution (``from_seq_len``). It only changes where
        the ``linspace`` grid ends, exactly as FlowMatchEulerDiscreteScheduler does: with a static
        shift diffusers shifts σ_min = 1/T once when the scheduler is built and again with the
        whole grid; with dynamic shifting only once."""
        prediction = prediction_name(prediction, self.predictions, self.kind)
        if shift <= 0:
            raise ValueError("shift must be > 0")
        self.shift, self.prediction = float(shift), prediction
        self.num_train_timesteps, self.dynamic = num_train_timesteps, dynamic

    @classmethod
    def from_seq_len(cls, image_seq_len: int, prediction: str = "flow", **shift_kw) -> "FlowSchedule":
        return cls(dynamic_shift(image_seq_len, **shift_kw), prediction=prediction, dynamic=True)

    def __repr__(self):
        return f"FlowSchedule(shift={self.shift:g}, prediction={self.prediction!r})"

    def shifted(self, u):
        """σ' = sσ/(1 + (s−1)σ), i.e. λ' = λ − log s (same SNR curve, moved to more noise)."""
        u = np.asarray(u, dtype=np.float64)
        return self.shift * u / (1 + (self.shift - 1) * u)

    @staticmethod
    def alpha(sigma):
        return 1.0 - np.asarray(sigma, dtype=np.float64)

    def t_from_sigma(self, sigma) -> np.ndarray:
        return np.asarray(sigma, dtype=np.float64) * self.num_train_timesteps

    @property
    def sigma_min(self) -> float:
        return float(self.shifted(1.0 / self.num_train_timesteps))

    def grid(self, n: int, spacing: str | None = None, final: str = "zero", round_timesteps: bool = True,
             flow_table: str | None = "euler") -> Grid:
        """``flow_table``: which diffusers scheduler's σ table ``linspace`` is (see the module
        docstring). ``final="sigma_min"`` ends at shift(1/T), the smallest training σ (a real last
        step; diffusers' flow UniPC/DEIS instead repeat the last σ, a zero-length step)."""
        spacing = spacing or self.default_spacing
        _check(spacing, final)
        if spacing in ("leading", "trailing"):
            raise ValueError(f"spacing {spacing!r} means nothing on a flow schedule: diffusers' flow schedulers "
                             f"ignore timestep_spacing, each keeps its own σ table, which spacing 'linspace' (the "
                             f"default) reproduces for each solver; pick another table with flow_table= "
                             f"{FLOW_TABLES} or pass sigmas=")
        if flow_table not in FLOW_TABLES:
            raise ValueError(f"flow_table must be one of {FLOW_TABLES}, got {flow_table!r}")
        T = self.num_train_timesteps
        if spacing == "karras" or flow_table == "euler":
            u_min = 1.0 / T if self.dynamic else float(self.shifted(1.0 / T))
            sig = self.shifted(np.linspace(1.0, u_min, n))
            if spacing == "karras":
                sig = karras(sig[-1], sig[0], n)
        elif flow_table == "unipc":
            sig = self.shifted(np.linspace(1.0, 1.0 / T, n + 1)[:-1])
            if abs(sig[0] - 1.0) < 1e-6:
                sig[0] -= 1e-6  # as diffusers' UniPC: keeps λ finite at the first point
        else:  # dpmsolver
            sig = self.shifted(np.flip(1.0 - np.linspace(1.0, 1.0 / T, n + 1))[:-1])
        sigmas = np.append(sig, 0.0 if final == "zero" else self.sigma_min)
        return Grid(sigmas, self.alpha(sigmas), self.t_from_sigma(sig))


def make_schedule(kind: str, **kw):
    """``make_schedule("vp", beta_schedule=..., prediction="eps"|"v"|"x0", ...)`` or
    ``make_schedule("flow", shift=3.0)`` / ``make_schedule("flow", image_seq_len=4096)``.
    diffusers' names work too: ``prediction_type=`` ("epsilon", "v_prediction", "sample",
    "flow_prediction") for ``prediction=``, ``flow_shift=`` for ``shift=``."""
    for theirs, ours in (("prediction_type", "prediction"), ("flow_shift", "shift")):
        if theirs in kw:
            if ours in kw:
                raise ValueError(f"give either {ours}= or diffusers' {theirs}=, not both")
            kw[ours] = kw.pop(theirs)
    if kind == "vp":
        return VPSchedule(**kw)
    if kind == "flow":
        if "image_seq_len" in kw:
            seq = kw.pop("image_seq_len")
            if "shift" in kw:
                raise ValueError("give either shift or image_seq_len")
            prediction = kw.pop("prediction", "flow")
            return FlowSchedule.from_seq_len(seq, prediction=prediction, **kw)
        return FlowSchedule(**kw)
    raise ValueError(f"schedule kind must be 'vp' or 'flow', got {kind!r}")
