"""The trainer (parafuse.train) and the shipped default weights."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from parafuse import train
from parafuse.models import MODELS, check_weights, load_model

TINY = ["--model", "default", "--batch", "4", "--crop", "32,64", "--eval-every", "2", "--no-progress"]


def _log(path):
    # elapsed_s is wall time, the only field allowed to differ between runs
    with open(path) as f:
        return [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"} for ln in f]


def test_shipped_weights_load_and_match_config():
    spec = MODELS["default"]
    path = spec.weights_path()
    assert os.path.isfile(path) and os.path.getsize(path) <= 20 * 2 ** 20
    state = check_weights(spec, path)                      # keys and shapes match the config
    assert set(state) == set(spec.build().state_dict())
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "default" and json.loads(meta["run"])["model"] == "default"
    model = load_model("default")
    assert all(p.dtype == torch.float32 for p in model.parameters())   # fp16 storage is cast on load
    # trained, not the seeded init
    init = spec.build(0).state_dict()
    assert not torch.equal(model.state_dict()["conv_in.weight"], init["conv_in.weight"])
    assert all(torch.isfinite(v).all() for v in state.values())


def test_train_resume_is_bit_exact(tmp_path):
    torch.set_num_threads(1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main(TINY + ["--steps", "4", "--out", a]) == 0
    assert train.main(TINY + ["--steps", "2", "--out", b]) == 0
    assert train.main(["--resume", os.path.join(b, "checkpoint.safetensors"), "--steps", "4", "--eval-every", "2",
                       "--no-progress"]) == 0
    ca, cb = load_file(os.path.join(a, "checkpoint.safetensors")), load_file(os.path.join(b, "checkpoint.safetensors"))
    assert ca.keys() == cb.keys()
    assert any(k.startswith("opt.") for k in ca) and "rng.train" in ca and "rng.torch" in ca
    for k in ca:
        assert torch.equal(ca[k], cb[k]), k
    assert _log(os.path.join(a, "log.jsonl")) == _log(os.path.join(b, "log.jsonl"))
    assert len(_log(os.path.join(a, "log.jsonl"))) == 4
    # the exported EMA weights are what load_model reads
    m = load_model("default", weights=os.path.join(a, "ema.safetensors"))
    assert torch.equal(m.state_dict()["conv_in.weight"], ca["ema.conv_in.weight"])


def test_training_reduces_loss_quickly(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "r")
    assert train.main(["--batch", "4", "--crop", "32", "--lr", "1e-3", "--steps", "30", "--eval-every", "0",
                       "--no-progress", "--out", out]) == 0
    losses = [r["loss"] for r in _log(os.path.join(out, "log.jsonl"))]
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "3", "--crop", "30"], "--crop sizes must be positive multiples of 16"),
    (["--steps", "3", "--crop", "x"], "--crop must be an integer"),
    (["--steps", "3", "--batch", "0"], "--batch must be >= 1"),
    (["--steps", "3", "--lr", "-1"], "--lr must be in (0, 1)"),
    (["--steps", "3", "--model", "nope"], "unknown model 'nope'"),
    (["--steps", "3", "--held-out", "astronaut,nope"], "unknown held-out photograph 'nope'"),
    (["--steps", "3", "--threads", "0"], "--threads must be >= 1"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--steps", "3", "--resume", "/nonexistent/ckpt.safetensors"], "does not exist"),
    (["--steps", "3", "--cooldown", "5:3"], "--cooldown needs 0 <= START < END"),
    (["--steps", "9", "--cooldown", "0:5"], "past the cooldown's end 5"),
])
def test_bad_args_give_one_line_errors(tmp_path, capsys, argv, needle):
    assert train.main(argv + ["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parafuse.train: error:") and needle in err and "\n" not in err


def test_resume_with_conflicting_settings_is_refused(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert train.main(TINY + ["--steps", "1", "--out", out]) == 0
    ck = os.path.join(out, "checkpoint.safetensors")
    assert train.main(["--resume", ck, "--steps", "2", "--batch", "8", "--no-progress"]) == 2
    assert "conflicts with the checkpoint" in capsys.readouterr().err
    assert train.main(["--resume", ck, "--steps", "0", "--no-progress"]) == 2      # cannot go backwards
