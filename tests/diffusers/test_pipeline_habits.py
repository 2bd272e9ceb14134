"""The pipeline door used as diffusers users use a pipeline (issue 27): attribute writes, `.to()`,
a raw pipeline called behind the wrapper, a second `parallelize`, torch.compile, the refusals'
hints, modules changed behind parafuse's back, diffusers' model hooks (caches, offloading,
layerwise casting), ControlNet, image-conditioned pipelines (img2img, inpainting, Fill, Kontext's two
token grids), and ranks given different calls. Tiny
random-weight pipelines of tests/support/diffusers_cases.py on the thread emulator, against diffusers'
own single-process output."""
import copy
import os
import re

import pytest
import torch

from support.capture import CompiledFrames  # noqa: E402
from support.diffusers_cases import (FBC_THRESHOLD, FREEU, STEPS, call_kwargs, control_key,  # noqa: E402
                                     enable_first_block_cache, flux_true_cfg_kwargs, images, pipeline_path)

import parafuse  # noqa: E402
from parafuse.diffusers import UnsupportedModelError, load_pipeline  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.parallel.config import ConfigError  # noqa: E402

SYNC_TOL = 1e-4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelines"))


def fresh(root, family):
    return load_pipeline(pipeline_path(root, family))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def ranks_raise(excinfo_match, pipe, n, call, **settings):
    """`call` run on n emulated ranks fails with a message matching `excinfo_match`."""
    with pytest.raises(RuntimeError, match=excinfo_match):
        emulate_pipeline(pipe, n, call, **settings)


# ---- item 3: the returned pipeline is the pipeline -----------------------------------------------
def test_scheduler_written_after_parallelize_is_the_one_used(root):
    from diffusers import DPMSolverMultistepScheduler

    plain = fresh(root, "sd")
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config)
    ref = images(plain(**call_kwargs("sd")))

    def call(par):
        par.scheduler = DPMSolverMultistepScheduler.from_config(par.scheduler.config)
        assert isinstance(par.pipe.scheduler, DPMSolverMultistepScheduler)
        return images(par(**call_kwargs("sd")))
    out = emulate_pipeline(fresh(root, "sd"), 2, call, mode="sync")[0][0]
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("family,name", [("sd", "unet"), ("pixart", "transformer")])
def test_denoiser_assigned_after_parallelize_is_parallelized(root, family, name):
    plain = fresh(root, family)
    other = copy.deepcopy(getattr(plain, name))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    setattr(plain, name, other)
    ref = images(plain(**call_kwargs(family)))

    def call(par):
        images(par(**call_kwargs(family)))                  # the first denoiser runs once
        setattr(par, name, copy.deepcopy(other))
        out = images(par(**call_kwargs(family)))
        return out, par.strips.model is getattr(par.pipe, name), par.rank_stats["bytes_sent"]["conv_halo"]
    outs = emulate_pipeline(fresh(root, family), 2, call, mode="sync")
    out, hooked, _ = outs[0][0]
    assert hooked and rel(out, ref) <= 1e-5
    assert all(o[0][2] > 0 or family == "pixart" for o in outs)   # the new U-Net exchanged halos


def test_unsupported_denoiser_assigned_after_parallelize_is_refused_before_compute(root):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom:                                   # a user's own processor
        def __call__(self, *args, **kwargs):
            return AttnProcessor2_0()(*args, **kwargs)

    def call(par):
        unet = copy.deepcopy(par.unet.__class__.from_config(par.unet.config))
        unet.set_attn_processor(Custom())
        par.unet = unet
        par(**call_kwargs("sd"))
    ranks_raise("Custom", fresh(root, "sd"), 2, call, mode="sync")


def test_vae_assigned_after_parallelize_decodes_by_strips(root):
    plain = fresh(root, "sd")
    vae = copy.deepcopy(plain.vae)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
    plain.vae = vae
    ref = plain(**call_kwargs("sd", output_type="pt")).images

    def call(par):
        par.vae = copy.deepcopy(vae)
        out = par(**call_kwargs("sd", output_type="pt"))
        return None if out is None else out.images, par.decoder.model is par.pipe.vae.decoder
    out, hooked = emulate_pipeline(fresh(root, "sd"), 2, call, mode="sync")[0][0]
    assert hooked and (out - ref).abs().max() <= SYNC_TOL


def test_to_returns_the_parallel_pipeline_and_calls_stay_equal(root):
    def call(par):
        same = par.to("cpu") is par and par.to(torch.float32) is par
        first, second = images(par(**call_kwargs("sd"))), images(par(**call_kwargs("sd")))
        return same, first, second
    outs = emulate_pipeline(fresh(root, "sd"), 2, call, mode="partial", warmup_steps=1, halo_portion=0.3)
    same, first, second = outs[0][0]
    assert same and torch.equal(first, second)
    assert all(o[0][0] and torch.equal(o[0][1], first) for o in outs[1:])       # the latent, on every rank


def test_raw_pipeline_called_behind_the_wrapper_is_refused(root):
    def call(par):
        images(par(**call_kwargs("sd")))
        par.pipe(**call_kwargs("sd"))              # what `pipe = pipe.to(...)` used to hand back
    ranks_raise("called the parallelized UNet2DConditionModel directly", fresh(root, "sd"), 2, call,
                mode="partial", warmup_steps=1, halo_portion=0.3)


def test_second_parallelize_is_refused_and_allowed_after_close(root):
    plain = fresh(root, "sd")
    ref = images(plain(**call_kwargs("sd")))
    par = parafuse.parallelize(plain, mode="sync")
    with pytest.raises(ConfigError, match="already parallelized"):
        parafuse.parallelize(plain, mode="full")
    par.close()
    assert rel(images(plain(**call_kwargs("sd"))), ref) == 0     # plain layers back: diffusers' own output
    par = parafuse.parallelize(plain, mode="full")
    assert rel(images(par(**call_kwargs("sd"))), ref) == 0       # one rank: the plain model
    par.close()


# ---- item 2: torch.compile before or after parallelize ---------------------------------------------
# the compile cases run the one-level U-Net (`sd-lite`), two steps (one synchronous, one stale):
# torch.compile's tracing costs per operation and per recompilation
COMPILE_SETTINGS = dict(mode="partial", warmup_steps=1, halo_portion=0.3)


def compile_call(family: str) -> dict:
    return {**call_kwargs(family), "num_inference_steps": 2}
_uncompiled = {}


def uncompiled(root, family="sd-lite", kernels="torch"):
    if (family, kernels) not in _uncompiled:
        _uncompiled[family, kernels] = emulate_pipeline(fresh(root, family), 2,
                                                        lambda p: images(p(**compile_call(family))),
                                                        **COMPILE_SETTINGS, kernels=kernels)[0][0]
    return _uncompiled[family, kernels]


def compiled_run(root, when: str, backend: str = "aot_eager", family="sd-lite", kernels="torch", **options):
    """The parallel pipeline with its denoiser (unet or transformer) compiled `when`: "before"
    parallelize (pipe.unet = torch.compile(pipe.unet)), "after" by assignment, "in-place"
    (pipe.unet.compile())."""
    plain = fresh(root, family)
    name = "unet" if getattr(plain, "unet", None) is not None else "transformer"
    if when == "before":
        setattr(plain, name, torch.compile(getattr(plain, name), backend=backend, **options))

    def call(par):
        if when == "after":
            setattr(par, name, torch.compile(getattr(par, name), backend=backend, **options))
        elif when == "in-place":
            getattr(par, name).compile(backend=backend, **options)
        out = images(par(**compile_call(family)))
        return out, par.strips._graphs_on
    return emulate_pipeline(plain, 2, call, **COMPILE_SETTINGS, cuda_graphs=False, kernels=kernels)


@pytest.mark.parametrize("when", ["before", "in-place"])      # "after": the next test
def test_compiled_denoiser_equals_the_uncompiled_parallel_output(root, when):
    if when == "before":
        torch._dynamo.reset()                # once for the file; its cases then share dynamo's cache, as
                                             # the compiles of one process do (and cost a third less)
    (out, graphs_on), _ = compiled_run(root, when)[0]
    assert rel(out, uncompiled(root)) <= 1e-5
    assert not graphs_on                     # parafuse's CUDA graphs are off for a compiled denoiser


# parafuse's code that torch.compile traces: the attention processors' compute (projections,
# attention); the rest of parafuse is host-side planning, or an exchange, run outside its tracing
TRACED_PARAFUSE = ("parafuse/diffusers/adapter.py", "parafuse/attention.py")
PACKAGE = os.path.dirname(os.path.abspath(parafuse.__file__))


def in_parafuse(path: str) -> str | None:
    """`path` as "parafuse/..." where it is a file of the package, else None."""
    path = os.path.abspath(path)
    return os.path.relpath(path, os.path.dirname(PACKAGE)) if path.startswith(PACKAGE + os.sep) else None


def test_compiled_in_place_traces_no_parafuse_planning_at_sdxl_depth(root):
    """`unet.compile()` on a U-Net of SDXL's depth (its 70 transformer layers, tiny widths): dynamo
    compiles none of parafuse's hooks, layers or engine, no parafuse function reaches its recompile
    limit, and the output is the uncompiled parallel output. On the old code dynamo traced the
    door's hooks at every call (benchmarks/compile_cost.py: a first call of 710-970 s on this CPU,
    under 20 now) and ran the engine's
    buffer allocation and the piece after each conv's halo exchange eagerly past the limit."""
    torch._dynamo.reset()
    with CompiledFrames() as compiled:
        (out, _), _ = compiled_run(root, "in-place", backend="eager", family="sdxl-depth")[0]
    ours = sorted({(f, ours_at) for f, path in compiled.frames if (ours_at := in_parafuse(path))})
    assert [(f, path) for f, path in ours if path not in TRACED_PARAFUSE] == [], ours
    assert len(compiled.frames) > 20                   # the U-Net was compiled (in pieces)
    assert [path for path in compiled.limit_hits if in_parafuse(path)] == []
    assert rel(out, uncompiled(root, "sdxl-depth")) <= 1e-5


def test_compiled_denoiser_with_triton_kernels_equals_the_uncompiled_parallel_output(root):
    """kernels='triton' (the default on CUDA; the interpreter here): under a compiled U-Net the
    Triton GroupNorm leaves the SiLU after it to the model. Its output marked as carrying the SiLU
    (SiLUApplied) failed dynamo at the first call, on the old code too ("read by _is_view")."""
    (out, _), _ = compiled_run(root, "in-place", kernels="triton")[0]
    assert rel(out, uncompiled(root, kernels="triton")) <= 1e-5


def test_compiled_vae_decode_with_triton_kernels_equals_the_uncompiled_decode(root):
    """`pipe.vae.decode = torch.compile(pipe.vae.decode)` (how users compile a VAE: pipelines call
    `decode`) with the VAE by strips and kernels='triton': the decoder's Triton GroupNorms leave
    their SiLU to the compiled decode (it failed at the first decode, as above)."""
    def decoded(compile_decode: bool):
        def call(par):
            if compile_decode:
                par.vae.decode = torch.compile(par.vae.decode, backend="aot_eager")
            out = par(**{**compile_call("sd-lite"), "num_inference_steps": 1, "output_type": "pt"})
            return None if out is None else out.images      # rank 0's image
        return emulate_pipeline(fresh(root, "sd-lite"), 2, call, mode="sync", kernels="triton",
                                cuda_graphs=False)[0][0]
    ref = decoded(False)
    assert rel(decoded(True), ref) <= 1e-5


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_compiled_transformer_equals_the_uncompiled_parallel_output(root, family):
    """The joint-attention transformers compiled in place: their processors' projections and
    attention traced, the stale text merge's and K/V's exchanges outside."""
    (out, graphs_on), _ = compiled_run(root, "in-place", family=family)[0]
    assert rel(out, uncompiled(root, family)) <= 1e-5
    assert not graphs_on


def test_compiled_denoiser_turns_parafuse_graphs_off(root):
    """Compiled after parallelize, by assignment, once graphs were captured: none are used after."""
    from parafuse.graphs import rerun_capture

    def call(par):
        par.strips.graphed, par.session.capture = True, rerun_capture
        images(par(**{**compile_call("sd-lite"), "num_inference_steps": 3}))      # 3: a capture, a replay
        eager_captures = par.strips.captures
        par.unet = torch.compile(par.unet, backend="aot_eager")
        out = images(par(**compile_call("sd-lite")))
        return eager_captures, par.strips.captures, out
    (eager_captures, captures, out), _ = emulate_pipeline(fresh(root, "sd-lite"), 2, call, **COMPILE_SETTINGS)[0]
    assert eager_captures >= 1 and captures == 0
    assert rel(out, uncompiled(root)) <= 1e-5


@pytest.mark.parametrize("when", ["after", "in-place"])
def test_fullgraph_compile_is_refused_before_compute(root, when):
    with pytest.raises(RuntimeError, match="UNet2DConditionModel was compiled with fullgraph=True"):
        compiled_run(root, when, fullgraph=True)


@pytest.mark.parametrize("when,options", [("before", {"backend": "inductor", "mode": "reduce-overhead"}),
                                          ("in-place", {"backend": "inductor", "mode": "max-autotune"}),
                                          ("after", {"backend": "cudagraphs"})])
def test_compile_with_its_own_cuda_graphs_is_refused_before_compute(root, when, options):
    """torch.compile's CUDA graphs under parafuse's exchanges have never run on a GPU: refused at the
    first denoiser call, before anything is compiled (on the old code inductor compiled and ran)."""
    with pytest.raises(RuntimeError, match=r"UNet2DConditionModel was compiled with (inductor's CUDA graphs|"
                                           r"backend=\"cudagraphs\").*max-autotune-no-cudagraphs"):
        compiled_run(root, when, **options)


@pytest.mark.slow
def test_inductor_compiled_denoiser_equals_the_uncompiled_parallel_output(root):
    (out, _), _ = compiled_run(root, "before", backend="inductor")[0]
    assert rel(out, uncompiled(root)) <= 1e-5


# ---- item 6: every refusal's hint is right for the model it names --------------------------------
_sync_refs = {}


def sync_ref(root, family):
    if family not in _sync_refs:
        _sync_refs[family] = images(fresh(root, family)(**call_kwargs(family)))
    return _sync_refs[family]


def follow_hints(root, family, plain) -> list[str]:
    """Parallelize `plain` and, while it is refused, do what the refusal's hint says (evaluated with
    `pipe` the pipeline); then the parallel pipeline must equal diffusers' own output. Returns the
    hints followed."""
    hints = []
    for _ in range(3):
        try:
            parafuse.parallelize(plain, mode="sync").close()
            break
        except UnsupportedModelError as e:
            hint = re.search(r"; call (.+?) first[.,]", str(e))
            assert hint is not None, f"a refusal that names a fix must say how: {e}"
            hints.append(hint.group(1))
            eval(hint.group(1), {"pipe": plain})
    out = emulate_pipeline(plain, 2, lambda p: images(p(**call_kwargs(family))), mode="sync")[0][0]
    assert (out - sync_ref(root, family)).abs().max() <= SYNC_TOL
    return hints


@pytest.mark.parametrize("habit,hints", [
    ("slicing", ["pipe.disable_attention_slicing()"]),
    ("fused", ["pipe.unet.unfuse_qkv_projections()", "pipe.vae.unfuse_qkv_projections()"]),
    ("xformers", ["pipe.unet.set_default_attn_processor()"]),
])
def test_unet_hints_are_followed_and_work(root, habit, hints):
    from diffusers.models.attention_processor import XFormersAttnProcessor

    plain = fresh(root, "sd")
    {"slicing": lambda: plain.enable_attention_slicing(),
     "fused": lambda: plain.fuse_qkv_projections(),
     "xformers": lambda: plain.unet.set_attn_processor(XFormersAttnProcessor())}[habit]()
    assert follow_hints(root, "sd", plain) == hints


def test_flux_fused_qkv_hint_is_followed_and_works(root):
    plain = fresh(root, "flux")
    plain.transformer.fuse_qkv_projections()
    assert follow_hints(root, "flux", plain) == ["pipe.transformer.unfuse_qkv_projections()"]


def test_refusals_without_a_working_fix_give_no_hint(root):
    from types import SimpleNamespace

    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor, AttnProcessor2_0

    class Custom:                                    # a user's processor: only its author knows the fix
        def __call__(self, *args, **kwargs):
            return AttnProcessor2_0()(*args, **kwargs)
    plain = fresh(root, "sd")
    plain.unet.set_attn_processor(Custom())
    with pytest.raises(UnsupportedModelError, match=r"processor Custom .*processors\)\. Supported") as e:
        parafuse.parallelize(plain, mode="sync")
    assert "call" not in str(e.value)

    torch.manual_seed(0)     # SD3's transformer has no set_default_attn_processor
    sd35 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                 dual_attention_layers=(0,))
    sd35.transformer_blocks[0].attn2.set_processor(Custom())     # SD3.5 Medium's self-attention
    with pytest.raises(UnsupportedModelError, match=r"'transformer_blocks\.0\.attn2'.*processor Custom") as e:
        parafuse.parallelize(SimpleNamespace(transformer=sd35))
    assert "set_default_attn_processor" not in str(e.value) and "call" not in str(e.value)

    class AddedKV(torch.nn.Module):                  # Kandinsky's / UnCLIP's attention: text K/V, no text queries
        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=16,
                                  processor=AttnAddedKVProcessor())
    with pytest.raises(UnsupportedModelError, match="added text key/value projections") as e:
        parafuse.parallelize(SimpleNamespace(unet=AddedKV()))
    assert "joint text+image" not in str(e.value) and "call" not in str(e.value)


def test_full_mode_with_a_halo_portion_is_refused_by_the_library(root):
    with pytest.raises(ConfigError, match="halo_portion"):
        parafuse.parallelize(fresh(root, "sd"), mode="full", halo_portion=0.5)


# ---- item 5: modules changed behind parafuse's back ---------------------------------------------
def test_pag_installing_processors_inside_call_is_refused_before_compute(root):
    from diffusers import StableDiffusionPAGPipeline

    def call(par):
        par(**call_kwargs("sd"), pag_scale=2.0)
    sd = fresh(root, "sd")
    pag = StableDiffusionPAGPipeline(**sd.components, pag_applied_layers=["mid"])
    ranks_raise(r"attn1'.*PAG\w*Processor", pag, 2, call, mode="sync")


def test_processor_set_between_calls_is_repatched(root):
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    def call(par):
        par.unet.set_attn_processor(AttnProcessor2_0())        # parafuse's processors replaced by the default
        out = images(par(**call_kwargs("sd")))
        par.unet.set_attn_processor(XFormersAttnProcessor())
        try:
            par(**call_kwargs("sd"))
        except UnsupportedModelError as e:
            return out, str(e)
    outs = emulate_pipeline(fresh(root, "sd"), 2, call, mode="sync")
    assert (outs[0][0][0] - sync_ref(root, "sd")).abs().max() <= SYNC_TOL
    assert all("XFormersAttnProcessor" in msg for (_, msg), _ in outs)


def test_processor_changed_during_an_image_is_refused(root):
    from diffusers.models.attention_processor import AttnProcessor2_0

    def swap(pipe, i, t, kwargs):
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        return kwargs
    ranks_raise("changed during an image", fresh(root, "sd"), 2,
                lambda par: par(**call_kwargs("sd"), callback_on_step_end=swap), mode="sync")


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_hooks_are_refused_and_the_hint_works(root, offload):
    """enable_model_cpu_offload hooks the U-Net; enable_sequential_cpu_offload also every module with
    parameters of its own, whose convs keep the forward the removed hook put back on them."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    plain = fresh(root, "sd")
    for m in plain.unet.modules():
        if m is plain.unet or (offload == "sequential" and next(m.parameters(recurse=False), None) is not None):
            add_hook_to_module(m, ModelHook())
    assert follow_hints(root, "sd", plain) == ["pipe.remove_all_hooks()"]


def _cache(name):
    """diffusers' cache config `name`, as `enable_cache` takes it (for the tiny Flux transformer)."""
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, SeaCacheConfig, TaylorSeerCacheConfig)
    return {"first-block": lambda: FirstBlockCacheConfig(threshold=0.3),
            "pyramid": lambda: PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                               current_timestep_callback=lambda: 500),
            "faster": lambda: FasterCacheConfig(current_timestep_callback=lambda: 500, is_guidance_distilled=True),
            "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
            "mag": lambda: MagCacheConfig(calibrate=True, num_inference_steps=3),
            "sea": lambda: SeaCacheConfig()}[name]()


@pytest.mark.parametrize("cache", ["pyramid", "faster", "taylorseer", "mag", "sea"])
def test_diffusers_caches_are_refused_and_the_hint_works(root, cache):
    plain = fresh(root, "flux")
    plain.transformer.enable_cache(_cache(cache))
    assert follow_hints(root, "flux", plain) == ["pipe.transformer.disable_cache()"]


def test_diffusers_cache_without_enable_cache_is_refused_without_a_call_hint(root):
    from diffusers.hooks import apply_taylorseer_cache

    plain = fresh(root, "flux")
    apply_taylorseer_cache(plain.transformer, _cache("taylorseer"))       # disable_cache cannot undo it
    with pytest.raises(UnsupportedModelError, match=r"cache hook TaylorSeerCacheHook.*"
                                                    r"load the model again without it") as e:
        parafuse.parallelize(plain, mode="sync")
    assert "; call" not in str(e.value)


@pytest.mark.parametrize("habit,match", [
    ("layerwise casting", r"'pipe\.unet' .*layerwise casting \(LayerwiseCastingHook\) on a module with "
                          r"submodules.*layer by layer, with enable_layerwise_casting"),
    ("group offload", r"group offloading \(GroupOffloadingHook\).*without enable_group_offload"),
    ("layer skip", r"a diffusers hook \(\w+SkipHook\) wraps this module's forward"),
])
def test_diffusers_hooks_without_a_fix_are_refused_without_a_hint(root, habit, match):
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip, apply_layerwise_casting

    family = "flux" if habit == "layer skip" else "sd"
    plain = fresh(root, family)
    model = plain.transformer if family == "flux" else plain.unet
    {"layerwise casting": lambda: apply_layerwise_casting(model, torch.bfloat16, torch.float32,  # the whole U-Net
                                                          skip_modules_pattern=None),
     "group offload": lambda: model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level"),
     "layer skip": lambda: apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn="transformer_blocks")),
     }[habit]()
    with pytest.raises(UnsupportedModelError, match=match) as e:
        parafuse.parallelize(plain, mode="sync")
    assert "; call" not in str(e.value)


def test_cache_enabled_after_parallelize_is_refused_before_compute(root):
    """Between calls: refused at the next call, on every rank, before the denoiser runs; the hint
    followed, the next call = diffusers. During an image (a step callback): refused at the next
    denoiser call, before that evaluation."""
    def enable(pipe, i, t, kwargs):
        pipe.transformer.enable_cache(_cache("taylorseer"))
        return kwargs

    def call(par):
        images(par(**call_kwargs("flux")))
        par.transformer.enable_cache(_cache("taylorseer"))
        evaluations = []
        handle = par.transformer.register_forward_pre_hook(lambda *a: evaluations.append(1))
        with pytest.raises(UnsupportedModelError, match=r"cache hook TaylorSeerCacheHook.*; call "
                                                        r"pipe\.transformer\.disable_cache\(\) first") as between:
            par(**call_kwargs("flux"))
        ran_between = len(evaluations)
        par.transformer.disable_cache()
        out = images(par(**call_kwargs("flux")))
        evaluations.clear()
        with pytest.raises(UnsupportedModelError, match="changed during an image"):
            par(**call_kwargs("flux"), callback_on_step_end=enable)
        handle.remove()
        return out, ran_between, len(evaluations), str(between.value)
    outs = emulate_pipeline(fresh(root, "flux"), 2, call, mode="sync")
    assert (outs[0][0][0] - sync_ref(root, "flux")).abs().max() <= SYNC_TOL
    assert all(o[0][1] == 0 and o[0][2] == 1 for o in outs)     # none before the refusal; one step, then refused


# ---- diffusers' layerwise casting on the strips ----------------------------------------------------
# weights stored in float8 (CPU torch casts it), computed in float32. Each rank gets a pipeline loaded and
# cast of its own: a deep copy of a cast layer calls the original layer's forward (diffusers' hook holds it)
FLOAT8 = torch.float8_e4m3fn
CAST_PARTS = {"sd": ("unet",), "flux": ("transformer",), "sd-controlnet": ("unet", "controlnet", "vae")}
_cast_refs = {}


def cast(pipe, family):
    for part in CAST_PARTS[family]:
        getattr(pipe, part).enable_layerwise_casting(storage_dtype=FLOAT8, compute_dtype=torch.float32)
    return pipe


def cast_pipes(root, family, n):
    """One cast pipeline per rank (`emulate_pipeline` takes the list)."""
    return [cast(fresh(root, family), family) for _ in range(n)]


def cast_kwargs(family):
    """The family's call; the ControlNet's decodes the image (the VAE runs by strips)."""
    from support.diffusers_cases import controlnet_kwargs

    return controlnet_kwargs(family, output_type="pt") if family.endswith("-controlnet") else call_kwargs(family)


def cast_ref(root, family):
    """diffusers' own output with the same casting."""
    if family not in _cast_refs:
        _cast_refs[family] = images(cast(fresh(root, family), family)(**cast_kwargs(family)))
    return _cast_refs[family]


def cast_weights(pipe, family) -> tuple[set, int, int]:
    """The dtypes of the weights of every layer diffusers casts in the family's cast parts, how many
    such layers there are, and how many of them are parafuse's patch layers."""
    from parafuse.diffusers.adapter import cast_layers
    from parafuse.parallel.layers import PatchConv2d

    layers = [m for part in CAST_PARTS[family] for m, _ in cast_layers(getattr(pipe, part))]
    return {p.dtype for m in layers for p in m.parameters()}, len(layers), sum(isinstance(m, PatchConv2d)
                                                                                for m in layers)


@pytest.mark.parametrize("family,n", [("sd", 2), ("sd", 3), ("flux", 2), ("flux", 3), ("sd-controlnet", 2)])
def test_layerwise_casting_sync_equals_diffusers_with_it(root, family, n):
    """enable_layerwise_casting before parallelize (SD's U-Net, Flux's transformer; a ControlNet
    pipeline's U-Net, ControlNet and VAE, the image decoded by strips): sync = diffusers with the same
    casting, which changes the output (SD, Flux); after the call every layer diffusers casts, the
    patch layers swapped in for them included, holds its weights in float8; after close() the raw
    pipeline's layers are diffusers' with their hooks, and its output is diffusers' (SD, Flux: the
    ControlNet pipeline's layers go back by the same rule, and its whole image is the slow run)."""
    ref = cast_ref(root, family)

    def call(par):
        out = images(par(**cast_kwargs(family)))
        during = cast_weights(par.pipe, family)
        par.close()
        raw = images(par.pipe(**cast_kwargs(family))) if par.layout.rank == 0 and family != "sd-controlnet" else None
        return out, during, cast_weights(par.pipe, family), raw
    outs = emulate_pipeline(cast_pipes(root, family, n), n, call, mode="sync")
    out, during, after, raw = outs[0][0]
    assert rel(out, ref) <= 1e-5
    assert family == "sd-controlnet" or rel(ref, sync_ref(root, family)) > 3e-3       # the casting shows
    assert all(o[0][1][0] == {FLOAT8} for o in outs)
    assert during[2] > 0 or family == "flux"                      # Flux swaps none of the layers it casts
    assert after == (during[0], during[1], 0) == cast_weights(cast(fresh(root, family), family), family)
    assert family == "sd-controlnet" or rel(raw, ref) == 0


def test_layerwise_casting_enabled_after_parallelize_works_and_is_refused_with_graphs(root):
    """enable_layerwise_casting on the parallel pipeline's U-Net between calls (SD, N = 2): eager,
    the next call = diffusers with the casting, its patch layers cast too. With CUDA graphs (replay =
    rerun on static inputs), captured in the call before, the next call is refused before any
    evaluation, on every rank, naming the setting to change: the casts give the weights new storage
    at every call, which a graph's replay would not read (never silently eager)."""
    from parafuse.graphs import rerun_capture

    def call(par, graphed):
        par.strips.graphed, par.session.capture = graphed, rerun_capture
        plain = images(par(**call_kwargs("sd")))
        captured = par.strips.captures
        cast(par, "sd")
        try:
            out = images(par(**call_kwargs("sd")))
        except UnsupportedModelError as e:
            return plain, captured, str(e), (par.strips.evaluations, par.strips.active)
        return plain, captured, out, cast_weights(par.pipe, "sd")
    (plain, captured, out, (dtypes, _, swapped)), _ = emulate_pipeline(fresh(root, "sd"), 2, lambda p: call(p, False),
                                                                       mode="sync")[0]
    assert captured == 0 and rel(plain, sync_ref(root, "sd")) <= 1e-5 and rel(out, cast_ref(root, "sd")) <= 1e-5
    assert dtypes == {FLOAT8} and swapped > 0
    refused = emulate_pipeline(fresh(root, "sd"), 2, lambda p: call(p, True), mode="sync")
    assert rel(refused[0][0][0], sync_ref(root, "sd")) <= 1e-5          # rank 0's image of the graphed call
    for (_, captured, message, after), _ in refused:       # no evaluation, no image left begun
        assert captured >= 1 and "cuda_graphs=False" in message and after == (0, False)


def test_layerwise_casting_with_flux_true_cfg_and_cfg_parallel_equals_diffusers(root):
    """Flux's true CFG with cfg_parallel (N = 2, a branch per rank): the rank that skips the other
    branch's call takes its output's shape from a shape-only run, which runs the cast layers on fake
    weights of their compute dtype (their own stay float8): = diffusers with the casting."""
    g = torch.Generator().manual_seed(11)
    kwargs = call_kwargs("flux")
    kwargs.update(true_cfg_scale=2.5, negative_prompt_embeds=torch.randn(kwargs["prompt_embeds"].shape, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(kwargs["pooled_prompt_embeds"].shape, generator=g))
    ref = images(cast(fresh(root, "flux"), "flux")(**{**kwargs, "generator": torch.Generator().manual_seed(0)}))

    def call(par):
        out = images(par(**{**kwargs, "generator": torch.Generator().manual_seed(0)}))
        return out, cast_weights(par.pipe, "flux")[0]
    outs = emulate_pipeline(cast_pipes(root, "flux", 2), 2, call, mode="sync", cfg_parallel=True)
    assert rel(outs[0][0][0], ref) <= 1e-5 and all(o[0][1] == {FLOAT8} for o in outs)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_layerwise_casting_full_mode_within_3db_of_full_without_it(root, family):
    """What full mode (N = 2) loses against diffusers with the casting stays within 3 dB of what it
    loses without it."""
    settings = dict(mode="full", warmup_steps=1)
    run = emulate_pipeline(cast_pipes(root, family, 2), 2, lambda p: images(p(**call_kwargs(family))), **settings)
    plain = emulate_pipeline(fresh(root, family), 2, lambda p: images(p(**call_kwargs(family))), **settings)
    with_cast, without = psnr(run[0][0], cast_ref(root, family)), psnr(plain[0][0], sync_ref(root, family))
    assert with_cast >= without - 3, (with_cast, without)


# ---- diffusers' first-block cache on the parallel denoiser (Flux; FBC_THRESHOLD: diffusers_cases) ------
def fbc(pipe, threshold=FBC_THRESHOLD):
    """`pipe` with diffusers' first-block cache on its transformer, as users enable it."""
    enable_first_block_cache(pipe, threshold)
    return pipe


def tail_runs(transformer) -> list:
    """A list that grows by one at every evaluation whose last block runs (not skipped by the cache;
    the shape-only runs' fake tensors not counted)."""
    runs = []
    last = transformer.single_transformer_blocks[-1].proj_out
    last.register_forward_pre_hook(lambda m, a: runs.append(1) if type(a[0]) is torch.Tensor else None)
    return runs


def fbc_reference(root, kwargs, threshold=FBC_THRESHOLD):
    """diffusers' own image with the cache, how many evaluations ran every block, and each decision
    diffusers took: (cache context, residual, the last computed residual, whether it computed)."""
    from parafuse.diffusers.adapter import diffusers_hooks

    plain = fbc(fresh(root, "flux"), threshold)
    head = diffusers_hooks(plain.transformer.transformer_blocks[0])[0]
    decide, decisions = head._should_compute_remaining_blocks, []

    def spy(residual):
        last = head.state_manager.get_state().head_block_residual
        computes = decide(residual)
        if last is not None:
            decisions.append((head.state_manager.context.name, residual, last, computes))
        return computes
    head._should_compute_remaining_blocks = spy
    runs = tail_runs(plain.transformer)
    return images(plain(**kwargs)), len(runs), decisions


def ratio(residual, last) -> float:
    """diffusers' statistic: mean |residual - last| / mean |last|."""
    return ((residual - last).abs().mean() / last.abs().mean()).item()


@pytest.mark.parametrize("n", [2, 3])
def test_first_block_cache_sync_equals_diffusers(root, n):
    """The cache enabled before parallelize, sync, N = 2 and 3 (uneven strips: 7, 7, 6 token rows):
    = diffusers with the same cache, which skips one step's tail and changes the image; every rank
    runs the tail at the steps diffusers runs it, although at the skipped step one strip's own rows
    are above the threshold (a rank deciding alone would compute). The decision's sums are counted
    under `reduce`: 8 bytes to each other strip per decision (every evaluation after the first)."""
    ref, computed, decisions = fbc_reference(root, call_kwargs("flux"))
    assert 0 < computed < STEPS and len(decisions) == STEPS - 1
    assert (ref - sync_ref(root, "flux")).abs().max() > 10 * SYNC_TOL         # the cache changes the image

    def call(par):
        runs = tail_runs(par.transformer)
        out = images(par(**call_kwargs("flux")))
        (span,) = par.strips.geometry.token_spans(par.layout.patch_index)       # the strip's tokens: one grid
        return out, len(runs), span
    outs = emulate_pipeline(fresh(root, "flux"), n, call, prepare=fbc, mode="sync")
    assert (outs[0][0][0] - ref).abs().max() <= SYNC_TOL
    for (_, runs, _), stats in outs:
        assert runs == computed
        assert stats["bytes_sent"]["reduce"] == stats["bytes_received"]["reduce"] == len(decisions) * 8 * (n - 1)
    _, residual, last, _ = next(d for d in decisions if not d[3])
    alone = [ratio(residual[:, a:b], last[:, a:b]) for (_, _, (a, b)), _ in outs]
    assert ratio(residual, last) < FBC_THRESHOLD < max(alone)


def test_first_block_cache_enabled_after_parallelize_disabled_between_calls_and_after_close(root):
    """`enable_cache` on the parallel pipeline's transformer between calls, then `disable_cache()`,
    N = 3: = diffusers' plain image, its cached image and the plain image again, with `reduce`
    bytes only with the cache. Between calls and after `close()` the hooks are diffusers' own: the
    raw pipeline, its cache enabled again, = diffusers."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    from parafuse.diffusers.adapter import diffusers_hooks

    def call(par):
        got = [images(par(**call_kwargs("flux")))]
        fbc(par)
        got.append(images(par(**call_kwargs("flux"))))
        reduced = par.rank_stats["bytes_sent"]["reduce"]
        own = type(diffusers_hooks(par.transformer.transformer_blocks[0])[0]) is FBCHeadBlockHook
        par.transformer.disable_cache()
        got.append(images(par(**call_kwargs("flux"))))
        fbc(par)
        return got, reduced, par.rank_stats["bytes_sent"]["reduce"], own, par.pipe
    outs = emulate_pipeline(fresh(root, "flux"), 3, call, mode="sync")
    ref = fbc_reference(root, call_kwargs("flux"))[0]
    (plain, cached, off), _, _, _, raw = outs[0][0]
    assert (plain - sync_ref(root, "flux")).abs().max() <= SYNC_TOL
    assert (off - sync_ref(root, "flux")).abs().max() <= SYNC_TOL
    assert (cached - ref).abs().max() <= SYNC_TOL
    assert all(reduced > 0 and after == 0 and own for (_, reduced, after, own, _), _ in outs)
    assert (images(raw(**call_kwargs("flux"))) - ref).abs().max() <= SYNC_TOL


@pytest.mark.parametrize("n", [2, 4])
def test_first_block_cache_with_true_cfg_and_cfg_parallel_equals_diffusers(root, n):
    """Flux's true CFG with cfg_parallel, N = 4 (2 branches x 2 strips; N = 2: each branch's whole
    image on one rank, diffusers' own decision), sync: = diffusers, which keeps one cache state per
    branch (`cache_context("cond")`, `("uncond")`) and at this threshold skips the conditional
    branch's tail at step 1 only; each branch's ranks decide for their own branch, summing over
    their own strips."""
    threshold = 0.34
    ref, computed, decisions = fbc_reference(root, flux_true_cfg_kwargs(), threshold)
    runs_of = {name: STEPS - sum(not d[3] for d in decisions if d[0] == name) for name in ("cond", "uncond")}
    assert runs_of == {"cond": STEPS - 1, "uncond": STEPS} and computed == sum(runs_of.values())

    def call(par):
        runs = tail_runs(par.transformer)
        return images(par(**flux_true_cfg_kwargs())), len(runs), par.layout.branch
    outs = emulate_pipeline(fresh(root, "flux"), n, call, prepare=lambda p: fbc(p, threshold), mode="sync",
                            cfg_parallel=True)
    assert (outs[0][0][0] - ref).abs().max() <= SYNC_TOL
    for (_, runs, branch), stats in outs:
        assert runs == runs_of[("cond", "uncond")[branch]]
        assert stats["bytes_sent"]["reduce"] == (STEPS - 1) * 8 * (n // 2 - 1)


@pytest.mark.parametrize("mode", ["full", "none"])
def test_first_block_cache_full_and_none_within_3db_of_the_pipeline_without_it(root, mode):
    """Mode full (N = 2) with the cache skipping a step's tail: its blocks post no exchange, on every
    rank, and wait for their last one at their next use; within 3 dB of the same mode without the
    cache, each against its own diffusers output. Mode none too (whose text merge still exchanges:
    ranks deciding alone posted different exchanges there)."""
    settings = dict(mode=mode, warmup_steps=1)
    ref = fbc_reference(root, call_kwargs("flux"))[0]

    def call(par):
        runs = tail_runs(par.transformer)
        return images(par(**call_kwargs("flux"))), len(runs)
    run = emulate_pipeline(fresh(root, "flux"), 2, call, prepare=fbc, **settings)
    plain = emulate_pipeline(fresh(root, "flux"), 2, lambda p: images(p(**call_kwargs("flux"))), **settings)
    assert all(runs < STEPS for (_, runs), _ in run)
    with_cache, without = psnr(run[0][0][0], ref), psnr(plain[0][0], sync_ref(root, "flux"))
    assert with_cache >= without - 3, (with_cache, without)


def test_first_block_cache_refusals_before_compute(root):
    """Refused before the denoiser runs, on every rank, one line each: with parafuse's CUDA graphs
    (a host decision inside the denoiser call); in a pipeline whose loop sets no cache context
    (PixArt's, the cache applied by `apply_first_block_cache`: diffusers itself fails inside the
    first block there) and in a direct transformer call outside `cache_context`, after which the
    pipeline's call = diffusers; with cfg_parallel where one call holds both guidance branches
    (PixArt's)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    def graphed(par):
        par.strips.graphed = True
        evaluations = []
        par.transformer.register_forward_pre_hook(lambda *a: evaluations.append(1))
        with pytest.raises(UnsupportedModelError, match=r"first-block cache decides on the host.*cuda_graphs=False, "
                                                        r"or call pipe\.transformer\.disable_cache\(\) first"):
            par(**call_kwargs("flux"))
        return len(evaluations), par.strips.active
    # no evaluation, and no image left begun (a refusal inside begin_image ends it)
    assert all(o[0] == (0, False) for o in emulate_pipeline(fresh(root, "flux"), 2, graphed, prepare=fbc,
                                                            mode="full", warmup_steps=1))

    plain, arguments = fresh(root, "flux"), []
    handle = plain.transformer.register_forward_pre_hook(lambda m, a, k: arguments.append(k), with_kwargs=True)
    plain(**call_kwargs("flux"))
    handle.remove()

    def direct(par):
        with pytest.raises(UnsupportedModelError, match=r"called outside one .*call pipe\.transformer\."
                                                        r"disable_cache\(\) first"):
            par.transformer(**arguments[0])
        return images(par(**call_kwargs("flux")))
    out = emulate_pipeline(fresh(root, "flux"), 2, direct, prepare=fbc, mode="sync")[0][0]
    assert (out - fbc_reference(root, call_kwargs("flux"))[0]).abs().max() <= SYNC_TOL

    def cached(pipe):
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=FBC_THRESHOLD))
        return pipe
    with pytest.raises(ValueError, match="No cache context is set"):
        cached(fresh(root, "pixart"))(**call_kwargs("pixart"))

    def uncontexted(par):
        evaluations = []
        par.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *a: evaluations.append(1))
        with pytest.raises(UnsupportedModelError, match=r"outside one .* load the model again without it"):
            par(**call_kwargs("pixart"))
        return len(evaluations)
    assert all(o[0] == 0 for o in emulate_pipeline(fresh(root, "pixart"), 2, uncontexted, prepare=cached,
                                                   mode="sync"))
    with pytest.raises(RuntimeError, match=r"decides from the whole CFG batch.*cfg_parallel=False, or load the "
                                           r"model again without it"):
        emulate_pipeline(fresh(root, "pixart"), 2, lambda p: p(**call_kwargs("pixart")), prepare=cached,
                         mode="sync", cfg_parallel=True)


def test_dit_is_refused_by_parallelize():
    from types import SimpleNamespace

    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                sample_size=8, norm_num_groups=8)
    with pytest.raises(UnsupportedModelError, match="square grid"):
        parafuse.parallelize(SimpleNamespace(transformer=dit))


# ---- item 1: ControlNet, parallel ---------------------------------------------------------------
def controlnet_run(root, family, n, kwargs_of=None, pipe_of=None, **settings):
    from support.diffusers_cases import controlnet_kwargs

    kwargs_of = kwargs_of or (lambda: controlnet_kwargs(family))
    plain = pipe_of(fresh(root, family)) if pipe_of else fresh(root, family)
    ref = images(plain(**kwargs_of()))
    outs = emulate_pipeline(plain, n, lambda p: images(p(**kwargs_of())), **settings)
    return outs, ref


# flux-f8-controlnet: Flux's XLabs-style ControlNet (input_hint_block on the control image's pixels)
@pytest.mark.parametrize("family,n", [("sd-controlnet", 2), ("sd-controlnet", 3), ("sdxl-controlnet", 2),
                                      ("sdxl-controlnet", 3), ("flux-controlnet", 2), ("flux-controlnet", 3),
                                      ("flux-f8-controlnet", 2), ("flux-f8-controlnet", 3)])
def test_controlnet_sync_equals_diffusers(root, family, n):
    from support.diffusers_cases import control_image, controlnet_kwargs

    outs, ref = controlnet_run(root, family, n, mode="sync")
    assert ref.abs().max() > 0.1 and rel(outs[0][0], ref) <= 1e-5
    key = control_key(family)
    other = images(fresh(root, family)(**{**controlnet_kwargs(family), key: control_image(9)}))
    assert rel(other, ref) > 1e-4                 # the ControlNet's conditioning shapes the output
    # each rank computed only its strip of the ControlNet: the ControlNet's own exchanges, beside the
    # denoiser's (each evaluation posts one more batch of K/V exchanges: the ControlNet's)
    plain = emulate_pipeline(fresh(root, family.removesuffix("-controlnet")), n,
                             lambda p: images(p(**call_kwargs(family.removesuffix("-controlnet")))), mode="sync")
    assert all(stats["bytes_sent"]["attn_kv"] > base["bytes_sent"]["attn_kv"]
               for (_, stats), (_, base) in zip(outs, plain))


@pytest.mark.parametrize("family,guess", [("sd-controlnet", False), ("sdxl-controlnet", False),
                                          ("sd-controlnet", True), ("sd3-controlnet", False)])
def test_controlnet_with_cfg_parallel_equals_diffusers_and_computes_one_branch(root, family, guess):
    """cfg_parallel, N = 4 (2 branches x 2 strips), sync: = diffusers, and each rank's ControlNet ran
    its guidance branch's half of the batch (1 of the CFG batch's 2), as the denoiser does; in guess
    mode the pipeline gives the ControlNet the conditional batch alone, which every rank runs.
    SD3's pipeline batches its branches as SD's does (it has no guess mode)."""
    from support.diffusers_cases import controlnet_kwargs

    kwargs_of = (lambda: {**controlnet_kwargs(family), **({"guess_mode": True} if guess else {})})
    batches = []

    def call(par):
        first = next(m for m in par.pipe.controlnet.modules() if isinstance(m, torch.nn.Conv2d))   # on the sample
        first.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
        return images(par(**kwargs_of()))
    ref = images(fresh(root, family)(**kwargs_of()))
    outs = emulate_pipeline(fresh(root, family), 4, call, mode="sync", cfg_parallel=True)
    assert ref.abs().max() > 0.1 and rel(outs[0][0], ref) <= 1e-5
    assert batches and set(batches) == {1}


@pytest.mark.parametrize("family", ["flux-controlnet", "flux-f8-controlnet"])
def test_flux_controlnet_with_cfg_parallel_without_true_cfg_is_refused_before_compute(root, family):
    """FluxControlNetPipeline with cfg_parallel but without true CFG (no guidance branches to split):
    refused at the pipeline call. Both ControlNets: on latent tokens, and XLabs-style
    (input_hint_block). (With true CFG: tests/diffusers/test_denoiser_streams.py.)"""
    from support.diffusers_cases import controlnet_kwargs

    # without true CFG, Flux has no guidance branches (its guidance_scale is distilled guidance)
    ranks_raise(r"cfg_parallel splits the two guidance branches across ranks; it needs guidance_scale > 1 \(Flux, "
                r"Qwen-Image: true_cfg_scale > 1 and a negative prompt\)", fresh(root, family), 4,
                lambda p: p(**controlnet_kwargs(family)), cfg_parallel=True)


def test_controlnet_whose_conditioning_cannot_be_split_is_refused(root):
    """Sana's ControlNet (its conditioning through its own patch embedding and an input block) is
    none of the conditionings parafuse cuts to a strip: refused at parallelize, naming those it splits."""
    from types import SimpleNamespace

    from diffusers import SanaControlNetModel

    from support.diffusers_cases import TEXT_DIM

    torch.manual_seed(0)
    net = SanaControlNetModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                              num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                              caption_channels=TEXT_DIM, sample_size=16)
    pipe = SimpleNamespace(transformer=fresh(root, "sd3").transformer, controlnet=net)
    ranks_raise(r"SanaControlNetModel's conditioning is neither an image through a controlnet_cond_embedding "
                r"\(ControlNetModel\) or an input_hint_block \(Flux's XLabs-style ControlNet\) nor a latent of the "
                r"sample's grid \(Flux's other ControlNets, SD3's\)", pipe, 2, lambda p: None, mode="sync")


def test_flux_hint_controlnet_samples_are_diffusers_at_the_strips_tokens(root):
    """Flux's XLabs-style ControlNet (its input_hint_block embeds the control image's pixels by
    three stride-2 convs; diffusers packs the output 2 x 2 into tokens), sync, N = 3 (uneven strips:
    4, 3, 3 token rows of 10): at every step each rank's ControlNet returns exactly diffusers'
    whole-image samples at its strip's tokens - its image rows, the halo covering the convs' reach
    and the crop are the strip's."""
    from support.diffusers_cases import controlnet_kwargs

    family = "flux-f8-controlnet"
    plain, whole = fresh(root, family), []
    plain.controlnet.register_forward_hook(lambda m, a, out: whole.append(out))
    images(plain(**controlnet_kwargs(family)))

    def call(par):
        net, samples = par.controlnets[0], []
        par.pipe.controlnet.register_forward_hook(lambda m, a, out: None if net.tracing else samples.append(out))
        images(par(**controlnet_kwargs(family)))
        return samples, net.geometry, par.layout.patch_index
    outs = emulate_pipeline(fresh(root, family), 3, call, mode="sync")
    assert outs[0][0][1].rows == (4, 3, 3)
    for (samples, geometry, i), _ in outs:
        a, b = (row * geometry.width for row in geometry.row_range(i))       # the strip's tokens
        assert len(samples) == len(whole) == 3
        for got, want in zip(samples, whole):
            for g, w in zip(got[0] + got[1], want[0] + want[1]):
                assert g.shape == w[:, a:b].shape and rel(g, w[:, a:b]) <= 1e-6


def sd3_multi(p):
    """SD3's tiny ControlNet pipeline with two ControlNets (an SD3MultiControlNetModel): its own and
    a copy with its weights scaled by 0.8."""
    from diffusers import StableDiffusion3ControlNetPipeline

    second = copy.deepcopy(p.controlnet)
    with torch.no_grad():
        for q in second.parameters():
            q.mul_(0.8)
    return StableDiffusion3ControlNetPipeline(**{**p.components, "controlnet": [p.controlnet, second]})


@pytest.mark.parametrize("family,n,multi", [("sd3-controlnet", 2, False), ("sd3-controlnet", 3, False),
                                            ("sd35-controlnet", 3, False), ("sd3-controlnet", 2, True)])
def test_sd3_controlnet_sync_equals_diffusers_and_its_samples_are_the_strips(root, family, n, multi):
    """SD3's ControlNet (a position embedding of its own, joint attention with the text) and the
    SD3.5 8B ControlNets' layout (the transformer's position embedding, self-attention blocks), sync,
    N = 2 and 3 (uneven strips: 7, 7, 6 patch rows); two SD3 ControlNets (SD3MultiControlNetModel),
    N = 2: = diffusers, the control image changes the output, and at every step each rank's
    ControlNet returns diffusers' whole-image block samples at its strip's tokens (its control latent
    and position embedding were the strip's rows of the whole image's)."""
    from support.diffusers_cases import control_image, controlnet_kwargs

    def kwargs_of(seed=3):
        if not multi:
            return {**controlnet_kwargs(family), "control_image": control_image(seed)}
        return {**controlnet_kwargs(family), "control_image": [control_image(seed), control_image(seed + 1)],
                "controlnet_conditioning_scale": [1.0, 0.5]}
    plain, whole = fresh(root, family), []
    plain = sd3_multi(plain) if multi else plain
    plain.controlnet.register_forward_hook(lambda m, a, out: whole.append(out[0]))
    ref = images(plain(**kwargs_of()))
    samples = whole[:]
    assert rel(images(plain(**kwargs_of(seed=9))), ref) > 1e-2          # the control image shapes the output
    patch = plain.transformer.config.patch_size

    def call(par):
        got = []
        par.pipe.controlnet.register_forward_hook(
            lambda m, a, out: None if any(c.tracing for c in par.controlnets) else got.append(out[0]))
        return images(par(**kwargs_of())), got, par.controlnets[0].geometry, par.layout.patch_index
    outs = emulate_pipeline(plain, n, call, mode="sync")
    assert rel(outs[0][0][0], ref) <= 1e-5
    assert n == 2 or outs[0][0][2].rows == (14, 14, 12)
    for (_, got, geometry, i), _ in outs:
        a, b = (row // patch * geometry.width // patch for row in geometry.row_range(i))     # the strip's tokens
        assert len(got) == len(samples) == 3
        for step, want in zip(got, samples):
            for g, w in zip(step, want):
                assert g.shape == w[:, a:b].shape and rel(g, w[:, a:b]) <= 1e-5


def test_multi_controlnet_and_img2img_tile_upscale(root):
    """Two ControlNets (a MultiControlNetModel), and the ControlNet img2img pipeline upscaling a
    small image to 4x its size, the upscaled image also the conditioning (ControlNet-tile's habit)."""
    import torch.nn.functional as F
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline
    from support.diffusers_cases import HEIGHT, WIDTH, control_image, controlnet_kwargs

    def multi(p):
        second = copy.deepcopy(p.controlnet)
        with torch.no_grad():
            for q in second.parameters():
                q.mul_(0.8)
        return StableDiffusionControlNetPipeline(**{**p.components, "controlnet": [p.controlnet, second]})

    def multi_kwargs():
        return {**controlnet_kwargs("sd-controlnet"), "image": [control_image(3), control_image(4)]}
    outs, ref = controlnet_run(root, "sd-controlnet", 2, multi_kwargs, multi, mode="sync")
    assert rel(outs[0][0], ref) <= 1e-5

    small = control_image(5, HEIGHT // 4, WIDTH // 4)
    big = F.interpolate(small, size=(HEIGHT, WIDTH), mode="bilinear")

    def tile_kwargs():
        return {**controlnet_kwargs("sd-controlnet"), "image": big, "control_image": big, "strength": 0.7}
    outs, ref = controlnet_run(root, "sd-controlnet", 2, tile_kwargs,
                               lambda p: StableDiffusionControlNetImg2ImgPipeline(**p.components), mode="sync")
    assert rel(outs[0][0], ref) <= 1e-5


def psnr(a, b):
    return (10 * torch.log10((b.max() - b.min()) ** 2 / ((a - b) ** 2).mean())).item()


@pytest.mark.parametrize("family", ["sd-controlnet", "flux-controlnet", "flux-f8-controlnet", "sd3-controlnet",
                                    "sd-adapter", "sdxl-adapter"])
@pytest.mark.parametrize("mode", ["full", "partial"])
def test_controlnet_stale_modes_within_3db_of_the_pipeline_without_it(root, mode, family):
    """A ControlNet's or T2I-Adapter's stale modes (N = 2) against the same pipeline's sync output:
    within 3 dB of what the pipeline without it loses in the same mode (the ControlNet's base
    pipeline; the adapter's own U-Net with its features scaled to zero: SDXL's adapter family has
    a U-Net of its own)."""
    from support.diffusers_cases import controlnet_kwargs

    settings = dict(mode=mode, warmup_steps=1, **({"halo_portion": 0.3} if mode == "partial" else {}))
    outs, ref = controlnet_run(root, family, 2, **settings)
    if family.endswith("-adapter"):
        off = lambda: {**controlnet_kwargs(family), "adapter_conditioning_scale": 0.0}    # noqa: E731
        plain_outs, plain_ref = controlnet_run(root, family, 2, kwargs_of=off, **settings)
    else:
        base = family.removesuffix("-controlnet")
        plain_outs = emulate_pipeline(fresh(root, base), 2, lambda p: images(p(**call_kwargs(base))), **settings)
        plain_ref = sync_ref(root, base)
    with_net, without = psnr(outs[0][0], ref), psnr(plain_outs[0][0], plain_ref)
    assert with_net >= without - 3, (with_net, without)


@pytest.mark.parametrize("family,scale", [("sd-controlnet", "controlnet_conditioning_scale"),
                                          ("flux-f8-controlnet", "controlnet_conditioning_scale"),
                                          ("sd3-controlnet", "controlnet_conditioning_scale"),
                                          ("sd-adapter", "adapter_conditioning_scale"),
                                          ("sdxl-adapter", "adapter_conditioning_scale")])
def test_controlnet_residuals_enter_the_graphs_static_buffers(root, family, scale):
    """Graphed (a replay reruns the captured region on its static inputs) equals eager across two
    calls with different conditioning images: the residuals - a ControlNet's strips, a T2I-Adapter's
    whole-image features cut to the strip - were copied into the static buffers."""
    from support.diffusers_cases import control_image, controlnet_kwargs

    from parafuse.graphs import rerun_capture

    def call(graphed):
        def run(par):
            if graphed:
                par.strips.graphed, par.session.capture = True, rerun_capture
            first = images(par(**controlnet_kwargs(family)))
            second = images(par(**{**controlnet_kwargs(family), control_key(family): control_image(9), scale: 20.0}))
            return first, second, par.strips.captures
        return run
    pipe = fresh(root, family)
    (e1, e2, _), _ = emulate_pipeline(pipe, 2, call(False), mode="full", warmup_steps=1)[0]
    (g1, g2, captures), _ = emulate_pipeline(pipe, 2, call(True), mode="full", warmup_steps=1)[0]
    assert captures >= 1 and rel(e1, e2) > 1e-2
    assert rel(g1, e1) <= 1e-6 and rel(g2, e2) <= 1e-6


@pytest.mark.torchrun
def test_controlnet_under_torchrun(root, tmp_path):
    """N = 2 under torchrun (gloo): sync equals diffusers, full equals the emulator, bytes included,
    for a ControlNet and a T2I-Adapter; a call whose guidance_scale differs on rank 1 is refused on
    both ranks over gloo (item 4), and the same pipeline's next, equal call is full's image."""
    from support.diffusers_cases import NAMED_TORCHRUN_CASES, controlnet_kwargs
    from test_diffusers import launch_torchrun

    got = launch_torchrun(root, tmp_path, 2, ["sd-controlnet-sync", "sd-controlnet-full", "sd-controlnet-disagree",
                                              "sd-adapter-full"])
    ref = images(fresh(root, "sd-controlnet")(**controlnet_kwargs("sd-controlnet")))
    assert rel(got["sd-controlnet-sync"][0]["images"], ref) <= 1e-5
    assert torch.equal(got["sd-controlnet-sync"][1]["images"], got["sd-controlnet-sync"][0]["images"])
    for case in ("sd-controlnet-full", "sd-adapter-full"):
        family, settings = NAMED_TORCHRUN_CASES[case]
        emu = emulate_pipeline(fresh(root, family), 2, lambda p: images(p(**controlnet_kwargs(family))), **settings)
        assert (got[case][0]["images"] - emu[0][0]).abs().max() <= 1e-5
        for r in range(2):
            assert got[case][r]["rank_stats"]["bytes_sent"] == emu[r][1]["bytes_sent"]
    refusals = [got["sd-controlnet-disagree"][r]["refusal"] for r in range(2)]
    assert refusals[0] == refusals[1] == ("ranks disagree on the pipeline call's arguments: guidance_scale (rank 0 "
                                          "vs rank 1): start every rank with the same values")
    assert torch.equal(got["sd-controlnet-disagree"][0]["images"], got["sd-controlnet-full"][0]["images"])


# ---- item 4: the same call on every rank, checked ------------------------------------------------
def _perturbed(name):
    from support.diffusers_cases import control_image

    def change(kw):
        if name == "generator":
            kw["generator"] = torch.Generator().manual_seed(1)
        elif name == "prompt_embeds":
            kw["prompt_embeds"] = kw["prompt_embeds"].clone()
            kw["prompt_embeds"][0, 0, 0] += 1e-3
        elif name == "num_inference_steps":
            kw["num_inference_steps"] += 1
        elif name == "height":
            kw["height"] -= 16
        elif name == "guidance_scale":
            kw["guidance_scale"] += 0.5
        elif name == "image":
            kw["image"] = control_image(11)
        elif name == "controlnet_conditioning_scale":
            kw["controlnet_conditioning_scale"] = 0.5
        elif name == "cross_attention_kwargs":
            kw["cross_attention_kwargs"] = {"scale": 0.5}
        elif name == "latents":
            kw["latents"] = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(rank_one_seed))
        return kw
    return change


rank_one_seed = 7


@pytest.mark.parametrize("name", ["generator", "prompt_embeds", "num_inference_steps", "height", "guidance_scale",
                                  "image", "controlnet_conditioning_scale", "cross_attention_kwargs", "latents"])
def test_an_argument_differing_on_one_rank_is_refused_on_every_rank(root, name):
    from support.diffusers_cases import controlnet_kwargs

    from parafuse.parallel.agreement import DisagreementError

    def call(par):
        kw = controlnet_kwargs("sd-controlnet")
        if name == "latents":
            kw["latents"] = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(3))
        if name == "cross_attention_kwargs":
            kw["cross_attention_kwargs"] = {"scale": 1.0}
        if par.layout.rank == 1:
            kw = _perturbed(name)(kw)
        try:
            par(**kw)
        except DisagreementError as e:
            return str(e), par.strips.evaluations
    outs = emulate_pipeline(fresh(root, "sd-controlnet"), 3, call, mode="sync")
    for (message, evaluations), _ in outs:
        assert f"{name} (ranks 0, 2 vs rank 1)" in message and "\n" not in message
        assert evaluations == 0                        # refused before any denoising


@pytest.mark.parametrize("family,n,settings", [("sd", 3, {}), ("sdxl", 4, {"cfg_parallel": True}),
                                              ("pixart", 2, {})])
def test_several_images_per_prompt_equal_diffusers(root, family, n, settings):
    """num_images_per_prompt = 2: a batch of two images (with CFG, four rows the guidance branches
    split) = diffusers' batch, image by image."""
    kwargs = lambda: {**call_kwargs(family), "num_images_per_prompt": 2}      # noqa: E731 (a fresh generator)
    ref = images(fresh(root, family)(**kwargs()))
    out = emulate_pipeline(fresh(root, family), n, lambda p: images(p(**kwargs())), mode="sync", **settings)[0][0]
    assert out.shape[0] == 2 and out.shape == ref.shape
    assert all(rel(out[i], ref[i]) <= 1e-5 for i in range(2))
    assert rel(out[0], out[1]) > 1e-2                # two different images, not one repeated


def test_generator_none_gets_rank_zero_seed_on_every_rank(root):
    def call(par):
        torch.manual_seed(100 + par.layout.rank)        # every rank's global RNG differs
        kw = call_kwargs("sd")
        del kw["generator"]
        return images(par(**kw)), par.seed
    outs = emulate_pipeline(fresh(root, "sd"), 2, call, mode="sync")
    (out, seed), _ = outs[0]
    assert all(s == seed for (_, s), _ in outs)
    ref = images(fresh(root, "sd")(**{**call_kwargs("sd"), "generator": torch.Generator().manual_seed(seed)}))
    assert (out - ref).abs().max() <= SYNC_TOL


# ---- T2I-Adapters, and residuals of the whole image ---------------------------------------------
@pytest.mark.parametrize("family,n,cfg", [("sd-adapter", 2, False), ("sd-adapter", 3, False), ("sdxl-adapter", 2, False),
                                          ("sdxl-adapter", 3, False), ("sdxl-adapter", 4, True)])
def test_t2i_adapter_sync_equals_diffusers(root, family, n, cfg):
    """StableDiffusion(XL)AdapterPipeline: the adapter runs whole on every rank, once per image; its
    features (down_intrablock_additional_residuals, whole-image) reach each strip cut to the strip's
    rows at their level (SDXL's: after a down block without attention, inside two with, and on the
    mid block's output), and with cfg_parallel (N = 4: 2 branches x 2 strips) halved to the rank's
    guidance branch. sync = diffusers; the conditioning image shapes the output."""
    from support.diffusers_cases import control_image, controlnet_kwargs

    def call(par):
        seen = []               # what the U-Net's forward gets: after parafuse's hook (registered first)

        def see(module, args, kwargs):
            if kwargs["down_intrablock_additional_residuals"] is not None:     # not the shape trace
                seen.append((args[0].shape, [r.shape for r in kwargs["down_intrablock_additional_residuals"]]))
        par.pipe.unet.register_forward_pre_hook(see, with_kwargs=True)
        out = images(par(**controlnet_kwargs(family)))
        return out, seen, par.strips.geometry, par.layout.patch_index
    ref = images(fresh(root, family)(**controlnet_kwargs(family)))
    outs = emulate_pipeline(fresh(root, family), n, call, mode="sync", cfg_parallel=cfg)
    assert ref.abs().max() > 0.1 and rel(outs[0][0][0], ref) <= 1e-5
    other = images(fresh(root, family)(**{**controlnet_kwargs(family), "image": control_image(9)}))
    assert rel(other, ref) > 1e-2                 # the adapter's features shape the output
    for (_, seen, geometry, i), _ in outs:
        assert len(seen) == 3                     # one evaluation a step
        for sample, residuals in seen:
            assert sample[0] == (1 if cfg else 2) and len(residuals) == (4 if family == "sdxl-adapter" else 2)
            for r in residuals:
                assert r[0] == sample[0] and r[-2] == geometry.level_of_width(r[-1]).rows[i]


def test_multi_adapter_sync_equals_diffusers(root):
    """A MultiAdapter (two T2I-Adapters, two conditioning images, two scales; their features summed
    whole on every rank, then cut to the strip by the one rule), N = 3: sync = diffusers, and each
    adapter shapes the output."""
    import copy

    from diffusers import MultiAdapter
    from support.diffusers_cases import control_image, controlnet_kwargs

    def with_two(pipe):
        second = copy.deepcopy(pipe.adapter)
        with torch.no_grad():
            for p in second.parameters():
                p.mul_(-0.5)                  # another adapter: its features point elsewhere
        pipe.adapter = MultiAdapter([pipe.adapter, second])
        return pipe

    def kwargs(second_image=9):
        return {**controlnet_kwargs("sd-adapter"), "image": [control_image(3), control_image(second_image)],
                "adapter_conditioning_scale": [1.0, 0.7]}
    ref = images(with_two(fresh(root, "sd-adapter"))(**kwargs()))
    assert rel(images(fresh(root, "sd-adapter")(**controlnet_kwargs("sd-adapter"))), ref) > 1e-2
    assert rel(images(with_two(fresh(root, "sd-adapter"))(**kwargs(second_image=10))), ref) > 1e-2
    out = emulate_pipeline(with_two(fresh(root, "sd-adapter")), 3, lambda p: images(p(**kwargs())), mode="sync")
    assert rel(out[0][0], ref) <= 1e-5


def _whole_image_controlnet_call(plain, seed=5):
    """The SD U-Net's arguments with a plain ControlNet's residuals of the whole image (a user's
    own loop)."""
    from support.diffusers_cases import controlnet_kwargs

    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 40, 24, generator=g), torch.randn(2, 5, 16, generator=g)
    cond = controlnet_kwargs("sd-controlnet")["image"].repeat(2, 1, 1, 1)
    with torch.no_grad():
        down, mid = plain.controlnet(x, 500, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
    return (x, 500), dict(encoder_hidden_states=ctx, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)


@pytest.mark.parametrize("passed", ["by keyword", "by position"])
def test_whole_image_controlnet_residuals_equal_the_plain_unet(root, passed):
    """Residuals the user computed with a plain ControlNet, handed to the parallel U-Net's direct
    call (N = 3, uneven strips) by keyword, or by position with every argument before them:
    cut to each strip, = the plain U-Net's output on every rank."""
    plain = fresh(root, "sd-controlnet")
    args, kwargs = _whole_image_controlnet_call(plain)
    with torch.no_grad():
        ref = plain.unet(*args, **kwargs).sample
        assert rel(plain.unet(*args, encoder_hidden_states=kwargs["encoder_hidden_states"]).sample, ref) > 1e-2
    if passed == "by position":   # sample, timestep, text, class labels, timestep cond, mask, cross-attention
        # kwargs, added conds, then the residuals
        args, kwargs = args + (kwargs["encoder_hidden_states"], None, None, None, None, None,
                               kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]), {}

    def call(par):
        with torch.no_grad():
            return par.unet(*args, **kwargs).sample
    outs = emulate_pipeline(plain, 3, call, mode="sync")
    assert all(rel(out, ref) <= 1e-5 for out, _ in outs)


def test_whole_image_flux_controlnet_samples_equal_the_plain_transformer(root):
    """Flux's ControlNet samples (token sequences of the latent grid) of the whole image, handed to
    the parallel transformer's direct call: cut to each strip's tokens, = the plain transformer."""
    plain = fresh(root, "flux-controlnet")
    g = torch.Generator().manual_seed(6)
    h, w = 40 // 2, 24 // 2                    # the packed latent's grid (2x2 patches)
    x, cond = torch.randn(1, h * w, 16, generator=g), torch.randn(1, h * w, 16, generator=g)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij"), -1)
    common = dict(timestep=torch.tensor([0.5]), encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), img_ids=ids.reshape(-1, 3),
                  txt_ids=torch.zeros(5, 3), return_dict=False)
    if plain.transformer.config.guidance_embeds:
        common["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        blocks, single = plain.controlnet(hidden_states=x, controlnet_cond=cond, **common)
    direct_call_equals_the_plain_transformer(plain, dict(hidden_states=x, **common), controlnet_block_samples=blocks,
                                             controlnet_single_block_samples=single)


def test_whole_image_sd3_controlnet_samples_equal_the_plain_transformer(root):
    """SD3's ControlNet samples of the whole image (token sequences of the patch grid, at half the
    latent's rows) handed to the parallel transformer's direct call: cut to each strip's patch
    tokens, = the plain transformer."""
    plain = fresh(root, "sd3-controlnet")
    g = torch.Generator().manual_seed(6)
    x, cond = torch.randn(1, 4, 40, 24, generator=g), torch.randn(1, 4, 40, 24, generator=g)
    common = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), return_dict=False)
    with torch.no_grad():
        samples = plain.controlnet(hidden_states=x, controlnet_cond=cond, **common)[0]
    direct_call_equals_the_plain_transformer(plain, dict(hidden_states=x, **common),
                                             block_controlnet_hidden_states=samples)


def direct_call_equals_the_plain_transformer(plain, call_kwargs: dict, **samples):
    """The ControlNet's whole-image `samples` change the plain transformer's output, and the parallel
    transformer's direct call with them (N = 3, sync) equals the plain one's on every rank."""
    with torch.no_grad():
        ref = plain.transformer(**call_kwargs, **samples)[0]
        assert rel(plain.transformer(**call_kwargs)[0], ref) > 1e-2

    def call(par):
        with torch.no_grad():
            return par.transformer(**call_kwargs, **samples)[0]
    outs = emulate_pipeline(plain, 3, call, mode="sync")
    assert all(rel(out, ref) <= 1e-5 for out, _ in outs)


@pytest.mark.parametrize("wrong", ["height", "width", "tokens"])
def test_residual_of_a_wrong_size_is_refused_before_compute(root, wrong):
    """A residual neither the whole image's height at its level nor the strip's (one of a smaller
    image), of a width that is no level of the latent, or flattened to tokens for a U-Net (whose
    attention runs at several levels, so no one grid names them): refused on every rank with one
    line that names it, before the evaluation."""
    plain = fresh(root, "sd-controlnet")
    args, kwargs = _whole_image_controlnet_call(plain)
    down = list(kwargs["down_block_additional_residuals"])
    down[1] = {"height": down[1][:, :, :-4], "width": down[1][:, :, :, :-4],
               "tokens": down[1].flatten(2).transpose(1, 2)}[wrong]
    kwargs = {**kwargs, "down_block_additional_residuals": tuple(down)}

    def call(par):
        try:
            with torch.no_grad():
                par.unet(*args, **kwargs)
        except UnsupportedModelError as e:
            return str(e), par.strips.evaluations
    outs = emulate_pipeline(plain, 2, call, mode="sync")
    for (message, evaluations), _ in outs:
        assert message.startswith("down_block_additional_residuals[1] is (2, ") and "\n" not in message
        assert {"height": "neither the whole image's 40 nor strip", "width": "is no level of the 40x24",
                "tokens": "a token sequence, but UNet2DConditionModel's attention runs at several levels"}[wrong] \
            in message
        assert evaluations == 0


# ---- FreeU (`enable_freeu`): the skip features' low frequencies of the whole image ----------------
FILTER_TOL = 2e-6           # float32, inputs ~N(0, 1): diffusers' FFT and the strips' sums round differently


@pytest.mark.parametrize("height", [1, 2, 3, 8, 13])
@pytest.mark.parametrize("width", [1, 2, 5, 12])
def test_freeu_filter_equals_diffusers_fourier_filter(height, width):
    """parafuse's FreeU filter (the box's few Fourier coefficients, no FFT) = diffusers'
    fourier_filter(threshold=1) on random float32 images, odd and even sizes, H and W = 1 and 2
    (where the box's slice keeps one frequency, or both); and cut into uneven strips, each
    strip's rows filtered from the coefficients summed over the strips = the whole image's."""
    from diffusers.utils.torch_utils import fourier_filter as diffusers_filter

    from parafuse.diffusers.freeu import box_coefficients, filtered_rows, fourier_filter

    g = torch.Generator().manual_seed(height * 100 + width)
    x = torch.randn(2, 3, height, width, generator=g)
    cuts = sorted({0, height // 3, (height + 1) // 2, height})         # H = 13: strips of 4, 3, 6 rows
    for scale in (0.2, 0.9, 1.4):
        want = diffusers_filter(x, threshold=1, scale=scale)
        torch.testing.assert_close(fourier_filter(x, scale), want, rtol=0, atol=FILTER_TOL)
        spans = list(zip(cuts, cuts[1:]))
        whole = sum(box_coefficients(x[:, :, a:b], a, height) for a, b in spans)
        strips = torch.cat([filtered_rows(x[:, :, a:b], whole, scale, a, height) for a, b in spans], 2)
        torch.testing.assert_close(strips, want, rtol=0, atol=FILTER_TOL)
    assert (want - x).abs().max() > 1e-2                  # the filter does filter


def freeu_coefficients(pipe, kwargs) -> tuple[torch.Tensor, int]:
    """`pipe(**kwargs)`'s images and how many box coefficients its FreeU takes of the whole image:
    per call of an up block of resolution_idx 0 or 1, per skip feature [B, C, h, w] it gets,
    B * C * min(h, 2) * min(w, 2) (frequencies 0 and -1 of each axis)."""
    count = [0]

    def see(block, args, kw):
        if block.resolution_idx in (0, 1):
            count[0] += sum(s.shape[0] * s.shape[1] * min(s.shape[2], 2) * min(s.shape[3], 2)
                            for s in kw["res_hidden_states_tuple"])
    handles = [b.register_forward_pre_hook(see, with_kwargs=True) for b in pipe.unet.up_blocks]
    out = images(pipe(**kwargs))
    for h in handles:
        h.remove()
    return out, count[0]


def with_freeu(pipe, family):
    pipe.enable_freeu(**FREEU[family])
    return pipe


@pytest.mark.parametrize("family,n,cfg", [("sd", 2, False), ("sd", 3, False), ("sdxl", 2, False), ("sdxl", 3, False),
                                          ("sdxl", 4, True), ("sdxl", 2, True)])
def test_freeu_sync_equals_diffusers(root, family, n, cfg):
    """FreeU enabled before parallelize, sync, N = 2 and 3 (uneven strips), SDXL with cfg_parallel
    (N = 4: 2 branches x 2 strips; N = 2: each branch's whole image on one rank, diffusers' own
    FreeU): = diffusers with FreeU, which changes the image. The coefficients' reduction is counted
    under `reduce`: each strip sends its share of every coefficient (complex64) to each other strip
    of its patch group, every evaluation, for its guidance branch's batch."""
    ref, coefficients = freeu_coefficients(with_freeu(fresh(root, family), family), call_kwargs(family))
    assert rel(ref, sync_ref(root, family)) > 0.1                  # FreeU changes the image
    outs = emulate_pipeline(with_freeu(fresh(root, family), family), n, lambda p: images(p(**call_kwargs(family))),
                            mode="sync", cfg_parallel=cfg)
    assert rel(outs[0][0], ref) <= 1e-5
    strips, branches = (n // 2, 2) if cfg else (n, 1)
    for _, stats in outs:
        assert stats["bytes_sent"]["reduce"] == stats["bytes_received"]["reduce"] == \
            coefficients // branches * 8 * (strips - 1)


def test_freeu_enabled_after_parallelize_and_disabled_between_calls(root):
    """`enable_freeu` on the parallel pipeline (diffusers' method, setting the U-Net's up blocks)
    after a plain call, then `disable_freeu()`, SD N = 3: = diffusers' plain image, its FreeU
    image, and the plain image again, with no `reduce` bytes without FreeU."""
    def call(par):
        got = [images(par(**call_kwargs("sd")))]
        par.enable_freeu(**FREEU["sd"])
        got.append(images(par(**call_kwargs("sd"))))
        reduced = par.rank_stats["bytes_sent"]["reduce"]
        par.disable_freeu()
        got.append(images(par(**call_kwargs("sd"))))
        return got, reduced, par.rank_stats["bytes_sent"]["reduce"]
    freeu = images(with_freeu(fresh(root, "sd"), "sd")(**call_kwargs("sd")))
    outs = emulate_pipeline(fresh(root, "sd"), 3, call, mode="sync")
    (plain, on, off), _, _ = outs[0][0]
    assert rel(plain, sync_ref(root, "sd")) <= 1e-5 and rel(off, sync_ref(root, "sd")) <= 1e-5
    assert rel(on, freeu) <= 1e-5 and rel(freeu, sync_ref(root, "sd")) > 0.1
    assert all(reduced > 0 and after == 0 for (_, reduced, after), _ in outs)


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_freeu_stale_modes_within_3db_of_the_pipeline_without_it(root, mode):
    """FreeU's reduction is exact in the stale modes too (waited for at each up block); what they
    lose - stale K/V, halos and GroupNorm statistics - stays within 3 dB of the same mode without
    FreeU (SD, N = 2), each against its own diffusers output."""
    settings = dict(mode=mode, warmup_steps=1, **({"halo_portion": 0.3} if mode == "partial" else {}))
    ref = images(with_freeu(fresh(root, "sd"), "sd")(**call_kwargs("sd")))
    run = emulate_pipeline(with_freeu(fresh(root, "sd"), "sd"), 2, lambda p: images(p(**call_kwargs("sd"))),
                           **settings)
    plain = emulate_pipeline(fresh(root, "sd"), 2, lambda p: images(p(**call_kwargs("sd"))), **settings)
    with_freeu_db, without = psnr(run[0][0], ref), psnr(plain[0][0], sync_ref(root, "sd"))
    assert with_freeu_db >= without - 3, (with_freeu_db, without)
    assert run[0][1]["bytes_sent"]["reduce"] > 0


def test_freeu_scales_are_held_by_the_graphs(root):
    """CUDA graphs (replay = rerun on static inputs), SD N = 2, full: graphed = eager across FreeU
    on, other scales and FreeU off; a graph holds the scales it was captured with (Python numbers),
    so each change drops the graphs and captures new ones."""
    from parafuse.graphs import rerun_capture

    other = dict(s1=0.5, s2=0.7, b1=1.2, b2=1.3)

    def call(graphed):
        def run(par):
            if graphed:
                par.strips.graphed, par.session.capture = True, rerun_capture
            got, fresh_graphs = [images(par(**call_kwargs("sd")))], []
            for change in (lambda: par.enable_freeu(**other), par.disable_freeu):
                old = list(par.strips._graphs.values())
                change()
                got.append(images(par(**call_kwargs("sd"))))
                fresh_graphs.append(bool(old) and not any(g is o for g in par.strips._graphs.values() for o in old))
            return got, par.strips.captures, fresh_graphs
        return run
    pipe = with_freeu(fresh(root, "sd"), "sd")
    (eager, _, _), _ = emulate_pipeline(pipe, 2, call(False), mode="full", warmup_steps=1)[0]
    (graphed, captures, fresh_graphs), _ = emulate_pipeline(pipe, 2, call(True), mode="full", warmup_steps=1)[0]
    assert captures >= 1 and all(fresh_graphs)
    assert rel(eager[0], eager[1]) > 1e-2 and rel(eager[1], eager[2]) > 1e-2
    for e, g in zip(eager, graphed):
        assert torch.equal(e, g)


# ---- image-conditioned pipelines: img2img (the hi-res upscale's second pass), inpainting, Fill ---------
IMAGE_FAMILIES = ["sd-img2img", "sd-inpaint", "sdxl-img2img", "sdxl-inpaint", "flux-img2img", "flux-inpaint",
                  "flux-fill"]


def denoiser_calls(pipe) -> list:
    """The plain pipeline's denoiser evaluations, one entry each."""
    calls = []
    (getattr(pipe, "unet", None) or pipe.transformer).register_forward_hook(lambda m, a, out: calls.append(1))
    return calls


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_image_conditioned_sync_equals_diffusers(root, family, n):
    """Img2img (strength 0.5: its partial schedule), inpainting (SD's and SDXL's 9-channel U-Nets: the
    mask and the masked image's latent concatenated to the sample; Flux's by blending latents) and
    Flux Fill (mask and image latents concatenated on the packed tokens' channels): all row-local,
    so sync = diffusers at N = 2 and 3 (uneven strips), evaluation for evaluation; the image and
    the mask change the output."""
    from support.diffusers_cases import STEPS, image_kwargs

    plain = fresh(root, family)
    calls = denoiser_calls(plain)
    ref = images(plain(**image_kwargs(family)))
    outs = emulate_pipeline(fresh(root, family), n, lambda p: (images(p(**image_kwargs(family))), p.strips.evaluations),
                            mode="sync")
    assert ref.abs().max() > 0.1 and rel(outs[0][0][0], ref) <= 1e-5
    assert all(evaluations == len(calls) for (_, evaluations), _ in outs)
    if family.endswith("img2img"):
        assert 0 < len(calls) < STEPS          # strength < 1: the schedule's tail only
    assert rel(images(fresh(root, family)(**image_kwargs(family, image_seed=9))), ref) > 1e-3
    if "img2img" not in family:
        assert rel(images(fresh(root, family)(**image_kwargs(family, mask_seed=10))), ref) > 1e-3


_stale_quality = {}


def stale_quality(root, family, settings: dict, kwargs_of) -> float:
    """PSNR (dB) of the family's call `kwargs_of()`, N = 2 with `settings` (a stale mode), against
    diffusers' own output; kept for the other tests of the module."""
    key = (family, tuple(sorted(settings.items())))
    if key not in _stale_quality:
        ref = images(fresh(root, family)(**kwargs_of()))
        out = emulate_pipeline(fresh(root, family), 2, lambda p: images(p(**kwargs_of())), **settings)[0][0]
        _stale_quality[key] = psnr(out, ref)
    return _stale_quality[key]


@pytest.mark.parametrize("family", ["sd-img2img", "sd-inpaint"])
@pytest.mark.parametrize("mode", ["full", "partial"])
def test_image_conditioned_stale_modes_within_3db_of_text_to_image(root, family, mode):
    """Img2img (the VAE encoder by strips; strength 0.5 of 6 steps: 3 evaluations, 2 of them stale)
    and inpainting (SD's 9-channel U-Net, a box mask across the strips), N = 2: within 3 dB of the
    same mode's text-to-image quality (SD's pipeline, 3 steps), each against its own diffusers
    output. The reference runs through none of the image's path (the encoder, the start latent, the
    9-channel input), so a stale step that loses or misplaces the image there fails the test: with
    the mask and masked-image channels zeroed, or shifted 6 rows, on stale steps, inpainting fell to
    29.4 and 28.6 dB (full). (The same call with nothing of the image - a flat image, the whole
    image masked - takes the same path and lost as much: as a reference it saw neither.) Measured
    here, full / partial: img2img 46.9 / 46.8 dB, inpainting 41.0 / 40.8, text to image 43.0 / 42.9."""
    from support.diffusers_cases import image_kwargs

    settings = dict(mode=mode, warmup_steps=1, **({"halo_portion": 0.3} if mode == "partial" else {}))
    steps = {"num_inference_steps": 6} if family == "sd-img2img" else {}
    with_image = stale_quality(root, family, settings, lambda: {**image_kwargs(family), **steps})
    text_to_image = stale_quality(root, "sd", settings, lambda: call_kwargs("sd"))
    assert with_image >= text_to_image - 3, (with_image, text_to_image)


def test_sdxl_refiner_handoff_equals_diffusers(root):
    """SDXL base to refiner (`denoising_end` / `denoising_start` at 0.5 of 4 steps; the refiner's
    aesthetic-score time ids), both parallel, N = 3: each = diffusers. The base's latent output
    comes back on every rank, the same bits as rank 0's, so each rank's refiner is given its own
    rank's latents - no broadcast."""
    from support.diffusers_cases import base_kwargs, refiner_kwargs

    n = 3
    plain_latents = images(fresh(root, "sdxl")(**base_kwargs()))
    ref = images(fresh(root, "sdxl-refiner")(**refiner_kwargs(plain_latents)))
    base = [latents for latents, _ in emulate_pipeline(fresh(root, "sdxl"), n, lambda p: images(p(**base_kwargs())),
                                                       mode="sync")]
    assert rel(base[0], plain_latents) <= 1e-5 and all(torch.equal(latents, base[0]) for latents in base)
    outs = emulate_pipeline(fresh(root, "sdxl-refiner"), n,
                            lambda p: (images(p(**refiner_kwargs(base[p.layout.rank]))), p.strips.evaluations),
                            mode="sync")
    assert ref.abs().max() > 0.1 and rel(outs[0][0][0], ref) <= 1e-5
    assert all(evaluations == 2 for (_, evaluations), _ in outs)          # the second half of 4 steps


# ---- Flux Kontext: the conditioning image's tokens appended to the latent's as a second grid ----------------
_kontext_refs = {}


def kontext_ref(root, family):
    """diffusers' own output of the Kontext family's call (`image_kwargs`), kept for the module's tests."""
    from support.diffusers_cases import image_kwargs

    if family not in _kontext_refs:
        _kontext_refs[family] = images(fresh(root, family)(**image_kwargs(family)))
    return _kontext_refs[family]


@pytest.mark.parametrize("family", ["flux-kontext", "flux-kontext-inpaint"])
def test_flux_kontext_sync_equals_diffusers(root, family):
    """FluxKontextPipeline's `image` (FluxKontextInpaintPipeline's `image_reference`) of another size
    than the output: its tokens follow the latent's as a second grid (img_ids' first coordinate 1),
    of 16 x 8 tokens beside 20 x 12. Each rank takes its rows of both grids by the same strip rule
    (N = 3: 7, 7, 6 and 6, 5, 5 rows), so sync = diffusers at N = 2 and 3. The conditioning image
    changes the output: without it (Kontext's text to image; the inpainting pipeline then appends the
    image it inpaints) by rel 0.015 and 0.006."""
    from support.diffusers_cases import HEIGHT, KONTEXT_IMAGE, WIDTH, image_kwargs, kontext_key

    ref = kontext_ref(root, family)
    assert rel(images(fresh(root, family)(**{**image_kwargs(family), kontext_key(family): None})), ref) > 1e-3
    for n in (2, 3):
        outs = emulate_pipeline(fresh(root, family), n, lambda p: (images(p(**image_kwargs(family))), p.strips.geometry,
                                                                   p.pipe.vae_scale_factor * 2), mode="sync")
        (out, geometry, packing), _ = outs[0]
        assert rel(out, ref) <= 1e-5
        assert (geometry.height, geometry.width) == (HEIGHT // packing, WIDTH // packing)
        assert geometry.others == ((KONTEXT_IMAGE[0] // packing, KONTEXT_IMAGE[1] // packing),)


def test_flux_kontext_direct_transformer_call_equals_the_plain_transformer(root):
    """The parallel transformer called directly with the two-grid sequence FluxKontextPipeline gives
    it (N = 3, uneven strips of both grids): its gathered output, both grids in their places, = the
    plain transformer's, on every rank. Grids that interleave in the sequence, and a second grid of
    fewer rows than the strips, are refused on every rank before the transformer computes."""
    from support.diffusers_cases import image_kwargs

    from parafuse.parallel.geometry import GeometryError

    n, plain = 3, fresh(root, "flux-kontext")
    sequence = []
    plain.transformer.register_forward_pre_hook(lambda m, a, kw: sequence.append(kw) if not sequence else None,
                                                with_kwargs=True)
    plain(**{**image_kwargs("flux-kontext"), "num_inference_steps": 1})
    call = sequence[0]
    with torch.no_grad():
        ref = plain.transformer(**call)[0]
    x, ids = call["hidden_states"], call["img_ids"]
    latent = int(ids[:, 0].eq(0).sum())
    order = torch.cat([torch.arange(latent // 2), torch.arange(latent, x.shape[1]), torch.arange(latent // 2, latent)])
    interleaved = {**call, "hidden_states": x[:, order], "img_ids": ids[order]}
    narrow = int(ids[latent:, 2].max()) + 1 + latent                 # one row of the second grid
    narrow = {**call, "hidden_states": x[:, :narrow], "img_ids": ids[:narrow]}

    def direct(par):
        with torch.no_grad():
            out = par.transformer(**call)[0]
            computed = []
            par.pipe.transformer.x_embedder.register_forward_hook(        # the shape trace's fake tensors not counted
                lambda m, a, o: computed.append(1) if type(o) is torch.Tensor else None)
            refusals = []
            for bad in (interleaved, narrow):
                with pytest.raises((UnsupportedModelError, GeometryError)) as e:
                    par.transformer(**bad)
                refusals.append(str(e.value))
        return out, refusals, len(computed)
    for (out, (interleaves, too_narrow), computed), _ in emulate_pipeline(plain, n, direct, mode="sync"):
        assert rel(out, ref) <= 1e-5 and computed == 0
        assert re.search(r"img_ids interleave the grids of its token sequence \(their first coordinates run "
                         r"\[0\.0, 1\.0, 0\.0\]\)", interleaves)
        assert re.search(r"grid 2 of the token sequence \(1x8, after the latent's 20x12\): .*fewer than the 3 strips",
                         too_narrow)


def test_flux_kontext_full_mode_within_3db_of_text_to_image(root):
    """Full mode (N = 2), the stale K/V of both grids' strips: within 3 dB of the same tiny Flux's
    text-to-image full mode, each against its own diffusers output (measured: Kontext 77.1 dB, text
    to image 74.3). Partial with windows of whole strips (halo_portion 1) = full to the bit: at N = 2
    its windows are the neighbour's rows of both grids, received where full's buffer holds them."""
    from support.diffusers_cases import image_kwargs

    def run(**settings):
        return emulate_pipeline(fresh(root, "flux-kontext"), 2, lambda p: images(p(**image_kwargs("flux-kontext"))),
                                warmup_steps=1, **settings)[0][0]
    full = run(mode="full")
    assert torch.equal(run(mode="partial", halo_portion=1.0), full)
    text_to_image = stale_quality(root, "flux", dict(mode="full", warmup_steps=1), lambda: call_kwargs("flux"))
    assert psnr(full, kontext_ref(root, "flux-kontext")) >= text_to_image - 3


def test_flux_kontext_kv_and_gather_bytes_closed_form(root):
    """Each rank's bytes over a Kontext call (N = 3, parallel_vae=False: the transformer's alone):
    `attn_kv` - a synchronous step sends the rank's tokens of both grids (its rows of each times the
    width) to every other rank; a stale `partial` step its first and last ceil(0.3 rows) rows of
    each grid up and down; `full` its tokens to every rank at every step - times K and V of every
    attention (dual- and single-stream blocks) in float32; `gather`, every step, its tokens of the
    output, both grids (the pipeline then keeps the latent's)."""
    import math

    from support.diffusers_cases import HEIGHT, KONTEXT_IMAGE, WIDTH, image_kwargs

    from parafuse.parallel.geometry import StripGeometry

    n, portion = 3, 0.3
    pipe = fresh(root, "flux-kontext")
    t, packing = pipe.transformer, pipe.vae_scale_factor * 2
    kv = (len(t.transformer_blocks) + len(t.single_transformer_blocks)) * 2 * t.inner_dim * 4     # per token
    grids = [StripGeometry(h // packing, w // packing, n, 1) for h, w in ((HEIGHT, WIDTH), KONTEXT_IMAGE)]
    sent = {mode: [stats["bytes_sent"] for _, stats in emulate_pipeline(
        pipe, n, lambda p: images(p(**image_kwargs("flux-kontext"))), parallel_vae=False, mode=mode, warmup_steps=1,
        **({"halo_portion": portion} if mode == "partial" else {}))] for mode in ("full", "partial")}
    for r in range(n):
        tokens = sum(g.rows[r] * g.width for g in grids)
        windows = sum(max(1, math.ceil(portion * g.rows[r])) * g.width for g in grids) * ((r > 0) + (r < n - 1))
        assert sent["full"][r]["attn_kv"] == STEPS * tokens * (n - 1) * kv
        assert sent["partial"][r]["attn_kv"] == (tokens * (n - 1) + (STEPS - 1) * windows) * kv
        for mode in sent:
            assert sent[mode][r]["gather"] == STEPS * tokens * t.proj_out.out_features * 4 * (n - 1)


def test_flux_kontext_true_cfg_equals_diffusers_and_splits_by_branch(root):
    """Kontext with true CFG (a negative prompt, true_cfg_scale 2.5: two transformer calls a step, each
    of both grids; the guidance moves the output by rel 0.12): sync = diffusers at N = 2 and with
    cfg_parallel at N = 4; in `full`, the two calls as two streams on 2 ranks give the same bits as
    cfg_parallel's two branches on 4."""
    from support.diffusers_cases import flux_true_cfg_kwargs, image_kwargs

    def true_cfg():           # Flux's true-CFG call with Kontext's image (the same prompt: one base call)
        return {**flux_true_cfg_kwargs(), **image_kwargs("flux-kontext")}

    def run(n, **settings):
        return emulate_pipeline(fresh(root, "flux-kontext"), n, lambda p: images(p(**true_cfg())), **settings)[0][0]
    ref = images(fresh(root, "flux-kontext")(**true_cfg()))
    assert rel(kontext_ref(root, "flux-kontext"), ref) > 0.05
    assert rel(run(2, mode="sync"), ref) <= 1e-5 and rel(run(4, mode="sync", cfg_parallel=True), ref) <= 1e-5
    full = run(2, mode="full", warmup_steps=1)
    assert torch.equal(full, run(4, mode="full", warmup_steps=1, cfg_parallel=True)) and rel(full, ref) > 1e-4


# ---- the first-block cache with Flux's true CFG without cfg_parallel: two streams, two cache contexts ------
def tail_streams(par) -> list:
    """A list that grows by the denoiser call's stream at every evaluation whose last block runs
    (`tail_runs`, by stream: 0 the conditional call, 1 the unconditional one)."""
    streams = []
    last = par.transformer.single_transformer_blocks[-1].proj_out
    last.register_forward_pre_hook(lambda m, a: streams.append(par.strips.stream) if type(a[0]) is torch.Tensor
                                   else None)
    return streams


def test_first_block_cache_with_true_cfg_streams_sync_equals_diffusers(root):
    """Flux's true CFG without cfg_parallel, N = 2, sync: the conditional and unconditional calls are
    streams 0 and 1 of every rank, inside diffusers' `cache_context("cond")` / `("uncond")`, each
    with its own cache state (diffusers' state manager, per context). At threshold 0.34 diffusers
    skips the conditional call's tail at step 1 and never the unconditional one's: = diffusers, and
    every rank runs each stream's tail at those steps. `reduce`: 8 bytes per decision (every call
    after its context's first)."""
    threshold, n = 0.34, 2
    ref, computed, decisions = fbc_reference(root, flux_true_cfg_kwargs(), threshold)
    skipped = {name: sum(not d[3] for d in decisions if d[0] == name) for name in ("cond", "uncond")}
    assert skipped == {"cond": 1, "uncond": 0} and computed == 2 * STEPS - 1

    def call(par):
        streams = tail_streams(par)
        return images(par(**flux_true_cfg_kwargs())), streams
    outs = emulate_pipeline(fresh(root, "flux"), n, call, prepare=lambda p: fbc(p, threshold), mode="sync")
    assert (outs[0][0][0] - ref).abs().max() <= SYNC_TOL
    for (_, streams), stats in outs:
        assert [streams.count(s) for s in (0, 1)] == [STEPS - 1, STEPS]
        assert stats["bytes_sent"]["reduce"] == len(decisions) * 8 * (n - 1)


def test_first_block_cache_with_true_cfg_streams_full_mode(root):
    """Mode full, N = 2, warmup 1, threshold 0.45 (diffusers skips both calls' tails at step 1, their
    statistics 0.33 and 0.36, and runs them at step 2, 0.60 and 0.61: far enough from the threshold
    for the stale evaluations to take diffusers' decisions): every rank skips where diffusers does;
    the same bits as true CFG with cfg_parallel on 4 ranks, each branch deciding on its own ranks
    from its own state; within 3 dB of true CFG without the cache in the same mode, each against its
    own diffusers output (measured 67.5 vs 68.7 dB)."""
    threshold, n, settings = 0.45, 2, dict(mode="full", warmup_steps=1)
    ref, _, decisions = fbc_reference(root, flux_true_cfg_kwargs(), threshold)
    assert [d[3] for d in decisions] == [False, False, True, True]      # cond, uncond at step 1, then step 2

    def call(par):
        streams = tail_streams(par)
        return images(par(**flux_true_cfg_kwargs())), streams
    cached = lambda p: fbc(p, threshold)     # noqa: E731
    outs = emulate_pipeline(fresh(root, "flux"), n, call, prepare=cached, **settings)
    split = emulate_pipeline(fresh(root, "flux"), 2 * n, lambda p: images(p(**flux_true_cfg_kwargs())),
                             prepare=cached, cfg_parallel=True, **settings)
    assert all(streams == [0, 1] * (STEPS - 1) for (_, streams), _ in outs)    # steps 0 and 2
    assert torch.equal(outs[0][0][0], split[0][0])
    plain = emulate_pipeline(fresh(root, "flux"), n, lambda p: images(p(**flux_true_cfg_kwargs())), **settings)
    with_cache = psnr(outs[0][0][0], ref)
    without = psnr(plain[0][0], images(fresh(root, "flux")(**flux_true_cfg_kwargs())))
    assert with_cache >= without - 3, (with_cache, without)
