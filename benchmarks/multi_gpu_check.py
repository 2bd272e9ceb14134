"""The real multi-rank exchange, checked where several devices exist (and on CPU with gloo):

    torchrun --nproc_per_node 8 benchmarks/multi_gpu_check.py            # one node of GPUs (NCCL)
    torchrun --nproc_per_node 2 benchmarks/multi_gpu_check.py --smoke    # CPU (gloo), tiny

For the launched N, against references computed on rank 0:
    sync       equals the serial run (fp32; TF32 off on CUDA)
    stale      `full` and `partial` equal the single-process emulator (same device), image and
               bytes per peer and kind (the emulator's bytes are checked against a closed form from
               the layer shapes by tests/parallel/test_parallel.py)
    graphs     CUDA graphs: the run with --cuda-graphs equals the eager run (CUDA only)
    speedup    wall-clock mean of the steady-state steps against the serial run of the same model,
               size and dtype (rank 0 alone, the others waiting), per mode

Rank 0 writes benchmarks/results/multi_gpu_check_<device>_n<N>.json and prints a table.
The NCCL path has never run on two or more GPUs: until this script has, treat it as unverified.
"""
from __future__ import annotations

import os
import re
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (config_of, hardware, parser, patch_config, provenance, table, timing_stats,  # noqa: E402
                    write_result)

from parafuse.models import load_model  # noqa: E402
from parafuse.parallel.distributed import ParallelLayout, init_distributed, pick_device, run_guarded  # noqa: E402
from parafuse.runtime import emulate  # noqa: E402
from parafuse.runtime import Request, Runtime  # noqa: E402


def serial_on_rank0(rank: int, model: str, req: Request, device, dtype, **kw):
    """The serial run on rank 0 while the others wait; returns (result, runtime) on rank 0."""
    out = None
    if rank == 0:
        rt = Runtime(load_model(model), patch_config(dtype=dtype, **kw), device=str(device),
                     layout=ParallelLayout(0, 1))
        out = rt.generate(req)
    dist.barrier()
    return out


def check_correctness(rank: int, world: int, device, smoke: bool) -> list[dict]:
    rows = []
    req = Request(96 if smoke else 256, 64 if smoke else 256, 4, "ddim", seed=7, label=3)
    for model in ("unet-small", "dit-small"):
        # the exchange against the serial run and the emulator, all on PyTorch ops (the emulator's
        # kernels): the Triton GroupNorm's one-pass sums round differently from the native one
        ref = serial_on_rank0(rank, model, req, device, "fp32", kernels="torch")
        rt = Runtime(load_model(model), patch_config("sync", dtype="fp32", kernels="torch"), device=str(device))
        got = rt.generate(req)
        rt.close()
        if rank == 0:
            d = (got.latent - ref.latent).abs().max().item()
            rows.append({"check": f"{model} sync = serial", "value": d, "ok": d <= 1e-4})
        for mode in ("full", "partial"):
            cfg = patch_config(mode, 1)
            rt = Runtime(load_model(model), cfg.replace(dtype="fp32", kernels="torch"), device=str(device))
            got = rt.generate(req)
            ranks = rt.gather_rank_stats(got)
            rt.close()
            if rank == 0:
                _, emu = emulate(load_model(model), world, cfg, req, device=str(device), dtype="fp32")
                d = (got.latent - emu[0][0].latent).abs().max().item()
                same_bytes = all(ranks[r]["bytes_sent_per_peer"] == emu[r][0].rank_stats["bytes_sent_per_peer"]
                                 for r in range(world))
                rows.append({"check": f"{model} {mode} = emulator", "value": d, "ok": d <= 1e-4})
                rows.append({"check": f"{model} {mode} bytes per peer = emulator's", "value": int(same_bytes),
                             "ok": same_bytes})
            dist.barrier()
    return rows


def check_graphs(rank: int, device) -> list[dict]:
    if device.type != "cuda":
        return [{"check": "graphs", "value": "skipped: CUDA only", "ok": True}]
    req = Request(512, 512, 8, "dpmpp-2m", seed=1, label=2)
    out = {}
    for graphs in (False, True):
        rt = Runtime(load_model("unet-small"), patch_config("full", 2, cuda_graphs=graphs), device=str(device))
        out[graphs] = rt.generate(req)
        rt.close()
    if rank != 0:
        return []
    d = (out[True].latent - out[False].latent).abs().max().item()
    return [{"check": "graphs: replay = eager (unet-small, full)", "value": d, "ok": d <= 1e-3}]


def check_speedup(rank: int, world: int, device, smoke: bool) -> list[dict]:
    models = [("default", 256), ("dit-small", 256)] if smoke else [("unet-xl", 2048), ("dit-xl", 2048)]
    dtype = "fp32" if device.type == "cpu" else "bf16"
    steps, warmup = (6, 2) if smoke else (12, 4)
    rows = []
    for model, size in models:
        req = Request(size, size, steps, "ddim", seed=0)
        ref = serial_on_rank0(rank, model, req, device, dtype)
        for mode in ("full", "partial"):
            rt = Runtime(model, patch_config(mode, warmup, dtype=dtype), device=str(device))
            res = rt.generate(req)
            rt.close()
            if rank == 0:
                s_par = timing_stats(res.timing["step_seconds"][warmup:])["seconds"]     # median steady step
                s_ser = timing_stats(ref.timing["step_seconds"][warmup:])["seconds"]
                rows.append({"check": f"{model} {size}² {mode} speedup at N={world}", "value": s_ser / s_par,
                             "ok": True, "step_seconds": s_par, "serial_step_seconds": s_ser})
            dist.barrier()
    return rows


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes (CPU, gloo)")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/multi_gpu_check_<device>_n<N>.json)")
    a = p.parse_args(argv)
    prov = provenance(argv)
    device = pick_device()
    rank, world = init_distributed(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = check_correctness(rank, world, device, a.smoke)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows += check_graphs(rank, device)
    rows += check_speedup(rank, world, device, a.smoke)
    if rank == 0:
        hw = hardware()
        name = re.sub(r"[^a-z0-9]+", "_", (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu").lower())
        path = write_result(os.path.abspath(a.out) if a.out else f"multi_gpu_check_{name.strip('_')}_n{world}",
                            "multi_gpu_check", config_of(a), rows, prov, hw, world_size=world,
                            backend=dist.get_backend())
        print(f"\n{hw['device']} x {world}, backend {dist.get_backend()}, torch {hw['torch']}\n")
        print(table(rows, [("check", "check"), ("value", "value"), ("ok", "ok")]))
        print(f"\nwrote {path}")
        if not all(r["ok"] for r in rows):
            print("multi_gpu_check: FAILED checks above", file=sys.stderr)
            dist.barrier()
            dist.destroy_process_group()
            sys.exit(1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_guarded(main)
