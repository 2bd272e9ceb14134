"""Patch-aware versions of the layers that see across strip boundaries.

Each class subclasses the layer it replaces and shares its parameters (state_dict keys do not
change); `forward` asks the exchange engine for what the strip lacks. Everything else in a
model (1x1 convs, linear layers, LayerNorm, cross-attention, nearest upsampling) is row-local
and runs unchanged on the strip.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from parafuse.attention import attention
from parafuse.models.layers import Attention, GridPositions
from parafuse.parallel.engine import ExchangeEngine


def _adopt(cls, module: nn.Module, engine: ExchangeEngine, key: str):
    """A `cls` instance that shares `module`'s parameters, buffers and settings (`stand_in`)."""
    new = stand_in(cls, module)
    new.engine = engine
    new.key = key
    return new


# what else a swapped layer keeps of the module it stands for, each rule `rule(module, new)`: a model
# family's adapter registers its own (parafuse.diffusers.adapter: diffusers' layerwise casting), so
# that this layer imports no family
STAND_IN_RULES: list = []


def stand_in(cls, module: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A `cls` instance standing for `module` (a patch layer swapped in, or the plain layer swapped
    back): `module`'s parameters, buffers and settings, less `drop` and a `forward` on the instance
    (a hook's wrapper, or the plain layer's own forward that a removed hook - accelerate's
    `remove_all_hooks`, diffusers' `remove_hook` - leaves bound to `module`, which would shadow
    `cls`'s); then the families' `STAND_IN_RULES`."""
    new = cls.__new__(cls)
    new.__dict__ = {k: v for k, v in module.__dict__.items() if k not in ("forward",) + drop}
    for rule in STAND_IN_RULES:
        rule(module, new)
    return new


class PatchConv2d(nn.Conv2d):
    """Conv2d on a strip: attaches the neighbours' halo rows, then convolves without row padding.

    `pads` (left, right, top, bottom): a zero padding of `x` its caller leaves to this conv, which has
    none of its own (diffusers' VAE encoder pads right and bottom by one before a stride-2 conv:
    `StripDownsample2D`). The shape trace then sees the unpadded grid, and on a strip the halo rows
    stand for the padded rows - the plan's halo of a conv without padding is its top 0 and bottom
    d(k-1)-s+1, the next strip's first row or zeros at the image's edge - so only columns are padded."""

    # outside torch.compile's tracing whole: the halo exchange breaks the graph anyway, and the one
    # conv after it, compiled on its own, fused nothing and was recompiled for every conv's shapes
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, pads: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        if self.engine.step.halos == "zeros":     # no exchange: the strip is padded like an image
            return super().forward(x if pads is None else F.pad(x, pads))
        x = self.engine.conv_input(self.key, x)
        if pads is not None:
            return F.conv2d(F.pad(x, pads[:2]), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, self.padding[1]), self.dilation, self.groups)


def strip_sums(x: torch.Tensor, groups: int, out: torch.Tensor) -> torch.Tensor:
    """[Σx, Σx²] of every (sample, group) of `x`, accumulated in float32 into `out` [2, B, G],
    straight from the activation (no float copy of it)."""
    grouped = x.reshape(x.shape[0], groups, -1)
    torch.sum(grouped, -1, dtype=torch.float32, out=out[0])
    torch.linalg.vector_norm(grouped, 2, -1, dtype=torch.float32, out=out[1])
    out[1].square_()
    return out


def normalize(x: torch.Tensor, moments: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    """GroupNorm of `x` [B, C, ...] with given [mean, biased variance] [2, B, G] (float32) and
    float32 `weight`/`bias` repeated for every sample [B * C]: one native inference-mode batch norm
    over the (sample, channel) rows, which computes in float32 and rounds once."""
    b, c, g = x.shape[0], x.shape[1], moments.shape[-1]
    moments[1].clamp_min_(0)                                  # one-pass variance: rounding can go below 0
    mean, var = moments[..., None].expand(2, b, g, c // g).contiguous().view(2, b * c)
    # (sample, channel) pairs as the channels of one sample, spatial dims kept (cuDNN's layouts)
    y = F.batch_norm(x.reshape((1, b * c) + tuple(x.shape[2:])), mean, var, weight, bias, False, 0.0, eps)
    return y.view(x.shape)


class SiLUApplied(torch.Tensor):
    """A GroupNorm output that already carries the SiLU that follows it (the fused kernel applied
    it). The model's own SiLU call on it - F.silu, or an nn.SiLU module, which calls F.silu - returns
    it as a plain tensor; the model's code and modules stay untouched. The shape trace found SiLU to
    be the only reader of this output; any other reader is an error, never a silently wrong value."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.silu:
            return args[0].as_subclass(torch.Tensor)
        if getattr(func, "__name__", "") in ("size", "dim", "shape", "dtype", "device", "__get__"):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        raise RuntimeError(f"a GroupNorm output with its SiLU fused was read by {getattr(func, '__name__', func)}; "
                           f"the model trace saw only a SiLU reading it. Use --kernels torch and report this model")


class PatchGroupNorm(nn.GroupNorm):
    """GroupNorm over the whole image: count-weighted float32 sums across strips, biased variance,
    exactly as torch.nn.GroupNorm (uneven strips included).

    The strip's Σx and Σx² are reduced straight from the activation into a float32 buffer (no
    float copy of the activation). The normalisation is one native inference-mode batch norm over
    the (sample, channel) rows with the global statistics as its running statistics: one pass
    that computes in float32 and rounds once, as the native GroupNorm does in bf16 and fp16."""

    # outside torch.compile's tracing whole, as PatchConv2d: its exchanges broke it into four pieces
    # of one or two ops each, compiled apart from every neighbour (nothing to fuse), and its affine
    # cache's key of parameter addresses was recompiled for every GroupNorm
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine.step.norm == "local":      # this strip's own statistics: the plain layer
            return super().forward(x)
        if self.engine.kernels == "triton":
            return self._forward_triton(x)
        strip_sums(x, self.num_groups, self.engine.norm_sums(self.key))
        weight, bias = self._affine(x.shape[0])
        y = normalize(x, self.engine.norm_moments(self.key), weight, bias, self.eps)
        self.engine.norm_done(self.key)
        return y

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """Two kernels (parafuse_kernels.groupnorm): the strip's sums, then normalise + affine with
        the exchanged statistics, fallback included - and the SiLU that follows where the patch plan
        says SiLU is the only reader of the output (see SiLUApplied)."""
        from parafuse_kernels.groupnorm import group_norm_apply, group_sums

        x = x.contiguous()
        group_sums(x, self.num_groups, self.engine.norm_sums(self.key))
        sums, count, fallback, fallback_count = self.engine.norm_statistics(self.key)
        # the trace saw a SiLU as the only reader (and the model's code is not compiled: fused_silu)
        silu = self.engine.fused_silu and self.engine.plan.sites[self.key].silu
        y = group_norm_apply(x, sums, count, self.weight, self.bias, self.eps, fallback, fallback_count, silu)
        self.engine.norm_done(self.key)
        return y.as_subclass(SiLUApplied) if silu else y

    def _affine(self, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Weight and bias in float32, repeated for every sample; cached until the parameters change
        (an in-place load bumps their version)."""
        if not self.affine:
            return None, None
        key = (batch, self.weight.data_ptr(), self.weight._version, self.bias.data_ptr(), self.bias._version)
        if getattr(self, "_affine_key", None) != key:
            self._affine_cache = (self.weight.detach().float().repeat(batch), self.bias.detach().float().repeat(batch))
            self._affine_key = key
        return self._affine_cache


def _views(t: torch.Tensor, base: torch.Tensor, offset: int) -> bool:
    return (t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            and t.data_ptr() == base.data_ptr() + offset * base.element_size())


class PatchAttention(Attention):
    """Self-attention of a strip's queries over the engine's K/V buffer.

    The local K/V projection is one GEMM with the fused K|V weight, written straight into the
    middle of the buffer; neighbours' rows land around it, and attention reads the buffer as
    strided views: no concatenation."""

    def fused_kv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The [2*dim, dim] K|V weight (and bias). `to_k` and `to_v` are made views of it, so that
        weights loaded in place later (load_state_dict) are the ones used; if a conversion gave
        them new storage (`.to(dtype)`), they are fused again."""
        k, v = self.to_k, self.to_v
        w = getattr(self, "_kv_weight", None)
        if w is None or not (_views(k.weight, w, 0) and _views(v.weight, w, k.weight.numel())
                             and (k.bias is None or _views(k.bias, self._kv_bias, 0)
                                  and _views(v.bias, self._kv_bias, k.bias.numel()))):
            with torch.no_grad():
                w = torch.cat([k.weight, v.weight])
                k.weight.data, v.weight.data = w[: k.out_features], w[k.out_features:]
                b = None
                if k.bias is not None:
                    b = torch.cat([k.bias, v.bias])
                    k.bias.data, v.bias.data = b[: k.out_features], b[k.out_features:]
            self._kv_weight, self._kv_bias = w, b
        return self._kv_weight, self._kv_bias

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            return super().forward(x, context)
        b, tokens, dim = x.shape
        buf, start, end = self.engine.kv_buffer(self.key)
        weight, bias = self.fused_kv()
        if b == 1:      # the buffer's local rows are one contiguous [tokens, 2*dim] matrix
            if bias is None:
                torch.mm(x[0], weight.t(), out=buf[start:end, 0])
            else:
                torch.addmm(bias, x[0], weight.t(), out=buf[start:end, 0])
        else:           # one GEMM over all B*tokens rows, then into the token-major buffer
            buf[start:end].copy_(F.linear(x, weight, bias).transpose(0, 1))
        self.engine.exchange_kv(self.key, buf, before=True)

        def heads(t):                                   # [T, B, dim] view -> [B, heads, T, d] view
            return t.permute(1, 0, 2).unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = attention(self.split_heads(self.to_q(x)), heads(buf[..., :dim]), heads(buf[..., dim:]))
        self.engine.exchange_kv(self.key, buf, before=False)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class PatchGridPositions(GridPositions):
    """Positions of the whole grid, sliced to the strip's rows (never recomputed from the strip's
    own size, which would restart every strip at row 0)."""

    def forward(self, h: int, w: int, device=None) -> torch.Tensor:
        level = self.engine.geometry.level_of_width(w)
        off = level.offsets[self.engine.strip]
        return self.grid(level.height, w, 0, device)[off * w: (off + h) * w]
