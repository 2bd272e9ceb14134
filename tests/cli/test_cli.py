"""`python -m parafuse.generate` end to end, and every bad input: exit status 2, one clear line
on stderr (no traceback), nothing written."""
import json
import os
import subprocess
import sys

import pytest

from parafuse.generate import main

from support import ROOT  # noqa: E402
REPORT_KEYS = {"model", "height", "width", "steps", "solver", "guidance", "seed", "device", "torch", "world_size",
               "mode", "warmup_steps", "halo_portion", "cfg_parallel", "attention_backend", "stages",
               "total_seconds", "step_seconds", "flops", "ranks", "bytes_sent_per_step", "compare", "dtype",
               "cuda_graphs"}


def test_generate_end_to_end(tmp_path):
    out, rep = tmp_path / "a.png", tmp_path / "a.json"
    proc = subprocess.run([sys.executable, "-m", "parafuse.generate", "--model", "unet-small", "--height", "64",
                           "--width", "96", "--steps", "4", "--out", str(out), "--report", str(rep)],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    img = Image.open(out)
    assert img.size == (96, 64) and img.mode == "RGB"
    report = json.loads(rep.read_text())
    assert REPORT_KEYS <= set(report)
    assert report["world_size"] == 1 and len(report["step_seconds"]) == 4
    assert report["flops"]["total"] == report["flops"]["full_schedule"] > 0
    stage = report["stages"][0]
    assert len(report["stages"]) == 1 and stage["seconds"] == sum(report["step_seconds"])
    assert {k: stage[k] for k in ("height", "width", "steps", "shift", "strength", "evaluations")} == \
        {"height": 64, "width": 96, "steps": 4, "shift": 1.0, "strength": 1.0, "evaluations": 4}
    assert report["ranks"][0]["rows"] == 16
    assert report["dtype"] == "fp32" and report["ranks"][0]["state_bytes"] == 0


def bad(tmp_path, capsys, *args, match):
    out = tmp_path / "x.png"
    before = set(os.listdir(tmp_path))
    code = main(["--model", "dit-small", "--height", "32", "--width", "32", "--steps", "2", "--no-progress",
                 "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    assert set(os.listdir(tmp_path)) == before        # nothing written, not even a temporary file


def test_height_not_a_multiple(tmp_path, capsys):
    bad(tmp_path, capsys, "--height", "33", match="multiples of 8")


def test_unknown_model_lists_valid(tmp_path, capsys):
    bad(tmp_path, capsys, "--model", "sdxl", match="valid models: default, unet-small")


def test_kv_codec_without_stale_kv(tmp_path, capsys):
    bad(tmp_path, capsys, "--mode", "sync", "--kv-codec", "sign",
        match="kv_codec 'sign' (--kv-codec) encodes the stale K/V that full and partial send; mode 'sync' "
              "sends none: use kv_codec 'none', or mode full / partial")


def test_prompt_on_a_built_in_model(tmp_path, capsys):
    bad(tmp_path, capsys, "--prompt", "a lighthouse",
        match="--prompt: only for a diffusers pipeline folder (--model PATH); the built-in models have no text encoder")


def test_text_merge_on_a_built_in_model(tmp_path, capsys):
    bad(tmp_path, capsys, "--text-merge", "exact",
        match="--text-merge: only for diffusers pipelines with joint text+image attention (SD3, Flux, Qwen-Image)")


def test_unknown_solver_lists_valid(tmp_path, capsys):
    bad(tmp_path, capsys, "--solver", "heun9", match="valid solvers: ")


def test_missing_weights(tmp_path, capsys):
    bad(tmp_path, capsys, "--weights", str(tmp_path / "nope.safetensors"), match="does not exist")


def test_corrupt_weights(tmp_path, capsys):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"\x00garbage")
    bad(tmp_path, capsys, "--weights", str(w), match="not a readable safetensors file")


def test_steps_below_one(tmp_path, capsys):
    bad(tmp_path, capsys, "--steps", "0", match="steps must be at least 1")


def test_unwritable_output(tmp_path, capsys):
    bad(tmp_path, capsys, "--out", str(tmp_path / "no" / "such" / "dir.png"), match="does not exist")


def test_existing_output_kept_without_overwrite(tmp_path, capsys):
    out = tmp_path / "x.png"
    out.write_bytes(b"keep me")
    bad(tmp_path, capsys, match="pass --overwrite")
    assert out.read_bytes() == b"keep me"


def test_bad_parallel_settings(tmp_path, capsys):
    bad(tmp_path, capsys, "--mode", "partial", "--halo-portion", "1.5", match="halo_portion (--halo-portion) must lie in [0, 1], got 1.5")
    bad(tmp_path, capsys, "--mode", "full", "--halo-portion", "0.5",
        match="halo_portion (--halo-portion) sets the window of mode partial (and pcpp); mode 'full' attends to the "
              "whole image: leave it out")


def test_guidance_on_unconditional_model(tmp_path, capsys):
    bad(tmp_path, capsys, "--model", "unet-small-text", "--height", "64", "--width", "64", "--guidance", "0.5",
        match="guidance must be >= 1")


def test_too_many_strips_is_rejected_before_compute(tmp_path, capsys):
    from parafuse.parallel.geometry import GeometryError, StripGeometry
    with pytest.raises(GeometryError, match="fewer than the 5 strips"):
        StripGeometry(16, 16, 5, 4)


def test_reference_comparison_in_report(tmp_path, capsys):
    args = ["--model", "dit-small", "--height", "32", "--width", "48", "--steps", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--seed", "1", "--out", str(tmp_path / "b.png"), "--reference", str(tmp_path / "a.png"),
                        "--report", str(tmp_path / "b.json")]) == 0
    cmp = json.loads((tmp_path / "b.json").read_text())["compare"]
    assert cmp["reference"] == str(tmp_path / "a.png")
    assert 5 < cmp["psnr_db"] < 60 and cmp["max_abs_diff"] > 0     # another seed: a different image
    assert main(args + ["--out", str(tmp_path / "c.png"), "--reference", str(tmp_path / "a.png"),
                        "--report", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["compare"]["psnr_db"] > 50   # same seed: 8-bit rounding only


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    bad(tmp_path, capsys, "--device", "cuda", match="has no CUDA device")


def test_bf16_run_reports_its_dtype(tmp_path):
    rep = tmp_path / "b.json"
    assert main(["--model", "dit-small", "--height", "32", "--width", "32", "--steps", "2", "--no-progress",
                 "--dtype", "bf16", "--out", str(tmp_path / "b.png"), "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["dtype"] == "bf16"


def test_no_cuda_graphs_runs_eagerly_and_says_so(tmp_path):
    rep = tmp_path / "e.json"
    assert main(["--model", "dit-small", "--height", "32", "--width", "32", "--steps", "2", "--no-progress",
                 "--no-cuda-graphs", "--out", str(tmp_path / "e.png"), "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["cuda_graphs"] is False


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_graphs_on_cpu_is_a_clear_error(tmp_path, capsys):
    bad(tmp_path, capsys, "--cuda-graphs", match="cuda_graphs (--cuda-graphs) needs a CUDA device; this run is on cpu")
