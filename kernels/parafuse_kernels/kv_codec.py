"""The one-bit stale K/V codec in one pass per message, beside its PyTorch reference.

    encode(fresh, mirror, drift, payload)   residual against the prediction, its mean |.| per
                                            token and half (K, V), the packed signs, and the
                                            sender's mirror update: one read of fresh, mirror and
                                            drift, one write of mirror, drift and the payload
    decode(payload, mirror, drift)          unpack, D += s·sign, M += D: one read, one write

The reference is `parafuse.parallel.kv_codec` (the PyTorch path, a dozen elementwise passes); the
arithmetic here is the reference's op for op - each sum or difference taken in float32 and rounded
to the model dtype, as PyTorch's bf16/fp16 ops round - so decode gives the reference's bits, and a
sender and its receivers agree bit for bit whichever path each used. Only the scales' float32
reduction runs in another order (the stored scale is what both sides use, so that is harmless).
One program per (token row, half): the C channels of K or V, as [C/8 bytes, 8 bits] tiles.

Import this module only after TRITON_INTERPRET is set when testing on CPU (see the package).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from parafuse.parallel import kv_codec as reference
from parafuse_kernels import INTERPRETER_LOCK

LAUNCHES = {"encode": 0, "decode": 0}     # tests check that the kernels ran

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE, rounded to nearest even as PyTorch rounds. bf16 by hand: Triton's
    interpreter truncates a plain float32 -> bf16 cast (compiled Triton rounds); once the low 16
    bits are rounded off, both casts are exact."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(DTYPE)


@triton.jit
def _advance(mirror, drift, at, mask, m, d, q, DTYPE: tl.constexpr):
    """The update both sides run, from float32 m, d and the step q: D += q; M += D, each rounded."""
    d2 = _round(d + q, DTYPE)
    tl.store(drift + at, d2, mask=mask)
    tl.store(mirror + at, _round(m + d2.to(tl.float32), DTYPE), mask=mask)


@triton.jit
def _encode_kernel(fresh, mirror, drift, signs, scales, sign_row, scale_row, C: tl.constexpr,
                   BYTES: tl.constexpr, DTYPE: tl.constexpr):
    row, half = tl.program_id(0), tl.program_id(1)
    k = tl.arange(0, BYTES)[:, None]
    bit = tl.arange(0, 8)[None, :]
    ch = k * 8 + bit
    mask = ch < C
    at = row * 2 * C + half * C + ch
    f = tl.load(fresh + at, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mirror + at, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(drift + at, mask=mask, other=0.0).to(tl.float32)
    predicted = _round(m + d, DTYPE).to(tl.float32)
    r = _round(f - predicted, DTYPE).to(tl.float32)
    s = _round(tl.sum(tl.sum(tl.where(mask, tl.abs(r), 0.0), axis=1), axis=0) / C, DTYPE)
    tl.store(scales + row * scale_row + half, s)
    positive = r >= 0
    packed = tl.sum(positive.to(tl.int32) << bit, axis=1)
    tl.store(signs + row * sign_row + half * (C // 8) + tl.arange(0, BYTES), packed.to(tl.uint8),
             mask=tl.arange(0, BYTES) < C // 8)
    s32 = s.to(tl.float32)
    _advance(mirror, drift, at, mask, m, d, tl.where(positive, s32, -s32), DTYPE)


@triton.jit
def _decode_kernel(mirror, drift, signs, scales, sign_row, scale_row, C: tl.constexpr, BYTES: tl.constexpr,
                   DTYPE: tl.constexpr):
    row, half = tl.program_id(0), tl.program_id(1)
    byte = tl.arange(0, BYTES)
    packed = tl.load(signs + row * sign_row + half * (C // 8) + byte, mask=byte < C // 8, other=0).to(tl.int32)
    bit = tl.arange(0, 8)[None, :]
    ch = byte[:, None] * 8 + bit
    mask = ch < C
    at = row * 2 * C + half * C + ch
    s32 = tl.load(scales + row * scale_row + half).to(tl.float32)
    m = tl.load(mirror + at, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(drift + at, mask=mask, other=0.0).to(tl.float32)
    _advance(mirror, drift, at, mask, m, d, tl.where(((packed[:, None] >> bit) & 1) != 0, s32, -s32), DTYPE)


def _views(payload: torch.Tensor, kv: torch.Tensor, dtype: torch.dtype):
    t, b, c2 = kv.shape
    if not (kv.is_contiguous() and payload.stride(-1) == 1 and payload.stride(0) == b * payload.stride(1)):
        raise ValueError("the codec kernels take contiguous [T, B, 2C] K/V and [T, B, bytes] payload rows")
    signs, scales = reference.split_payload(payload, dtype)
    return t * b, c2 // 2, signs, scales, payload.stride(1), scales.stride(1)


def encode(fresh: torch.Tensor, mirror: torch.Tensor, drift: torch.Tensor, payload: torch.Tensor) -> None:
    """`parafuse.parallel.kv_codec.encode` in one launch."""
    rows, c, signs, scales, sign_row, scale_row = _views(payload, fresh, fresh.dtype)
    if rows == 0:
        return
    with INTERPRETER_LOCK:
        _encode_kernel[(rows, 2)](fresh, mirror, drift, signs, scales, sign_row, scale_row, C=c,
                                  BYTES=triton.next_power_of_2(c // 8), DTYPE=_TL[fresh.dtype])
    LAUNCHES["encode"] += 1


def decode(payload: torch.Tensor, mirror: torch.Tensor, drift: torch.Tensor) -> None:
    """`parafuse.parallel.kv_codec.decode` in one launch."""
    rows, c, signs, scales, sign_row, scale_row = _views(payload, mirror, mirror.dtype)
    if rows == 0:
        return
    with INTERPRETER_LOCK:
        _decode_kernel[(rows, 2)](mirror, drift, signs, scales, sign_row, scale_row, C=c,
                                  BYTES=triton.next_power_of_2(c // 8), DTYPE=_TL[mirror.dtype])
    LAUNCHES["decode"] += 1
