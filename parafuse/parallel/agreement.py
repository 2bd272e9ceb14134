"""Ranks that were started alike: named values compared across every rank of a job.

Ranks launched with different arguments (a seed, a mode, an image size) would otherwise stitch
strips of different images together, or post exchanges of different sizes and abort inside the
backend. `check_same` compares a digest of each named value across the ranks and, if any differ,
raises the same one-line `DisagreementError` on every rank, naming the values and the ranks.

One exchange, whatever the number of values: every rank writes its digests (64 bits each) into
its own row of a [world, values] int64 tensor of zeros, and a sum over the ranks gives every rank
every row (zeros added to a value change nothing). The sum runs over torch.distributed when it is
initialized, or over a `Transport` (`agree`: the thread emulator's ThreadHub included).
"""
from __future__ import annotations

import hashlib

import torch


class DisagreementError(ValueError):
    """The ranks of one job were given different values; the message names them and the ranks."""


def digest(value) -> int:
    """64 bits of the SHA-256 of `value`: a tensor by its dtype, shape and bytes, anything else by
    its repr (numbers, strings, tuples and dicts of them repr the same on every rank)."""
    h = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def check_same(values: dict[str, object], what: str = "arguments", transport=None) -> None:
    """Raise DisagreementError on every rank if any named value differs between ranks. Every rank
    must call it with the same names in the same order (a name missing on one rank is itself a
    difference). `transport`: sum over it (emulated ranks); None: over torch.distributed when it is
    initialized; a single process has nothing to compare."""
    rank, world, total = _ranks(transport)
    if world == 1:
        return
    names = list(values)
    table = torch.zeros(world, len(names) + 1, dtype=torch.int64)
    table[rank, 0] = digest(tuple(names))
    for i, name in enumerate(names, 1):
        table[rank, i] = digest(values[name])
    table = total(table)
    if len(set(table[:, 0].tolist())) > 1:
        raise DisagreementError(f"ranks disagree on {what}: {_split(table[:, 0].tolist())} compare different "
                                f"sets of values (different versions of the program?)")
    differ = [f"{name} ({_split(table[:, i].tolist())})" for i, name in enumerate(names, 1)
              if len(set(table[:, i].tolist())) > 1]
    if differ:
        raise DisagreementError(f"ranks disagree on {what}: {'; '.join(differ)}: start every rank with the same "
                                f"values")


def _split(column: list[int]) -> str:
    """'rank 1 differs from rank 0' in words: the ranks grouped by value, rank 0's group first."""
    groups: dict[int, list[int]] = {}
    for r, v in enumerate(column):
        groups.setdefault(v, []).append(r)
    parts = [("rank " if len(g) == 1 else "ranks ") + ", ".join(map(str, g)) for g in groups.values()]
    return " vs ".join(parts)


def _ranks(transport):
    """(rank, world size, the sum over ranks of an int64 CPU tensor)."""
    if transport is not None:
        def total(t):
            transport.agree(t).wait()
            return t
        return transport.rank, transport.world_size, total
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, None

    def total(t):
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        t = t.to(device)
        dist.all_reduce(t)
        return t.cpu()
    return dist.get_rank(), dist.get_world_size(), total


def tensors_of_rank0(tensors: list[torch.Tensor], transport) -> list[torch.Tensor]:
    """Rank 0's `tensors` (CPU, any dtypes and shapes, the same on every rank) on every rank of the
    job, in one sum over `transport` (`agree`): their bytes packed into int64 words, which the
    other ranks leave at zero."""
    raw = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    sizes = [r.numel() for r in raw]
    words = torch.zeros(-(-sum(sizes) // 8), dtype=torch.int64)
    if transport.rank == 0:
        words.view(torch.uint8)[:sum(sizes)] = torch.cat(raw)
    transport.agree(words).wait()
    parts = words.view(torch.uint8)[:sum(sizes)].split(sizes)
    return [p.clone().view(t.dtype).view(t.shape) for p, t in zip(parts, tensors)]


def from_rank0(message: str | None) -> str | None:
    """Rank 0's `message` on every rank (torch.distributed; a single process keeps its own): a
    verdict that only rank 0 can reach, such as whether an output folder takes new files."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]
