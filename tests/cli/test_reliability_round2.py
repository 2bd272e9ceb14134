"""Reliability, second round (issue 26): the pipeline door checks what the built-in door checks,
ranks that disagree are refused, overflow is caught at N > 1, a rank stopped early is named, and
no file appears or vanishes behind the user's back. Every case of the issue is one test here
(docs/reliability.md lists them)."""
import os
import sys

import pytest
import torch

from test_reliability import SMALL, bad  # noqa: E402

from parafuse.generate import main  # noqa: E402


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """A tiny PixArt pipeline folder (parafuse/diffusers/tiny.py) and embeddings of the right width."""
    from support.diffusers_cases import call_kwargs, pipeline_path
    root = tmp_path_factory.mktemp("pipelines")
    path = pipeline_path(str(root), "pixart")
    kw = call_kwargs("pixart")
    embeds = root / "embeds.pt"
    torch.save({k: kw[k] for k in ("prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask",
                                   "negative_prompt_attention_mask")}, embeds)
    return path, str(embeds), kw


def pipeline_args(pixart, embeds=None):
    path, good, kw = pixart
    return ["--model", path, "--prompt-embeds", embeds or good, "--height", str(kw["height"]),
            "--width", str(kw["width"]), "--steps", "2", "--no-progress"]


# ---- 1. one request check for both doors -----------------------------------------------------
NUMBERS = [
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "-5"], "guidance must be >= 1"),
    (["--guidance", "1e39"], "guidance 1e+39 is above 100"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--steps", "20000"], "steps must be at most 10000"),
    (["--batch", "0"], "batch must be at least 1"),
    (["--seed", "-1"], "seed must be an integer in [0, 2^64 - 1]"),
    (["--seed", str(2 ** 64)], "seed must be an integer in [0, 2^64 - 1]"),
    (["--height", "0"], "height must be at least 1"),
]


@pytest.mark.parametrize("args, match", NUMBERS)
def test_both_doors_refuse_the_same_numbers(tmp_path, capsys, pixart, args, match):
    """The same limits and the same line, exit 2, nothing written, in the built-in door and the
    pipeline door (whose checks run before the pipeline loads)."""
    bad(tmp_path, capsys, *args, match=match)
    bad(tmp_path, capsys, *args, match=match, base=pipeline_args(pixart))


def test_prompt_embeds_content_is_checked(tmp_path, capsys, pixart):
    path, good, kw = pixart
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)))          # fixed junk: random bytes made the error's type vary
    listed = tmp_path / "list.pt"
    torch.save([kw["prompt_embeds"]], listed)
    wide = tmp_path / "wide.pt"
    torch.save({"prompt_embeds": torch.randn(1, 5, 17), "negative_prompt_embeds": torch.randn(1, 5, 17)}, wide)
    bad(tmp_path, capsys, match="is not a torch.save'd file of tensors", base=pipeline_args(pixart, str(junk)))
    bad(tmp_path, capsys, match="must hold a dict of tensors", base=pipeline_args(pixart, str(listed)))
    bad(tmp_path, capsys, match="prompt_embeds is torch.float32 of shape (1, 5, 17); the pipeline's denoiser "
                                "takes floating-point embeddings 16 wide", base=pipeline_args(pixart, str(wide)))
    bad(tmp_path, capsys, match="is a folder; give a file", base=pipeline_args(pixart, str(tmp_path)))


# ---- 5. outputs: no file appears or vanishes behind the user's back ---------------------------
def appear_at(path, content: bytes):
    """A forward hook that writes `path` at the model's first evaluation (after its two traces)."""
    calls = [0]

    def hook(mod, args, out):
        calls[0] += 1
        if calls[0] == 3:
            with open(path, "wb") as f:
                f.write(content)
    return hook


def test_file_appearing_during_the_run_is_kept(tmp_path, capsys, monkeypatch):
    from parafuse import runtime as rt_module
    out = tmp_path / "x.png"
    original = rt_module.load_model

    def load(*a, **kw):
        model = original(*a, **kw)
        model.register_forward_hook(appear_at(out, b"theirs"))
        return model
    monkeypatch.setattr(rt_module, "load_model", load)
    assert main([*SMALL, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{str(out)!r} appeared while the run computed and was kept (no --overwrite); this run's output is " \
           f"{str(tmp_path / 'x.1.png')!r}" in err, err
    assert out.read_bytes() == b"theirs"
    assert (tmp_path / "x.1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["x.1.png", "x.png"]          # no temporary or probe file left
    assert main([*SMALL, "--out", str(out), "--overwrite"]) == 0           # --overwrite replaces it
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commit_links_and_never_replaces(tmp_path):
    from parafuse.outputs import commit
    (tmp_path / "a.png").write_bytes(b"old")
    (tmp_path / "a.1.png").write_bytes(b"older")
    assert commit({str(tmp_path / "a.png"): b"new", str(tmp_path / "b.json"): b"{}"}, overwrite=False) == \
        {str(tmp_path / "a.png"): str(tmp_path / "a.2.png")}
    assert [(tmp_path / n).read_bytes() for n in ("a.png", "a.1.png", "a.2.png", "b.json")] == \
        [b"old", b"older", b"new", b"{}"]
    assert sorted(os.listdir(tmp_path)) == ["a.1.png", "a.2.png", "a.png", "b.json"]


def test_folder_that_refuses_new_files_is_found_before_compute(tmp_path, capsys, monkeypatch):
    """os.access says yes, a new file is refused: the probe says so before any model loads."""
    import errno
    import tempfile

    from parafuse import runtime as rt_module
    monkeypatch.setattr(rt_module, "load_model", lambda *a, **kw: pytest.fail("a model was loaded"))

    def refuse(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    bad(tmp_path, capsys, match=f"cannot write in folder {str(tmp_path)!r}: a new file there is refused "
                                f"(Read-only file system)")


@pytest.mark.skipif(not (os.path.isdir("/sys/kernel") and os.access("/sys/kernel", os.W_OK)),
                    reason="needs a folder that passes os.access but refuses new files (/sys/kernel as root)")
def test_real_folder_that_passes_os_access_but_refuses_files(tmp_path, capsys):
    assert main([*SMALL, "--out", "/sys/kernel/x.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("cannot write in folder '/sys/kernel': a new file there is refused (Permission denied)"), err


# ---- 6. inputs: checked whole, and messages that say what is wrong ----------------------------
def test_truncated_reference_is_refused_before_compute(tmp_path, capsys):
    from PIL import Image
    Image.effect_noise((32, 32), 64).convert("RGB").save(tmp_path / "r.png")
    data = (tmp_path / "r.png").read_bytes()
    (tmp_path / "r.png").write_bytes(data[:len(data) // 2])          # a valid header, half the pixels
    bad(tmp_path, capsys, "--reference", str(tmp_path / "r.png"), match="is not a readable image (OSError")


def test_compare_serial_with_reference_is_refused(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "r.png")
    bad(tmp_path, capsys, "--compare-serial", "--reference", str(tmp_path / "r.png"),
        match="--compare-serial and --reference each set the report's one comparison: give one of them")


def test_stages_high_to_low_are_refused(tmp_path, capsys):
    bad(tmp_path, capsys, "--height", "32", "--width", "32", "--stages", "64x64:4", "32x32:4:0.6",
        match="stage 1 (64x64:4:1:model) is larger than the image, the last stage (32x32)")


def test_messages_say_what_is_wrong(tmp_path, capsys, pixart):
    (tmp_path / "file").write_text("x")
    bad(tmp_path, capsys, "--out", str(tmp_path / "file" / "sub" / "x.png"),
        match=f"lies under {str(tmp_path / 'file')!r}, which is a file, not a folder")
    bad(tmp_path, capsys, "--out", str(tmp_path / "file" / "x.png"), match=f"{str(tmp_path / 'file')!r} is a file, "
                                                                           f"not a folder")
    bad(tmp_path, capsys, "--out", str(tmp_path / ("d" * 200 + "/")) * 30 + "x.png", match="bytes long; this file "
                                                                                           "system allows")
    bad(tmp_path, capsys, "--weights", str(tmp_path), match=f"weights file {str(tmp_path)!r} is a folder; give a file")
    # a pipeline folder whose model_index.json is not JSON: the file is named
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(pixart[0], broken)
    (broken / "model_index.json").write_text("{not json")
    args = pipeline_args(pixart)
    args[1] = str(broken)
    bad(tmp_path, capsys, match=f"pipeline index {str(broken / 'model_index.json')!r} is not JSON", base=args)


# ---- 7. the library's types: errors that name the field ----------------------------------------
def _request(**kw):
    from parafuse.runtime import Request
    return Request(**{"height": 32, "width": 32, **kw})


@pytest.mark.parametrize("kw, match", [
    ({"label": 3.7}, "label must be an integer, got 3.7 (float)"),
    ({"steps": 2.5}, "steps must be an integer, got 2.5 (float)"),
    ({"steps": True}, "steps must be an integer, got True (bool)"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5 (float)"),
    ({"height": "64"}, "height must be an integer, got '64' (str)"),
    ({"guidance": "3"}, "guidance must be a number, got '3' (str)"),
    ({"solver": None}, "solver must be a string, got None"),
    ({"stages": ("64x64:2",)}, "stages must be a tuple of parafuse.stages.Stage, got ('64x64:2',)"),
    ({"batch": 2, "context": torch.zeros(3, 4, 8)}, "context has batch 3, the request batch 2"),
])
def test_request_fields_are_validated(kw, match):
    from parafuse.checks import CheckError
    with pytest.raises(CheckError, match=match.replace("(", r"\(").replace(")", r"\)")):
        _request(**kw)


@pytest.mark.parametrize("kw, match", [
    ({"warmup_steps": 2.5}, "warmup_steps must be a whole number, got 2.5"),
    ({"warmup_steps": True}, "warmup_steps must be a number, got bool True"),
    ({"cfg_parallel": "yes"}, "cfg_parallel must be True or False, got 'yes'"),
    ({"mode": "partial", "halo_portion": "0.3"}, "halo_portion must be a number, got str '0.3'"),
    ({"mode": 3}, "unknown mode 3; valid: sync, full, partial, none, distrifusion, pcpp"),
    ({"norm_mode": 1}, "unknown norm_mode 1; valid: exact, corrected, stale, local"),
])
def test_parallel_config_fields_are_validated(kw, match):
    from parafuse.parallel.config import ConfigError
    from parafuse.runtime import ParallelConfig
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        ParallelConfig(**kw)


@pytest.mark.parametrize("args, kw, match", [
    ((123,), {}, "Runtime: model must be a built-in model's name or an nn.Module, got 123 (int)"),
    (("dit-small", "sync"), {}, "Runtime: parallel must be a PatchConfig (or ParallelConfig(...)) or None, got 'sync' (str)"),
    (("dit-small",), {"cuda_graphs": "no"}, "Runtime: cuda_graphs must be True, False or None, got 'no' (str)"),
    (("dit-small",), {"exchange_timeout": "5"}, "exchange_timeout must be a number, got '5' (str)"),
    (("dit-small",), {"startup_timeout": -1}, "startup_timeout must be a positive number of seconds, got -1"),
])
def test_runtime_arguments_are_validated(args, kw, match):
    from parafuse.checks import CheckError
    from parafuse.runtime import Runtime
    with pytest.raises(CheckError, match=match.replace("(", r"\(").replace(")", r"\)")):
        Runtime(*args, **kw)


def test_a_valid_request_still_runs():
    """The validation refuses nothing that ran before: numpy integers, int guidance, a list of stages."""
    import numpy as np

    from parafuse.runtime import Runtime
    from parafuse.stages import parse_stages
    req = _request(steps=np.int64(2), guidance=1, seed=np.uint64(2 ** 64 - 1), solver="ddim",
                   stages=list(parse_stages(["16x16:2", "32x32:3:0.6"])))
    assert torch.isfinite(Runtime("dit-small").generate(req).latent).all()


# ---- 2. ranks that were started differently are refused ----------------------------------------
from support import ROOT  # noqa: E402


def torchrun_script(n: int, *args):
    """torchrun on `n` local ranks of python ARGS (a script and its arguments), in its own session."""
    from support import launch
    return launch.start(n, *args)


@pytest.mark.torchrun
def test_ranks_started_differently_are_refused(tmp_path):
    """Rank 1 of 2 gets another --seed, --mode, --height, --steps and --model: refused right after
    the process group forms, before any model loads, with one line naming each and the ranks."""
    args = ["--model", "dit-small", "--height", "32", "--width", "32", "--steps", "2", "--seed", "0", "--mode", "full",
            "--no-progress", "--out", str(tmp_path / "a.png")]
    proc = torchrun_script(2, os.path.join(ROOT, "tests", "support", "rank_argv.py"), "1",
                           "--seed=5,--mode=sync,--height=48,--steps=3,--model=unet-small", "--", *args)
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    line = ("parafuse.generate: error: ranks disagree on the command line: --height (rank 0 vs rank 1); "
            "--mode (rank 0 vs rank 1); --model (rank 0 vs rank 1); --seed (rank 0 vs rank 1); "
            "--steps (rank 0 vs rank 1): start every rank with the same values")
    assert err.count(line) == 1, err                     # rank 0 prints it; every rank exits 2
    assert set(__import__("re").findall(r"exitcode  : (-?\d+)", err)) <= {"2", "-15"}, err
    assert "/parafuse/" not in err and not list(tmp_path.iterdir())      # no traceback through parafuse


def test_agreement_names_the_value_and_the_ranks_on_every_rank():
    """Over the thread emulator's hub: rank 2 of 4 has another seed and dtype; every rank raises the
    same line. Equal values pass, and the exchange is one sum over every rank."""
    from parafuse.parallel.agreement import DisagreementError, check_same
    from parafuse.parallel.emulator import run_ranks
    from parafuse.parallel.transport import ThreadHub, ThreadTransport

    def run(values_of):
        hub, errors = ThreadHub(4), {}

        def body(rank):
            try:
                check_same(values_of(rank), "the request", transport=ThreadTransport(rank, hub))
            except DisagreementError as e:
                errors[rank] = str(e)
        run_ranks(hub, body)
        return errors
    same = {"seed": 0, "context": torch.ones(2, 3), "stages": None}
    assert run(lambda r: same) == {}
    errors = run(lambda r: {**same, "seed": 7 if r == 2 else 0, "context": torch.ones(2, 3) * (2 if r == 2 else 1)})
    assert set(errors) == {0, 1, 2, 3} and len(set(errors.values())) == 1
    assert errors[0] == ("ranks disagree on the request: seed (ranks 0, 1, 3 vs rank 2); context (ranks 0, 1, 3 "
                         "vs rank 2): start every rank with the same values")


def test_weights_fingerprint_tells_files_of_one_size_apart(tmp_path):
    from safetensors.torch import save_file

    from parafuse.models import weights_fingerprint
    save_file({"w": torch.zeros(4)}, str(tmp_path / "a.safetensors"))
    save_file({"v": torch.zeros(4)}, str(tmp_path / "b.safetensors"))
    a, b = (weights_fingerprint(str(tmp_path / n)) for n in ("a.safetensors", "b.safetensors"))
    assert a[0] == b[0] and a != b and weights_fingerprint(str(tmp_path / "a.safetensors")) == a


# ---- 3. overflow is caught at N > 1 ------------------------------------------------------------
def overflowing_unet():
    """unet-small with every conv weight ×1000: finite weights whose activations overflow float32
    in GroupNorm's Σx² at the first step."""
    from parafuse.models import load_model
    model = load_model("unet-small")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.mul_(1000.0)
    return model


OVERFLOW_REQ = dict(height=96, width=32, steps=3, solver="ddim")
OVERFLOW_LINE = "the latent became NaN or infinite at step 1 of 3"


def test_overflow_stops_one_process_at_step_1():
    from parafuse.health import NonFiniteError
    from parafuse.runtime import Runtime
    with pytest.raises(NonFiniteError, match=f"{OVERFLOW_LINE}; nothing was written"):
        Runtime(overflowing_unet()).generate(_request(**OVERFLOW_REQ))


@pytest.mark.parametrize("mode", ["sync", "full", "partial", "none", "distrifusion", "pcpp"])
def test_overflow_stops_n_ranks_at_the_same_step(mode):
    """N = 2 and 3 emulated ranks: every rank raises the one-process message, at step 1, naming
    every rank (the strips' exchanged statistics turned the overflow into finite garbage before)."""
    from parafuse.health import NonFiniteError
    from parafuse.runtime import emulate
    from parafuse.runtime import ParallelConfig
    for n in (2, 3):
        with pytest.raises(RuntimeError) as info:
            emulate(overflowing_unet(), n, ParallelConfig(mode, 1), _request(**OVERFLOW_REQ))
        assert isinstance(info.value.__cause__, NonFiniteError), info.value
        ranks = ", ".join(map(str, range(n)))
        assert f"{OVERFLOW_LINE} on rank {ranks}; nothing was written" in str(info.value), (mode, n, info.value)


@pytest.mark.torchrun
def test_overflow_under_torchrun_exits_1_naming_the_step(tmp_path):
    from safetensors.torch import save_file
    weights = tmp_path / "huge.safetensors"
    save_file({k: v.contiguous() for k, v in overflowing_unet().state_dict().items()}, str(weights))
    proc = torchrun_script(2, "-m", "parafuse.generate", "--model", "unet-small", "--weights", str(weights),
                           "--height", "96", "--width", "32", "--steps", "3", "--solver", "ddim", "--mode", "full",
                           "--warmup-steps", "1", "--no-progress", "--out", str(tmp_path / "a.png"))
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode != 0
    assert err.count(f"parafuse.generate: error: {OVERFLOW_LINE} on rank 0, 1; nothing was written") == 1, err
    assert not (tmp_path / "a.png").exists()


# ---- 4. the heartbeat decides, in every phase ------------------------------------------------
@pytest.mark.torchrun
def test_rank_stopped_at_its_first_step_is_named(tmp_path):
    """Rank 2 of 3 stops itself as its first (warmup) step begins. The others see its heartbeat
    stop and end the job within --exchange-timeout, each naming it, and it is ended; --startup-timeout
    (20 s here, the process group's own timeout past it) does not apply to a rank that stopped."""
    import re
    import time
    exchange = 3
    args = ["--model", "dit-small", "--height", "48", "--width", "32", "--steps", "5", "--mode", "full",
            "--startup-timeout", "20", "--exchange-timeout", str(exchange), "--no-progress",
            "--out", str(tmp_path / "a.png")]
    start = time.monotonic()
    proc = torchrun_script(3, os.path.join(ROOT, "tests", "support", "rank_argv.py"), "2", "stop", "--", *args)
    try:
        _, err = proc.communicate(timeout=120)              # a guard against a hang, not a timing
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    took = time.monotonic() - start
    err = err.decode()
    assert proc.returncode != 0
    # every live rank names it: by its own deadline, or, ended by torchrun once another rank has
    # exited, from the heartbeats its watchdog saw stop
    for rank in (0, 1):
        assert re.search(rf"parafuse: rank {rank}: [^\n]*(while denoising 32x48|ended by torchrun): rank 2 "
                         r"stopped answering \(no heartbeat for \d+ s", err), err[-3000:]
    assert "/parafuse/" not in err, err[-3000:]             # no backend traceback from a live rank
    assert took < 20, (took, err[-3000:])                   # before --startup-timeout's 20 s
    assert not list(tmp_path.iterdir())


class Beats:
    """torchrun's store as the watchdog reads it: rank 1's heartbeat moves, or is frozen."""

    def __init__(self, alive: bool):
        self.alive, self.n = alive, 0

    def set(self, key, value):
        pass

    def check(self, keys):
        return True

    def get(self, key):
        self.n += 1
        return f"{self.n if self.alive else 7} 0 otherhost 4321".encode()


@pytest.mark.parametrize("alive", [True, False])
def test_startup_deadline_covers_only_a_live_rank(monkeypatch, alive):
    """In the startup phase (startup_timeout 30 s), no progress for exchange_timeout: a peer whose
    heartbeat is frozen is named at once; a live one is waited for."""
    import re
    import threading

    from parafuse import watchdog
    fired, messages = threading.Event(), []
    monkeypatch.setattr(watchdog, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(watchdog, "exit_now", lambda code, msg=None, kill=(): (messages.append(msg), fired.set()))
    dog = watchdog.Watchdog(0, 2, startup_timeout=30, exchange_timeout=0.3, store=Beats(alive))
    try:
        with dog.guard("denoising 32x32", startup_steps=7):
            assert fired.wait(3) is not alive
    finally:
        dog.close()
    if not alive:
        assert re.search(r"no progress for \d+ s while denoising 32x32: rank 1 stopped answering \(no heartbeat for "
                         r"\d+ s, limit --exchange-timeout 0.3 s\); ended", messages[0]), messages[0]


def test_backend_timeout_is_past_both_deadlines():
    from types import SimpleNamespace

    from parafuse.job import backend_timeout
    for startup, exchange in [(20, 300), (600, 3), (5, 5)]:
        assert backend_timeout(SimpleNamespace(startup_timeout=startup, exchange_timeout=exchange)) > \
            max(startup, exchange) + 2 * 2.0         # the watchdog reads the heartbeats twice, 2 s apart


# ---- 3, the pipeline door: overflow is caught there too (once, at the end of its loop) -----------
@pytest.fixture(scope="module")
def huge_sd(tmp_path_factory):
    """The tiny SD pipeline (a U-Net: the strip GroupNorm) with every conv weight of its U-Net ×1000,
    and embeddings for it."""
    from support.diffusers_cases import call_kwargs, pipeline_path

    from parafuse.diffusers import load_pipeline
    root = tmp_path_factory.mktemp("huge")
    pipe = load_pipeline(pipeline_path(str(root), "sd"), progress=False)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.dim() == 4:
                p.mul_(1000.0)
    pipe.save_pretrained(str(root / "sd-huge"))
    kw = call_kwargs("sd")
    torch.save({k: kw[k] for k in ("prompt_embeds", "negative_prompt_embeds")}, root / "e.pt")
    return ["--model", str(root / "sd-huge"), "--prompt-embeds", str(root / "e.pt"), "--height", str(kw["height"]),
            "--width", str(kw["width"]), "--steps", "2", "--guidance", "3", "--no-progress"]


PIPELINE_OVERFLOW = "the latent became NaN or infinite at step 1"      # the built-in door's line, its first step


@pytest.mark.torchrun
def test_pipeline_overflow_writes_nothing_at_n_1_and_2(tmp_path, capsys, huge_sd):
    """The pipeline door: one process and 2 torchrun ranks (mode full) both exit 1 with the built-in
    door's line, naming the step, before anything is written (the session's watch: every
    CHECK_EVERY evaluations and at the end of the call, the exchanged statistics included)."""
    assert main([*huge_sd, "--out", str(tmp_path / "a.png")]) == 1
    assert f"parafuse.generate: error: {PIPELINE_OVERFLOW}; nothing was written" in capsys.readouterr().err
    proc = torchrun_script(2, "-m", "parafuse.generate", *huge_sd, "--mode", "full", "--warmup-steps", "1",
                           "--out", str(tmp_path / "b.png"))
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode != 0
    assert err.count(f"parafuse.generate: error: {PIPELINE_OVERFLOW} on rank 0, 1; nothing was written") == 1, err
    assert not list(tmp_path.iterdir())


# ---- 2, the resolved request: compared before the first step -----------------------------------
def test_resolved_request_is_compared_before_the_first_step():
    """Runtime.generate (the library door, and the CLI through it) over the emulator's transport: a
    weights file of another content on rank 1 (same name, same size), then a request of another
    seed, are named on both ranks before any step."""
    from parafuse.models import load_model
    from parafuse.parallel.agreement import DisagreementError
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.emulator import run_ranks
    from parafuse.parallel.transport import ThreadHub, ThreadTransport
    from parafuse.runtime import ParallelConfig, Runtime
    hub, errors, steps = ThreadHub(2), {}, {}

    def body(rank):
        rt = Runtime(load_model("dit-small"), ParallelConfig("full", 1), layout=ParallelLayout(rank, 2),
                     transport=ThreadTransport(rank, hub))
        rt.weights = (100, "a")
        rt.session.check_same_call(rt.call_values(_request()), "the request")      # the same everywhere: passes
        rt.engine.begin_step = lambda step: steps.setdefault(rank, step)            # any step would be seen
        for weights, request in (((100, "a" if rank == 0 else "b"), _request()),
                                 ((100, "a"), _request(seed=rank))):
            rt.weights = weights
            try:
                rt.generate(request)
            except DisagreementError as e:
                errors.setdefault(rank, []).append(str(e))
    run_ranks(hub, body)
    assert not steps
    assert errors[0] == errors[1] == [
        "ranks disagree on the request: weights file (size, header hash) (rank 0 vs rank 1): start every rank "
        "with the same values",
        "ranks disagree on the request: request.seed (rank 0 vs rank 1): start every rank with the same values"]
