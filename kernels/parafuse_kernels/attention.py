"""Halo attention: a flash-attention forward over a strip's queries and its layer's K/V buffer,
beside its PyTorch reference.

    halo_attention(q, k, v, scale=None, q_norm=None, rope=None, splits=None) -> (out, lse)

`q` [B, H, Lq, D] are the strip's queries; `k`, `v` [B, H, Lk, D] are views with any strides -
in the patch runtime, head views of the K/V buffer [tokens, B, 2*dim] laid out [rows from above |
local rows | rows from below] (a token range of it, e.g. a `partial` window, is a slice of that
view): the kernel reads the buffer where it lies, nothing is copied or concatenated. It returns
the output [B, H, Lq, D] (a view of a [B, Lq, H, D] tensor, so that merging the heads back into
[B, Lq, H*D] is free) and the log-sum-exp [B, H, Lq] in float32 (natural log, of the scaled
scores), with which partial attentions over disjoint key sets merge exactly.

The optional prologue touches only q, in float32, in this order (SD3/Flux): RMS QK-norm over the
head dim with weight `q_norm = (weight [D], eps)`, then RoPE `rope = (cos, sin)` [Lq, D/2] on
interleaved pairs (q[2i], q[2i+1]) as Flux rotates them; `scale` (> 0, default D^-0.5) multiplies
the scores. Keys are normed and rotated once, when they are written into the buffer (a neighbour's
stale keys arrive already rotated), so the kernel never touches them.

What the inner loop (one key block: two dots, the online softmax) does not do:
- no key masks where the keys fill whole blocks: the loop runs over whole blocks only, and a tail
  block (masked) is peeled after it only where the key count leaves one (EVEN_N drops even that
  code); no head-dim masks unless the head dim is padded;
- no separate scale multiply: the scores stay unscaled and the scale (in log2 units) enters the
  exponent as one FMA, s·c - m;
- no padding of head dims that are not powers of two: D = 72, 80, 96 run as two dots, 64 + 16 /
  16 / 32 (`head_dim_parts`), not one dot padded to 128 (72 → 128 costs 1.78x the MMA work;
  64 + 16 costs 1.11x). K is loaded as [BLOCK_N, D] tiles, as it lies in memory, and transposed
  with tl.trans;
- strides are passed divided by STRIDE_UNIT (16 bytes of elements) and multiplied back in the
  kernel: Triton specialises an integer argument's divisibility only at 16, so a head stride of
  72 would otherwise compile to 2-byte scalar loads; with the unit the compiler knows every row
  starts on 16 bytes and emits 16-byte (cp.async) loads. Where a stride is not a multiple of the
  unit the host launches the generic variant (STRIDE_UNIT = 1): same source, narrower loads.

Split-KV (`splits` > 1, or the rule `kv_splits` where the grid of query blocks x heads leaves SMs
idle - short strips, a small last wave): each program attends to one contiguous range of whole 128-key
blocks, writes a float32 partial output and its log-sum-exp, and the partials are merged by
their log-sum-exps (`merge_splits`: exact, the same identity as the text merge across ranks).

bf16/fp16 run the dots on tensor cores with float32 accumulation; fp32 runs them in IEEE float32
(`input_precision="ieee"`: on Hopper an fp32 `tl.dot` would otherwise be TF32), so the source
tested under the interpreter is the source compiled on the GPU. One exception, forced by the
interpreter: its bf16 `tl.dot` (Triton 3.6; numpy has no bf16) multiplies garbage, so under the
interpreter bf16 dot operands are upcast to float32 first (the products of bf16 values are exact
in float32, so the result is what a tensor core computes up to the order of accumulation).

The autotune candidates per head dim (`CONFIGS`) are the grid the issue lists (BLOCK_M 64/128 x
BLOCK_N 32/64/128 x stages 2-4 x warps 4/8) pruned on a CPU by compiling each for sm_90a
(benchmarks/attention_configs.py): no register spills, shared memory within 227 KiB, at most 8.
tests/test_kernel_compile.py checks every kept one at the runtime's own buffer layouts.

Import this module only after TRITON_INTERPRET is set when testing on CPU (see the package).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from parafuse_kernels import INTERPRETED, INTERPRETER_LOCK, grid
from parafuse_kernels.prologue import q_prologue    # the prologue's reference: the other backends' own ops

LAUNCHES = {"halo_attention": 0}       # tests check that the kernel ran


# ---- reference -----------------------------------------------------------------------------------
def halo_attention_reference(q, k, v, scale=None, q_norm=None, rope=None):
    """softmax(scale · q' kᵀ) v and its log-sum-exp, in float32; q' = the prologue applied to q,
    rounded to q's dtype as the kernel feeds it to the dot."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf = q_prologue(q, q_norm, rope).float()
    s = (qf @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - lse[..., None]) @ v.float()
    return out.to(q.dtype), lse


def merge_splits(outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Attention over the union of disjoint key sets from each set's output `outs` [S, ...] and
    log-sum-exp `lses` [S, ...] (float32): out = Σ exp(lse_s - lse) · out_s, written into `out`;
    returns lse = log Σ exp(lse_s)."""
    lse = torch.logsumexp(lses, 0)
    weights = torch.exp(lses - lse)[..., None]
    out.copy_((weights * outs).sum(0))
    return lse


# ---- kernel --------------------------------------------------------------------------------------
@triton.jit
def _load_tile(base, rows, row_ok, dims, stride_r, stride_d, HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr,
               DIM_MASK: tl.constexpr):
    """A [rows, dims] tile; masks only where asked (a partial row block, a padded head dim)."""
    ptrs = base + rows[:, None] * stride_r + dims[None, :] * stride_d
    if ROW_MASK and DIM_MASK:
        tile = tl.load(ptrs, mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    elif ROW_MASK:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif DIM_MASK:
        tile = tl.load(ptrs, mask=(dims < HEAD_DIM)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _prologue(q, q_base, rows, row_ok, dims, sq_m, sq_d, rstd, norm_w_ptr, cos_ptr, sin_ptr, HEAD_DIM: tl.constexpr,
              DIM_MASK: tl.constexpr, QK_NORM: tl.constexpr, ROPE: tl.constexpr):
    """q's columns `dims` after the prologue, in float32: RMS norm (`rstd` over the whole head), then
    RoPE on interleaved pairs; a pair never straddles the split of the head dim (its parts are even)."""
    qf = q.to(tl.float32)
    if ROPE:         # each element's partner in its pair: index d ^ 1
        partner = _load_tile(q_base, rows, row_ok, dims ^ 1, sq_m, sq_d, HEAD_DIM, True, DIM_MASK).to(tl.float32)
    if QK_NORM:
        w = tl.load(norm_w_ptr + dims, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
        qf = qf * rstd[:, None] * w[None, :]
        if ROPE:
            w_partner = tl.load(norm_w_ptr + (dims ^ 1), mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
            partner = partner * rstd[:, None] * w_partner[None, :]
    if ROPE:
        table = rows[:, None] * (HEAD_DIM // 2) + (dims // 2)[None, :]
        ok = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
        cos = tl.load(cos_ptr + table, mask=ok, other=0.0)
        sin = tl.load(sin_ptr + table, mask=ok, other=0.0)
        sign = tl.where(dims % 2 == 0, -1.0, 1.0)[None, :]          # (a, b) -> (a cos - b sin, b cos + a sin)
        qf = qf * cos + partner * sin * sign
    return qf


@triton.jit
def _kv_tile(base, desc, bh, cols64, col_ok, dims, start, stride_n, stride_d, HEAD_DIM: tl.constexpr,
             MASK_N: tl.constexpr, DIM_MASK: tl.constexpr, USE_TMA: tl.constexpr, COL0: tl.constexpr):
    """A [BLOCK_N, dims] tile of K or V: by TMA from a [B, H, L, D] descriptor (rows past L and
    columns past D arrive as zeros: no masks; `bh` = (b, h) as int32), else by pointers."""
    if USE_TMA:
        tile = desc.load([bh[0], bh[1], start, COL0])
        tile = tile.reshape([tile.shape[2], tile.shape[3]])
    else:
        tile = _load_tile(base, cols64, col_ok, dims, stride_n, stride_d, HEAD_DIM, MASK_N, DIM_MASK)
    return tile


@triton.jit
def _attend_block(q0, q1, m_i, l_i, acc0, acc1, k_base, v_base, descs, bh, start, lk, sk_n, sk_d, sv_n, sv_d,
                  qk_scale, dims0, dims1, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MAIN_PADDED: tl.constexpr,
                  HAS_TAIL: tl.constexpr, TAIL_PADDED: tl.constexpr, MASK_N: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr, D_MAIN: tl.constexpr):
    """One key block of the online softmax (scores in log2 units, unscaled until the exponent)."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < lk                                   # used only by the masked tail block
    cols64 = cols.to(tl.int64)                           # token offsets times strides can pass 2**31
    k0 = _kv_tile(k_base, descs[0], bh, cols64, col_ok, dims0, start, sk_n, sk_d, HEAD_DIM, MASK_N, MAIN_PADDED,
                  USE_TMA, 0)                                                           # [BLOCK_N, D0]
    s = _dot(q0, tl.trans(k0), tl.zeros([q0.shape[0], BLOCK_N], tl.float32), PRECISION, UPCAST_DOT)
    if HAS_TAIL:
        k1 = _kv_tile(k_base, descs[1], bh, cols64, col_ok, dims1, start, sk_n, sk_d, HEAD_DIM, MASK_N, TAIL_PADDED,
                      USE_TMA, D_MAIN)
        s = _dot(q1, tl.trans(k1), s, PRECISION, UPCAST_DOT)
    if MASK_N:
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
    else:                                                # scale > 0: max(s)·c = max(s·c); one FMA per score
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v0 = _kv_tile(v_base, descs[2], bh, cols64, col_ok, dims0, start, sv_n, sv_d, HEAD_DIM, MASK_N, MAIN_PADDED,
                  USE_TMA, 0)
    p = p.to(v0.dtype)                                   # rounded to the storage dtype, as flash attention does
    acc0 = _dot(p, v0, acc0 * alpha[:, None], PRECISION, UPCAST_DOT)
    if HAS_TAIL:
        v1 = _kv_tile(v_base, descs[3], bh, cols64, col_ok, dims1, start, sv_n, sv_d, HEAD_DIM, MASK_N, TAIL_PADDED,
                      USE_TMA, D_MAIN)
        acc1 = _dot(p, v1, acc1 * alpha[:, None], PRECISION, UPCAST_DOT)
    return m_new, l_i, acc0, acc1


@triton.jit
def _halo_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, norm_w_ptr, cos_ptr, sin_ptr, k_desc0, k_desc1, v_desc0, v_desc1,
        sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_s, so_b, so_h, so_m, so_d,
        heads, lq, lk, kv_per_split, lse_split_stride, qk_scale, norm_eps,
        HEAD_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, STRIDE_UNIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
        QK_NORM: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
        USE_TMA: tl.constexpr):
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    MAIN_PADDED: tl.constexpr = D_MAIN > HEAD_DIM
    HAS_TAIL: tl.constexpr = D_TAIL > 0
    TAIL_PADDED: tl.constexpr = D_MAIN + D_TAIL > HEAD_DIM
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_ok = rows < lq
    dims0 = tl.arange(0, D_MAIN)
    dims1 = D_MAIN + tl.arange(0, D_TAIL if D_TAIL > 0 else 16)

    q_base = q_ptr + b * (sq_b * STRIDE_UNIT) + h * (sq_h * STRIDE_UNIT)
    q_m = sq_m * STRIDE_UNIT
    q0 = _load_tile(q_base, rows64, row_ok, dims0, q_m, sq_d, HEAD_DIM, True, MAIN_PADDED)
    q1 = q0                                              # unused without a tail part
    if HAS_TAIL:
        q1 = _load_tile(q_base, rows64, row_ok, dims1, q_m, sq_d, HEAD_DIM, True, TAIL_PADDED)
    if QK_NORM or ROPE:                                  # the prologue on q, in float32
        rstd = tl.full([BLOCK_M], 1.0, tl.float32)
        if QK_NORM:
            q0f = q0.to(tl.float32)
            sum_sq = tl.sum(q0f * q0f, axis=1)
            if HAS_TAIL:
                q1f = q1.to(tl.float32)
                sum_sq += tl.sum(q1f * q1f, axis=1)
            rstd = 1.0 / tl.sqrt(sum_sq / HEAD_DIM + norm_eps)
        q0 = _prologue(q0, q_base, rows64, row_ok, dims0, q_m, sq_d, rstd, norm_w_ptr, cos_ptr, sin_ptr, HEAD_DIM,
                       MAIN_PADDED, QK_NORM, ROPE).to(q_ptr.dtype.element_ty)
        if HAS_TAIL:
            q1 = _prologue(q1, q_base, rows64, row_ok, dims1, q_m, sq_d, rstd, norm_w_ptr, cos_ptr, sin_ptr,
                           HEAD_DIM, TAIL_PADDED, QK_NORM, ROPE).to(q_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D_MAIN], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D_TAIL if D_TAIL > 0 else 16], tl.float32)
    k_base = k_ptr + b * (sk_b * STRIDE_UNIT) + h * (sk_h * STRIDE_UNIT)
    v_base = v_ptr + b * (sv_b * STRIDE_UNIT) + h * (sv_h * STRIDE_UNIT)
    k_n = sk_n * STRIDE_UNIT
    v_n = sv_n * STRIDE_UNIT
    first = split * kv_per_split                         # this program's keys: [first, last)
    last = tl.minimum(first + kv_per_split, lk)
    whole_end = first + (last - first) // BLOCK_N * BLOCK_N
    descs = (k_desc0, k_desc1, v_desc0, v_desc1)         # TMA descriptors [B, H, Lk, D] (None without TMA)
    bh32 = (bh // heads, bh % heads)
    for start in range(first, whole_end, BLOCK_N):       # whole blocks: no key masks
        m_i, l_i, acc0, acc1 = _attend_block(q0, q1, m_i, l_i, acc0, acc1, k_base, v_base, descs, bh32, start, lk,
                                             k_n, sk_d, v_n, sv_d, qk_scale, dims0, dims1, HEAD_DIM, BLOCK_N,
                                             MAIN_PADDED, HAS_TAIL, TAIL_PADDED, False, PRECISION, UPCAST_DOT,
                                             USE_TMA, D_MAIN)
    if not EVEN_N:                                       # the one partial block, peeled
        if whole_end < last:
            m_i, l_i, acc0, acc1 = _attend_block(q0, q1, m_i, l_i, acc0, acc1, k_base, v_base, descs, bh32,
                                                 whole_end, last, k_n, sk_d, v_n, sv_d, qk_scale, dims0, dims1,
                                                 HEAD_DIM, BLOCK_N, MAIN_PADDED, HAS_TAIL, TAIL_PADDED, True,
                                                 PRECISION, UPCAST_DOT, USE_TMA, D_MAIN)

    o_base = o_ptr + split * (so_s * STRIDE_UNIT) + b * (so_b * STRIDE_UNIT) + h * (so_h * STRIDE_UNIT)
    o_m = so_m * STRIDE_UNIT
    inv_l = 1.0 / l_i
    _store_tile(o_base, rows64, row_ok, dims0, o_m, so_d, acc0 * inv_l[:, None], HEAD_DIM, MAIN_PADDED)
    if HAS_TAIL:
        _store_tile(o_base, rows64, row_ok, dims1, o_m, so_d, acc1 * inv_l[:, None], HEAD_DIM, TAIL_PADDED)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453                          # log2 -> natural log
    tl.store(lse_ptr + split * lse_split_stride + bh.to(tl.int64) * lq + rows, lse, mask=row_ok)


@triton.jit
def _store_tile(base, rows, row_ok, dims, stride_r, stride_d, tile, HEAD_DIM: tl.constexpr, DIM_MASK: tl.constexpr):
    ptrs = base + rows[:, None] * stride_r + dims[None, :] * stride_d
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :] if DIM_MASK else row_ok[:, None]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


# ---- launch --------------------------------------------------------------------------------------
KV_SPLIT_UNIT = 16 if INTERPRETED else 128     # split-KV ranges are whole multiples of every BLOCK_N


def head_dim_parts(d: int) -> tuple[int, int]:
    """(D_MAIN, D_TAIL): the head dim as a power-of-two part (>= 16) plus, where d exceeds it, a
    second power-of-two part of at least 16 (tl.dot's minimum): 72 -> (64, 16), 80 -> (64, 16),
    96 -> (64, 32), 128 -> (128, 0); only the columns past d are masked."""
    main = max(16, 1 << (d.bit_length() - 1))
    rest = d - main
    return main, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


def stride_unit(*tensors: torch.Tensor) -> int:
    """16 bytes of elements when every stride but the head dim's is a multiple of it (then each row
    of a tile starts on 16 bytes and loads can be 16 bytes wide), else 1: the generic variant."""
    unit = 16 // tensors[0].element_size()
    ok = all(s % unit == 0 for t in tensors for s in t.stride()[:-1])
    return unit if ok else 1


def kv_splits(programs: int, lk: int, sms: int) -> int:
    """The split-KV count for a launch of `programs` (128-query block x head) programs over `lk` keys
    on `sms` SMs: parafuse_kernels.grid's rule, in this launch's key unit."""
    return grid.kv_splits(programs, lk, sms, KV_SPLIT_UNIT)


def split_keys(lk: int, splits: int) -> tuple[int, int]:
    """(ranges, keys per range) for `splits` ranges of whole KV_SPLIT_UNIT blocks over `lk` keys;
    fewer ranges where the keys run out first (a range is never empty)."""
    if splits <= 1:
        return 1, lk
    per = -(-lk // (splits * KV_SPLIT_UNIT)) * KV_SPLIT_UNIT
    return -(-lk // per), per


def _even_n(args) -> bool:
    """No partial key block anywhere (then the kernel carries no tail code at all)."""
    return args["lk"] % args["BLOCK_N"] == 0 and args["kv_per_split"] % args["BLOCK_N"] == 0


def _descriptor_blocks(nargs):
    """Autotune pre-hook: TMA descriptors load [1, 1, BLOCK_N, part] boxes - BLOCK_N is the config's."""
    for name in ("k_desc0", "k_desc1", "v_desc0", "v_desc1"):
        if nargs.get(name) is not None:
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs[name].block_shape[-1]]


def _configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_descriptor_blocks)
            for bm, bn, w, s in rows]


# (BLOCK_M, BLOCK_N, warps, stages) kept per head dim by benchmarks/attention_configs.py (compiled for
# sm_90a on a CPU, bf16 at the runtime's layouts: no spills, the prologue variant's neither, <= 227
# KiB shared, 16-byte loads only, <= 8, one per tile shape first); not yet timed on a GPU.
CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 3),
         (128, 64, 4, 2), (128, 128, 8, 2)],
    72: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 2), (128, 128, 8, 2),
         (64, 64, 4, 2), (64, 128, 4, 2)],
    80: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 2), (128, 128, 8, 2),
         (64, 64, 4, 2), (64, 128, 4, 2)],
    96: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 3),
         (128, 64, 8, 2), (128, 128, 8, 2)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 3),
          (128, 64, 8, 2), (128, 128, 8, 2)],
}
FALLBACK_DIM = 128       # head dims without their own list use the largest's (they pad up to it at most)


def configs_for(head_dim: int) -> list[tuple[int, int, int, int]]:
    return CONFIGS.get(head_dim) or CONFIGS[min((d for d in CONFIGS if d >= head_dim), default=FALLBACK_DIM)]


def _prune(configs, named_args, **kwargs):
    keep = set(configs_for(kwargs["HEAD_DIM"]))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]


_heuristic_kernel = triton.heuristics({"EVEN_N": _even_n})(_halo_attention_kernel)
_tuned_kernel = triton.autotune(_configs(sorted({c for rows in CONFIGS.values() for c in rows})),
                                key=["lq", "lk", "kv_per_split", "HEAD_DIM", "STRIDE_UNIT", "QK_NORM", "ROPE", "USE_TMA"],
                                prune_configs_by={"early_config_prune": _prune})(_heuristic_kernel)
# the interpreter runs one small fixed configuration (each program instance costs milliseconds there)
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _check(q, k, v, scale, q_norm, rope):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"halo_attention takes [B, heads, L, head_dim] tensors; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape != k.shape or k.shape[-1] != d:
        raise ValueError(f"k and v must be [{b}, {h}, Lk, {d}] like q; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("halo_attention needs at least one key (the strip's own rows are always in the buffer)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must share one dtype of fp32/bf16/fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not scale > 0:
        raise ValueError(f"the attention scale must be positive, got {scale}")
    if q_norm is not None and q_norm[0].shape != (d,):
        raise ValueError(f"the q-norm weight must be [{d}], got {tuple(q_norm[0].shape)}")
    if rope is not None:
        if d % 2:
            raise ValueError(f"RoPE rotates pairs: the head dim must be even, got {d}")
        for t in rope:
            if t.shape != (q.shape[2], d // 2):
                raise ValueError(f"RoPE cos/sin must be [{q.shape[2]}, {d // 2}], got {tuple(t.shape)}")


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need a 16-byte aligned base, 16-byte multiples for every stride but the last,
    and a contiguous last dim."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(s * t.element_size() % 16 == 0
                                                                     for s in t.stride()[:-1]) for t in tensors)


def _descriptors(k, v, d_main, d_tail, block_n=16):
    """(k_desc0, k_desc1, v_desc0, v_desc1): [B, H, Lk, D] descriptors of the K and V views with
    boxes of the head dim's parts (the pre-hook sets the box's BLOCK_N); None for a missing part."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(t, width):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, width]) if width else None
    return desc(k, d_main), desc(k, d_tail), desc(v, d_main), desc(v, d_tail)


def launch_args(q, k, v, out, lse, scale, q_norm=None, rope=None, splits=1, tma=False):
    """The kernel's arguments and compile-time constants (but the block sizes and EVEN_N, which the
    autotuner and its heuristic add) for one launch writing `out` [S, B, H, Lq, D]-strided (S =
    `splits`) and `lse` [S, B, H, Lq]: what halo_attention passes and the compile test specialises."""
    b, heads, lq, d = q.shape
    lk = k.shape[2]
    d_main, d_tail = head_dim_parts(d)
    splits, kv_per_split = split_keys(lk, splits)
    unit = stride_unit(q, k, v, out if splits > 1 else out[0])
    norm_w, eps = (q_norm[0].contiguous(), float(q_norm[1])) if q_norm is not None else (q, 0.0)
    cos, sin = ((rope[0].float().contiguous(), rope[1].float().contiguous()) if rope is not None else (q, q))

    def in_units(t):                    # every stride but the head dim's (usually 1) in units
        return [s // unit for s in t.stride()[:-1]] + [t.stride(-1)]
    strides = in_units(q) + in_units(k) + in_units(v) + [out.stride(0) // unit if splits > 1 else 0] + in_units(out[0])
    descs = _descriptors(k, v, d_main, d_tail) if tma else (None,) * 4
    args = (q, k, v, out, lse, norm_w, cos, sin, *descs, *strides,
            heads, lq, lk, kv_per_split, lse.stride(0) if splits > 1 else 0, scale / math.log(2), eps)
    meta = dict(HEAD_DIM=d, D_MAIN=d_main, D_TAIL=d_tail, STRIDE_UNIT=unit, QK_NORM=q_norm is not None,
                ROPE=rope is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST_DOT=INTERPRETED and q.dtype == torch.bfloat16, USE_TMA=tma)
    return args, meta


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   q_norm: tuple[torch.Tensor, float] | None = None,
                   rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                   splits: int | None = None, tma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q` over `k`, `v` (strided views allowed), with the optional q prologue; returns
    (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32). One launch, grid (query blocks, B·H,
    splits), plus the merge where `splits` > 1 (None: the rule `kv_splits` against the SM count).
    `tma`: K/V tiles by TMA descriptors (Hopper; not timed yet, so off unless asked)."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    _check(q, k, v, scale, q_norm, rope)
    if tma and not tma_ok(k, v):
        raise ValueError("tma=True needs K/V views with 16-byte aligned bases and strides and a contiguous head dim")
    b, heads, lq, _ = q.shape
    lk = k.shape[2]
    if splits is None:
        splits = kv_splits(grid.programs(lq, b * heads), lk, _sm_count(q.device))
    splits = split_keys(lk, int(splits))[0]
    out = torch.empty((b, lq, heads, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b, heads, lq), dtype=torch.float32, device=q.device)
    if splits == 1:
        target, target_lse = out[None], lse[None]
    else:
        target = torch.empty((splits, b, lq, heads, d), dtype=torch.float32, device=q.device).transpose(2, 3)
        target_lse = torch.empty((splits, b, heads, lq), dtype=torch.float32, device=q.device)
    args, meta = launch_args(q, k, v, target, target_lse, scale, q_norm, rope, splits, tma)
    with INTERPRETER_LOCK:
        if INTERPRETED:
            blocks = (triton.cdiv(lq, INTERPRETER_BLOCKS["BLOCK_M"]), b * heads, splits)
            _descriptor_blocks({**dict(zip(_halo_attention_kernel.arg_names, args)), **INTERPRETER_BLOCKS})
            _heuristic_kernel[blocks](*args, **meta, **INTERPRETER_BLOCKS)
        else:
            _tuned_kernel[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * heads, splits)](*args, **meta)
    LAUNCHES["halo_attention"] += 1
    if splits > 1:
        lse = merge_splits(target, target_lse, out)
    return out, lse


def chosen_config() -> dict | None:
    """The autotune configuration of the last compiled launch (None before one, or under the
    interpreter): what the benchmark records beside its timings."""
    cfg = getattr(_tuned_kernel, "best_config", None)
    if cfg is None:
        return None
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
