"""Reliability (issue 14), one test per class of failure: non-finite values, a stopped rank,
outputs committed together, errors before compute, requests that cannot fit, a strict report,
clear messages, and quiet exits under torchrun. Bad inputs must give exit status 2, one line and
nothing written; failures during a run exit non-zero and write nothing."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from parafuse import checks
from parafuse.generate import main
from parafuse.health import CHECK_EVERY, NonFiniteError
from parafuse.models import load_model
from parafuse.outputs import commit, temp_name
from parafuse.parallel.distributed import ParallelLayout
from parafuse.runtime import emulate
from parafuse.parallel.transport import NullTransport
from parafuse.runtime import ParallelConfig, Request, Runtime

from support import ROOT  # noqa: E402
from support.processes import FakeStore, Stderr, stop_a_rank_and_expect_it_named, torchrun  # noqa: E402
SMALL = ["--model", "dit-small", "--height", "32", "--width", "32", "--steps", "2", "--no-progress"]


def bad(tmp_path, capsys, *args, match, code=2, base=SMALL):
    """`args` is refused before compute: status `code`, one line naming `match`, nothing written."""
    before = set(os.listdir(tmp_path))
    got = main([*base, "--out", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    assert set(os.listdir(tmp_path)) == before


# ---- 1. non-finite values --------------------------------------------------------------------
def test_repeated_timestep_is_refused_with_the_steps_that_fit(tmp_path, capsys):
    bad(tmp_path, capsys, "--model", "unet-small-vp", "--height", "16", "--width", "16", "--steps", "1000",
        match="repeats a timestep at step 500 (model 'unet-small-vp' has 1000 training timesteps): use --steps 999")


@pytest.mark.parametrize("guidance", ["nan", "inf", "-inf", "1e38"])
def test_guidance_must_be_finite_and_sane(tmp_path, capsys, guidance):
    bad(tmp_path, capsys, "--label", "1", f"--guidance={guidance}", match="guidance")


def test_weights_holding_nan_are_refused(tmp_path, capsys):
    from safetensors.torch import save_file
    state = {k: v.clone() for k, v in load_model("dit-small").state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(tmp_path / "w.safetensors"))
    bad(tmp_path, capsys, "--weights", str(tmp_path / "w.safetensors"), match="holds NaN or infinite values")


def nan_after(model, evals: int, traces: int = 2):
    """Make the model's output NaN from its `evals`-th call on, after `traces` shape traces (a
    Runtime traces the model twice when it is built)."""
    calls = [0]

    def hook(mod, args, out):
        calls[0] += 1
        return out * float("nan") if calls[0] >= evals + traces else out
    model.register_forward_hook(hook)
    return model


def test_nan_stops_the_run_naming_the_step():
    steps = CHECK_EVERY + 4
    rt = Runtime(nan_after(load_model("dit-small"), 3), ParallelConfig())
    with pytest.raises(NonFiniteError, match=f"at step 3 of {steps}; nothing was written"):
        rt.generate(Request(32, 32, steps=steps))


def test_a_rank_that_meets_nan_stops_every_rank_together():
    """Rank 1 of 3 goes NaN; all ranks meet the same error at the next check instead of waiting."""
    def on_rank(rt):
        if rt.layout.rank == 1:
            nan_after(rt.model, 2, traces=0)
    with pytest.raises(RuntimeError) as info:
        emulate(load_model("dit-small"), 3, ParallelConfig("full", 1), Request(48, 32, steps=5), on_rank=on_rank)
    assert isinstance(info.value.__cause__, NonFiniteError), info.value
    assert "at step 2 of 5 on rank 1" in str(info.value)


# ---- 2. a stopped rank -------------------------------------------------------------------------
def steps_running(out):
    """A long run with a progress bar (rank 0), so the test can wait until denoising is steady."""
    return ["--model", "dit-small", "--height", "48", "--width", "32", "--steps", "5000", "--solver", "ddim",
            "--warmup-steps", "1", "--out", str(out), "--overwrite"]


@pytest.mark.torchrun
def test_stopped_rank_ends_the_job_naming_it(tmp_path):
    timeout = 3
    proc = torchrun(3, *steps_running(tmp_path / "s.png"), "--exchange-timeout", str(timeout))
    stop_a_rank_and_expect_it_named(proc, 2, r"\| *[2-9]\d/5000", timeout, tmp_path)


@pytest.mark.parametrize("peer_alive, here, named, killed", [
    (False, False, "rank 1 stopped answering", ()),
    (False, True, "rank 1 stopped answering", (4321,)),     # a stopped rank on this host is ended, after the line
    (True, True, "rank 1 is alive but stuck after 2 steps", ())])
def test_watchdog_names_the_rank(monkeypatch, peer_alive, here, named, killed):
    """The deadline fires only inside a guard, after no progress; it names the peer from its heartbeat."""
    import socket

    from parafuse import watchdog
    fired = threading.Event()
    messages = []
    monkeypatch.setattr(watchdog, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(watchdog, "exit_now",
                        lambda code, msg=None, kill=(): (messages.append((code, msg, kill)), fired.set()))
    store = FakeStore(peer_alive, socket.gethostname() if here else "otherhost")
    dog = watchdog.Watchdog(0, 2, startup_timeout=0.3, exchange_timeout=0.3, store=store)
    try:
        time.sleep(0.6)
        assert not fired.is_set()                        # no guard: nothing is watched
        with dog.guard("denoising 32x32", startup_steps=1):
            for _ in range(3):
                dog.progress()
            assert fired.wait(10)
    finally:
        dog.close()
    code, msg, kill = messages[0]
    assert code == watchdog.EXIT_FAILED and "rank 0: no progress for" in msg and named in msg, msg
    assert kill == killed


def test_watchdog_thread_is_stopped_at_exit_when_never_closed():
    # a heartbeat thread left inside a store call while the interpreter finalizes can abort the
    # process (SIGABRT; parafuse.watchdog._close_at_exit): an exit handler stops it. Handlers run last-in
    # first-out, so the one registered first sees the thread after the watchdog's own has run.
    code = ("import atexit, threading\n"
            "from parafuse import watchdog\n"
            "atexit.register(lambda: print('alive' if any(t.name == 'parafuse-watchdog' and t.is_alive()\n"
            "                                     for t in threading.enumerate()) else 'stopped'))\n"
            "watchdog.start(0, 1, 60.0, 60.0)\n"
            "assert any(t.name == 'parafuse-watchdog' for t in threading.enumerate())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stopped"


# ---- 3. outputs committed together -----------------------------------------------------------
def test_colliding_outputs_are_refused(tmp_path, capsys):
    bad(tmp_path, capsys, "--report", str(tmp_path / "x.png"), match="--out and --report are the same file")
    bad(tmp_path, capsys, "--batch", "2", "--report", str(tmp_path / "x-1.png"),
        match="--out (image 1) and --report are the same file")


def test_commit_writes_all_or_nothing(tmp_path):
    good, missing = str(tmp_path / "a.png"), str(tmp_path / "no" / "b.png")
    with pytest.raises(OSError):
        commit({good: b"1", missing: b"2"})
    assert not list(tmp_path.iterdir())                  # neither output nor temporary file
    commit({good: b"1", str(tmp_path / "b.json"): b"2"})
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.json"]
    assert len(os.path.basename(temp_name(good))) - len("a.png") <= checks.TEMP_SUFFIX_LEN


def test_interrupted_batch_writes_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "kernels")]), OMP_NUM_THREADS="1")
    # Ctrl-C's default disposition in the child: a runner that starts the tests in the background
    # (SIGINT ignored, which children inherit) would otherwise make the run ignore it
    proc = subprocess.Popen([sys.executable, "-m", "parafuse.generate", *steps_running(tmp_path / "b.png"),
                             "--batch", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = Stderr(proc)
    try:
        err.wait_for(r"\| *[1-9]\d*/5000")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err.thread.join(5)
    assert proc.returncode == 130
    assert err.text.rstrip().splitlines()[-1] == "parafuse.generate: interrupted" and "Traceback" not in err.text
    assert not list(tmp_path.iterdir())


@pytest.mark.torchrun
def test_interrupted_batch_under_torchrun_writes_nothing(tmp_path):
    proc = torchrun(2, *steps_running(tmp_path / "b.png"), "--batch", "2")
    err = Stderr(proc)
    try:
        err.wait_for(r"\| *[1-9]\d*/5000")
        os.killpg(proc.pid, signal.SIGINT)               # what Ctrl-C sends: torchrun and every rank
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err.thread.join(5)
    assert proc.returncode != 0
    ours = [line for line in err.text.splitlines() if "parafuse" in line and "/parafuse/" not in line]
    assert ours == ["parafuse.generate: interrupted"], err.text[-3000:]
    assert "/parafuse/" not in err.text                  # no traceback through parafuse's code
    assert not list(tmp_path.iterdir())


# ---- 4. errors before compute ----------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--out", ""], "--out is empty"),
    (["--out", "x" * 300 + ".png"], "use a shorter name"),
    (["--out", "o.jpg"], "writes lossless 8-bit PNG only"),
    (["--device", "gpu0"], "unknown device 'gpu0'; use cpu, cuda or cuda:N"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--exchange-timeout", "0"], "exchange_timeout (--exchange-timeout) must be a positive number of seconds"),
])
def test_bad_outputs_and_devices(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    assert main([*SMALL, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert set(os.listdir(tmp_path)) == before


def test_bad_references(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "r.jpg", format="JPEG")
    Image.new("RGB", (64, 32)).save(tmp_path / "r.png")
    (tmp_path / "t.png").write_text("not an image")
    bad(tmp_path, capsys, "--reference", str(tmp_path / "r.jpg"), match="is JPEG, not PNG")
    bad(tmp_path, capsys, "--reference", str(tmp_path / "r.png"), match="is 64x32, the output 32x32")
    bad(tmp_path, capsys, "--reference", str(tmp_path / "t.png"), match="is not a readable image")
    bad(tmp_path, capsys, "--reference", str(tmp_path), match="is a folder; give a PNG file")


# ---- 5. requests that cannot fit -------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--height", "1000000", "--width", "1000000"], "needs at least"),
    (["--steps", "1000000000"], "steps must be at most 10000"),
    (["--batch", "100000"], "batch must be at most 1024"),
])
def test_absurd_sizes_are_refused(tmp_path, capsys, args, match):
    bad(tmp_path, capsys, *args, match=match)


def test_memory_estimate_follows_the_strips_and_names_what_fits(monkeypatch):
    req = Request(2048, 1024, steps=2)

    def runtime(n):
        return Runtime(load_model("unet-small"), ParallelConfig("partial"), layout=ParallelLayout(0, n),
                       transport=NullTransport(0, n))
    one, four = (checks.estimate_memory(rt, req, rt.check(req)) for rt in (runtime(1), runtime(4)))
    assert four["activations"] < one["activations"] / 3 and four["exchange_buffers"] > 0 == one["exchange_buffers"]
    rt = runtime(1)
    monkeypatch.setattr(checks, "available_memory", lambda device: one["total"] // 3)
    with pytest.raises(checks.CheckError, match=r"use about [3-9] ranks, or an image of at most \d+x\d+ px"):
        rt.check(req)


def test_memory_estimate_counts_the_kv_codec_drift():
    """`--kv-codec sign` holds a drift buffer as large as each K/V buffer: the floor doubles them."""
    req = Request(512, 512, steps=2)

    def buffers(codec):
        rt = Runtime(load_model("dit-small"), ParallelConfig("full", kv_codec=codec), layout=ParallelLayout(0, 4),
                     transport=NullTransport(0, 4))
        return checks.estimate_memory(rt, req, rt.check(req))["exchange_buffers"]
    assert buffers("sign") == 2 * buffers("none") > 0      # dit-small: attention is its only exchange buffer


# ---- 6. the report --------------------------------------------------------------------------
def test_report_is_strict_json_when_identical(tmp_path):
    rep = tmp_path / "r.json"
    assert main([*SMALL, "--out", str(tmp_path / "a.png"), "--compare-serial", "--report", str(rep)]) == 0

    def no_constants(name):
        raise AssertionError(f"{name} in the report")
    cmp = json.loads(rep.read_text(), parse_constant=no_constants)["compare"]
    assert cmp["psnr_db"] is None and cmp["identical"] is True and cmp["max_abs_diff"] == 0


@pytest.mark.parametrize("args, match", [
    (["--mode", "none", "--norm", "exact"], "norm_mode 'exact' (--norm) does not apply with mode none"),
    (["--mode", "partial", "--halo-portion", "0", "--norm", "corrected"], "mode partial with halo_portion 0"),
    (["--mode", "sync", "--norm", "stale"], "norm_mode 'stale' (--norm) does not apply with mode sync"),
])
def test_settings_that_do_not_apply_are_refused(tmp_path, capsys, args, match):
    bad(tmp_path, capsys, *args, match=match)


# ---- 7. clear messages -----------------------------------------------------------------------
def test_huge_seed(tmp_path, capsys):
    bad(tmp_path, capsys, "--seed", str(10 ** 30), match="seed must be an integer in [0, 2^64 - 1]")


def test_strip_errors_in_pixels():
    rt = Runtime(load_model("unet-small"), ParallelConfig("full"), layout=ParallelLayout(0, 8),
                 transport=NullTransport(0, 8))
    with pytest.raises(checks.CheckError, match=r"height 64 px is too short for 8 strips .* use at most \d rank"
                                                r"\(s\) at this height, or a height of at least \d+ px"):
        rt.check(Request(64, 64))


def test_bare_cuda_takes_the_local_rank(monkeypatch):
    from parafuse.parallel.distributed import pick_device
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("cuda") == torch.device("cuda", 3)


# ---- 8. torchrun: user errors exit 2, one line ------------------------------------------------
@pytest.mark.torchrun
def test_user_error_under_torchrun(tmp_path):
    proc = torchrun(2, *SMALL, "--height", "33", "--out", str(tmp_path / "u.png"))
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert err.count("parafuse.generate: error: height and width must be positive multiples of 8") == 1, err
    # torchrun's summary lists each rank: status 2, or torchrun's SIGTERM if another rank's 2 came first
    codes = re.findall(r"exitcode  : (-?\d+)", err)
    assert "2" in codes and set(codes) <= {"2", "-15"}, err
    assert "/parafuse/" not in err                       # no traceback through parafuse's code
    assert not list(tmp_path.iterdir())
