"""Pipelines that call the denoiser more than once per step with different inputs: SD3's skip-layer
guidance (the CFG batch, then the conditional inputs alone with blocks skipped) and Flux's true CFG
without cfg_parallel (the conditional call, then the unconditional one). Each kind of call is its
own stream of evaluations (`StripModel`, `ExchangeEngine.configure`): its own plan and exchange
state, its first evaluation synchronous. Tiny pipelines (tests/support/diffusers_cases.py) on the
thread emulator, against diffusers' own single-process output."""
import pytest
import torch

from support.diffusers_cases import (STEPS, call_kwargs, flux_true_cfg_kwargs, images, pipeline_path,  # noqa: E402
                                     slg_kwargs)

from parafuse.diffusers import UnsupportedModelError, load_pipeline  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.graphs import rerun_capture  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelines"))


_pipes = {}


def pipe(root, family):
    if family not in _pipes:
        _pipes[family] = load_pipeline(pipeline_path(root, family))
    return _pipes[family]


def psnr(a, b):
    return (10 * torch.log10((b.max() - b.min()) ** 2 / ((a - b) ** 2).mean())).item()


_refs = {}


def slg_ref(root):
    """diffusers' own output with skip-layer guidance."""
    if "slg" not in _refs:
        _refs["slg"] = images(pipe(root, "sd3")(**slg_kwargs()))
    return _refs["slg"]


def stale(mode: str) -> dict:
    return dict(mode=mode, warmup_steps=1, **({"halo_portion": 0.3} if mode == "partial" else {}))


def plans_of(engine) -> list:
    """A list that grows by (stream, step plan) at every evaluation `engine` begins."""
    plans, begin = [], engine.begin_step

    def begin_step(k):
        begin(k)
        plans.append((engine.stream, engine.step.name))
    engine.begin_step = begin_step
    return plans


def recorded(call, calls: bool = False):
    """`call(par)` run with every evaluation's (stream, step plan) recorded and, with `calls`, every real
    denoiser call's whole inputs and gathered output (hooks around parafuse's own)."""
    def run(par):
        plans, seen = plans_of(par.session.engine), []
        if calls:
            model = par.transformer
            model.register_forward_pre_hook(lambda m, a, kw: None if par.strips.tracing else seen.append([kw]),
                                            with_kwargs=True, prepend=True)
            model.register_forward_hook(lambda m, a, kw, out: None if par.strips.tracing else
                                        seen[-1].append(out[0].clone()), with_kwargs=True)
        return call(par), plans, seen
    return run


# the CFG call is stream 0 at every step, the skip-layer call stream 1 at steps 1 and 2
SLG_STREAMS = [0, 0, 1, 0, 1]


@pytest.mark.parametrize("n", [2, 3])
def test_skip_layer_guidance_sync_equals_diffusers(root, n):
    sd3 = pipe(root, "sd3")
    ref = slg_ref(root)
    if n == 2:
        assert (ref - images(sd3(**call_kwargs("sd3")))).abs().max() > 1e-2    # the guidance matters
    outs = emulate_pipeline(sd3, n, recorded(lambda p: images(p(**slg_kwargs()))), mode="sync")
    (out, plans, _), stats = outs[0]
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert plans == [(s, "sync") for s in SLG_STREAMS]
    assert stats["evaluations"] == len(SLG_STREAMS)


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_skip_layer_guidance_stale_modes_keep_each_call_on_its_own_state(root, mode):
    """N = 2, warmup 1. Each stream's first evaluation is synchronous (the skip-layer call's at step 1,
    when the CFG call is already stale), and each later one reads its own stream's state: at
    skip_layer_guidance_scale 0 the skip-layer calls still run and exchange, and the image is the
    pipeline's without them bit for bit. Quality is measured per call, against the plain transformer
    on the same inputs: the skip-layer call's stale evaluation within 3 dB of the CFG call's. (The
    image's own PSNR against diffusers falls with the scale - 57 dB at the default 2.8 against 66 dB
    without the guidance - since the guidance multiplies the difference of the two calls' errors.)"""
    sd3 = pipe(root, "sd3")
    (_, plans, calls), _ = emulate_pipeline(sd3, 2, recorded(lambda p: images(p(**slg_kwargs())), calls=True),
                                            **stale(mode))[0]
    assert plans == [(0, "sync"), (0, "stale"), (1, "sync"), (0, "stale"), (1, "stale")]
    with torch.no_grad():
        quality = [(kw.get("skip_layers") is not None, psnr(out, sd3.transformer(**kw)[0])) for kw, out in calls]
    cfg = [q for skip, q in quality[1:] if not skip]          # the stale CFG calls
    assert quality[2][0] and quality[2][1] > 100              # the skip-layer call's first: synchronous
    assert quality[4][0] and quality[4][1] >= min(cfg) - 3, quality

    unguided = emulate_pipeline(sd3, 2, lambda p: images(p(**slg_kwargs(scale=0.0))), **stale(mode))[0][0]
    plain = emulate_pipeline(sd3, 2, lambda p: images(p(**call_kwargs("sd3"))), **stale(mode))[0][0]
    assert torch.equal(unguided, plain)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["full", "partial"])
def test_flux_true_cfg_stale_modes_without_cfg_parallel_equal_cfg_parallel(root, mode, n):
    """Flux's true CFG on n ranks without cfg_parallel computes what cfg_parallel on 2n ranks computes
    (each branch on n strips with its own stale state), bit for bit: the conditional and the
    unconditional call are streams 0 and 1, each synchronous at its first evaluation. Each rank holds
    and moves twice what a cfg_parallel rank holds and moves for its one branch (the swap of the
    branches' outputs, kind cfg, aside)."""
    flux = pipe(root, "flux")
    streams = emulate_pipeline(flux, n, recorded(lambda p: images(p(**flux_true_cfg_kwargs()))), **stale(mode))
    split = emulate_pipeline(flux, 2 * n, lambda p: images(p(**flux_true_cfg_kwargs())), cfg_parallel=True,
                             **stale(mode))
    (out, plans, _), stats = streams[0]
    assert torch.equal(out, split[0][0])
    assert plans == [(0, "sync"), (1, "sync")] + [(0, "stale"), (1, "stale")] * (STEPS - 1)
    for (_, mine), (_, branch) in zip(streams, split):
        assert mine["state_bytes"] == 2 * branch["state_bytes"]
        for kind in ("attn_kv", "text_attn", "gather"):
            assert mine["bytes_sent"][kind] == 2 * branch["bytes_sent"][kind], kind


def test_flux_true_cfg_graphed_streams_equal_eager(root):
    """CUDA graphs (on CPU: a replay reruns the captured region on its static inputs) with two streams
    of the same signature, over two pipeline calls: each stream's steady call is captured once and
    replayed from then on (two graphs: one shared would read the other stream's buffers), and the
    images equal the eager ones."""
    flux = pipe(root, "flux")

    def call(par, graphed):
        if graphed:
            par.strips.graphed, par.session.capture = True, rerun_capture
        return [images(par(**flux_true_cfg_kwargs())) for _ in range(2)], par.strips.captures
    (eager, _), _ = emulate_pipeline(flux, 2, lambda p: call(p, False), **stale("partial"))[0]
    (graphed, captures), _ = emulate_pipeline(flux, 2, lambda p: call(p, True), **stale("partial"))[0]
    assert captures == 2
    for e, g in zip(eager, graphed):
        assert torch.equal(g, e)


def test_skip_layer_guidance_with_cfg_parallel_is_refused_before_compute(root):
    """cfg_parallel splits the CFG batch by branch; the skip-layer call holds the conditional branch
    alone: refused at the pipeline call, before the denoiser runs."""
    def call(par):
        with pytest.raises(UnsupportedModelError, match="cfg_parallel=False"):
            par(**slg_kwargs())
        return par.strips.evaluations
    assert [evaluations for evaluations, _ in emulate_pipeline(pipe(root, "sd3"), 2, call, cfg_parallel=True)] == [0, 0]


def test_controlnet_scale_changing_by_step_keeps_one_stream(root):
    """A float argument that changes by step - the ControlNet's conditioning scale, 0 after
    control_guidance_end - is not a new kind of call (`call_signature` leaves floats out): sync = diffusers."""
    from support.diffusers_cases import controlnet_kwargs

    net = load_pipeline(pipeline_path(root, "sd-controlnet"))
    kwargs = lambda: {**controlnet_kwargs("sd-controlnet"), "control_guidance_end": 0.5}     # noqa: E731
    ref = images(net(**kwargs()))
    out = emulate_pipeline(net, 2, lambda p: images(p(**kwargs())), mode="sync")[0][0]
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_a_call_that_changes_kind_during_an_image_is_refused(root):
    """diffusers' documented dynamic-CFG callback (CFG off after step 0: guidance 0, the conditional
    prompt alone) makes the step's first call a batch of 1 where it was 2: refused in one line."""
    def cfg_off(pipe, i, t, tensors):
        pipe._guidance_scale = 0.0
        return {name: tensors[name].chunk(2)[-1] for name in ("prompt_embeds", "pooled_prompt_embeds")}

    def call(par):
        with pytest.raises(UnsupportedModelError, match="call 1 of a step .* must be the same at every step"):
            par(**call_kwargs("sd3"), callback_on_step_end=cfg_off,
                callback_on_step_end_tensor_inputs=["prompt_embeds", "pooled_prompt_embeds"])
        return par.strips.evaluations
    assert [evaluations for evaluations, _ in emulate_pipeline(pipe(root, "sd3"), 2, call, mode="full")] == [1, 1]


def test_more_calls_between_two_scheduler_steps_than_a_step_makes_are_refused(root):
    """A step's calls are those between two steps of `pipe.scheduler`: a loop whose denoiser calls
    are not followed by a scheduler step - here a step callback calling the transformer five times
    with the step's own inputs - is refused at the fifth call, naming the rule (each call would
    otherwise become a stream of its own)."""
    def call(par):
        seen = []
        par.transformer.register_forward_pre_hook(lambda m, a, kw: None if seen else seen.append(kw),
                                                  with_kwargs=True, prepend=True)

        def call_again(pipe, i, t, tensors):
            for _ in range(5):
                pipe.transformer(**seen[0])
            return {}
        with pytest.raises(UnsupportedModelError, match="5 times between two steps of the pipeline's scheduler"):
            par(**call_kwargs("sd3"), callback_on_step_end=call_again)
        return par.strips.evaluations
    assert [evaluations for evaluations, _ in emulate_pipeline(pipe(root, "sd3"), 2, call, mode="full")] == [5, 5]


# ---- Flux's ControlNet with true CFG: one ControlNet call a step, two transformer calls ----------------
def controlnet_true_cfg_kwargs(family: str) -> dict:
    """FluxControlNetPipeline's true CFG: Flux's negative prompt and scale, and a control image."""
    from support.diffusers_cases import control_image, control_key

    return {**flux_true_cfg_kwargs(), control_key(family): control_image()}


def controlnet_true_cfg_ref(root, family: str) -> torch.Tensor:
    """diffusers' own output of `controlnet_true_cfg_kwargs`."""
    if family not in _refs:
        _refs[family] = images(pipe(root, family)(**controlnet_true_cfg_kwargs(family)))
    return _refs[family]


def with_controlnet_plans(call):
    """`call(par)` run with every ControlNet evaluation's (stream, step plan) recorded on its own engine."""
    def run(par):
        (net,) = par.controlnets
        plans = plans_of(net.engine)
        return call(par), plans
    return run


# latent tokens (FluxControlNetModel) and XLabs-style (an input_hint_block on the control image's pixels)
@pytest.mark.parametrize("family,n,cfg_parallel", [("flux-controlnet", 2, False), ("flux-controlnet", 4, True),
                                                   ("flux-f8-controlnet", 4, True)])
def test_flux_controlnet_true_cfg_sync_equals_diffusers(root, family, n, cfg_parallel):
    """FluxControlNetPipeline's true CFG calls the ControlNet once a step (the conditional prompt) and
    the transformer twice with its samples, conditional then unconditional: sync = diffusers. Without
    cfg_parallel the transformer's calls are streams 0 and 1 and the ControlNet's one call stream 0;
    with it (N = 4: 2 branches x 2 strips) each rank's transformer computes its branch's call alone
    and its ControlNet the conditional call, the same on both branches' strips."""
    net = pipe(root, family)
    kwargs = lambda: controlnet_true_cfg_kwargs(family)     # noqa: E731
    ref = controlnet_true_cfg_ref(root, family)
    outs = emulate_pipeline(net, n, recorded(with_controlnet_plans(lambda p: images(p(**kwargs())))), mode="sync",
                            cfg_parallel=cfg_parallel)
    ((out, net_plans), plans, _), _ = outs[0]
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert plans == [(0, "sync")] * STEPS if cfg_parallel else [(0, "sync"), (1, "sync")] * STEPS
    assert net_plans == [(0, "sync")] * STEPS


def test_flux_controlnet_true_cfg_full_mode_streams(root):
    """Mode full, N = 2, warmup 1: the same bits as true CFG with cfg_parallel on 4 ranks (each
    branch's transformer on 2 strips with its own stale state, each branch's ControlNet the
    conditional call on its 2 strips): the transformer's streams 0 and 1 and the ControlNet's stream 0
    each synchronous at their first evaluation. `attn_kv` in closed form: every step each rank sends
    its tokens' K and V of every attention site, float32, to the other rank - the transformer's twice
    (two calls), the ControlNet's once. Quality: within 3 dB of Flux's true CFG without the ControlNet
    in the same mode, each against its own diffusers output (the guidance multiplies the difference
    of the two calls' errors: the same ControlNet pipeline without true CFG is 4.7 dB better)."""
    n, family = 2, "flux-controlnet"
    net = pipe(root, family)
    kwargs = lambda: controlnet_true_cfg_kwargs(family)     # noqa: E731
    # the models' exchanges alone: the VAE encodes the control image whole on every rank
    settings = dict(parallel_vae=False, **stale("full"))
    streams = emulate_pipeline(net, n, recorded(with_controlnet_plans(lambda p: images(p(**kwargs())))), **settings)
    split = emulate_pipeline(net, 2 * n, lambda p: images(p(**kwargs())), cfg_parallel=True, **settings)
    ((out, net_plans), plans, _), _ = streams[0]
    assert torch.equal(out, split[0][0])
    assert plans == [(0, "sync"), (1, "sync")] + [(0, "stale"), (1, "stale")] * (STEPS - 1)
    assert net_plans == [(0, "sync")] + [(0, "stale")] * (STEPS - 1)

    def kv(model) -> int:               # K and V of one token at every attention site, float32
        return (len(model.transformer_blocks) + len(model.single_transformer_blocks)) * 2 * model.inner_dim * 4
    tokens = out.shape[1]
    for _, stats in streams:
        strip = tokens // n             # (even strips: the tiny latent's token rows split evenly at N = 2)
        per_token = 2 * kv(net.transformer) + kv(net.controlnet)
        assert stats["bytes_sent"]["attn_kv"] == STEPS * strip * (n - 1) * per_token

    flux = pipe(root, "flux")
    plain = emulate_pipeline(flux, n, lambda p: images(p(**flux_true_cfg_kwargs())), **settings)[0][0]
    with_net = psnr(out, controlnet_true_cfg_ref(root, family))
    without = psnr(plain, images(flux(**flux_true_cfg_kwargs())))
    assert with_net >= without - 3, (with_net, without)


def test_a_pipeline_without_a_scheduler_is_refused_before_compute(root):
    """The door tells a step's calls by the pipeline's scheduler steps: a pipeline-like object whose
    loop has no `scheduler` is refused at its call, in one line, before the denoiser computes."""
    plain, seen = pipe(root, "sd3"), []
    handle = plain.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    plain(**{**call_kwargs("sd3"), "num_inference_steps": 1})
    handle.remove()

    class Loop:
        def __init__(self, transformer):
            self.transformer = transformer

        def __call__(self, output_type=None):
            with torch.no_grad():
                return self.transformer(**seen[0])

    def call(par):
        with pytest.raises(UnsupportedModelError, match=r"^Loop has no scheduler with a step \(pipe.scheduler.step\)"):
            par()
        return par.strips.evaluations
    assert [evaluations for evaluations, _ in emulate_pipeline(Loop(plain.transformer), 2, call)] == [0, 0]
