"""What a model does at a resolution, read from its layer shapes without running it.

One shape-only trace (FakeTensor: no memory, no compute) at two small resolutions, on the model's
own device and dtype, gives
- the model's parallel sites (`parafuse.parallel.plan.Site`): every conv with a halo, GroupNorm
  and self-attention, with the resolution level it runs at, its channels and halo rows, and which
  conv reads the model input, and which GroupNorms have a SiLU as the only reader of their output
  (recorded by a torch-function mode during the trace) - what a patch plan is built from;
- a FLOP count that extrapolates exactly to any resolution: conv/linear FLOPs are affine in the
  pixel count, self-attention's quadratic.
The trace itself is `parafuse.parallel.trace.trace_model`, the one both front doors use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from parafuse.parallel.adapter import BUILTIN
from parafuse.parallel.geometry import StripGeometry
from parafuse.parallel.plan import Site, SiteKind
from parafuse.parallel.trace import Trace, trace_model


def _trace(model: nn.Module, channels: int, height: int, width: int, call_kwargs: dict, adapter) -> Trace:
    """The shape trace (parafuse.parallel.trace) of the built-in call `model(x, t, **call_kwargs)`
    at latent size height x width; the input lives where the model lives (a CPU input for a CUDA
    or meta model fails)."""
    p = next(model.parameters())
    x = torch.empty(1, channels, height, width, device=p.device, dtype=p.dtype)
    return trace_model(model, adapter, (x, 500.0), call_kwargs, x, (height, width))


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
        first, second = (_trace(model, channels, h, w, call_kwargs, adapter) for h, w in ((h1, w1), (h2, w2)))
        sites, aff1, att1, aff2 = first.sites, first.affine, first.attention, second.affine
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
            if s.kind == SiteKind.CONV:
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
