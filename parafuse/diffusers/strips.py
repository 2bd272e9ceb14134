"""A diffusers denoiser (`pipe.unet` / `pipe.transformer`) that runs on this rank's strip.

The pipeline keeps calling its denoiser with the whole latent; two hooks on the denoiser do the rest:

    before   at the first call of an image, a shape-only trace of the plain model with the
             pipeline's own arguments (FakeTensor: no memory, no compute) lists the parallel sites
             and the model's downsample unit, and fixes the patch plan for this geometry; every
             call then starts an engine step and hands the model this rank's rows of the latent
             (and, with CFG parallel, this rank's half of the batch)
    after    the strips of the model output are gathered on every rank (kind `gather`; the CFG
             halves are swapped with the peer, kind `cfg`), so the pipeline gets the whole output

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

import torch
import torch.nn as nn

from parafuse.diffusers.adapter import DiffusersAdapter, UnsupportedModelError, is_joint
from parafuse.parallel.distributed import ParallelLayout
from parafuse.parallel.engine import ExchangeEngine
from parafuse.parallel.geometry import StripGeometry, conv_halo
from parafuse.parallel.parallelize import parallelize as swap_layers
from parafuse.parallel.plan import LOCAL, PatchPlan, Site
from parafuse.parallel.transport import Transport


def trace_sites(model: nn.Module, adapter: DiffusersAdapter, args: tuple, kwargs: dict,
                sample: torch.Tensor) -> tuple[list[Site], int]:
    """The parallel sites of `model` called as `model(*args, **kwargs)` on the whole latent `sample`
    [B, C, H, W], and the model's unit (the latent rows of one row at its coarsest level), from one
    shape-only trace. A self-attention whose tokens are not a grid of the latent is refused."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    height, width = sample.shape[-2:]
    sites: dict[str, Site] = {}
    factors = {1}

    def factor(name: str, module: nn.Module, positions: int) -> int:
        f = round(math.sqrt(height * width / positions))
        if f < 1 or f * f * positions != height * width or height % f or width % f:
            raise UnsupportedModelError(f"parafuse cannot parallelise module {name!r} ({type(module).__name__}): it "
                                        f"sees {positions} positions, not a grid of the {height}x{width} latent")
        factors.add(f)
        return f

    def hook(name: str, kind: str | None):
        def fn(mod, args, kwargs, out):
            if name in sites:
                return
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(mod, nn.Conv2d):
                factors.add(width // out.shape[-1])
            if kind == "conv":
                top, bottom = conv_halo(mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0])
                sites[name] = Site(name, "conv", width // x.shape[-1], mod.in_channels, top=top, bottom=bottom,
                                   first=x is sample)
            elif kind == "norm":
                sites[name] = Site(name, "norm", factor(name, mod, math.prod(x.shape[2:])), mod.num_channels,
                                   groups=mod.num_groups)
            elif kind == "attn":
                context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                if context is None or is_joint(mod):          # joint attention: hidden_states are the image
                    tokens = x.shape[1] if x.ndim == 3 else x.shape[2] * x.shape[3]
                    sites[name] = Site(name, "attn", factor(name, mod, tokens), mod.inner_kv_dim)   # to_k may be wrapped (LoRA)
            elif kind == "positions":
                sites[name] = Site(name, "positions", factor(name, mod, out.shape[1]))
        return fn

    handles = []
    for name, m in model.named_modules():
        kind = adapter.site_kind(m)
        if kind is not None or isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(hook(name, kind), with_kwargs=True))
    adapter.tracing = True
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model(*args, **kwargs)
    finally:
        adapter.tracing = False
        for h in handles:
            h.remove()
    return list(sites.values()), math.lcm(*factors)


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


class StripDenoiser:
    """Hooks that make a diffusers denoiser compute this rank's strip (see the module docstring)."""

    def __init__(self, model: nn.Module, engine: ExchangeEngine | None, adapter: DiffusersAdapter,
                 layout: ParallelLayout, transport: Transport):
        self.model, self.engine, self.adapter = model, engine, adapter
        self.layout, self.transport = layout, transport
        self.sample_name = next(iter(inspect.signature(model.forward).parameters))
        self._sites: dict[tuple[int, int], tuple[list[Site], int]] = {}   # per latent size
        self._structure = None
        self.geometry: StripGeometry | None = None
        self.evaluations = 0
        self.tracing = False
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def begin_image(self) -> None:
        """Before each pipeline call: swap in layers for modules added since (LoRA), forget the sites
        if the model's structure changed, and start counting evaluations from 0."""
        if self.engine is not None:
            self.adapter.check(self.model)
            swap_layers(self.model, self.engine, self.adapter)
            structure = tuple((name, id(m)) for name, m in self.model.named_modules())
            if structure != self._structure:
                self.adapter.rekey(self.model)
                self._sites.clear()
                self._structure = structure
        self.geometry = None
        self.evaluations = 0
        if self.transport is not None:
            self.transport.reset_counts()

    def end_image(self) -> None:
        if self.engine is not None:
            self.engine.drain()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    # ---- hooks ---------------------------------------------------------------------------------
    def _sample(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs[self.sample_name]

    def _with_sample(self, args: tuple, kwargs: dict, sample: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (sample,) + tuple(args[1:]), kwargs
        return args, {**kwargs, self.sample_name: sample}

    def _before(self, module, args, kwargs):
        if self.tracing:
            return None
        if self.layout.cfg_degree == 2:
            batch = self._sample(args, kwargs).shape[0]
            if batch % 2:
                raise UnsupportedModelError(f"cfg_parallel splits the two guidance branches of the denoiser's batch, "
                                            f"but the pipeline called it with batch {batch}: use guidance_scale > 1")
            args, kwargs = _batch_half((args, kwargs), batch, self.layout.branch)
        if self.engine is None:
            return args, kwargs
        sample = self._sample(args, kwargs)
        if self.geometry is None:
            self._configure(args, kwargs, sample)
        elif (sample.shape[-2:] != (self.geometry.height, self.geometry.width)
              or sample.shape[0] != self.engine.plan.batch):
            raise UnsupportedModelError(
                f"the denoiser was called with a {tuple(sample.shape)} latent inside an image planned for batch "
                f"{self.engine.plan.batch} at {self.geometry.height}x{self.geometry.width}: parafuse plans one "
                f"geometry per pipeline call")
        self.engine.begin_step(self.evaluations)
        self.evaluations += 1
        top, bottom = self.geometry.row_range(self.layout.patch_index)
        return self._with_sample(args, kwargs, sample[:, :, top:bottom].contiguous())

    def _configure(self, args: tuple, kwargs: dict, sample: torch.Tensor) -> None:
        """The patch plan of this image's geometry, from the sites of a shape trace (once per size)."""
        size = tuple(sample.shape[-2:])
        if size not in self._sites:
            saved, self.engine.step = self.engine.step, LOCAL      # the patch layers run as plain layers
            self.tracing = True
            try:
                self._sites[size] = trace_sites(self.model, self.adapter, args, kwargs, sample)
            finally:
                self.tracing, self.engine.step = False, saved
        sites, unit = self._sites[size]
        geometry = StripGeometry(size[0], size[1], self.layout.patch_degree, unit)
        for s in sites:
            if s.kind == "conv":
                geometry.check_halo(s.factor, s.top, s.bottom, f"conv {s.key}")
        dtype = next(self.model.parameters()).dtype
        self.engine.configure(PatchPlan(sites, geometry, self.layout.patch_index, sample.shape[0], dtype,
                                        self.engine.settings), sample.device)
        self.geometry = geometry

    def _after(self, module, args, kwargs, output):
        if self.tracing:
            return None
        out = output[0] if isinstance(output, tuple) else next(iter(output.values()))
        if self.engine is not None:
            out = self.engine.gather_rows(out, 2, self.geometry.rows, dst=None, kind="gather")
        if self.layout.cfg_degree == 2:
            other = torch.empty_like(out)
            self.transport.start([(out, self.layout.cfg_peer)], [(other, self.layout.cfg_peer)], "cfg").wait()
            out = torch.cat([out, other] if self.layout.branch == 0 else [other, out])
        if isinstance(output, tuple):
            return (out,) + tuple(output[1:])
        output[next(iter(output.keys()))] = out
        return output
