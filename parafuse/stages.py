"""Stages: a denoising schedule as a list of resolutions (Bottleneck Sampling: high → low → high).

A stage is (height, width, steps, shift, strength). The plain schedule is one stage at the image
size. What runs:

- `--steps S` is the step count of the plain one-stage schedule, and the baseline that
  `flops.full_schedule` counts. The bottleneck schedule scales its stage steps (for a 50-step
  baseline) to S: N_i = round(S·n_i/50), but at least the steps with which the stage's strength
  skips its first step (2 at 0.5, 3 at 0.6, 5 at 0.8): with fewer, a stage would start from pure
  noise and throw the previous stage's image away (an explicit list doing so is an error).
- Stage i has its own N_i-step grid (its own shifted schedule, from σ = 1 down to 0). Entered at
  strength w_i it starts at grid index floor(N_i·(1 − w_i)) (the paper's int(N_i(1 − w_i))) and so
  runs its last ceil(w_i·N_i) steps. Strength 1 runs every step from pure noise; the first stage
  must have strength 1.
- At a stage change to a stage no larger than the previous one (the change down), the previous
  stage hands over its noisy sample x₁ = α₁·x0 + σ₁·ε from before its last evaluation, which then
  does not run: area-resized (its noise then has variance σ₁²·v, v = 1/4 at half size), rescaled
  by α/α₁ and topped up with fresh noise to the stage's starting σ:
  x = (α/α₁)·resize(x₁) + sqrt(σ² − (α·σ₁/α₁)²·v)·ε (`entry`, "noisy"). At any other change
  (up: an interpolating filter would correlate the noise; or where the carried noise exceeds σ)
  the clean estimate x̂0 of the last evaluation is resized and re-noised: x = α·resize(x̂0) + σ·ε
  ("clean"). Flow: α = 1 − σ; VP: α = sqrt(1 − σ²). The fresh noise is drawn for the whole
  latent, keyed by (seed, stage). Each stage's solver starts with an empty history. The issue
  asked for x̂0 at every change; the noisy sample is used where it can be because x̂0 at the end
  of the first stage (σ₁ = 0.71 at 1024²) is a blurred mean, and the half-size stage re-entered
  from it made images of ~20% less band contrast and ~30% less saturation than plain ones.
- Shift: a flow stage's schedule is shifted σ' = sσ/(1 + (s − 1)σ), s a multiple of the model's
  own shift (the published 9/6/9 were chosen for FLUX, whose own shift is 3: 3×, 2×, 3×). VP
  models have no shift: their stages use the model's schedule.

The default (`--schedule bottleneck`) is not the published setting. Published (FLUX.1-dev, 1024²):
steps 6/20/8, strengths 1/0.8/0.6, shifts 3×/2×/3× the model's. Default here: steps 6/20/12,
strengths 1/0.5/0.7, shifts 3×/2×/1×, the first stage's growing above 256² as sqrt(pixels)/256
(at most 16). Why (the sweeps that chose it): docs/decisions/2026-11-26-bottleneck-default.md.
The published setting stays `bottleneck(..., published=True)`, or on the command line the
explicit --stages list in docs/bottleneck.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCHEDULES = ("plain", "bottleneck")
UPSAMPLE = ("lanczos", "bicubic")

# Bottleneck Sampling's published setting (FLUX.1-dev, 1024², 50-step baseline at shift 3).
PUBLISHED_BASELINE_STEPS = 50
PUBLISHED_STEPS = (6, 20, 8)
PUBLISHED_STRENGTHS = (1.0, 0.8, 0.6)
PUBLISHED_SHIFTS = (9.0, 6.0, 9.0)
PUBLISHED_BASE_SHIFT = 3.0
PUBLISHED_SCALES = (1, 2, 1)        # each stage's side is the image side divided by this
# The default here (the module docstring says why): stage steps for a 50-step baseline,
# strengths, and shifts as multiples of the model's own.
DEFAULT_STEPS = (6, 20, 12)
DEFAULT_STRENGTHS = (1.0, 0.5, 0.7)
DEFAULT_SHIFT_SCALES = (3.0, 2.0, 1.0)
# The first stage's shift grows with the image side beyond this size (the one the setting was
# tuned at; the default model's largest training crop), as sqrt(pixel count) - SD3's resolution
# rule - and stops at MAX_FIRST_SHIFT (schedules.dynamic_shift's bound).
DEFAULT_SHIFT_REFERENCE_PX = 256
MAX_FIRST_SHIFT = 16.0


class StageError(ValueError):
    """A stage list that cannot run; the message says what to change."""


@dataclass(frozen=True)
class Stage:
    height: int                    # image pixels (the latent is height / codec factor)
    width: int
    steps: int                     # N_i: steps of this stage's own grid
    shift: float | None = None     # flow-schedule shift of this stage (None: the model's own)
    strength: float = 1.0          # re-noise strength at the stage start (1: every step, from pure noise)

    @property
    def start(self) -> int:
        return start_step(self.steps, self.strength)

    @property
    def runs(self) -> int:
        """Steps this stage runs: its last ceil(w·N)."""
        return self.steps - self.start

    def describe(self) -> str:
        shift = "model" if self.shift is None else f"{self.shift:g}"
        return f"{self.height}x{self.width}:{self.steps}:{self.strength:g}:{shift}"


def start_step(steps: int, strength: float) -> int:
    """First step of an N-step grid that a stage entered at strength w runs: floor(N·(1 − w)), so
    it runs the last ceil(w·N) (a 1e-9 slack keeps 10·(1 − 0.9) at 1, not 0.99…)."""
    return min(steps - 1, math.floor(steps * (1.0 - strength) + 1e-9))


def min_steps(strength: float) -> int:
    """The fewest grid steps with which a stage entered at `strength` < 1 skips at least its first
    step: with fewer it would start from pure noise and throw the previous stage's image away."""
    n = 1
    while strength < 1.0 and start_step(n, strength) == 0:
        n += 1
    return n


def plain(height: int, width: int, steps: int) -> tuple[Stage, ...]:
    return (Stage(height, width, steps),)


def bottleneck(height: int, width: int, steps: int, factor: int, model_shift: float | None,
               published: bool = False) -> tuple[Stage, ...]:
    """The three-stage schedule (full, half, full size) for an image of height x width px and a
    `steps`-step baseline: this project's default, or with `published` the paper's setting. The
    middle stage's side is half the image's, rounded to a multiple of `factor` (the model's pixel
    factor). `model_shift`: the model's own flow shift (None for VP: no shifts)."""
    if published:
        setting = zip(PUBLISHED_STEPS, PUBLISHED_STRENGTHS, (s / PUBLISHED_BASE_SHIFT for s in PUBLISHED_SHIFTS))
    else:
        setting = zip(DEFAULT_STEPS, DEFAULT_STRENGTHS, DEFAULT_SHIFT_SCALES)
    stages = []
    for i, ((n, w, s), scale) in enumerate(zip(setting, PUBLISHED_SCALES)):
        shift = None if model_shift is None else model_shift * s
        if shift is not None and i == 0 and not published:
            shift = max(shift, min(MAX_FIRST_SHIFT, shift * first_shift_growth(height, width)))
        stages.append(Stage(_side(height, scale, factor), _side(width, scale, factor),
                            max(min_steps(w), math.floor(steps * n / PUBLISHED_BASELINE_STEPS + 0.5)), shift, w))
    return tuple(stages)

def first_shift_growth(height: int, width: int) -> float:
    """How much the default's first-stage shift grows for a height x width image:
    sqrt(pixels) / DEFAULT_SHIFT_REFERENCE_PX, at least 1 (2 at 512², 4 at 1024²)."""
    return max(1.0, math.sqrt(height * width) / DEFAULT_SHIFT_REFERENCE_PX)


def _side(side: int, scale: int, factor: int) -> int:
    return max(factor, math.floor(side / scale / factor + 0.5) * factor) if scale > 1 else side


def parse_stages(texts: list[str] | tuple[str, ...]) -> tuple[Stage, ...]:
    """Stages from `HxW:STEPS[:STRENGTH[:SHIFT]]` strings, e.g. `1024x1024:6 512x512:20:0.8:6`
    (SHIFT `model` or omitted: the model's own)."""
    form = "HEIGHTxWIDTH:STEPS[:STRENGTH[:SHIFT]], e.g. 512x512:20:0.8:2"
    out = []
    for text in texts:
        parts = text.split(":")
        try:
            if not 2 <= len(parts) <= 4:
                raise ValueError
            h, w = (int(v) for v in parts[0].lower().split("x"))
            steps = int(parts[1])
            strength = float(parts[2]) if len(parts) > 2 else 1.0
            shift = float(parts[3]) if len(parts) > 3 and parts[3] != "model" else None
        except ValueError:
            raise StageError(f"cannot read stage {text!r}: write {form}") from None
        out.append(Stage(h, w, steps, shift, strength))
    if not out:
        raise StageError(f"--stages needs at least one stage: {form}")
    return tuple(out)


def check_stages(stages: tuple[Stage, ...], height: int, width: int, factor: int, flow: bool) -> None:
    """Raise StageError for a stage list that cannot run (sizes against the strips are checked by
    the runtime, which knows the number of strips)."""
    if not stages:
        raise StageError("a schedule needs at least one stage")
    for i, st in enumerate(stages, 1):
        name = f"stage {i} ({st.describe()})"
        if st.height <= 0 or st.width <= 0 or st.height % factor or st.width % factor:
            raise StageError(f"{name}: height and width must be positive multiples of {factor} for this model")
        if st.steps < 1:
            raise StageError(f"{name}: steps must be at least 1")
        if not 0.0 < st.strength <= 1.0:
            raise StageError(f"{name}: strength must lie in (0, 1] (1: from pure noise)")
        if st.shift is not None and not flow:
            raise StageError(f"{name}: a shift applies to flow-matching models; this model has a VP schedule, "
                             f"so leave the shift out (or write 'model')")
        if st.shift is not None and not (st.shift > 0 and math.isfinite(st.shift)):
            raise StageError(f"{name}: shift must be a positive number")
        if i > 1 and st.strength < 1.0 and st.start == 0:
            raise StageError(f"{name}: at strength {st.strength:g} a {st.steps}-step grid still starts at its "
                             f"first step, from pure noise, discarding the previous stage's image: give it at "
                             f"least {min_steps(st.strength)} steps")
    if stages[0].strength != 1.0:
        raise StageError(f"stage 1 starts from pure noise: its strength must be 1, got {stages[0].strength:g}")
    last = stages[-1]
    if (last.height, last.width) != (height, width):
        raise StageError(f"the image is made at the last stage's size {last.height}x{last.width}, but "
                         f"{height}x{width} was asked for: pass --height {last.height} --width {last.width}")
    # low → high: no stage above the image's size (the last stage's); detail made above it would be
    # thrown away by the last stage (the bottleneck schedule's high → low → high starts at the image size)
    for i, st in enumerate(stages[:-1], 1):
        if st.height > last.height or st.width > last.width:
            raise StageError(f"stage {i} ({st.describe()}) is larger than the image, the last stage "
                             f"({last.height}x{last.width}): stages run from low to high resolution, none above "
                             f"the last (e.g. 512x512:20 1024x1024:8:0.6)")


def stage_seed(seed: int, stage: int) -> int:
    """The noise seed of stage `stage`: the request's seed for stage 0 (so the plain schedule draws
    today's noise), a seed mixed from (seed, stage) after it, so that a later stage of stage 0's
    shape does not get the initial noise back."""
    if stage == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2 ** 64, stage]).generate_state(1, np.uint64)[0])


# ---- how a stage is entered: "noise" (stage 1), "noisy" (the previous stage's noisy sample) or
# "clean" (its x̂0, re-noised) ------------------------------------------------------------------
def area_windows(n_in: int, n_out: int) -> torch.Tensor:
    """Per output index, how many inputs an area (adaptive-average) resize from n_in to n_out <= n_in
    averages: floor(i·n_in/n_out) .. ceil((i+1)·n_in/n_out), as F.interpolate(mode="area")."""
    i = torch.arange(n_out)
    return -((-(i + 1) * n_in) // n_out) - (i * n_in) // n_out


def carried_variance(latent_in: tuple[int, int], latent_out: tuple[int, int], codec) -> torch.Tensor:
    """[1, C, h, w]: the variance left of unit iid noise in each latent element after `resize_latent`
    shrinks (area) a latent of latent_in rows x columns to latent_out: one over the number of
    values averaged (1/4 at half size), computed where the resize runs (image space for the pixel
    codec, whose latent channels are sub-pixel phases), then folded into the latent's layout."""
    f = codec.factor
    (h_in, w_in), (h, w) = latent_in, latent_out
    rows, cols = area_windows(h_in * f, h * f), area_windows(w_in * f, w * f)
    var = 1.0 / (rows[:, None] * cols[None, :]).float()
    return codec.encode(var.expand(1, codec.channels // (f * f), h * f, w * f).contiguous())


def entry(prev: Stage, stage: Stage, prev_solver, solver, codec, factor: int) -> str:
    """How `stage` starts after `prev` (both stages' solvers built; `factor`: image px per latent
    element). "noisy" where it can: a stage no larger than the previous one takes its noisy sample
    x₁ = α₁·x0 + σ₁·ε from before its last evaluation (which then does not run), area-resized,
    rescaled by α/α₁ and topped up with fresh noise to the stage's starting σ - the sample keeps
    its own noise and the detail that x̂0, a blurred mean at σ₁, would lose. That needs the carried
    noise not to exceed σ (σ² >= (α·σ₁/α₁)²·v, v the variance the area resize leaves) and a
    previous stage with two evaluations or more. Else (every stage that grows: Lanczos or bicubic
    would correlate the noise) "clean": x̂0 of the last evaluation, resized, re-noised."""
    k = prev_solver.num_evals - 1
    if stage.height > prev.height or stage.width > prev.width or k < 1:
        return "clean"
    s1, a1, s, a = prev_solver.sigma(k), prev_solver.alpha(k), solver.sigma(0), solver.alpha(0)
    if a1 <= 0.0:
        return "clean"
    v = carried_variance((prev.height // factor, prev.width // factor), (stage.height // factor, stage.width // factor),
                         codec).max().item()
    return "noisy" if s * s >= (a * s1 / a1) ** 2 * v else "clean"


def enter_noisy(x1: torch.Tensor, sigma1: float, alpha1: float, sigma: float, alpha: float,
                carried_var: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x = (α/α₁)·x₁' + sqrt(σ² − (α·σ₁/α₁)²·v)·ε: the area-resized noisy sample x₁' (noise of
    variance σ₁²·v left in it) brought to the stage's starting (α, σ) with fresh noise ε."""
    scale = alpha / alpha1
    top_up = (sigma * sigma - (scale * sigma1) ** 2 * carried_var.to(x1.device, torch.float32)).clamp_min(0).sqrt()
    return scale * x1.float() + top_up * noise.float()


def stage_report(stages, solvers, evaluations: list[int], entries: list[str], step_seconds: list[float],
                 change_seconds: list[float]) -> list[dict]:
    """The report's `stages`: per stage its size (px), grid steps, the shift it ran (None: VP),
    strength, how it was entered, model evaluations, the seconds of its steps and of the change into it."""
    out, done = [], 0
    for st, solver, evals, how, change in zip(stages, solvers, evaluations, entries, change_seconds):
        out.append({"height": st.height, "width": st.width, "steps": st.steps,
                    "shift": getattr(solver.schedule, "shift", None), "strength": st.strength, "entry": how,
                    "evaluations": evals, "seconds": sum(step_seconds[done:done + evals]),
                    "change_seconds": change})
        done += evals
    return out


# ---- resizing the clean estimate --------------------------------------------------------------
def lanczos_matrix(n_in: int, n_out: int, a: int = 3) -> torch.Tensor:
    """[n_out, n_in] Lanczos-`a` interpolation (upsampling: n_out >= n_in), pixel centres aligned
    as in align_corners=False, edge pixels replicated, rows summing to 1."""
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    taps = centre.floor()[:, None] + torch.arange(-a + 1, a + 1, dtype=torch.float64)
    d = centre[:, None] - taps
    w = torch.sinc(d) * torch.sinc(d / a)
    w = w / w.sum(1, keepdim=True)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    return m.scatter_add_(1, taps.clamp(0, n_in - 1).long(), w)


def resize(x: torch.Tensor, height: int, width: int, up: str = "lanczos") -> torch.Tensor:
    """Resize [B, C, h, w] to height x width: a side that shrinks is area-averaged (antialiased),
    a side that grows is interpolated with `up` (lanczos | bicubic). Computed in float32."""
    if up not in UPSAMPLE:
        raise StageError(f"unknown upsampling {up!r}; valid: {', '.join(UPSAMPLE)}")
    dt, x = x.dtype, x.float()
    h, w = x.shape[-2:]
    if height < h or width < w:
        x = F.interpolate(x, size=(min(h, height), min(w, width)), mode="area")
    if height > h or width > w:
        h, w = x.shape[-2:]
        if up == "bicubic":
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
        else:
            rows = lanczos_matrix(h, height).float().to(x.device)
            cols = lanczos_matrix(w, width).float().to(x.device)
            x = torch.einsum("ih,bchw,jw->bcij", rows, x, cols)
    return x.to(dt)


def resize_latent(x: torch.Tensor, height: int, width: int, codec=None, up: str = "lanczos") -> torch.Tensor:
    """Resize a latent [B, C, h, w] to height x width latent rows/columns.

    With the built-in models' pixel codec (space-to-depth: a lossless rearrangement of the image)
    the latent *is* image space, folded: each channel is one sub-pixel phase, and resizing the
    channels one by one would misplace those phases. So it is unfolded, resized and folded again -
    exact bookkeeping, no decoder involved. A learned latent (`codec=None`) is resized as it is."""
    if codec is None:
        return resize(x, height, width, up)
    f = codec.factor
    return codec.encode(resize(codec.decode(x), height * f, width * f, up))
