"""Tiny random-weight diffusers pipelines of each family parafuse parallelises, saved to a folder
and loaded by path (no hub access; text encoders bypassed with precomputed prompt embeddings), and
the calls made of them: what the tests, the benchmarks and the GPU check's smoke runs all build on.

Weights are diffusers' own random initialisation except the zero-initialised output layers
(conv_out, PixArt's proj_out), which would make every output - and every comparison - trivially
zero: they get small random weights; the XLabs-style ControlNet's hint convs, which get
He-normal weights (`build_flux_hint_controlnet`); and SD3's ControlNets, whose control-latent
embedding and block outputs get unit-gain weights, and whose pipeline's VAE gets a sharp
posterior (`_sd3_controlnet`)."""
from __future__ import annotations

import os

import torch

# a 40 x 24 latent (the tiny VAE's factor is 4): 20 units of the U-Net's and PixArt's factor 2,
# uneven strips at N = 3 (7, 7, 6 units)
HEIGHT, WIDTH = 160, 96
STEPS = 3
TEXT_DIM, TEXT_LEN, POOLED_DIM = 16, 5, 32
# v-prediction (SD 2.x's): an untrained denoiser's small output then means a small clean estimate,
# so latents stay O(1) and absolute tolerances mean what they say (with epsilon prediction the
# first steps divide by alpha ~ 0.07)
V = "v_prediction"


def _seeded(seed: int):
    torch.manual_seed(seed)


def _wake(module: torch.nn.Module, seed: int) -> None:
    """Small random weights for zero-initialised layers (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.abs().max() == 0 and ("conv_out" in name or "proj_out" in name or "scale_shift" in name):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _vae(levels: int = 3, **extra):
    """The tiny VAE: `levels` blocks, each but the last halving the image (factor 4 by default)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) + (16,) * (levels - 1),
                         latent_channels=4, norm_num_groups=4, layers_per_block=1, **extra)


def _unet(in_channels: int = 4, **extra):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=8, norm_num_groups=8, **extra)


# SDXL's U-Net: the pooled text and the size ids added to the time embedding
SDXL_TIME = dict(addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1))


def build_sd(path: str) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    _seeded(0)
    unet, vae = _unet(), _vae()
    _wake(unet, 1)
    StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(prediction_type=V, clip_sample=False),
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(path)


def build_sd_lite(path: str) -> None:
    """SD with a one-level U-Net (one cross-attention block, no downsampling): the smallest graph
    with every kind of parallel site, for what costs per operation (torch.compile's tracing)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    _seeded(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=8, norm_num_groups=8)
    _wake(unet, 1)
    StableDiffusionPipeline(vae=_vae(), text_encoder=None, tokenizer=None, unet=unet,
                            scheduler=DDIMScheduler(prediction_type=V, clip_sample=False), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)


def build_sdxl(path: str) -> None:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    _seeded(0)
    unet = _unet(**SDXL_TIME, projection_class_embeddings_input_dim=6 * 8 + POOLED_DIM)
    _wake(unet, 2)
    # a stochastic scheduler: its noise is drawn for the whole latent from the generator on every rank
    StableDiffusionXLPipeline(vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                              unet=unet, scheduler=EulerAncestralDiscreteScheduler(prediction_type=V)).save_pretrained(path)


def _sdxl_unet(layers_per_block: int, block_out_channels: tuple, transformer_layers_per_block: tuple):
    """A U-Net of SDXL's layout at tiny widths: three levels, a first down block without attention
    and two with (SDXL's text-time embedding)."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
                                block_out_channels=block_out_channels,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
                                **{**SDXL_TIME, "transformer_layers_per_block": transformer_layers_per_block},
                                projection_class_embeddings_input_dim=6 * 8 + POOLED_DIM)


def build_sdxl_depth(path: str) -> None:
    """SDXL's U-Net at tiny widths with its count of layers: two resnets a level, attention blocks of
    1, 2 and 10 transformer layers (widths 16 and 32, not 320 to 1280), for what costs per layer:
    torch.compile's tracing and recompiles."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    _seeded(0)
    unet = _sdxl_unet(2, (16, 32, 32), (1, 2, 10))
    _wake(unet, 2)
    StableDiffusionXLPipeline(vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                              unet=unet, scheduler=EulerDiscreteScheduler(prediction_type=V)).save_pretrained(path)


def build_pixart(path: str) -> None:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    _seeded(0)
    transformer = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, in_channels=4, out_channels=8,
                                           cross_attention_dim=16, caption_channels=TEXT_DIM, norm_type="ada_norm_single",
                                           norm_num_groups=8)
    _wake(transformer, 3)
    PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler(prediction_type=V)).save_pretrained(path)


def build_sd3(path: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    _seeded(0)
    # the last block is context_pre_only (no text output projection); qk RMS norms as in SD3.5
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
                                        pooled_projection_dim=POOLED_DIM, out_channels=4, pos_embed_max_size=32,
                                        qk_norm="rms_norm")
    _wake(transformer, 4)
    # SD3's and Flux's pipelines shift the latent by the VAE's shift_factor before decoding
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.1),
                             text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                             text_encoder_3=None, tokenizer_3=None).save_pretrained(path)


def build_sd35_medium(path: str) -> None:
    """SD3.5 Medium's layout (MMDiT-X): the first block adds a self-attention over the image tokens
    (`attn2`, SD3's joint processor called without text) beside its joint attention."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from parafuse.diffusers.pipeline import load_pipeline
    sd3 = load_pipeline(pipeline_path(os.path.dirname(path), "sd3"))
    _seeded(0)
    transformer = SD3Transformer2DModel.from_config({**sd3.transformer.config, "dual_attention_layers": (0,)})
    _wake(transformer, 20)
    StableDiffusion3Pipeline(**{**sd3.components, "transformer": transformer}).save_pretrained(path)


def build_flux(path: str, vae_levels: int = 3) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    _seeded(0)
    # dual-stream blocks with text as encoder_hidden_states, single-stream blocks over [text | image]
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                         pooled_projection_dim=POOLED_DIM, axes_dims_rope=(2, 2, 4))
    _wake(transformer, 5)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=64,
                                                max_image_seq_len=1024, base_shift=0.5, max_shift=1.15)
    FluxPipeline(scheduler=scheduler, vae=_vae(vae_levels, shift_factor=0.1), text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, transformer=transformer).save_pretrained(path)


def build_flux_f8(path: str) -> None:
    """Flux with a VAE of Flux's own factor 8 (a 20 x 12 latent, 10 x 6 tokens: uneven strips at
    N = 3), which an XLabs-style ControlNet's input_hint_block matches (`build_flux_hint_controlnet`)."""
    build_flux(path, vae_levels=4)


def build_flux2(path: str) -> None:
    """FLUX.2: dual-stream blocks (Flux2Attention), single-stream blocks whose attention and MLP
    share one fused projection (Flux2ParallelSelfAttention), 4-axis rotary ids (t, h, w, l); its
    VAE (AutoencoderKLFlux2) patchifies the latent 2 x 2 into each token's channels."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    _seeded(20)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                          timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
    _wake(transformer, 20)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=64,
                                                max_image_seq_len=1024, base_shift=0.5, max_shift=1.15)
    Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                  transformer=transformer).save_pretrained(path)


def build_flux2_klein(path: str) -> None:
    """FLUX.2 [klein]'s pipeline on the tiny FLUX.2's components: another text encoder (bypassed) and,
    not step-distilled, classifier-free guidance as two transformer calls per step."""
    from diffusers import Flux2KleinPipeline
    _from_base(Flux2KleinPipeline, "flux2", path)


def build_qwen(path: str) -> None:
    """Qwen-Image: dual-stream blocks (joint attention, text first, the text's padding mask), the
    latent packed 2 x 2 into tokens as Flux's, and its 3D causal VAE (`AutoencoderKLQwenImage`,
    factor 4 here: the same 40 x 24 latent and 20 x 12 tokens as the tiny Flux's)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    _seeded(20)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2,
                                              joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4))
    _wake(transformer, 20)
    g = torch.Generator().manual_seed(21)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True],
                                 latents_mean=(0.1 * torch.randn(4, generator=g)).tolist(),
                                 latents_std=(1 + 0.1 * torch.rand(4, generator=g)).tolist())
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=64,
                                                max_image_seq_len=1024, base_shift=0.5, max_shift=1.15)
    QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                      transformer=transformer).save_pretrained(path)


BUILDERS = {"sd": build_sd, "sd-lite": build_sd_lite, "sdxl": build_sdxl, "sdxl-depth": build_sdxl_depth,
            "pixart": build_pixart, "sd3": build_sd3,
            "sd35-medium": build_sd35_medium, "flux": build_flux, "flux-f8": build_flux_f8, "flux2": build_flux2,
            "flux2-klein": build_flux2_klein, "qwen": build_qwen}


def pipeline_path(root: str, family: str) -> str:
    """The family's pipeline folder under `root`, built on first use."""
    path = os.path.join(root, family)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        BUILDERS[family](path)
    return path


def call_kwargs(family: str, guidance: float = 3.0, seed: int = 0, output_type: str = "latent") -> dict:
    """Keyword arguments of one pipeline call: precomputed prompt embeddings, a fresh generator."""
    g = torch.Generator().manual_seed(100)
    emb = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    neg = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g)
    kw = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=guidance,
              generator=torch.Generator().manual_seed(seed), output_type=output_type,
              prompt_embeds=emb, negative_prompt_embeds=neg)
    if family.startswith("flux") and family != "flux2-klein":   # guidance-distilled: no negative branch
        del kw["negative_prompt_embeds"]                       # (Flux's true_cfg_scale 1; FLUX.2 [klein]: CFG)
    if family.startswith("flux") and not family.startswith("flux2"):      # FLUX.2 takes no pooled text
        kw["pooled_prompt_embeds"] = torch.randn(1, POOLED_DIM, generator=g)
    if family == "qwen":                 # no CFG batch; true CFG is its own call (a negative prompt)
        del kw["guidance_scale"], kw["negative_prompt_embeds"]
        kw.update(true_cfg_scale=1.0, **qwen_prompt(emb, QWEN_VALID))
    if family in ("sdxl", "sdxl-depth", "sd3", "sd35", "sd35-medium"):      # sd35: SD3's pipeline with an SD3.5-style ControlNet
        kw.update(pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g))
    if family == "pixart":
        kw.update(prompt_attention_mask=torch.ones(1, TEXT_LEN), negative_prompt_attention_mask=torch.ones(1, TEXT_LEN),
                  negative_prompt=None,
                  use_resolution_binning=False)
    return kw


# Qwen-Image's prompts are padded to the longest in a batch, the padding zeros masked out by
# `prompt_embeds_mask`: the tiny call's prompt has this many real tokens of TEXT_LEN
QWEN_VALID = 3


def qwen_prompt(emb: torch.Tensor, valid: int, name: str = "prompt") -> dict:
    """Qwen-Image's prompt arguments `{name}_embeds` and `{name}_embeds_mask` as its pipeline
    makes them: the tokens after the first `valid` zeroed and masked out."""
    mask = torch.zeros(emb.shape[:2], dtype=torch.long)
    mask[:, :valid] = 1
    return {f"{name}_embeds": emb * mask[..., None], f"{name}_embeds_mask": mask}


def images(out) -> torch.Tensor | None:
    """The pipeline output's images (latents with output_type="latent", which every rank gets); None
    where the call returned none (an image's output, on ranks other than 0)."""
    return None if out is None else out.images


def _wake_zeros(net: torch.nn.Module, seed: int) -> None:
    """Small random weights for every zero-initialised parameter of a ControlNet (else its residuals
    would all be zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _controlnet(unet, seed: int):
    """A ControlNet of the tiny U-Net (diffusers' from_unet), its conditioning embedding down by the
    tiny VAE's factor 4, its zero-initialised convs woken (`_wake_zeros`)."""
    from diffusers import ControlNetModel
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16))
    _wake_zeros(net, seed)
    return net


def build_sd_controlnet(path: str) -> None:
    from diffusers import StableDiffusionControlNetPipeline

    from parafuse.diffusers.pipeline import load_pipeline
    sd = load_pipeline(pipeline_path(os.path.dirname(path), "sd"))
    _seeded(6)
    StableDiffusionControlNetPipeline(**{k: v for k, v in sd.components.items() if k != "image_encoder"},
                                      controlnet=_controlnet(sd.unet, 6), requires_safety_checker=False
                                      ).save_pretrained(path)


def build_sdxl_controlnet(path: str) -> None:
    from diffusers import StableDiffusionXLControlNetPipeline

    from parafuse.diffusers.pipeline import load_pipeline
    sdxl = load_pipeline(pipeline_path(os.path.dirname(path), "sdxl"))
    _seeded(7)
    StableDiffusionXLControlNetPipeline(**{k: v for k, v in sdxl.components.items()
                                           if k not in ("image_encoder", "feature_extractor")},
                                        controlnet=_controlnet(sdxl.unet, 7)).save_pretrained(path)


def build_flux_controlnet(path: str) -> None:
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    from parafuse.diffusers.pipeline import load_pipeline
    flux = load_pipeline(pipeline_path(os.path.dirname(path), "flux"))
    _seeded(8)
    net = FluxControlNetModel.from_transformer(flux.transformer, num_layers=1, num_single_layers=1,
                                               attention_head_dim=8, num_attention_heads=2)
    _wake_zeros(net, 8)
    FluxControlNetPipeline(**flux.components, controlnet=net).save_pretrained(path)


def build_flux_hint_controlnet(path: str) -> None:
    """Flux with an XLabs-style ControlNet: its conditioning is the control image in pixels, embedded
    by its input_hint_block (diffusers' fixed three stride-2 convs: down by 8, the VAE's factor) to 4
    channels at the latent's rows, packed 2 x 2 (patch_size 2) into the latent's 16-channel tokens."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    from parafuse.diffusers.pipeline import load_pipeline
    flux = load_pipeline(pipeline_path(os.path.dirname(path), "flux-f8"))
    _seeded(12)
    config = flux.transformer.config
    net = FluxControlNetModel(patch_size=2, in_channels=config.in_channels, num_layers=1, num_single_layers=1,
                              attention_head_dim=8, num_attention_heads=2,
                              joint_attention_dim=config.joint_attention_dim,
                              pooled_projection_dim=config.pooled_projection_dim, axes_dims_rope=config.axes_dims_rope,
                              conditioning_embedding_channels=config.in_channels // 4)
    _wake_zeros(net, 12)
    # diffusers' default init shrinks the signal at each of the hint's eight convs, so the output would
    # barely depend on the control image: He-normal weights keep its scale
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for conv in (m for m in net.input_hint_block.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / conv.weight[0].numel()) ** 0.5)
    FluxControlNetPipeline(**flux.components, controlnet=net).save_pretrained(path)


def _sd3_controlnet(path: str, seed: int, sd35: bool) -> None:
    """SD3's tiny pipeline with an SD3ControlNetModel of one block at the transformer's width, its
    zero-initialised layers (the control latent's patch embedding, the block outputs) woken. SD3's
    layout: a position embedding of its own, joint attention with the text; SD3.5's (its 8B
    ControlNets', `sd35`): no position embedding (the pipeline gives it the transformer's), no text
    (self-attention blocks), the pooled text not forced to zeros.

    diffusers' SD3 ControlNet pipeline samples the control image's latent from the global RNG (it
    passes no generator), which the emulator's ranks share, drawing in turn: the tiny VAE's
    posterior is made sharp (its log-variance at diffusers' floor, -30: a standard deviation of
    e^-15), so that the sample is its mean to float precision."""
    import copy

    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    from parafuse.diffusers.pipeline import load_pipeline
    sd3 = load_pipeline(pipeline_path(os.path.dirname(path), "sd3"))
    config = sd3.transformer.config
    vae = copy.deepcopy(sd3.vae)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -40.0        # the log-variance's channels
    layout = (dict(use_pos_embed=False, pos_embed_type=None, joint_attention_dim=None,
                   force_zeros_for_pooled_projection=False) if sd35 else
              dict(joint_attention_dim=config.joint_attention_dim, caption_projection_dim=config.caption_projection_dim,
                   pos_embed_max_size=config.pos_embed_max_size, qk_norm=config.qk_norm))
    _seeded(seed)
    net = SD3ControlNetModel(sample_size=config.sample_size, patch_size=config.patch_size,
                             in_channels=config.in_channels, num_layers=1, attention_head_dim=config.attention_head_dim,
                             num_attention_heads=config.num_attention_heads,
                             pooled_projection_dim=config.pooled_projection_dim, out_channels=config.out_channels,
                             **layout)
    _wake_zeros(net, seed)
    # woken at 0.05, the control latent's patch embedding and the block outputs would barely let the
    # control image through: unit-gain weights (variance 1 / fan-in)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (net.pos_embed_input.proj, *net.controlnet_blocks):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.weight[0].numel() ** 0.5)
    StableDiffusion3ControlNetPipeline(**{**sd3.components, "vae": vae}, controlnet=net).save_pretrained(path)


def build_sd3_controlnet(path: str) -> None:
    _sd3_controlnet(path, 18, sd35=False)


def build_sd35_controlnet(path: str) -> None:
    _sd3_controlnet(path, 19, sd35=True)


BUILDERS.update({"sd-controlnet": build_sd_controlnet, "sdxl-controlnet": build_sdxl_controlnet,
                 "flux-controlnet": build_flux_controlnet, "flux-f8-controlnet": build_flux_hint_controlnet,
                 "sd3-controlnet": build_sd3_controlnet, "sd35-controlnet": build_sd35_controlnet})


def _adapter(seed: int, **config):
    """A T2I-Adapter, diffusers' own random initialisation (no zero-initialised layers)."""
    from diffusers import T2IAdapter
    _seeded(seed)
    return T2IAdapter(in_channels=3, num_res_blocks=1, **config)


def build_sd_adapter(path: str) -> None:
    """SD's tiny pipeline with a T2I-Adapter: features at the U-Net's two levels (latent rows and
    half of them), the image unshuffled by the tiny VAE's factor 4."""
    from diffusers import StableDiffusionAdapterPipeline

    from parafuse.diffusers.pipeline import load_pipeline
    sd = load_pipeline(pipeline_path(os.path.dirname(path), "sd"))
    StableDiffusionAdapterPipeline(**{k: v for k, v in sd.components.items() if k != "image_encoder"},
                                   adapter=_adapter(9, channels=(16, 32), downscale_factor=4,
                                                    adapter_type="full_adapter"),
                                   requires_safety_checker=False).save_pretrained(path)


def build_sdxl_adapter(path: str) -> None:
    """An SDXL-shaped tiny U-Net (a first down block without attention, then two with; three levels)
    and SDXL's T2I-Adapter: four features, at half the latent's rows (added after the first block's
    downsampler, then inside the second block) and a quarter (inside the third block, and to the
    mid block's output)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLAdapterPipeline
    _seeded(10)
    unet = _sdxl_unet(1, (16, 16, 32), (1, 1, 1))
    _wake(unet, 10)
    StableDiffusionXLAdapterPipeline(vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet,
                                     adapter=_adapter(11, channels=(16, 16, 32, 32), downscale_factor=8,
                                                      adapter_type="full_adapter_xl"),
                                     scheduler=EulerAncestralDiscreteScheduler(prediction_type=V)
                                     ).save_pretrained(path)


BUILDERS.update({"sd-adapter": build_sd_adapter, "sdxl-adapter": build_sdxl_adapter})


def control_image(seed: int = 3, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """A conditioning image in [0, 1] (what a ControlNet pipeline takes as `image`)."""
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def control_key(family: str) -> str:
    """The ControlNet or T2I-Adapter pipeline's conditioning-image argument."""
    return "control_image" if family.startswith(("flux", "sd3")) else "image"


def controlnet_kwargs(family: str, **kw) -> dict:
    """The call of a ControlNet or T2I-Adapter family: its base family's call and a conditioning
    image."""
    base = family.removesuffix("-controlnet").removesuffix("-adapter")
    return {**call_kwargs(base, **kw), control_key(family): control_image()}


def family_kwargs(family: str) -> dict:
    """The call of any family of this file, a ControlNet, T2I-Adapter or image-conditioned one included."""
    if family in IMAGE_FAMILIES:
        return image_kwargs(family)
    return controlnet_kwargs(family) if family.endswith(("-controlnet", "-adapter")) else call_kwargs(family)


# ---- image-conditioned pipelines: img2img, inpainting, Flux Fill, Kontext and Qwen-Image-Edit -------
def _from_base(cls, base: str, path: str, **components) -> None:
    """`cls` built from the base family's tiny components (those `cls` takes), `components` replacing
    or adding some."""
    import inspect

    from parafuse.diffusers.pipeline import load_pipeline
    pipe = load_pipeline(pipeline_path(os.path.dirname(path), base))
    takes = inspect.signature(cls.__init__).parameters
    kept = {k: v for k, v in pipe.components.items() if k in takes}
    cls(**{**kept, **components}).save_pretrained(path)


def _inpainting_unet(seed: int, **extra):
    """The tiny U-Net with SD's inpainting input: 9 channels, the latent, the mask and the masked
    image's latent concatenated."""
    _seeded(seed)
    unet = _unet(in_channels=9, **extra)
    _wake(unet, seed)
    return unet


def build_sd_img2img(path: str) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline
    _from_base(StableDiffusionImg2ImgPipeline, "sd", path, requires_safety_checker=False)


def build_sd_inpaint(path: str) -> None:
    from diffusers import StableDiffusionInpaintPipeline
    _from_base(StableDiffusionInpaintPipeline, "sd", path, unet=_inpainting_unet(14), requires_safety_checker=False)


def build_sdxl_img2img(path: str) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline
    _from_base(StableDiffusionXLImg2ImgPipeline, "sdxl", path)


def build_sdxl_refiner(path: str) -> None:
    """SDXL's refiner: img2img with an aesthetic score in place of the target size (5 time ids, not 6)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    _seeded(15)
    unet = _unet(**SDXL_TIME, projection_class_embeddings_input_dim=5 * 8 + POOLED_DIM)
    _wake(unet, 15)
    _from_base(StableDiffusionXLImg2ImgPipeline, "sdxl", path, unet=unet, requires_aesthetics_score=True)


def build_sdxl_inpaint(path: str) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline
    unet = _inpainting_unet(16, **SDXL_TIME, projection_class_embeddings_input_dim=6 * 8 + POOLED_DIM)
    _from_base(StableDiffusionXLInpaintPipeline, "sdxl", path, unet=unet)


def build_flux_img2img(path: str) -> None:
    from diffusers import FluxImg2ImgPipeline
    _from_base(FluxImg2ImgPipeline, "flux", path)


def build_flux_inpaint(path: str) -> None:
    from diffusers import FluxInpaintPipeline
    _from_base(FluxInpaintPipeline, "flux", path)


def build_flux_fill(path: str) -> None:
    """Flux Fill: each token's channels are the latent's, the masked image latent's (both packed
    2 x 2) and the mask's (the VAE's factor squared values per latent pixel, packed 2 x 2)."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    from parafuse.diffusers.pipeline import load_pipeline
    flux = load_pipeline(pipeline_path(os.path.dirname(path), "flux"))
    _seeded(17)
    tokens, mask = flux.transformer.config.in_channels, flux.vae_scale_factor ** 2 * 2 * 2
    transformer = FluxTransformer2DModel.from_config({**flux.transformer.config, "in_channels": 2 * tokens + mask,
                                                      "out_channels": tokens})
    _wake(transformer, 17)
    _from_base(FluxFillPipeline, "flux", path, transformer=transformer)


def build_flux_kontext(path: str) -> None:
    from diffusers import FluxKontextPipeline
    _from_base(FluxKontextPipeline, "flux", path)


def build_flux_kontext_inpaint(path: str) -> None:
    from diffusers import FluxKontextInpaintPipeline
    _from_base(FluxKontextInpaintPipeline, "flux", path)


def build_qwen_edit(path: str) -> None:
    """Qwen-Image-Edit: the tiny Qwen-Image's transformer, given the conditioning image's tokens
    after the latent's. Its pipeline resizes that image to about a megapixel whatever its size,
    so the VAE here has factor 16 (four downsamples, 2 channels, no residual blocks: a cheap
    encode of the megapixel): the image's grid about 1000 tokens beside the latent's 20 x 12 at
    an output `QWEN_EDIT_SCALE` times the tiny size (`image_kwargs`)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline
    _seeded(22)
    g = torch.Generator().manual_seed(23)
    vae = AutoencoderKLQwenImage(base_dim=2, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=0,
                                 temperal_downsample=[False, True, True, True],
                                 latents_mean=(0.1 * torch.randn(4, generator=g)).tolist(),
                                 latents_std=(1 + 0.1 * torch.rand(4, generator=g)).tolist())
    _from_base(QwenImageEditPipeline, "qwen", path, vae=vae, processor=None)


IMAGE_FAMILIES = {"sd-img2img": build_sd_img2img, "sd-inpaint": build_sd_inpaint, "sdxl-img2img": build_sdxl_img2img,
                  "sdxl-refiner": build_sdxl_refiner, "sdxl-inpaint": build_sdxl_inpaint,
                  "flux-img2img": build_flux_img2img, "flux-inpaint": build_flux_inpaint, "flux-fill": build_flux_fill,
                  "flux-kontext": build_flux_kontext, "flux-kontext-inpaint": build_flux_kontext_inpaint,
                  "qwen-edit": build_qwen_edit}
BUILDERS.update(IMAGE_FAMILIES)


def inpaint_mask(seed: int = 6, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """A mask in {0, 1} (1: repaint): a random box, so that it crosses strip boundaries."""
    g = torch.Generator().manual_seed(seed)
    top, left = (int(torch.randint(0, s // 3, (1,), generator=g)) for s in (height, width))
    mask = torch.zeros(1, 1, height, width)
    mask[..., top: top + height // 2, left: left + width // 2] = 1
    return mask


# Flux Kontext's conditioning image (the inpainting pipeline's `image_reference`): another size than
# the output's, a 16 x 8 token grid appended to the latent's 20 x 12 (strips of 6, 5, 5 rows at N = 3)
KONTEXT_IMAGE = (HEIGHT * 4 // 5, WIDTH * 2 // 3)


# the tiny Qwen-Image-Edit's VAE factor (16) over the tiny VAE's (4): its output is this many times
# the tiny size, for the same 20 x 12 token grid
QWEN_EDIT_SCALE = 4


def kontext_key(family: str) -> str:
    """The argument of a Flux Kontext pipeline that takes the conditioning image."""
    return "image_reference" if family.endswith("inpaint") else "image"


def image_kwargs(family: str, image_seed: int = 5, mask_seed: int = 6, **kw) -> dict:
    """The call of an image-conditioned family: its base family's call, an image, a mask for the
    inpainting ones; img2img's image a small one upscaled four times at strength 0.5 (the hi-res
    upscale's second pass, a partial schedule); Kontext's conditioning image of another size than
    the output (`KONTEXT_IMAGE`); Qwen-Image-Edit's a PIL image (which its pipeline resizes to about
    a megapixel: a 41 x 25 token grid), at an output of `QWEN_EDIT_SCALE` times the tiny size."""
    import torch.nn.functional as F
    base = family.split("-")[0]
    call = {**call_kwargs(base, **kw), "image": control_image(image_seed)}
    if family.endswith(("inpaint", "fill")):
        call["mask_image"] = inpaint_mask(mask_seed)
    if family.endswith("img2img"):
        small = control_image(image_seed, HEIGHT // 4, WIDTH // 4)
        call.update(image=F.interpolate(small, size=(HEIGHT, WIDTH), mode="bicubic").clamp(0, 1), strength=0.5)
    if family == "sdxl-refiner":
        call["strength"] = 0.7                     # the refiner's default 0.3 of 3 steps is none
    if family == "qwen-edit":         # its pipeline reads the image's size as a PIL image's
        from diffusers.image_processor import VaeImageProcessor
        call.update(image=VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(call["image"]))[0],
                    height=HEIGHT * QWEN_EDIT_SCALE, width=WIDTH * QWEN_EDIT_SCALE)
    if family.startswith("flux-kontext"):
        call[kontext_key(family)] = control_image(image_seed, *KONTEXT_IMAGE)
        call.update(max_area=HEIGHT * WIDTH, _auto_resize=False)       # the call's size, not a megapixel
    return call
