"""Halo attention: a flash-attention forward over a strip's queries and its layer's K/V buffer,
beside its PyTorch reference.

    halo_attention(q, k, v, scale=None, q_norm=None, rope=None) -> (out, lse)

`q` [B, H, Lq, D] are the strip's queries; `k`, `v` [B, H, Lk, D] are views with any strides -
in the patch runtime, head views of the K/V buffer [tokens, B, 2*dim] laid out [rows from above |
local rows | rows from below] (a token range of it, e.g. a `partial` window, is a slice of that
view): the kernel reads the buffer where it lies, nothing is copied or concatenated. It returns
the output [B, H, Lq, D] (a view of a [B, Lq, H, D] tensor, so that merging the heads back into
[B, Lq, H*D] is free) and the log-sum-exp [B, H, Lq] in float32 (natural log, of the scaled
scores), with which partial attentions over disjoint key sets merge exactly.

The optional prologue touches only q, in float32, in this order (SD3/Flux): RMS QK-norm over the
head dim with weight `q_norm = (weight [D], eps)`, then RoPE `rope = (cos, sin)` [Lq, D/2] on
interleaved pairs (q[2i], q[2i+1]) as Flux rotates them; `scale` (default D^-0.5) multiplies the
scores. Keys are normed and rotated once, when they are written into the buffer (a neighbour's
stale keys arrive already rotated), so the kernel never touches them.

Head dims 64, 72, 80, 96 and 128 (any D ≥ 1): the head dim is padded to a power of two with
masked loads. bf16/fp16 run the dots on tensor cores with float32 accumulation; fp32 runs them in
IEEE float32 (`input_precision="ieee"`: on Hopper an fp32 `tl.dot` would otherwise be TF32), so
the source tested under the interpreter is the source compiled on the GPU. One exception, forced
by the interpreter: its bf16 `tl.dot` (Triton 3.6; numpy has no bf16) multiplies garbage, so under
the interpreter bf16 dot operands are upcast to float32 first (the products of bf16 values are exact
in float32, so the result is what a tensor core computes up to the order of accumulation); fp16 and
fp32 run the same dot in both.

The key loop's trip count is a compile-time constant (keys rounded up to `KV_ROUND`, the tail
masked): Triton 3.6's interpreter cannot loop over a runtime bound, and a constant bound keeps the
loop a pipelined `for` on the GPU. A run compiles one variant per distinct rounded key count (per
attention level and step plan: a handful).

Import this module only after TRITON_INTERPRET is set when testing on CPU (see the package).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from parafuse.attention import q_prologue       # the prologue's reference: the other backends' own ops
from parafuse_kernels import INTERPRETED, INTERPRETER_LOCK

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


# ---- kernel --------------------------------------------------------------------------------------
@triton.jit
def _halo_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, norm_w_ptr, cos_ptr, sin_ptr,
        sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_m, so_d,
        heads, lq, lk, qk_scale_log2, norm_eps,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, LK_ROUNDED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        QK_NORM: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    block_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)          # token offsets times strides can pass 2**31 at 4K, batch > 1
    dims = tl.arange(0, D_PAD)
    row_ok = rows < lq
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q_base = q_ptr + b * sq_b + h * sq_h
    q = tl.load(q_base + rows64[:, None] * sq_m + dims[None, :] * sq_d, mask=q_mask, other=0.0)

    # prologue on q, in float32: RMS norm over the head dim, then RoPE on interleaved pairs
    if QK_NORM or ROPE:
        qf = q.to(tl.float32)
        if ROPE:     # each element's partner in its pair: index d ^ 1
            partner = tl.load(q_base + rows64[:, None] * sq_m + (dims ^ 1)[None, :] * sq_d, mask=q_mask,
                              other=0.0).to(tl.float32)
        if QK_NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(qf * qf, axis=1) / HEAD_DIM + norm_eps)
            qf = qf * rstd[:, None] * tl.load(norm_w_ptr + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
            if ROPE:
                partner = partner * rstd[:, None] * tl.load(norm_w_ptr + (dims ^ 1), mask=dim_ok,
                                                            other=0.0).to(tl.float32)[None, :]
        if ROPE:
            half = HEAD_DIM // 2
            table = rows[:, None] * half + (dims // 2)[None, :]
            cos = tl.load(cos_ptr + table, mask=q_mask, other=0.0)
            sin = tl.load(sin_ptr + table, mask=q_mask, other=0.0)
            sign = tl.where(dims % 2 == 0, -1.0, 1.0)[None, :]   # (a, b) -> (a cos - b sin, b cos + a sin)
            qf = qf * cos + partner * sin * sign
        q = qf.to(q_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    for start in range(0, LK_ROUNDED, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < lk
        cols64 = cols.to(tl.int64)
        kt = tl.load(k_base + cols64[None, :] * sk_n + dims[:, None] * sk_d,
                     mask=dim_ok[:, None] & col_ok[None, :], other=0.0)          # [D_PAD, BLOCK_N]
        if UPCAST_DOT:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt, input_precision=PRECISION)
        s = s * qk_scale_log2                                                    # scores in log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows past lq see no finite score in a block past lk: keep them NaN-free
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_base + cols64[:, None] * sv_n + dims[None, :] * sv_d,
                     mask=col_ok[:, None] & dim_ok[None, :], other=0.0)          # [BLOCK_N, D_PAD]
        p = p.to(vb.dtype)                       # rounded to the storage dtype, as flash attention does
        if UPCAST_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), vb.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + rows64[:, None] * so_m + dims[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453                          # log2 -> natural log
    tl.store(lse_ptr + bh.to(tl.int64) * lq + rows, lse, mask=row_ok)


# Hopper candidates (not run in the session that wrote them: no GPU); the interpreter uses one
# small fixed configuration instead (each program instance costs milliseconds there).
# Eight, so that a fresh machine compiles them in seconds per head dim.
HOPPER_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                  for bm, bn, w, s in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                       (128, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4))]
_tuned_kernel = triton.autotune(HOPPER_CONFIGS, key=["lq", "LK_ROUNDED", "HEAD_DIM", "QK_NORM", "ROPE"])(
    _halo_attention_kernel)
KV_ROUND = 16 if INTERPRETED else 128       # a multiple of every BLOCK_N above
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _check(q, k, v, q_norm, rope):
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
    if q_norm is not None and q_norm[0].shape != (d,):
        raise ValueError(f"the q-norm weight must be [{d}], got {tuple(q_norm[0].shape)}")
    if rope is not None:
        if d % 2:
            raise ValueError(f"RoPE rotates pairs: the head dim must be even, got {d}")
        for t in rope:
            if t.shape != (q.shape[2], d // 2):
                raise ValueError(f"RoPE cos/sin must be [{q.shape[2]}, {d // 2}], got {tuple(t.shape)}")


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   q_norm: tuple[torch.Tensor, float] | None = None,
                   rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q` over `k`, `v` (strided views allowed), with the optional q prologue; returns
    (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32). One launch, grid (query blocks, B·H)."""
    _check(q, k, v, q_norm, rope)
    b, heads, lq, d = q.shape
    lk = k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    out = torch.empty((b, lq, heads, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b, heads, lq), dtype=torch.float32, device=q.device)
    norm_w, eps = (q_norm[0].contiguous(), float(q_norm[1])) if q_norm is not None else (q, 0.0)
    cos, sin = ((rope[0].float().contiguous(), rope[1].float().contiguous()) if rope is not None else (q, q))
    args = (q, k, v, out, lse, norm_w, cos, sin, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, lq, lk, scale / math.log(2), eps)
    meta = dict(HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)), LK_ROUNDED=triton.cdiv(lk, KV_ROUND) * KV_ROUND,
                QK_NORM=q_norm is not None, ROPE=rope is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST_DOT=INTERPRETED and q.dtype == torch.bfloat16)
    with INTERPRETER_LOCK:
        if INTERPRETED:
            grid = (triton.cdiv(lq, INTERPRETER_BLOCKS["BLOCK_M"]), b * heads)
            _halo_attention_kernel[grid](*args, **meta, **INTERPRETER_BLOCKS)
        else:
            _tuned_kernel[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * heads)](*args, **meta)
    LAUNCHES["halo_attention"] += 1
    return out, lse
