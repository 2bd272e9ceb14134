"""Single-process emulator of the patch-parallel runtime: N strips as N threads of one process,
connected by in-process mailboxes instead of a process group.

Every rank runs a real `PatchSession` under its front door (`parafuse.runtime.emulate` for the
built-in models, `parafuse.diffusers.emulator.emulate_pipeline` for pipelines) - the same patch
layers, the same exchange engine, the same stale buffers - over a `ThreadTransport`. Asynchronous modes are deterministic (step t always
uses what was sent during step t-1), so a distributed run must equal this emulator to float
tolerance; that is what makes the approximate modes testable without GPUs.

With `device="cuda"` the N ranks share one GPU, each thread issuing its work on its own stream and
every exchange a device copy ordered by events as NCCL orders it (`StreamOrder`): the real
multi-rank exchange, its data and its overlap, where NCCL refuses two ranks on one device.
(CUDA graphs are not available there: a graph cannot wait on another thread's capture.)
"""
from __future__ import annotations

import contextlib
import logging
import threading

import torch

from parafuse.parallel.distributed import ParallelLayout
from parafuse.parallel.transport import ThreadHub, ThreadTransport


def emulate_ranks(world_size: int, config, body, device: str = "cpu", strict: bool = True,
                  link: tuple[float, float] | None = None) -> None:
    """`body(layout, transport)` once per emulated rank of a job run with `config` (a PatchConfig:
    its CFG degree and channels), each on its own thread (and, on CUDA, its own stream), connected
    by one `ThreadHub`: what both front doors' emulators run on. `strict`: the transport enforces
    NCCL's rules (see ThreadHub) and poisons receive buffers. `link` (latency s, bandwidth B/s): a
    modelled link, one FIFO per rank and communicator (ThreadHub)."""
    hub = ThreadHub(world_size, strict=strict, link=link)
    cuda = torch.device(device).type == "cuda"

    def run(rank: int):
        with torch.cuda.stream(torch.cuda.Stream(device)) if cuda else contextlib.nullcontext():
            layout = ParallelLayout(rank, world_size, 2 if config.cfg_parallel else 1)
            body(layout, ThreadTransport(rank, hub, layout.patch_ranks, **config.channels()))
            if cuda:
                torch.cuda.current_stream().synchronize()    # results are read on other streams

    run_ranks(hub, run)


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

    warm_logger_caches()
    threads = [threading.Thread(target=run, args=(r,), name=f"emulated-rank-{r}") for r in range(hub.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, err = min(errors, key=lambda e: isinstance(e[1], RuntimeError) and "stopped" in str(e[1]))
        raise RuntimeError(f"emulated rank {rank} failed: {type(err).__name__}: {err}") from err


def warm_logger_caches() -> None:
    """Fill every logger's level cache, which any level change empties. Under torch.compile the
    ranks' threads share dynamo's compile lock: a logger whose cache misses takes logging's module
    lock and runs Python frames under it, which wait for the compile lock, while a rank compiling
    meanwhile logs and waits for the logging lock - the two deadlock (seen, a process idle for
    minutes). Warm caches take no lock. Not needed where each rank is a process of its own."""
    for logger in [logging.getLogger()] + list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
                logger.isEnabledFor(level)
