"""parafuse as the patch-parallel backend of diffusers pipelines (needs the `diffusers` package).

adapter    which modules of a diffusers denoiser are parallel sites, by type and behaviour; the
           attention processor and strip position embedding parafuse installs
strips     hooks that make the denoiser, the ControlNets and the VAE compute this rank's strip:
           shape trace, patch plan, strip in, gathered output out
freeu      FreeU's filter of the whole image's skip features, computed on the strips (one small
           reduction of its Fourier coefficients per up block)
pipeline   `parallelize(pipe, ...)`, the parallel pipeline, `parallelize_vae(vae)` (a VAE's
           encoder and decoder alone), loading a pipeline from a folder
emulator   N ranks as threads of one process (the reference for torchrun runs)
"""
from parafuse.diffusers.adapter import UnsupportedModelError
from parafuse.diffusers.pipeline import ParallelPipeline, load_pipeline, parallelize, parallelize_vae

__all__ = ["parallelize", "parallelize_vae", "ParallelPipeline", "load_pipeline", "UnsupportedModelError"]
