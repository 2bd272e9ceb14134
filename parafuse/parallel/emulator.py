"""Single-process emulator of the patch-parallel runtime: N strips as N threads of one process,
connected by in-process mailboxes instead of a process group.

Every rank runs the real `Runtime` - the same patch layers, the same exchange engine, the same
stale buffers - over a `ThreadTransport`. Asynchronous modes are deterministic (step t always
uses what was sent during step t-1), so a distributed run must equal this emulator to float
tolerance; that is what makes the approximate modes testable without GPUs.

With `device="cuda"` the N ranks share one GPU, each thread issuing its work on its own stream and
every exchange a device copy ordered by events as NCCL orders it (`StreamOrder`): the real
multi-rank exchange, its data and its overlap, where NCCL refuses two ranks on one device.
(CUDA graphs are not available there: a graph cannot wait on another thread's capture.)
"""
from __future__ import annotations

import contextlib
import copy
import threading

import torch
import torch.nn as nn

from parafuse.parallel.distributed import ParallelLayout
from parafuse.parallel.transport import ThreadHub, ThreadTransport


def emulate(model: nn.Module, world_size: int, parallel, requests, device: str = "cpu",
            on_rank=None, dtype=None, strict: bool = True, kernels: str = "torch"):
    """Run `requests` (one Request or a list) on `world_size` emulated ranks.

    Returns (runtimes, results): per rank, its Runtime and its list of Results (in request order).
    `on_rank(runtime)` is called in each rank's thread after set-up (tests use it to add hooks).
    `strict`: the transport enforces NCCL's rules (see ThreadHub) and poisons receive buffers."""
    from parafuse.runtime import Runtime

    requests = requests if isinstance(requests, (list, tuple)) else [requests]
    hub = ThreadHub(world_size, strict=strict)
    cfg_degree = 2 if parallel.cfg_parallel else 1
    runtimes: list = [None] * world_size
    results: list = [None] * world_size

    def rank_stream():
        if torch.device(device).type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(device))

    def run(rank: int):
        with rank_stream():
            layout = ParallelLayout(rank, world_size, cfg_degree)
            rt = Runtime(copy.deepcopy(model), parallel, device, layout=layout,
                         transport=ThreadTransport(rank, hub, layout.patch_ranks), dtype=dtype, kernels=kernels)
            runtimes[rank] = rt
            if on_rank is not None:
                on_rank(rt)
            results[rank] = [rt.generate(r) for r in requests]
            rt.close()
            if torch.device(device).type == "cuda":
                torch.cuda.current_stream().synchronize()    # results are read on other streams

    run_ranks(hub, run)
    return runtimes, results


def run_ranks(hub: ThreadHub, body) -> None:
    """`body(rank)` on one thread per rank of `hub`. A failing rank fails the hub, so that its peers
    stop waiting on it; the error re-raised is the first cause, not a peer's "stopped" that followed."""
    errors: list = []

    def run(rank: int):
        try:
            body(rank)
        except BaseException as e:     # noqa: BLE001 - reported below, after every thread stopped
            hub.fail(f"rank {rank} failed: {type(e).__name__}: {e}")
            errors.append((rank, e))

    threads = [threading.Thread(target=run, args=(r,), name=f"emulated-rank-{r}") for r in range(hub.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, err = min(errors, key=lambda e: isinstance(e[1], RuntimeError) and "stopped" in str(e[1]))
        raise RuntimeError(f"emulated rank {rank} failed: {type(err).__name__}: {err}") from err
