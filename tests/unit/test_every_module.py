"""The fast unit set's end-to-end strand: one small run through each part that the unit tests beside
it reach only in part - the CLI and its outputs and flag table, every Triton kernel (through the
interpreter), the bottleneck stages, the watchdog, the diffusers door and its CLI. Each asserts against a reference;
the deep tests are in the other folders (docs/testing.md)."""
import json
import threading
import time

import pytest
import torch

from parafuse import attention
from parafuse.generate import main
from parafuse.models import load_model
from parafuse.parallel.config import PatchConfig
from parafuse.report import RANK_KEYS, RUN_KEYS
from parafuse.runtime import Request, Runtime, emulate


@pytest.fixture
def process_attention_backend():
    """The attention backend is the process's: put it back after a test that sets it."""
    before = attention.get_backend()
    yield
    attention.set_backend(before)


def test_cli_writes_the_image_and_its_report(tmp_path):
    out, rep = tmp_path / "a.png", tmp_path / "a.json"
    assert main(["--model", "dit-small", "--label", "1", "--height", "32", "--width", "32", "--steps", "2",
                 "--no-progress", "--out", str(out), "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert out.stat().st_size > 0 and set(RUN_KEYS) <= set(report) and set(report["ranks"][0]) == set(RANK_KEYS)
    assert report["mode"] == "serial" and len(report["step_seconds"]) == 2


def test_the_cli_flag_table_in_the_docs_is_the_parsers():
    from parafuse import cli_doc
    from parafuse.generate import build_parser
    assert cli_doc.parser_flags() == {a for act in build_parser()._actions for a in act.option_strings if a != "-h"}
    assert cli_doc.main(["--check"]) == 0, "run python -m parafuse.cli_doc"


def test_every_triton_kernel_equals_the_pytorch_path(process_attention_backend):
    """dit-small at N = 2 in `full` with the one-bit codec: the halo attention, the fused solver
    update and the codec's encode/decode, each through Triton's interpreter, give the PyTorch path's
    image to float tolerance; and the GroupNorm(+SiLU) pair gives torch's GroupNorm + SiLU."""
    from parafuse_kernels.groupnorm import group_norm_apply, group_sums

    req = Request(32, 32, 2, "ddim", label=1)
    cfg = PatchConfig(mode="full", warmup_steps=1, kv_codec="sign")
    images = {}
    for kernels, backend in (("torch", "sdpa"), ("triton", "triton")):
        attention.set_backend(backend)
        images[kernels] = emulate(load_model("dit-small"), 2, cfg, req, kernels=kernels)[1][0][0].latent
    assert (images["triton"] - images["torch"]).abs().max() <= 1e-3 * images["torch"].abs().max()
    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    weight, bias = torch.rand(16) + 0.5, torch.randn(16)
    sums = group_sums(x, 4, torch.zeros(2, 2, 4))
    y = group_norm_apply(x, sums, float(4 * 6 * 10), weight, bias, 1e-5, None, 1.0, True)
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, weight, bias, 1e-5))
    assert (y - want).abs().max() <= 1e-4


def test_a_bottleneck_schedule_runs_its_stages():
    result = Runtime(load_model("dit-small")).generate(Request(64, 64, 10, "ddim", label=1, schedule="bottleneck"))
    stages = result.timing["stages"]
    assert len(stages) == 3 and stages[1]["height"] < stages[0]["height"] == stages[2]["height"] == 64
    assert torch.isfinite(result.latent).all()


def test_the_watchdog_names_a_peer_whose_heartbeat_stopped(monkeypatch):
    from parafuse import watchdog
    from support.processes import FakeStore
    fired, messages = threading.Event(), []
    monkeypatch.setattr(watchdog, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(watchdog, "exit_now", lambda code, msg=None, kill=(): (messages.append(msg), fired.set()))
    dog = watchdog.Watchdog(0, 2, startup_timeout=0.3, exchange_timeout=0.3, store=FakeStore(peer_alive=False))
    try:
        with dog.guard("denoising 32x32"):
            time.sleep(0.1)
            assert fired.wait(10)
    finally:
        dog.close()
    assert "rank 1 stopped answering" in messages[0]


def test_the_diffusers_door_and_its_cli(tmp_path):
    """A tiny SD pipeline: two emulated ranks in `sync` give diffusers' own latents, and the CLI
    renders it from its folder."""
    pytest.importorskip("diffusers")
    from parafuse.diffusers.emulator import emulate_pipeline
    from parafuse.diffusers.pipeline import load_pipeline
    from parafuse.diffusers.tiny import call_kwargs, images, pipeline_path

    path = pipeline_path(str(tmp_path), "sd")
    pipe = load_pipeline(path)
    want = images(pipe(**call_kwargs("sd")))
    got = emulate_pipeline(pipe, 2, lambda par: images(par(**call_kwargs("sd"))), mode="sync")[0][0]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    kw = call_kwargs("sd")
    embeds = tmp_path / "e.pt"
    torch.save({k: kw[k] for k in ("prompt_embeds", "negative_prompt_embeds")}, embeds)
    assert main(["--model", path, "--prompt-embeds", str(embeds), "--height", str(kw["height"]), "--width",
                 str(kw["width"]), "--steps", "2", "--no-progress", "--out", str(tmp_path / "p.png")]) == 0
