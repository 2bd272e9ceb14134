"""CUDA graphs of a diffusers pipeline's denoiser call, checked on CPU.

A graph replays the captured kernels on the captured (static) input tensors. Two properties make
that correct, and both are checked here without a GPU:
- the captured region is capturable: two replays issue the same operations on the same persistent
  tensors, read no device value on the host and leave nothing allocated (as tests/unit/test_capture.py
  checks for the built-in models);
- every tensor the pipeline passes (latents, timestep, prompt embeddings, added conditions, ids) is
  copied into its static buffer before each replay, and a changed module makes a new capture: with
  `parafuse.graphs.rerun_capture` standing in for the CUDA graph (a replay reruns the region on the
  static inputs), two pipeline calls with different prompts equal the eager run exactly.
"""
import gc
import os
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.diffusers_cases import call_kwargs, images, pipeline_path  # noqa: E402
from support.capture import HOST_READS, Trace  # noqa: E402

import parafuse  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.diffusers.pipeline import load_pipeline  # noqa: E402
from parafuse.graphs import rerun_capture  # noqa: E402
from parafuse.parallel.distributed import ParallelLayout  # noqa: E402
from parafuse.parallel.transport import NullTransport  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelines"))


def two_prompts(family):
    """The family's call twice, the second with other prompt embeddings (and pooled ones)."""
    first = call_kwargs(family)
    second = dict(first)
    for k, v in first.items():
        if k.endswith("embeds") and isinstance(v, torch.Tensor):
            second[k] = v.flip(-1) * 0.7
    return first, second


def run(pipe, n, family, graphed: bool, **settings):
    def call(par):
        first, second = two_prompts(family)           # each rank its own generators
        if graphed:
            par.strips.graphed, par.session.capture = True, rerun_capture
        out = [images(par(**first)), images(par(**second))]
        return out, par.strips.captures
    return emulate_pipeline(pipe, n, call, **settings)


@pytest.mark.parametrize("family,n,mode", [("sd", 1, "sync"), ("sd", 2, "full"), ("flux", 2, "partial"),
                                          ("sdxl", 3, "sync"), ("flux2", 2, "partial")])
def test_graphed_calls_with_two_prompts_equal_eager(root, family, n, mode):
    pipe = load_pipeline(pipeline_path(root, family))
    eager = run(pipe, n, family, False, mode=mode, warmup_steps=1)
    graphed = run(pipe, n, family, True, mode=mode, warmup_steps=1)
    (want, _), _ = eager[0]
    (got, captures), _ = graphed[0]
    assert captures >= 1                              # the steady calls did replay
    assert not torch.equal(want[0], want[1])          # the prompts matter
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_a_graph_that_ignored_the_new_prompt_would_be_caught(root):
    """The test above has teeth: a replay that kept the first call's embeddings differs from eager."""
    pipe = load_pipeline(pipeline_path(root, "sd"))

    def stale_embeddings(par):
        first, second = two_prompts("sd")
        par.strips.graphed, par.session.capture = True, rerun_capture
        images(par(**first))
        for g in par.strips._graphs.values():        # replays now skip the copy into the static inputs
            for key, (replay, statics, out, counts) in list(g.graphs.items()):
                g.graphs[key] = (replay, [torch.empty_like(s) for s in statics], out, counts)
        return images(par(**second))

    got = emulate_pipeline(pipe, 1, stale_embeddings, mode="sync")[0][0]
    want = emulate_pipeline(pipe, 1, lambda par: images(par(**two_prompts("sd")[1])), mode="sync")[0][0]
    assert not torch.equal(got, want)


def test_ip_adapter_masks_enter_the_graphs_static_buffers(root):
    """IP-Adapter masks are tensor arguments too: two calls with different masks (the second's
    flipped top to bottom), graphed equal eager - the masks were copied into their static buffers
    and each strip's mask is cut from them inside the captured region, never kept from the capture."""
    from test_diffusers import ip_masks, two_ip_adapters

    pipe = load_pipeline(pipeline_path(root, "sd"))
    embeds = two_ip_adapters(pipe)

    def call(graphed):
        def run(par):
            if graphed:
                par.strips.graphed, par.session.capture = True, rerun_capture
            out = [images(par(**call_kwargs("sd"), **embeds, cross_attention_kwargs={"ip_adapter_masks": masks}))
                   for masks in (ip_masks(), [m.flip(-2) for m in ip_masks()])]
            return out, par.strips.captures
        return run
    (want, _), _ = emulate_pipeline(pipe, 2, call(False), mode="sync")[0]
    (got, captures), _ = emulate_pipeline(pipe, 2, call(True), mode="sync")[0]
    assert captures >= 1
    assert (want[0] - want[1]).abs().max() > 1e-2          # the masks matter
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_a_changed_module_makes_a_new_capture(root):
    pipe = load_pipeline(pipeline_path(root, "sd"))

    def call(par):
        par.strips.graphed, par.session.capture = True, rerun_capture
        images(par(**two_prompts("sd")[0]))
        before = par.strips.captures
        images(par(**two_prompts("sd")[0]))           # same module: the graphs are kept
        kept = par.strips.captures == before
        with torch.no_grad():                         # a weight replaced (as `.to()` or a LoRA fuse would)
            conv = par.unet.conv_in
            conv.weight = torch.nn.Parameter(conv.weight * 1.5)
        images(par(**two_prompts("sd")[0]))
        return kept, before, par.strips.captures

    kept, before, after = emulate_pipeline(pipe, 1, call, mode="sync")[0][0]
    assert kept and before >= 1 and after == before  # the old graphs dropped, as many new ones captured


@pytest.mark.parametrize("family,freeu,strips", [("sd", False, 3), ("sd", True, 3), ("flux", False, 3),
                                                 ("flux2", False, 3), ("qwen", False, 3), ("qwen", False, 1)])
def test_steady_denoiser_call_is_capturable(root, family, freeu, strips):
    """The region a graph captures - the denoiser's forward on a strip, in the stale plan, on static
    inputs - issues the same ops on the same tensors twice, reads nothing on the host, leaks nothing;
    with FreeU, its reduction and filter included; Qwen-Image with its prompt's padding mask (as its
    pipeline passes it), in strips and on one (no engine: every call is steady)."""
    pipe = load_pipeline(pipeline_path(root, family))
    name = "unet" if family == "sd" else "transformer"
    model = getattr(pipe, name)
    if freeu:
        model.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    par = parafuse.parallelize(SimpleNamespace(**{name: model}), mode="full", warmup_steps=1, parallel_vae=False,
                               layout=ParallelLayout(strips // 2, strips), transport=NullTransport(strips // 2, strips))
    traces, leaks = [], []

    def traced(region):
        trace = Trace()
        with trace:
            out = region()
        gc.collect()
        keep = {o.untyped_storage().data_ptr() for o in torch.utils._pytree.tree_flatten(out)[0]
                if isinstance(o, torch.Tensor)}
        leaks.append([r() for r in trace.new if r() is not None and r().untyped_storage().data_ptr() not in keep])
        traces.append(trace.ops)
        return out

    def capture(region, pool):
        out, ran = traced(region), [True]

        def replay():
            if ran:                                   # the run at capture was this evaluation
                ran.clear()
                return
            traced(region)
        return replay, out

    par.strips.graphed, par.session.capture = True, capture
    kwargs = denoiser_kwargs(family, pipe)
    par.strips.begin_image()
    with torch.no_grad():
        for step in range(4 if strips > 1 else 3):    # (sync), steady eager, steady captured, steady replayed
            kwargs = {k: v * (1 + 0.1 * step) if k in ("encoder_hidden_states", "timestep") else v
                      for k, v in kwargs.items()}
            model(**kwargs)
    par.strips.end_image()
    assert len(traces) == 2 and len(traces[0]) > 30
    assert traces[0] == traces[1]
    names = {op[0] for op in traces[0]}
    assert not names & HOST_READS, names & HOST_READS
    assert leaks == [[], []], [[tuple(t.shape) for t in group] for group in leaks]
    assert (sum(par.session.transport.bytes_sent["reduce"].values()) > 0) == freeu     # FreeU's reduction ran


def denoiser_kwargs(family, pipe):
    """One denoiser call's arguments as the family's pipeline makes them (batch 2 with CFG for SD;
    Qwen-Image's prompt with its padding mask)."""
    kw = call_kwargs(family)
    g = torch.Generator().manual_seed(3)
    h, w = kw["height"] // 4, kw["width"] // 4
    if family == "sd":
        ctx = kw["prompt_embeds"]
        return {"sample": torch.randn(2, 4, h, w, generator=g), "timestep": torch.tensor(500.0),
                "encoder_hidden_states": torch.cat([ctx, ctx * 0.5]), "return_dict": False}
    t = pipe.transformer
    tokens, text = (h // 2) * (w // 2), kw["prompt_embeds"]
    if family == "flux2":         # its packing and 4-axis ids (t, h, w, l), as Flux2Pipeline makes them
        latents = torch.randn(1, t.config.in_channels, h // 2, w // 2, generator=g)
        return {"hidden_states": type(pipe)._pack_latents(latents), "timestep": torch.tensor([0.5]),
                "encoder_hidden_states": text, "img_ids": type(pipe)._prepare_latent_ids(latents),
                "txt_ids": type(pipe)._prepare_text_ids(text), "guidance": torch.tensor([3.5]), "return_dict": False}
    if family == "qwen":
        return {"hidden_states": torch.randn(1, tokens, t.config.in_channels, generator=g),
                "timestep": torch.tensor([0.5]), "encoder_hidden_states": text,
                "encoder_hidden_states_mask": kw["prompt_embeds_mask"], "img_shapes": [[(1, h // 2, w // 2)]],
                "return_dict": False}
    ids = type(pipe)._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    return {"hidden_states": torch.randn(1, tokens, t.config.in_channels, generator=g),
            "timestep": torch.tensor([0.5]), "encoder_hidden_states": text,
            "pooled_projections": kw["pooled_prompt_embeds"], "img_ids": ids,
            "txt_ids": torch.zeros(text.shape[1], 3), "return_dict": False,
            **({"guidance": torch.tensor([3.5])} if t.config.guidance_embeds else {})}
