"""parafuse: patch-parallel inference for high-resolution diffusion images.

    from parafuse import Runtime, ParallelConfig, Request
    rt = Runtime("default", ParallelConfig(mode="partial"))     # under torchrun: one strip per rank
    result = rt.generate(Request(height=1024, width=1024, steps=20))
    result.image                                                # [B, 3, H, W] in [-1, 1] on rank 0

    pipe = parafuse.parallelize(diffusers_pipe, mode="partial") # a diffusers pipeline, patch-parallel
"""
from parafuse.parallel.engine import DEFAULT_HALO_PORTION
from parafuse.runtime import ParallelConfig, Request, Result, Runtime


def parallelize(pipe, mode: str = "sync", halo_portion: float = DEFAULT_HALO_PORTION, warmup_steps: int = 4,
                cfg_parallel: bool = False, **kwargs):
    """A diffusers pipeline whose denoiser runs patch-parallel (`parafuse.diffusers.parallelize`;
    diffusers is imported only here). The layer swap for any model is `parafuse.parallel.parallelize`."""
    from parafuse.diffusers import parallelize as parallelize_pipeline

    return parallelize_pipeline(pipe, mode, halo_portion, warmup_steps, cfg_parallel, **kwargs)


__all__ = ["Runtime", "ParallelConfig", "Request", "Result", "parallelize"]
