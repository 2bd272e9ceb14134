"""parafuse: patch-parallel inference for high-resolution diffusion images.

    from parafuse import PatchConfig, Request, Runtime
    rt = Runtime("default", PatchConfig(mode="partial"))        # under torchrun: one strip per rank
    result = rt.generate(Request(height=1024, width=1024, steps=20))
    result.image                                                # [B, 3, H, W] in [-1, 1] on rank 0

    pipe = parafuse.parallelize(diffusers_pipe, mode="partial") # a diffusers pipeline, patch-parallel

Both doors take one `PatchConfig` (parafuse.parallel.config) and run on one `PatchSession`
(parafuse.parallel.session); `ParallelConfig(mode, warmup_steps, ...)` is the older spelling of a
PatchConfig and still works.
"""
from parafuse.parallel.config import (DEFAULT_HALO_PORTION, AttentionBackend, ConfigError, Dtype, Kernels, KVCodec,
                                      Mode, NormMode, PatchConfig, TextMerge)
from parafuse.parallel.session import PatchSession
from parafuse.runtime import ParallelConfig, Request, Result, Runtime


def parallelize(pipe, config: PatchConfig | None = None, **settings):
    """A diffusers pipeline whose denoiser runs patch-parallel (`parafuse.diffusers.parallelize`;
    diffusers is imported only here): `parallelize(pipe, mode="partial")` or
    `parallelize(pipe, PatchConfig(...))`. The layer swap for any model is `PatchSession.attach`."""
    from parafuse.diffusers import parallelize as parallelize_pipeline

    return parallelize_pipeline(pipe, config, **settings)


__all__ = ["Runtime", "PatchConfig", "PatchSession", "ParallelConfig", "Request", "Result", "parallelize", "Mode",
           "NormMode", "TextMerge", "KVCodec", "Kernels", "AttentionBackend", "Dtype", "ConfigError",
           "DEFAULT_HALO_PORTION"]
