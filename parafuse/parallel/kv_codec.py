"""One-bit stale K/V: what a strip sends of its keys/values on stale steps with `kv_codec="sign"`.

On a stale step a rank attends to what its peers sent during the previous step; `full` sends the
exact K/V of its strip (DistriFusion's traffic). With the sign codec the receivers instead hold a
*mirror* of each peer's K/V, and the sender - which keeps the same mirror of its own rows - sends
only what moves the mirror towards the truth:

    prediction   P = M + D                        (M: the mirror, D: its last increment; a linear
                                                   extrapolation, both sides compute it)
    residual     r = K - P                        (K: this step's K/V of the sender's rows)
    message      sign(r), 1 bit an element, and s = mean |r| over the channels of K, and of V, of
                 each token (two scales a token, in the model dtype)
    update       D += s * sign(r);   M += D        (sender and receivers, the same ops in the same
                                                   order on the same bits: the mirrors stay equal)

The residual is taken against the mirror, not against the last truth, so what one step's bit
loses the next step's residual contains (error feedback); the prediction makes the residual small,
since K/V drift smoothly over the denoising steps. A message is 2C/8 + 2 * itemsize bytes a token
where the exact one is 2C * itemsize: 7% of it in bf16 at C = 128, 6.3% at C = 1152 (PixArt).
On `dit-texture` at 256², N = 8, 4 seeds, it lands 0.5 dB below the exact stale K/V in fp32 and
in bf16 (docs/modes.md, docs/performance.md, `benchmarks/quality.py`).

The mirrors start equal to the exact K/V of the last synchronous step, with D = 0 (the engine
seeds them there: `ExchangeEngine.exchange_kv`).
"""
from __future__ import annotations

import torch

CODECS = ("none", "sign")
_SHIFTS = {}


def check_channels(channels: int, where: str) -> None:
    """The scales are stored inside the byte payload, after the sign bytes: 2C/8 bytes must be a
    multiple of a float32's 4 bytes."""
    if channels % 16:
        raise ValueError(f"kv_codec='sign' packs the K/V signs 8 to a byte with the scales after them, which needs "
                         f"an attention width divisible by 16; {where} is {channels} wide: use --kv-codec none "
                         f"(kv_codec='none')")


def payload_bytes(channels: int, dtype: torch.dtype) -> int:
    """Bytes a token (one batch entry) of K|V of `channels` each: the sign bytes, then two scales."""
    return 2 * channels // 8 + 2 * dtype.itemsize


def bit_shifts(device: torch.device) -> torch.Tensor:
    """0..7 as uint8 on `device`, made once (the engine makes it when it allocates, so that a CUDA
    graph capture never allocates it)."""
    device = torch.device(device)
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def split_payload(payload: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign bytes [T, B, 2C/8], scales [T, B, 2] in `dtype`) of a payload [T, B, bytes]."""
    nsign = payload.shape[-1] - 2 * dtype.itemsize
    return payload[..., :nsign], payload[..., nsign:].view(dtype)


def _step(positive: torch.Tensor, scales: torch.Tensor, mirror: torch.Tensor, drift: torch.Tensor) -> None:
    """The update both sides run: D += s * sign(r); M += D."""
    t, b, c2 = mirror.shape
    s = scales[..., None]
    step = torch.where(positive.view(t, b, 2, c2 // 2), s, -s).view(t, b, c2)
    drift += step
    mirror += drift


def encode(fresh: torch.Tensor, mirror: torch.Tensor, drift: torch.Tensor, payload: torch.Tensor) -> None:
    """Write the message for `fresh` [T, B, 2C] (this step's K|V of the sent rows) into `payload`
    [T, B, payload_bytes] and advance this side's `mirror` and `drift` of those rows."""
    t, b, c2 = fresh.shape
    residual = fresh - (mirror + drift)
    scales = residual.view(t, b, 2, c2 // 2).abs().mean(-1, dtype=torch.float32)
    signs, stored = split_payload(payload, fresh.dtype)
    stored.copy_(scales)          # rounded to the model dtype here: the receivers get these bits
    positive = residual >= 0
    weights = positive.view(t, b, c2 // 8, 8).to(torch.uint8) << bit_shifts(fresh.device)
    signs.copy_(weights.sum(-1, dtype=torch.uint8))      # the 8 bits are disjoint: their sum is their OR
    _step(positive, stored, mirror, drift)


def decode(payload: torch.Tensor, mirror: torch.Tensor, drift: torch.Tensor) -> None:
    """Advance the receiver's `mirror` and `drift` [T, B, 2C] of a peer's rows by its message."""
    t, b, c2 = mirror.shape
    signs, scales = split_payload(payload, mirror.dtype)
    positive = ((signs[..., None] >> bit_shifts(signs.device)) & 1).view(t, b, c2).bool()
    _step(positive, scales, mirror, drift)
