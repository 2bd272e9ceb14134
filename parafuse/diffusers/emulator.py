"""The thread emulator for diffusers pipelines: N ranks as N threads of one process, each with its
own copy of the pipeline, connected by the same in-process transport as `parafuse.parallel.emulator`
(the real exchange engine, NCCL's matching rules enforced). Asynchronous modes are deterministic,
so a torchrun job must equal this emulator to float tolerance."""
from __future__ import annotations

import copy

from parafuse.parallel.distributed import ParallelLayout
from parafuse.parallel.emulator import run_ranks
from parafuse.parallel.engine import DEFAULT_HALO_PORTION
from parafuse.parallel.transport import ThreadHub, ThreadTransport


def emulate_pipeline(pipe, world_size: int, call, mode: str = "sync", halo_portion: float = DEFAULT_HALO_PORTION,
                     warmup_steps: int = 4, cfg_parallel: bool = False, norm_mode: str | None = None,
                     text_merge: str | None = None, kv_codec: str = "none"):
    """Run `call(parallel_pipe)` on `world_size` emulated ranks; returns per rank (call's result,
    the rank's `rank_stats`). `call` runs once per rank: give each its own generator inside it."""
    from parafuse.diffusers.pipeline import parallelize

    hub = ThreadHub(world_size)
    outputs: list = [None] * world_size

    def run(rank: int):
        layout = ParallelLayout(rank, world_size, 2 if cfg_parallel else 1)
        par = parallelize(copy.deepcopy(pipe), mode, halo_portion, warmup_steps, cfg_parallel, norm_mode,
                          text_merge=text_merge, kv_codec=kv_codec, layout=layout, transport=ThreadTransport(rank, hub, layout.patch_ranks))
        result = call(par)
        par.close()
        outputs[rank] = (result, par.rank_stats)

    run_ranks(hub, run)
    return outputs
