"""The diffusers pipelines' test cases: the tiny pipelines and their calls (parafuse.diffusers.tiny)
and the torchrun cases the worker runs."""
import torch

from parafuse.diffusers.tiny import (BUILDERS, HEIGHT, POOLED_DIM, STEPS, TEXT_DIM, TEXT_LEN, WIDTH, call_kwargs,
                                     control_image, control_key, controlnet_kwargs, family_kwargs, image_kwargs,
                                     images, pipeline_path)

__all__ = ["BUILDERS", "HEIGHT", "POOLED_DIM", "STEPS", "TEXT_DIM", "TEXT_LEN", "WIDTH", "TORCHRUN_CASES",
           "NAMED_TORCHRUN_CASES", "ALL_TORCHRUN_CASES", "call_kwargs", "control_image", "control_key",
           "controlnet_kwargs", "family_kwargs", "flux_true_cfg_kwargs", "image_kwargs", "images", "pipeline_path"]


def flux_true_cfg_kwargs():
    """Flux with true classifier-free guidance: a negative prompt and true_cfg_scale > 1."""
    g = torch.Generator().manual_seed(11)
    kw = call_kwargs("flux")
    kw.update(true_cfg_scale=2.5, negative_prompt_embeds=torch.randn(kw["prompt_embeds"].shape, generator=g),
              negative_pooled_prompt_embeds=torch.randn(kw["pooled_prompt_embeds"].shape, generator=g))
    return kw

# torchrun cases: name -> (family, parallelize kwargs)
TORCHRUN_CASES = {
    "sd-sync": ("sd", dict(mode="sync")),
    "sd-full": ("sd", dict(mode="full", warmup_steps=1)),
    "pixart-partial": ("pixart", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),
    "sd3-partial": ("sd3", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),
    "flux-partial": ("flux", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),      # stale text merge
    "flux-full-exact": ("flux", dict(mode="full", warmup_steps=1, text_merge="exact")),
}


# torchrun cases run only when named (not by the default "all" of diffusers_worker.py)
NAMED_TORCHRUN_CASES = {
    "sd-controlnet-sync": ("sd-controlnet", dict(mode="sync")),
    "sd-controlnet-full": ("sd-controlnet", dict(mode="full", warmup_steps=1)),
    # rank 1 calls with another guidance_scale first (refused on both ranks over gloo), then the same
    # call as rank 0 on the same parallel pipeline
    "sd-controlnet-disagree": ("sd-controlnet", dict(mode="full", warmup_steps=1)),
    "sd-adapter-full": ("sd-adapter", dict(mode="full", warmup_steps=1)),        # T2I features cut over gloo
}
ALL_TORCHRUN_CASES = {**TORCHRUN_CASES, **NAMED_TORCHRUN_CASES}
