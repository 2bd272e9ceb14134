"""Scaled dot-product attention behind one function, so that backends are swapped in one place.

    out = attention(q, k, v)                         # [B, heads, Lq, d]
    out, lse = attention(q, k, v, return_lse=True)   # lse [B, heads, Lq] float32 (natural log)
    out = attention(q, k, v, scale=s, q_norm=(w, eps), rope=(cos, sin))   # SD3/Flux q prologue

q, k, v are [B, heads, L, d] tensors with any strides: the patch layers pass head views of their
K/V buffer [tokens, B, 2*dim] (never copied). The log-sum-exp of the scaled scores lets partial
attentions over disjoint key sets be merged exactly (text queries across ranks). Every model
attention (plain and patch layers, the diffusers integration) calls this function.

Backends (one per process; `use_backend(name, device)` checks and sets it - the `Runtime` calls it
with its `attention_backend` argument, the CLI's --attention-backend; the default comes from the
environment variable PARAFUSE_ATTENTION_BACKEND, else "auto"):
    sdpa      torch.nn.functional.scaled_dot_product_attention (cuDNN / flash / efficient / CPU
              kernels, torch picks); its log-sum-exp, when asked for, is one separate pass
    triton    parafuse_kernels.attention.halo_attention (returns its lse for free); CUDA, or CPU
              through Triton's interpreter (TRITON_INTERPRET=1, tests)
    xformers  xformers.ops.memory_efficient_attention (optional: `pip install parafuse[xformers]`;
              CUDA only); lse as for sdpa
    math      the float32 reference softmax(q kᵀ / √d) v, for tests
    auto      the fastest measured per device class, head dim and shape class (attention_auto.json,
              written by benchmarks/kernel_timings.py on a GPU; SDPA where nothing is measured); says which, once
An unavailable backend is an error that says what to do, raised before any compute - never a silent
fallback to another backend.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

# the prologue's ops live in the kernel package (the lower layer: it imports nothing from parafuse)
from parafuse_kernels.grid import kv_splits, programs
from parafuse_kernels.prologue import q_prologue

BACKENDS = ("auto", "triton", "sdpa", "xformers", "math")
ENV = "PARAFUSE_ATTENTION_BACKEND"
# what `auto` picks per device type. cuda: SDPA, which dispatches to cuDNN at strip shapes (its GPU
# figures: docs/performance.md; the facts: docs/design.md §1); the Triton kernel's GPU figures are pending
# measurement (benchmarks/kernel_timings.py), so it is not picked until they say it is faster.
AUTO = {"cpu": "sdpa", "cuda": "sdpa"}
# on CUDA, per (device class, head dim, shape class), the backend benchmarks/kernel_timings.py measured
# fastest; until a GPU run writes it, every entry keeps SDPA and says "pending"
AUTO_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_auto.json")
AUTO_CHOICES = ("triton", "triton-tma", "sdpa")     # triton-tma: the kernel with K/V by TMA descriptors
SHAPE_CLASSES = ("short", "long")     # short: the Triton kernel would split the keys (SMs idle otherwise)
log = logging.getLogger("parafuse.attention")

_backend = os.environ.get(ENV, "auto")
_auto_said: set[str] = set()


class BackendError(ValueError):
    """An attention backend that does not exist or cannot run here; the message says what to do."""


def check_backend(name: str, device: torch.device | str) -> str:
    """The backend that `name` means on `device` (auto resolved), or BackendError if it cannot run."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise BackendError(f"unknown attention backend {name!r} (from --attention-backend or {ENV}); "
                           f"valid: {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_available():
            picks = sorted({e["backend"] for key, e in _auto_entries().items() if key[0] == device_class(device)})
            if picks != ["sdpa"] and picks:
                return "+".join(picks) + " (auto, by head dim and shape: attention_auto.json)"
        return AUTO.get(device.type, "sdpa")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise BackendError("attention backend 'triton' needs the triton package; install it or use "
                               "--attention-backend sdpa")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError(f"attention backend 'triton' needs a CUDA device (this run is on {device.type}), "
                               f"or TRITON_INTERPRET=1 to run it through Triton's interpreter; or use "
                               f"--attention-backend sdpa")
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise BackendError("attention backend 'xformers' needs the xformers package: pip install "
                               "'parafuse[xformers]' (it keeps the installed torch), or use --attention-backend sdpa")
        if device.type != "cuda":
            raise BackendError(f"attention backend 'xformers' runs on CUDA only (this run is on {device.type}); "
                               f"use --attention-backend sdpa")
    return name


def use_backend(name: str | None, device: torch.device | str) -> str:
    """Check `name` for `device` and make it the process's backend (None: keep the current one - the
    environment variable's, else auto - and check it); returns the backend that will run."""
    global _backend
    resolved = check_backend(_backend if name is None else name, device)
    if name is not None:
        _backend = name
    return resolved


def set_backend(name: str) -> None:
    """Set the backend by name only; `use_backend` also checks that it can run on a device."""
    global _backend
    if name not in BACKENDS:
        raise BackendError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The backend as asked for ("auto" included)."""
    return _backend


def backend_for(device: torch.device | str) -> str:
    """The backend that runs on `device` (auto resolved): what the run report records."""
    return check_backend(_backend, device)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   return_lse: bool = False):
    """Plain reference: softmax(scale · q kᵀ) v in float32 (scale = d^-1/2 by default)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, -1)
    out = (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype)
    return (out, lse) if return_lse else out


def check_auto_table(table: dict) -> dict:
    """{(device class, head dim, shape class): entry} of a well-formed auto table, else ValueError:
    entries with those keys, once each, a backend of AUTO_CHOICES and its source; an entry picking
    the Triton kernel carries the measured times that made it the faster."""
    entries = {}
    for e in table.get("entries", []):
        key = (e.get("device"), e.get("head_dim"), e.get("shape"))
        if not (isinstance(key[0], str) and isinstance(key[1], int) and key[1] > 0 and key[2] in SHAPE_CLASSES):
            raise ValueError(f"auto table entry {e} needs device (str), head_dim (int > 0), shape in {SHAPE_CLASSES}")
        if key in entries:
            raise ValueError(f"auto table: {key} appears twice")
        if e.get("backend") not in AUTO_CHOICES or not isinstance(e.get("source"), str):
            raise ValueError(f"auto table entry {e}: backend must be one of {AUTO_CHOICES}, with a source")
        if e["backend"] != "sdpa" and not (e.get("triton_us", float("inf")) < e.get("sdpa_us", 0)):
            raise ValueError(f"auto table entry {e} picks {e['backend']} without measured times that say it is faster")
        entries[key] = e
    return entries


@functools.lru_cache(maxsize=None)
def _auto_entries(path: str = AUTO_TABLE) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return check_auto_table(json.load(f))


@functools.lru_cache(maxsize=None)
def _cuda_class(index: int) -> tuple[str, int]:
    props = torch.cuda.get_device_properties(index)
    return f"sm{props.major}{props.minor}", props.multi_processor_count


def device_class(device: torch.device) -> str:
    """What the auto table is keyed by: the compute capability on CUDA (sm90 for H100 and H200)."""
    return _cuda_class(device.index or 0)[0] if device.type == "cuda" else device.type


def shape_class(batch_heads: int, queries: int, keys: int, sms: int) -> str:
    """"short" where the grid of 128-query blocks x (batch x heads) leaves enough SMs idle that the
    Triton kernel splits the keys (parafuse_kernels.grid's rule), else "long"."""
    return "short" if kv_splits(programs(queries, batch_heads), keys, sms) > 1 else "long"


def auto_pick(entries: dict, key: tuple[str, int, str]) -> tuple[str, str]:
    """(backend, why) for (device class, head dim, shape class) from checked auto-table entries."""
    entry = entries.get(key)
    if entry is None:
        return AUTO["cuda"], f"{key}: not in the auto table"
    if entry["backend"] != "sdpa" and importlib.util.find_spec("triton") is None:
        return "sdpa", f"{key}: the table picks triton, which is not installed"
    return entry["backend"], f"{key}: {entry['source']}"


def auto_backend(q: torch.Tensor, keys: int) -> tuple[str, str]:
    """(backend, why) that `auto` runs for queries `q` [B, H, Lq, D] over `keys` keys: the table's
    measured pick for this device class, head dim and shape class on CUDA, else AUTO's."""
    if q.device.type != "cuda":
        return AUTO.get(q.device.type, "sdpa"), q.device.type.upper()
    cls, sms = _cuda_class(q.device.index or 0)
    shape = shape_class(q.shape[0] * q.shape[1], q.shape[2], keys, sms)
    return auto_pick(_auto_entries(), (cls, q.shape[-1], shape))


def _lse(q, k, scale):
    """The log-sum-exp of the scaled scores, for backends that do not return it (one extra pass)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * scale, -1)


def _resolve(q: torch.Tensor, keys: int) -> str:
    if _backend != "auto":
        return _backend
    name, why = auto_backend(q, keys)
    said = q.device.type if q.device.type != "cuda" else why
    if said not in _auto_said:
        _say_backend(said, name, q.device.type, why)
    return name


# outside torch.compile's frame hook: logging holds its module lock while it runs Python frames, which
# under the hook wait for dynamo's compile lock; a thread compiling meanwhile (another emulated rank)
# that logs waits for the logging lock - the two deadlocked
@torch.compiler.disable
def _say_backend(said: str, name: str, device: str, why: str) -> None:
    _auto_said.add(said)
    log.info("attention backend auto -> %s on %s (%s)", name, device, why)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              return_lse: bool = False, q_norm: tuple[torch.Tensor, float] | None = None,
              rope: tuple[torch.Tensor, torch.Tensor] | None = None):
    """softmax(scale · q' kᵀ) v over [B, heads, L, d] views (see the module); with `return_lse`,
    (out, lse [B, heads, Lq] float32). q' is q after the optional prologue - RMS QK-norm
    `q_norm = (weight [d], eps)`, then RoPE `rope = (cos, sin)` [Lq, d/2] on interleaved pairs -
    fused into the Triton kernel, separate ops (`q_prologue`) on the other backends. Keys are
    expected normed and rotated already (done once, when they are written to the K/V buffer)."""
    # a shape-only trace (meta or fake tensors: parafuse.profile) runs no kernel: SDPA's shape rule
    backend = "sdpa" if q.device.type == "meta" or isinstance(q, FakeTensor) else _resolve(q, k.shape[2])
    if backend in ("triton", "triton-tma"):
        from parafuse_kernels.attention import halo_attention, tma_ok
        tma = backend == "triton-tma" and tma_ok(k, v)      # auto's pick; views TMA cannot describe run without
        out, lse = halo_attention(q, k, v, scale=scale, q_norm=q_norm, rope=rope, tma=tma)
        return (out, lse) if return_lse else out
    q = q_prologue(q, q_norm, rope)
    if backend == "math":
        return attention_math(q, k, v, scale, return_lse)
    if backend == "xformers":
        import xformers.ops as xops        # [B, L, heads, d] layout: the transposed views, no copy
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=scale).transpose(1, 2)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return (out, _lse(q, k, scale)) if return_lse else out
