"""The one shape trace of a model: its parallel sites, read from one call without computing it.

    trace = trace_model(model, adapter, args, kwargs, sample, grid, others)
    trace.sites    # every conv with a halo, GroupNorm, self-attention and grid position embedding
    trace.unit     # rows of the finest grid per row at the model's coarsest level
    trace.affine   # FLOPs of every conv and linear layer at this size (parafuse.profile extrapolates)

The model is called once as `model(*args, **kwargs)` under FakeTensor (no memory, no compute) on
its whole input `sample` (an image [B, C, H, W], or tokens [B, H*W, C] of the grid `grid`, followed
by the tokens of the grids `others` where the sequence holds several: Flux Kontext's), with
forward hooks on the modules its adapter names. Each site's level comes from how many positions it
sees against the finest grid the model computes on (the input for a denoiser; the image for a VAE
decoder, which upsamples). A torch-function mode records who reads each GroupNorm's output: where
a SiLU is the only reader, the site says so (`Site.silu`) and the Triton kernels apply it.

Both front doors use it: `parafuse.profile.ModelProfile` for the built-in models (the trace at two
sizes, for FLOPs too) and the diffusers hooks (`parafuse.diffusers.strips`) with the pipeline's own
arguments. What differs by model family - which attention is a site, its tokens and width, how a
position embedding counts positions - the adapter answers (`parafuse.parallel.adapter`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from parafuse.parallel.geometry import conv_halo
from parafuse.parallel.plan import Site, SiteKind

# calls that read only a tensor's metadata, not its values
_METADATA = {"size", "dim", "shape", "dtype", "device", "__get__", "is_contiguous", "stride", "numel"}


@dataclass(frozen=True)
class Trace:
    sites: list[Site]      # in forward order
    unit: int              # rows of the finest grid per row at the model's coarsest level
    height: int            # the finest grid the model computes on
    width: int
    affine: dict = field(default_factory=dict)      # module -> FLOPs of a conv or linear layer
    attention: dict = field(default_factory=dict)   # module -> (FLOPs, self-attention?) where the adapter counts them
    others: tuple = ()     # the sequence's further grids (height, width), at the finest grid's scale


def _value_readers(readers: dict):
    """A torch-function mode that records, for every tensor registered in `readers` (id -> list),
    the functions that read its values."""
    from torch.overrides import TorchFunctionMode

    class Readers(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") not in _METADATA:
                for a in list(args) + list(kwargs.values()):
                    for t in (a if isinstance(a, (list, tuple)) else [a]):
                        if isinstance(t, torch.Tensor) and id(t) in readers:
                            readers[id(t)].append(func)
            return func(*args, **kwargs)
    return Readers()


def trace_model(model: nn.Module, adapter, args: tuple, kwargs: dict, sample: torch.Tensor,
                grid: tuple[int, int], others: tuple[tuple[int, int], ...] = ()) -> Trace:
    """See the module docstring. A module whose positions are not a grid of the model's is refused
    (`adapter.refuse`). An attention site's level is that of the first grid's positions
    (`adapter.attention_site`, told every grid)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen: dict[str, tuple] = {}        # name -> (kind, module, positions, reads the input, attention fields)
    widths = {grid[1]}
    affine, attention = {}, {}
    norm_outputs, readers = {}, {}     # GroupNorm name -> output (kept alive: ids stay unique), its readers

    def hook(name: str, kind: SiteKind | None):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(mod, nn.Conv2d):
                widths.update((x.shape[-1], out.shape[-1]))
                affine[name] = 2 * out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
            elif isinstance(mod, nn.Linear):
                affine[name] = 2 * out.numel() * mod.in_features
            flops = adapter.attention_flops(mod, args, kwargs, x)
            if flops is not None:
                attention[name] = flops
            if name in seen or kind is None:
                return
            if kind in (SiteKind.CONV, SiteKind.NORM):
                seen[name] = (kind, mod, math.prod(x.shape[2:]), x is sample, {})
                if kind == SiteKind.NORM:
                    norm_outputs[name] = out
                    readers[id(out)] = []
            elif kind == SiteKind.ATTN:
                fields = adapter.attention_site(mod, args, kwargs, x, (grid,) + tuple(others))
                if fields is not None:
                    positions = fields.pop("positions")
                    seen[name] = (kind, mod, positions, False, fields)
            elif kind == SiteKind.POSITIONS:
                seen[name] = (kind, mod, adapter.grid_positions(mod, args, out), False, {})
            # SiteKind.DOWNSAMPLE is a layer to swap, not a site: its conv is the site
        return fn

    handles = []
    for name, m in model.named_modules():
        kind = adapter.site_kind(m)
        if kind is not None or isinstance(m, (nn.Conv2d, nn.Linear)) or adapter.counts_flops(m):
            handles.append(m.register_forward_hook(hook(name, kind), with_kwargs=True))
    adapter.tracing = True
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), adapter.shape_run(model), _value_readers(readers):
            model(*args, **kwargs)
    finally:
        adapter.tracing = False
        for h in handles:
            h.remove()

    width = max(widths)
    height = grid[0] * width // grid[1]
    factors = {width // w for w in widths}

    def factor(name: str, module: nn.Module, positions: int) -> int:
        f = round(math.sqrt(height * width / positions))
        if f < 1 or f * f * positions != height * width or height % f or width % f:
            raise adapter.refuse(name, module, f"it sees {positions} positions, not a grid of the {height}x{width} "
                                               f"latent")
        factors.add(f)
        return f

    sites = []
    for name, (kind, mod, positions, first, fields) in seen.items():
        f = factor(name, mod, positions)
        if kind == SiteKind.CONV:
            top, bottom = conv_halo(mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0])
            sites.append(Site(name, SiteKind.CONV, f, mod.in_channels, top=top, bottom=bottom, first=first))
        elif kind == SiteKind.NORM:
            silu = readers[id(norm_outputs[name])] == [F.silu]     # SiLU the only reader: the norm may apply it
            sites.append(Site(name, SiteKind.NORM, f, mod.num_channels, groups=mod.num_groups, silu=silu))
        elif kind == SiteKind.ATTN:
            sites.append(Site(name, SiteKind.ATTN, f, **fields))
        else:
            sites.append(Site(name, SiteKind.POSITIONS, f))
    return Trace(sites, math.lcm(*factors), height, width, affine, attention,
                 tuple((h * width // grid[1], w * width // grid[1]) for h, w in others))

