"""What a model does at a resolution, read from its layer shapes without running it.

One shape-only trace (FakeTensor: no memory, no compute) at two small resolutions, on the model's
own device and dtype, gives
- the model's parallel sites (`parafuse.parallel.plan.Site`): every conv with a halo, GroupNorm
  and self-attention, with the resolution level it runs at, its channels and halo rows, and which
  conv reads the model input, and which GroupNorms have a SiLU as the only reader of their output
  (recorded by a torch-function mode during the trace) - what a patch plan is built from;
- a FLOP count that extrapolates exactly to any resolution: conv/linear FLOPs are affine in the
  pixel count, self-attention's quadratic.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from parafuse.models.layers import Attention
from parafuse.parallel.adapter import BUILTIN
from parafuse.parallel.geometry import StripGeometry, conv_halo
from parafuse.parallel.plan import Site


# calls that read only a tensor's metadata, not its values
_METADATA = {"size", "dim", "shape", "dtype", "device", "__get__", "is_contiguous", "stride", "numel"}


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


def _trace(model: nn.Module, channels: int, height: int, width: int, call_kwargs: dict, adapter):
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = next(model.parameters())
    sites, affine, attn = {}, {}, {}
    model_input = []
    norm_outputs, readers = {}, {}        # GroupNorm name -> output (kept alive: ids stay unique), readers

    def hook(name):
        def fn(mod, args, kwargs, out):
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                macs = out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
                affine[name] = 2 * macs
            elif isinstance(mod, nn.Linear):
                affine[name] = 2 * out.numel() * mod.in_features
            elif isinstance(mod, Attention):
                ctx = kwargs.get("context", args[1] if len(args) > 1 else None)
                lk = x.shape[1] if ctx is None else ctx.shape[1]
                attn[name] = (4 * x.shape[0] * x.shape[1] * lk * x.shape[2], ctx is None)
            kind = adapter.site_kind(mod)
            if kind == "conv":
                top, bottom = conv_halo(mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0])
                sites[name] = Site(name, "conv", width // x.shape[-1], mod.in_channels, top=top, bottom=bottom,
                                   first=x is model_input[0])
            elif kind == "norm":
                sites[name] = Site(name, "norm", width // x.shape[-1], mod.num_channels, groups=mod.num_groups)
                norm_outputs[name] = out
                readers[id(out)] = []
            elif kind == "attn":
                factor = round(math.sqrt(height * width / x.shape[1]))
                sites[name] = Site(name, "attn", factor, x.shape[-1])
            elif kind == "positions":
                sites[name] = Site(name, "positions", width // args[1])
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, Attention)) or adapter.site_kind(m) is not None]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), _value_readers(readers):
            # the input lives where the model lives: a CPU input for a CUDA (or meta) model fails
            model_input.append(torch.empty(1, channels, height, width, device=p.device, dtype=p.dtype))
            model(model_input[0], 500.0, **call_kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, out in norm_outputs.items():     # SiLU the only reader: the norm may apply it (fused kernels)
        if readers[id(out)] == [F.silu]:
            sites[name] = dataclasses.replace(sites[name], silu=True)
    return list(sites.values()), affine, attn


@dataclass
class ModelProfile:
    sites: list[Site]                                 # in forward order
    flops_const: float
    flops_linear: float                               # per latent pixel
    flops_quadratic: float                            # per latent pixel squared (self-attention)

    @classmethod
    def trace(cls, model: nn.Module, channels: int, unit: int, call_kwargs: dict | None = None,
              adapter=BUILTIN) -> "ModelProfile":
        call_kwargs = call_kwargs or {}
        h1, w1 = 2 * unit, 2 * unit
        h2, w2 = 4 * unit, 2 * unit
        sites, aff1, att1 = _trace(model, channels, h1, w1, call_kwargs, adapter)
        _, aff2, att2 = _trace(model, channels, h2, w2, call_kwargs, adapter)
        a1, a2 = h1 * w1, h2 * w2
        lin = sum(aff2.values()) - sum(aff1.values())
        const = sum(aff1.values()) - lin * a1 / (a2 - a1)
        quad, lin_attn = 0.0, 0.0
        for name, (f1, is_self) in att1.items():
            if is_self:
                quad += f1 / a1 ** 2
            else:
                lin_attn += f1 / a1
        return cls(sites, const, lin / (a2 - a1) + lin_attn, quad)

    def flops(self, height: int, width: int, batch: int = 1) -> float:
        """FLOPs of one forward of the whole image (latent height x width) at batch size `batch`."""
        a = height * width
        return batch * (self.flops_const + self.flops_linear * a + self.flops_quadratic * a * a)

    def check_strips(self, geometry: StripGeometry) -> None:
        """Raise GeometryError before any compute if a strip is thinner than a conv's halo."""
        for s in self.sites:
            if s.kind == "conv":
                geometry.check_halo(s.factor, s.top, s.bottom, f"conv {s.key}")


class OpCounter:
    """Counts the ATen operations that run (views excluded: they launch nothing), records the
    shape of every matrix multiply as (batch, M, N, K) and the size (elements) of every copy.
    Use as a context manager."""

    MATMULS = {"mm": 0, "addmm": 0, "bmm": 1, "baddbmm": 1}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not func.is_view and func.namespace == "aten":
                    name = func.overloadpacket.__name__
                    counter.ops[name] = counter.ops.get(name, 0) + 1
                    if name in ("clone", "_to_copy", "copy_", "contiguous"):
                        counter.copies.append(out.numel() if isinstance(out, torch.Tensor) else 0)
                    if name in OpCounter.MATMULS:
                        a, b = args[-2], args[-1] if name in ("mm", "bmm") else args[-1]
                        if name in ("addmm", "baddbmm"):
                            a, b = args[1], args[2]
                        batch = a.shape[0] if a.dim() == 3 else 1
                        counter.matmuls.append((batch, a.shape[-2], b.shape[-1], a.shape[-1]))
                return out

        self.ops: dict[str, int] = {}
        self.matmuls: list[tuple[int, int, int, int]] = []
        self.copies: list[int] = []
        self._mode = Mode()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
