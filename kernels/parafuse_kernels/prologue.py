"""The SD3/Flux q prologue as plain PyTorch ops: the reference the halo attention kernel fuses, and
the ops every other attention backend runs (parafuse.attention imports them from here: the kernel
package is the lower layer and imports nothing from parafuse). No Triton import: safe to import
anywhere, before or without TRITON_INTERPRET."""
from __future__ import annotations

import torch


def rms_norm(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim in float32 (SD3/Flux QK-norm)."""
    t = t.float()
    return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + eps) * weight.float()


def rotate_pairs(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (t[..., 2i], t[..., 2i+1]) by angles with cos/sin [L, d/2], in
    float32 (Flux's rotation; diffusers' [L, d] tables with repeated entries are cos[:, ::2])."""
    pairs = t.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.float(), sin.float()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def q_prologue(q: torch.Tensor, q_norm=None, rope=None) -> torch.Tensor:
    """The q prologue as separate ops, rounded to q's dtype (what the Triton backend fuses)."""
    if q_norm is None and rope is None:
        return q
    t = q.float()
    if q_norm is not None:
        t = rms_norm(t, *q_norm)
    if rope is not None:
        t = rotate_pairs(t, *rope)
    return t.to(q.dtype)
