"""`parallelize(pipe, ...)`: a diffusers pipeline whose denoiser runs patch-parallel.

    pipe = parafuse.parallelize(pipe, mode="partial", halo_portion=0.3, warmup_steps=4)
    out = pipe(prompt_embeds=..., height=2048, width=2048, generator=torch.Generator().manual_seed(0))

Every rank (launched by torchrun) calls the returned pipeline with the same arguments, generator
seed included. The pipeline's own loop, scheduler and output types are kept: rank 0 gets the
pipeline's usual output, every other rank None - except with `output_type="latent"`, which every
rank gets: each runs the scheduler on the whole latent from the same gathered denoiser output (its
CFG halves in the same order with cfg_parallel; in every mode), so the ranks' latents are the same
bits, and a base's latents go to a refiner's call on every rank without a broadcast. The VAE runs
by strips too (`parallel_vae`, always synchronous: equal to the plain VAE): its encoder (img2img,
inpainting) with the encoded latent gathered on every rank, its decoder with the image gathered on
rank 0; without it, every rank encodes the whole image and only rank 0 decodes. `rank_stats` holds
this rank's bytes per kind after each call (the VAE's included).
"""
from __future__ import annotations

import inspect
import json
import os
import time
from contextlib import contextmanager
from functools import wraps

import torch
import torch.nn as nn

from parafuse.diffusers.adapter import (DiffusersAdapter, QwenImageTransformer2DModel, UnsupportedModelError,
                                        compute_dtype, is_flux, is_joint, kv_width)
from parafuse.diffusers.strips import (StepCount, StripControlNet, StripDenoiser, StripVAE, image_embedding,
                                       latent_embedding, plain_processors)
from parafuse.parallel import kv_codec as kv_codec_module
from parafuse.parallel.agreement import tensors_of_rank0
from parafuse.parallel.config import ConfigError, Mode, PatchConfig, dtype_name
from parafuse.parallel.distributed import ParallelLayout
from parafuse.parallel.plan import SiteKind
from parafuse.parallel.session import PatchSession
from parafuse.parallel.transport import Transport

DENOISERS = ("unet", "transformer")
# the VAE's parts that run by strips, and where each gathers its output: the encoded latent on
# every rank (each samples it and runs the scheduler on the whole latent), the image on rank 0
VAE_PARTS = {"encoder": None, "decoder": 0}
VAE_CALLERS = {"encoder": "encode", "decoder": "decode"}     # the VAE's method that runs each part


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    for name in DENOISERS:
        model = getattr(pipe, name, None)
        if isinstance(model, nn.Module):
            return name, model
    raise UnsupportedModelError(f"{type(pipe).__name__} has no denoiser parafuse can split (looked for "
                                f"{' / '.join('pipe.' + n for n in DENOISERS)})")


class ParallelPipeline:
    """The pipeline, called as before; its attributes (scheduler, vae, ...) are the pipeline's own.
    `session` is this rank's PatchSession (its `config`, `layout`, `transport`); after each call
    `rank_stats` holds this rank's row of the report (the same schema as a built-in run's) and
    `timing` the call's seconds and seconds per denoiser evaluation."""

    _OWN = frozenset({"pipe", "session", "strips", "encoder", "decoder", "rank_stats", "timing", "_parallel_vae",
                      "controlnets", "seed"})

    def __init__(self, pipe, session: PatchSession, strips: StripDenoiser, vae: dict[str, StripVAE],
                 parallel_vae: bool = True):
        """`vae`: the hooks on the VAE's parts (`VAE_PARTS`) that run by strips, by part name."""
        for name, value in (("pipe", pipe), ("session", session), ("strips", strips), ("rank_stats", {}),
                            ("timing", {}), ("_parallel_vae", parallel_vae)):
            object.__setattr__(self, name, value)
        for part in VAE_PARTS:
            object.__setattr__(self, part, vae.get(part))
        object.__setattr__(self, "controlnets", [])
        object.__setattr__(self, "seed", None)     # the seed rank 0 drew for the last call without a generator
        pipe.__dict__["_parafuse_parallel"] = True      # a second parallelize of this pipeline is refused
        if hasattr(type(pipe), "set_ip_adapter_scale"):   # the raw pipeline's too (`set_ip_adapter_scale`)
            pipe.__dict__["set_ip_adapter_scale"] = self.set_ip_adapter_scale

    config = property(lambda self: self.session.config)
    layout = property(lambda self: self.session.layout)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __setattr__(self, name, value):
        """Writes reach the pipeline (`pipe.scheduler = ...`, `pipe.unet = torch.compile(pipe.unet)`);
        a new denoiser or VAE is taken up at the next call (`_follow_components`)."""
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)

    def set_ip_adapter_scale(self, scale) -> None:
        """diffusers' `set_ip_adapter_scale`, run with the denoiser's own processors in place of
        parafuse's wrappers (`plain_processors`): it sets the processors it finds by class. Called
        on the raw pipeline too, where `parallelize` puts this method."""
        with plain_processors(self.strips.layers):
            type(self.pipe).set_ip_adapter_scale(self.pipe, scale)

    def to(self, *args, **kwargs) -> "ParallelPipeline":
        """diffusers' `.to()` (device, dtype), returning this parallel pipeline, not the raw one."""
        self.pipe.to(*args, **kwargs)
        return self

    def _follow_components(self) -> None:
        """Before each call: a denoiser or VAE assigned since the last call is parallelized (and
        checked, as `parallelize` checks it) in place of the one the hooks were on."""
        name, model = denoiser_of(self.pipe)
        if model is not self.strips.model:
            self.strips.remove()
            object.__setattr__(self, "strips", strip_denoiser(model, self.session, owner=f"pipe.{name}"))
        nets = controlnets_of(self.pipe) if self.session.engine is not None else []
        if [id(c.model) for c in self.controlnets] != [id(n) for n in nets]:
            for c in self.controlnets:
                c.remove()
            object.__setattr__(self, "controlnets", [strip_controlnet(net, self.session) for net in nets])
        if self.session.engine is None:
            return
        for part, module in vae_parts(self.pipe, self._parallel_vae).items():
            hooks = getattr(self, part)
            if module is not (None if hooks is None else hooks.model):
                if hooks is not None:
                    hooks.remove()
                if module is not None:
                    check_vae(module, part)
                object.__setattr__(self, part, None if module is None else
                                   strip_vae(module, part, self.session, self.pipe.vae))

    @property
    def vae_hooks(self) -> list[StripVAE]:
        """The hooks on the VAE's parts that run by strips."""
        return [h for h in (getattr(self, part) for part in VAE_PARTS) if h is not None]

    def __call__(self, *args, **kwargs):
        kwargs = self._same_call_on_every_rank(args, kwargs)      # before anything a rank could do alone
        self._follow_components()
        sequential = calls_once_per_branch(self.pipe, kwargs)
        true_cfg = "true_cfg_scale" in inspect.signature(self.pipe.__call__).parameters
        if self.config.cfg_parallel and not sequential and (true_cfg or kwargs.get("guidance_scale", 2.0) <= 1.0):
            raise UnsupportedModelError("cfg_parallel splits the two guidance branches across ranks; it needs "
                                        "guidance_scale > 1 (Flux, Qwen-Image: true_cfg_scale > 1 and a negative "
                                        "prompt)")
        if self.config.cfg_parallel and kwargs.get("skip_guidance_layers") is not None:
            raise UnsupportedModelError("skip-layer guidance adds a denoiser call on the conditional inputs alone to "
                                        "each CFG batch, which cfg_parallel cannot split by guidance branch: "
                                        "parallelize with cfg_parallel=False (each call then runs on every rank's "
                                        "strip with its own exchange state), or leave skip_guidance_layers out")
        if self.vae_hooks and getattr(self.pipe.vae, "use_tiling", False):
            raise UnsupportedModelError("the VAE encodes and decodes by strips across the ranks; tiling would cut "
                                        "them again: call pipe.vae.disable_tiling(), or parallelize with "
                                        "parallel_vae=False")
        latent_asked = kwargs.get("output_type") == "latent"       # then every rank returns its latent
        if self.layout.rank != 0 and self.decoder is None:
            kwargs["output_type"] = "latent"         # only rank 0 decodes
        self.session.reset_counts()
        self.strips.begin_image(sequential_cfg=sequential)
        self.strips.partners = self.controlnets
        # cfg_parallel: each ControlNet computes this rank's guidance branch, as the denoiser does, where
        # the pipeline gives it both (guess mode gives it the conditional batch alone: every rank runs it;
        # so does true CFG, whose one ControlNet call a step feeds both of the denoiser's calls)
        halve = self.layout.cfg_degree == 2 and not sequential and not kwargs.get("guess_mode") and \
            not any(getattr(c.model.config, "global_pool_conditions", False) for c in self.controlnets)
        for c in self.controlnets:
            c.begin_image(halve=halve)
        start = time.perf_counter()
        models = [self.strips, *self.controlnets]
        try:
            with self.session.guard(f"{type(self.pipe).__name__} call"), counting_steps(self.pipe) as steps:
                for m in models:
                    m.steps = steps          # a step's calls are those between two scheduler steps
                out = self.pipe(*args, **kwargs)
                self.strips.finish()         # every rank raises the same NonFiniteError before returning
        finally:
            for m in models:
                m.steps = None
            for c in self.controlnets:
                c.end_image()
            self.strips.end_image()
            for hooks in self.vae_hooks:
                hooks.end_image()
        strips = self.strips
        self.timing = {"total_seconds": time.perf_counter() - start, "step_seconds": strips.clock.seconds()}
        rows = None if strips.geometry is None else strips.geometry.rows[self.layout.patch_index]
        self.rank_stats = self.session.rank_stats(rows, strips.state_bytes, strips.evaluations)
        return out if self.layout.rank == 0 or latent_asked else None

    def _same_call_on_every_rank(self, args: tuple, kwargs: dict) -> dict:
        """Before any compute of an image: every argument of the call (tensors and images by
        content, generators by state) compared across the ranks, a difference refused on every rank
        naming the argument and the ranks (`agreement.check_same`). Without a generator, the
        pipeline would draw its noise from each rank's global RNG: rank 0 draws a seed, every rank
        gets a generator of it (`self.seed`). Then every rank takes rank 0's global RNG states
        (`share_global_rng`)."""
        transport = self.session.transport
        if transport is None or transport.world_size == 1 or not transport.reaches_peers:
            return kwargs               # nothing to compare, nor a seed to share (the session's rule)
        # every parameter of the pipeline's signature, given or not: the same names on every rank
        signature = inspect.signature(self.pipe.__call__)
        try:
            given, invalid = signature.bind_partial(*args, **kwargs).arguments, None
        except TypeError as e:      # raised on every rank that has it, after the others learn of it
            given, invalid = {}, e
        values = {name: fingerprint(given[name]) if name in given else "not given" for name in signature.parameters}
        values["(a call the signature takes)"] = repr(invalid)
        self.session.check_same_call(values, "the pipeline call's arguments")
        if invalid is not None:
            raise invalid
        if "generator" in signature.parameters and kwargs.get("generator") is None:
            seed = torch.zeros(1, dtype=torch.int64)
            if self.layout.rank == 0:
                seed[0] = torch.randint(0, 2 ** 62, (1,))      # rank 0's global RNG, as a plain pipeline would use
            object.__setattr__(self, "seed", int(tensors_of_rank0([seed], transport)[0]))
            kwargs = {**kwargs, "generator": torch.Generator().manual_seed(self.seed)}
        share_global_rng(transport, self.session.device)
        return kwargs

    def close(self) -> None:
        """End this rank's session and take parafuse off the pipeline: hooks removed, plain layers
        back in place; the pipeline may then be parallelized again."""
        for hooks in self.vae_hooks:
            hooks.end_image()
            hooks.remove()
        self.strips.end_image()
        self.strips.remove()
        for c in self.controlnets:
            c.end_image()
            c.remove()
        self.session.close()
        self.pipe.__dict__.pop("_parafuse_parallel", None)
        self.pipe.__dict__.pop("set_ip_adapter_scale", None)


@contextmanager
def counting_steps(pipe):
    """The steps `pipe.scheduler` takes during a pipeline call, counted (`StepCount`): its `step`
    wrapped on the scheduler instance for the call, the scheduler's own back after. The scheduler is
    read at the call, so one the user set since (`pipe.scheduler = ...`) is the one counted."""
    scheduler, count = getattr(pipe, "scheduler", None), StepCount()
    if not callable(getattr(scheduler, "step", None)):
        raise UnsupportedModelError(f"{type(pipe).__name__} has no scheduler with a step (pipe.scheduler.step): "
                                    f"parafuse takes the denoiser calls between two scheduler steps as one denoising "
                                    f"step; give the pipeline a scheduler whose step its loop calls once a step")
    step, own = scheduler.step, scheduler.__dict__.get("step")

    @wraps(step)     # the pipelines read its signature (`prepare_extra_step_kwargs`: eta, generator)
    def counted(*args, **kwargs):
        count.steps += 1
        return step(*args, **kwargs)
    scheduler.__dict__["step"] = counted
    try:
        yield count
    finally:
        if own is None:
            del scheduler.__dict__["step"]
        else:
            scheduler.__dict__["step"] = own


def share_global_rng(transport: Transport, device: torch.device) -> None:
    """Rank 0's global RNG states - the CPU's and, on a GPU, that device's - set on every rank.
    diffusers draws from them where a pipeline passes no generator (SD3's ControlNet pipeline
    samples the control image's latent so), and each rank draws the same numbers only from the
    same state: ranks seeded apart, or rank 0 alone having drawn the call's seed, would condition
    their strips on different draws. The emulator's ranks share one process, and its RNGs."""
    if transport.ranks_share_process:
        return
    cuda = device.type == "cuda"
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if cuda else [])
    states = tensors_of_rank0(states, transport)
    torch.set_rng_state(states[0])
    if cuda:
        torch.cuda.set_rng_state(states[1], device)


def fingerprint(value) -> str:
    """A digest of one call argument that is equal across processes exactly when the argument is:
    tensors, arrays and PIL images by dtype, shape and content; a generator by its device and
    state; containers element by element; callables by name (their addresses differ by process);
    anything else by its repr, less an address."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()

    def feed(v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, torch.Generator):
            h.update(f"generator{v.device}".encode())
            feed(v.get_state())
        elif isinstance(v, np.ndarray):
            feed(torch.from_numpy(np.array(v)))            # a copy: a PIL image's array is read-only
        elif hasattr(v, "getdata") and hasattr(v, "mode"):            # a PIL image
            h.update(f"image{v.mode}{v.size}".encode())
            feed(np.asarray(v))
        elif isinstance(v, dict):
            h.update(b"dict")
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"{type(v).__name__}{len(v)}".encode())
            for x in v:
                feed(x)
        elif callable(v):
            h.update(f"callable {getattr(v, '__qualname__', type(v).__qualname__)}".encode())
        else:
            text = repr(v)
            h.update((type(v).__qualname__ if " at 0x" in text else text).encode())
    feed(value)
    return h.hexdigest()


def check_pipeline(pipe, model: nn.Module) -> None:
    """Of Qwen-Image's pipelines parafuse runs text to image (QwenImagePipeline) and edit
    (QwenImageEditPipeline: the conditioning image's tokens appended to the latent's as a second
    grid, each strip its rows of both); the others - edit plus (several conditioning images, each
    also the text encoder's), img2img, inpainting, ControlNet, layered - are refused before any
    compute. A Qwen-Image transformer called outside a pipeline (a direct call) is the user's own
    loop: `StripModel._grid` checks its grids."""
    if not isinstance(model, QwenImageTransformer2DModel):
        return
    from diffusers import DiffusionPipeline, QwenImageEditPipeline, QwenImagePipeline

    if isinstance(pipe, DiffusionPipeline) and not isinstance(pipe, (QwenImagePipeline, QwenImageEditPipeline)):
        raise UnsupportedModelError(f"{type(pipe).__name__} is not supported yet: of Qwen-Image's pipelines parafuse "
                                    f"splits QwenImagePipeline (text to image) and QwenImageEditPipeline; use one, "
                                    f"or run {type(pipe).__name__} without parafuse")


def calls_once_per_branch(pipe, kwargs: dict) -> bool:
    """Whether this call of `pipe` does classifier-free guidance as two denoiser calls per step, by
    each pipeline's own rule: true CFG (FluxPipeline, QwenImagePipeline: `true_cfg_scale` - its
    default the pipeline's, Flux's 1, Qwen-Image's 4 - above 1 and a negative prompt, its text or
    every negative prompt embedding the signature names, Flux's pooled one too); FLUX.2 [klein]'s
    CFG (`guidance_scale` > 1 on a model not step-distilled; its inpainting pipeline's too)."""
    import diffusers

    parameters = inspect.signature(pipe.__call__).parameters
    if isinstance(pipe, tuple(getattr(diffusers, name) for name in ("Flux2KleinPipeline", "Flux2KleinInpaintPipeline")
                             if hasattr(diffusers, name))):
        guidance = kwargs.get("guidance_scale", parameters["guidance_scale"].default)
        return guidance > 1 and not pipe.config.is_distilled
    if "true_cfg_scale" not in parameters:
        return False
    embeddings = [name for name in parameters if name.startswith("negative_") and name.endswith("prompt_embeds")]
    negative = kwargs.get("negative_prompt") is not None or all(kwargs.get(name) is not None for name in embeddings)
    return kwargs.get("true_cfg_scale", parameters["true_cfg_scale"].default) > 1 and negative


def parallelize(pipe, config: PatchConfig | None = None, *, parallel_vae: bool = True,
                layout: ParallelLayout | None = None, transport: Transport | None = None,
                **settings) -> ParallelPipeline:
    """Make `pipe`'s denoiser (`pipe.unet` or `pipe.transformer`) and, with `parallel_vae`, its
    VAE's encoder and decoder patch-parallel across the ranks of torchrun's job (or of
    `layout`/`transport`: the thread emulator); see the module docstring. One switch for both parts
    of the VAE: they are split by the same rule (always synchronous, equal to the plain VAE) for the
    same reason (the whole image's activations on one GPU are what limits the resolution of an
    img2img upscale and of the decode), and a user who keeps one whole - to save the exchanges at a
    small size - keeps the other whole for the same reason. The settings are a `PatchConfig`, or
    its fields as keywords (`mode="partial", halo_portion=0.25, ...`; keywords given with a config replace its
    fields). They are checked, and unsupported modules refused, before any process group or compute.

    `text_merge` (SD3, Flux, Qwen-Image): how the stale steps of `full` and `partial` merge the text queries of
    joint attention across strips ("stale", their default, or "exact"; `ExchangeEngine.merge_text`).
    `dtype`: the pipeline's own unless given (then it must be the denoiser's: `pipe.to(dtype)` first).
    `kernels`, `cuda_graphs`, `attention_backend`, the deadlines: as for built-in models."""
    if config is not None and not isinstance(config, PatchConfig):
        raise ConfigError(f"parallelize's settings must be a PatchConfig or its fields as keywords (mode=..., "
                          f"...), got {type(config).__name__} {config!r}")
    if "parallel_decode" in settings:
        raise ConfigError("parallel_decode is now parallel_vae (one switch for the VAE's encoder and decoder): "
                          "pass parallel_vae=...")
    try:
        config = PatchConfig(**settings) if config is None else config.replace(**settings) if settings else config
    except TypeError as e:
        raise ConfigError(f"parallelize: {e}; the settings are PatchConfig's fields") from None
    if pipe.__dict__.get("_parafuse_parallel"):
        raise ConfigError(f"this {type(pipe).__name__} is already parallelized: keep using the pipeline the first "
                          f"parafuse.parallelize returned, or call its close() before parallelizing again")
    name, model = denoiser_of(pipe)
    check_pipeline(pipe, model)
    adapter = DiffusersAdapter(f"pipe.{name}", first_block_cache=True)
    adapter.check(model)
    if settings.get("text_merge") is not None and not any(is_joint(m) or is_flux(m) for m in model.modules()):
        raise ConfigError(f"text_merge={settings['text_merge']!r} (--text-merge) merges the text queries of joint "
                          f"text+image attention (SD3, Flux); {type(model).__name__} has none: leave it out")
    dtype = compute_dtype(model)
    if config.torch_dtype is not None and config.torch_dtype != dtype:
        raise ConfigError(f"dtype {config.dtype.value!r} asked for, but {type(model).__name__} is in {dtype}: "
                          f"call pipe.to({config.torch_dtype}) first, or leave dtype out")
    config = config.replace(dtype=dtype_name(dtype))
    if config.kv_codec != "none":
        for name, m in model.named_modules():
            if adapter.site_kind(m) == SiteKind.ATTN and not getattr(m, "is_cross_attention", False):
                kv_codec_module.check_channels(kv_width(m), f"attention {name!r}")
    parts = {part: module for part, module in vae_parts(pipe, parallel_vae).items() if module is not None}
    for part, module in parts.items():
        check_vae(module, part)
    session = PatchSession(config, device=next(model.parameters()).device, layout=layout, transport=transport)
    if session.layout.rank != 0 and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)     # one progress bar per job: rank 0's
    vae = {} if session.engine is None else {part: strip_vae(module, part, session, pipe.vae)
                                             for part, module in parts.items()}
    parallel = ParallelPipeline(pipe, session, strip_denoiser(model, session, adapter), vae, parallel_vae)
    if session.engine is not None:
        object.__setattr__(parallel, "controlnets", [strip_controlnet(net, session) for net in controlnets_of(pipe)])
    return parallel


def controlnets_of(pipe) -> list[nn.Module]:
    """The pipeline's ControlNets: `pipe.controlnet`, or each net of a MultiControlNetModel."""
    net = getattr(pipe, "controlnet", None)
    if net is None:
        return []
    return list(net.nets) if hasattr(net, "nets") else [net]


def strip_controlnet(net: nn.Module, session: PatchSession) -> StripControlNet:
    """`net` computing this rank's strip: its own session (the denoiser's settings, layout and
    transport), checked and its patch layers swapped in."""
    if image_embedding(net) is None and latent_embedding(net) is None:
        raise UnsupportedModelError(f"{type(net).__name__}'s conditioning is neither an image through a "
                                    f"controlnet_cond_embedding (ControlNetModel) or an input_hint_block (Flux's "
                                    f"XLabs-style ControlNet) nor a latent of the sample's grid (Flux's other "
                                    f"ControlNets, SD3's): parafuse cannot split it")
    net_session = PatchSession(session.config, device=session.device, layout=session.layout,
                               transport=session.transport)
    strips = StripControlNet(net, net_session, "pipe.controlnet")
    strips.adapter.check(net)
    net_session.attach(net, strips.adapter)
    return strips


def strip_denoiser(model: nn.Module, session: PatchSession, adapter: DiffusersAdapter | None = None,
                   owner: str = "the denoiser") -> StripDenoiser:
    """The hooks that make `model` compute this rank's strip, its patch layers swapped in; a
    denoiser assigned after `parallelize` gets the same checks first."""
    if adapter is None:
        adapter = DiffusersAdapter(owner, first_block_cache=True)
        adapter.check(model)
        dtype = compute_dtype(model)
        if dtype != session.config.torch_dtype:
            raise ConfigError(f"the new {type(model).__name__} is in {dtype}, the parallel pipeline in "
                              f"{session.config.torch_dtype}: convert it before assigning it")
    session.attach(getattr(model, "_orig_mod", model), adapter)     # torch.compile(model): its module's layers
    return StripDenoiser(model, session, adapter)


def vae_parts(pipe, parallel_vae: bool) -> dict[str, nn.Module | None]:
    """The modules of `pipe.vae` that run by strips (`VAE_PARTS`), by part; None where the pipeline
    has none, or for every part without `parallel_vae`."""
    vae = getattr(pipe, "vae", None) if parallel_vae else None
    return {part: getattr(vae, part, None) for part in VAE_PARTS}


def check_vae(module: nn.Module, part: str) -> None:
    try:
        DiffusersAdapter("pipe.vae").check(module)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"VAE {part}: {e}; parallelize with parallel_vae=False to run the VAE whole "
                                    f"(every rank encodes, rank 0 decodes)") from None


def strip_vae(module: nn.Module, part: str, session: PatchSession, vae: nn.Module) -> StripVAE:
    """`module`, the `part` of `vae`, computing this rank's strip, always synchronously, its output
    gathered where `VAE_PARTS` says (checked by the caller, `check_vae`, before any session), on its
    own engine on the session's transport (sync, no warmup; the session's kernels and deadlines: the
    process has one watchdog, which a session's deadlines set)."""
    parent = session.config
    config = PatchConfig(mode=Mode.SYNC, warmup_steps=0, kernels=parent.kernels,
                         startup_timeout=parent.startup_timeout, exchange_timeout=parent.exchange_timeout)
    part_session = PatchSession(config, device=session.device, layout=session.layout, transport=session.transport)
    hooks = StripVAE(module, part_session, DiffusersAdapter("pipe.vae"), gather_to=VAE_PARTS[part],
                     caller=(vae, VAE_CALLERS[part]))
    part_session.attach(module, hooks.adapter)
    return hooks


def parallelize_vae(vae, *, layout: ParallelLayout | None = None,
                    transport: Transport | None = None) -> list[StripVAE] | None:
    """Only a VAE by strips (its encoder and decoder, as `parallelize`'s `parallel_vae`), across the
    ranks of torchrun's job (or `layout`/`transport`): every rank calls `vae.encode(x)` with the same
    whole image and gets the whole latent distribution, and `vae.decode(z)` with the same whole
    latent, where rank 0 gets the image, the others zeros of its shape. Returns the hooks on the
    encoder and the decoder (each `.remove()` undoes itself), None on a single rank."""
    for part in VAE_PARTS:
        check_vae(getattr(vae, part), part)
    session = PatchSession(PatchConfig(mode=Mode.SYNC, warmup_steps=0), device=next(vae.parameters()).device,
                           layout=layout, transport=transport)
    if session.engine is None:
        return None
    return [strip_vae(getattr(vae, part), part, session, vae) for part in VAE_PARTS]


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
