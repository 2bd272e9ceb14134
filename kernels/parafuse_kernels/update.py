"""The fused solver update: one pass over the strip for any solver, beside its reference.

    fused_step(solver, k, x, raw, state, reduce, uncond=None, guidance=1.0, guidance_rescale=0.0)
        -> (x_next, new_state), what ``solver.step(k, x, cfg(raw, uncond, guidance), state)`` returns

One kernel launch reads the model output (and the unconditional output under CFG: guidance is
fused), x and the history tensors once each, and writes x_next and every new history tensor: the
guidance, the conversion to x̂0 (eps / v / flow / x0 prediction) and the solver's combination are
one linear map per output (``parafuse.solvers.linear.linear_step``, found from the solver's own
code), applied in float32 whatever the storage dtypes. x_next is stored in x's dtype, the history
in float32, as the eager path does. History entries that are an existing tensor passed on (x̂0 of
the last step shifting down the list) are not copied.

Global reductions are never skipped and never fused: with guidance rescale (a per-sample std over
the whole image) the guided output is built and rescaled in torch first, and the kernel reads it as
one model output; with dynamic thresholding (a quantile over the whole image) x̂0 is computed and
thresholded in torch, and the kernel combines x, x̂0 and the history. Both reduce across strips
through ``reduce`` exactly as the eager path.

The reference is the solver's own eager ``step`` (``fused_step_reference``).
Import this module only after TRITON_INTERPRET is set when testing on CPU (see the package).
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from parafuse_kernels import INTERPRETED, INTERPRETER_LOCK

from parafuse.solvers import cfg, dynamic_threshold, rescale
from parafuse.solvers.linear import get_slot, linear_step, put_slot
from parafuse.solvers.stepper import LOCAL

LAUNCHES = {"fused_update": 0}         # tests check that the kernel ran
BLOCK = 16384 if INTERPRETED else 2048   # the interpreter pays per program instance, not per element
STORAGE = (torch.float32, torch.bfloat16, torch.float16)


# ---- reference -----------------------------------------------------------------------------------
def fused_step_reference(solver, k, x, raw, state, reduce=LOCAL, uncond=None, guidance=1.0, guidance_rescale=0.0):
    """The eager path: guidance (and rescale) in torch, then the solver's own step."""
    if uncond is not None:
        guided = cfg(raw.float(), uncond.float(), guidance)
        raw = rescale(guided, raw.float(), guidance_rescale, reduce) if guidance_rescale else guided
    return solver.step(k, x, raw, state, reduce=reduce)


# ---- kernel --------------------------------------------------------------------------------------
@triton.jit
def _linear_update_kernel(sources, outputs, coeffs, numel, N_IN: tl.constexpr, N_OUT: tl.constexpr,
                          BLOCK: tl.constexpr):
    """outputs[o] = Σ_i coeffs[o·N_IN + i] · sources[i], elementwise, in float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    vals = ()
    for i in tl.static_range(N_IN):
        vals = vals + (tl.load(sources[i] + offs, mask=mask, other=0.0).to(tl.float32),)
    for o in tl.static_range(N_OUT):
        acc = coeffs[o * N_IN] * vals[0]
        for i in tl.static_range(1, N_IN):
            acc += coeffs[o * N_IN + i] * vals[i]
        tl.store(outputs[o] + offs, acc.to(outputs[o].dtype.element_ty), mask=mask)


def linear_update(sources: list[torch.Tensor], outputs: list[torch.Tensor], rows: list[list[float]]) -> None:
    """One launch: outputs[o] = Σ_i rows[o][i]·sources[i] (same shape, contiguous, any of fp32/bf16/fp16)."""
    numel = outputs[0].numel()
    for t in sources + outputs:
        if not t.is_contiguous() or t.numel() != numel or t.dtype not in STORAGE:
            raise ValueError(f"fused update tensors must be contiguous fp32/bf16/fp16 of {numel} elements; "
                             f"got {tuple(t.shape)} {t.dtype} (contiguous: {t.is_contiguous()})")
    coeffs = tuple(float(c) for row in rows for c in row)
    with INTERPRETER_LOCK:
        _linear_update_kernel[(triton.cdiv(numel, BLOCK),)](tuple(sources), tuple(outputs), coeffs, numel,
                                                            N_IN=len(sources), N_OUT=len(outputs), BLOCK=BLOCK)
    LAUNCHES["fused_update"] += 1


def linear_update_reference(sources, outputs, rows) -> None:
    for out, row in zip(outputs, rows):
        acc = sum(c * s.double() for c, s in zip(row, sources))
        out.copy_(acc)


# ---- the step --------------------------------------------------------------------------------------
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # solver -> {key: LinearStep}


def _linear_step(solver, k, state, guidance):
    """linear_step, cached per solver: the maps depend only on k, the guidance and the state's
    structure (which slots exist, its python numbers), not on tensor values - so the host probes
    each evaluation once, not once per image."""
    shape = tuple((key, len(v) if isinstance(v, list) else "tensor" if torch.is_tensor(v) else v)
                  for key, v in sorted(state.items()))
    cache = _STEPS.setdefault(solver, {})
    key = (k, guidance, shape)
    if key not in cache:
        cache[key] = linear_step(solver, k, state, guidance)
    return cache[key]


def fused_step(solver, k, x, raw, state, reduce=LOCAL, uncond=None, guidance=1.0, guidance_rescale=0.0):
    """``solver.step`` with guidance fused (see the module): returns (x_next, new state)."""
    if x.dtype not in STORAGE:
        raise ValueError(f"the fused update stores x as fp32/bf16/fp16, got {x.dtype}; use --kernels torch")
    if uncond is not None and guidance_rescale:     # a global std: guided output built in torch first
        raw, uncond = rescale(cfg(raw.float(), uncond.float(), guidance), raw.float(), guidance_rescale, reduce), None
    if uncond is not None and solver.thresholding:  # x̂0 is built in torch: guide in torch as well
        raw, uncond = cfg(raw.float(), uncond.float(), guidance), None
    step = _linear_step(solver, k, state, guidance if uncond is not None else None)

    tensors = {"x": x, "raw": raw, "cond": raw, "uncond": uncond}
    if solver.thresholding:
        x0 = solver.data_prediction(k, x, raw)
        tensors["x0"] = dynamic_threshold(x0, solver.dynamic_thresholding_ratio, solver.sample_max_value, reduce)
    history_dtype = torch.promote_types(x.dtype, torch.float32)
    targets = list(step.rows)
    outputs = [torch.empty_like(x) if t == "x_next" else torch.empty(x.shape, dtype=history_dtype, device=x.device)
               for t in targets]
    sources = [tensors[s] if isinstance(s, str) else get_slot(state, s) for s in step.sources]
    sources = [s if s.is_contiguous() else s.contiguous() for s in sources]
    linear_update(sources, outputs, [step.rows[t] for t in targets])

    written = dict(zip(targets, outputs))
    new_state = {key: (list(v) if isinstance(v, list) else v) for key, v in step.template.items()}
    for slot, t in written.items():
        if slot != "x_next":
            put_slot(new_state, slot, t)
    for slot, source in step.aliases.items():
        put_slot(new_state, slot, tensors[source] if isinstance(source, str) else get_slot(state, source))
    return written["x_next"], new_state


class FusedUpdate:
    """A solver whose ``step`` is ``fused_step``: what the sampling loop sees with ``--kernels triton``.
    With ``guidance``, the model output it is given is both branches stacked [cond; uncond] along the
    batch, and the kernel applies the guidance. Everything else (grid, model times, state) is the
    wrapped solver's."""

    def __init__(self, solver, guidance: float | None = None):
        self.solver, self.guidance = solver, guidance

    def __getattr__(self, name):
        return getattr(self.solver, name)

    def data_prediction(self, k, x, raw):
        """x̂0 of evaluation k (a stage change reads it), from the stacked branches when guided."""
        if self.guidance is not None:
            cond, uncond = raw.chunk(2)
            raw = cfg(cond.float(), uncond.float(), self.guidance)
        return self.solver.data_prediction(k, x, raw)

    def step(self, k, x, raw, state, reduce=LOCAL):
        if self.guidance is None:
            return fused_step(self.solver, k, x, raw, state, reduce)
        cond, uncond = raw.chunk(2)
        return fused_step(self.solver, k, x, cond, state, reduce, uncond=uncond, guidance=self.guidance)
