"""Everything only a GPU can show, in one command of about 5 minutes on one H100/H200.

    PYTHONPATH=.:kernels python benchmarks/gpu_check.py            # every section
    PYTHONPATH=.:kernels python benchmarks/gpu_check.py --only scaling
    python benchmarks/gpu_check.py --device cpu --smoke            # the same logic on CPU, tiny (CI)

Sections (each with a time budget; the JSON is rewritten after each, so a run cut short still
reports):
    cli        `python -m parafuse.generate` on the device in fp32 and bf16
    nccl       `torchrun --nproc_per_node 1 -m parafuse.generate` (NCCL on CUDA)
    sync       the emulator's `sync` against the serial run on the device: fp32 with TF32 off, and
               bf16 (whose gap to serial bf16 must not exceed serial bf16's gap to fp32); and `full`
               at N = 4 on the device (ranks as threads on their own streams, exchanges as
               event-ordered copies) against the same emulation on the CPU
    scaling    per-rank compute speedup (eager) of dit-xl at 2048² (N = 2, 8; full, partial) and of
               dit-xl and unet-xl at 4096² (N = 8, full): the targets (benchmarks/scaling.py: one
               process, NullTransport, the slowest strip); unet-xl 2048² is in `graphs`
    graphs     CUDA graphs: replayed evaluations equal eager ones (a serial run, a strip's steady
               steps, also on the Triton kernels), and unet-xl 2048² per-rank speedup with the serial
               and strip steps graphed (compute alone in `full` and `partial` at N = 8, on the PyTorch
               and the Triton kernels, `full` at N = 4, and `full` at N = 8 with the communication as
               device copies in the graph)
    bandwidth  the solver update `combine` against a device-to-device copy, fp32 and bf16; the
               one-bit K/V codec's encode and decode at a dit-xl site (--kv-codec sign)
    kernels    the Triton GroupNorm kernels against their references and the native GroupNorm on the
               device (bf16, an SDXL-size activation), their time against the PyTorch patched path,
               and `sync` with `--kernels triton` against the serial run; the halo attention against
               cuDNN SDPA (one PixArt-size strip, d = 64, 72, 128) and the fused update's bandwidth
               against a copy (benchmarks/kernel_timings.py has the whole sweep)
    bottleneck --schedule bottleneck against the plain schedule of the same --steps on one device
               (dit-xl 2048², 20 steps, bf16): the wall-clock saving next to the FLOPs saving
    projection the scaling section's rows projected to N = 1..16 over NVLink 4, PCIe 4 and 400 Gb/s
               InfiniBand (benchmarks/project.py; labelled projections, not measurements)
    pipelines  diffusers' SDXL U-Net and Flux-dev transformer at their published sizes through
               `parafuse.parallelize`, 2048² first (pipelines_4096: 4096², last); benchmarks/pipelines_gpu.py

The JSON goes to benchmarks/results/gpu_check_<device>.json; a table is printed last. A section whose
result in that JSON is already of this commit (git, else benchmarks/stamp.json) is skipped, so the same
command run again continues where the last one stopped (--rerun measures it again); with --time-limit a
section whose budget exceeds the time left is not started. benchmarks/gpu_session.sh runs it so.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS, add_device, code_state, config_of, hardware, median_seconds, parser,  # noqa: E402
                    patch_config, provenance, read_result, rewrite_result, same_code, table, write_result)
from pipelines_gpu import BUDGETS as PIPELINE_BUDGETS, section_pipelines, section_pipelines_4096, summary_rows  # noqa: E402,F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "PYTHONPATH=.:kernels python benchmarks/gpu_check.py"
SECTIONS = ("pipelines", "cli", "nccl", "sync", "scaling", "graphs", "bandwidth", "kernels", "bottleneck", "projection",
            "pipelines_4096")
BUDGETS = {"cli": 35, "nccl": 25, "sync": 30, "scaling": 160, "graphs": 130, "bandwidth": 15, "kernels": 40,
           "bottleneck": 15, "projection": 5, **PIPELINE_BUDGETS}   # seconds; 455 in all besides the pipelines'
                                                # (pipelines_gpu.py) (issue 28 added sync rows and a serial step on
                                                # each kernel choice: +90 s, not yet run); ~305 s measured on an H100
                                                # before that (kernels:
                                                # autotuning the attention compiles 8 configs per head dim).
                                                # `graphs` measures its N = 8 rows first; its budget may skip
                                                # N = 4 and the loopback row (both measured on the H100 before)


def run_cli(args: list[str], torchrun: bool, timeout: float) -> dict:
    """One CLI run; its exit code, the report's device and seconds, and stderr's last line."""
    with tempfile.TemporaryDirectory() as tmp:
        rep = os.path.join(tmp, "r.json")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] \
            if torchrun else [sys.executable]
        cmd = launcher + ["-m", "parafuse.generate", "--no-progress", "--out", os.path.join(tmp, "x.png"),
                          "--report", rep, *args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"),
                                                           os.environ.get("PYTHONPATH", "")]))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        out = {"args": " ".join(args), "exit": proc.returncode, "wall_s": time.perf_counter() - t0}
        if proc.returncode == 0:
            r = json.load(open(rep))
            # each step's time: the first ones pay for compiling the kernels and capturing the graph, so
            # the steady step is the median of the last half, not a mean over the run
            ms = [1e3 * t for t in r["step_seconds"]]
            out.update(device=r["device"], dtype=r["dtype"], cuda_graphs=r["cuda_graphs"], kernels=r["kernels"],
                       denoise_s=r["total_seconds"], steps_ms=ms, steady_step_ms=statistics.median(ms[len(ms) // 2:]))
        else:
            out["error"] = (proc.stderr.strip().splitlines() or [""])[-1][-400:]
        return out


def cli_summary(r: dict) -> str:
    if r["exit"] != 0:
        return f"exit {r['exit']}: {r['error']}"
    if "steady_step_ms" in r:
        first = ", ".join(f"{t:.0f}" for t in r["steps_ms"][:2])
        step = f"{r['steady_step_ms']:.1f} ms/step steady (the first two steps: {first} ms)"
    else:       # results of before the steady step was recorded: the mean after the first step
        step = f"{r['step_ms']:.1f} ms/step (mean after the first step)"
    return (f"exit 0, {step} on {r['device']}, graphs {r.get('cuda_graphs')}"
            + (f", kernels {r['kernels']}" if "kernels" in r else ""))


def section_cli(a) -> dict:
    size = "128" if a.smoke else "1024"
    return {dt: run_cli(["--device", a.device, "--dtype", dt, "--height", size, "--width", size, "--steps", "8"],
                        False, BUDGETS["cli"]) for dt in ("fp32", "bf16")}


def section_nccl(a) -> dict:
    size = "128" if a.smoke else "1024"
    return run_cli(["--dtype", "bf16" if a.device != "cpu" else "fp32", "--height", size, "--width", size,
                    "--steps", "8"], True, BUDGETS["nccl"])


def section_sync(a) -> dict:
    """sync equals serial: fp32 (TF32 off) to float tolerance; bf16 within bf16's own noise, judged
    by RMS: a bf16 run's 1-ulp rounding flips (a GroupNorm applied in another order, a fused K|V
    GEMM) propagate through the network, so the max difference is noisy."""
    from parafuse.models import load_model
    from parafuse.runtime import emulate
    from parafuse.runtime import Request, Runtime

    def diff(x, y):
        return {"max": (x - y).abs().max().item(), "rms": (x - y).pow(2).mean().sqrt().item()}

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    req = Request(96, 64, 4, "dpmpp-2m", seed=7, label=3)
    try:
        for name in ("unet-small", "dit-small"):
            serial = {dt: Runtime(load_model(name), patch_config(dtype=dt, kernels="torch"),
                                  device=a.device).generate(req).latent     # the emulator's kernels
                      for dt in ("fp32", "bf16")}
            r = {"bf16_vs_fp32_serial": diff(serial["bf16"], serial["fp32"])}
            for n in (2, 4):
                for dt in ("fp32", "bf16"):
                    _, res = emulate(load_model(name), n, patch_config("sync"), req, device=a.device, dtype=dt)
                    r[f"N{n}_{dt}_sync_vs_serial"] = diff(res[0][0].latent, serial[dt])
            # the stale modes' data path on one GPU: 4 ranks as threads on their own streams, every
            # exchange an event-ordered device copy, against the same emulation on the CPU
            _, gpu = emulate(load_model(name), 4, patch_config("full", 1), req, device=a.device, dtype="fp32",
                             strict=False)
            _, cpu = emulate(load_model(name), 4, patch_config("full", 1), req, device="cpu", dtype="fp32")
            r["N4_fp32_full_vs_cpu_emulator"] = diff(gpu[0][0].latent.cpu(), cpu[0][0].latent)
            r["fp32_ok"] = all(r[f"N{n}_fp32_sync_vs_serial"]["max"] <= 1e-4 for n in (2, 4)) \
                and r["N4_fp32_full_vs_cpu_emulator"]["max"] <= 1e-4
            r["bf16_ok"] = all(r[f"N{n}_bf16_sync_vs_serial"]["rms"] <= 1.25 * r["bf16_vs_fp32_serial"]["rms"]
                               for n in (2, 4))
            out[name] = r
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return out


def section_scaling(a) -> dict:
    import scaling

    device = torch.device(a.device)
    deadline = time.perf_counter() + BUDGETS["scaling"]
    if a.smoke:
        plan = [("default", 128, [1, 2, 8, 4], ["full", "partial", "sync"]),
                ("dit-small", 128, [1, 2, 8, 4], ["full", "partial", "sync"])]
    else:   # the targets first (dit-xl 2048² N = 2, 4096² N = 8): the budget may cut the end. unet-xl 2048² is
            # launch-bound eagerly: the graphs section measures it
        # sync (the lossless mode) beside them in every table; partial at 4096² after the targets
        plan = [("dit-xl", 2048, [1, 2, 8], ["full", "partial", "sync"]), ("dit-xl", 4096, [1, 8], ["full", "sync"]),
                ("unet-xl", 4096, [1, 8], ["full", "sync", "partial"])]
    rows = []
    for model, size, ranks, modes in plan:
        if time.perf_counter() > deadline:
            rows.append({"model": model, "size": size, "skipped": "time budget"})
            continue
        rows += scaling.scaling_rows(model, [size], ranks, modes, device, None, repeat=3, deadline=deadline)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def section_graphs(a) -> dict:
    """Replay equals eager, then the launch-bound case graphed (serial baseline graphed too)."""
    import scaling
    from parafuse.models import load_model
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.parallel.transport import NullTransport
    from parafuse.runtime import Request, Runtime

    if not a.device.startswith("cuda"):
        return {"skipped": "CUDA graphs need a CUDA device"}
    device = torch.device(a.device)
    deadline = time.perf_counter() + BUDGETS["graphs"]
    req = Request(256, 256, 8, "dpmpp-2m", seed=1, label=2)
    eager = Runtime(load_model("unet-small"), patch_config(), device=a.device).generate(req).latent
    graphed = Runtime(load_model("unet-small"), patch_config(cuda_graphs=True), device=a.device).generate(req).latent
    out = {"serial_replay_vs_eager_max": (graphed - eager).abs().max().item()}
    for kernels, key in (("torch", "strip_replay_vs_eager_max"), ("triton", "strip_replay_vs_eager_max_triton")):
        strips = {}
        for graphs in (False, True):
            rt = Runtime(load_model("unet-small"), patch_config("full", 1, kernels=kernels, cuda_graphs=graphs),
                         device=a.device, layout=ParallelLayout(1, 3), transport=NullTransport(1, 3))
            step = rt.rank_step(req)
            strips[graphs] = [step(t).clone() for t in (900.0, 700.0, 500.0, 300.0)]
        out[key] = max((g - e).abs().max().item() for g, e in zip(strips[True], strips[False]))
    # `partial` too: the U-Net's mode (it meets the quality target at 1024²-2048²), whose strips
    # attend to their windows instead of the whole image's stale K/V; and the strips on the Triton
    # kernels (--kernels triton: the GroupNorm in two launches, against the PyTorch path's ~10 ops)
    rows = scaling.scaling_rows("unet-xl", [2048], [1, 8], ["full", "partial", "sync"], device, None, repeat=5,
                                deadline=deadline, cuda_graphs=True, kernels=("torch", "triton"))
    rows += scaling.scaling_rows("unet-xl", [2048], [4], ["full"], device, None, repeat=5, deadline=deadline,
                                 cuda_graphs=True, serial_rows=rows)
    # the same graphed strip step with its communication inside the graph (device copies on a side stream)
    rows += scaling.scaling_rows("unet-xl", [2048], [8], ["full"], device, None, repeat=5, deadline=deadline,
                                 cuda_graphs=True, transport="loopback", serial_rows=rows)
    out["rows"] = rows
    return out


def section_bandwidth(a) -> dict:
    from parafuse.solvers import combine

    device = torch.device(a.device)
    numel = 1 << (20 if a.smoke else 26)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        x, m0, m1 = (torch.randn(numel, device=device).to(dt) for _ in range(3))
        dst = torch.empty_like(x)
        size = x.element_size() * numel
        copy_s = median_seconds(lambda: dst.copy_(x), device, repeat=20)
        comb_s = median_seconds(lambda: combine(0.9, x, [0.3, -0.1], [m0, m1]), device, repeat=20)
        key = str(dt).replace("torch.", "")
        out[key] = {"copy_GBps": 2 * size / copy_s / 1e9, "combine_GBps": 4 * size / comb_s / 1e9}
        out[key]["combine_fraction_of_copy"] = out[key]["combine_GBps"] / out[key]["copy_GBps"]
    out["kv_codec"] = _kv_codec_cost(device, a.smoke)
    return out


def _kv_codec_cost(device, smoke: bool) -> dict:
    """`--kv-codec sign` at one dit-xl attention site of 2048² at N = 8 (bf16, width 1152): a rank
    encodes its strip's 2048 tokens and decodes the other 7 strips' 14336, every stale step. Their
    time beside a copy of the exact K/V those 14336 tokens would otherwise receive."""
    from parafuse.parallel import kv_codec

    local, others, c = (64, 448, 128) if smoke else (2048, 14336, 1152)
    dt = torch.bfloat16
    fresh = torch.randn(local, 1, 2 * c, device=device).to(dt)
    mirror, drift = fresh + 0.1, torch.zeros_like(fresh)
    out_bytes = torch.empty(local, 1, kv_codec.payload_bytes(c, dt), dtype=torch.uint8, device=device)
    kv_codec.encode(fresh, mirror, drift, out_bytes)
    inbox = out_bytes.repeat(others // local, 1, 1)
    theirs, their_drift = fresh.repeat(others // local, 1, 1), torch.zeros(others, 1, 2 * c, device=device, dtype=dt)
    exact = torch.empty_like(theirs)
    out = {"width": c, "local_tokens": local, "received_tokens": others,
           "bytes_share": kv_codec.payload_bytes(c, dt) / (2 * c * 2),
           "copy_exact_kv_us": 1e6 * median_seconds(lambda: exact.copy_(theirs), device, repeat=20)}
    paths = {"torch": kv_codec}
    if device.type == "cuda":          # the fused kernels (--kernels triton); on CPU only interpreted
        from parafuse_kernels import kv_codec as fused
        paths["triton"] = fused
    for name, codec in paths.items():
        out[f"{name}_encode_us"] = 1e6 * median_seconds(lambda: codec.encode(fresh, mirror, drift, out_bytes),
                                                           device, repeat=20)
        out[f"{name}_decode_us"] = 1e6 * median_seconds(lambda: codec.decode(inbox, theirs, their_drift),
                                                           device, repeat=20)
    return out


def section_kernels(a) -> dict:
    """Triton GroupNorm (parafuse_kernels.groupnorm): correct against references, timed against the
    PyTorch path of PatchGroupNorm, and a `sync` run on the kernels against the serial run."""
    from parafuse.models import load_model
    from parafuse.runtime import emulate
    from parafuse.parallel.engine import moments_from_sums
    from parafuse.parallel.layers import normalize, strip_sums
    from parafuse.runtime import Request, Runtime

    if not a.device.startswith("cuda"):
        return {"skipped": "Triton kernels need a CUDA device here (CPU tests run them through the interpreter)"}
    from parafuse_kernels import groupnorm as gn

    device = torch.device(a.device)
    b, c, groups, h = 2, 640, 32, (32 if a.smoke else 128)
    x = (torch.randn(b, c, h, h, device=device) * 2 + 3).to(torch.bfloat16)
    w, bias = torch.randn(c, device=device).bfloat16(), torch.randn(c, device=device).bfloat16()
    sums = torch.empty(2, b, groups, device=device)
    gn.group_sums(x, groups, sums)
    ref = gn.group_sums_reference(x, groups)
    count = x[0, : c // groups].numel()
    y = gn.group_norm_apply(x, sums, count, w, bias, 1e-5)
    native = torch.nn.functional.group_norm(x.float(), groups, w.float(), bias.float(), 1e-5)
    out = {"sums_max_rel_err": ((sums - ref).abs() / ref.abs().clamp_min(1)).max().item(),
           "apply_vs_native_max_abs": (y.float() - native).abs().max().item()}

    def torch_path():                   # what PatchGroupNorm does without the kernels
        strip_sums(x, groups, sums)
        return normalize(x, moments_from_sums(sums, count), w.float().repeat(b), bias.float().repeat(b), 1e-5)

    def triton_path():
        gn.group_sums(x, groups, sums)
        return gn.group_norm_apply(x, sums, count, w, bias, 1e-5)

    out["torch_path_us"] = median_seconds(torch_path, device, repeat=50) * 1e6
    out["triton_path_us"] = median_seconds(triton_path, device, repeat=50) * 1e6
    out["native_group_norm_us"] = median_seconds(
        lambda: torch.nn.functional.group_norm(x, groups, w, bias, 1e-5), device, repeat=50) * 1e6
    req = Request(96, 64, 4, "ddim", seed=7, label=3)
    serial = Runtime(load_model("unet-small"), patch_config(dtype="fp32", kernels="torch"),
                     device=a.device).generate(req).latent
    _, res = emulate(load_model("unet-small"), 2, patch_config("sync"), req, device=a.device, dtype="fp32",
                     kernels="triton")
    out["sync_triton_vs_serial_max"] = (res[0][0].latent - serial).abs().max().item()
    out.update(_attention_and_update_kernels(device, a.smoke))
    return out


def _attention_and_update_kernels(device, smoke) -> dict:
    """Halo attention against cuDNN SDPA on one PixArt-size partial strip (2048², N = 4) per head
    dim, and the fused update against the eager step in fp32 and bf16 (benchmarks/kernel_timings.py has
    the whole sweep)."""
    from parafuse.solvers import make_schedule, make_solver
    from parafuse_kernels.attention import halo_attention
    from parafuse_kernels.update import fused_step, fused_step_reference
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"attention": {}, "update": {}}
    lq, lk, heads = (512, 1024, 2) if smoke else (4096, 6656, 16)
    for d in (64, 72, 128):
        q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=torch.bfloat16) for n in (lq, lk, lk))
        got, _ = halo_attention(q, k, v)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            cudnn_s = median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device,
                                        repeat=20)
        triton_s = median_seconds(lambda: halo_attention(q, k, v), device, repeat=20)
        flops = 4 * heads * lq * lk * d
        out["attention"][d] = {"max_abs_vs_cudnn": (got.float() - want.float()).abs().max().item(),
                               "triton_tflops": flops / triton_s / 1e12, "cudnn_tflops": flops / cudnn_s / 1e12}
    solver = make_solver("dpmpp-2m", make_schedule("flow", shift=3.0), num_steps=20)
    numel = 1 << (20 if smoke else 26)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(numel, device=device).to(dt)
        cond, uncond, hist = (torch.randn(numel, device=device) for _ in range(3))
        state = {"x0s": [hist]}
        want, _ = fused_step_reference(solver, 5, x, cond, state, uncond=uncond, guidance=4.0)
        got, _ = fused_step(solver, 5, x, cond, state, uncond=uncond, guidance=4.0)
        dst = torch.empty_like(cond)
        copy_gbps = 8 * numel / median_seconds(lambda: dst.copy_(cond), device, repeat=20) / 1e9
        moved = numel * (2 * x.element_size() + 16)      # read x, cond, uncond, x̂0; write x_next, x̂0
        fused_s = median_seconds(lambda: fused_step(solver, 5, x, cond, state, uncond=uncond, guidance=4.0),
                                    device, repeat=20)
        out["update"][str(dt).replace("torch.", "")] = {
            "max_abs_vs_eager": (got.float() - want.float()).abs().max().item(),
            "fused_GBps": moved / fused_s / 1e9, "fraction_of_copy": moved / fused_s / 1e9 / copy_gbps}
    return out


def section_bottleneck(a) -> dict:
    """One serial runtime, the plain and the bottleneck schedule of the same --steps, after a warmup
    image at each stage size; seconds of the denoising loop (the report's total_seconds)."""
    from parafuse.runtime import Request, Runtime

    model, size, steps = ("dit-small", 64, 10) if a.smoke else ("dit-xl", 2048, 20)
    rt = Runtime(model, device=a.device, dtype="bf16" if a.device != "cpu" else "fp32")
    rt.generate(Request(size, size, 10, schedule="bottleneck"))
    out = {"model": model, "size": size, "steps": steps}
    for schedule in ("plain", "bottleneck"):
        t = rt.generate(Request(size, size, steps, schedule=schedule)).timing
        out[schedule] = {"seconds": t["total_seconds"], "flops": t["flops"]["total"], "stages": t["stages"]}
    out["wall_clock_saving"] = out["plain"]["seconds"] / out["bottleneck"]["seconds"]
    out["flops_saving"] = out["plain"]["flops"] / out["bottleneck"]["flops"]
    return out


def section_projection(a, results: dict) -> dict:
    """The projected speedup at N = 8 and 16 of every measured (model, size, mode), per link: from
    the scaling section's eager rows and from the graphs section's graphed ones (compute alone)."""
    import project

    sources = {"eager": results["sections"].get("scaling", {}).get("result", {}).get("rows", []),
               "graphed": [r for r in results["sections"].get("graphs", {}).get("result", {}).get("rows", [])
                           if r.get("transport", "null") == "null"]}
    sources = {k: [r for r in v if "seconds" in r] for k, v in sources.items()}
    if not any(sources.values()):
        return {"skipped": "no scaling rows (run the scaling or graphs section first)"}
    # the pessimistic bound's SM/HBM charge: this run's loopback row where it has one, else the committed one
    graphs_rows = results["sections"].get("graphs", {}).get("result", {}).get("rows", [])
    try:
        charge = project.charge_from_rows(graphs_rows, "this run's graphs section")
    except ValueError:
        charge = project.loopback_charge()
    out = {"charge": charge.source}
    for name in ("nvlink4", "pcie4", "ib400"):      # project_rows projects each kernel choice apart
        out[name] = [{"graphs": graphs + (", triton kernels" if r["kernels"] == "triton" else ""),
                      **{k: r[k] for k in ("model", "size", "mode", "n", "compute_source", "projected_speedup",
                                           "projected_bound", "projected_pessimistic_speedup",
                                           "projected_stale_channel_speedup")}}
                     for graphs, rows in sources.items() if rows
                     for r in project.project_rows(rows, project.LINKS[name], max_n=16, charge=charge,
                                                   derive_sync=True) if r["n"] in (8, 16)]
    return out


# The GPU issues' targets (bf16, per-rank compute speedup like with like): (what, section, model,
# size, mode, N, the patch layers' kernels, at least)
TARGETS = [
    ("dit-xl 4096² full, N = 8", "scaling", "dit-xl", 4096, "full", 8, "torch", 7.5),
    ("dit-xl 2048² full, N = 2", "scaling", "dit-xl", 2048, "full", 2, "torch", 1.8),
    ("unet-xl 4096² full, N = 8", "scaling", "unet-xl", 4096, "full", 8, "torch", 6.0),
    ("unet-xl 2048² graphed, N = 4", "graphs", "unet-xl", 2048, "full", 4, "torch", 3.0),
    ("unet-xl 2048² graphed, N = 8", "graphs", "unet-xl", 2048, "full", 8, "torch", 5.0),
    # the issue names neither mode nor kernels for this one: `partial` is the U-Net's mode (fewer
    # keys per strip), and the Triton GroupNorm replaces the PyTorch path's ~10 ops by 2 launches
    ("unet-xl 2048² graphed partial, N = 8", "graphs", "unet-xl", 2048, "partial", 8, "torch", 5.0),
    ("unet-xl 2048² graphed, --kernels triton, N = 8", "graphs", "unet-xl", 2048, "full", 8, "triton", 5.0),
    ("unet-xl 2048² graphed partial, --kernels triton, N = 8", "graphs", "unet-xl", 2048, "partial", 8, "triton", 5.0),
]


def target_rows(results: dict, extra: list[dict] = ()) -> list[dict]:
    """Each target: met, missed, or not measured (section not run, skipped by its budget). `extra`:
    scaling.py rows measured on the same device (each with its "command"), read where this check's
    own sections have no row for a target."""
    own = [r for name in ("scaling", "graphs") for r in results["sections"].get(name, {}).get("result", {}).get("rows", [])]
    out = []
    for what, section, model, size, mode, n, kernels, least in TARGETS:
        hit = [r for r in [*own, *extra] if (r.get("model"), r.get("size"), r.get("mode"), r.get("n")) == (model, size, mode, n)
               and "speedup" in r and r.get("transport", "null") == "null" and r.get("kernels", "torch") == kernels
               and bool(r.get("cuda_graphs")) == (section == "graphs")]
        if not hit:
            out.append({"section": f"target {what} >= {least}x", "result": "not measured"})
        else:
            got = hit[0]["speedup"]
            where = f" (`{hit[0]['command']}`)" if "command" in hit[0] else ""
            out.append({"section": f"target {what} >= {least}x",
                        "result": f"{'met' if got >= least else 'MISSED'}: {got:.2f}x{where}"})
    for name in ("scaling",):
        for r in results["sections"].get(name, {}).get("result", {}).get("rows", []):
            if r.get("mode") == "partial" and r.get("n") == 8 and r.get("peak_memory_bytes"):
                below = r["peak_memory_bytes"] < r["serial_peak_memory_bytes"]
                out.append({"section": f"target {r['model']} {r['size']}² partial N = 8 peak < serial's",
                            "result": f"{'met' if below else 'MISSED'}: {r['peak_memory_bytes'] / 1e9:.1f} vs "
                                      f"{r['serial_peak_memory_bytes'] / 1e9:.1f} GB"})
    return out


def summary(results: dict) -> list[dict]:
    rows = []
    for name, sec in results["sections"].items():
        skipped = isinstance(sec.get("result"), dict) and sec["result"].get("skipped")
        if "error" in sec:
            rows.append({"section": name, "result": f"ERROR {sec['error'][:120]}"})
        elif skipped:
            rows.append({"section": name, "result": f"skipped: {skipped}"})
        elif name == "cli":
            for dt, r in sec["result"].items():
                rows.append({"section": f"cli {dt}", "result": cli_summary(r)})
        elif name == "nccl":
            rows.append({"section": "torchrun x1", "result": cli_summary(sec["result"])})
        elif name == "sync":
            for model, r in sec["result"].items():
                rows.append({"section": f"sync {model}", "result": (
                    f"fp32 {'ok' if r['fp32_ok'] else 'FAIL'}, bf16 {'ok' if r['bf16_ok'] else 'FAIL'}; max/rms: " +
                    ", ".join(f"{k} {v['max']:.2g}/{v['rms']:.2g}" for k, v in r.items() if isinstance(v, dict)))})
        elif name == "scaling":
            for r in sec["result"]["rows"]:
                if "skipped" in r:
                    what = " ".join(str(x) for x in (r["model"], r["size"], r.get("n") and f"N={r['n']}", r.get("mode")) if x)
                    rows.append({"section": f"scaling {what}", "result": "skipped (time budget)"})
                elif r["mode"] != "serial":
                    rows.append({"section": f"scaling {r['model']} {r['size']} N={r['n']} {r['mode']}",
                                 "result": f"{r['speedup']:.2f}x ({r['seconds'] * 1e3:.1f} vs "
                                           f"{r['serial_seconds'] * 1e3:.1f} ms), peak "
                                           f"{(r['peak_memory_bytes'] or 0) / 1e9:.1f} vs "
                                           f"{(r['serial_peak_memory_bytes'] or 0) / 1e9:.1f} GB"})
        elif name == "graphs":
            r = sec["result"]
            triton = r.get("strip_replay_vs_eager_max_triton")
            rows.append({"section": "graphs replay = eager", "result": f"serial max diff {r['serial_replay_vs_eager_max']:.2g}, "
                         f"strip max diff {r['strip_replay_vs_eager_max']:.2g}"
                         + ("" if triton is None else f", strip on the Triton kernels max diff {triton:.2g}")})
            for x in r["rows"]:
                if x.get("mode") not in (None, "serial") and "speedup" in x:
                    rows.append({"section": f"graphs {x['model']} {x['size']} N={x['n']} {x['mode']} "
                                            f"{x.get('transport', 'null')}"
                                            + (" triton kernels" if x.get("kernels") == "triton" else ""),
                                 "result": f"{x['speedup']:.2f}x ({x['seconds'] * 1e3:.1f} vs "
                                           f"{x['serial_seconds'] * 1e3:.1f} ms, both graphed)"})
        elif name == "kernels":
            r = sec["result"]
            rows.append({"section": "GroupNorm kernels", "result": (
                f"sums rel err {r['sums_max_rel_err']:.1e}, apply vs native {r['apply_vs_native_max_abs']:.2g}; "
                f"triton {r['triton_path_us']:.0f} us vs torch path {r['torch_path_us']:.0f} us "
                f"(native unpatched {r['native_group_norm_us']:.0f} us); sync on kernels vs serial "
                f"{r['sync_triton_vs_serial_max']:.1e}")})
            for d, x in r.get("attention", {}).items():
                rows.append({"section": f"halo attention d={d}", "result": (
                    f"{x['triton_tflops']:.0f} vs cuDNN {x['cudnn_tflops']:.0f} TFLOP/s "
                    f"({x['triton_tflops'] / x['cudnn_tflops']:.2f}x; target >= 0.9 at d=64/128), "
                    f"max diff {x['max_abs_vs_cudnn']:.1e}")})
            for dt, x in r.get("update", {}).items():
                rows.append({"section": f"fused update {dt}", "result": (
                    f"{x['fused_GBps']:.0f} GB/s = {100 * x['fraction_of_copy']:.0f}% of copy (target 85%), "
                    f"max diff vs eager {x['max_abs_vs_eager']:.1e}")})
        elif name == "bottleneck":
            r = sec["result"]
            rows.append({"section": f"bottleneck {r['model']} {r['size']}² --steps {r['steps']}",
                         "result": f"{r['wall_clock_saving']:.2f}x wall clock, {r['flops_saving']:.2f}x FLOPs "
                                   f"({r['bottleneck']['seconds']:.2f} vs {r['plain']['seconds']:.2f} s)"})
        elif name == "projection":
            r = sec["result"]
            for x in r["nvlink4"]:
                if x["n"] == 8:
                    rows.append({"section": f"PROJECTED nvlink4 {x['model']} {x['size']} N=8 {x['mode']} "
                                            f"{x.get('graphs', 'eager')}",
                                 "result": f"{x['projected_pessimistic_speedup']:.2f}x to "
                                           f"{x['projected_speedup']:.2f}x (pessimistic to optimistic; "
                                           f"{x['projected_stale_channel_speedup']:.2f}x pessimistic on a stale "
                                           f"communicator; {x['projected_bound']}-bound, per-rank compute "
                                           f"{x.get('compute_source', '?')})"})
        elif name.startswith("pipelines"):
            rows += summary_rows(sec["result"])
        elif name == "bandwidth":
            for dt, r in sec["result"].items():
                if dt == "kv_codec":
                    for path in ("torch", "triton"):
                        if f"{path}_encode_us" in r:
                            rows.append({"section": f"kv codec sign bf16 ({path}), width {r['width']}", "result": (
                                f"encode {r['local_tokens']} tokens {r[path + '_encode_us']:.0f} us, decode "
                                f"{r['received_tokens']} {r[path + '_decode_us']:.0f} us (a copy of their exact "
                                f"K/V: {r['copy_exact_kv_us']:.0f} us); {100 * r['bytes_share']:.1f}% of the bytes")})
                    continue
                rows.append({"section": f"combine {dt}", "result": f"{r['combine_GBps']:.0f} GB/s = "
                             f"{100 * r['combine_fraction_of_copy']:.0f}% of copy ({r['copy_GBps']:.0f} GB/s)"})
    return rows


def reproject(path: str, argv=None) -> int:
    """The projection section of the result at `path`, recomputed by the current project.py from the
    rows its scaling and graphs sections measured; stamped with this run's provenance."""
    results = read_result(path)
    t0 = time.perf_counter()
    sec = {"result": section_projection(None, results), "seconds": time.perf_counter() - t0,
           "provenance": provenance(argv), "note": "recomputed from this file's rows (--reproject): arithmetic"}
    results["sections"]["projection"] = sec
    rewrite_result(path, results)
    print(table(summary({"sections": {"projection": sec}}), [("section", "section"), ("result", "result")]))
    return 0


def write(path: str, a, prov: dict, results: dict, rows: list[dict]) -> str:
    """The check's result: the summary and target rows (written last) and its sections beside them."""
    return write_result(os.path.abspath(path), "gpu_check", config_of(a), rows, prov, results["hardware"],
                        smoke=results["smoke"], sections=results["sections"])


def device_slug(name: str) -> str:
    """A device's name in result file names: "NVIDIA H100 80GB HBM3" -> nvidia_h100_80gb_hbm3."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


READS = {"projection": ("scaling", "graphs")}     # a section computed from other sections' rows


def section_done(sections: dict, name: str, state: dict) -> bool:
    """Whether `sections` holds `name`'s result for the code `state` describes (common.code_state), so
    that a rerun may skip it: of that commit, without an error, and, for a section computed from others'
    rows (READS), no older than their results, which are done too."""
    sec = sections.get(name)
    if not sec or "error" in sec or not same_code(sec.get("provenance"), state):
        return False
    at = sec["provenance"].get("at") or ""
    return all(section_done(sections, r, state) and (sections[r]["provenance"].get("at") or "") <= at
               for r in READS.get(name, ()))


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--only", choices=SECTIONS, nargs="+", default=list(SECTIONS))
    add_device(p, dtype=False)
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks this script's logic on CPU")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_check_<device>.json)")
    p.add_argument("--rerun", action="store_true",
                   help="measure the sections again even where the JSON holds their result for this commit")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="do not start a section whose budget (BUDGETS) exceeds what is left of SECONDS")
    p.add_argument("--reproject", metavar="JSON", default=None,
                   help="no measurement: recompute the projection section of a committed result from its own rows "
                        "(arithmetic, any machine) and write it back, every other section and the hardware kept")
    a = p.parse_args(argv)
    if a.reproject:
        return reproject(a.reproject, argv)
    t_start = time.perf_counter()
    hw = hardware() if a.device != "cpu" else {**hardware(), "device": "cpu"}
    slug = device_slug(torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu")
    path = a.out or os.path.join(RESULTS, f"gpu_check_{slug}.json")
    prov = provenance(argv)      # stamped before the run; each section carries the provenance of the run that made it
    state, _ = code_state()
    results = {"hardware": hardware(), "smoke": a.smoke, "sections": {}}
    if os.path.exists(path):     # keep the other sections' results, and those of this commit to skip
        before = read_result(path)
        if bool(before.get("smoke")) == a.smoke:
            results["sections"] = before.get("sections", {})
    ran, not_started = [], []
    for name in a.only:
        if not a.rerun and section_done(results["sections"], name, state):
            print(f"== {name}: done for this commit ({results['sections'][name]['provenance'].get('at')}): "
                  f"skipped (--rerun measures it again)", flush=True)
            continue
        left = None if a.time_limit is None else a.time_limit - (time.perf_counter() - t_start)
        if left is not None and BUDGETS[name] > left:
            print(f"== {name}: not started: budget {BUDGETS[name]} s, {max(left, 0):.0f} s left of --time-limit",
                  flush=True)
            not_started.append(name)
            continue
        t0 = time.perf_counter()
        print(f"== {name} (budget {BUDGETS[name]} s)", flush=True)
        try:
            fn = globals()[f"section_{name}"]
            sec = {"result": fn(a, results) if name == "projection" else fn(a)}
        except Exception as e:      # noqa: BLE001 - a failed section is a result; the next still runs
            sec = {"error": f"{type(e).__name__}: {e}"}
        sec["seconds"] = time.perf_counter() - t0
        sec["provenance"] = prov
        results["sections"][name] = sec
        ran.append(name)
        write(path, a, prov, results, rows=[])      # after each section: a later one may not finish
        print(json.dumps(sec, default=str)[:2000], flush=True)
    print(f"\n{hw['device']}, torch {torch.__version__}\n")
    rows = summary(results) + target_rows(results)
    print(table(rows, [("section", "section"), ("result", "result")]))
    if ran:
        write(path, a, prov, results, rows)
        print(f"\nwrote {path}")
    if not_started:
        print(f"not started (--time-limit): {' '.join(not_started)}; the same command continues with them")
    return 0 if all("error" not in results["sections"][n] for n in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
