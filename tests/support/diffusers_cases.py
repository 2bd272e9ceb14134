"""The diffusers pipelines' test cases: the tiny pipelines and their calls (parafuse.diffusers.tiny),
what some cases load or enable on a pipeline (IP-Adapters and their masks, FreeU), the SDXL base to
refiner handoff's calls, and the torchrun cases the worker runs."""
import torch

from parafuse.diffusers.tiny import (BUILDERS, HEIGHT, KONTEXT_IMAGE, POOLED_DIM, STEPS, TEXT_DIM, TEXT_LEN, WIDTH,
                                     call_kwargs, control_image, control_key, controlnet_kwargs, family_kwargs,
                                     image_kwargs, images, kontext_key, pipeline_path)

__all__ = ["BUILDERS", "HEIGHT", "POOLED_DIM", "STEPS", "TEXT_DIM", "TEXT_LEN", "WIDTH", "TORCHRUN_CASES",
           "KONTEXT_IMAGE", "NAMED_TORCHRUN_CASES", "ALL_TORCHRUN_CASES", "PREPARED", "HANDOFFS", "FREEU", "call_kwargs",
           "control_image", "control_key", "controlnet_kwargs", "family_kwargs", "flux_true_cfg_kwargs", "slg_kwargs",
           "image_kwargs", "images", "kontext_key", "pipeline_path", "ip_adapter", "ip_masks", "two_ip_adapters",
           "load_masked_ip_adapters", "enable_freeu", "FBC_THRESHOLD", "enable_first_block_cache",
           "enable_layerwise_casting",
           "base_kwargs", "refiner_kwargs"]

# the FreeU authors' values for SD 1.x and SDXL
FREEU = {"sd": dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6), "sdxl": dict(s1=0.6, s2=0.4, b1=1.1, b2=1.2)}


def ip_adapter(unet, image_dim: int = 8, seed: int = 0) -> dict:
    """A random IP-Adapter in diffusers' state-dict format for `unet`: the image projection (an image
    embedding of `image_dim` to 4 tokens) and a to_k_ip / to_v_ip pair per cross-attention, numbered
    as diffusers numbers them (1, 3, 5, ... over `attn_processors`, the cross-attentions' ids)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    proj = {"proj.weight": torch.randn(4 * cross, image_dim, generator=g), "proj.bias": torch.zeros(4 * cross),
            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[0]
        width = (unet.config.block_out_channels[-1] if block == "mid_block" else
                 unet.config.block_out_channels[int(name.split(".")[1])] if block == "down_blocks" else
                 list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])])
        for kind in ("to_k_ip", "to_v_ip"):
            ip[f"{key_id}.{kind}.weight"] = torch.randn(width, cross, generator=g) / cross ** 0.5
        key_id += 2
    return {"image_proj": proj, "ip_adapter": ip}


def ip_masks() -> list:
    """IP-Adapter masks for two adapters, one [1, images, H, W] tensor each (as diffusers'
    `IPAdapterMaskProcessor.preprocess` gives them): the first adapter's two images at the image's
    size (160 x 96, not square), one on the top-left block, one on a bottom-right block; the second's
    one image on a square mask, whose aspect diffusers' downsample guesses as a 30 x 32 grid for the
    40 x 24 latent - what a strip's mask must reproduce too."""
    first = torch.zeros(1, 2, HEIGHT, WIDTH)
    first[0, 0, : HEIGHT * 3 // 5, : WIDTH // 2] = 1
    first[0, 1, HEIGHT // 4:, WIDTH // 3:] = 1
    second = torch.zeros(1, 1, 64, 64)
    second[0, 0, 10:40, 20:] = 1
    return [first, second]


def two_ip_adapters(p, images_per_adapter=(2, 1)) -> dict:
    """Two IP-Adapters loaded on `p`; the call's image embeddings (negative, positive), as many
    images for each adapter as `images_per_adapter` says."""
    p.load_ip_adapter([ip_adapter(p.unet, seed=0), ip_adapter(p.unet, seed=1)], subfolder=["", ""],
                      weight_name=["", ""], image_encoder_folder=None, low_cpu_mem_usage=False)
    g = torch.Generator().manual_seed(1)
    return {"ip_adapter_image_embeds": [torch.randn(2, k, 8, generator=g) for k in images_per_adapter]}


def load_masked_ip_adapters(pipe):
    """Two IP-Adapters loaded on the SD pipeline `pipe`; returns its call with them and `ip_masks()`
    (fresh keyword arguments, a fresh generator, at each call of it)."""
    embeds = two_ip_adapters(pipe)
    return lambda: {**call_kwargs("sd"), **embeds, "cross_attention_kwargs": {"ip_adapter_masks": ip_masks()}}


def enable_freeu(pipe):
    """FreeU enabled on the SD pipeline `pipe` (the authors' values); returns its plain call."""
    pipe.enable_freeu(**FREEU["sd"])
    return lambda: call_kwargs("sd")


# the tiny Flux, 3 steps: at this first-block cache threshold step 1 skips the blocks after the first
# (the whole image's ratio is 0.325) and step 2 runs them; at step 1 the last strip's own ratio is above
# it (N = 2: 0.334, N = 3: 0.337) - tests/diffusers/test_pipeline_habits.py checks both from diffusers'
# own residuals
FBC_THRESHOLD = 0.33


def enable_first_block_cache(pipe, threshold: float = FBC_THRESHOLD):
    """diffusers' first-block cache on the Flux pipeline `pipe`'s transformer, as users enable it;
    returns its plain call."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return lambda: call_kwargs("flux")


def enable_layerwise_casting(pipe):
    """The SD pipeline `pipe`'s U-Net under diffusers' layerwise casting (float8 storage, float32
    compute); returns its plain call."""
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return lambda: call_kwargs("sd")


def base_kwargs() -> dict:
    """The SDXL base's call that hands its latents to the refiner: the first half of 4 steps."""
    return {**call_kwargs("sdxl"), "num_inference_steps": 4, "denoising_end": 0.5}


def refiner_kwargs(latents) -> dict:
    """The refiner's call on the base's latents: the second half of the same 4 steps."""
    return {**image_kwargs("sdxl-refiner"), "num_inference_steps": 4, "denoising_start": 0.5, "image": latents}


def flux_true_cfg_kwargs():
    """Flux with true classifier-free guidance: a negative prompt and true_cfg_scale > 1."""
    g = torch.Generator().manual_seed(11)
    kw = call_kwargs("flux")
    kw.update(true_cfg_scale=2.5, negative_prompt_embeds=torch.randn(kw["prompt_embeds"].shape, generator=g),
              negative_pooled_prompt_embeds=torch.randn(kw["pooled_prompt_embeds"].shape, generator=g))
    return kw


def slg_kwargs(scale: float = 2.8) -> dict:
    """SD3 with skip-layer guidance on block 0 at every step it can fire: diffusers' rule
    (start < i / steps < stop, strictly) runs the skip-layer call at steps 1 and 2 of the 3."""
    return {**call_kwargs("sd3"), "skip_guidance_layers": [0], "skip_layer_guidance_start": 0.0,
            "skip_layer_guidance_stop": 1.0, "skip_layer_guidance_scale": scale}


def kontext_call(pipe):
    """Flux Kontext's call: a conditioning image of another size than the output, a second token grid."""
    return lambda: image_kwargs("flux-kontext")


def true_cfg_call(pipe):
    """Flux's true CFG: two transformer calls a step (without cfg_parallel, two streams)."""
    return flux_true_cfg_kwargs


def slg_call(pipe):
    """SD3's skip-layer guidance: the CFG call and, from step 1, the conditional call with block 0
    skipped (two streams of another batch and other sites)."""
    return slg_kwargs


# torchrun cases: name -> (family, parallelize kwargs)
TORCHRUN_CASES = {
    "sd-sync": ("sd", dict(mode="sync")),
    "sd-full": ("sd", dict(mode="full", warmup_steps=1)),
    "pixart-partial": ("pixart", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),
    "sd3-partial": ("sd3", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),
    "flux-partial": ("flux", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),      # stale text merge
    "flux-full-exact": ("flux", dict(mode="full", warmup_steps=1, text_merge="exact")),
    # per-process state loaded or enabled on each rank's pipeline before parallelize (PREPARED)
    "sd-ip-masks-sync": ("sd", dict(mode="sync")),
    "sd-freeu-sync": ("sd", dict(mode="sync")),
    "sd-freeu-full": ("sd", dict(mode="full", warmup_steps=1)),
    "sd-img2img-sync": ("sd-img2img", dict(mode="sync")),          # the VAE encoder by strips
    "sd3-controlnet-sync": ("sd3-controlnet", dict(mode="sync")),
    "flux-first-block-cache-sync": ("flux", dict(mode="sync")),
    "sd-layerwise-casting-sync": ("sd", dict(mode="sync")),
    # the SDXL base's latents, every rank's own, are the refiner's image (HANDOFFS)
    "sdxl-refiner-handoff": ("sdxl-refiner", dict(mode="sync")),
    # the stale modes over several token grids, several streams, FLUX.2's, Qwen-Image's and SD3.5 Medium's attention
    "flux-kontext-full": ("flux-kontext", dict(mode="full", warmup_steps=1)),
    "flux-true-cfg-partial": ("flux", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),
    "flux2-partial": ("flux2", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),
    "qwen-partial": ("qwen", dict(mode="partial", warmup_steps=1, halo_portion=0.3, parallel_vae=False)),
    "sd3-slg-full": ("sd3", dict(mode="full", warmup_steps=1)),
    "sd35-medium-partial": ("sd35-medium", dict(mode="partial", warmup_steps=1, halo_portion=0.3)),
    "qwen-edit-full": ("qwen-edit", dict(mode="full", warmup_steps=1, parallel_vae=False)),
}

# cases whose plain pipeline is changed before parallelize: name -> prepare(pipe), which returns the call
PREPARED = {"sd-ip-masks-sync": load_masked_ip_adapters, "sd-freeu-sync": enable_freeu, "sd-freeu-full": enable_freeu,
            "flux-first-block-cache-sync": enable_first_block_cache,
            "sd-layerwise-casting-sync": enable_layerwise_casting, "flux-kontext-full": kontext_call,
            "flux-true-cfg-partial": true_cfg_call, "sd3-slg-full": slg_call}
# refiner cases: name -> the base's family, called first (base_kwargs), its latents the refiner's image
HANDOFFS = {"sdxl-refiner-handoff": "sdxl"}


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
