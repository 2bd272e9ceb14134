"""What a user with N devices weighs: one image on N ranks (latency) against N independent images
(throughput), and cold time against warm time.

For each N:
- patch parallel: `torchrun --nproc_per_node N` runs this script as a worker; it makes the same
  image twice in one process. Cold = launch to the first image done (process start, imports,
  model load, shape trace, patch plan, the first image's denoising and decode - and its graph
  capture with --cuda-graphs); warm = the next image alone (the median of --repeat images).
- independent: N plain processes at once (one device each on CUDA: CUDA_VISIBLE_DEVICES=i; on CPU
  the cores are split between them), each making its own image twice: warm latency per image, and
  throughput = the sum over processes of 1 / warm.
On CPU the ranks share the machine's cores (OMP threads = cores / N), so N above the core count
measures contention, not scaling.

    python benchmarks/throughput.py --model default --size 512 --steps 20 --ranks 1 2
    python benchmarks/throughput.py --model unet-xl --size 2048 --steps 20 --ranks 1 2 4 8 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_device, add_run, add_timing, parser, patch_config, time_calls  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHED_AT = "PARAFUSE_BENCH_LAUNCHED_AT"     # wall-clock time the launcher started the process


def worker(a) -> None:
    import torch

    from parafuse.runtime import Request, Runtime

    rt = Runtime(a.model, patch_config(a.mode, a.warmup, cuda_graphs=a.cuda_graphs), device=a.device)
    req = Request(a.size, a.size, a.steps, "dpmpp-2m", 1.0, 0, 0 if rt.spec.num_classes else None)
    rt.generate(req)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    cold = time.time() - float(os.environ[LAUNCHED_AT])
    warm = time_calls(lambda: rt.generate(req), rt.device, repeat=a.repeat, warmup=0)
    if rt.layout.rank == 0:
        with open(a.worker_out, "w") as f:
            json.dump({"cold_s": cold, "warm_s": warm["seconds"], "warm_count": warm["count"],
                       "world_size": rt.layout.world_size}, f)
    rt.close()


def launch(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(env, **{LAUNCHED_AT: repr(time.time())}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{err[-3000:]}")


def measure(a, n: int, tmp: str) -> dict:
    me = [os.path.abspath(__file__), "--worker", "--model", a.model, "--size", str(a.size), "--steps",
          str(a.steps), "--warmup", str(a.warmup), "--device", a.device, "--repeat", str(a.repeat)] + (["--cuda-graphs"] if a.cuda_graphs else [])
    cores = os.cpu_count() or 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "kernels")]),
               OMP_NUM_THREADS=str(max(1, cores // n)))
    row = {"n": n}
    if n > 1:
        out = os.path.join(tmp, f"patch{n}.json")
        proc = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                       *me, "--mode", a.mode, "--worker-out", out], env)
        finish(proc, f"patch parallel N = {n}")
        r = json.load(open(out))
        row.update(patch_cold_s=r["cold_s"], patch_warm_s=r["warm_s"], patch_images_per_s=1 / r["warm_s"])
    outs, procs = [os.path.join(tmp, f"solo{n}-{i}.json") for i in range(n)], []
    for i, out in enumerate(outs):
        solo_env = dict(env, CUDA_VISIBLE_DEVICES=str(i)) if a.device == "cuda" else env
        procs.append(launch([sys.executable, *me, "--mode", "sync", "--worker-out", out], solo_env))
    for i, proc in enumerate(procs):
        finish(proc, f"independent image {i} of {n}")
    solo = [json.load(open(o)) for o in outs]
    row.update(solo_cold_s=max(r["cold_s"] for r in solo), solo_warm_s=max(r["warm_s"] for r in solo),
               solo_images_per_s=sum(1 / r["warm_s"] for r in solo))
    if n == 1:
        row.update(patch_cold_s=row["solo_cold_s"], patch_warm_s=row["solo_warm_s"],
                   patch_images_per_s=row["solo_images_per_s"])
    return row


def main(argv=None) -> int:
    p = parser(__doc__, "throughput_cpu")
    add_run(p, model="default", size=512, steps=20, warmup=4, mode="partial", ranks=[1, 2])
    add_device(p, device="cpu", dtype=False)
    add_timing(p, repeat=1, warmup=None)     # the cold image is each process's warm-up
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0

    from common import config_of, hardware, provenance, save_plot, table, write_result

    prov, hw = provenance(argv), hardware()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in a.ranks:
            rows.append(measure(a, n, tmp))
            print(rows[-1], flush=True)
    base = rows[0]["patch_warm_s"] if rows[0]["n"] == 1 else None
    for r in rows:
        r["latency_speedup"] = base / r["patch_warm_s"] if base else None
    print(f"\n{a.model} {a.size}², {a.steps} steps dpmpp-2m, mode {a.mode}, warmup {a.warmup}; {hw['device']}\n")
    print(table(rows, [("n", "N"), ("patch_warm_s", "1 image on N: warm s"), ("latency_speedup", "latency speedup"),
                       ("patch_cold_s", "cold s"), ("solo_warm_s", "N images: warm s each"),
                       ("solo_images_per_s", "N images: images/s"), ("patch_images_per_s", "1 on N: images/s"),
                       ("solo_cold_s", "N images: cold s")]))
    path = write_result(a.name, "throughput", config_of(a), rows, prov, hw)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["n"] for r in rows]
    axes[0].plot(ns, [r["patch_warm_s"] for r in rows], "o-", label="1 image on N ranks (warm)")
    axes[0].plot(ns, [r["solo_warm_s"] for r in rows], "s-", label="N independent images, each (warm)")
    axes[0].plot(ns, [r["patch_cold_s"] for r in rows], "o--", label="1 image on N ranks (cold)")
    axes[0].set(xlabel="N", ylabel="seconds per image", title="latency")
    axes[1].plot(ns, [r["patch_images_per_s"] for r in rows], "o-", label="1 image on N ranks")
    axes[1].plot(ns, [r["solo_images_per_s"] for r in rows], "s-", label="N independent images")
    axes[1].set(xlabel="N", ylabel="images per second", title="throughput")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{a.model} {a.size}², {a.steps} steps, {a.mode} — {hw['device']}; python benchmarks/throughput.py")
    fig.tight_layout()
    print(f"wrote {path} and {save_plot(fig, a.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
