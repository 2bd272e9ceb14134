"""The `pipelines` sections of benchmarks/gpu_check.py: diffusers' own denoisers at their published
sizes, run through `parafuse.parallelize` (the pipeline door) on one GPU.

    PYTHONPATH=.:kernels:.deps python benchmarks/gpu_check.py --only pipelines pipelines_4096
    python benchmarks/gpu_check.py --device cpu --smoke --only pipelines pipelines_4096   # tiny, same code

Models: `UNet2DConditionModel` with SDXL base's config (CFG batch 2, text [2, 77, 2048], SDXL's
added conditions) and `FluxTransformer2DModel` with Flux-dev's (text [1, 512, 4096], pooled
[1, 768], guidance embedding, img_ids/txt_ids), built directly on the device in bf16 with a
scaled random init: every weight of two or more dimensions N(0, 0.02), norms and biases as diffusers
makes them. No checkpoint is read (the GPU machine reaches no hub): timings and the sync error do
not depend on trained weights; a quality figure (the partial PSNR) is of random weights and says so.

Rows, each written to the section's JSON file as it ends (`partial_path`), targets first:
    compute   one rank's per-evaluation time in the steady state (the slowest of the first and a
              middle strip, one process, a `NullTransport` that delivers zeros: compute alone),
              timed by the door's own step clock, against the serial denoiser through the same door
              at N = 1: same kernels (PyTorch's; last at 2048², SDXL's strips on the Triton GroupNorm
              too), dtype and CUDA graphs (on CUDA) on both sides; N = 8, 4, 2, with and without CFG
              parallel for SDXL (Flux-dev has no CFG batch); each row with its ceiling (`ceiling`:
              from the token counts) and the `sync`-vs-serial error at that N (all ranks emulated
              as threads on the device, weights shared, eager: the whole output and the measured
              strip's rows, against the serial output)
    loop      one rank's whole pipeline call (StableDiffusionXLPipeline / FluxPipeline, their own
              loop and scheduler, prompt embeddings given, latents out: no VAE decode) at N = 8 in
              one process over a `LoopbackTransport` (the exchanges and the per-step gather as
              device copies on a side stream), graphs on CUDA: warmup steps, steady steps, total,
              against the serial call; for SDXL also the N-rank emulated call of `full` and `partial`
              against the serial call (PSNR of the latents: correctness, not speed)
2048² is `pipelines`; 4096² is `pipelines_4096`, which gpu_check runs last.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from types import SimpleNamespace

import torch

from common import RESULTS, config_of, hardware, patch_config, provenance, read_result, timing_stats, write_result
from parafuse.parallel.config import PatchConfig
from parafuse.parallel.transport import NullTransport, Pending

# seconds; gpu_check's budget logic: a row is not started past its section's budget (skipped, and
# says so). Estimated on an H100 (not yet measured): ~90 s at 2048², ~90 s at 4096² (Flux's serial
# evaluation alone ~9 s there), the targets' rows first
BUDGETS = {"pipelines": 90, "pipelines_4096": 75}

# diffusers' published config.json values: stabilityai/stable-diffusion-xl-base-1.0/unet
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
# black-forest-labs/FLUX.1-dev/transformer
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# --smoke: the same classes and block types, tiny
SDXL_SMOKE = {**SDXL_UNET, "sample_size": 32, "layers_per_block": 1, "block_out_channels": (16, 32, 64),
              "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (1, 2, 4), "cross_attention_dim": 32,
              "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 16, "norm_num_groups": 8}
FLUX_SMOKE = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
              "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": (4, 6, 6)}


class Family(SimpleNamespace):
    """name, diffusers class, the pipeline's attribute for it, its config, text tokens, pooled width."""


FAMILIES = {
    "sdxl": Family(name="sdxl", cls="UNet2DConditionModel", attr="unet", config=SDXL_UNET, text=77, pooled=1280),
    "flux": Family(name="flux", cls="FluxTransformer2DModel", attr="transformer", config=FLUX_DEV, text=512,
                   pooled=768),
}
SMOKE = {"sdxl": {"config": SDXL_SMOKE, "text": 8, "pooled": 16}, "flux": {"config": FLUX_SMOKE, "text": 8, "pooled": 16}}
SMOKE_SIZES = {2048: 256, 4096: 384}       # --smoke: the image side standing for each size
# timed evaluations after the 3 warm ones: fewer where one takes seconds (Flux's serial evaluation at
# 4096², ~9 s on an H100 as estimated from its FLOPs: compute-bound, steady)
REPEATS = {(2048, "sdxl"): 5, (2048, "flux"): 3, (4096, "sdxl"): 2, (4096, "flux"): 1}
LOOP_STEPS, LOOP_WARMUP = 8, 2             # the timed pipeline call (--smoke: 4 steps); its first steps synchronous


def family(name: str, smoke: bool) -> Family:
    f = FAMILIES[name]
    return Family(**{**vars(f), **SMOKE[name]}) if smoke else f


# ---- the models ------------------------------------------------------------------------------------
CLASSES = ("UNet2DConditionModel", "FluxTransformer2DModel", "StableDiffusionXLPipeline", "FluxPipeline",
           "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


def diffusers_classes() -> SimpleNamespace:
    """The diffusers classes used here (imported when first needed: the section runs without
    diffusers until it builds a model)."""
    import diffusers
    return SimpleNamespace(**{name: getattr(diffusers, name) for name in CLASSES})


def build(fam: Family, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers class at `fam.config`, made on `device` in `dtype` (no float32 copy, no host
    copy), every weight of two or more dimensions N(0, 0.02); the same weights at every build (the
    biases and norms are diffusers' own initialisation, from the seeded global generator)."""
    cls = getattr(diffusers_classes(), fam.cls)
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**fam.config)
    finally:
        torch.set_default_dtype(saved)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
    if any(t.is_floating_point() and t.dtype != dtype for t in (*model.parameters(), *model.buffers())):
        model.to(dtype)
    return model.eval().requires_grad_(False)


def share_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s modules holding the same parameter and buffer tensors: the door swaps its
    layers in place, so each measurement (and each emulated rank) gets its own copy, at no memory."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def inputs(fam: Family, size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Keyword arguments of one denoiser call on a `size`² image, as the pipeline makes them."""
    g = torch.Generator(device).manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    latent = size // 8
    if fam.name == "sdxl":       # CFG: [unconditional, conditional]
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=device, dtype=dtype).repeat(2, 1)
        return {"sample": randn(2, 4, latent, latent), "timestep": torch.tensor(500.0, device=device),
                "encoder_hidden_states": randn(2, fam.text, fam.config["cross_attention_dim"]),
                "added_cond_kwargs": {"text_embeds": randn(2, fam.pooled), "time_ids": time_ids}}
    h = w = latent // 2          # Flux packs 2 x 2 latent pixels into a token
    img_ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    img_ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return {"hidden_states": randn(1, h * w, fam.config["in_channels"]),
            "encoder_hidden_states": randn(1, fam.text, fam.config["joint_attention_dim"]),
            "pooled_projections": randn(1, fam.pooled), "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "guidance": torch.full((1,), 3.5, device=device, dtype=dtype),
            "img_ids": img_ids.reshape(h * w, 3), "txt_ids": torch.zeros(fam.text, 3, device=device, dtype=dtype)}


class Steps:
    """The scheduler of `Evaluations`: its loop steps it after each denoiser call, as a diffusers
    pipeline's loop steps `pipe.scheduler`, which is how the door tells one step's calls from the
    next step's (several calls between two steps would be one step's streams, each synchronous at
    its first evaluation)."""

    def step(self) -> None:
        pass


class Evaluations:
    """A 'pipeline' whose call is `evaluations` calls of its denoiser on the same inputs: through
    `parafuse.parallelize` each is one step of one image (the first synchronous, then the mode's
    steady step), timed by the door's own step clock. Returns the last output. (`output_type`: the
    door asks ranks other than 0 for latents, which this call returns anyway.)"""

    def __init__(self, attr: str, model: torch.nn.Module):
        self.attr = attr
        self.scheduler = Steps()
        setattr(self, attr, model)

    @torch.no_grad()
    def __call__(self, kwargs: dict, evaluations: int = 1, output_type: str = "latent"):
        for _ in range(evaluations):
            out = getattr(self, self.attr)(**kwargs, return_dict=False)[0]
            self.scheduler.step()
        return out


class ZerosTransport(NullTransport):
    """`NullTransport` whose receives deliver zeros rather than what the buffer held: the door's
    non-finite watch reads the gathered output, whose other strips' rows would otherwise be
    uninitialised memory (NaN at times). The engine's own buffers are zeroed once, the per-call ones
    (the gathered output's parts, the CFG peer's half: the model output's size) at every call."""

    def __init__(self, rank: int, world_size: int, group=None):
        super().__init__(rank, world_size, group)
        self.seen: set = set()

    def _post(self, sends, recvs, kind) -> Pending:
        for t, _ in recvs:
            key = (t.data_ptr(), t.numel(), t.dtype)
            if kind in ("gather", "cfg") or key not in self.seen:
                t.zero_()
                self.seen.add(key)
        return Pending()


def config(mode="sync", cfg=False, kernels="torch", warmup=1, graphs=None) -> PatchConfig:
    """The door's settings (`graphs` None: the device's default - off for emulated ranks)."""
    return patch_config(mode, warmup, cfg_parallel=cfg, kernels=kernels, cuda_graphs=graphs)


def door(pipe, n=1, strip=0, transport="null", **settings):
    """`pipe` through `parafuse.parallelize` as rank `strip` of `n` in one process (`transport`: null
    counts bytes and moves nothing - `ZerosTransport` -, loopback moves them as device copies)."""
    import parafuse
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.transport import LoopbackTransport

    cfg = config(**settings)
    layout = ParallelLayout(strip, n, 2 if cfg.cfg_parallel else 1)
    transport = None if n == 1 else {"null": ZerosTransport, "loopback": LoopbackTransport}[transport](
        strip, n, layout.patch_ranks)
    return parafuse.parallelize(pipe, cfg, parallel_vae=False, layout=layout, transport=transport)


def timed(model, fam, kw, repeat, **settings) -> tuple[float, dict, object, object]:
    """Median seconds of the steady evaluations (after 3: the synchronous first one, then those that
    compile, warm and capture), the rank's stats, the strip geometry and the last output (rank 0)."""
    par = door(Evaluations(fam.attr, share_weights(model)), **settings)
    try:
        out = par(kw, 3 + repeat)
        # the steps of one stream (one strip, par.session.engine None, has no streams), or the steady
        # rows would time other steps
        if par.session.engine is not None and par.strips.stream_evaluations != (3 + repeat,):
            raise RuntimeError(f"the door ran the {3 + repeat} evaluations as streams of "
                               f"{par.strips.stream_evaluations} evaluations, not as one stream's steps")
        steady = par.timing["step_seconds"][3:]
        stats = {**par.rank_stats, "attention_backend": str(par.config.attention_backend)}
        return timing_stats(steady)["seconds"], stats, par.strips.geometry, out
    finally:
        par.close()
        par.strips.remove()


def emulated(model, n, device, call, make_pipe, **settings) -> object:
    """`call(parallel_pipe)` on n ranks emulated as threads on `device` (weights shared, no graphs);
    rank 0's result."""
    import parafuse
    from parafuse.parallel.emulator import emulate_ranks

    cfg = config(**settings)
    results = [None] * n
    if device.type == "cuda":       # the inputs were made on this stream; the ranks run on their own
        torch.cuda.synchronize(device)

    def body(layout, transport):
        par = parafuse.parallelize(make_pipe(share_weights(model)), cfg, parallel_vae=False, layout=layout,
                                   transport=transport)
        try:
            results[layout.rank] = call(par)
        finally:
            par.close()
            par.strips.remove()

    emulate_ranks(n, cfg, body, device=str(device))
    return results[0]


def error(got: torch.Tensor, want: torch.Tensor) -> dict:
    d = (got.float() - want.float())
    return {"max_abs": d.abs().max().item(), "rel_rms": (d.pow(2).mean().sqrt() / want.float().pow(2).mean().sqrt()).item()}


def latent_psnr(got: torch.Tensor, want: torch.Tensor) -> float | None:
    """PSNR in dB of a latent against the serial one, the peak being the serial latent's range (no
    VAE here: latents, not images); None when identical."""
    mse = (got.float() - want.float()).pow(2).mean().item()
    peak = (want.max() - want.min()).float().item()
    return None if mse == 0 else 10 * math.log10(peak * peak / mse)


# ---- the ceiling ---------------------------------------------------------------------------------
def ceiling(fam: Family, image_tokens: int, strip_tokens: int, cfg_degree: int) -> float:
    """Per-rank speedup if the strip's FLOPs were all a rank did, from the token counts. Flux's text
    tokens are replicated on every rank: each block costs 24 d² FLOPs a token (its linear layers,
    double- and single-stream alike) plus 4 d a (query, key) pair; a strip's image queries attend to
    every key, its text queries to its own image keys and the text (merged across strips). The
    U-Net's every FLOP splits with the rows (cross-attention's keys are text, its queries image)."""
    i, s = image_tokens, strip_tokens
    if fam.name != "flux":
        return cfg_degree * i / s
    d, t = fam.config["num_attention_heads"] * fam.config["attention_head_dim"], fam.text
    serial = 6 * d * (i + t) + (i + t) ** 2                        # FLOPs / 4d
    strip = 6 * d * (s + t) + s * (i + t) + t * (s + t)
    return cfg_degree * serial / strip


def strip_tokens(fam: Family, geometry, strip: int) -> tuple[int, int]:
    """(the whole image's tokens, strip `strip`'s) at the model's finest grid."""
    return geometry.height * geometry.width, geometry.rows[strip] * geometry.width


# ---- rows ----------------------------------------------------------------------------------------
class Section:
    """One section's state: the models built (both at 2048², one at a time at 4096², where Flux's
    `full` buffers need the memory; a rebuilt model has the same weights, so the serial measurements
    stay valid), the serial measurements, the rows, the JSON written after each row."""

    def __init__(self, a, name: str, size: int):
        self.a, self.name, self.size = a, name, size
        self.device = torch.device(a.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32    # CPU: fp32 (bf16 GEMMs crawl there)
        self.side = SMOKE_SIZES[size] if a.smoke else size
        self.deadline = time.perf_counter() + BUDGETS[name]
        self.models: dict = {}
        self.serial: dict = {}
        self.sync_outputs: dict = {}
        self.rows: list[dict] = []
        self.path = partial_path(a)
        self.provenance = provenance()      # the commit (git, else benchmarks/stamp.json), device, versions

    # -- bookkeeping
    def model(self, fam: Family):
        if fam.name not in self.models:
            if len(self.models) >= (2 if self.size <= 2048 else 1):    # both at 2048²: ~29 GB of bf16 weights
                self.models.clear()
            if self.cuda:
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            self.models[fam.name] = build(fam, self.device, self.dtype)
            params = sum(p.numel() for p in self.models[fam.name].parameters())
            self.log(f"built {fam.cls} ({fam.name}) {params / 1e9:.2f} B parameters in {time.perf_counter() - t0:.1f} s")
        return self.models[fam.name]

    def log(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", flush=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.log(json.dumps(row, default=str)[:600])
        # the schema's rows: every section's, each naming its section (the other sections' as written)
        before = read_result(self.path) if os.path.exists(self.path) else {"rows": [], "sections": {}}
        sections = {**before.get("sections", {}), self.name: {"provenance": self.provenance}}
        rows = [r for r in before["rows"] if r.get("section") != self.name] + \
            [{"section": self.name, **r} for r in self.rows]
        write_result(os.path.abspath(self.path), "pipelines_gpu", config_of(self.a), rows, self.provenance,
                     hardware(), smoke=self.a.smoke, sections=sections)

    def run(self, what: dict, fn) -> None:
        """One row: skipped past the budget, its error recorded if it fails (the next still runs)."""
        if time.perf_counter() > self.deadline:
            self.add({**what, "skipped": "time budget"})
            return
        t0 = time.perf_counter()
        try:
            row = {**what, **fn()}
        except Exception as e:      # noqa: BLE001 - a failed row is a result
            row = {**what, "error": f"{type(e).__name__}: {e}"[:600]}
        row["wall_s"] = time.perf_counter() - t0
        self.add(row)
        if self.cuda:
            torch.cuda.empty_cache()

    # -- measurements
    def repeat(self, fam: Family) -> int:
        return 2 if self.a.smoke else REPEATS[self.size, fam.name]

    def settings(self, kernels: str = "torch") -> dict:
        """The door's settings on both sides: graphs on CUDA; the strips' patch layers' kernels (the
        serial model has none: its GroupNorm is PyTorch's whatever they are)."""
        return {"graphs": self.cuda, "kernels": kernels}

    def serial_of(self, fam: Family):
        """The serial denoiser through the same door (N = 1): seconds, output."""
        if fam.name not in self.serial:
            model, kw = self.model(fam), inputs(fam, self.side, self.device, self.dtype)
            seconds, _, _, out = timed(model, fam, kw, self.repeat(fam), **self.settings())
            if not torch.isfinite(out).all():
                raise FloatingPointError(f"{fam.name} {self.size}²: the serial output is not finite")
            self.serial[fam.name] = (seconds, out.clone(), kw)     # a copy: a graph's output is overwritten
        return self.serial[fam.name]

    def compute_row(self, fam: Family, n: int, mode: str, cfg: bool, kernels: str = "torch") -> dict:
        serial_s, serial_out, kw = self.serial_of(fam)
        model = self.model(fam)
        patch = n // (2 if cfg else 1)
        per = {}
        for strip in sorted({0, patch // 2}) if patch > 2 else [0]:
            per[strip] = timed(model, fam, kw, self.repeat(fam), mode=mode, n=n, strip=strip, cfg=cfg,
                               **self.settings(kernels))
        slow = max(per, key=lambda s: per[s][0])
        seconds, stats, geometry, _ = per[slow]
        evals = stats["evaluations"] or 1
        if geometry is None:            # one strip per CFG branch: the whole image each
            whole = part = 1
        else:
            whole, part = strip_tokens(fam, geometry, slow)
        row = {"n": n, "strip": slow, "strip_seconds": {str(s): per[s][0] for s in per}, "seconds": seconds,
               "serial_seconds": serial_s, "speedup": serial_s / seconds,
               "ceiling": ceiling(fam, whole, part, 2 if cfg else 1),
               "bytes_sent_per_evaluation": {k: v // evals for k, v in stats["bytes_sent"].items() if v},
               "peak_memory_bytes": stats["peak_memory_bytes"],
               "attention_backend": stats["attention_backend"]}     # the strips'; the serial model's is diffusers' own
        row["of_ceiling"] = row["speedup"] / row["ceiling"]
        row["sync_vs_serial"] = self.sync_error(fam, n, cfg, kernels, serial_out, geometry, slow)
        return row

    def sync_error(self, fam: Family, n: int, cfg: bool, kernels: str, serial_out, geometry, strip: int) -> dict:
        """`sync` at this N (every rank emulated) against the serial output: the whole output and the
        rows of strip `strip`. One emulation per (model, N, CFG parallel, kernels)."""
        key = (fam.name, n, cfg, kernels)
        if key not in self.sync_outputs:
            model, kw = self.model(fam), inputs(fam, self.side, self.device, self.dtype)
            self.sync_outputs[key] = emulated(model, n, self.device, lambda par: par(kw, 1),
                                              lambda m: Evaluations(fam.attr, m), mode="sync", cfg=cfg, kernels=kernels)
        got = self.sync_outputs[key]
        out = {"whole": error(got, serial_out)}
        if geometry is not None:
            top, rows = geometry.row_range(strip)[0], geometry.rows[strip]
            if fam.name == "flux":      # tokens [B, rows * width, C]
                w = geometry.width
                sl = (slice(None), slice(top * w, (top + rows) * w))
            else:                       # [B, C, rows, W]
                sl = (slice(None), slice(None), slice(top, top + rows))
            out["strip"] = error(got[sl], serial_out[sl])
        return out

    # -- the whole pipeline call
    def pipeline(self, fam: Family, model: torch.nn.Module):
        diffusers = diffusers_classes()
        if fam.name == "sdxl":      # SDXL base's scheduler; no VAE, no text encoders: embeddings in, latents out
            sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     timestep_spacing="leading", steps_offset=1)
            pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                       tokenizer_2=None, unet=model, scheduler=sched,
                                                       add_watermarker=False)
        else:                       # Flux-dev's scheduler
            sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                             max_shift=1.15, base_image_seq_len=256,
                                                             max_image_seq_len=4096)
            pipe = diffusers.FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                          text_encoder_2=None, tokenizer_2=None, transformer=model)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call_kwargs(self, fam: Family, steps: int) -> dict:
        g = torch.Generator(self.device).manual_seed(2)

        def randn(*shape):
            return torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32).to(self.dtype)

        kw = {"height": self.side, "width": self.side, "num_inference_steps": steps, "output_type": "latent",
              "generator": torch.Generator(self.device).manual_seed(3)}
        if fam.name == "sdxl":
            dim = fam.config["cross_attention_dim"]
            return {**kw, "prompt_embeds": randn(1, fam.text, dim), "negative_prompt_embeds": randn(1, fam.text, dim),
                    "pooled_prompt_embeds": randn(1, fam.pooled), "negative_pooled_prompt_embeds": randn(1, fam.pooled),
                    "guidance_scale": 5.0}
        return {**kw, "prompt_embeds": randn(1, fam.text, fam.config["joint_attention_dim"]),
                "pooled_prompt_embeds": randn(1, fam.pooled), "guidance_scale": 3.5}

    def loop_row(self, fam: Family, n: int, strip: int) -> dict:
        """One rank's whole call (LoopbackTransport) against the serial call, both through the door
        with the same kernels and graphs; each called first with LOOP_WARMUP + 2 steps: its first stale
        step runs eagerly, the second is captured (parafuse.graphs), so the timed call replays."""
        model, steps = self.model(fam), 4 if self.a.smoke else LOOP_STEPS
        out = {"steps": steps, "warmup_steps": LOOP_WARMUP}
        latents = {}
        for side, settings in (("serial", {}), ("rank", {"mode": "full", "n": n, "strip": strip,
                                                        "transport": "loopback"})):
            par = door(self.pipeline(fam, share_weights(model)), warmup=LOOP_WARMUP,
                       **settings, **self.settings())
            try:
                par(**self.call_kwargs(fam, LOOP_WARMUP + 2))
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                result = par(**self.call_kwargs(fam, steps))
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                wall = time.perf_counter() - t0
                each = par.timing["step_seconds"]
                out[side] = {"seconds": wall, "warmup_steps_s": sum(each[:LOOP_WARMUP]),
                             "steady_step_s": timing_stats(each[LOOP_WARMUP:])["seconds"], "evaluations": len(each)}
                if result is not None:
                    latents[side] = result.images
            finally:
                par.close()
                par.strips.remove()
        out["speedup"] = out["serial"]["seconds"] / out["rank"]["seconds"]
        serial = latents["serial"]
        if not torch.isfinite(serial).all():
            raise FloatingPointError(f"{fam.name} {self.size}²: the serial pipeline's latents are not finite")
        if fam.name == "sdxl":      # the N-rank call emulated (correctness only): full and partial
            for mode in ("full", "partial"):
                got = emulated(model, n, self.device, lambda par: par(**self.call_kwargs(fam, steps)),
                               lambda m: self.pipeline(fam, m), mode=mode, warmup=LOOP_WARMUP)
                out[f"{mode}_emulated_psnr_db"] = latent_psnr(got.images, serial)
                out[f"{mode}_emulated_vs_serial"] = error(got.images, serial)
        return out


def partial_path(a) -> str:
    """The sections' own JSON, rewritten after every row (gpu_check's is written after each section)."""
    if a.out:
        return re.sub(r"(\.json)?$", "_pipelines.json", a.out, count=1)
    slug = re.sub(r"[^a-z0-9]+", "_", (torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu").lower())
    return os.path.join(RESULTS, f"pipelines_gpu_{slug.strip('_')}.json")


def plan(size: int, smoke: bool = False) -> list[tuple]:
    """(kind, family, N, mode, CFG parallel, the strips' kernels) in the order measured: the targets'
    rows first, then (2048² only) a whole pipeline call per family, then the other N, then (2048²
    only) the Triton GroupNorm kernels in the U-Net's strips. --smoke: each code path once."""
    first = [("compute", "sdxl", 8, "full", False), ("compute", "sdxl", 8, "partial", False),
             ("compute", "sdxl", 8, "full", True), ("compute", "flux", 8, "full", False)]
    if size > 2048:     # the targets (full, N = 8) before SDXL's partial and CFG-parallel rows
        first = [first[0], first[3], first[1], first[2]]
    loops = [("loop", "sdxl", 8, "full", False), ("loop", "flux", 8, "full", False)] if size == 2048 else []
    rest = [("compute", fam, n, "full", cfg) for fam in ("sdxl", "flux") for n in (4, 2)
            for cfg in ((False, True) if fam == "sdxl" else (False,))]
    if smoke:
        rows = first + loops + [("compute", "sdxl", 2, "full", True)] if size == 2048 else first[1:2]
        return [(*r, "torch") for r in rows]
    triton = [("compute", "sdxl", 8, mode, False, "triton") for mode in ("full", "partial")] if size == 2048 else []
    return [(*r, "torch") for r in first + loops + rest] + triton


def run_section(a, name: str, size: int) -> dict:
    sec = Section(a, name, size)
    sec.log(f"{size}² (as {sec.side}²), {sec.dtype}, graphs {sec.cuda}, JSON {sec.path}")
    for kind, fam_name, n, mode, cfg, kernels in plan(size, a.smoke):
        fam = family(fam_name, a.smoke)
        what = {"kind": kind, "model": fam_name, "size": size, "n": n, "mode": mode, "cfg_parallel": cfg,
                "kernels": kernels, "cuda_graphs": sec.cuda, "dtype": str(sec.dtype).replace("torch.", "")}
        if kind == "compute":
            sec.run(what, lambda: sec.compute_row(fam, n, mode, cfg, kernels))
        else:
            strip = next((r["strip"] for r in sec.rows if (r["model"], r["n"], r["kind"], r.get("cfg_parallel"))
                          == (fam_name, n, "compute", False) and "strip" in r), 0)
            sec.run({**what, "strip": strip}, lambda: sec.loop_row(fam, n, strip))
    sec.models.clear()
    return {"size": size, "side": sec.side, "smoke": a.smoke, "rows": sec.rows, "json": sec.path}


def section_pipelines(a) -> dict:
    return run_section(a, "pipelines", 2048)


def section_pipelines_4096(a) -> dict:
    return run_section(a, "pipelines_4096", 4096)


# ---- the table -------------------------------------------------------------------------------------
TARGETS = [   # (model, size, N, mode, CFG parallel, at least): issue 24's, per-rank compute
    ("sdxl", 2048, 8, "full", False, 5.0), ("sdxl", 4096, 8, "full", False, 7.0),
    ("flux", 2048, 8, "full", False, 6.0), ("flux", 4096, 8, "full", False, 7.2),
]


def summary_rows(result: dict) -> list[dict]:
    """gpu_check's table rows of one pipelines section, its targets' verdicts last."""
    out = []
    for r in result.get("rows", []):
        what = (f"pipelines {r['model']} {r['size']}² N={r['n']} {r['mode']}"
                + (" cfg-parallel" if r.get("cfg_parallel") else "") + (" whole call" if r["kind"] == "loop" else "")
                + (f" {r['kernels']} kernels" if r.get("kernels", "torch") != "torch" else ""))
        if "skipped" in r or "error" in r:
            out.append({"section": what, "result": r.get("skipped") or f"ERROR {r['error'][:160]}"})
        elif r["kind"] == "compute":
            sync = r["sync_vs_serial"].get("strip", r["sync_vs_serial"]["whole"])
            out.append({"section": what, "result": (
                f"{r['speedup']:.2f}x of a ceiling {r['ceiling']:.2f}x ({r['seconds'] * 1e3:.1f} vs "
                f"{r['serial_seconds'] * 1e3:.1f} ms, graphs {r['cuda_graphs']}); sync vs serial rel rms "
                f"{sync['rel_rms']:.1e}, max {sync['max_abs']:.1e}")})
        else:
            psnr = "".join(f", {m} emulated {r[f'{m}_emulated_psnr_db']:.1f} dB" for m in ("full", "partial")
                           if r.get(f"{m}_emulated_psnr_db") is not None)
            out.append({"section": what, "result": (
                f"{r['speedup']:.2f}x ({r['rank']['seconds']:.2f} vs {r['serial']['seconds']:.2f} s, "
                f"{r['steps']} steps, steady step {r['rank']['steady_step_s'] * 1e3:.1f} vs "
                f"{r['serial']['steady_step_s'] * 1e3:.1f} ms){psnr}")})
    for model, size, n, mode, cfg, least in TARGETS:
        hit = compute_row_of(result, model, size, n, mode, cfg)
        if any(r["size"] == size for r in result.get("rows", [])):
            verdict = "not measured" if not hit else (
                f"{'met' if hit['speedup'] >= least else 'MISSED'}: {hit['speedup']:.2f}x "
                f"(ceiling {hit['ceiling']:.2f}x)")
            partial = compute_row_of(result, model, size, n, "partial", cfg)
            if hit and partial:     # the U-Net's other mode beside it, with its PSNR (the emulated whole call)
                loop = next((r for r in result["rows"] if r["kind"] == "loop" and r["model"] == model
                             and r.get("partial_emulated_psnr_db") is not None), None)
                verdict += f"; partial {partial['speedup']:.2f}x" + (
                    f", {loop['partial_emulated_psnr_db']:.1f} dB against serial" if loop else "")
            smoke = " (--smoke: tiny models on the CPU, not the target's)" if result.get("smoke") else ""
            out.append({"section": f"target pipelines {model} {size}² {mode} N={n} >= {least}x",
                        "result": verdict + smoke})
    return out


def compute_row_of(result: dict, model: str, size: int, n: int, mode: str, cfg: bool) -> dict | None:
    """The measured compute row of (model, size, N, mode, CFG parallel) on PyTorch's kernels."""
    return next((r for r in result.get("rows", []) if r["kind"] == "compute" and "speedup" in r
                 and r["kernels"] == "torch"
                 and (r["model"], r["size"], r["n"], r["mode"], r["cfg_parallel"]) == (model, size, n, mode, cfg)), None)
