"""The thread emulator for diffusers pipelines: N ranks as N threads of one process, each with its
own copy of the pipeline, on the same emulator as the built-in models
(`parafuse.parallel.emulator.emulate_ranks`: the real exchange engine, NCCL's matching rules
enforced). Asynchronous modes are deterministic, so a torchrun job must equal this emulator to
float tolerance."""
from __future__ import annotations

import copy

from parafuse.parallel.config import PatchConfig
from parafuse.parallel.emulator import emulate_ranks


def emulate_pipeline(pipe, world_size: int, call, config: PatchConfig | None = None, parallel_vae: bool = True,
                     prepare=None, **settings):
    """Run `call(parallel_pipe)` on `world_size` emulated ranks; returns per rank (call's result,
    the rank's `rank_stats`). The settings: a PatchConfig and/or its fields as keywords, and
    `parallel_vae`, as `parafuse.parallelize` takes them. `call` runs once per rank: give each its
    own generator inside it. Each rank parallelizes a deep copy of `pipe`, or its own pipeline where
    `pipe` is a list of one per rank: a deep copy of a diffusers hook (layerwise casting) calls the
    original layer's forward, not the copy's (and loading pipelines in the ranks' threads is unsafe:
    diffusers' loading patches torch's module construction globally while it runs). `prepare(pipe)`,
    if given, runs on each rank's pipeline before `parallelize`: diffusers' model hooks
    (`enable_cache`) must be added there, since a copy's hooks still call the original's modules and
    state."""
    from parafuse.diffusers.pipeline import parallelize

    config = PatchConfig(**{k: v for k, v in settings.items() if v is not None}) if config is None else \
        config.replace(**settings) if settings else config
    outputs: list = [None] * world_size

    def run(layout, transport):
        own = pipe[layout.rank] if isinstance(pipe, list) else copy.deepcopy(pipe)
        if prepare is not None:
            prepare(own)
        par = parallelize(own, config, parallel_vae=parallel_vae, layout=layout, transport=transport,
                          **({"text_merge": settings["text_merge"]} if settings.get("text_merge") else {}))
        result = call(par)
        par.close()
        outputs[layout.rank] = (result, par.rank_stats)

    emulate_ranks(world_size, config, run)
    return outputs
