"""A diffusers denoiser (`pipe.unet` / `pipe.transformer`), VAE encoder or decoder that runs on this rank's strip.

The pipeline keeps calling its models with the whole latent; two hooks on each model do the rest:

    before   at the first call of an image, a shape-only trace of the plain model with the
             pipeline's own arguments (`parafuse.parallel.trace`) lists the parallel sites
             and the model's unit, and fixes the patch plan for this geometry; every call then
             starts an engine step and hands the model this rank's rows of its input (and, with
             CFG parallel, this rank's half of the denoiser's batch)
    after    the strips of the output are gathered (kind `gather`): the denoiser's on every rank
             (the CFG halves swapped with the peer, kind `cfg`) and the VAE encoder's on every
             rank, the decoder's image on strip 0

Who owns the latents: every rank runs the pipeline's own loop and its scheduler on the whole latent,
redundantly, after gathering the model output at each step. That is exact for every scheduler
(stochastic ones draw the same full-image noise from the same generator on every rank; global
steps such as thresholding see the whole latent) and needs nothing of the pipeline but its
denoiser call. Its price is one all-gather of the model output per evaluation:
(N-1)/N of the output's bytes received by each rank.
"""
from __future__ import annotations

import inspect
import math
import sys
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from parafuse.checks import check_strip_memory
from parafuse.diffusers.adapter import (DiffusersAdapter, StripAttnProcessor, StripDownsample2D, StripPatchEmbed,
                                        StripQwenRope, UnsupportedModelError, cast_layers, compute_dtype,
                                        diffusers_hooks, inner_processor, qwen_grids, strip_tokens_of,
                                        text_mask_to_attention, wrap_qwen_attention)
from parafuse.diffusers.cache import StripFirstBlockCache
from parafuse.diffusers.freeu import StripFreeU, freeu_scales
from parafuse.parallel.geometry import GeometryError, StripGeometry
from parafuse.parallel.parallelize import parallelize as swap_layers, unparallelize
from parafuse.parallel.plan import LOCAL, PatchPlan, SiteKind
from parafuse.parallel.session import PatchSession, StepClock
from parafuse.parallel.trace import Trace, trace_model


def _batch_half(obj, batch: int, half: int):
    """`obj` (tensors, nested in dicts/lists/tuples) with every tensor of `batch` rows cut to its
    half `half`: one guidance branch of a CFG batch."""
    if isinstance(obj, torch.Tensor):
        return obj.chunk(2)[half] if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: _batch_half(v, batch, half) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_batch_half(v, batch, half) for v in obj)
    return obj


def listed_ip_masks(kwargs: dict, device: torch.device) -> dict:
    """`kwargs` with cross_attention_kwargs' `ip_adapter_masks` as diffusers reads them - one tensor
    [1, images, H, W] (or None) per IP-Adapter, its older single tensor [adapters, 1, H, W] read as
    diffusers reads it - and on the denoiser's device: a list, which halving the CFG batch leaves
    whole (a tensor of `batch` adapters would be cut), on the device where the cross-attentions
    downsample it at every call (`StripAttnProcessor._strip_masks`), so that a CUDA graph captures
    that work and replays it from the masks' static buffers."""
    extra = kwargs.get("cross_attention_kwargs") or {}
    masks = extra.get("ip_adapter_masks")
    if masks is None:
        return kwargs
    if isinstance(masks, torch.Tensor):
        masks = list(masks.unsqueeze(1))
    for j, m in enumerate(masks):
        if m is not None and (not isinstance(m, torch.Tensor) or m.dim() != 4):
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"ip_adapter_masks[{j}] is {got}, not a [1, images, height, width] tensor (one per "
                             f"IP-Adapter, or None): make the masks with diffusers' "
                             f"IPAdapterMaskProcessor().preprocess")
    masks = [None if m is None else m.to(device) for m in masks]
    return {**kwargs, "cross_attention_kwargs": {**extra, "ip_adapter_masks": masks}}


@contextmanager
def plain_processors(model: nn.Module):
    """The attention processors parafuse wrapped put back in place of their wrappers while the
    block runs, for diffusers code that finds processors by their class (`set_ip_adapter_scale`
    sets the scale of the IP-Adapter processors it finds, and would silently skip the wrappers);
    the wrappers, back afterwards, call the processors it changed."""
    wrapped = [(m, m.processor) for m in model.modules()
               if isinstance(getattr(m, "processor", None), StripAttnProcessor)]
    for m, wrapper in wrapped:
        m.set_processor(wrapper.inner)
    try:
        yield
    finally:
        for m, wrapper in wrapped:
            m.set_processor(wrapper)


def is_compiled(model: nn.Module) -> bool:
    """`torch.compile(model)` (an OptimizedModule) or `model.compile()`."""
    return hasattr(model, "_orig_mod") or model.__dict__.get("_compiled_call_impl") is not None


@contextmanager
def eager(model: nn.Module):
    """`model` without torch.compile, for the shape-only runs (FakeTensor under a compiled module
    crashed the process): `torch.compile(model)`'s original module, with `model.compile()`'s
    compiled call set aside."""
    inner = getattr(model, "_orig_mod", model)
    compiled = inner.__dict__.get("_compiled_call_impl")
    inner._compiled_call_impl = None
    try:
        yield inner
    finally:
        inner._compiled_call_impl = compiled


def compile_context(model: nn.Module):
    """torch.compile's context of `model` (its settings: `fullgraph`, the backend), either form:
    `torch.compile(model)`'s OptimizedModule holds it, `model.compile()`'s compiled call closes over
    it; None for a model not compiled."""
    ctx = getattr(model, "dynamo_ctx", None)
    compiled_call = model.__dict__.get("_compiled_call_impl")
    if ctx is None and compiled_call is not None:
        ctx = inspect.getclosurevars(compiled_call).nonlocals.get("self")
    return ctx


def compiled_cuda_graphs(ctx) -> str | None:
    """How torch.compile's context `ctx` records CUDA graphs of its own, or None: inductor's
    `triton.cudagraphs` (`mode="reduce-overhead"` and `"max-autotune"` set it, as can `options` or
    inductor's global config) or the `cudagraphs` backend. The backend is found by following the
    wrappers dynamo puts around it (`_torchdynamo_orig_backend`)."""
    backend, seen = getattr(ctx, "callback", None), set()
    while backend is not None and id(backend) not in seen:
        seen.add(id(backend))
        name = getattr(backend, "compiler_name", None)
        if name == "cudagraphs":
            return 'backend="cudagraphs"'
        if name == "inductor" and hasattr(backend, "get_compiler_config"):
            from torch._inductor import config as inductor_config
            if (backend.get_compiler_config() or {}).get("triton.cudagraphs", inductor_config.triton.cudagraphs):
                return 'inductor\'s CUDA graphs (mode="reduce-overhead" or "max-autotune" turn them on)'
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    return None


def check_compiled(model: nn.Module) -> None:
    """A compiled denoiser runs parafuse's hooks outside (torch.compile(model)) or inside
    (model.compile()) the compiled region, whose patch layers break the graph at every exchange:
    fullgraph=True cannot hold. torch.compile's own CUDA graphs (cudagraph trees, replaying the
    pieces between exchanges from one memory pool) beside parafuse's transfers on another stream
    and its state kept across steps have never run on a GPU: refused rather than left to chance.
    Both refusals come before any compute."""
    ctx, name = compile_context(model), type(getattr(model, "_orig_mod", model)).__name__
    if getattr(ctx, "fullgraph", False):
        raise UnsupportedModelError(f"{name} was compiled with fullgraph=True, but parafuse's exchanges break the "
                                    f"graph at every patch layer: compile it without fullgraph")
    graphs = compiled_cuda_graphs(ctx)
    if graphs:
        raise UnsupportedModelError(f"{name} was compiled with {graphs}, which parafuse does not run under its "
                                    f"exchanges: compile with mode=\"max-autotune-no-cudagraphs\" or "
                                    f"the default mode (parafuse's own CUDA graphs, cuda_graphs=True, are for an "
                                    f"uncompiled denoiser)")


def token_grid(ids: torch.Tensor) -> tuple[int, int] | None:
    """(rows, columns) of one grid's `img_ids` [tokens, (_, row, column[, layer])] (Flux's ids;
    FLUX.2's, whose fourth coordinate is 0 on an image's tokens), if they name its tokens row-major
    from (0, 0); else None."""
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if rows * cols == ids.shape[0] and not ids[:, 3:].any() and torch.equal(ids[:, 1] * cols + ids[:, 2],
                                                   torch.arange(rows * cols, device=ids.device)):
        return rows, cols
    return None


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """The kind of a model call: the arguments given and their nesting, every tensor's shape and
    dtype and every other value (SD3's `skip_layers`) but floats - scales, which select no site and
    may change by step (a ControlNet's conditioning scale outside control_guidance_start/end) - and
    the timestep (it names the step, not the kind of call; a pipeline may pass it as a number)."""
    flat, spec = tree_flatten((args, {k: v for k, v in kwargs.items() if k != "timestep"}))
    return str(spec), tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else float
                            if isinstance(a, float) else repr(a) for a in flat)


# The most denoiser calls one step may make: diffusers' pipelines make at most two (SD3's skip-layer
# guidance after its CFG batch; true CFG's conditional and unconditional calls); more means the
# pipeline's loop does not step `pipe.scheduler` (`StripModel._step_position`)
MAX_CALLS_PER_STEP = 4


class StepCount:
    """The steps the pipeline's scheduler has taken in the current pipeline call (counted by
    `parafuse.diffusers.pipeline.counting_steps`): the denoiser calls between two of them are one
    denoising step's."""

    def __init__(self):
        self.steps = 0


class StripModel:
    """Hooks that make a diffusers model compute this rank's strip: the input's rows in, the output's
    strips gathered out (see the module docstring). Each call of the model is one engine step of
    the current image.

    Streams: a pipeline may call the model more than once per step with different inputs (SD3's
    skip-layer guidance: the CFG batch, then the conditional inputs alone with blocks skipped;
    Flux's true CFG: the conditional call, then the unconditional one). The calls of one step are
    those between two steps of the pipeline's scheduler (`StepCount`, `_step_position`), and the
    k-th call of every step is stream k: its own trace and patch plan (fixed at its first call of the image), its own
    exchange state on the engine (`ExchangeEngine.configure`), its first evaluation synchronous and
    its warmup counted in its own evaluations - so in the stale modes a call reads what its own
    kind's previous evaluation left. The k-th call must be of the same kind at every step
    (`call_signature`), or the call is refused."""

    gather_to: int | None = None          # gather the output on every strip (None) or on one

    def __init__(self, model: nn.Module, session: PatchSession, adapter: DiffusersAdapter):
        self.model, self.session, self.adapter = model, session, adapter
        self.engine, self.layout, self.transport = session.engine, session.layout, session.transport
        self._signature = inspect.signature(getattr(model, "_orig_mod", model).forward)
        self.sample_name = next(iter(self._signature.parameters))
        # positional arguments can be bound to names (no *args in the forward): `_by_name`
        self._bindable = not any(p.kind is p.VAR_POSITIONAL for p in self._signature.parameters.values())
        self._traces: dict[tuple, Trace] = {}   # per kind of call (`call_signature`) and grids
        self.trace: Trace | None = None         # the current stream's
        self._structure = None
        self.geometry: StripGeometry | None = None
        self._tokens = False                                      # the input is a sequence of token grids (Flux)
        self.evaluations = 0
        self._kinds: list[tuple] = []          # this image's streams: the signature of each one's calls
        self._stream_evaluations: list[int] = []
        self.stream = 0                        # the current call's stream
        self.steps: StepCount | None = None    # the pipeline call's scheduler steps (None: a direct call)
        self._last_steps = None                # their count at the last call
        self._position = 0                     # the last call's place in its step
        self.tracing = False
        # parafuse's hooks plan on the host (streams, plans, cuts): outside torch.compile's tracing,
        # which under `model.compile()` traced them at every call, guarded on their state and
        # recompiled them until dynamo's limit (benchmarks/compile_cost.py: on a U-Net of SDXL's depth
        # the first compiled call went from 710-970 s of tracing to under 20 on this CPU)
        self._handles = [model.register_forward_pre_hook(torch.compiler.disable(self._by_name), with_kwargs=True),
                         model.register_forward_hook(torch.compiler.disable(self._after), with_kwargs=True)]

    def begin_image(self) -> None:
        """Before each image: swap in layers for modules added since (LoRA), forget the traces if
        the model's structure changed (with one strip: Qwen-Image's attention processors only), and
        start counting evaluations from 0."""
        if self.engine is not None:
            self.adapter.check(self.layers)
            swap_layers(self.layers, self.engine, self.adapter)
            structure = tuple((name, id(m)) for name, m in self.layers.named_modules())
            if structure != self._structure:
                self.adapter.rekey(self.layers)
                self._traces.clear()
                self._structure = structure
        else:
            wrap_qwen_attention(self.layers, self.adapter)
        self.geometry = None
        self.evaluations = 0
        self._kinds, self._stream_evaluations, self.stream, self._last_steps, self._position = [], [], 0, None, 0

    @property
    def steps_taken(self) -> int | None:
        """The steps the pipeline's scheduler has taken in this call (None outside a pipeline call)."""
        return None if self.steps is None else self.steps.steps

    @property
    def stream_evaluations(self) -> tuple[int, ...]:
        """The evaluations of each stream in this image (the last one, after its call)."""
        return tuple(self._stream_evaluations)

    @property
    def layers(self) -> nn.Module:
        """The module whose layers are swapped and named: the model, or the original module of
        `torch.compile(model)` (the hooks stay on the compiled wrapper, outside its graph)."""
        return getattr(self.model, "_orig_mod", self.model)

    def end_image(self) -> None:
        if self.engine is not None:
            self.engine.end_image()

    def remove(self) -> None:
        """Take parafuse off the model: hooks removed, plain layers and the replaced attention
        processors back in place."""
        for h in self._handles:
            h.remove()
        unparallelize(self.layers)
        for m in self.layers.modules():
            processor = getattr(m, "processor", None)
            if isinstance(processor, StripAttnProcessor):
                m.set_processor(processor.inner)
            if isinstance(m, (StripPatchEmbed, StripQwenRope, StripDownsample2D)):
                m.__class__ = type(m).__mro__[1]          # the diffusers class it stands for

    def compiled(self) -> bool:
        """The model runs inside code torch.compile traces: the Triton GroupNorm then leaves the SiLU
        after it to the model (`ExchangeEngine.fused_silu`)."""
        return is_compiled(self.model)

    # ---- hooks ---------------------------------------------------------------------------------
    def _by_name(self, module, args, kwargs):
        """The pre-hook: every argument after the sample passed by its name, so that the rules
        that find an argument (the residuals cut to the strip, Flux's `img_ids`, the CFG half of
        the batch) find it however the caller passed it - `unet(x, t, text, None, ..., residuals)`
        as `unet(x, t, encoder_hidden_states=text, ...)`."""
        if len(args) > 1 and self._bindable:
            named = self._signature.bind_partial(*args).arguments
            args, kwargs = args[:1], {**{k: v for k, v in named.items() if k != self.sample_name}, **kwargs}
            return self._before(module, args, kwargs) or (args, kwargs)
        return self._before(module, args, kwargs)

    def _sample(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs[self.sample_name]

    def _branch_half(self, args: tuple, kwargs: dict, what: str) -> tuple[tuple, dict]:
        """cfg_parallel: this rank's guidance branch of a call given the whole CFG batch."""
        batch = self._sample(args, kwargs).shape[0]
        if batch % 2:
            raise UnsupportedModelError(f"cfg_parallel splits the two guidance branches of the {what}'s batch, "
                                        f"but the pipeline called it with batch {batch}: it needs guidance_scale "
                                        f"> 1 and a pipeline that does classifier-free guidance (Flux: "
                                        f"true_cfg_scale > 1 with a negative prompt; its guidance_scale is "
                                        f"distilled guidance, not CFG)")
        return _batch_half((args, kwargs), batch, self.layout.branch)

    def _with_sample(self, args: tuple, kwargs: dict, sample: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (sample,) + tuple(args[1:]), kwargs
        return args, {**kwargs, self.sample_name: sample}

    def _before(self, module, args, kwargs):
        if self.tracing:
            return None
        if self.engine is None:
            self._begin_evaluation()
            return None
        if torch.is_grad_enabled():
            raise UnsupportedModelError(f"parafuse's patch layers are inference-only: call {type(self.model).__name__} "
                                        f"under torch.no_grad() (diffusers pipelines do)")
        if kwargs.get("kv_cache_mode") is not None or kwargs.get("kv_cache") is not None:
            raise UnsupportedModelError(f"{type(self.model).__name__} was called with a K/V cache of reference images "
                                        f"(kv_cache_mode={kwargs.get('kv_cache_mode')!r}), tokens of no row of the "
                                        f"latent's grid: call it without kv_cache_mode and kv_cache")
        self.engine.fused_silu = not self.compiled()    # dynamo cannot wrap a SiLUApplied
        sample = self._sample(args, kwargs)
        self._enter_stream(args, kwargs, sample)
        kwargs = self._strip_kwargs(kwargs)
        self._begin_evaluation()
        if self._tokens and kwargs.get("img_ids") is not None:   # the grids' ids, cut as their tokens (RoPE)
            kwargs = {**kwargs, "img_ids": self._tokens_of(kwargs["img_ids"], -2)}
        # (Qwen-Image's img_shapes stay the whole sequence's: StripQwenRope cuts the table made of them)
        return self._with_sample(args, kwargs, self._strip_of(sample))

    def _strip_of(self, t: torch.Tensor) -> torch.Tensor:
        """This strip's part of `t`, a tensor of the input's grid: its tokens of a sequence [B, tokens,
        C] of row-major grids (Flux's), its rows of an image [B, C, H, W] at its width's level."""
        if self._tokens:
            return self._tokens_of(t, 1)
        level = self.geometry.level_of_width(t.shape[-1])
        top = level.offsets[self.layout.patch_index]
        return t[:, :, top: top + level.rows[self.layout.patch_index]].contiguous()

    def _tokens_of(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This strip's tokens of the sequence along `dim` of `t`: its rows of each grid, in sequence
        order (`StripGeometry.token_spans`)."""
        return strip_tokens_of(t, self.geometry.token_spans(self.layout.patch_index), dim)

    def _strip_kwargs(self, kwargs: dict) -> dict:
        """This rank's part of the call's other arguments, before the evaluation starts (the
        denoiser's residuals: `StripDenoiser`)."""
        return kwargs

    def _step_position(self) -> int:
        """This call's place among the calls of its step: those between two steps of the pipeline's
        scheduler (`steps`; a direct call is an image of one evaluation: 0). Read on the host: the
        call's tensors are not compared, which on a GPU would wait for the queued work at every
        call and end the host's lead over the device."""
        count = self.steps_taken
        same = count is not None and count == self._last_steps
        self._last_steps = count
        self._position = self._position + 1 if same else 0
        if self._position >= MAX_CALLS_PER_STEP:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} was called {self._position + 1} times between two steps of the "
                f"pipeline's scheduler: parafuse takes the calls between two scheduler steps as one denoising "
                f"step's (each its own exchange state), so a loop must call pipe.scheduler.step once per step "
                f"(a loop that steps another scheduler, or none, is not supported)")
        return self._position

    def _enter_stream(self, args: tuple, kwargs: dict, sample: torch.Tensor) -> None:
        """Make this call's stream current (see the class docstring), planning it at its first call."""
        position, kind = self._step_position(), call_signature(args, kwargs)
        self.stream = position
        if position == len(self._kinds):
            self._configure(args, kwargs, sample)
            self._kinds.append(kind)
            self._stream_evaluations.append(0)
            return
        if kind != self._kinds[position]:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}'s call {position + 1} of a step (the calls between two steps of the "
                f"pipeline's scheduler) came with other inputs than at an earlier step of this image (input "
                f"{tuple(sample.shape)}): parafuse gives each call of a step its own plan and exchange state by "
                f"its place in the step, so the calls must be the same at every step; keep the call's inputs "
                f"fixed during a pipeline call")
        self.engine.use_stream(position)

    def _begin_evaluation(self) -> None:
        """Evaluation `self.evaluations` of this image starts: the heartbeat, the engine's step plan
        (by the evaluations of the call's stream: each stream's warmup counts its own)."""
        if self.engine is None:
            self.session.begin_step(self.evaluations)
        else:
            self.session.begin_step(self._stream_evaluations[self.stream])
            self._stream_evaluations[self.stream] += 1
        self.evaluations += 1

    def _grid(self, kwargs: dict, sample: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], bool]:
        """The input's grids (rows, columns), in sequence order, and whether the input is a token
        sequence [B, tokens, C]. One image [B, C, H, W] is one grid. A sequence is named by one of two
        arguments, which give the same grids for the same sequence: `img_ids` (Flux's, FLUX.2's), one
        grid per value of their first coordinate (Flux Kontext appends the conditioning image's
        tokens, marked 1, to the latent's, marked 0), each row-major over its (_, row, column) ids
        (`token_grid`), the grids one after another; or `img_shapes` (Qwen-Image's), per sample the
        (frames, rows, columns) of each grid (its edit pipeline appends the conditioning image's
        tokens as a second grid: `qwen_grids`). Either way the grids must hold every token."""
        if sample.dim() == 4:
            return (tuple(sample.shape[-2:]),), False
        grids = self._named_grids(kwargs) if sample.dim() == 3 else None
        if grids is not None and sum(h * w for h, w in grids) == sample.shape[1]:
            return grids, True
        raise UnsupportedModelError(f"{type(self.model).__name__}'s input {tuple(sample.shape)} is neither an image "
                                    f"[B, C, H, W] nor a sequence of row-major token grids named by img_ids or "
                                    f"img_shapes")

    def _named_grids(self, kwargs: dict) -> tuple[tuple[int, int], ...] | None:
        """The grids a sequence's `img_ids` or `img_shapes` name (see `_grid`); None where neither is
        given or the ids are not row-major grids."""
        ids, shapes = kwargs.get("img_ids"), kwargs.get("img_shapes")
        if ids is None:
            return None if shapes is None else qwen_grids(shapes)
        ids = ids[0] if ids.dim() == 3 else ids
        marks, counts = torch.unique_consecutive(ids[:, 0], return_counts=True)
        if len(set(marks.tolist())) < len(marks):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}'s img_ids interleave the grids of its token sequence (their first "
                f"coordinates run {marks.tolist()}): parafuse cuts grids whose tokens follow one another; pass "
                f"each grid's tokens together")
        grids = tuple(token_grid(g) for g in ids.split(counts.tolist()))
        return None if None in grids else grids

    def _configure(self, args: tuple, kwargs: dict, sample: torch.Tensor) -> None:
        """The patch plan of the current stream (`self.stream`; 0: the image's first call, which fixes
        the geometry), from a shape trace of its kind of call and grids (once per kind: a call
        skipping blocks has only the sites it visits; the grids, because two layouts of the same
        token count are one signature)."""
        grids, tokens = self._grid(kwargs, sample)
        key = (call_signature(args, kwargs), grids)
        if key not in self._traces:
            saved, self.engine.step = self.engine.step, LOCAL      # the patch layers run as plain layers
            self.tracing = True
            try:
                with eager(self.model) as model:
                    self._traces[key] = trace_model(model, self.adapter, args, kwargs, sample, grids[0], grids[1:])
            finally:
                self.tracing, self.engine.step = False, saved
        trace = self.trace = self._traces[key]
        geometry = StripGeometry(trace.height, trace.width, self.layout.patch_degree, trace.unit, trace.others)
        if self.stream and (geometry, tokens) != (self.geometry, self._tokens):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} was called with a {tuple(sample.shape)} input inside an image planned "
                f"for a {self.geometry.height}x{self.geometry.width} grid: parafuse plans one grid per pipeline call; "
                f"call the pipeline once per image size")
        for s in trace.sites:
            if s.kind == SiteKind.CONV:
                geometry.check_halo(s.factor, s.top, s.bottom, f"conv {s.key}")
        plan = self.session.plan(trace.sites, geometry, sample.shape[0], compute_dtype(self.layers))
        self.check_fits(plan, sample)
        self.session.begin_image(plan, self.stream)
        self.geometry, self._tokens = geometry, tokens

    def check_fits(self, plan: PatchPlan, sample: torch.Tensor) -> None:
        """The memory floor, before the image's first evaluation (overridden by the denoiser)."""

    def _after(self, module, args, kwargs, output):
        if self.tracing:
            return None
        if isinstance(output, torch.Tensor):
            out = output
        else:
            out = output[0] if isinstance(output, tuple) else next(iter(output.values()))
        out = self._gather(out)
        if isinstance(output, torch.Tensor):
            return out
        if isinstance(output, tuple):
            return (out,) + tuple(output[1:])
        output[next(iter(output.keys()))] = out
        return output

    def _gather(self, out: torch.Tensor) -> torch.Tensor:
        if self.engine is None:
            return out
        if self._tokens:
            dim, rows = 1, self.geometry.tokens(1)
        else:
            dim, rows = 2, self.geometry.level_of_width(out.shape[-1]).rows
        full = self.engine.gather_rows(out, dim, rows, dst=self.gather_to, kind="gather")
        if full is None:        # not the gathering strip: a placeholder of the whole output's shape
            return out.new_zeros(out.shape[:dim] + (sum(rows),) + out.shape[dim + 1:])
        if self._tokens and self.geometry.others:
            # gathered strip by strip, each strip's rows of every grid: each piece to its place in the sequence
            spans = [span for j in range(self.geometry.n) for span in self.geometry.token_spans(j)]
            pieces = dict(zip(spans, full.split([b - a for a, b in spans], dim)))
            full = torch.cat([pieces[span] for span in sorted(pieces)], dim)
        return full


class StripDenoiser(StripModel):
    """`pipe.unet` / `pipe.transformer`: the output gathered on every rank (each steps the
    scheduler); with CFG parallel, this rank's guidance branch only, the other branch's output
    swapped with the CFG peer (kind `cfg`).

    A pipeline that batches both branches into one call (SD, SDXL, PixArt, SD3) has its batch
    halved. One that calls the denoiser once per branch (Flux's and Qwen-Image's true CFG: the
    conditional call, then the unconditional one, on the same latents) runs sequentially: each CFG group computes
    only its own branch's call; at the other call the model is not run (`_branch_forward`): the
    group of the second branch returns an empty output at the first call and fills it in place at
    the second, when the outputs are swapped - the pipeline reads neither output before its second
    call returns.

    FreeU (`enable_freeu`), whose filter needs the whole image's low frequencies, runs on the strip
    by hooks of its own on the U-Net's up blocks (`parafuse.diffusers.freeu`); diffusers' first-block
    cache (`enable_cache(FirstBlockCacheConfig(...))`) by its own hooks, given parafuse's decision for
    the image (`parafuse.diffusers.cache`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequential_cfg = False
        self._calls, self._skip, self._held, self._pair, self._shapes = 0, False, None, None, {}
        self._token_level = None              # the level of the attention sites, if they share one
        self.clock = StepClock(self.session.device)
        self.watch = self.session.watch(None)
        self.state_bytes = 0
        self.graphed = bool(self.session.config.cuda_graphs)   # CUDA graphs of the steady denoiser call
        self._graphs_on = self.graphed            # this image's: off for a compiled denoiser
        self._graphs: dict = {}          # per call signature (parafuse.graphs.GraphedEvaluations)
        self._version = None
        self._buffers: dict = {}         # per stream: the engine buffers its graphs read
        self.active = self._direct = False    # inside the parallel pipeline's call / a direct denoiser call
        self._own_forward = None              # the forward begin_image shadowed (False: none of its own)
        self.partners: list = []              # the pipeline's StripControlNets (their strips must be these)
        self.freeu = StripFreeU(self)         # FreeU's filter of the whole image, on the strip
        self.cache = StripFirstBlockCache(self)   # the first-block cache's whole-image decision

    def begin_image(self, sequential_cfg: bool = False) -> None:
        super().begin_image()
        try:
            self._begin_image(sequential_cfg)
        except BaseException:
            self.end_image()            # a refusal leaves no half-begun image behind (`active`, a shadowed forward)
            raise

    def _begin_image(self, sequential_cfg: bool) -> None:
        if self.graphed and cast_layers(self.layers):
            raise UnsupportedModelError("layerwise casting gives the cast layers' weights new storage at every call, "
                                        "which a CUDA graph's replay would not read: parallelize with "
                                        "cuda_graphs=False, or load the model without enable_layerwise_casting")
        self.active = True
        self._direct = False        # a direct call refused before its evaluation left it set
        self._patched = self._modules_state()
        self.clock = StepClock(self.session.device)
        self.watch = self.session.watch(None)     # the pipeline's loop length is its own
        self.state_bytes = 0
        self.sequential_cfg = sequential_cfg and self.layout.cfg_degree == 2
        self._calls, self._skip, self._held, self._pair = 0, False, None, None
        check_compiled(self.model)
        # a compiled denoiser is torch.compile's to schedule: parafuse's own CUDA graphs stay off
        self._graphs_on = self.graphed and not is_compiled(self.model)
        if not self._graphs_on:
            self._graphs.clear()            # none kept (nor their memory) while they are off
        else:
            version = self._model_version()
            if version != self._version:    # a module, processor or parameter changed: capture anew
                self._graphs.clear()
                self._version = version
        self.cache.adopt()
        if self.sequential_cfg or self._graphs_on:   # an instance attribute, shadowing the class's forward
            self._own_forward = self.model.__dict__.get("forward", False)
            self.model.forward = self._branch_forward if self.sequential_cfg else self._forward

    def end_image(self) -> None:
        super().end_image()
        if self.engine is not None:       # the graphs of streams the engine dropped read freed buffers
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] in self.engine.streams}
        self.cache.release()
        self._restore_forward()
        self._held = self._pair = None
        self.active = False

    def _modules_state(self) -> tuple:
        """Every module, its attention processor and the hooks on its forward (accelerate's offload,
        diffusers' caches, offloading, casting): what a pipeline can change behind parafuse's back
        between `begin_image` and a call."""
        return tuple((id(m), id(getattr(m, "processor", None)), id(m.__dict__.get("_hf_hook")),
                      tuple(map(id, diffusers_hooks(m)))) for m in self.layers.modules())

    def _check_modules(self) -> None:
        """At every denoiser call: a module or processor changed since the image's patch layers were
        swapped in (PAG installing its processors inside `__call__`, `set_attn_processor`, a LoRA
        unloaded, accelerate's or diffusers' hooks) is re-patched - checked (refused, naming it, if it
        cannot be split) and swapped - before the image's first evaluation, and refused at any later one."""
        if self.engine is None or self._modules_state() == self._patched:
            return
        if self.evaluations or self.geometry is not None:
            raise UnsupportedModelError(f"{type(self.model).__name__}'s modules or attention processors changed "
                                        f"during an image (after evaluation {self.evaluations}): parafuse plans "
                                        f"each image once; change them between pipeline calls")
        StripModel.begin_image(self)
        self.cache.adopt()
        self._patched = self._modules_state()
        if self._graphs_on:                   # the captured graphs ran the replaced modules
            self._graphs.clear()
            self._version = self._model_version()

    def _configure(self, args, kwargs, sample):
        """The trace without the residuals (`RESIDUALS`): sums that change no site. The ControlNets'
        strips must be the denoiser's."""
        super()._configure(args, without_residuals(kwargs), sample)
        # the level of the transformer blocks, whose hidden states ControlNet samples add to as tokens
        factors = {s.factor for s in self.trace.sites if s.kind == SiteKind.ATTN}
        self._token_level = self.geometry.level(factors.pop()) if len(factors) == 1 else None
        for net in self.partners:
            if net.geometry is not None and net.geometry.rows != self.geometry.rows:
                raise UnsupportedModelError(f"the ControlNet's strips {net.geometry.rows} are not the denoiser's "
                                            f"{self.geometry.rows} (their layers' resolutions differ)")

    def _strip_kwargs(self, kwargs: dict) -> dict:
        """The residuals (`RESIDUALS`: ControlNet and T2I-Adapter features the denoiser adds to its
        activations) at this strip's rows, by one rule for every tensor: one as tall as the whole
        image at its level (named by its width: strips are full-width; a token sequence [B, h*w, C]
        - Flux's and SD3's ControlNet samples - at the grid of the model's attention) is cut to this
        strip's rows there; one already the strip's (`StripControlNet`'s) is taken as is; anything
        else is refused before the evaluation. A cut is a contiguous copy, so the CUDA graphs'
        static buffers take it as any tensor argument."""
        out = dict(kwargs)
        for name in (n for n in RESIDUALS if kwargs.get(n) is not None):
            flat, spec = tree_flatten(kwargs[name])
            many = isinstance(kwargs[name], (list, tuple))
            out[name] = tree_unflatten([self._residual_strip(t, name, j if many else None)
                                        if isinstance(t, torch.Tensor) else t for j, t in enumerate(flat)], spec)
        return out

    def _residual_strip(self, t: torch.Tensor, name: str, j: int | None) -> torch.Tensor:
        i, what = self.layout.patch_index, name if j is None else f"{name}[{j}]"
        if t.dim() == 3:            # ControlNet samples (Flux's, SD3's): tokens of the blocks' grid, row-major
            level = self._token_level
            if level is None:
                raise UnsupportedModelError(f"{what} is {tuple(t.shape)}, a token sequence, but "
                                            f"{type(self.model).__name__}'s attention runs at several levels: pass "
                                            f"it as [B, C, H, W], the shape of the activations it is added to")
            top, rows, whole = (n * level.width for n in (level.offsets[i], level.rows[i], level.height))
            dim = 1
            place = f"tokens of the {level.height}x{level.width} grid at 1/{level.factor} of the latent"
        else:
            try:
                level = self.geometry.level_of_width(t.shape[-1])
            except GeometryError:
                raise UnsupportedModelError(
                    f"{what} is {tuple(t.shape)}, but its width {t.shape[-1]} is no level of the "
                    f"{self.geometry.height}x{self.geometry.width} latent: pass residuals computed for this "
                    f"image's size") from None
            top, rows, whole, dim = level.offsets[i], level.rows[i], level.height, t.dim() - 2
            place = f"rows at 1/{level.factor} of the latent"
        if t.shape[dim] == rows:
            return t
        if t.shape[dim] == whole:
            return t.narrow(dim, top, rows).contiguous()
        raise UnsupportedModelError(f"{what} is {tuple(t.shape)}: {t.shape[dim]} {place}, neither the whole image's "
                                    f"{whole} nor strip {i}'s {rows}: pass residuals of the whole image (parafuse cuts "
                                    f"them) computed for this image's size")

    def _restore_forward(self) -> None:
        """The model's forward as it was before `begin_image` shadowed it (an OptimizedModule keeps
        its compiled forward as an instance attribute)."""
        if self._own_forward is not None:
            if self._own_forward is False:
                self.model.__dict__.pop("forward", None)
            else:
                self.model.forward = self._own_forward
            self._own_forward = None

    def remove(self) -> None:
        self._restore_forward()
        self.cache.release()
        self.freeu.remove()
        super().remove()

    def _outside_call(self) -> None:
        """The denoiser called outside the parallel pipeline's call. By a diffusers pipeline (the raw
        one, after `pipe = pipe.pipe` or another pipeline built from its components): refused, since
        its ranks would each return an image from state left by the last call. By the user directly:
        the call is an image of its own (planned, its first step synchronous, drained after)."""
        from diffusers import DiffusionPipeline

        frame = sys._getframe(2)
        while frame is not None:
            caller = frame.f_locals.get("self")
            if isinstance(caller, DiffusionPipeline):
                raise UnsupportedModelError(
                    f"{type(caller).__name__} called the parallelized {type(self.model).__name__} directly: call the "
                    f"pipeline parafuse.parallelize returned (`.to()` on it returns it too), which runs each "
                    f"image's plan on every rank")
            frame = frame.f_back
        self.begin_image()
        self._direct = True

    def _model_version(self) -> tuple:
        """What a captured graph depends on besides its inputs: every module and attention processor
        (a LoRA loaded or unloaded, a processor swapped), the Python numbers a graph holds - an
        IP-Adapter processor's scale (`set_ip_adapter_scale`), an up block's FreeU scales
        (`enable_freeu`, `disable_freeu`) - and every parameter's storage (`.to()`, a weight
        replaced)."""
        return (tuple((name, id(m), id(processor), repr(getattr(inner_processor(processor), "scale", None)),
                       freeu_scales(m))
                      for name, m in self.model.named_modules() for processor in [getattr(m, "processor", None)]),
                tuple(p.data_ptr() for p in self.model.parameters()))

    def _forward(self, *args, **kwargs):
        """The model's own forward on this rank's inputs, replayed from a CUDA graph in the steady
        state (every step of a serial or `sync` run; the stale steps after warmup otherwise). Every
        tensor argument - latents, timestep, prompt embeddings, added conditions, guidance, ids,
        ControlNet residuals, IP-Adapter masks, image-prompt embeddings (nested in
        cross_attention_kwargs / joint_attention_kwargs: every container is flattened) - is copied
        into its static buffer before a replay; a call whose other arguments or tensor shapes differ
        has a graph of its own, and so has each stream (a call of a step's own kind: `StripModel`),
        whose graph reads its stream's exchange buffers."""
        forward = type(self.model).forward
        engine = self.engine
        if not self._graphs_on or self.tracing or (engine is not None and engine.step is not engine.plan.stale_step):
            return forward(self.model, *args, **kwargs)
        if engine is not None and engine.buffers is not self._buffers.get(self.stream):
            # the stream's buffers were reallocated: its graphs read the old ones
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] != self.stream}
            self._buffers[self.stream] = engine.buffers
        flat, spec = tree_flatten((args, kwargs))
        where = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
        key = (self.stream, str(spec), tuple(repr(a) for a in flat if not isinstance(a, torch.Tensor)),
               tuple((flat[i].shape, flat[i].dtype, flat[i].device) for i in where))
        graphs = self._graphs.get(key)
        if graphs is None:
            def evaluate(*tensors):
                leaves = list(flat)
                for i, t in zip(where, tensors):
                    leaves[i] = t
                a, k = tree_unflatten(leaves, spec)
                return forward(self.model, *a, **k)
            graphs = self._graphs[key] = self.session.graphs(evaluate, always=True)
        return graphs(engine.step.name if engine is not None else "serial", *(flat[i] for i in where))

    @property
    def captures(self) -> int:
        """Graphs captured since the model last changed (tests, reports)."""
        return sum(g.captures for g in self._graphs.values())

    def _before(self, module, args, kwargs):
        if self.tracing:
            return None
        if not self.active:
            self._outside_call()
        self._check_modules()
        self.cache.check_context()
        kwargs = text_mask_to_attention(self.layers, listed_ip_masks(kwargs, self._sample(args, kwargs).device))
        if self.sequential_cfg:
            branch = self._calls % 2                  # the pipeline's order: conditional, then unconditional
            self._calls += 1
            sample = self._sample(args, kwargs)
            # the same latents: the same tensor, unchanged, in the same scheduler step (compared on the host;
            # diffusers' true-CFG pipelines pass one tensor to both calls)
            mark = (sample, sample._version, self.steps_taken)
            if branch == 0:
                self._pair = mark
            elif mark[0] is not self._pair[0] or mark[1:] != self._pair[1:]:
                raise UnsupportedModelError("cfg_parallel with a pipeline that calls the denoiser once per guidance "
                                            "branch needs the two calls of a step on the same latents tensor, "
                                            "conditional first (as FluxPipeline's true CFG): this pipeline's calls "
                                            "are not")
            self._skip = branch != self.layout.branch
            if self._skip:                            # (the shape-only run of `_output_shape` takes these)
                return args, kwargs
        elif self.layout.cfg_degree == 2:
            args, kwargs = self._branch_half(args, kwargs, "denoiser")
        return super()._before(module, args, kwargs) or (args, kwargs)

    def _branch_forward(self, *args, **kwargs):
        """The model's forward, or - at the other branch's call - that branch's output (see the class
        docstring), in the form the caller asked for."""
        if not self._skip:
            return self._forward(*args, **kwargs)
        if self.layout.branch == 1:               # the conditional call: filled in place at the next call
            shape, dtype = self._output_shape(args, kwargs)
            out = self._held = torch.empty(shape, dtype=dtype, device=self._sample(args, kwargs).device)
        else:                                     # the unconditional call: swap with the peer's output
            out = torch.empty_like(self._held)
            self.transport.start([(self._held, self.layout.cfg_peer)], [(out, self.layout.cfg_peer)], "cfg").wait()
        if not kwargs.get("return_dict", True):
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=out)

    def _output_shape(self, args, kwargs) -> tuple[tuple[int, ...], torch.dtype]:
        """The model's output shape for these arguments, from a shape-only run (once per input size)
        without the residuals (`RESIDUALS`): sums that change no shape, and strips where a split
        ControlNet made them (Flux's ControlNet with true CFG and cfg_parallel), which the whole
        input of this run could not take."""
        size = tuple(self._sample(args, kwargs).shape)
        if size not in self._shapes:
            from torch._subclasses.fake_tensor import FakeTensorMode

            saved = self.engine.step if self.engine is not None else None
            if self.engine is not None:
                self.engine.step = LOCAL
            self.adapter.tracing = True
            try:
                with FakeTensorMode(allow_non_fake_inputs=True), eager(self.model) as model, \
                        self.adapter.shape_run(model):
                    out = type(model).forward(model, *args, **{**without_residuals(kwargs), "return_dict": False})[0]
            finally:
                self.adapter.tracing = False
                if self.engine is not None:
                    self.engine.step = saved
            self._shapes[size] = (tuple(out.shape), out.dtype)
        return self._shapes[size]

    def _begin_evaluation(self) -> None:
        super()._begin_evaluation()
        self.clock.start()

    def _after(self, module, args, kwargs, output):
        if self.tracing or (self.sequential_cfg and self._skip):
            return None
        output = super()._after(module, args, kwargs, output)
        self.clock.stop()
        if self.engine is not None:     # this evaluation's exchanged GroupNorm statistics: overflow at N > 1
            self.engine.check_statistics()
        k = self.evaluations - 1
        out = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, tuple) \
            else next(iter(output.values()))
        self.watch.observe(k, out)         # device work only; the flags are read every CHECK_EVERY evaluations
        if self.watch.due(k):
            self.watch.check()
        if self._direct:
            self._direct = False
            self.finish()
            self.end_image()
        return output

    def finish(self) -> None:
        """After the pipeline's call: the last evaluations' non-finite flags, agreed by every rank
        (the same NonFiniteError everywhere, before any rank returns an image)."""
        if self.evaluations:
            self.watch.check()
        if self.engine is not None:
            self.state_bytes = self.engine.state_bytes()

    def check_fits(self, plan: PatchPlan, sample: torch.Tensor) -> None:
        """Refuse an image whose strip cannot fit, before its first evaluation: the exchange buffers
        and an activation floor of the plan, and the pipeline's whole latents (every rank runs the
        scheduler on the whole latent: the latent, the gathered output, the scheduler's state)."""
        whole = sample.numel() * sample.element_size() * (2 if self.layout.cfg_degree == 2 else 1)
        check_strip_memory(plan, self.session.device, 4 * whole, f"{type(self.model).__name__} at "
                           f"{plan.geometry.height}x{plan.geometry.width} latent")

    def _gather(self, out: torch.Tensor) -> torch.Tensor:
        out = super()._gather(out)
        if self.sequential_cfg:
            if self.layout.branch == 0:           # the conditional output, kept for the swap at the next call
                self._held = out
            else:                                 # fill the conditional output returned at the last call
                self.transport.start([(out, self.layout.cfg_peer)], [(self._held, self.layout.cfg_peer)], "cfg").wait()
            return out
        if self.layout.cfg_degree == 2:
            other = torch.empty_like(out)
            self.transport.start([(out, self.layout.cfg_peer)], [(other, self.layout.cfg_peer)], "cfg").wait()
            out = torch.cat([out, other] if self.layout.branch == 0 else [other, out])
        return out


def downsampling(module: nn.Module) -> int:
    """Input rows per output row of `module`: the product of its convs' row strides."""
    return math.prod(m.stride[0] for m in module.modules() if isinstance(m, nn.Conv2d))


class StripVAE(StripModel):
    """A VAE's encoder (`pipe.vae.encoder`) or decoder (`pipe.vae.decoder`) computing this rank's
    rows, always synchronous (one pass, equal to the plain model); every call is a new image. The
    strips are the same at either end: the trace's levels run from the image (factor 1) to the
    latent (the VAE's factor, the unit), so a strip's image rows are its latent rows times the
    factor. `gather_to`: the encoder's output on every strip (None: every rank samples the latent
    and runs the scheduler on the whole of it), the decoder's image on strip 0 (the other strips get
    zeros of its shape, which their pipeline discards)."""

    def __init__(self, model: nn.Module, session: PatchSession, adapter: DiffusersAdapter, gather_to: int | None,
                 caller: tuple[nn.Module, str] | None = None):
        super().__init__(model, session, adapter)
        self.gather_to = gather_to
        self.factor = downsampling(model)          # the encoder's; 1 for the decoder, which upsamples
        self.caller = caller                       # (the VAE, its method that runs this part)

    def compiled(self) -> bool:
        """Also where the VAE's method that runs this part is compiled on its own, as users compile
        the decoder: `pipe.vae.decode = torch.compile(pipe.vae.decode)`."""
        if self.caller is None:
            return super().compiled()
        vae, method = self.caller
        # torch.compile(fn) returns a wrapper that carries the function it compiles
        return super().compiled() or hasattr(getattr(vae, method, None), "_torchdynamo_orig_callable")

    def _before(self, module, args, kwargs):
        if not self.tracing:
            self.begin_image()
        return super()._before(module, args, kwargs)

    def _configure(self, args, kwargs, sample):
        """An input whose size is not a multiple of the model's downsampling is refused before the
        trace: its strided convs would pad rows that a strip cannot see."""
        if sample.shape[-2] % self.factor or sample.shape[-1] % self.factor:
            raise GeometryError(f"the VAE {type(self.layers).__name__.lower()} was given a {sample.shape[-2]}x"
                                f"{sample.shape[-1]} image, not a multiple of its downsampling factor {self.factor}: "
                                f"resize or crop it to a multiple of {self.factor}")
        super()._configure(args, kwargs, sample)

    def _after(self, module, args, kwargs, output):
        """The whole output, and the whole-image K/V of the mid-block's attention freed: a VAE call
        is one pass, and the encoder's would otherwise stay allocated through the denoising."""
        output = super()._after(module, args, kwargs, output)
        if self.engine is not None and not self.tracing:
            self.engine.scratch.clear()
        return output


# the residuals a denoiser call adds to its activations: a ControlNet's, to the U-Net and to Flux's
# and SD3's transformers, and a T2I-Adapter's, to the U-Net (`StripDenoiser._strip_kwargs`)
RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals",
             "controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states")


def without_residuals(kwargs: dict) -> dict:
    """A denoiser call's arguments with its residuals (`RESIDUALS`) None, for the shape-only runs."""
    return {k: None if k in RESIDUALS else v for k, v in kwargs.items()}


# where a ControlNet embeds a conditioning image (its convs, from the pixels down to the latent's
# rows): SD/SDXL's ControlNetModel, and Flux's XLabs-style ControlNet, whose embedding's output is
# then packed into the latent's tokens
IMAGE_EMBEDDINGS = ("controlnet_cond_embedding", "input_hint_block")
# where a ControlNet embeds a conditioning latent of its sample's grid, row for row (`StripControlNet`):
# Flux's other ControlNets (a linear layer on latent tokens), SD3's (a patch embedding, no positions)
LATENT_EMBEDDINGS = ("controlnet_x_embedder", "pos_embed_input")


def image_embedding(net: nn.Module) -> str | None:
    """The attribute naming `net`'s conditioning-image embedding (`IMAGE_EMBEDDINGS`), None if it has none."""
    return next((name for name in IMAGE_EMBEDDINGS if getattr(net, name, None) is not None), None)


def latent_embedding(net: nn.Module) -> str | None:
    """The attribute naming `net`'s conditioning-latent embedding (`LATENT_EMBEDDINGS`), None if it has none."""
    return next((name for name in LATENT_EMBEDDINGS if getattr(net, name, None) is not None), None)


class ControlNetAdapter(DiffusersAdapter):
    """The diffusers adapter, less the conditioning embedding: its convs run at the conditioning
    image's resolution (the VAE's factor finer than the latent), plain, on a slice of the image with
    a halo wide enough for their reach (`StripControlNet`)."""

    def __init__(self, embedding: nn.Module, owner: str):
        super().__init__(owner)
        self.skip = {id(m) for m in embedding.modules()}

    def site_kind(self, module: nn.Module) -> SiteKind | None:
        return None if id(module) in self.skip else super().site_kind(module)


class _EmbeddingShape(nn.Module):
    """The conditioning embedding during the shape trace: zeros of its output's shape (`grid`: the
    latent's, or Flux's token grid times its packing), so that the trace sees only the layers of the
    latent's resolution."""

    def __init__(self, channels: int, grid: tuple[int, int]):
        super().__init__()
        self.channels, self.grid = channels, grid

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return cond.new_zeros(cond.shape[0], self.channels, *self.grid)


class StripControlNet(StripModel):
    """A ControlNet (`pipe.controlnet`, or each net of a MultiControlNetModel) computing this rank's
    strip with its own patch layers and plan (its own session on the denoiser's transport, the
    denoiser's settings): the latent's rows in, as for the denoiser; its conditioning cut to the
    strip, and its residuals left as strips - exactly what the denoiser's strip adds
    (`down_block_additional_residuals`, `mid_block_additional_residual`, Flux's
    `controlnet_block_samples`, SD3's `block_controlnet_hidden_states`: tensor arguments of the
    denoiser call, so they enter the CUDA graphs' static buffers). With cfg_parallel (`halve`), the
    ControlNet computes this rank's guidance branch, as the denoiser does: its residuals are that
    branch's half, which the denoiser's strip takes as they are. A pipeline that calls the denoiser
    once per branch (FluxControlNetPipeline's true CFG) calls the ControlNet once a step, on the
    conditional inputs, and gives its samples to both calls: every rank's ControlNet computes that
    call on its strip (both branches' ranks the same), unhalved.

    The conditioning is either an image through an embedding (`image_embedding`: SD/SDXL's, and
    Flux's input_hint_block, whose output diffusers packs patch_size x patch_size into each token):
    the embedding runs plain on the image's rows of the strip plus a halo covering its convs' reach,
    and the halo rows are cropped from its output (`_cond_in`, `_cond_out`); or it is a latent of
    the sample's grid (`latent_cond`: Flux's tokens, SD3's [B, C, H, W] latent of the control image,
    patch-embedded like the sample), cut to the strip as the sample is (`_strip_of`)."""

    halve = False

    def __init__(self, model: nn.Module, session: PatchSession, owner: str):
        self.embedding_name = image_embedding(model)
        self.latent_cond = self.embedding_name is None
        if self.latent_cond:
            super().__init__(model, session, DiffusersAdapter(owner))
            return
        embedding = getattr(model, self.embedding_name)
        super().__init__(model, session, ControlNetAdapter(embedding, owner))
        convs = [m for m in embedding.modules() if isinstance(m, nn.Conv2d)]
        self.factor = downsampling(embedding)
        reach, stride = 0, 1           # the embedding's reach in image rows, below its output's rows
        for c in convs:
            reach += (c.kernel_size[0] // 2) * c.dilation[0] * stride
            stride *= c.stride[0]
        self.halo = -(-reach // self.factor) + 1                  # in the embedding's output rows
        self.packing = 1               # the embedding's output rows a row of the strips' grid packs
        self._crop = None
        self._handles += [embedding.register_forward_pre_hook(torch.compiler.disable(self._cond_in)),
                          embedding.register_forward_hook(torch.compiler.disable(self._cond_out))]

    def begin_image(self, halve: bool = False) -> None:
        """`halve`: the pipeline calls the ControlNet with the whole CFG batch (both guidance
        branches), of which this rank computes its branch's half."""
        super().begin_image()
        self.halve = halve

    def _before(self, module, args, kwargs):
        """The guidance branch's half of the batch (`halve`), then the strip's rows; a conditioning
        latent (`latent_cond`) of the sample's grid, cut to the strip's as the sample is."""
        if self.halve and not self.tracing:
            args, kwargs = self._branch_half(args, kwargs, "ControlNet")
        out = super()._before(module, args, kwargs)
        if not self.latent_cond or out is None or self.engine is None:
            return out
        args, kwargs = out
        return args, {**kwargs, "controlnet_cond": self._strip_of(kwargs["controlnet_cond"])}

    def _configure(self, args, kwargs, sample):
        """The trace with the embedding's output shape in place of the embedding (`_EmbeddingShape`);
        a token grid's row packs patch_size of the embedding's rows (diffusers' reshape in Flux's
        ControlNet forward)."""
        if self.latent_cond:
            return super()._configure(args, kwargs, sample)
        (grid, *_), tokens = self._grid(kwargs, sample)
        self.packing = self.layers.config.patch_size if tokens else 1
        embedding = getattr(self.layers, self.embedding_name)
        channels = [m for m in embedding.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.layers._modules[self.embedding_name] = _EmbeddingShape(channels, (grid[0] * self.packing,
                                                                               grid[1] * self.packing))
        try:
            super()._configure(args, kwargs, sample)
        finally:
            self.layers._modules[self.embedding_name] = embedding

    def _cond_in(self, module, args):
        """The image's rows of this strip plus the halo, at whole output rows of the embedding (a
        multiple of its stride, so the strided convs sample the rows they sample on the whole image)."""
        if self.tracing or self.engine is None:
            return None
        cond = args[0]
        level, p, f = self.geometry.level(1), self.packing, self.factor
        height, width = level.height * p, self.geometry.width * p          # the embedding's output
        if cond.shape[-2] != height * f or cond.shape[-1] != width * f:
            grid = "token grid's" if self._tokens else "latent's"
            raise UnsupportedModelError(f"the ControlNet's conditioning image is {tuple(cond.shape[-2:])}, not the "
                                        f"{grid} {level.height}x{self.geometry.width} times {p * f}")
        i = self.layout.patch_index
        top, rows = level.offsets[i] * p, level.rows[i] * p
        start, end = max(0, top - self.halo), min(height, top + rows + self.halo)
        self._crop = (top - start, rows)
        return (cond[..., start * f: end * f, :].contiguous(),) + tuple(args[1:])

    def _cond_out(self, module, args, out):
        if self.tracing or self.engine is None:
            return None
        skip, rows = self._crop
        return out[..., skip: skip + rows, :]

    def _after(self, module, args, kwargs, output):
        return None                   # the residuals stay strips: the denoiser's strip adds them
