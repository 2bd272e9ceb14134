"""parafuse: patch-parallel inference for high-resolution diffusion images.

    from parafuse import Runtime, ParallelConfig, Request
    rt = Runtime("default", ParallelConfig(mode="partial"))     # under torchrun: one strip per rank
    result = rt.generate(Request(height=1024, width=1024, steps=20))
    result.image                                                # [B, 3, H, W] in [-1, 1] on rank 0
"""
from parafuse.parallel.parallelize import parallelize
from parafuse.runtime import ParallelConfig, Request, Result, Runtime

__all__ = ["Runtime", "ParallelConfig", "Request", "Result", "parallelize"]
