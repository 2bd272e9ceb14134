"""Process layout from torchrun's environment.

world = cfg_degree x patch_degree. Patch group g holds global ranks [g*P, (g+1)*P): with torchrun
one node runs one group, so strips exchange over the fast intra-node links; the CFG pair
(r, r+P) spans the groups and swaps one strip of model output per step. Only point-to-point
operations between global ranks are used, so no sub-communicators are needed.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    cfg_degree: int = 1

    def __post_init__(self):
        if self.cfg_degree not in (1, 2):
            raise ValueError(f"cfg degree must be 1 or 2, got {self.cfg_degree}")
        if self.world_size % self.cfg_degree:
            raise ValueError(f"CFG parallel needs an even number of ranks, got {self.world_size}")

    @property
    def patch_degree(self) -> int:
        return self.world_size // self.cfg_degree

    @property
    def branch(self) -> int:
        """0: this rank computes the conditional branch (or both, without CFG parallel); 1: unconditional."""
        return self.rank // self.patch_degree

    @property
    def patch_ranks(self) -> list[int]:
        start = self.branch * self.patch_degree
        return list(range(start, start + self.patch_degree))

    @property
    def patch_index(self) -> int:
        return self.rank % self.patch_degree

    @property
    def cfg_peer(self) -> int | None:
        if self.cfg_degree == 1:
            return None
        return (self.rank + self.patch_degree) % self.world_size


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA device from LOCAL_RANK (not the global rank, so multi-node works), else CPU. A bare
    "cuda" means this rank's GPU too."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join torchrun's process group: NCCL for CUDA devices, gloo for CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        # A first collective that every rank joins: NCCL then sets up its communicator here,
        # not inside the first point-to-point batch, which only neighbours take part in.
        dist.barrier()
    return dist.get_rank(), dist.get_world_size()


def run_guarded(fn, *args, user_errors: tuple = (), **kwargs):
    """Run `fn`; if it raises on this rank, say which rank failed and why, and leave at once.
    Exceptions of the types in `user_errors` (bad input, raised alike on every rank) pass through.
    Where the watchdog finds that a peer stopped answering or never reported (its heartbeat), the
    error was that peer's doing: this rank names it in one line instead of printing a traceback.

    A rank that dies quietly leaves its neighbours waiting forever in their next exchange; exiting
    with status 1 lets torchrun stop every other rank, so the whole job fails instead of hanging."""
    import sys
    import traceback

    try:
        return fn(*args, **kwargs)
    except user_errors:
        raise
    except Exception as e:
        from parafuse import watchdog
        dog = watchdog.current()
        failure = dog.peer_failure() if dog is not None else None
        if failure is not None:         # a peer that stopped or died broke the exchange: name it, no traceback
            watchdog.exit_now(watchdog.EXIT_FAILED, f"parafuse: rank {os.environ.get('RANK', 0)}: the exchange "
                              f"failed ({type(e).__name__}) while {dog.last_what}: {failure[0]}", kill=failure[1])
        traceback.print_exc()
        print(f"parafuse: rank {os.environ.get('RANK', 0)} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
