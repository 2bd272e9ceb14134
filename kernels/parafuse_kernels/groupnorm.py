"""GroupNorm on a strip in two kernels, beside their PyTorch references.

    group_sums(x, groups, out)      Σx and Σx² of every (sample, group), float32, reading x once
    group_norm_apply(x, sums, ...)  mean and biased variance from sums over `count` elements (or,
                                    where that variance is negative, from `fallback` sums), then
                                    normalise + affine (+ the SiLU that follows, `silu=True`) in
                                    float32 and store in x's dtype: one read, one write

Between them the patch runtime exchanges the sums (an all-reduce over the strips), so a patched
GroupNorm is these two launches, the zeroing of the sums and the exchange - against a dozen
small ATen ops in the PyTorch path. `x` is [B, C, *spatial], contiguous; the groups' elements are
then contiguous runs of C/G * prod(spatial).

Import this module only after TRITON_INTERPRET is set when testing on CPU (see the package).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from parafuse_kernels import INTERPRETER_LOCK

LAUNCHES = {"group_sums": 0, "group_norm_apply": 0}     # tests check that the kernels ran


# ---- references ----------------------------------------------------------------------------------
def group_sums_reference(x: torch.Tensor, groups: int) -> torch.Tensor:
    g = x.reshape(x.shape[0], groups, -1).float()
    return torch.stack([g.sum(-1), (g * g).sum(-1)])


def group_norm_apply_reference(x: torch.Tensor, sums: torch.Tensor, count: float, weight, bias, eps: float,
                               fallback: torch.Tensor | None = None, fallback_count: float = 1.0,
                               silu: bool = False) -> torch.Tensor:
    b, c, groups = x.shape[0], x.shape[1], sums.shape[-1]
    mean, var = sums[0] / count, sums[1] / count - (sums[0] / count) ** 2
    if fallback is not None:
        fmean = fallback[0] / fallback_count
        fvar = fallback[1] / fallback_count - fmean ** 2
        mean, var = torch.where(var < 0, fmean, mean), torch.where(var < 0, fvar, var)
    rstd = torch.rsqrt(var.clamp_min(0) + eps)
    shape = (b, groups, -1)
    y = (x.reshape(shape).float() - mean[..., None]) * rstd[..., None]
    y = y.reshape(b, c, -1)
    if weight is not None:
        y = y * weight.float()[None, :, None] + bias.float()[None, :, None]
    if silu:
        y = torch.nn.functional.silu(y)
    return y.reshape(x.shape).to(x.dtype)


# ---- kernels -------------------------------------------------------------------------------------
@triton.jit
def _group_sums_kernel(x_ptr, out_ptr, group_numel, n_groups, BLOCK: tl.constexpr):
    group = tl.program_id(0)             # sample * G + g
    part = tl.program_id(1)              # this program's block of the group
    idx = part * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + group.to(tl.int64) * group_numel + idx, mask=idx < group_numel, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + group, tl.sum(v, axis=0))
    tl.atomic_add(out_ptr + n_groups + group, tl.sum(v * v, axis=0))


@triton.jit
def _group_norm_apply_kernel(x_ptr, y_ptr, sums_ptr, fallback_ptr, w_ptr, b_ptr, channels, groups, row_numel,
                             n_groups, inv_count, inv_fallback_count, eps,
                             HAS_FALLBACK: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0)               # sample * C + channel
    block = tl.program_id(1)
    channel = row % channels
    group = (row // channels) * groups + channel // (channels // groups)
    s1 = tl.load(sums_ptr + group)
    s2 = tl.load(sums_ptr + n_groups + group)
    mean = s1 * inv_count
    var = s2 * inv_count - mean * mean
    if HAS_FALLBACK:                     # a stale estimate's variance can be negative: this strip's own
        f1 = tl.load(fallback_ptr + group)
        f2 = tl.load(fallback_ptr + n_groups + group)
        fmean = f1 * inv_fallback_count
        fvar = f2 * inv_fallback_count - fmean * fmean
        bad = var < 0
        mean = tl.where(bad, fmean, mean)
        var = tl.where(bad, fvar, var)
    rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
    if HAS_AFFINE:
        scale = rstd * tl.load(w_ptr + channel).to(tl.float32)
        shift = tl.load(b_ptr + channel).to(tl.float32) - mean * scale
    else:
        scale = rstd
        shift = -mean * rstd
    idx = block * BLOCK + tl.arange(0, BLOCK)
    mask = idx < row_numel
    offset = row.to(tl.int64) * row_numel
    v = tl.load(x_ptr + offset + idx, mask=mask, other=0.0).to(tl.float32)
    y = v * scale + shift
    if SILU:                             # the activation that follows, where it is the only reader
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + offset + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------
SUMS_BLOCK = 4096
APPLY_BLOCK = 1024


def group_sums(x: torch.Tensor, groups: int, out: torch.Tensor) -> torch.Tensor:
    """Write [Σx, Σx²] of every (sample, group) of contiguous `x` into float32 `out` [2, B, G]:
    one program per block of a group, each adding its partial sums atomically (so the order of
    the float32 additions, and the last bits, can vary from run to run)."""
    assert x.is_contiguous() and out.is_contiguous() and out.dtype == torch.float32
    b = x.shape[0]
    group_numel = x.numel() // (b * groups)
    out.zero_()
    with INTERPRETER_LOCK:
        _group_sums_kernel[(b * groups, triton.cdiv(group_numel, SUMS_BLOCK))](x, out, group_numel, b * groups,
                                                                               BLOCK=SUMS_BLOCK)
    LAUNCHES["group_sums"] += 1
    return out


def group_norm_apply(x: torch.Tensor, sums: torch.Tensor, count: float, weight, bias, eps: float,
                     fallback: torch.Tensor | None = None, fallback_count: float = 1.0,
                     silu: bool = False) -> torch.Tensor:
    """GroupNorm of contiguous `x` [B, C, ...] with the statistics of `sums` [2, B, G] over `count`
    elements per group (`fallback` sums over `fallback_count` where that variance is negative), and
    with `silu` the SiLU of that, computed in float32 before the one rounding to x's dtype."""
    assert x.is_contiguous() and sums.is_contiguous()
    b, c, groups = x.shape[0], x.shape[1], sums.shape[-1]
    row_numel = x.numel() // (b * c)
    y = torch.empty_like(x)
    with INTERPRETER_LOCK:
        _group_norm_apply_kernel[(b * c, triton.cdiv(row_numel, APPLY_BLOCK))](
            x, y, sums, fallback if fallback is not None else sums, weight if weight is not None else x,
            bias if bias is not None else x, c, groups, row_numel, b * groups, 1.0 / count, 1.0 / fallback_count,
            eps, HAS_FALLBACK=fallback is not None, HAS_AFFINE=weight is not None, SILU=silu, BLOCK=APPLY_BLOCK)
    LAUNCHES["group_norm_apply"] += 1
    return y
