"""What the pipeline door gets from the one PatchSession, as the built-in door gets it: the
non-finite watch, the memory floor, the Triton kernels, the report's keys, one progress bar, and
host deadlines that name a stopped rank (torchrun)."""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before parafuse_kernels is imported (as the kernel tests do)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.diffusers_cases import STEPS, call_kwargs, images, pipeline_path  # noqa: E402
from support.processes import stop_a_rank_and_expect_it_named, torchrun  # noqa: E402

import parafuse  # noqa: E402
from parafuse.checks import CheckError  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.diffusers.pipeline import load_pipeline  # noqa: E402
from parafuse.health import NonFiniteError  # noqa: E402
from parafuse.report import RANK_KEYS  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipelines"))


def nan_from(layer, call: int):
    """`layer`'s output NaN from its `call`-th real call on (the shape trace excluded): inside the
    denoiser, so the strip's output is NaN when parafuse sees it."""
    from torch._subclasses.fake_tensor import FakeTensor
    calls = [0]

    def hook(mod, args, out):
        if isinstance(out, FakeTensor):
            return None
        calls[0] += 1
        return out * float("nan") if calls[0] >= call else None
    return layer.register_forward_hook(hook)


@pytest.mark.parametrize("n", [1, 2])
def test_nan_stops_every_rank_before_an_image_is_returned(root, n):
    pipe = load_pipeline(pipeline_path(root, "sd"))

    def call(par):
        if par.layout.rank == n - 1:
            nan_from(par.unet.conv_out, 2)                # one rank's strip goes bad at its second step
        where = " on rank 0, 1" if n > 1 else ""      # the gathered output is every rank's
        with pytest.raises(NonFiniteError, match=rf"NaN or infinite at step 2{where}; nothing was written"):
            par(**call_kwargs("sd"))
        return "raised"
    assert [out for out, _ in emulate_pipeline(pipe, n, call, mode="full", warmup_steps=1)] == ["raised"] * n


def test_memory_floor_refuses_a_strip_that_cannot_fit_before_any_evaluation(root, monkeypatch):
    from parafuse import checks
    pipe = load_pipeline(pipeline_path(root, "sd"))
    monkeypatch.setattr(checks, "available_memory", lambda device: 1 << 10)
    evaluated = []

    def call(par):
        par.unet.register_forward_hook(lambda *a: evaluated.append(1) if not par.strips.tracing else None)
        with pytest.raises(CheckError, match=r"needs at least .* per rank on 2 rank\(s\).*use about \d+ ranks"):
            par(**call_kwargs("sd"))
        return True
    emulate_pipeline(pipe, 2, call, mode="full")
    assert evaluated == []


def test_triton_kernels_in_a_unet_pipeline_equal_the_pytorch_ops(root, monkeypatch):
    """kernels='triton' reaches the pipeline's patch GroupNorms (two Triton launches each, through
    the interpreter here): the same image as the PyTorch ops to float tolerance, at N = 2."""
    from parafuse_kernels import groupnorm
    pipe = load_pipeline(pipeline_path(root, "sd"))
    launches = []
    real = groupnorm.group_sums
    monkeypatch.setattr(groupnorm, "group_sums", lambda *a, **k: (launches.append(1), real(*a, **k))[1])
    call = lambda par: images(par(**{**call_kwargs("sd"), "num_inference_steps": 2}))  # noqa: E731
    torch_ops = emulate_pipeline(pipe, 2, call, mode="sync", kernels="torch")[0][0]
    triton = emulate_pipeline(pipe, 2, call, mode="sync", kernels="triton")[0][0]
    assert launches
    assert (triton - torch_ops).abs().max() <= 1e-4 * torch_ops.abs().max()


def test_pipeline_report_has_the_built_in_report_keys(root, tmp_path):
    from parafuse.generate import main
    kw = call_kwargs("pixart")
    embeds = tmp_path / "e.pt"
    torch.save({k: kw[k] for k in ("prompt_embeds", "prompt_attention_mask")}, embeds)
    size = ["--height", str(kw["height"]), "--width", str(kw["width"]), "--steps", "2", "--no-progress"]
    assert main(["--model", pipeline_path(root, "pixart"), "--prompt-embeds", str(embeds), *size,
                 "--out", str(tmp_path / "p.png"), "--report", str(tmp_path / "p.json")]) == 0
    assert main(["--model", "dit-small", "--label", "1", *size, "--out", str(tmp_path / "b.png"),
                 "--report", str(tmp_path / "b.json")]) == 0
    pipeline, builtin = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("p", "b"))
    assert set(pipeline) == set(builtin)
    assert set(pipeline["ranks"][0]) == set(builtin["ranks"][0]) == set(RANK_KEYS)
    assert pipeline["pipeline"] == "PixArtAlphaPipeline" and builtin["pipeline"] is None
    assert len(pipeline["step_seconds"]) == pipeline["ranks"][0]["evaluations"] == 2


def test_only_rank_zero_draws_the_pipeline_progress_bar(root):
    pipe = load_pipeline(pipeline_path(root, "sd"))
    pipe.set_progress_bar_config(disable=False)

    def call(par):
        return par.pipe._progress_bar_config.get("disable", False)
    shown = [out for out, _ in emulate_pipeline(pipe, 3, call, mode="sync")]
    assert shown == [False, True, True]


@pytest.mark.torchrun
def test_stopped_rank_ends_a_pipeline_job_naming_it(root, tmp_path):
    """The host deadlines of the pipeline door: a rank stopped in the steady steps of a long pipeline
    call ends the job within the exchange deadline, naming it, and nothing is written."""
    timeout = 3
    kw = call_kwargs("sd")
    embeds = tmp_path / "e.pt"
    torch.save({k: kw[k] for k in ("prompt_embeds", "negative_prompt_embeds")}, embeds)
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(3, "--model", pipeline_path(root, "sd"), "--prompt-embeds", str(embeds), "--height",
                    str(kw["height"]), "--width", str(kw["width"]), "--steps", "900", "--warmup-steps", "1",
                    "--out", str(out / "s.png"), "--exchange-timeout", str(timeout))
    stop_a_rank_and_expect_it_named(proc, 2, r"\| *[2-9]\d/900", timeout, out)


def test_steps_counted_as_the_pipeline_calls_the_denoiser(root):
    pipe = load_pipeline(pipeline_path(root, "sd"))
    stats = emulate_pipeline(pipe, 2, lambda par: images(par(**call_kwargs("sd"))), mode="full", warmup_steps=1)
    assert [s["evaluations"] for _, s in stats] == [STEPS, STEPS]
    assert all(set(s) == set(RANK_KEYS) for _, s in stats)
    assert parafuse.PatchSession is not None


def test_unet_pipeline_sites_see_their_silu(root):
    """The one shape trace records who reads each GroupNorm in a diffusers U-Net too: the resnets'
    norms feed a SiLU alone (the Triton kernel applies it), the transformers' norms feed proj_in."""
    from types import SimpleNamespace

    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.transport import NullTransport
    unet = load_pipeline(pipeline_path(root, "sd")).unet
    par = parafuse.parallelize(SimpleNamespace(unet=unet), mode="sync", parallel_vae=False,
                               layout=ParallelLayout(0, 2), transport=NullTransport(0, 2))
    kw = call_kwargs("sd")
    with torch.no_grad():
        par.strips.begin_image()
        unet(torch.randn(2, 4, kw["height"] // 4, kw["width"] // 4), torch.tensor(500),
             encoder_hidden_states=torch.cat([kw["prompt_embeds"]] * 2))
        par.strips.end_image()
    (trace,) = par.strips._traces.values()
    silu = {s.key: s.silu for s in trace.sites if s.kind == "norm"}
    assert silu["down_blocks.0.resnets.0.norm1"] and silu["conv_norm_out"]
    assert not silu["down_blocks.0.attentions.0.norm"]
