"""FLUX.2 text to image through the pipeline door: the tiny FLUX.2 (`Flux2Pipeline`: dual-stream
blocks, single-stream blocks whose attention and MLP share one fused projection, 4-axis ids) and
FLUX.2 [klein]'s pipeline on its components (`Flux2KleinPipeline`: classifier-free guidance as two
transformer calls per step) against diffusers' own single-process output; the stale modes' K/V
bytes in closed form and their quality against FLUX.1's at the same settings; reference images (more
token grids, cut by the strips); the refusal of the KV cache. The CUDA-graph path:
tests/diffusers/test_pipeline_graphs.py."""
import copy
from types import SimpleNamespace

import pytest
import torch

from support.diffusers_cases import HEIGHT, STEPS, call_kwargs, control_image, images  # noqa: E402
from parafuse.diffusers.tiny import inpaint_mask  # noqa: E402
from test_diffusers import SYNC_TOL, pipe, psnr, serial  # noqa: E402

import parafuse  # noqa: E402
from parafuse.diffusers import UnsupportedModelError  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.parallel.geometry import StripGeometry  # noqa: E402
from parafuse.parallel.plan import window_rows  # noqa: E402
from parafuse.parallel.transport import ring_bytes  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelines"))


_runs = {}


def emulated(root, family, n, **settings):
    """The family's call on n emulated ranks (once per settings: the tests share runs)."""
    key = (family, n, tuple(sorted(settings.items())))
    if key not in _runs:
        _runs[key] = emulate_pipeline(pipe(root, family), n, lambda p: images(p(**call_kwargs(family))), **settings)
    return _runs[key]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("family", ["flux2", "flux2-klein"])
def test_flux2_sync_equals_diffusers(root, family, n):
    """sync at N = 2 and 3 (token rows 10, 10 and 7, 7, 6) = diffusers; FLUX.2 [klein]'s CFG calls
    the transformer twice per step (conditional, then unconditional), each call an evaluation."""
    ref = serial(root, family)
    assert ref.abs().max() > 0.1                        # a real output, not an untrained model's zeros
    outs = emulated(root, family, n, mode="sync")
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL
    assert all(torch.equal(out, outs[0][0]) for out, _ in outs[1:])   # every rank steps the same latent
    calls = 2 if family == "flux2-klein" else 1
    assert [stats["evaluations"] for _, stats in outs] == [calls * STEPS] * n


def test_flux2_bytes_closed_form_and_stale_modes_against_flux1(root):
    """N = 3, warmup 1, halo portion 0.3. Every attention site (1 dual-stream, 2 single-stream
    blocks: the fused ones' K/V included) exchanges its image K/V: in sync and full each strip's
    whole K/V to every other rank at every step; partial at its synchronous first step the same,
    then its window rows to each neighbour. The text queries: one exact merge per site and step in
    sync, the stale merge's partial outputs in full and partial. Quality: full and partial within
    3 dB of FLUX.1's own at the same settings against its diffusers output (measured: FLUX.2 full
    83.5, partial 77.4, none 72.9 dB; FLUX.1 71.8, 66.1, 62.4 dB), below sync (stale K/V was used),
    above none (the neighbours' K/V counts); the sign K/V codec in full mode too."""
    n, family = 3, "flux2"
    settings = {"sync": {}, "full": dict(warmup_steps=1), "partial": dict(warmup_steps=1, halo_portion=0.3),
                "none": dict(warmup_steps=1)}
    runs = {mode: emulated(root, family, n, mode=mode, **kw) for mode, kw in settings.items()}
    ref, config = serial(root, family), pipe(root, family).transformer.config
    sites = config.num_layers + config.num_single_layers
    inner = config.num_attention_heads * config.attention_head_dim
    _, tokens, channels = ref.shape
    height = HEIGHT // (2 * pipe(root, family).vae_scale_factor)          # token rows: latent rows packed 2 x 2
    geo = StripGeometry(height, tokens // height, n, 1)
    w, token_kv = geo.width, 2 * inner * 4                    # K and V of a token, float32
    text_len = call_kwargs(family)["prompt_embeds"].shape[1]
    lse, out = config.num_attention_heads * text_len * 4, text_len * inner * 4
    for r in range(n):
        rows = geo.rows[r]
        whole = STEPS * sites * (n - 1) * rows * w * token_kv
        windows = sites * (n - 1 - (r in (0, n - 1))) * window_rows(rows, 0.3) * w * token_kv
        expect = {"sync": whole, "full": whole, "partial": whole // STEPS + (STEPS - 1) * windows, "none": 0}
        for mode, outs in runs.items():
            sent = outs[r][1]["bytes_sent"]
            assert sent["attn_kv"] == expect[mode], (mode, r)
            assert sent["gather"] == STEPS * rows * w * channels * 4 * (n - 1), (mode, r)
            merge = (n - 1) * (out + lse) if mode in ("full", "partial") else (n - 1) * lse + ring_bytes(out, n)
            assert sent["text_attn"] == STEPS * sites * merge, (mode, r)
    quality = {mode: psnr(outs[0][0], ref) for mode, outs in runs.items()}
    flux1 = {mode: psnr(emulated(root, "flux", n, mode=mode, **settings[mode])[0][0][0], serial(root, "flux"))
             for mode in ("full", "partial")}
    for mode in ("full", "partial"):
        assert quality["none"] < quality[mode] < quality["sync"] - 20, quality
        assert quality[mode] > flux1[mode] - 3, (quality, flux1)
    # one-bit stale K/V (the fused blocks' K/V width read from the attention, which has no to_k):
    # no more than 2 dB below the exact stale K/V (measured 83.3 / 83.5 dB), fewer K/V bytes
    signed = emulated(root, family, n, mode="full", kv_codec="sign", **settings["full"])
    assert psnr(signed[0][0], ref) > quality["full"] - 2
    for (_, exact), (_, sign) in zip(runs["full"], signed):
        assert sign["bytes_sent"]["attn_kv"] < exact["bytes_sent"]["attn_kv"]


def klein_cfg_kwargs() -> dict:
    return call_kwargs("flux2-klein")                # guidance 3 > 1, a negative prompt's embeddings


def test_flux2_klein_cfg_parallel_and_stale_modes(root):
    """FLUX.2 [klein]'s CFG with cfg_parallel, N = 2 (one rank a branch, each computing its own call):
    sync = diffusers, one evaluation a step. Without cfg_parallel, partial at N = 2 runs each branch's
    calls as a stream of their own (own stale state): the same bits as cfg_parallel on 4 ranks."""
    ref = serial(root, "flux2-klein")
    outs = emulate_pipeline(pipe(root, "flux2-klein"), 2, lambda p: images(p(**klein_cfg_kwargs())), mode="sync",
                            cfg_parallel=True)
    assert (outs[0][0] - ref).abs().max() <= SYNC_TOL
    assert [stats["evaluations"] for _, stats in outs] == [STEPS] * 2

    def partial(n, cfg_parallel):
        return emulate_pipeline(pipe(root, "flux2-klein"), n, lambda p: images(p(**klein_cfg_kwargs())),
                                mode="partial", warmup_steps=1, cfg_parallel=cfg_parallel)[0][0]
    streams = partial(2, False)
    assert torch.equal(streams, partial(4, True)) and (streams - ref).abs().max() > SYNC_TOL


def reference_image():
    """A PIL image, as FLUX.2's pipelines take their reference images."""
    from PIL import Image
    return Image.fromarray((control_image()[0].permute(1, 2, 0) * 255).byte().numpy())


def reference_kwargs(family: str, **extra) -> dict:
    """The family's call with two reference images of different sizes (their own token grids, at
    img_ids' time coordinates 10 and 20, after the latent's 20 x 12)."""
    small = reference_image().resize((64, 96))
    return {**call_kwargs(family), "image": [reference_image(), small], **extra}


def test_flux2_reference_images_run_by_strips_of_every_grid(root):
    """Reference images append their tokens to the latent's as further grids, each of its image's
    own size at its own time coordinate: each rank takes its rows of every grid, the Flux Kontext
    rule (`StripModel._grid`). Flux2Pipeline with two references (grids 20 x 12, 20 x 12, 12 x 8):
    sync at N = 2 and 3 = diffusers, the references changing the output; full at N = 3 within
    3 dB of text-to-image full (each against its own diffusers output). Flux2KleinInpaintPipeline
    (the image to inpaint appended so): sync N = 3 = diffusers; its CFG (two calls a step, the
    FLUX.2 [klein] rule) with cfg_parallel N = 4 = diffusers."""
    from diffusers import Flux2KleinInpaintPipeline

    plain = pipe(root, "flux2")
    ref = images(plain(**reference_kwargs("flux2")))
    assert (ref - serial(root, "flux2")).norm() > 1e-3 * ref.norm()         # the references count
    grids = []

    def call(p):
        out = images(p(**reference_kwargs("flux2")))
        grids.append(tuple((g.height, g.width) for g in p.strips.geometry.grids))
        return out
    for n in (2, 3):
        outs = emulate_pipeline(plain, n, call, mode="sync")
        assert (outs[0][0] - ref).abs().max() <= SYNC_TOL, n
    assert grids[-1] == ((20, 12), (20, 12), (12, 8))
    full = emulate_pipeline(plain, 3, lambda p: images(p(**reference_kwargs("flux2"))), mode="full", warmup_steps=1)
    text_to_image = emulated(root, "flux2", 3, mode="full", warmup_steps=1)
    assert psnr(full[0][0], ref) > psnr(text_to_image[0][0], serial(root, "flux2")) - 3

    inpaint = Flux2KleinInpaintPipeline(**pipe(root, "flux2-klein").components)
    kwargs = lambda: {**call_kwargs("flux2-klein"), "image": reference_image(), "mask_image": inpaint_mask()}
    ref = images(inpaint(**kwargs()))
    for n, cfg_parallel in ((3, False), (4, True)):
        outs = emulate_pipeline(inpaint, n, lambda p: images(p(**kwargs())), mode="sync", cfg_parallel=cfg_parallel)
        assert (outs[0][0] - ref).abs().max() <= SYNC_TOL, n
        assert [stats["evaluations"] for _, stats in outs] == [(1 if cfg_parallel else 2) * STEPS] * n


def test_flux2_kv_cache_and_foreign_ids_are_refused_before_compute(root):
    """The transformer called directly with FLUX.2 [klein]'s K/V cache of reference images
    (`kv_cache_mode`), or with ids whose layer coordinate is not 0 (no image grid), is refused before
    it runs; the KV pipeline's own processors at parallelize."""
    plain, sequence = copy.deepcopy(pipe(root, "flux2")), []
    plain.transformer.register_forward_pre_hook(lambda m, a, kw: sequence.append(kw) if not sequence else None,
                                                with_kwargs=True)
    plain(**{**call_kwargs("flux2"), "num_inference_steps": 1})

    def direct(p):
        p.pipe.transformer.register_forward_hook(lambda *a: pytest.fail("the transformer ran"))
        with torch.no_grad():
            with pytest.raises(UnsupportedModelError, match=r"kv_cache_mode='cached'.*call it without kv_cache_mode"):
                p.transformer(**{**sequence[0], "kv_cache_mode": "cached"})
            ids = sequence[0]["img_ids"].clone()
            ids[..., 3] = 1
            with pytest.raises(UnsupportedModelError, match="nor a sequence of row-major token grids"):
                p.transformer(**{**sequence[0], "img_ids": ids})
    emulate_pipeline(pipe(root, "flux2"), 2, direct, mode="sync")

    from diffusers import Flux2KleinKVPipeline
    kv = Flux2KleinKVPipeline(**copy.deepcopy(pipe(root, "flux2")).components)   # its KV processors installed
    with pytest.raises(UnsupportedModelError, match=r"Flux2KVAttnProcessor.*use Flux2KleinPipeline"):
        parafuse.parallelize(SimpleNamespace(transformer=kv.transformer))
