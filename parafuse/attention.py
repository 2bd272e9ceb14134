"""Scaled dot-product attention behind one function, so backends can be swapped in one place.

`attention(q, k, v)` takes [B, heads, L, d] tensors (any strides: the patch-parallel K/V buffer is
a strided view) and returns [B, heads, Lq, d]. The backend is chosen once per process with
`set_backend`; "sdpa" (PyTorch's scaled_dot_product_attention) is available everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")
_backend = "sdpa"


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain reference: softmax(q k^T / sqrt(d)) v, in float32."""
    scale = q.shape[-1] ** -0.5
    w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return (w @ v.float()).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if _backend == "math":
        return attention_math(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
