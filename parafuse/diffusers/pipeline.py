"""`parallelize(pipe, ...)`: a diffusers pipeline whose denoiser runs patch-parallel.

    pipe = parafuse.parallelize(pipe, mode="partial", halo_portion=0.3, warmup_steps=4)
    out = pipe(prompt_embeds=..., height=2048, width=2048, generator=torch.Generator().manual_seed(0))

Every rank (launched by torchrun) calls the returned pipeline with the same arguments, generator
seed included. The pipeline's own loop, scheduler and output types are kept: rank 0 gets the
pipeline's usual output, every other rank None. The VAE decoder runs by strips too
(`parallel_decode`, always synchronous: equal to the plain decode); without it, only rank 0
decodes. `rank_stats` holds this rank's bytes per kind after each call (the decode's included).
"""
from __future__ import annotations

import inspect
import json
import os

import torch
import torch.nn as nn

from parafuse.diffusers.adapter import DiffusersAdapter, UnsupportedModelError, is_flux, is_joint
from parafuse.diffusers.strips import StripDecoder, StripDenoiser
from parafuse.parallel import kv_codec as kv_codec_module
from parafuse.parallel.distributed import ParallelLayout, init_distributed, launched_by_torchrun
from parafuse.parallel.engine import DEFAULT_HALO_PORTION, ExchangeEngine, check_settings
from parafuse.parallel.parallelize import parallelize as swap_layers
from parafuse.parallel.transport import KINDS, TorchTransport, Transport
from parafuse.runtime import ParallelConfig

DENOISERS = ("unet", "transformer")


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    for name in DENOISERS:
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            return name, model
    raise UnsupportedModelError(f"{type(pipe).__name__} has no denoiser parafuse can split (looked for "
                                f"{' / '.join('pipe.' + n for n in DENOISERS)})")


class ParallelPipeline:
    """The pipeline, called as before; its attributes (scheduler, vae, ...) are the pipeline's own."""

    def __init__(self, pipe, strips: StripDenoiser | None, decoder: StripDecoder | None, layout: ParallelLayout,
                 config: ParallelConfig):
        self.pipe, self.strips, self.decoder, self.layout, self.config = pipe, strips, decoder, layout, config
        self.rank_stats: dict = {}

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        sequential = calls_once_per_branch(self.pipe, kwargs)
        if self.config.cfg_parallel and not sequential and kwargs.get("guidance_scale", 2.0) <= 1.0:
            raise UnsupportedModelError("cfg_parallel splits the two guidance branches across ranks; it needs "
                                        "guidance_scale > 1 (Flux: true_cfg_scale > 1 and a negative prompt)")
        if sequential and not self.config.cfg_parallel and self.config.mode not in ("sync", "none"):
            raise UnsupportedModelError(f"true CFG calls the denoiser once per guidance branch, so in mode "
                                        f"{self.config.mode!r} each call's stale exchange state would come from the "
                                        f"other branch: parallelize with cfg_parallel=True (each branch on its own "
                                        f"ranks) or mode='sync'")
        if self.decoder is not None and getattr(self.pipe.vae, "use_tiling", False):
            raise UnsupportedModelError("the VAE decodes by strips across the ranks; tiling would cut them again: "
                                        "call pipe.vae.disable_tiling(), or parallelize with parallel_decode=False")
        if self.layout.rank != 0 and self.decoder is None:
            kwargs["output_type"] = "latent"         # only rank 0 decodes
        if self.strips is None:
            return self.pipe(*args, **kwargs)
        self.strips.begin_image(sequential_cfg=sequential)
        try:
            out = self.pipe(*args, **kwargs)
        finally:
            self.strips.end_image()
            if self.decoder is not None:
                self.decoder.end_image()
        transport = self.strips.transport
        sent, received = transport.totals()
        self.rank_stats = {"rank": self.layout.rank, "evaluations": self.strips.evaluations,
                           "rows": None if self.strips.geometry is None
                           else self.strips.geometry.rows[self.layout.patch_index],
                           "bytes_sent": {k: sent.get(k, 0) for k in KINDS},
                           "bytes_received": {k: received.get(k, 0) for k in KINDS}}
        return out if self.layout.rank == 0 else None

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.end_image()
        if self.strips is not None:
            self.strips.end_image()
            if isinstance(self.strips.transport, TorchTransport):
                self.strips.transport.close()


def calls_once_per_branch(pipe, kwargs: dict) -> bool:
    """Whether this call of `pipe` does true classifier-free guidance as two denoiser calls per
    step (FluxPipeline: `true_cfg_scale` > 1 and a negative prompt, its own rule)."""
    if "true_cfg_scale" not in inspect.signature(pipe.__call__).parameters:
        return False
    negative = kwargs.get("negative_prompt") is not None or (
        kwargs.get("negative_prompt_embeds") is not None and kwargs.get("negative_pooled_prompt_embeds") is not None)
    return kwargs.get("true_cfg_scale", 1.0) > 1 and negative


def parallelize(pipe, mode: str = "sync", halo_portion: float = DEFAULT_HALO_PORTION, warmup_steps: int = 4,
                cfg_parallel: bool = False, norm_mode: str | None = None, parallel_decode: bool = True, *,
                text_merge: str | None = None, kv_codec: str = "none", layout: ParallelLayout | None = None,
                transport: Transport | None = None) -> ParallelPipeline:
    """Make `pipe`'s denoiser (`pipe.unet` or `pipe.transformer`) and, with `parallel_decode`, its
    VAE decoder patch-parallel across the ranks of torchrun's job (or of `layout`/`transport`: the
    thread emulator); see the module docstring. Settings are checked and unsupported modules
    refused before any process group or compute.

    `text_merge` (SD3, Flux): how the stale steps of `full` and `partial` merge the text queries of
    joint attention across strips: "stale" (their default: the other strips' partial outputs of the
    previous step, exchanged behind compute; `ExchangeEngine.merge_text`) or "exact". `sync` and
    `none` merge exactly.

    `kv_codec` (`full`, `partial`): "sign" sends the stale K/V as one-bit messages
    (`parafuse.parallel.kv_codec`), "none" exactly."""
    config = ParallelConfig(mode, warmup_steps, halo_portion, norm_mode, cfg_parallel, kv_codec)
    check_settings(mode, halo_portion, warmup_steps, norm_mode, text_merge, kv_codec)
    _, model = denoiser_of(pipe)
    adapter = DiffusersAdapter()
    adapter.check(model)
    if text_merge is not None and not any(is_joint(m) or is_flux(m) for m in model.modules()):
        raise ValueError(f"text_merge={text_merge!r} (--text-merge) merges the text queries of joint text+image "
                         f"attention (SD3, Flux); {type(model).__name__} has none: leave it out")
    if kv_codec != "none":
        for name, m in model.named_modules():
            if adapter.site_kind(m) == "attn" and not getattr(m, "is_cross_attention", False):
                kv_codec_module.check_channels(m.to_k.out_features, f"attention {name!r}")
    vae_decoder = getattr(getattr(pipe, "vae", None), "decoder", None) if parallel_decode else None
    if vae_decoder is not None:
        check_decoder(vae_decoder, "parallelize with parallel_decode=False to decode on rank 0 alone")
    layout = torchrun_layout(model, 2 if cfg_parallel else 1) if layout is None else layout
    if layout.world_size == 1:
        return ParallelPipeline(pipe, None, None, layout, config)
    transport = patch_transport(layout) if transport is None else transport
    engine = decoder = None
    if layout.patch_degree > 1:
        engine = ExchangeEngine(transport, layout.patch_ranks, mode, halo_portion, warmup_steps, norm_mode,
                                text_merge=text_merge, kv_codec=kv_codec)
        swap_layers(model, engine, adapter)
        if vae_decoder is not None:
            decoder = strip_decoder(vae_decoder, layout, transport)
    return ParallelPipeline(pipe, StripDenoiser(model, engine, adapter, layout, transport), decoder, layout, config)


def check_decoder(vae_decoder: nn.Module, alternative: str) -> None:
    try:
        DiffusersAdapter().check(vae_decoder)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"VAE decoder: {e}; {alternative}") from None


def strip_decoder(vae_decoder: nn.Module, layout: ParallelLayout, transport: Transport) -> StripDecoder:
    """`vae_decoder` decoding this rank's strip, always synchronously, the image gathered on strip 0."""
    engine = ExchangeEngine(transport, layout.patch_ranks, "sync", 0.0, 0)
    decoder = StripDecoder(vae_decoder, engine, DiffusersAdapter(), layout, transport)
    swap_layers(vae_decoder, engine, decoder.adapter)
    return decoder


def parallelize_vae(vae, *, layout: ParallelLayout | None = None,
                    transport: Transport | None = None) -> StripDecoder | None:
    """Only a VAE's decoder by strips, across the ranks of torchrun's job (or `layout`/`transport`):
    every rank calls `vae.decode(z)` with the same whole latent; rank 0 gets the image, the others
    zeros of its shape. Returns the hooks (`.remove()` undoes them), None on a single rank."""
    check_decoder(vae.decoder, "decode it on one rank")
    layout = torchrun_layout(vae, 1) if layout is None else layout
    if layout.world_size == 1:
        return None
    return strip_decoder(vae.decoder, layout, patch_transport(layout) if transport is None else transport)


def torchrun_layout(module: nn.Module, cfg_degree: int) -> ParallelLayout:
    """This process's place in torchrun's job (joining its process group on `module`'s device), or
    a single rank outside torchrun."""
    rank, world = init_distributed(next(module.parameters()).device) if launched_by_torchrun() else (0, 1)
    return ParallelLayout(rank, world, cfg_degree)


def patch_transport(layout: ParallelLayout) -> TorchTransport:
    """The process-group transport with one patch group per CFG branch."""
    groups = [list(range(b * layout.patch_degree, (b + 1) * layout.patch_degree)) for b in range(layout.cfg_degree)]
    return TorchTransport(layout.rank, layout.world_size, groups)


def _dtype_keyword() -> str:
    """`from_pretrained`'s dtype argument: `dtype` since diffusers 0.42 (where `torch_dtype` warns
    that it is deprecated), `torch_dtype` before."""
    from importlib.metadata import version

    major, minor = (int(p) for p in version("diffusers").split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


def load_pipeline(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  progress: bool = True):
    """A diffusers pipeline from a local folder (no hub access); components saved as null (a
    pipeline saved without text encoders) are passed as None. `progress=False`: no loading bar."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"{path!r} is not a diffusers pipeline folder (no model_index.json)")
    with open(index_file) as f:
        index = json.load(f)
    missing = {name: None for name, v in index.items()
               if isinstance(v, list) and (v[0] is None or not os.path.isdir(os.path.join(path, name)))}
    kwargs = {} if dtype is None else {_dtype_keyword(): dtype}
    shown = diffusers_logging.is_progress_bar_enabled()
    if not progress:
        diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **missing, **kwargs)
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
