"""parafuse as the patch-parallel backend of diffusers pipelines: tiny random-weight SD, SDXL and
PixArt pipelines (parafuse/diffusers/tiny.py) loaded by path, against diffusers' own single-process
output (sync), the thread emulator (full, partial: torchrun must equal it) and closed-form byte
counts."""
import math
import os
from types import SimpleNamespace

import pytest
import torch

# both come with the test extra; a missing one fails here rather than skipping the backend's tests
import diffusers  # noqa: E402,F401
import transformers  # noqa: E402,F401

from parafuse.health import CHECK_EVERY  # noqa: E402
from parafuse.parallel.transport import ring_bytes  # noqa: E402
from support.diffusers_cases import (ALL_TORCHRUN_CASES, HANDOFFS, HEIGHT, PREPARED, STEPS, TORCHRUN_CASES,  # noqa: E402
                                     WIDTH, base_kwargs, call_kwargs, family_kwargs, flux_true_cfg_kwargs, images,
                                     ip_adapter, ip_masks, pipeline_path, refiner_kwargs, two_ip_adapters)

import parafuse  # noqa: E402
from parafuse.diffusers import UnsupportedModelError, load_pipeline  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.parallel.distributed import ParallelLayout  # noqa: E402
from parafuse.parallel.geometry import StripGeometry  # noqa: E402

from support import ROOT, launch  # noqa: E402
SYNC_TOL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelines"))


_pipes, _serial = {}, {}


def pipe(root, family):
    if family not in _pipes:
        _pipes[family] = load_pipeline(pipeline_path(root, family))
    return _pipes[family]


def serial(root, family, **kw):
    """diffusers' own single-process output (latents)."""
    key = (family, tuple(sorted(kw.items())))
    if key not in _serial:
        _serial[key] = images(pipe(root, family)(**call_kwargs(family, **kw)))
    return _serial[key]


def emulated(root, family, n, guidance=3.0, **settings):
    return emulate_pipeline(pipe(root, family), n, lambda p: images(p(**call_kwargs(family, guidance))), **settings)


def psnr(a, b):
    return 10 * math.log10((b.max() - b.min()).item() ** 2 / ((a - b) ** 2).mean().item())


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart", "sd3", "sd35-medium", "flux"])
def test_sync_equals_diffusers(root, family, n):
    outs = emulated(root, family, n, mode="sync")
    ref = serial(root, family)
    assert ref.abs().max() > 0.1                        # a real output, not an untrained model's zeros
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL
    same_latent_on_every_rank(outs)
    assert [stats["evaluations"] for _, stats in outs] == [STEPS] * n


def test_sd35_medium_dual_attention_exchanges_as_a_third_attention_site(root):
    """SD3.5 Medium's first blocks add a self-attention over the image tokens (`attn2`, SD3's joint
    processor called without text) beside the joint attention: on a strip it exchanges image K/V as
    any attention site does. N = 3: in sync (fresh K/V) and full (stale) its attn_kv bytes are 3/2
    of the tiny SD3's, whose two joint attentions have the same tokens and width. Against diffusers'
    output, full is far above none, which sends no image K/V (measured: 60.5 against 47.0 dB; SD3's
    63.8 against 55.9: the attention over image tokens alone leans on the other strips' K/V)."""
    quality = {}
    for mode in ("sync", "full", "none"):
        runs = {family: emulated(root, family, 3, mode=mode, warmup_steps=1) for family in ("sd3", "sd35-medium")}
        for (_, sd3), (_, dual) in zip(runs["sd3"], runs["sd35-medium"]):
            assert 2 * dual["bytes_sent"]["attn_kv"] == 3 * sd3["bytes_sent"]["attn_kv"] > 0 or mode == "none", mode
        quality[mode] = {family: psnr(outs[0][0], serial(root, family)) for family, outs in runs.items()}
    assert quality["sync"]["sd35-medium"] > 80
    assert quality["none"]["sd35-medium"] + 10 < quality["full"]["sd35-medium"] < 80, quality


def same_latent_on_every_rank(outs) -> None:
    """output_type="latent": every rank returns the latent, the same bits as rank 0's (each ran the
    scheduler on the whole latent from the same gathered denoiser output)."""
    assert all(torch.equal(out, outs[0][0]) for out, _ in outs[1:]), "a rank's latent differs from rank 0's"


def test_sync_decoded_images_equal_diffusers(root):
    outs = emulate_pipeline(pipe(root, "sd"), 2, lambda p: p(**call_kwargs("sd", output_type="pt")), mode="sync")
    ref = pipe(root, "sd")(**call_kwargs("sd", output_type="pt")).images
    assert outs[0][0].images.shape == ref.shape
    assert (outs[0][0].images - ref).abs().max() <= SYNC_TOL
    assert all(out is None for out, _ in outs[1:]), "an image: ranks other than 0 get None"


def test_bytes_closed_form_and_modes(root):
    """gather: every evaluation, each rank sends its strip of the (CFG-batched) output to every other
    rank; none: nothing else but the non-finite watch's flags (one float per rank, agreed every
    CHECK_EVERY evaluations and after the call); partial: fewer K/V bytes than full; sync and full:
    the same exchanges."""
    n, fam = 3, "sd"
    ref = serial(root, fam)
    runs = {mode: emulated(root, fam, n, mode=mode, warmup_steps=1) for mode in ("sync", "full", "partial", "none")}
    _, c, h, w = ref.shape
    geo = StripGeometry(h, w, n, 2)
    for r in range(n):
        for mode, outs in runs.items():
            sent = outs[r][1]["bytes_sent"]
            assert sent["gather"] == STEPS * 2 * c * geo.rows[r] * w * 4 * (n - 1), (mode, r)
        none = runs["none"][r][1]["bytes_sent"]
        assert none["control"] == (STEPS // CHECK_EVERY + 1) * ring_bytes(4 * n, n)
        assert sum(none.values()) == none["gather"] + none["control"]
        assert runs["partial"][r][1]["bytes_sent"]["attn_kv"] < runs["full"][r][1]["bytes_sent"]["attn_kv"]
        assert runs["sync"][r][1]["bytes_sent"] == runs["full"][r][1]["bytes_sent"]
    for outs in runs.values():                  # stale or not, every rank steps the same gathered output
        same_latent_on_every_rank(outs)
    quality = {mode: psnr(outs[0][0], ref) for mode, outs in runs.items()}
    assert quality["sync"] > 80
    for mode in ("full", "partial"):          # stale neighbours, fresh own strip: far better than none
        assert quality["none"] + 5 < quality[mode] < 80, quality


def launch_torchrun(root, out, n, cases):
    """One torchrun job (gloo) of n ranks running `cases` of ALL_TORCHRUN_CASES; per case, every
    rank's saved output and byte counts."""
    for name in cases:
        pipeline_path(root, ALL_TORCHRUN_CASES[name][0])
        if name in HANDOFFS:
            pipeline_path(root, HANDOFFS[name])
    proc = launch.run(n, os.path.join(ROOT, "tests", "support", "diffusers_worker.py"), root, str(out), *cases)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(n)] for name in cases}


@pytest.fixture(scope="module")
def torchrun_run(root, tmp_path_factory):
    n = 2
    return n, launch_torchrun(root, tmp_path_factory.mktemp("dist"), n, list(TORCHRUN_CASES))


@pytest.mark.torchrun
def test_torchrun_three_ranks(root, tmp_path):
    """N = 3 under torchrun (uneven strips 7, 7, 6): sync equals diffusers, and Flux in partial mode
    (stale K/V windows and the stale text merge) equals the emulator, bytes included."""
    n = 3
    got = launch_torchrun(root, tmp_path, n, ["sd-sync", "flux-partial"])
    assert (got["sd-sync"][0]["images"] - serial(root, "sd")).abs().max() <= SYNC_TOL
    emu = emulated(root, "flux", n, **TORCHRUN_CASES["flux-partial"][1])
    assert (got["flux-partial"][0]["images"] - emu[0][0]).abs().max() <= 1e-5
    for r in range(n):
        assert got["flux-partial"][r]["rank_stats"]["bytes_sent"] == emu[r][1]["bytes_sent"]


def test_torchrun_ranks_leave_every_call_with_rank_zeros_global_rng(root, torchrun_run):
    """Each rank seeds its global RNG apart before the call (the worker); every call gives every rank
    rank 0's global RNG state (`share_global_rng`), whose draws diffusers makes where a pipeline
    passes no generator: after the call, the ranks draw the same numbers, in every case."""
    n, got = torchrun_run
    for name, ranks in got.items():
        for r in range(1, n):
            assert torch.equal(ranks[r]["global_draw"], ranks[0]["global_draw"]), (name, r)


def test_torchrun_sync_equals_diffusers(root, torchrun_run):
    n, got = torchrun_run
    assert (got["sd-sync"][0]["images"] - serial(root, "sd")).abs().max() <= SYNC_TOL
    assert torch.equal(got["sd-sync"][1]["images"], got["sd-sync"][0]["images"])     # the latent, on every rank


@pytest.mark.parametrize("case", ["sd-full", "pixart-partial", "sd3-partial", "flux-partial", "flux-full-exact"])
def test_torchrun_async_modes_equal_emulator(root, torchrun_run, case):
    n, got = torchrun_run
    family, settings = TORCHRUN_CASES[case]
    emu = emulated(root, family, n, **settings)
    assert (got[case][0]["images"] - emu[0][0]).abs().max() <= 1e-5
    for r in range(n):
        assert got[case][r]["rank_stats"]["bytes_sent"] == emu[r][1]["bytes_sent"]
    assert (emu[0][0] - serial(root, family)).abs().max() > 1e-3, "a stale mode that equals sync exchanged too much"


def prepared(root, case):
    """Case `case`'s pipeline as each of its ranks prepares it (a copy of the family's, with what
    PREPARED loads or enables on it) and its call (fresh keyword arguments at each call)."""
    import copy

    family = ALL_TORCHRUN_CASES[case][0]
    plain = copy.deepcopy(pipe(root, family))
    return plain, PREPARED[case](plain) if case in PREPARED else lambda: family_kwargs(family)


@pytest.mark.parametrize("case", ["sd-ip-masks-sync", "sd-freeu-sync", "sd-img2img-sync", "sd3-controlnet-sync",
                                  "flux-first-block-cache-sync", "sd-layerwise-casting-sync"])
def test_torchrun_per_process_state_sync_equals_diffusers(root, torchrun_run, case):
    """IP-Adapter masks (two adapters loaded in each process), FreeU (enabled in each), img2img
    (the VAE encoder by strips), SD3's ControlNet, Flux's first-block cache (its decision's sums
    over gloo) and layerwise float8 casting (enabled in each), each rank's pipeline its own
    process's (gloo, N = 2): sync = diffusers with the same adapters, masks, FreeU, image,
    ControlNet, cache or casting."""
    n, got = torchrun_run
    plain, call = prepared(root, case)
    ref = images(plain(**call()))
    assert (got[case][0]["images"] - ref).abs().max() <= SYNC_TOL
    if case == "flux-first-block-cache-sync":      # every rank took the whole image's decisions over gloo
        assert all(got[case][r]["rank_stats"]["bytes_sent"]["reduce"] > 0 for r in range(n))


@pytest.mark.parametrize("case,kind", [("sd-freeu-full", "reduce"), ("sd-img2img-sync", "gather")])
def test_torchrun_freeu_and_the_split_encoder_equal_the_emulator(root, torchrun_run, case, kind):
    """FreeU in a stale mode (its coefficients' reduction over gloo, kind reduce) and img2img's
    encoder by strips (its latent distribution gathered on every rank, kind gather): every rank's
    latent and bytes, sent and received, = the emulator's."""
    emulator_equals_torchrun(root, torchrun_run, case, kind)


def emulator_equals_torchrun(root, torchrun_run, case, kind):
    """Case `case` on the emulator: every rank's latent and bytes, sent and received, = its torchrun
    rank's, which sent bytes of `kind`. Returns the case's prepared pipeline, call and emulator run."""
    n, got = torchrun_run
    plain, call = prepared(root, case)
    emu = emulate_pipeline(plain, n, lambda p: images(p(**call())), **ALL_TORCHRUN_CASES[case][1])
    for r in range(n):
        assert (got[case][r]["images"] - emu[r][0]).abs().max() <= 1e-5
        for sent in ("bytes_sent", "bytes_received"):
            assert got[case][r]["rank_stats"][sent] == emu[r][1][sent]
        assert got[case][r]["rank_stats"]["bytes_sent"][kind] > 0
    return plain, call, emu


@pytest.mark.parametrize("case", ["flux-kontext-full", "flux-true-cfg-partial", "flux2-partial", "qwen-partial",
                                  "sd3-slg-full", "sd35-medium-partial", "qwen-edit-full"])
def test_torchrun_grids_streams_and_new_families_equal_the_emulator(root, torchrun_run, case):
    """In a stale mode under torchrun (gloo, N = 2): Flux Kontext's and Qwen-Image-Edit's two token
    grids, each rank its rows of both (Qwen's rotary table cut per grid); Flux's true CFG without
    cfg_parallel and SD3's skip-layer guidance (the CFG batch, then the conditional inputs with a
    block skipped), their two calls a step two streams with their own stale state; FLUX.2's,
    Qwen-Image's and SD3.5 Medium's attention (its second self-attention per block a third site):
    every rank's latent and bytes, sent and received, = the emulator's, and the stale mode is not
    the serial output."""
    plain, call, emu = emulator_equals_torchrun(root, torchrun_run, case, "attn_kv")
    assert (emu[0][0] - images(plain(**call()))).abs().max() > 1e-4, "a stale mode that equals sync"


def test_torchrun_refiner_takes_every_ranks_own_base_latents(root, torchrun_run):
    """The SDXL base to refiner handoff under torchrun (gloo, N = 2), no broadcast: the base's
    latent output, on every rank, is the same bits in both processes and = diffusers'; each rank's
    refiner, called with its own rank's latents, = diffusers' refiner output."""
    n, got = torchrun_run
    runs = got["sdxl-refiner-handoff"]
    base = images(pipe(root, "sdxl")(**base_kwargs()))
    ref = images(pipe(root, "sdxl-refiner")(**refiner_kwargs(base)))
    for r in range(n):
        assert torch.equal(runs[r]["base_latents"], runs[0]["base_latents"])
        assert torch.equal(runs[r]["images"], runs[0]["images"])
    assert (runs[0]["base_latents"] - base).abs().max() <= SYNC_TOL
    assert (runs[0]["images"] - ref).abs().max() <= SYNC_TOL


@pytest.mark.parametrize("family,n", [("sd", 2), ("sd", 4), ("sdxl", 2)])
def test_cfg_parallel_sync_equals_diffusers(root, family, n):
    """The two guidance branches on two groups of n/2 strips each (n = 2: one strip per branch);
    every batched argument is halved (SDXL: its added text/time conditioning too)."""
    outs = emulated(root, family, n, mode="sync", cfg_parallel=True)
    assert (outs[0][0] - serial(root, family)).abs().max() <= SYNC_TOL
    same_latent_on_every_rank(outs)             # the two branches' halves joined in the same order
    assert outs[0][1]["bytes_sent"]["cfg"] > 0


def test_pixart_positions_come_from_the_whole_grid(root, monkeypatch):
    """Negative control: PatchEmbed left to compute positions from the strip's own size (every strip
    restarting at row 0) breaks sync equality - the strip positions are what makes it hold."""
    from parafuse.diffusers.adapter import DiffusersAdapter

    kind = DiffusersAdapter.site_kind
    monkeypatch.setattr(DiffusersAdapter, "site_kind", lambda self, m: None if kind(self, m) == "positions" else kind(self, m))
    outs = emulated(root, "pixart", 2, mode="sync")
    assert (outs[0][0] - serial(root, "pixart")).abs().max() > 1e-3


def test_diffusers_site_kinds_are_site_kind_members(root):
    """The diffusers adapters (the denoiser's and the ControlNets') answer with SiteKind members or
    None, never a bare string, across the families' denoisers and VAEs: every kind turns up (the
    VAE encoder's Downsample2D is the DOWNSAMPLE layer)."""
    from parafuse.diffusers.adapter import DiffusersAdapter
    from parafuse.diffusers.strips import ControlNetAdapter
    from parafuse.parallel.plan import SiteKind

    seen = set()
    for adapter in (DiffusersAdapter(), ControlNetAdapter(torch.nn.Identity(), "controlnet")):
        for family in ("sd", "pixart", "sd3", "flux"):
            p = pipe(root, family)
            for model in (getattr(p, "unet", None) or p.transformer, p.vae):
                kinds = {adapter.site_kind(m) for m in model.modules()} - {None}
                assert all(type(k) is SiteKind for k in kinds), (family, kinds)
                seen |= kinds
    assert seen == set(SiteKind)


class LowRank(torch.nn.Module):
    """What a PEFT LoRA layer does: base(x) + B(A(x)), A and B new modules around the base layer."""

    def __init__(self, base, rank, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base_layer = base
        if isinstance(base, torch.nn.Conv2d):
            self.lora_A = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_B = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        with torch.no_grad():
            for p in (self.lora_A.weight, self.lora_B.weight):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def add_lora(unet):
    seed = 0
    for name, m in list(unet.named_modules()):
        if name.endswith("attn1"):
            m.to_k, m.to_v = LowRank(m.to_k, 2, seed), LowRank(m.to_v, 2, seed + 1)
            seed += 2
    block = unet.down_blocks[0].resnets[0]
    block.conv1 = LowRank(block.conv1, 2, seed)


def test_lora_added_after_parallelize_keeps_working(root):
    """LoRA-style wrappers put around to_k / to_v (bypassing the fused K|V GEMM) and around a 3x3
    conv (a new conv that needs halo rows) after parallelize: sync still equals the serial run."""
    import copy

    plain = copy.deepcopy(pipe(root, "sd"))
    add_lora(plain.unet)
    ref = images(plain(**call_kwargs("sd")))
    assert (ref - serial(root, "sd")).abs().max() > 1e-2          # the LoRA changes the output

    def call(p):
        add_lora(p.unet)
        return images(p(**call_kwargs("sd")))
    outs = emulate_pipeline(pipe(root, "sd"), 2, call, mode="sync")
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL


def peft_lora(unet):
    """A LoRA state dict in diffusers' format ("unet." + PEFT's keys) for the attention projections
    and the resnets' 3x3 conv1 of `unet`, from PEFT's random (non-zero) initialisation. (Scaled 3x,
    it makes this tiny model chaotic: 1e-6 float differences grow to 3e-2 in the serial run too.)"""
    import copy
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    return {"unet." + k: v for k, v in get_peft_model_state_dict(unet).items()}


def test_peft_lora_loaded_before_or_after_parallelize_keeps_working(root):
    """diffusers' own LoRA API (`load_lora_weights`, PEFT layers around to_q/to_k/to_v/to_out and
    the 3x3 convs), before parallelize and after it: sync equals single-process diffusers with the
    same LoRA; unload_lora_weights gives the plain pipeline's image back; and after fuse_lora +
    unload_lora_weights (plain layers whose weights PEFT changed in place, through .data: no new
    storage, no version bump) the merged weights are the ones used.
    PEFT's layers are modules around the projections, so K/V go through them, and a LoRA conv's
    lora_A gets its halo rows."""
    import copy
    from peft.tuners.lora import LoraLayer

    lora = peft_lora(pipe(root, "sd").unet)
    plain = copy.deepcopy(pipe(root, "sd"))
    plain.load_lora_weights(lora)
    attn = plain.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.to_k, LoraLayer) and isinstance(plain.unet.down_blocks[0].resnets[0].conv1, LoraLayer)
    ref = images(plain(**call_kwargs("sd")))
    assert (ref - serial(root, "sd")).abs().max() > 1e-2          # the LoRA changes the output

    before = emulate_pipeline(plain, 2, lambda p: images(p(**call_kwargs("sd"))), mode="sync")
    assert (before[0][0] - ref).abs().max() <= SYNC_TOL

    import threading
    one_at_a_time = threading.Lock()    # PEFT builds LoRA layers under accelerate's init_empty_weights, which
                                        # patches nn.Module for every thread: emulated ranks load in turn

    def load_after(p):
        got = [images(p(**call_kwargs("sd")))]          # plain layers first
        with one_at_a_time:
            p.load_lora_weights(lora)                    # ParallelPipeline passes it to the pipeline
        got.append(images(p(**call_kwargs("sd"))))
        with one_at_a_time:
            p.unload_lora_weights()                      # unfused: the plain layers back, as they were
        got.append(images(p(**call_kwargs("sd"))))
        with one_at_a_time:
            p.load_lora_weights(lora)
            p.fuse_lora()                                # merged into the base weights in place (.data +=)
            p.unload_lora_weights()                      # plain nn.Linear again, with the merged weights
        got.append(images(p(**call_kwargs("sd"))))
        return got
    (plain_out, loaded, unloaded, fused), _ = emulate_pipeline(pipe(root, "sd"), 2, load_after, mode="sync")[0]
    assert (plain_out - serial(root, "sd")).abs().max() <= SYNC_TOL
    assert torch.equal(unloaded, plain_out)
    assert (loaded - ref).abs().max() <= SYNC_TOL and (fused - ref).abs().max() <= SYNC_TOL


def test_ip_adapter_loaded_before_or_after_parallelize_keeps_working(root):
    """diffusers' IP-Adapter (`load_ip_adapter`: new processors on every attention, the
    cross-attentions' with image K/V projections, and an image projection on the U-Net), loaded
    before parallelize and after it, called with `ip_adapter_image_embeds`: sync equals
    single-process diffusers with the same adapter and the adapter changes the image. Loading it
    after parallelize rebuilds every processor from its class with no arguments (parafuse's give
    the plain processor back, wrapped again at the next call). `set_ip_adapter_scale` after
    parallelize, on the parallel pipeline or on the raw one, reaches the wrapped processors
    (diffusers finds them by class): = diffusers at the same scale."""
    import copy

    adapter = ip_adapter(pipe(root, "sd").unet)
    embeds = [torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(1))]     # negative, positive
    def kwargs():                                           # a fresh generator each call
        return {**call_kwargs("sd"), "ip_adapter_image_embeds": embeds}

    def load(p):
        p.load_ip_adapter(adapter, subfolder="", weight_name="", image_encoder_folder=None, low_cpu_mem_usage=False)
    plain = copy.deepcopy(pipe(root, "sd"))
    load(plain)
    ref = images(plain(**kwargs()))
    assert (ref - serial(root, "sd")).abs().max() > 1e-2                     # the adapter changes the output

    before = emulate_pipeline(plain, 2, lambda p: images(p(**kwargs())), mode="sync")
    assert (before[0][0] - ref).abs().max() <= SYNC_TOL

    def load_after(p):
        got = [images(p(**call_kwargs("sd")))]
        load(p)                                              # ParallelPipeline passes it to the pipeline
        got.append(images(p(**kwargs())))
        p.set_ip_adapter_scale(0.0)
        got.append(images(p(**kwargs())))
        p.pipe.set_ip_adapter_scale(0.4)                     # the raw pipeline, as a user may still hold it
        got.append(images(p(**kwargs())))
        return got
    (plain_out, loaded, off, partly), _ = emulate_pipeline(copy.deepcopy(pipe(root, "sd")), 2, load_after,
                                                           mode="sync")[0]
    assert (plain_out - serial(root, "sd")).abs().max() <= SYNC_TOL
    assert (loaded - ref).abs().max() <= SYNC_TOL
    assert (off - serial(root, "sd")).abs().max() <= SYNC_TOL       # scale 0: the adapter adds nothing
    plain.set_ip_adapter_scale(0.4)
    at_04 = images(plain(**kwargs()))
    assert (partly - at_04).abs().max() <= SYNC_TOL and (at_04 - ref).abs().max() > 1e-2


_masked = {}


def masked_ip_reference(root, family):
    """The family's pipeline with two IP-Adapters, its call with `ip_masks()`, and diffusers' own
    single-process output of that call (asserted to differ clearly from the unmasked output)."""
    if family not in _masked:
        import copy

        plain = copy.deepcopy(pipe(root, family))
        embeds = two_ip_adapters(plain)

        def kwargs(masks):                                  # a fresh generator each call
            return {**call_kwargs(family), **embeds, "cross_attention_kwargs": {"ip_adapter_masks": masks}}
        ref = images(plain(**kwargs(ip_masks())))
        assert (ref - images(plain(**kwargs(None)))).abs().max() > 1e-2          # the masks change the image
        _masked[family] = plain, kwargs, ref
    return _masked[family]


@pytest.mark.parametrize("family,n,cfg_parallel", [("sd", 2, False), ("sd", 3, False), ("sdxl", 3, False),
                                                   ("sdxl", 4, True)])
def test_ip_adapter_masks_equal_diffusers(root, family, n, cfg_parallel):
    """IP-Adapter masks (two adapters, two images on the first, masks varying over rows and columns
    of a non-square image, one of another aspect): each cross-attention on a strip gets the mask
    diffusers downsamples for the whole image's queries at its level, cut to the strip's tokens, so
    sync equals single-process diffusers with the same masks - with cfg_parallel too (each rank's
    guidance branch, its image embeddings halved, the masks whole)."""
    plain, kwargs, ref = masked_ip_reference(root, family)
    outs = emulate_pipeline(plain, n, lambda p: images(p(**kwargs(ip_masks()))), mode="sync",
                            cfg_parallel=cfg_parallel)
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_ip_adapter_masks_stale_modes_within_3db_of_the_same_adapters_unmasked(root, mode):
    """The stale modes (N = 2) with IP-Adapter masks against diffusers with the same masks: within
    3 dB of what the same mode loses with the same adapters unmasked (the masks' cut is exact in every
    mode; only the self-attentions' stale K/V differ)."""
    plain, kwargs, ref = masked_ip_reference(root, "sd")
    settings = dict(mode=mode, warmup_steps=1, **({"halo_portion": 0.3} if mode == "partial" else {}))
    masked = emulate_pipeline(plain, 2, lambda p: images(p(**kwargs(ip_masks()))), **settings)[0][0]
    unmasked_ref = images(plain(**kwargs(None)))
    unmasked = emulate_pipeline(plain, 2, lambda p: images(p(**kwargs(None))), **settings)[0][0]
    with_masks, without = psnr(masked, ref), psnr(unmasked, unmasked_ref)
    assert with_masks >= without - 3, (with_masks, without)


def test_ip_adapter_masks_in_diffusers_older_single_tensor_form(root):
    """diffusers still reads `ip_adapter_masks` given as one tensor [adapters, 1, H, W] (one image
    per adapter): with two adapters and cfg_parallel (a CFG batch of 2, as many as the adapters) the
    tensor is read as diffusers reads it, not halved as the batch is - sync equals diffusers."""
    import copy

    plain = copy.deepcopy(pipe(root, "sd"))
    embeds = two_ip_adapters(plain, images_per_adapter=(1, 1))
    masks = ip_masks()[0].transpose(0, 1)                   # the first adapter's two masks, one per adapter

    def kwargs():
        return {**call_kwargs("sd"), **embeds, "cross_attention_kwargs": {"ip_adapter_masks": masks}}
    ref = images(plain(**kwargs()))
    outs = emulate_pipeline(plain, 4, lambda p: images(p(**kwargs())), mode="sync", cfg_parallel=True)
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL


def test_a_mask_of_another_shape_is_refused_before_the_denoiser_runs(root):
    """A mask that is not [1, images, H, W] (here [images, H, W]: the leading 1 left out) is refused
    with one line naming the mask, its shape and the tool that makes it, at the first denoiser call,
    before its evaluation starts."""
    plain, kwargs, _ = masked_ip_reference(root, "sd")

    def call(p):
        with pytest.raises(ValueError, match=r"ip_adapter_masks\[0\] is \(2, 160, 96\), not a \[1, images, "
                                             r"height, width\] tensor .*IPAdapterMaskProcessor"):
            p(**kwargs([m[0] for m in ip_masks()]))
        return p.strips.evaluations
    assert [evaluations for evaluations, _ in emulate_pipeline(plain, 2, call, mode="sync")] == [0, 0]


def flux_ip_adapter(transformer, image_dim: int = 8) -> dict:
    """A random Flux IP-Adapter in diffusers' state-dict format: the image projection (an image
    embedding of `image_dim` to 4 tokens of the text width) and a to_k_ip / to_v_ip pair per
    dual-stream block, numbered 0, 1, ... as diffusers numbers them."""
    g = torch.Generator().manual_seed(0)
    cross, width = transformer.config.joint_attention_dim, transformer.inner_dim
    proj = {"proj.weight": torch.randn(4 * cross, image_dim, generator=g), "proj.bias": torch.zeros(4 * cross),
            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip = {}
    for i in range(transformer.config.num_layers):
        for kind in ("to_k_ip", "to_v_ip"):
            ip[f"{i}.{kind}.weight"] = torch.randn(width, cross, generator=g) / cross ** 0.5
            ip[f"{i}.{kind}.bias"] = torch.randn(width, generator=g) * 0.1
    return {"image_proj": proj, "ip_adapter": ip}


def load_flux_ip_adapter(p):
    p.load_ip_adapter(flux_ip_adapter(p.transformer), weight_name="", image_encoder_pretrained_model_name_or_path=None,
                      low_cpu_mem_usage=False)


def flux_ip_kwargs(seed: int = 1, true_cfg: bool = False) -> dict:
    """A Flux call with an image prompt's embeddings (and a negative one's: without it, FluxPipeline
    encodes a black image, which needs an image encoder)."""
    g = torch.Generator().manual_seed(seed)
    kw = flux_true_cfg_kwargs() if true_cfg else call_kwargs("flux")
    kw.update(ip_adapter_image_embeds=[torch.randn(1, 1, 8, generator=g)],
              negative_ip_adapter_image_embeds=[torch.randn(1, 1, 8, generator=g)])
    return kw


@pytest.fixture(scope="module")
def flux_ip(root):
    """The tiny Flux pipeline with the IP-Adapter loaded, and diffusers' own output with it."""
    import copy

    adapted = copy.deepcopy(pipe(root, "flux"))
    load_flux_ip_adapter(adapted)
    return adapted, images(adapted(**flux_ip_kwargs()))


@pytest.mark.parametrize("n", [2, 3])
def test_flux_ip_adapter_loaded_before_parallelize_equals_diffusers(root, flux_ip, n):
    """Flux's IP-Adapter (FluxIPAdapterAttnProcessor on the dual-stream blocks, its image queries
    attending to the image prompt's tokens: row-local) in sync equals single-process diffusers with
    the same adapter, and the adapter changes the image."""
    adapted, ref = flux_ip
    assert (ref - serial(root, "flux")).abs().max() > 0.5
    outs = emulate_pipeline(adapted, n, lambda p: images(p(**flux_ip_kwargs())), mode="sync")
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL


def test_flux_ip_adapter_loaded_after_parallelize_keeps_working(root, flux_ip):
    """Loading after parallelize: the loader rebuilds the single-stream blocks' processors from
    their class with no arguments (parafuse's give the plain FluxAttnProcessor back) and puts its
    own on the dual-stream blocks; the next call wraps them again. `ip_adapter_masks` in
    joint_attention_kwargs: diffusers' Flux processor leaves them unused, and so does parafuse
    (= diffusers). `set_ip_adapter_scale(0)` reaches the wrapped processors (= the plain pipeline).
    A call without an image prompt is refused; `unload_ip_adapter` gives the plain pipeline back."""
    import copy

    adapted, ref = flux_ip

    def masked():               # a dict per call: FluxPipeline writes the image prompt into it
        return {**flux_ip_kwargs(), "joint_attention_kwargs": {"ip_adapter_masks": [torch.zeros(1, 1, 20, 12)]}}
    assert torch.equal(images(adapted(**masked())), ref)

    def load_after(p):
        got = [images(p(**call_kwargs("flux")))]
        load_flux_ip_adapter(p)                              # ParallelPipeline passes it to the pipeline
        got += [images(p(**flux_ip_kwargs())), images(p(**masked()))]
        p.set_ip_adapter_scale(0.0)
        got.append(images(p(**flux_ip_kwargs())))
        with pytest.raises(UnsupportedModelError, match="has an IP-Adapter but the call has no image prompt"):
            p(**call_kwargs("flux"))
        p.unload_ip_adapter()
        return got + [images(p(**call_kwargs("flux")))]
    (plain_out, loaded, with_masks, unscaled, unloaded), _ = emulate_pipeline(copy.deepcopy(pipe(root, "flux")), 2,
                                                                              load_after, mode="sync")[0]
    assert (loaded - ref).abs().max() <= SYNC_TOL and (with_masks - ref).abs().max() <= SYNC_TOL
    for out in (plain_out, unscaled, unloaded):
        assert (out - serial(root, "flux")).abs().max() <= SYNC_TOL


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_flux_ip_adapter_stale_modes_within_3db_of_the_pipeline_without_it(root, flux_ip, mode):
    """N = 3, warmup 1: the image-prompt term is computed fresh on each strip, so the stale modes
    lose no more against diffusers with the adapter than the same mode does without it (3 dB of
    slack, as for the ControlNet; measured with / without: full 73.0 / 71.8 dB, partial 69.9 /
    66.1 dB)."""
    adapted, ref = flux_ip
    settings = dict(mode=mode, warmup_steps=1, **({"halo_portion": 0.3} if mode == "partial" else {}))
    with_ip = emulate_pipeline(adapted, 3, lambda p: images(p(**flux_ip_kwargs())), **settings)[0][0]
    without = emulated(root, "flux", 3, **settings)[0][0]
    assert torch.isfinite(with_ip).all() and (with_ip - ref).abs().max() > 1e-4
    quality = psnr(with_ip, ref), psnr(without, serial(root, "flux"))
    assert quality[0] >= quality[1] - 3, quality


@pytest.mark.parametrize("n", [2, 4])
def test_flux_ip_adapter_with_true_cfg_runs_cfg_parallel(root, flux_ip, n):
    """True CFG with an image prompt and a negative one (FluxPipeline swaps
    `ip_adapter_image_embeds` between its two transformer calls): with cfg_parallel each group
    computes its own branch's call, its own embeddings; sync equals diffusers."""
    adapted, _ = flux_ip
    ref = images(adapted(**flux_ip_kwargs(true_cfg=True)))
    other_negative = {**flux_ip_kwargs(true_cfg=True), "negative_ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}
    assert (ref - images(adapted(**other_negative))).abs().max() > 1e-2        # the negative image prompt matters
    outs = emulate_pipeline(adapted, n, lambda p: images(p(**flux_ip_kwargs(true_cfg=True))), mode="sync",
                            cfg_parallel=True)
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL


def test_flux_ip_embeddings_enter_the_graphs_static_buffers(root, flux_ip):
    """Graphed (a replay reruns the captured region on its static inputs) equals eager across two
    calls with different image-prompt embeddings - nested in joint_attention_kwargs, copied into the
    static buffers - and a third after `set_ip_adapter_scale`: a CUDA graph holds the scale it was
    captured with, so the scale's change drops the graphs and the call captures new ones."""
    from parafuse.graphs import rerun_capture

    def call(graphed):
        def run(par):
            if graphed:
                par.strips.graphed, par.session.capture = True, rerun_capture
            got = [images(par(**flux_ip_kwargs(seed))) for seed in (1, 2)]
            old = list(par.strips._graphs.values())
            par.set_ip_adapter_scale(0.5)
            got.append(images(par(**flux_ip_kwargs(2))))
            recaptured = bool(old) and not any(g is o for g in par.strips._graphs.values() for o in old)
            return got + [par.strips.captures, recaptured]
        return run
    adapted, _ = flux_ip
    (*eager, _, _), _ = emulate_pipeline(adapted, 2, call(False), mode="full", warmup_steps=1)[0]
    (*graphed, captures, recaptured), _ = emulate_pipeline(adapted, 2, call(True), mode="full", warmup_steps=1)[0]
    assert captures >= 1 and recaptured
    assert (eager[0] - eager[1]).abs().max() > 1e-2 and (eager[1] - eager[2]).abs().max() > 1e-2
    for e, g in zip(eager, graphed):
        assert torch.equal(e, g)


def _tiny(cls, **config):
    torch.manual_seed(0)
    return cls(**config)


def test_unsupported_modules_are_named_before_any_compute(root):
    from diffusers import FluxTransformer2DModel

    flux = _tiny(FluxTransformer2DModel, patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                 axes_dims_rope=(2, 2, 4))
    flux.fuse_qkv_projections()
    with pytest.raises(UnsupportedModelError, match=r"'transformer_blocks\.0\.attn'.*fused QKV"):
        parafuse.parallelize(SimpleNamespace(transformer=flux))

    import copy
    unet = copy.deepcopy(pipe(root, "sd").unet)
    unet.conv_in.padding_mode = "reflect"
    with pytest.raises(UnsupportedModelError, match=r"'conv_in'.*padding mode 'reflect'"):
        parafuse.parallelize(SimpleNamespace(unet=unet))
    unet = copy.deepcopy(pipe(root, "sd").unet)
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(lambda attn, x, *a, **k: x)
    with pytest.raises(UnsupportedModelError, match=r"'mid_block\.attentions\.0\.transformer_blocks\.0\.attn1'"):
        parafuse.parallelize(SimpleNamespace(unet=unet))
    with pytest.raises(UnsupportedModelError, match="no denoiser"):
        parafuse.parallelize(SimpleNamespace(vae=unet))
    with pytest.raises(ValueError, match="unknown mode"):
        parafuse.parallelize(pipe(root, "sd"), mode="fast")


def test_cli_generates_from_a_pipeline_folder(root, tmp_path, capsys):
    """`python -m parafuse.generate --model PATH --prompt-embeds FILE`, in process; every bad input
    exits with status 2 and one line, before anything is written."""
    from parafuse.generate import main

    path = pipeline_path(root, "pixart")
    kw = call_kwargs("pixart")
    embeds = tmp_path / "embeds.pt"
    torch.save({k: kw[k] for k in ("prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask",
                                   "negative_prompt_attention_mask")}, embeds)
    out, report = tmp_path / "a.png", tmp_path / "a.json"
    size = ["--height", str(kw["height"]), "--width", str(kw["width"]), "--steps", "2", "--guidance", "3"]
    assert main(["--model", path, "--prompt-embeds", str(embeds), *size, "--out", str(out), "--report", str(report),
                 "--no-progress"]) == 0
    from PIL import Image
    assert Image.open(out).size == (kw["width"], kw["height"])
    import json
    rep = json.loads(report.read_text())
    assert rep["pipeline"] == "PixArtAlphaPipeline" and rep["world_size"] == 1

    bad = tmp_path / "bad.png"
    for args, message in [([], "needs --prompt or --prompt-embeds"),
                          (["--prompt", "a cat"], "saved without a text encoder"),
                          (["--prompt-embeds", str(embeds), "--solver", "ddim"], "--solver: only for parafuse's"),
                          (["--prompt-embeds", str(embeds), "--schedule", "bottleneck"], "--schedule: only for"),
                          (["--prompt-embeds", str(embeds), "--exchange-timeout", "0"], "exchange_timeout (--exchange-t"),
                          (["--prompt-embeds", str(embeds), "--text-merge", "exact", "--no-progress"],
                           "text_merge='exact' (--text-merge) merges the text queries of joint text+image attention "
                           "(SD3, Flux); PixArtTransformer2DModel has none"),
                          (["--prompt-embeds", str(embeds), "--mode", "sync", "--kv-codec", "sign"],
                           "kv_codec 'sign' (--kv-codec) encodes the stale K/V"),
                          (["--prompt-embeds", str(tmp_path / "nope.pt")], "does not exist")]:
        capsys.readouterr()
        assert main(["--model", path, *size, "--out", str(bad), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()


def test_cli_passes_the_exchange_settings_to_the_pipeline(root, tmp_path, monkeypatch):
    """Every parallel flag of the CLI reaches `parallelize` (a flag dropped on the way would run the
    pipeline without it and say nothing), and the report records them."""
    import json

    import parafuse
    from parafuse.generate import main

    seen, original = {}, parafuse.parallelize

    def recording(pipe, config, **kwargs):
        seen.update({k: getattr(config, k) for k in ("mode", "halo_portion", "warmup_steps", "cfg_parallel",
                                                      "norm_mode", "kv_codec")}, **kwargs)
        return original(pipe, config, **kwargs)

    monkeypatch.setattr(parafuse, "parallelize", recording)
    kw = call_kwargs("sd3")
    embeds = tmp_path / "embeds.pt"
    torch.save({k: kw[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}, embeds)
    report = tmp_path / "r.json"
    assert main(["--model", pipeline_path(root, "sd3"), "--prompt-embeds", str(embeds), "--height", str(kw["height"]),
                 "--width", str(kw["width"]), "--steps", "2", "--mode", "partial", "--halo-portion", "0.5",
                 "--warmup-steps", "1", "--norm", "exact", "--text-merge", "exact", "--kv-codec", "sign", "--out", str(tmp_path / "a.png"), "--report", str(report), "--no-progress"]) == 0
    assert seen == {"mode": "partial", "halo_portion": 0.5, "warmup_steps": 1, "cfg_parallel": False,
                    "norm_mode": "exact", "text_merge": "exact", "kv_codec": "sign"}
    rep = json.loads(report.read_text())
    assert (rep["text_merge"], rep["kv_codec"], rep["attention_backend"]) == ("exact", "sign", "sdpa")


def text_blocks(family, transformer):
    """The blocks whose output[0] is the text hidden states (SD3's last block returns none)."""
    if family == "sd3":
        return list(transformer.transformer_blocks[:-1])
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


@pytest.mark.parametrize("family,joint_sites,batch", [("sd3", 2, 2), ("flux", 3, 1)])
def test_text_is_replicated_bitwise_and_merged_in_every_mode(root, family, joint_sites, batch):
    """Joint text + image attention (SD3; Flux's dual- and single-stream blocks, text first): image
    tokens in strips, text tokens on every rank. An exact merge (sync; partial with
    text_merge="exact") leaves the text hidden states of every block bitwise equal on all ranks and
    costs one log-sum-exp all-gather and one all-reduce per joint attention and evaluation; the
    stale modes' default (text_merge="stale") sends every peer each strip's partial output and lse,
    and only its synchronous first step is bitwise equal across ranks (kind text_attn)."""
    from parafuse.parallel.transport import ring_bytes

    n, texts = 3, {}

    def call(p):
        rank = p.strips.layout.rank
        for i, block in enumerate(text_blocks(family, p.transformer)):
            block.register_forward_hook(lambda m, a, o, i=i: None if p.strips.tracing   # the shape trace's fakes
                                        else texts.setdefault((rank, i), []).append(o[0].clone()))
        return images(p(**call_kwargs(family)))

    blocks = len(text_blocks(family, pipe(root, family).transformer))
    heads, d, text_len = 2, 8, call_kwargs(family)["prompt_embeds"].shape[1]
    lse, out = batch * heads * text_len * 4, batch * heads * text_len * d * 4
    for mode, merge in (("sync", None), ("partial", "exact"), ("partial", None)):
        texts.clear()
        outs = emulate_pipeline(pipe(root, family), n, call, mode=mode, warmup_steps=1, text_merge=merge)
        assert len(texts) == n * blocks and all(len(got) == STEPS for got in texts.values())
        exact = merge == "exact" or mode == "sync"
        for (rank, i), got in texts.items():
            equal = [torch.equal(a, b) for a, b in zip(got, texts[(0, i)])]
            assert all(equal) if exact or rank == 0 else equal[0] and not any(equal[1:]), (mode, merge, rank, i)
        per_step = (n - 1) * lse + ring_bytes(out, n) if exact else (n - 1) * (out + lse)
        for _, stats in outs:
            assert stats["bytes_sent"]["text_attn"] == STEPS * joint_sites * per_step, (mode, merge)
    assert (outs[0][0] - serial(root, family)).abs().max() > 1e-4        # partial: stale image K/V


@pytest.mark.parametrize("n", [2, 3])
def test_vae_decode_by_strips_equals_plain_decode(root, n):
    """The VAE decoder (convs, GroupNorms, the mid-block attention) runs by strips, always
    synchronously, whatever the denoiser's mode; strip 0 gathers the image."""
    vae = pipe(root, "sd").vae
    z = torch.randn(1, vae.config.latent_channels, 40, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = vae.decode(z).sample

    def decode(p):
        with torch.no_grad():
            return p.vae.decode(z).sample, p.strips.transport.totals()
    outs = [out for out, _ in emulate_pipeline(pipe(root, "sd"), n, decode, mode="full", warmup_steps=1)]
    assert (outs[0][0] - plain).abs().max() <= SYNC_TOL
    assert plain.abs().max() > 0.1
    image_rows = StripGeometry(160, 96, n, 4).rows            # the tiny VAE upsamples 4x
    (_, received), (sent, _) = outs[0][1], outs[1][1]
    assert received["gather"] == 3 * 96 * 4 * sum(image_rows[1:])
    assert sent["conv_halo"] > 0 and sent["norm_stats"] > 0 and sent["attn_kv"] > 0


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("n", [2, 3, 4])
def test_vae_encode_by_strips_equals_plain_encode(root, n):
    """The VAE encoder (convs, the padded stride-2 downsamplers, GroupNorms, the mid-block attention)
    runs by strips, always synchronously whatever the denoiser's mode, and every rank gets the whole
    latent distribution; 164 rows are 41 latent rows, uneven strips at every N."""
    vae = pipe(root, "sd").vae
    x = torch.randn(1, 3, 164, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = vae.encode(x).latent_dist

    def encode(p):
        with torch.no_grad():
            dist = p.vae.encode(x).latent_dist
        return dist.mean, dist.std, p.strips.transport.totals()
    outs = [out for out, _ in emulate_pipeline(pipe(root, "sd"), n, encode, mode="full", warmup_steps=1)]
    for mean, std, _ in outs:
        assert rel(mean, plain.mean) <= 1e-5 and rel(std, plain.std) <= 1e-5
    latent_rows = StripGeometry(164, 96, n, 4).level(4).rows          # the tiny VAE downsamples 4x
    assert len(set(latent_rows)) == 2
    moments = 2 * vae.config.latent_channels                          # mean and log-variance
    for r, (_, _, (sent, received)) in enumerate(outs):
        assert received["gather"] == moments * 24 * 4 * (sum(latent_rows) - latent_rows[r])
        assert sent["gather"] == moments * 24 * 4 * latent_rows[r] * (n - 1)
        assert sent["latent_halo"] > 0 and sent["conv_halo"] > 0 and sent["norm_stats"] > 0 and sent["attn_kv"] > 0


def img2img(root):
    from diffusers import StableDiffusionImg2ImgPipeline
    return StableDiffusionImg2ImgPipeline(**pipe(root, "sd").components)


def img2img_kwargs():
    kw = {k: v for k, v in call_kwargs("sd").items() if k not in ("height", "width")}
    return {**kw, "image": torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(4)),
            "strength": 0.7}


@pytest.mark.parametrize("n", [2, 3])
def test_img2img_sync_with_the_encoder_split_equals_diffusers(root, n):
    """StableDiffusionImg2ImgPipeline encodes its image by strips: sync = diffusers; the encoder's
    exchanges are what the same call adds over parallel_vae=False - its gather in closed form (every
    rank receives the other strips' rows of the latent distribution), its halos, GroupNorm sums and
    K/V - and nothing else."""
    ref = images(img2img(root)(**img2img_kwargs()))
    outs = emulate_pipeline(img2img(root), n, lambda p: images(p(**img2img_kwargs())), mode="sync")
    whole = emulate_pipeline(img2img(root), n, lambda p: images(p(**img2img_kwargs())), mode="sync",
                             parallel_vae=False)
    assert rel(outs[0][0], ref) <= 1e-5 and rel(whole[0][0], ref) <= 1e-5
    latent_rows = StripGeometry(HEIGHT, WIDTH, n, 4).level(4).rows
    moments = 2 * pipe(root, "sd").vae.config.latent_channels
    for r in range(n):
        split, plain = outs[r][1]["bytes_received"], whole[r][1]["bytes_received"]
        added = {k: split[k] - plain[k] for k in split if split[k] != plain[k]}
        assert added.pop("gather") == moments * (WIDTH // 4) * 4 * (sum(latent_rows) - latent_rows[r])
        assert set(added) == {"latent_halo", "conv_halo", "norm_stats", "attn_kv"}
        assert all(v > 0 for v in added.values())


def test_vae_encode_refusals(root):
    """Refused before the encoder computes: tiling (an img2img call), an image whose size is not a
    multiple of the VAE's downsampling, one with fewer latent rows than strips; the old keyword."""
    import copy

    from parafuse.parallel.config import ConfigError
    from parafuse.parallel.geometry import GeometryError

    p = img2img(root)
    tiled = copy.deepcopy(p)
    tiled.vae.enable_tiling()

    def call(par):
        with pytest.raises(UnsupportedModelError, match="encodes and decodes by strips.*disable_tiling"):
            par(**img2img_kwargs())
        par.vae.disable_tiling()
        with torch.no_grad():
            with pytest.raises(GeometryError, match="162x96 image, not a multiple of its downsampling factor 4"):
                par.vae.encode(torch.zeros(1, 3, 162, 96))
            with pytest.raises(GeometryError, match="fewer than the 2 strips"):
                par.vae.encode(torch.zeros(1, 3, 4, 96))
    emulate_pipeline(tiled, 2, call)
    with pytest.raises(ConfigError, match="parallel_decode is now parallel_vae"):
        parafuse.parallelize(copy.deepcopy(p), parallel_decode=False)


def test_vae_tiling_is_refused(root):
    import copy

    p = copy.deepcopy(pipe(root, "sd"))
    p.vae.enable_tiling()

    def call(par):
        with pytest.raises(UnsupportedModelError, match="disable_tiling"):
            par(**call_kwargs("sd"))
    emulate_pipeline(p, 2, call)


def test_direct_denoiser_call_with_keyword_sample_and_output_object(root):
    """The hooks find the input by keyword too (`sample=`) and replace the output inside diffusers'
    output object (return_dict=True)."""
    unet = pipe(root, "sd").unet
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 40, 24, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        ref = unet(sample=x, timestep=500, encoder_hidden_states=ctx).sample

    def call(p):
        with torch.no_grad():
            return p.unet(sample=x, timestep=500, encoder_hidden_states=ctx).sample
    outs = emulate_pipeline(pipe(root, "sd"), 3, call, mode="sync")
    assert all((out - ref).abs().max() <= SYNC_TOL for out, _ in outs)     # every rank gets the whole output


@pytest.mark.parametrize("family,mode", [("sdxl", "partial"), ("sdxl", "none"), ("pixart", "full"), ("pixart", "none"),
                                         ("sd3", "full"), ("sd3", "none"), ("sd35-medium", "partial"), ("flux", "full"),
                                         ("flux", "none")])
def test_every_family_runs_every_mode(root, family, mode):
    """The modes the other tests leave out, at N = 3: finite, not the serial output, above a stated
    PSNR floor (measured here 25-72 dB on these tiny random models); `none` exchanges nothing of the
    image (joint models still merge their text queries exactly: kind text_attn; the non-finite
    watch's flags: kind control)."""
    outs = emulated(root, family, 3, mode=mode, warmup_steps=1)
    ref = serial(root, family)
    assert torch.isfinite(outs[0][0]).all() and (outs[0][0] - ref).abs().max() > 1e-4
    assert psnr(outs[0][0], ref) > 20
    if mode == "none":
        for _, stats in outs:
            assert {k for k, v in stats["bytes_sent"].items() if v} <= {"gather", "text_attn", "control"}


@pytest.mark.parametrize("family,mode", [("sd", "full"), ("pixart", "partial"), ("sd3", "full"), ("flux", "full")])
def test_sign_kv_codec_in_every_family(root, family, mode):
    """One-bit stale K/V through diffusers' attention processors (self, joint, Flux) at N = 3:
    no more than 2 dB below the exact stale K/V in PSNR against diffusers (measured, exact / sign:
    sd 39.50 / 39.50, pixart 48.37 / 48.42, sd3 63.80 / 63.79, flux 71.85 / 70.31 dB), with fewer
    K/V bytes (their closed form: tests/parallel/test_parallel.py, on the built-in models)."""
    exact = emulated(root, family, 3, mode=mode, warmup_steps=1)
    signed = emulated(root, family, 3, mode=mode, warmup_steps=1, kv_codec="sign")
    ref = serial(root, family)
    assert torch.isfinite(signed[0][0]).all()
    assert psnr(signed[0][0], ref) > psnr(exact[0][0], ref) - 2
    for (_, e), (_, s) in zip(exact, signed):
        assert s["bytes_sent"]["attn_kv"] < e["bytes_sent"]["attn_kv"]


def test_sign_kv_codec_needs_widths_divisible_by_16(root):
    """Refused by `parallelize`, before any compute: one self-attention made 24 wide."""
    import copy

    from diffusers.models.attention_processor import Attention
    p = copy.deepcopy(pipe(root, "sd"))
    attn = next(m for m in p.unet.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    attn.to_k = torch.nn.Linear(attn.to_k.in_features, 24)
    with pytest.raises(ValueError, match="needs an attention width divisible by 16; attention '.*' is 24 wide"):
        parafuse.parallelize(p, mode="full", kv_codec="sign", layout=ParallelLayout(0, 2))


def _text_merge_ranks(n, mode, text_merge, steps, warmup_steps=1, batch=2, heads=2, text=3, d=4, image=5):
    """The engine's text-query merge alone, on n emulated ranks: per step, random text queries (the
    same on every rank, as replicated text is) and random image keys/values per strip. Returns
    (inputs per step, results per rank and step, engines)."""
    from parafuse.diffusers.adapter import partial_attention
    from parafuse.parallel.emulator import run_ranks
    from parafuse.parallel.config import PatchConfig
    from parafuse.parallel.engine import ExchangeEngine
    from parafuse.parallel.plan import PatchPlan, Site
    from parafuse.parallel.transport import ThreadHub, ThreadTransport

    g = torch.Generator().manual_seed(7)
    inputs = [(torch.randn(batch, heads, text, d, generator=g),
               [torch.randn(2, batch, heads, image, d, generator=g) for _ in range(n)]) for _ in range(steps)]
    site = Site("attn", "attn", 1, heads * d, heads=heads, text=text)
    geometry = StripGeometry(image * n, 1, n, 1)       # `image` tokens per strip
    hub, results, engines = ThreadHub(n), [[] for _ in range(n)], [None] * n

    def body(rank):
        config = PatchConfig(mode=mode, warmup_steps=warmup_steps, text_merge=text_merge,
                             halo_portion=0.3 if mode == "partial" else None)
        engine = engines[rank] = ExchangeEngine(ThreadTransport(rank, hub), list(range(n)), config)
        engine.configure(PatchPlan([site], geometry, rank, batch, torch.float32, engine.settings), torch.device("cpu"))
        for step, (q, kv) in enumerate(inputs):
            engine.begin_step(step)
            results[rank].append(engine.merge_text("attn", *partial_attention(q, kv[rank][0], kv[rank][1]))())
        engine.drain()

    run_ranks(hub, body)
    return inputs, results, engines


def _attention_over(parts):
    """Float64 softmax attention written out: parts = [(q, k, v)], each strip's keys scored by its
    own query, normalised over all of them together."""
    num = den = 0
    for q, k, v in parts:
        w = torch.exp((q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5)
        num, den = num + w @ v.double(), den + w.sum(-1, keepdim=True)
    return num / den


@pytest.mark.parametrize("n", [2, 3])
def test_stale_text_merge_equals_reference(n):
    """text_merge="stale": synchronous steps are the exact attention over every strip's keys (the
    same bits on every rank); each stale step merges this strip's fresh partial result with the
    other strips' of the previous step (their keys scored by the previous step's queries). Every
    step sends each peer one [B, heads, L, d + 1] float32 message, kind text_attn; `exact` stays
    exact on every step and sends the lse all-gather and one all-reduce."""
    from parafuse.parallel.transport import ring_bytes

    steps, batch, heads, text, d = 4, 2, 2, 3, 4
    inputs, results, engines = _text_merge_ranks(n, "partial", "stale", steps, warmup_steps=2)
    for step, (q, kv) in enumerate(inputs):
        exact = _attention_over([(q, k, v) for k, v in kv])
        for rank in range(n):
            got = results[rank][step]
            if step < 2:
                assert (got - exact).abs().max() < 1e-5 and torch.equal(got, results[0][step])
            else:
                prev_q, prev_kv = inputs[step - 1]
                ref = _attention_over([(q, *kv[j]) if j == rank else (prev_q, *prev_kv[j]) for j in range(n)])
                assert (got - ref).abs().max() < 1e-5, (step, rank)
                assert (got - exact).abs().max() > 1e-3          # stale: not the exact attention
    message = batch * heads * text * (d + 1) * 4
    for e in engines:
        assert dict(e.transport.bytes_sent["text_attn"]) == {j: steps * message for j in range(n) if j != e.strip}
        assert e.transport.messages_sent["text_attn"] == steps * (n - 1)

    inputs, results, engines = _text_merge_ranks(n, "partial", "exact", steps, warmup_steps=2)
    for step, (q, kv) in enumerate(inputs):
        exact = _attention_over([(q, k, v) for k, v in kv])
        assert all((results[r][step] - exact).abs().max() < 1e-5 for r in range(n))
    lse, out = batch * heads * text * 4, batch * heads * text * d * 4
    for e in engines:
        assert sum(e.transport.bytes_sent["text_attn"].values()) == steps * ((n - 1) * lse + ring_bytes(out, n))
        assert e.transport.messages_sent["text_attn"] == steps * n      # n - 1 lse sends + one all-reduce


def test_stale_text_merge_is_refused_outside_the_stale_modes(root):
    for mode in ("sync", "none"):
        with pytest.raises(ValueError, match="needs a stale mode"):
            parafuse.parallelize(pipe(root, "sd3"), mode=mode, text_merge="stale")
    with pytest.raises(ValueError, match="unknown text_merge 'late'; valid: exact, stale"):
        parafuse.parallelize(pipe(root, "sd3"), mode="full", text_merge="late")


@pytest.mark.parametrize("n", [2, 4])
def test_flux_true_cfg_runs_cfg_parallel(root, n):
    """FluxPipeline's true CFG calls the transformer twice per step (conditional, then
    unconditional): with cfg_parallel each CFG group computes only its own call (n = 2: one strip
    per branch; n = 4: two), and sync equals single-process diffusers. Each group evaluates once per
    step; the outputs are swapped under kind cfg."""
    ref = images(pipe(root, "flux")(**flux_true_cfg_kwargs()))
    assert (ref - serial(root, "flux")).abs().max() > 1e-2           # the negative branch matters
    outs = emulate_pipeline(pipe(root, "flux"), n, lambda p: images(p(**flux_true_cfg_kwargs())), mode="sync",
                            cfg_parallel=True)
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL
    same_latent_on_every_rank(outs)             # each branch's output swapped whole with the other's
    latent = ref.numel() * 4
    for _, stats in outs:
        assert stats["evaluations"] == STEPS                           # one evaluation a step, its own branch
        assert stats["bytes_sent"]["cfg"] == STEPS * latent


def test_flux_true_cfg_without_cfg_parallel(root):
    """Without cfg_parallel every group runs both calls: exact in sync (the stale modes, each call on
    its own exchange state: tests/diffusers/test_denoiser_streams.py)."""
    ref = images(pipe(root, "flux")(**flux_true_cfg_kwargs()))
    outs = emulate_pipeline(pipe(root, "flux"), 2, lambda p: images(p(**flux_true_cfg_kwargs())), mode="sync")
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL
