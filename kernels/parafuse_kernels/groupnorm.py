"""GroupNorm on a strip in two kernels, beside their PyTorch references.

    group_sums(x, groups, out)      Σx and Σx² of every (sample, group), float32, reading x once;
                                    deterministic: per-program partial sums, then a fixed-order sum
    group_norm_apply(x, sums, ...)  mean and biased variance from sums over `count` elements (or,
                                    where that variance is negative, from `fallback` sums), then
                                    normalise + affine (+ the SiLU that follows, `silu=True`) in
                                    float32 and store in x's dtype: one read, one write

Between them the patch runtime exchanges the sums (an all-reduce over the strips), so a patched
GroupNorm is these launches (the sums take two: the partials and their fixed-order sum), the
allocation of the partials and the exchange - against a dozen small ATen ops in the PyTorch path.
No float atomics: with them the order of the additions (and so the last bits of the statistics)
varied from run to run wherever a group spans several programs (at unet-xl 2048², N = 8, level 0:
20 per group), so a graph replay could not equal the eager step bit for bit. `x` is [B, C, *spatial], contiguous; the groups' elements are
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
def _group_sums_kernel(x_ptr, parts_ptr, group_numel, n_groups, parts, BLOCK: tl.constexpr):
    """Partial [Σx, Σx²] of one block of one group, into its own slot of parts [2, groups, parts]."""
    group = tl.program_id(0)             # sample * G + g
    part = tl.program_id(1)              # this program's block of the group
    idx = part * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + group.to(tl.int64) * group_numel + idx, mask=idx < group_numel, other=0.0).to(tl.float32)
    slot = group * parts + part
    tl.store(parts_ptr + slot, tl.sum(v, axis=0))
    tl.store(parts_ptr + n_groups * parts + slot, tl.sum(v * v, axis=0))


@triton.jit
def _sum_parts_kernel(parts_ptr, out_ptr, parts, BLOCK: tl.constexpr):
    """out[r] = Σ parts[r, :] for one row r of [2·groups, parts], always in the same order: blocks
    of BLOCK partials added in sequence, then one fixed tree."""
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, parts, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(parts_ptr + row.to(tl.int64) * parts + idx, mask=idx < parts, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


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
PARTS_BLOCK = 128
APPLY_BLOCK = 1024


def group_sums(x: torch.Tensor, groups: int, out: torch.Tensor) -> torch.Tensor:
    """Write [Σx, Σx²] of every (sample, group) of contiguous `x` into float32 `out` [2, B, G]:
    one program per block of a group writes its partial sums, a second launch adds each group's
    partials in a fixed order - the same bits on every run (no atomics)."""
    assert x.is_contiguous() and out.is_contiguous() and out.dtype == torch.float32
    b = x.shape[0]
    group_numel = x.numel() // (b * groups)
    parts = triton.cdiv(group_numel, SUMS_BLOCK)
    partials = torch.empty((2, b * groups, parts), dtype=torch.float32, device=x.device)
    with INTERPRETER_LOCK:
        _group_sums_kernel[(b * groups, parts)](x, partials, group_numel, b * groups, parts, BLOCK=SUMS_BLOCK)
        _sum_parts_kernel[(2 * b * groups,)](partials, out, parts, BLOCK=PARTS_BLOCK)
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
