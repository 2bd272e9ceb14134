"""The diffusers model adapter: which modules of a diffusers denoiser are parallel sites.

Modules are matched by type and behaviour, never by class-name strings that a diffusers release
can rename:

    conv       an nn.Conv2d whose kernel reaches across rows (PatchConv2d, as for the built-in models)
    norm       an nn.GroupNorm (PatchGroupNorm)
    attn       a diffusers `Attention` (or Flux's or FLUX.2's attention): parafuse installs its own
               attention processor, which runs self-attention calls (no `encoder_hidden_states`) on
               the strip's queries over the engine's K/V buffer, runs joint text+image attention
               (SD3, Flux, FLUX.2, Qwen-Image) with the text replicated and its queries merged across
               strips, and
               hands cross-attention calls to the processor it replaced (IP-Adapter masks cut to
               the strip's tokens)
    positions  a `PatchEmbed` with sin-cos positions, or Qwen-Image's rotary table (`QwenEmbedRope`):
               positions of the whole grid, sliced
    downsample a `Downsample2D` that zero-pads its input's right column and bottom row before its
               stride-2 conv (padding=0: the VAE encoder's): no site of its own, swapped for
               `StripDownsample2D`, whose conv (the site) pads its unpadded input itself

Whether an attention call is a self-attention over the image grid is decided by behaviour, in the
shape trace (`parafuse.diffusers.strips`): a call without `encoder_hidden_states` over h*w tokens of
the latent grid. What cannot be split by rows is refused before any compute, naming the module:
attention processors other than diffusers' default, joint (SD3, Qwen-Image), Flux and FLUX.2 ones, fused
QKV projections, convs with non-zero padding modes, and hooks on a module's forward (`hook_refusal`):
accelerate's offload and every diffusers HookRegistry hook - caches, group offloading, context
parallelism, layerwise casting of a module with submodules - with the call that removes it where
diffusers has one; a denoiser's first-block cache is the exception (it runs on the strip:
`parafuse.diffusers.cache`).

diffusers' layerwise casting of leaf layers (`enable_layerwise_casting`) runs on a strip: each layer
keeps its weights in the storage dtype and casts them around its own forward, a patch layer swapped
in for it included (`keep_layerwise_casting`, a rule of every swap: `parafuse.parallel.layers.stand_in`);
the K/V projections are called as modules when a hook is on them (`_project_kv`), and the shape-only
runs give the cast layers fake weights of their compute dtype (`DiffusersAdapter.shape_run`).

PEFT LoRA: `to_k`/`to_v` write into the K/V buffer with one GEMM each while they are plain
`nn.Linear` layers, reading their weights at every call (never a cached [W_k; W_v], which PEFT's
in-place `fuse_lora` would leave stale); once a LoRA layer wraps either, the modules themselves are
called (LoRA included) and their outputs copied into the buffer. Modules that LoRA adds after
`parallelize` (a LoRA conv's `lora_A`) are swapped at the next pipeline call.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import (CROSS_ATTENTION_PROCESSORS, Attention, AttnProcessor,
                                                  AttnProcessor2_0, FusedAttnProcessor2_0, IPAdapterAttnProcessor,
                                                  IPAdapterAttnProcessor2_0, JointAttnProcessor2_0,
                                                  SlicedAttnAddedKVProcessor, SlicedAttnProcessor)
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3SingleTransformerBlock

from parafuse.attention import attention
from parafuse.parallel.adapter import BUILTIN
from parafuse.parallel.engine import ExchangeEngine
from parafuse.parallel.layers import STAND_IN_RULES, PatchConv2d, PatchGroupNorm, _adopt
from parafuse.parallel.plan import SiteKind

try:                                   # the newer attention classes (Flux, Wan, ...): Flux's is split
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor
except ImportError:                    # older diffusers
    AttentionModuleMixin = FluxAttnProcessor = FluxIPAdapterAttnProcessor = ()
try:                                   # FLUX.2 (diffusers 0.36 on)
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor
except ImportError:
    Flux2AttnProcessor = Flux2ParallelSelfAttnProcessor = ()
from diffusers.models.embeddings import apply_rotary_emb

try:                                   # Qwen-Image (diffusers 0.35 on)
    from diffusers.models.transformers.transformer_qwenimage import (QwenDoubleStreamAttnProcessor2_0, QwenEmbedRope,
                                                                     QwenImageTransformer2DModel, apply_rotary_emb_qwen)
except ImportError:                    # older diffusers: no module is Qwen-Image's (StripQwenRope needs a base class)
    QwenDoubleStreamAttnProcessor2_0 = QwenImageTransformer2DModel = ()
    QwenEmbedRope, apply_rotary_emb_qwen = type("QwenEmbedRope", (nn.Module,), {}), None

try:                                   # diffusers' model hooks (caches, group offloading, layerwise casting)
    from diffusers.hooks import HookRegistry
except ImportError:                    # older diffusers: none
    HookRegistry = ()

DEFAULT_PROCESSORS = (AttnProcessor2_0, AttnProcessor)
# IP-Adapter's add the image prompt's tokens beside the text's, and each query row attends to both:
# row-local on a strip; their `ip_adapter_masks` are cut to the strip's tokens first (`_strip_masks`)
IP_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
# on a cross-attention module only (its calls go to the processor parafuse wrapped)
CROSS_PROCESSORS = DEFAULT_PROCESSORS + IP_PROCESSORS
# on the attention of SD3's single blocks (SD3.5's 8B ControlNets') and on SD3.5 Medium's second
# attention in a joint block (`attn2`, `use_dual_attention`): SD3's joint processor without text
# projections, called without text, which computes the default processor's self-attention
SINGLE_BLOCK_PROCESSORS = DEFAULT_PROCESSORS + (JointAttnProcessor2_0,)
# Flux's attention: its IP-Adapter processor adds, on the dual-stream blocks, the image queries'
# attention to the image prompt's tokens - row-local too (StripFluxProcessor computes it on the strip).
# FLUX.2's: the same joint attention, its single-stream blocks' projections fused with their MLP's
# (StripFlux2SingleProcessor); its KV-cache processors (Flux2KleinKVPipeline's) are not split
FLUX_PROCESSORS = (FluxAttnProcessor, FluxIPAdapterAttnProcessor, Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor)
# joint text+image attention parafuse splits: SD3's, and Qwen-Image's (text first, with the text's
# padding mask: StripQwenProcessor)
JOINT_PROCESSORS = (JointAttnProcessor2_0, QwenDoubleStreamAttnProcessor2_0)


class UnsupportedModelError(ValueError):
    """A module of the model that patch parallelism cannot split; the message names it."""


def unsupported(name: str, module: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"parafuse cannot parallelise module {name!r} ({type(module).__name__}): {why}. Supported today: the "
        f"denoisers of SD 1.x/2.x, SDXL (UNet2DConditionModel), PixArt, SD3, Flux, FLUX.2 and Qwen-Image, and "
        f"AutoencoderKL decoders")


def inner_processor(processor):
    """The processor parafuse's wrapper stands for (the processor itself if it is no wrapper)."""
    return processor.inner if isinstance(processor, StripAttnProcessor) else processor


def is_flux(attn: nn.Module) -> bool:
    """Flux's or FLUX.2's attention (a dual-stream joint block, or a single-stream block over
    [text | image]), with or without Flux's IP-Adapter."""
    return isinstance(attn, AttentionModuleMixin) and isinstance(
        inner_processor(getattr(attn, "processor", None)), FLUX_PROCESSORS)


def kv_width(attn: nn.Module) -> int:
    """The channels of an attention's keys (and of its values): its plain `to_k`'s, else its inner
    width - a LoRA layer may wrap to_k, and FLUX.2's single-stream attention has none (one
    projection fused with its MLP's)."""
    if type(getattr(attn, "to_k", None)) is nn.Linear:
        return attn.to_k.out_features
    return getattr(attn, "inner_kv_dim", None) or attn.inner_dim


def is_qwen(attn: nn.Module) -> bool:
    """Qwen-Image's joint attention (its dual-stream blocks' QwenDoubleStreamAttnProcessor2_0)."""
    return isinstance(inner_processor(getattr(attn, "processor", None)), QwenDoubleStreamAttnProcessor2_0)


def qwen_grids(img_shapes) -> tuple[tuple[int, int], ...]:
    """The token grids (rows, columns), in sequence order, that a Qwen-Image transformer call's
    `img_shapes` name: per sample the (frames, rows, columns) of each grid (an edit pipeline's: the
    latent's, then the conditioning image's). diffusers' rotary table is the first sample's, so
    every sample must name the same grids; parafuse cuts grids of one frame."""
    samples = {tuple(tuple(g) for g in (s if isinstance(s, list) else [s])) for s in img_shapes}
    if len(samples) != 1 or any(frames != 1 for frames, _, _ in next(iter(samples))):
        raise UnsupportedModelError(f"Qwen-Image's img_shapes {img_shapes} name other grids for different samples "
                                    f"or a grid of several frames: parafuse splits grids of one frame, the same "
                                    f"for every sample of a call; pass one (1, rows, columns) per grid")
    return tuple((rows, cols) for _, rows, cols in next(iter(samples)))


def strip_tokens_of(t: torch.Tensor, spans: list[tuple[int, int]], dim: int) -> torch.Tensor:
    """The tokens [a, b) of each of `spans` of the sequence along `dim` of `t`, one after another: a
    strip's rows of every grid of a token sequence (`StripGeometry.token_spans`)."""
    return torch.cat([t.narrow(dim, a, b - a) for a, b in spans], dim)


def is_joint(attn: nn.Module) -> bool:
    """Joint text+image attention: text gets its own K/V projections beside the image's."""
    return getattr(attn, "add_k_proj", None) is not None


def processor_hint(model: nn.Module, module: nn.Module, owner: str) -> str:
    """What makes `module`'s attention splittable, as "; call ... first", or "" where nothing the
    user can call would: each hint is what diffusers itself offers for that processor, and the
    default-processor hint only where `set_default_attn_processor()` (tried, then undone) does give
    `module` a processor parafuse splits - it is missing on some models (SD3.5, CogView3) and on
    others installs a processor as foreign as the one it replaces (HunyuanDiT's)."""
    inner = inner_processor(module.processor)
    if isinstance(inner, (SlicedAttnProcessor, SlicedAttnAddedKVProcessor)):
        return "; call pipe.disable_attention_slicing() first"
    if isinstance(inner, FusedAttnProcessor2_0) or getattr(module, "fused_projections", False):
        return f"; call {owner}.unfuse_qkv_projections() first"
    if type(inner) not in CROSS_ATTENTION_PROCESSORS or not hasattr(model, "set_default_attn_processor"):
        return ""
    saved = model.attn_processors
    try:
        model.set_default_attn_processor()
        works = isinstance(module.processor, DEFAULT_PROCESSORS)
    except (ValueError, NotImplementedError):
        works = False
    finally:
        model.set_attn_processor(saved)
    return f"; call {owner}.set_default_attn_processor() first" if works else ""


def _hook_classes(module: str, *names: str) -> tuple[type, ...]:
    """The hook classes `names` of `diffusers.hooks.<module>` that this diffusers release has."""
    try:
        found = importlib.import_module(f"diffusers.hooks.{module}")
    except ImportError:
        return ()
    return tuple(getattr(found, n) for n in names if hasattr(found, n))


# diffusers' model hooks (a HookRegistry on a module wraps its forward), by what they do on a strip
OFFLOAD_HOOKS = _hook_classes("group_offloading", "GroupOffloadingHook", "LazyPrefetchGroupOffloadingHook",
                              "LayerExecutionTrackerHook")
# layerwise casting: a leaf layer's hook casts its weights around its forward, which runs on a strip as
# on the whole image; PEFT's switch on a LoRA layer around such a layer only stops PEFT casting the input
CASTING_HOOKS = _hook_classes("layerwise_casting", "LayerwiseCastingHook", "PeftInputAutocastDisableHook")
LAYER_CASTING = _hook_classes("layerwise_casting", "LayerwiseCastingHook")
CONTEXT_PARALLEL_HOOKS = _hook_classes("context_parallel", "ContextParallelSplitHook", "ContextParallelGatherHook")
# diffusers' first-block cache, which runs on a denoiser's strip deciding for the whole image
# (parafuse.diffusers.cache); on any other model it is refused with the other caches
FIRST_BLOCK_CACHE_HOOKS = _hook_classes("first_block_cache", "FBCHeadBlockHook", "FBCBlockHook")
CACHE_HOOKS = (FIRST_BLOCK_CACHE_HOOKS
               + _hook_classes("pyramid_attention_broadcast", "PyramidAttentionBroadcastHook")
               + _hook_classes("faster_cache", "FasterCacheDenoiserHook", "FasterCacheBlockHook")
               + _hook_classes("mag_cache", "MagCacheHeadHook", "MagCacheBlockHook")
               + _hook_classes("taylorseer_cache", "TaylorSeerCacheHook")
               + _hook_classes("sea_cache", "SeaCacheRootHook", "SeaCacheLeaderBlockHook", "SeaCacheBlockHook",
                               "SeaCachePostNormHook")
               + _hook_classes("text_kv_cache", "TextKVCacheTransformerHook", "TextKVCacheBlockHook"))


def diffusers_hooks(module: nn.Module) -> list:
    """The hooks of a diffusers HookRegistry on `module`'s own forward (an empty registry is what
    `cache_context` and removed hooks leave behind)."""
    registry = module.__dict__.get("_diffusers_hook")
    return list(registry.hooks.values()) if isinstance(registry, HookRegistry) else []


def keep_layerwise_casting(module: nn.Module, new: nn.Module) -> None:
    """A layer swapped in for `module` (`parafuse.parallel.layers.stand_in`) takes no diffusers hook
    registry of `module`'s (its hooks call `module`); diffusers' layerwise casting, the one hook a
    swapped layer keeps (the others are refused before any layer is swapped), is put on `new` by
    diffusers' own call, so that it casts the weights around `new`'s forward as around `module`'s."""
    registry = new.__dict__.pop("_diffusers_hook", None)
    if registry is None:
        return
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    for hook in registry.hooks.values():
        if isinstance(hook, LAYER_CASTING):
            apply_layerwise_casting_hook(new, hook.storage_dtype, hook.compute_dtype, hook.non_blocking)


STAND_IN_RULES.append(keep_layerwise_casting)        # the swaps of every diffusers model keep it


def cast_layers(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Every layer of `model` under diffusers' layerwise casting, with its hook."""
    return [(m, hook) for m in model.modules() for hook in diffusers_hooks(m) if isinstance(hook, LAYER_CASTING)]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in, by diffusers' rule (`ModelMixin.dtype`): its layerwise casting's
    compute dtype, else that of its first floating parameter (its weights may be in a storage dtype)."""
    from diffusers.models.modeling_utils import get_parameter_dtype

    return get_parameter_dtype(model)


def cache_removal(model: nn.Module, owner: str) -> str:
    """How the user takes a diffusers cache off `model` (named `owner`): `disable_cache()` where
    `enable_cache` put it there; a cache applied with `apply_first_block_cache` & co. has no call
    that removes it."""
    if getattr(model, "is_cache_enabled", False):
        return f"call {owner}.disable_cache() first"
    return "load the model again without it"


def hook_refusal(module: nn.Module, model: nn.Module, owner: str, first_block_cache: bool = False) -> str | None:
    """Why `module` of `model` (named `owner` in hints) cannot run on a strip because of a hook on its
    forward or diffusers' own parallelism on it, and what to do; None if nothing is on it. Every
    diffusers hook is refused - each family runs differently on a strip than on the whole image, and
    any other is unchecked - except layerwise casting of a leaf layer and, where `first_block_cache`
    (a denoiser's), the first-block cache's. A hint `call ... first` is given only where a diffusers
    call removes it."""
    if "_hf_hook" in module.__dict__:
        return ("an accelerate hook (CPU offload) moves its weights during the call, while patch parallelism "
                "splits the activations across GPUs; call pipe.remove_all_hooks() first, then pipe.to(device)")
    if getattr(module, "_parallel_config", None) is not None:
        return ("diffusers' own parallelism (enable_parallelism) splits this model across GPUs, a second "
                "parallelism beside parafuse's strips: load the model without it (parafuse splits the rows itself)")
    for hook in diffusers_hooks(module):
        what = type(hook).__name__
        if first_block_cache and isinstance(hook, FIRST_BLOCK_CACHE_HOOKS):
            continue
        if isinstance(hook, OFFLOAD_HOOKS):
            return (f"diffusers' group offloading ({what}) moves its weights between devices during the call, while "
                    f"patch parallelism splits the activations across GPUs: load the model again without "
                    f"enable_group_offload and move it to its GPU (diffusers has no call that removes it)")
        if isinstance(hook, CASTING_HOOKS):
            if not isinstance(hook, LAYER_CASTING) or next(module.children(), None) is None:
                continue                  # a leaf layer's casting, or PEFT's switch around one: runs on a strip
            return (f"diffusers' layerwise casting ({what}) on a module with submodules casts all their weights "
                    f"around its own forward, which parafuse replaces (the denoiser's, the layers it swaps): load "
                    f"the model again and cast it layer by layer, with enable_layerwise_casting")
        if isinstance(hook, CONTEXT_PARALLEL_HOOKS):
            return (f"diffusers' context parallelism ({what}) splits this model's sequence across GPUs, a second "
                    f"parallelism beside parafuse's strips: load the model without enable_parallelism")
        if isinstance(hook, CACHE_HOOKS):
            removal = cache_removal(model, owner)
            fix = f"; {removal}" if removal.startswith("call") else f": {removal}"
            return (f"diffusers' cache hook {what} skips computation by its own state (a statistic of the "
                    f"activations, which on a strip are this rank's rows alone, or a schedule that leaves "
                    f"parafuse's per-layer exchanges out of step), so the ranks could skip differently: a hang or "
                    f"a wrong image (of diffusers' caches only the first-block cache runs on a parallel "
                    f"denoiser){fix}")
        return (f"a diffusers hook ({what}) wraps this module's forward, which parafuse has not checked against "
                f"strips: remove it (HookRegistry.remove_hook) before parallelizing")
    return None


class DiffusersAdapter:
    name = "diffusers"

    def __init__(self, owner: str = "the denoiser", first_block_cache: bool = False):
        self.tracing = False       # set by the shape trace: patch modules run as the plain ones
        self.owner = owner         # how the hints name the model ("pipe.unet")
        # a denoiser's: diffusers' first-block cache runs on its strip (parafuse.diffusers.cache)
        self.first_block_cache = first_block_cache

    def check(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError, naming the module, for anything that cannot be split by rows."""
        single = {id(b.attn) for b in model.modules() if isinstance(b, SD3SingleTransformerBlock)} | {
            id(b.attn2) for b in model.modules() if isinstance(b, JointTransformerBlock) and b.use_dual_attention}
        for name, m in model.named_modules():
            why = hook_refusal(m, model, self.owner, self.first_block_cache)
            if why:
                raise unsupported(name or self.owner, m, why)
            if isinstance(m, DiTTransformer2DModel):
                raise unsupported(name, m, "DiT unpatchifies its output as a square grid (height = width = "
                                           "sqrt(tokens)), which a strip is not")
            if isinstance(m, nn.Conv3d):
                raise unsupported(name, m, "a 3D convolution (a video VAE's, such as Qwen-Image's causal "
                                           "AutoencoderKLQwenImage), whose frames parafuse does not split")
            if isinstance(m, QwenImageTransformer2DModel) and (getattr(m, "zero_cond_t", False) or
                                                               not isinstance(m.pos_embed, QwenEmbedRope)):
                raise unsupported(name, m, "zero_cond_t (Qwen-Image-Edit-2511's modulation index) or the layered "
                                           "3D rotary positions (Qwen-Image-Layered's) index every token of the "
                                           "whole sequence inside forward, which a strip's tokens do not match: use "
                                           "a Qwen-Image transformer without them (text to image, Qwen-Image-Edit)")
            if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise unsupported(name, m, f"padding {m.padding!r} / padding mode {m.padding_mode!r} (only explicit "
                                           f"zero padding is split into strips)")
            if isinstance(m, AttentionModuleMixin) and not isinstance(m, Attention) and not is_flux(m):
                processor = type(inner_processor(m.processor)).__name__
                raise unsupported(name, m, f"attention with processor {processor} (of the AttentionModuleMixin "
                                           f"families parafuse splits Flux's FluxAttnProcessor and "
                                           f"FluxIPAdapterAttnProcessor and FLUX.2's Flux2AttnProcessor and "
                                           f"Flux2ParallelSelfAttnProcessor; FLUX.2 [klein]'s KV-cache processors: "
                                           f"use Flux2KleinPipeline)")
            if is_flux(m) and getattr(m, "fused_projections", False):
                raise unsupported(name, m, f"fused QKV projections{processor_hint(model, m, self.owner)}")
            if isinstance(m, Attention):
                inner = inner_processor(m.processor)
                if is_joint(m) and getattr(m, "add_q_proj", None) is None:    # Kandinsky / UnCLIP: text K/V beside the image's
                    raise unsupported(name, m, f"attention with added text key/value projections (processor "
                                               f"{type(inner).__name__}), whose image queries attend to text and "
                                               f"image keys in one softmax; parafuse splits SD3's joint attention "
                                               f"and Flux's, not this one")
                if is_joint(m):
                    if not isinstance(inner, JOINT_PROCESSORS):
                        raise unsupported(name, m, f"joint text+image attention with processor {type(inner).__name__} "
                                                   f"(parafuse splits diffusers' JointAttnProcessor2_0 and "
                                                   f"QwenDoubleStreamAttnProcessor2_0)"
                                                   f"{processor_hint(model, m, self.owner)}")
                elif not isinstance(inner, SINGLE_BLOCK_PROCESSORS if id(m) in single else
                                    CROSS_PROCESSORS if m.is_cross_attention else DEFAULT_PROCESSORS):
                    raise unsupported(name, m, f"attention processor {type(inner).__name__} (parafuse runs "
                                               f"self-attention itself and knows only diffusers' default "
                                               f"processors){processor_hint(model, m, self.owner)}")

    def site_kind(self, module: nn.Module) -> SiteKind | None:
        if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
            return BUILTIN.site_kind(module)
        if isinstance(module, Attention) or is_flux(module):
            return SiteKind.ATTN
        if isinstance(module, PatchEmbed) and module.pos_embed is not None or isinstance(module, QwenEmbedRope):
            return SiteKind.POSITIONS
        if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0 and module.norm is None:
            return SiteKind.DOWNSAMPLE
        return None

    # ---- what the shape trace (parafuse.parallel.trace) asks a model family ----------------------
    def attention_site(self, module, args, kwargs, x, grids) -> dict | None:
        """A self- or joint attention site's image positions (those of the first of the input's
        `grids`, which name its level), width and text tokens; None for cross-attention (text keys:
        row-local on a strip)."""
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        width = kv_width(module)
        if is_flux(module):            # image tokens of every grid (single blocks prepend the text)
            image = grids[0][0] * grids[0][1]
            text = context.shape[1] if context is not None else x.shape[1] - sum(h * w for h, w in grids)
        elif context is None or is_joint(module):        # joint attention: hidden_states are the image
            tokens = x.shape[1] if x.ndim == 3 else x.shape[2] * x.shape[3]
            # the first grid's share of a sequence of several (Qwen-Image edit's: the latent's, then the image's)
            image = tokens * grids[0][0] * grids[0][1] // sum(h * w for h, w in grids)
            text = context.shape[1] if context is not None else 0
        else:
            return None
        return {"positions": image, "channels": width, "heads": module.heads if text else 0, "text": text}

    def grid_positions(self, module, args, out) -> int:
        if isinstance(module, QwenEmbedRope):        # its image table holds every grid's: the first one's count
            rows, cols = qwen_grids(args[0])[0]
            return rows * cols
        return out.shape[1]                          # PatchEmbed: one token per patch

    def counts_flops(self, module: nn.Module) -> bool:
        return False

    def attention_flops(self, module, args, kwargs, x) -> None:
        return None

    def refuse(self, name: str, module: nn.Module, why: str) -> Exception:
        return unsupported(name, module, why)

    @contextmanager
    def shape_run(self, model: nn.Module):
        """Inside a FakeTensorMode, for a shape-only run of `model`: each layer under layerwise
        casting runs its class's forward on fake weights of its compute dtype (made under the mode:
        no memory), its own weights and its hook back after the run. The hook converts the layer by
        `module.to()`, which for a fake tensor swaps it into the parameter in place: the real weights
        would become fakes (and a second conversion fails). Qwen-Image's rotary tables are computed
        for real (small, and needed anyway): diffusers caches them per module and size
        (`lru_cache`), and a table made under the fake mode would be cached as a fake for every
        later call."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        saved = []
        ropes = [(m, m.__dict__.get("forward")) for m in model.modules() if isinstance(m, QwenEmbedRope)]
        for m, hook in cast_layers(model):
            saved.append((m, m.__dict__.pop("forward"), dict(m._parameters)))
            for name, p in m._parameters.items():
                if p is not None:
                    m._parameters[name] = torch.empty_like(p, dtype=hook.compute_dtype)
        for rope, _ in ropes:
            def real(*args, forward=rope.forward, **kwargs):
                with unset_fake_temporarily():
                    return forward(*args, **kwargs)
            rope.forward = real
        try:
            yield
        finally:
            for m, forward, weights in saved:
                m.forward = forward
                m._parameters.update(weights)
            for rope, own in ropes:
                if own is None:
                    del rope.forward
                else:
                    rope.forward = own

    def patch(self, kind: SiteKind, module: nn.Module, engine: ExchangeEngine, key: str) -> nn.Module:
        """The module to put in place of `module` (the same one, with a processor, for attention)."""
        if kind == SiteKind.CONV:
            return _adopt(PatchConv2d, module, engine, key)
        if kind == SiteKind.NORM:
            return _adopt(PatchGroupNorm, module, engine, key)
        if kind == SiteKind.ATTN:
            if not isinstance(module.processor, StripAttnProcessor):
                module.set_processor(strip_processor_class(module)(engine, key, module.processor, self))
            return module
        if kind == SiteKind.DOWNSAMPLE:
            return module if isinstance(module, StripDownsample2D) else _adopt(StripDownsample2D, module, engine, key)
        if isinstance(module, (StripPatchEmbed, StripQwenRope)):
            return module
        if isinstance(module, QwenEmbedRope):
            strip = _adopt(StripQwenRope, module, engine, key)
        else:
            strip = _adopt(StripPatchEmbed, module, engine, key)
            strip._grids = {}
        strip.adapter = self
        return strip


    def rekey(self, model: nn.Module) -> None:
        """Name every patch layer and processor by its current path: a wrapper put around a layer
        (a LoRA layer's `base_layer`) moves it, and the plan's sites are keyed by path."""
        for name, m in model.named_modules():
            if isinstance(m, (PatchConv2d, PatchGroupNorm, StripPatchEmbed, StripQwenRope)):
                m.key = name
            elif isinstance(getattr(m, "processor", None), StripAttnProcessor):
                m.processor.key = name


class StripAttnProcessor:
    """diffusers' default attention (AttnProcessor2_0's steps) with self-attention over the strip.

    Self-attention calls: the strip's queries attend to the engine's K/V buffer [rows from above |
    local rows | rows from below], whose local rows this processor writes (`_project_kv`).
    Cross-attention calls (and every call while the shape trace runs) go to the processor this one
    replaced, an IP-Adapter's with its masks cut to the strip (`_strip_masks`)."""

    plain = AttnProcessor2_0       # the diffusers processor this one stands for

    def __new__(cls, *args, **kwargs):
        # diffusers' loaders rebuild processors from their class with no arguments (load_ip_adapter:
        # `processor.__class__()` for every self-attention): that gives the plain processor, which
        # the next call of the parallel pipeline wraps again
        if not args and not kwargs:
            return cls.plain()
        return super().__new__(cls)

    def __init__(self, engine: ExchangeEngine, key: str, inner, adapter: DiffusersAdapter):
        self.engine, self.key, self.inner, self.adapter = engine, key, inner, adapter

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 ip_adapter_masks: list | None = None, **kwargs):
        # `ip_adapter_masks` is named so that `Attention.forward` passes it on (it keeps the keywords a
        # processor's signature names); as there, only a processor that reads it gets it
        if encoder_hidden_states is not None or self.adapter.tracing:
            if ip_adapter_masks is not None and isinstance(self.inner, IP_PROCESSORS):
                kwargs["ip_adapter_masks"] = (ip_adapter_masks if self.adapter.tracing else
                                              self._strip_masks(ip_adapter_masks, hidden_states))
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise UnsupportedModelError(f"self-attention {self.key!r} was given an attention mask; masked "
                                        f"self-attention over image tokens cannot be split into strips")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial is not None:
            b, c, h, w = spatial
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        b, tokens, _ = hidden_states.shape
        buf, _, _ = self._write_local_kv(attn, hidden_states, "self-attention", "tokens",
                                         ": its tokens are not the strip's image grid")

        def heads(t):                                   # [T, B, inner] view -> [B, heads, T, d] view
            return t.permute(1, 0, 2).unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        inner = buf.shape[-1] // 2
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        key, value = heads(buf[..., :inner]), heads(buf[..., inner:])
        if attn.scale == query.shape[-1] ** -0.5:
            out = attention(query, key, value)
        else:
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        self.engine.exchange_kv(self.key, buf, before=False)

        out = out.transpose(1, 2).reshape(b, tokens, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial is not None:
            out = out.transpose(-1, -2).reshape(spatial)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _strip_masks(self, masks: list, hidden_states: torch.Tensor) -> list:
        """IP-Adapter masks (a [B, images, H, W] tensor or None per adapter) as this strip's: each
        image's mask downsampled by diffusers for the whole image's queries at this call's level (its
        own aspect guess, padding and cut), then this strip's tokens of it as one row [B, images, 1, T],
        which diffusers' downsample inside the wrapped processor passes through unchanged (for T
        queries a 1 x T mask gives a 1 x T grid, and a bicubic resize to its own size is the identity)."""
        tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        strip = self.engine.strip
        level = self.engine.geometry.level_of_tokens(tokens, strip)
        start, whole = level.offsets[strip] * level.width, level.height * level.width

        def cut(mask: torch.Tensor) -> torch.Tensor:
            rows = [IPAdapterMaskProcessor.downsample(mask[:, i], 1, whole, 1)[:, start: start + tokens, 0]
                    for i in range(mask.shape[1])]
            return torch.stack(rows, 1).unsqueeze(2)
        return [None if m is None else cut(m) for m in masks]

    def _write_local_kv(self, attn: Attention, image: torch.Tensor, what: str, unit: str,
                        why: str = "") -> tuple[torch.Tensor, int, int]:
        """This strip's K/V of the image tokens `image` [B, T, C] into the engine's buffer, then the
        exchange a synchronous step waits for; returns the buffer [above | local | below] and the
        token range of the local rows in it."""
        buf, start, end = self.engine.kv_buffer(self.key)
        if end - start != image.shape[1]:
            raise UnsupportedModelError(f"{what} {self.key!r} got {image.shape[1]} {unit}, but the strip has "
                                        f"{end - start} at its level{why}")
        self._project_kv(attn, image, buf[start:end])
        self.engine.exchange_kv(self.key, buf, before=True)
        return buf, start, end

    def _project_kv(self, attn: Attention, x: torch.Tensor, out: torch.Tensor) -> None:
        """This strip's keys and values into `out` [T, B, 2*inner], token-major.

        A plain nn.Linear projection of one sample writes straight into its half of the buffer
        (one GEMM each, reading the layer's weight as it is now); anything else - a PEFT LoRA layer
        around to_k / to_v, a key norm, a hook on the layer's forward (layerwise casting, whose
        weights are in their storage dtype until it runs) - is called as the module and copied in.
        No weight is cached or concatenated: PEFT's fuse_lora changes the weight in place through
        `.data`, which neither moves its storage nor bumps its version, so a cached [W_k; W_v] would
        silently keep the unfused weights."""
        inner = out.shape[-1] // 2
        for proj, half, norm in ((attn.to_k, out[..., :inner], attn.norm_k), (attn.to_v, out[..., inner:], None)):
            if type(proj) is nn.Linear and "forward" not in proj.__dict__ and x.shape[0] == 1 and norm is None:
                if proj.bias is None:
                    torch.mm(x[0], proj.weight.t(), out=half[:, 0])
                else:
                    torch.addmm(proj.bias, x[0], proj.weight.t(), out=half[:, 0])
                continue
            y = proj(x)
            if norm is not None:        # per head, over the head dim: the same on [B, T, heads, d]
                y = norm(y.unflatten(-1, (attn.heads, -1))).flatten(-2)
            half.copy_(y.transpose(0, 1))


class StripDownsample2D(Downsample2D):
    """diffusers' Downsample2D with padding=0 (the VAE encoder's): the input padded by a zero column
    on the right and a zero row at the bottom, then a 3x3 stride-2 conv without padding. Its conv is
    handed the unpadded input and pads it itself (`PatchConv2d`'s `pads`): on a strip the padded row
    is the conv's bottom halo, the next strip's first row (zeros below the last strip)."""

    PADS = (0, 1, 0, 1)            # left, right, top, bottom: diffusers' F.pad in Downsample2D.forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states, pads=self.PADS)


class StripPatchEmbed(PatchEmbed):
    """PatchEmbed on a strip: sin-cos positions of the whole patch grid (as PatchEmbed computes them
    for the whole image, SD3's cropped table included), sliced to the strip's rows - never
    recomputed from the strip's own size, which would restart every strip at row 0."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.adapter.tracing:
            return super().forward(latent)
        p = self.patch_size
        h, w = latent.shape[-2] // p, latent.shape[-1] // p
        level = self.engine.geometry.level_of_width(w)
        off = level.offsets[self.engine.strip]
        pos = self._grid(level.height, w, latent.device)[:, off * w: (off + h) * w]
        latent = self.proj(latent)
        if self.flatten:
            latent = latent.flatten(2).transpose(1, 2)
        if self.layer_norm:
            latent = self.norm(latent)
        return (latent + pos).to(latent.dtype)

    def _grid(self, height: int, width: int, device) -> torch.Tensor:
        """[1, height*width, D] positions of the whole grid (in patches), cached per grid."""
        if (height, width) not in self._grids:
            if self.pos_embed_max_size:
                grid = self.cropped_pos_embed(height * self.patch_size, width * self.patch_size)
            elif (self.height, self.width) == (height, width):
                grid = self.pos_embed
            else:
                grid = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], (height, width), base_size=self.base_size,
                                               interpolation_scale=self.interpolation_scale, device=device,
                                               output_type="pt").float().unsqueeze(0)
            self._grids[(height, width)] = grid
        return self._grids[(height, width)]


class StripQwenRope(QwenEmbedRope):
    """Qwen-Image's rotary table on a strip: the model computes it inside forward from `img_shapes`,
    which stay the whole sequence's (`StripModel._grid`), so the table is that of every grid, one
    after another (an edit pipeline's: the latent's, then the conditioning image's, its frame
    positions after the latent's) and the text's (which starts after the largest side of any grid);
    its image part is then cut to the strip's tokens - its rows of every grid (`token_spans`) - as
    the hidden states are. Never recomputed from the strip's own size, which would restart every
    strip at row 0. (The shape-only runs compute it for real: `DiffusersAdapter.shape_run`.)"""

    def forward(self, video_fhw, device=None, max_txt_seq_len=None):
        image, text = super().forward(video_fhw, device=device, max_txt_seq_len=max_txt_seq_len)
        if self.adapter.tracing:
            return image, text
        geometry = self.engine.geometry
        if image.shape[0] != sum(geometry.tokens(1)):
            grids = " + ".join(f"{g.height}x{g.width}" for g in geometry.grids)
            raise UnsupportedModelError(f"Qwen-Image's rotary table {self.key!r} has {image.shape[0]} image positions, "
                                        f"not the {grids} token grids': pass the img_shapes of the latent the "
                                        f"pipeline called the transformer with")
        return strip_tokens_of(image, geometry.token_spans(self.engine.strip), 0), text


class StripJointProcessor(StripAttnProcessor):
    """Joint text+image attention (SD3's JointAttnProcessor2_0) with image tokens in strips and text
    tokens replicated on every rank.

    Image queries attend to the mode's image K/V (the engine's buffer) and this step's text K/V
    (always fresh: every rank computes it). Text queries attend to every image token, so their
    output is merged across the strips: each rank attends with this step's own image keys (and
    strip 0 also with the text keys, so that they enter exactly one partial result), and the
    engine merges the partial outputs by their log-sum-exps (`ExchangeEngine.merge_text`, kind
    `text_attn`) behind the image attention: exactly (the text hidden states stay bitwise equal on
    every rank), or with `text_merge="stale"` in the stale modes from the other strips' previous
    partial outputs and this strip's fresh one."""

    plain = JointAttnProcessor2_0

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if self.adapter.tracing:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is None or attention_mask is not None:
            raise UnsupportedModelError(f"joint attention {self.key!r} called without text tokens or with a mask")
        b, tokens, _ = hidden_states.shape
        buf, start, end = self._write_local_kv(attn, hidden_states, "joint attention", "image tokens")

        def split(t):                                   # [B, T, inner] -> [B, heads, T, d]
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        def heads(t):                                   # [T, B, inner] buffer view -> [B, heads, T, d]
            return t.permute(1, 0, 2).unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query = split(attn.to_q(hidden_states))
        text_q, text_k = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
        text_v = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        image, text = self._joint_attention(query, text_q, text_k, text_v, buf, start, end, heads, text_first=False)

        image = attn.to_out[1](attn.to_out[0](image.transpose(1, 2).reshape(b, tokens, -1).to(query.dtype)))
        text = text.transpose(1, 2).reshape(b, text.shape[2], -1).to(query.dtype)
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text

    def _joint_attention(self, query, text_q, text_k, text_v, buf, start, end, heads, text_first: bool,
                         text_mask: torch.Tensor | None = None):
        """Image queries over the whole K/V buffer joined with the text K/V (in the family's token
        order: SD3 image first, Flux and Qwen-Image text first), then the exchange the stale modes
        post; text queries over this strip's image keys (and, on strip 0 only, the text keys, so
        that they enter exactly one partial result), merged across strips by the engine
        (`merge_text`) while the image attention runs. `heads` views a [T, B, inner] buffer slice as
        [B, heads, T, d]. `text_mask` [B, text] (bool; Qwen-Image's padding mask): the text keys it
        masks out are left out of both, wherever they enter; the image keys of every strip, fresh
        or stale, all count, as in diffusers' joint mask."""
        def joined(image_t, text_t):
            return torch.cat([text_t, image_t] if text_first else [image_t, text_t], 2)

        def kept(image_keys: int) -> torch.Tensor | None:      # [B, 1, 1, keys]: the keys that count
            if text_mask is None:
                return None
            image = text_mask.new_ones(text_mask.shape[0], image_keys)
            return torch.cat([text_mask, image] if text_first else [image, text_mask], 1)[:, None, None]

        inner = buf.shape[-1] // 2
        local_k, local_v = heads(buf[start:end, :, :inner]), heads(buf[start:end, :, inner:])
        local_mask = None
        if self.engine.strip == 0:
            local_k, local_v, local_mask = joined(local_k, text_k), joined(local_v, text_v), kept(end - start)
        text = self.engine.merge_text(self.key, *partial_attention(text_q, local_k, local_v, local_mask))
        key, value = heads(buf[..., :inner]), heads(buf[..., inner:])
        image = F.scaled_dot_product_attention(query, joined(key, text_k), joined(value, text_v),
                                               attn_mask=kept(buf.shape[0]))
        self.engine.exchange_kv(self.key, buf, before=False)
        return image, text()


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v over the keys `k` alone (those `keep` [B, 1, 1, keys] marks, if
    given), in float32, and its log-sum-exp [B, heads, L]: what the strips' results are merged from."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    return (weights @ v.float()) / total, (top + total.log()).squeeze(-1)


class StripFluxProcessor(StripJointProcessor):
    """Flux's attention with image tokens in strips and text tokens replicated (Flux puts text first).

    Dual-stream blocks get text as `encoder_hidden_states`; single-stream blocks get [text | image]
    as one sequence, whose text length is what is left of it beside the strip's image tokens. Keys
    are RMS-normed and rotated (RoPE of the whole grid's ids, sliced: the model computes the rotary
    embedding from the strip's `img_ids`) before they enter the K/V buffer; image queries attend to
    this step's text K/V and the mode's image K/V, text queries to every image token, merged
    across strips as in StripJointProcessor. FLUX.2's attention runs the same steps
    (`StripFlux2Processor`, `StripFlux2SingleProcessor`): only where its queries, keys and values
    come from (`_project`) and what the block's output is made of (`_output`) differ.

    Wrapping diffusers' FluxIPAdapterAttnProcessor (`pipe.load_ip_adapter`), a dual-stream block
    also returns the IP-Adapter's term (`_image_prompt`) as the block's third output."""

    plain = FluxAttnProcessor

    # named, not left to **kwargs: FluxAttention passes on only the keyword arguments the
    # processor's signature names
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 ip_hidden_states: list[torch.Tensor] | None = None, ip_adapter_masks=None):
        adapted = isinstance(self.inner, FluxIPAdapterAttnProcessor)
        if adapted and encoder_hidden_states is not None and ip_hidden_states is None:
            raise UnsupportedModelError(f"Flux attention {self.key!r} has an IP-Adapter but the call has no image "
                                        f"prompt: pass ip_adapter_image_embeds, or call pipe.unload_ip_adapter()")
        if self.adapter.tracing:
            ip = {"ip_hidden_states": ip_hidden_states} if adapted else {}
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **ip)
        return self._on_strip(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                              ip_hidden_states)

    def _on_strip(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, image_rotary_emb, ip_hidden_states=None):
        if attention_mask is not None or image_rotary_emb is None:
            raise UnsupportedModelError(f"Flux attention {self.key!r} called with a mask or without rotary embeddings")
        buf, start, end = self.engine.kv_buffer(self.key)
        tokens = end - start
        dual = encoder_hidden_states is not None
        text_len = encoder_hidden_states.shape[1] if dual else hidden_states.shape[1] - tokens
        if hidden_states.shape[1] - (0 if dual else text_len) != tokens or text_len < 0:
            raise UnsupportedModelError(f"Flux attention {self.key!r} got {hidden_states.shape[1]} tokens, which do not "
                                        f"hold the strip's {tokens} image tokens")
        (q, k, v), (text_q, text_k, text_v), rest = self._project(attn, hidden_states, encoder_hidden_states, text_len)
        cos, sin = image_rotary_emb

        def rotate(t, rows):
            return apply_rotary_emb(t, (cos[rows], sin[rows]), sequence_dim=1)

        def prepare(t, norm, rows):                 # [B, T, inner] -> normed, rotated (given rows) [B, T, heads, d]
            t = t.unflatten(-1, (-1, attn.head_dim))
            t = norm(t) if norm is not None else t
            return rotate(t, rows) if rows is not None else t

        img, txt = slice(text_len, None), slice(None, text_len)
        key = prepare(k, attn.norm_k, img)
        buf[start:end, :, : buf.shape[-1] // 2].copy_(key.flatten(2).transpose(0, 1))
        buf[start:end, :, buf.shape[-1] // 2:].copy_(v.transpose(0, 1))
        self.engine.exchange_kv(self.key, buf, before=True)

        query = prepare(q, attn.norm_q, None)                         # the IP-Adapter's queries are not rotated
        image_prompt = self._image_prompt(attn, query, ip_hidden_states) if dual else None
        query = rotate(query, img).transpose(1, 2)                    # [B, heads, T, d]
        norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if dual else (attn.norm_q, attn.norm_k)
        text_q, text_k = prepare(text_q, norm_q, txt), prepare(text_k, norm_k, txt)
        text_v = text_v.unflatten(-1, (-1, attn.head_dim))
        text_q, text_k, text_v = (t.transpose(1, 2) for t in (text_q, text_k, text_v))

        def heads(t):                                   # [T, B, inner] buffer view -> [B, heads, T, d]
            return t.permute(1, 0, 2).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)

        image_out, text_out = self._joint_attention(query, text_q, text_k, text_v, buf, start, end, heads,
                                                    text_first=True)

        image_out = image_out.transpose(1, 2).flatten(2).to(query.dtype)
        text_out = text_out.transpose(1, 2).flatten(2).to(query.dtype)
        return self._output(attn, image_out, text_out, dual, image_prompt, rest)

    def _project(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, text_len: int):
        """The strip's image and the text's queries, keys and values [B, T, inner] (a dual-stream
        block's text through its own projections), and what else the block's output needs (nothing)."""
        if encoder_hidden_states is not None:
            text, image = encoder_hidden_states, hidden_states
            text_qkv = attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
        else:
            text, image = hidden_states[:, :text_len], hidden_states[:, text_len:]
            text_qkv = attn.to_q(text), attn.to_k(text), attn.to_v(text)
        return (attn.to_q(image), attn.to_k(image), attn.to_v(image)), text_qkv, None

    def _output(self, attn, image_out: torch.Tensor, text_out: torch.Tensor, dual: bool, image_prompt, rest):
        """The block's attention output from the image and text outputs [B, T, inner]."""
        if not dual:
            return torch.cat([text_out, image_out], 1)
        out = attn.to_out[1](attn.to_out[0](image_out)), attn.to_add_out(text_out)
        return out if image_prompt is None else (*out, image_prompt)

    def _image_prompt(self, attn, query: torch.Tensor, ip_hidden_states: list[torch.Tensor] | None):
        """The IP-Adapter's term of a dual-stream block, or None without one: the strip's image
        queries `query` [B, T, heads, d] (normed, not rotated) attend to each adapter's image-prompt
        tokens through its own to_k_ip / to_v_ip, times its scale, summed over the adapters. Those
        tokens are the same on every strip, so the strip's rows of the term are exactly its rows
        of the unsplit term. `ip_adapter_masks` reach diffusers' processor too, which leaves them
        unused: ignored here as there."""
        ip = self.inner
        if not isinstance(ip, FluxIPAdapterAttnProcessor):
            return None
        q = query.transpose(1, 2)
        out = torch.zeros_like(q)
        for tokens, scale, to_k, to_v in zip(ip_hidden_states, ip.scale, ip.to_k_ip, ip.to_v_ip):
            k = to_k(tokens).view(q.shape[0], -1, attn.heads, attn.head_dim).transpose(1, 2)
            v = to_v(tokens).view(q.shape[0], -1, attn.heads, attn.head_dim).transpose(1, 2)
            out = out + scale * F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(2).to(query.dtype)


class StripFlux2Processor(StripFluxProcessor):
    """FLUX.2's dual-stream attention (Flux2Attention with Flux2AttnProcessor): Flux's steps."""

    plain = Flux2AttnProcessor


class StripFlux2SingleProcessor(StripFluxProcessor):
    """FLUX.2's single-stream blocks (Flux2ParallelSelfAttention, a parallel attention + MLP block):
    one fused projection `to_qkv_mlp_proj` gives each token of [text | strip] its query, key and
    value and the MLP's input, the strip's image keys and values go into the K/V buffer (where the
    stale modes' exchange reads and swaps them, as for every Flux attention), and the fused output
    projection `to_out` takes the attention's output beside the MLP's activation."""

    plain = Flux2ParallelSelfAttnProcessor

    # Flux2ParallelSelfAttention passes (hidden_states, attention_mask, image_rotary_emb): no text argument
    def __call__(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None):
        if self.adapter.tracing:
            return self.inner(attn, hidden_states, attention_mask, image_rotary_emb)
        return self._on_strip(attn, hidden_states, None, attention_mask, image_rotary_emb)

    def _project(self, attn, hidden_states, encoder_hidden_states, text_len):
        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = fused.split([3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], -1)
        q, k, v = qkv.chunk(3, -1)
        img, txt = slice(text_len, None), slice(None, text_len)
        return (q[:, img], k[:, img], v[:, img]), (q[:, txt], k[:, txt], v[:, txt]), mlp

    def _output(self, attn, image_out, text_out, dual, image_prompt, mlp):
        return attn.to_out(torch.cat([torch.cat([text_out, image_out], 1), attn.mlp_act_fn(mlp)], -1))


def strip_processor_class(attn: nn.Module) -> type[StripAttnProcessor]:
    """The processor parafuse puts on an attention site, by the processor it wraps."""
    inner = inner_processor(attn.processor)
    if isinstance(inner, Flux2ParallelSelfAttnProcessor):
        return StripFlux2SingleProcessor
    if isinstance(inner, Flux2AttnProcessor):
        return StripFlux2Processor
    return (StripFluxProcessor if is_flux(attn) else StripQwenProcessor if is_qwen(attn)
            else StripJointProcessor if is_joint(attn) else StripAttnProcessor)


# the attention_kwargs entry that carries Qwen-Image's text padding mask to StripQwenProcessor
TEXT_MASK = "text_mask"


def text_mask_to_attention(model: nn.Module, kwargs: dict) -> dict:
    """A Qwen-Image transformer call's text padding mask moved from `encoder_hidden_states_mask`
    to `attention_kwargs[TEXT_MASK]`, which the blocks hand their attention processors as it is,
    where those are parafuse's (StripQwenProcessor, with or without strips; diffusers' own would
    ignore it). Why: given the mask, diffusers' forward makes a device tensor of a Python int
    at every call (`compute_text_seq_len_from_mask`: a host-to-device copy, which a CUDA graph cannot
    capture) for a per-sample length the model never reads; without it the forward computes the
    same - the rotary table's text length is the padded one either way, and the blocks use the mask
    only in attention. The mask stays a tensor argument of the call (bool, as diffusers normalises
    it): a graph's replay reads each call's mask from its static buffer. Its shape is checked here,
    as diffusers' forward would have."""
    mask = kwargs.get("encoder_hidden_states_mask")
    if mask is None or not any(isinstance(getattr(m, "processor", None), StripQwenProcessor) for m in model.modules()):
        return kwargs
    text = kwargs.get("encoder_hidden_states")
    if text is None or tuple(mask.shape) != tuple(text.shape[:2]):
        raise ValueError(f"encoder_hidden_states_mask is {tuple(mask.shape)}, but encoder_hidden_states is "
                         f"{None if text is None else tuple(text.shape)}: pass a mask [batch, text tokens] of "
                         f"the prompt embeddings it masks")
    extra = kwargs.get("attention_kwargs") or {}
    return {**{k: v for k, v in kwargs.items() if k != "encoder_hidden_states_mask"},
            "attention_kwargs": {**extra, TEXT_MASK: mask.to(torch.bool)}}


def wrap_qwen_attention(model: nn.Module, adapter: DiffusersAdapter) -> None:
    """With one strip (no engine: N = 1, or cfg_parallel with one rank a branch) parafuse swaps no
    layers, but Qwen-Image's attention still takes StripQwenProcessor, which hands diffusers'
    processor the text mask: so that the mask stays out of the transformer's forward there too
    (`text_mask_to_attention`), whose steady calls are graphed with or without strips."""
    for name, m in model.named_modules():
        if is_qwen(m) and not isinstance(m.processor, StripAttnProcessor):
            adapter.patch(SiteKind.ATTN, m, None, name)


class StripQwenProcessor(StripJointProcessor):
    """Qwen-Image's joint attention (QwenDoubleStreamAttnProcessor2_0) with image tokens in strips
    and text tokens replicated, text first as Flux's.

    Queries and keys are RMS-normed per head and rotated by the model's rotary table, whose image
    part StripQwenRope has cut to the strip's tokens; the strip's rotated keys and its values enter
    the K/V buffer. The text's padding mask (`text_mask` [B, text] bool, which `text_mask_to_attention`
    moved out of the transformer's `encoder_hidden_states_mask`) masks the text keys for the image
    queries and in the text queries' partial result on strip 0; every strip's image keys count
    (`_joint_attention`), as in diffusers' joint mask. With one strip (no engine) it is diffusers'
    processor, given that mask (`wrap_qwen_attention`)."""

    plain = QwenDoubleStreamAttnProcessor2_0

    # named, not left to **kwargs: Attention.forward passes on only the keyword arguments the
    # processor's signature names
    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None, text_mask: torch.Tensor | None = None):
        if encoder_hidden_states_mask is not None:
            raise UnsupportedModelError(f"Qwen-Image attention {self.key!r} was given encoder_hidden_states_mask, "
                                        f"which parafuse hands its processors as attention_kwargs' {TEXT_MASK!r}: "
                                        f"call the parallelized transformer, not its blocks")
        if self.adapter.tracing or self.engine is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, text_mask, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None or attention_mask is not None or image_rotary_emb is None:
            raise UnsupportedModelError(f"Qwen-Image attention {self.key!r} called without text tokens or rotary "
                                        f"embeddings, or with an attention_mask (its text mask is the "
                                        f"transformer's encoder_hidden_states_mask)")
        head_dim = attn.inner_dim // attn.heads
        image_freqs, text_freqs = image_rotary_emb
        buf, start, end = self.engine.kv_buffer(self.key)
        if hidden_states.shape[1] != end - start or image_freqs.shape[0] != end - start:
            raise UnsupportedModelError(f"Qwen-Image attention {self.key!r} got {hidden_states.shape[1]} image tokens "
                                        f"and {image_freqs.shape[0]} rotary positions, but the strip has "
                                        f"{end - start}")

        def prepare(t, norm, freqs):           # [B, T, inner] -> normed, rotated [B, T, heads, d]
            t = t.unflatten(-1, (-1, head_dim))
            t = norm(t) if norm is not None else t
            return t if freqs is None else apply_rotary_emb_qwen(t, freqs, use_real=False)

        inner = buf.shape[-1] // 2
        buf[start:end, :, :inner].copy_(prepare(attn.to_k(hidden_states), attn.norm_k, image_freqs)
                                        .flatten(2).transpose(0, 1))
        buf[start:end, :, inner:].copy_(attn.to_v(hidden_states).transpose(0, 1))
        self.engine.exchange_kv(self.key, buf, before=True)

        query = prepare(attn.to_q(hidden_states), attn.norm_q, image_freqs).transpose(1, 2)     # [B, heads, T, d]
        text_q = prepare(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q, text_freqs).transpose(1, 2)
        text_k = prepare(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k, text_freqs).transpose(1, 2)
        text_v = prepare(attn.add_v_proj(encoder_hidden_states), None, None).transpose(1, 2)

        def heads(t):                                   # [T, B, inner] buffer view -> [B, heads, T, d]
            return t.permute(1, 0, 2).unflatten(-1, (-1, head_dim)).transpose(1, 2)

        image, text = self._joint_attention(query, text_q, text_k, text_v, buf, start, end, heads, text_first=True,
                                            text_mask=text_mask)
        image = attn.to_out[0](image.transpose(1, 2).flatten(2).to(query.dtype))
        if len(attn.to_out) > 1:
            image = attn.to_out[1](image)
        return image, attn.to_add_out(text.transpose(1, 2).flatten(2).to(query.dtype))
