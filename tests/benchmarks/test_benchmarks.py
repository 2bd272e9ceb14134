"""The GPU check's logic, run on CPU with tiny models (CI has no GPU): every section completes and
reports, and its JSON is the schema the README's tables are read from."""
import json

import pytest
import os
import subprocess
import sys

from support import ROOT  # noqa: E402


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    only = ["cli", "nccl", "sync", "scaling", "graphs", "bandwidth", "kernels", "bottleneck", "projection"]   # pipelines: below
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(out),
                           "--only", *only],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["schema"] == "parafuse.bench/1" and res["benchmark"] == "gpu_check" and res["config"]["smoke"]
    assert {r["section"].split()[0] for r in res["rows"]} >= {"cli", "sync", "scaling"}   # the summary table's rows
    sections = res["sections"]
    assert set(sections) == {"cli", "nccl", "sync", "scaling", "graphs", "bandwidth", "kernels", "bottleneck",
                             "projection"}
    assert sections["bottleneck"]["result"]["flops_saving"] > 2 and sections["bottleneck"]["result"]["wall_clock_saving"] > 0
    assert all(r["projected_speedup"] > 0 for r in sections["projection"]["result"]["nvlink4"])
    assert all("error" not in s for s in sections.values())
    assert sections["cli"]["result"]["bf16"]["exit"] == 0 and sections["cli"]["result"]["bf16"]["dtype"] == "bf16"
    assert sections["nccl"]["result"]["exit"] == 0
    assert all(r["fp32_ok"] for r in sections["sync"]["result"].values())
    rows = sections["scaling"]["result"]["rows"]
    strips = [r for r in rows if r.get("mode") in ("full", "partial")]
    assert {r["n"] for r in strips} == {2, 4, 8}
    assert all(r["speedup"] > 0 and r["bytes_per_step"]["attn_kv"] > 0 for r in strips)
    assert sections["graphs"]["result"] == {"skipped": "CUDA graphs need a CUDA device"}
    assert "| section | result |" in proc.stdout


def test_gpu_check_pipelines_smoke_on_cpu(tmp_path):
    """The pipelines sections on tiny SDXL-U-Net and Flux configs (the same diffusers classes and code
    path as the GPU's published sizes): every row measured, sync equal to serial, rows in the JSON."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(out),
                           "--only", "pipelines", "pipelines_4096"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    rows = [r for name in ("pipelines", "pipelines_4096") for r in sections[name]["result"]["rows"]]
    assert all("error" not in r and "skipped" not in r for r in rows), [r.get("error") for r in rows]
    compute = [r for r in rows if r["kind"] == "compute"]
    assert [(r["model"], r["n"], r["mode"], r["cfg_parallel"]) for r in compute[:4]] == [
        ("sdxl", 8, "full", False), ("sdxl", 8, "partial", False), ("sdxl", 8, "full", True), ("flux", 8, "full", False)]
    for r in compute:
        assert r["speedup"] > 0 and r["cuda_graphs"] is False
        assert r["sync_vs_serial"]["whole"]["rel_rms"] < 1e-5      # fp32 on the CPU: sync is the serial model
        # even strips: the U-Net's ceiling is N; Flux's text tokens, replicated, keep it below
        assert r["ceiling"] == r["n"] if r["model"] == "sdxl" else 1 < r["ceiling"] < r["n"]
    assert all(r["bytes_sent_per_evaluation"]["attn_kv"] > 0 for r in compute if r["model"] == "flux")
    loops = {r["model"]: r for r in rows if r["kind"] == "loop"}
    assert set(loops) == {"sdxl", "flux"} and all(r["rank"]["evaluations"] == r["steps"] for r in loops.values())
    assert loops["sdxl"]["full_emulated_psnr_db"] > 30 and loops["sdxl"]["partial_emulated_psnr_db"] > 30
    # each row was written to the sections' own JSON as it ended
    written = json.loads((tmp_path / "gpu_check_pipelines.json").read_text())
    assert written["schema"] == "parafuse.bench/1" and set(written["sections"]) == {"pipelines", "pipelines_4096"}
    assert [{k: v for k, v in r.items() if k != "section"} for r in written["rows"] if r["section"] == "pipelines"] == \
        json.loads(json.dumps(sections["pipelines"]["result"]["rows"]))
    assert "target pipelines flux 2048² full N=8 >= 6.0x" in proc.stdout
    sdxl_target = next(line for line in proc.stdout.splitlines() if "target pipelines sdxl 2048² full N=8" in line)
    assert "; partial" in sdxl_target and "dB against serial" in sdxl_target


def test_pipelines_ceiling_counts_the_replicated_text_tokens():
    """Flux-dev at N = 8: ~7.1x at 2048² and ~7.8x at 4096² (issue 24), from the token counts; the
    U-Net's ceiling is N (its every FLOP splits with the rows), twice the strips' with CFG parallel."""
    import pipelines_gpu as p

    flux, sdxl = p.FAMILIES["flux"], p.FAMILIES["sdxl"]
    assert 7.0 < p.ceiling(flux, 128 * 128, 16 * 128, 1) < 7.3
    assert 7.7 < p.ceiling(flux, 256 * 256, 32 * 256, 1) < 8.0
    assert p.ceiling(flux, 128 * 128, 128 * 128, 1) == 1.0
    assert p.ceiling(sdxl, 256 * 256, 32 * 256, 1) == 8.0 and p.ceiling(sdxl, 256 * 256, 64 * 256, 2) == 8.0


def test_gpu_check_targets_read_eager_and_graphed_rows_apart():
    import gpu_check

    def row(model, size, n, speedup, graphs, **kw):
        return {"model": model, "size": size, "mode": "full", "n": n, "speedup": speedup, "cuda_graphs": graphs, **kw}

    results = {"sections": {"scaling": {"result": {"rows": [row("unet-xl", 2048, 8, 1.5, False)]}},
                            "graphs": {"result": {"rows": [row("unet-xl", 2048, 4, 3.2, True),
                                                           row("unet-xl", 2048, 8, 5.2, True, kernels="triton"),
                                                           row("unet-xl", 2048, 8, 4.7, True)]}}}}
    extra = [row("unet-xl", 4096, 8, 5.9, False, command="python benchmarks/scaling.py --sizes 4096"),
             row("unet-xl", 2048, 8, 9.0, False, command="an eager run")]   # not a graphed target's row
    got = {r["section"]: r["result"] for r in gpu_check.target_rows(results, extra)}
    assert got["target unet-xl 2048² graphed, N = 4 >= 3.0x"] == "met: 3.20x"
    assert got["target unet-xl 2048² graphed, N = 8 >= 5.0x"] == "MISSED: 4.70x"
    assert got["target unet-xl 2048² graphed, --kernels triton, N = 8 >= 5.0x"] == "met: 5.20x"
    assert got["target unet-xl 4096² full, N = 8 >= 6.0x"] == "MISSED: 5.90x (`python benchmarks/scaling.py --sizes 4096`)"
    assert got["target dit-xl 4096² full, N = 8 >= 7.5x"] == "not measured"


def test_scaling_rows_measure_each_kernel_choice(monkeypatch):
    """`kernels` reaches each strip's runtime and labels its row; the serial step is the plain
    model's. (The runtime records what it asked for and runs the PyTorch path: through Triton's
    interpreter the kernels would take minutes here, and its ATen ops say nothing of a GPU's.)"""
    import torch

    import scaling

    asked, real = [], scaling.Runtime

    def runtime(model, config, **kwargs):           # the run's PatchConfig carries its kernels
        asked.append((kwargs.get("layout") is not None, str(config.kernels)))
        return real(model, config.replace(kernels="torch"), **kwargs)

    monkeypatch.setattr(scaling, "Runtime", runtime)
    rows = scaling.scaling_rows("unet-small", [32], [1, 2], ["full"], torch.device("cpu"), None, repeat=1,
                                log=lambda *_: None, kernels=("torch", "triton"))
    # like with like: a serial row on each kernel choice, each strip against the serial on its kernels
    assert [(r["mode"], r.get("kernels")) for r in rows] == [("serial", "torch"), ("serial", "triton"),
                                                             ("full", "torch"), ("full", "triton")]
    assert all(r["speedup"] > 0 for r in rows)
    assert set(asked) == {(False, "torch"), (False, "triton"), (True, "torch"), (True, "triton")}
    serial = {r["kernels"]: r["seconds"] for r in rows if r["mode"] == "serial"}
    for r in rows:
        if r["mode"] == "serial":
            assert r["kernel_gain"] == serial["torch"] / r["seconds"]
        else:
            assert r["serial_seconds"] == serial[r["kernels"]] and r["speedup"] == serial[r["kernels"]] / r["seconds"]
            assert r["speedup_vs_torch_serial"] == serial["torch"] / r["seconds"]
        assert r["seconds_min"] <= r["seconds"] <= r["seconds_max"] and r["host_bound"] is None    # CPU: no flag


def test_serial_step_with_the_strips_patch_layers_equals_the_plain_serial_step():
    """The like-with-like serial baseline: the strips' patch layers on a one-strip engine compute the
    plain model's step (to float rounding) and send nothing."""
    import torch

    import scaling
    from parafuse.models import load_model
    from parafuse.runtime import ParallelConfig, Request, Runtime

    req = Request(64, 48, 3, "ddim", 1.0, seed=7, label=3)
    model = load_model("unet-small")
    plain = Runtime(model, ParallelConfig()).generate(req).latent
    rt = scaling.serial_runtime(model, torch.device("cpu"), None, False, "torch", patch_layers=True)
    assert rt.engine is not None and rt.engine.n == 1
    assert (rt.generate(req).latent - plain).abs().max() <= 1e-5
    assert rt.transport.totals() == ({}, {})


def test_scaling_rows_reuse_a_measured_serial_step(monkeypatch):
    """`serial_rows`: a serial row measured by an earlier call is reused (no serial runtime built,
    no serial row repeated) and the strips' speedups are against it."""
    import torch

    import scaling

    serial = {"model": "unet-small", "size": 32, "mode": "serial", "n": 1, "seconds": 123.0, "aten_ops": 1,
              "peak_memory_bytes": None}
    built, real = [], scaling.Runtime

    def runtime(*args, **kwargs):
        built.append(kwargs.get("layout") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(scaling, "Runtime", runtime)
    rows = scaling.scaling_rows("unet-small", [32], [2], ["full"], torch.device("cpu"), None, repeat=1,
                                log=lambda *_: None, serial_rows=[serial])
    assert [r["mode"] for r in rows] == ["full"] and all(built)
    assert rows[0]["serial_seconds"] == 123.0 and rows[0]["speedup"] == 123.0 / rows[0]["seconds"]


@pytest.mark.torchrun
def test_multi_gpu_check_smoke_on_cpu_with_gloo(tmp_path):
    """The multi-GPU check is ready for the day several GPUs are lent: its logic runs here over gloo."""
    out = tmp_path / "mgc.json"
    from support import launch
    proc = launch.run(2, "benchmarks/multi_gpu_check.py", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo"
    checks = {r["check"]: r for r in res["rows"]}
    assert all(r["ok"] for r in res["rows"])
    assert checks["unet-small partial = emulator"]["value"] <= 1e-4
    assert any("speedup at N=2" in c for c in checks)


def run_script(args, tmp_path, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_quality_benchmark_compares_modes_and_baselines(tmp_path):
    name = str(tmp_path / "q")
    run_script(["benchmarks/quality.py", "--models", "unet-small", "--sizes", "64", "--steps", "3", "--ranks", "2",
                "--warmup", "1", "--warmups", "1", "--portions", "0.3", "--seeds", "0", "1", "--name", name], tmp_path)
    res = json.load(open(name + ".json"))
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"full", "partial", "none", "distrifusion", "pcpp"}
    assert rows["full"]["seeds"] == 2 and rows["full"]["psnr_sd"] >= 0
    assert 10 < rows["none"]["psnr_db"] < rows["full"]["psnr_db"] < 99 and 0 < rows["full"]["ssim"] <= 1
    # patch-SWD of each mode's 2 images pooled against the 2 serial images: a distance, per pyramid level
    assert all(r["patch_swd_images"] == 2 and len(r["patch_swd_levels"]) == 3 and r["patch_swd"] > 0 for r in rows.values())
    # the baselines: more bytes; DistriFusion's corrected statistics cost quality against parafuse's exact ones
    assert rows["distrifusion"]["psnr_db"] < rows["full"]["psnr_db"]
    assert rows["distrifusion"]["bytes_per_step_busiest_rank"] > rows["full"]["bytes_per_step_busiest_rank"]
    assert rows["pcpp"]["bytes_per_step_busiest_rank"] > rows["partial"]["bytes_per_step_busiest_rank"]
    (target,) = res["targets"]
    assert target["bytes_share"] == rows["partial"]["bytes_per_step_busiest_rank"] / \
        rows["distrifusion"]["bytes_per_step_busiest_rank"]
    assert os.path.exists(name + ".png")


def test_compile_cost_benchmark_counts_what_dynamo_compiled(tmp_path):
    """One row per way of compiling; the uncompiled pipeline compiles nothing, the compiled ones
    compile pieces between graph breaks (parafuse's exchanges), and both calls are timed."""
    name = str(tmp_path / "c")
    run_script(["benchmarks/compile_cost.py", "--families", "sd-lite", "--steps", "2", "--repeat", "2",
                "--name", name], tmp_path)
    res = json.load(open(name + ".json"))
    rows = {r["way"]: r for r in res["rows"]}
    assert set(rows) == {"uncompiled", "before", "in-place"}
    assert rows["uncompiled"]["frames_compiled"] == rows["uncompiled"]["graph_breaks"] == 0
    for way in ("before", "in-place"):
        assert rows[way]["backend"] == "eager" and rows[way]["frames_compiled"] > 1 and rows[way]["graph_breaks"] > 0
        assert rows[way]["recompile_limit_hits"] == len(rows[way]["limit_hit_functions"]) == 0
    assert all(r["first_call_s"] > 0 and r["steady_call_s"] > 0 for r in rows.values())
    assert os.path.exists(name + ".png")


def test_throughput_benchmark_times_cold_and_warm(tmp_path):
    name = str(tmp_path / "t")
    run_script(["benchmarks/throughput.py", "--model", "unet-small", "--size", "64", "--steps", "2", "--warmup", "1",
                "--ranks", "1", "2", "--name", name], tmp_path)
    res = json.load(open(name + ".json"))
    one, two = res["rows"]
    assert one["n"] == 1 and two["n"] == 2 and one["latency_speedup"] == 1.0
    for r in res["rows"]:
        assert 0 < r["patch_warm_s"] < r["patch_cold_s"] and 0 < r["solo_warm_s"] < r["solo_cold_s"]
    assert two["solo_images_per_s"] > 0 and os.path.exists(name + ".png")


def test_performance_page_is_generated_from_the_committed_results():
    """docs/performance.md is the committed JSON's: `python benchmarks/report.py` was run after them
    (regenerated here and diffed)."""
    run_script(["benchmarks/report.py", "--check"], None)


def test_target_scoreboard_keeps_n8_verdicts_of_the_cheap_modes_from_the_run_with_most_seeds(tmp_path):
    """report.py's targets at a glance: the verdicts at N = 8 of `partial` (default p) and `full+sign`,
    one per request, from the run with the most seeds; N = 4 verdicts, other modes and the p sweep
    stay out; the 1024² quality target reads its row's PSNR against 30 and 32 dB."""
    import report

    def row(model, size, n, mode, seeds, psnr=40.0, portion=0.3):
        return {"model": model, "size": size, "steps": 20, "n": n, "mode": mode, "warmup": 4, "seeds": seeds,
                "portion": portion if mode.startswith("partial") else None, "psnr_db": psnr, "psnr_sd": 0.1}

    def verdict(model, size, n, mode, share, portion=0.3):
        return {"model": model, "size": size, "steps": 20, "n": n, "mode": mode, "warmup": 4,
                "portion": portion if mode.startswith("partial") else None, "bytes_share": share,
                "steady_bytes_share": share / 2, "bytes_limit": 0.1, "psnr_gap_db": 0.5, "met": share <= 0.1}

    few = {"args": {"dtype": "fp32"}, "rows": [row("dit-x", 256, 8, "partial", 2), row("dit-x", 256, 4, "partial", 2)],
           "targets": [verdict("dit-x", 256, 8, "partial", 0.5), verdict("dit-x", 256, 4, "partial", 0.05)]}
    many = {"args": {"dtype": "fp32"},
            "rows": [row("dit-x", 256, 8, "partial", 4), row("dit-x", 256, 8, "partial", 4, portion=0.1),
                     row("dit-x", 256, 8, "full+sign", 4), row("dit-x", 256, 8, "partial+sign", 4),
                     row("default", 1024, 8, "partial", 4, psnr=31.0)],
            "targets": [verdict("dit-x", 256, 8, "partial", 0.2), verdict("dit-x", 256, 8, "partial", 0.08, 0.1),
                        verdict("dit-x", 256, 8, "full+sign", 0.07), verdict("dit-x", 256, 8, "partial+sign", 0.01)]}
    for name, res in (("quality_a_cpu.json", few), ("quality_b_cpu.json", many)):
        (tmp_path / name).write_text(json.dumps(res))
    verdicts, quality = report.target_scoreboard(str(tmp_path))
    assert [(v["mode"], v["seeds"], v["bytes_share"], v["met"], v["met_steady"], v["source"]) for v in verdicts] == [
        ("full+sign", 4, 0.07, True, True, "quality_b_cpu.json"),
        ("partial", 4, 0.2, False, True, "quality_b_cpu.json")]
    (q,) = quality
    assert (q["psnr_db"], q["met"], q["goal_met"], q["source"]) == (31.0, True, False, "quality_b_cpu.json")


def test_kernels_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/kernel_timings.py's logic through Triton's interpreter: every section reports, with the
    attention backends of this machine, the fused update and the GroupNorm pair (no speed figures)."""
    out, auto = tmp_path / "kernels.json", tmp_path / "auto.json"
    proc = subprocess.run([sys.executable, "benchmarks/kernel_timings.py", "--smoke", "--out", str(out), "--write-auto", str(auto)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "kernels")]),
                                   OMP_NUM_THREADS="1", TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["schema"] == "parafuse.bench/1" and res["benchmark"] == "kernel_timings" and res["config"]["smoke"]
    assert res["smoke"] and {"rows", "update", "groupnorm"} <= set(res)      # rows: the attention rows
    assert {(r["model"], r["n"], r["mode"]) for r in res["rows"]} >= {("pixart", 4, "partial"), ("flux", 1, "full")}
    assert all(r["triton_tflops"] > 0 and r["sdpa_tflops"] > 0 for r in res["rows"])
    assert all(r["triton_us"] > 0 and r["triton_spread"] >= 0 and "triton_config" in r and r["shape"] in ("short", "long")
               for r in res["rows"])
    assert res["provenance"]["commit"] and res["batch"] == 2
    # the auto table the run writes is well-formed, one entry per head dim and shape class, from this run
    from parafuse.attention import check_auto_table
    entries = check_auto_table(json.loads(auto.read_text()))
    assert set(entries) == {("cpu", r["head_dim"], r["shape"]) for r in res["rows"]}
    assert all("--smoke" in e["source"] for e in entries.values())
    assert all(r["prologue_speedup"] > 0 for r in res["rows"] if r["model"] == "flux")
    assert {(r["shape"], r["dtype"]) for r in res["update"]} >= {("large", "float32"), ("large", "bfloat16")}
    assert res["groupnorm_bits"]["reruns_equal"] is True
    assert (tmp_path / "kernels.png").exists()


def test_attention_reach_window_mask_counts_partial_rows():
    """The keys `partial` shows a query: its strip's rows plus ceil(p·rows) (>= 1) of each neighbour's."""
    from benchmarks.attention_reach import visible_mask
    m = visible_mask((2, 2, 2, 2), 3, 0.3)                 # 8 token rows of 3 columns; window 1 row
    assert m.shape == (24, 24)
    rows = m[::3, ::3]                                     # one query and key per row
    assert rows[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]    # top strip: itself and 1 row below
    assert rows[3].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]    # strip 1: 1 row above, itself, 1 row below
    assert m.float().mean().item() == (3 + 4 + 4 + 3) / 4 / 8
    assert visible_mask((3, 2, 4), 2, 1.0).all() == False and visible_mask((3, 3), 2, 1.0).all()  # noqa: E712


def test_far_field_pooled_attention_is_exact_without_pooling_or_on_equal_keys():
    """benchmarks/far_field.py's strip-wise attention equals exact attention over all keys when nothing
    is pooled (r = 1) or when the keys of every pooled block are equal (the ln(count) bias then gives a
    block the weight of its tokens); values stay random."""
    import torch
    from benchmarks.far_field import strip_attention, strip_plan
    rows, width = (3, 4, 2, 3), 5                           # uneven strips; partial blocks at the edges
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, sum(rows) * width, 8, generator=g) for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    for portion in (0.3, None):
        torch.testing.assert_close(strip_attention(q, k, v, strip_plan(rows, width, portion, 1)), exact,
                                   atol=1e-5, rtol=1e-5)
        # keys equal inside each block of r x r tokens cut inside a strip: pooling loses nothing
        plan = strip_plan(rows, width, portion, 2)
        token_row = torch.arange(sum(rows) * width) // width
        starts = torch.tensor([0, 3, 7, 9])
        strip = torch.bucketize(token_row, starts, right=True) - 1
        block = strip * 100 + (token_row - starts[strip]) // 2 * 10 + torch.arange(sum(rows) * width) % width // 2
        k_eq = torch.zeros_like(k)
        for b in block.unique():
            k_eq[:, :, block == b] = k[:, :, block == b].mean(2, keepdim=True)
        exact_eq = torch.softmax(q @ k_eq.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
        torch.testing.assert_close(strip_attention(q, k_eq, v, plan), exact_eq, atol=1e-5, rtol=1e-5)
        # and with unequal keys the approximation differs (the test can fail)
        assert (strip_attention(q, k, v, plan) - exact).abs().max() > 1e-3
    # the window alone drops the far keys: not exact
    assert (strip_attention(q, k, v, strip_plan(rows, width, 0.3, None)) - exact).abs().max() > 1e-3


def test_profile_step_prints_a_table_on_cpu(capsys):
    import profile_step

    profile_step.main(["--model", "dit-small", "--size", "64", "--n", "2", "--device", "cpu", "--warmup", "1",
                       "--steps", "1", "--rows", "5"])
    out = capsys.readouterr().out
    assert "dit-small 64², strip 1 of 2, full, torch.float32, eager" in out and "aten::" in out


def test_the_results_manifest_is_current_and_names_a_script_for_every_result():
    """benchmarks/results/MANIFEST.json: every committed result, the script that writes it (which
    exists) and what its JSON records of its origin; regenerated here and compared."""
    import json

    import manifest
    assert manifest.main(["--check"]) == 0, "run python benchmarks/manifest.py"
    entries = json.load(open(manifest.MANIFEST))["results"]
    assert set(entries) == {f for f in os.listdir(manifest.RESULTS) if f.endswith((".json", ".png"))} - {"MANIFEST.json"}
    assert all(e["script"] and os.path.exists(os.path.join(ROOT, "benchmarks", e["script"])) for e in entries.values())
