"""VAE decode: plain, diffusers' `vae.enable_tiling()`, and parafuse's decode by strips at N ranks.

A random-weight `AutoencoderKL` with SD's decoder layout (4 levels, 2 resnets per block, mid-block
attention, 8x upsampling) but thin channels (32, 32, 64, 64), so that a 1024² decode takes seconds
on one CPU thread. Each configuration runs in a fresh process (the strips: one torchrun job, gloo),
which reports its peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`: the process's
high-water mark, so a fresh process measures this configuration alone) before and after the
decode; their difference is what the decode added (per rank for the strips). Time is the fastest
of `--repeat` decodes. Tiling decodes 512-pixel tiles (64 latent rows) overlapping by a quarter and
blends them, so it differs from the plain decode; the strips run synchronously and should not.

    OMP_NUM_THREADS=1 python benchmarks/vae_decode.py --sizes 512 1024 --ranks 2 4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import (add_run, add_timing, config_of, hardware, parser, provenance, save_plot, table,  # noqa: E402
                    time_calls, write_result)


def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                         layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=512).eval()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # KiB on Linux


def worker(how: str, size: int, repeat: int, out_dir: str) -> None:
    """One configuration in this process (under torchrun for `strips`)."""
    vae = build_vae()
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    rank = 0
    if how == "tiling":
        vae.enable_tiling()
    elif how == "strips":
        from parafuse.diffusers import parallelize_vae
        import torch.distributed as dist

        parallelize_vae(vae)
        rank = dist.get_rank()
    before, last = peak_mib(), {}

    def decode():
        last["image"] = vae.decode(z).sample
    with torch.no_grad():
        timed = time_calls(decode, "cpu", repeat=repeat, warmup=0)
    after, image = peak_mib(), last["image"]
    if rank == 0:
        torch.save(image, os.path.join(out_dir, f"{how}.pt"))
    with open(os.path.join(out_dir, f"{how}.rank{rank}.json"), "w") as f:
        json.dump({"seconds": timed["seconds_min"], "median_seconds": timed["seconds"], "peak_mib": after,
                   "before_mib": before}, f)
    if how == "strips":
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(how: str, size: int, n: int, args, tmp: str) -> dict:
    out = os.path.join(tmp, f"{size}-{how}-{n}")
    os.makedirs(out)
    me = [os.path.abspath(__file__), "--worker", how, "--size", str(size), "--repeat", str(args.repeat), "--out", out]
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
                              if how == "strips" else []) + me
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.load(open(os.path.join(out, f"{how}.rank{r}.json"))) for r in range(n)]
    return {"size": size, "method": how if how != "strips" else f"strips N={n}", "ranks": n,
            "seconds": max(r["seconds"] for r in ranks),
            "peak_mib_per_rank": max(r["peak_mib"] for r in ranks),
            "decode_mib_per_rank": max(r["peak_mib"] - r["before_mib"] for r in ranks),
            "image": torch.load(os.path.join(out, f"{how}.pt"))}


COLUMNS = [("size", "image"), ("method", "decode"), ("seconds", "seconds"),
           ("peak_mib_per_rank", "peak RSS / rank (MiB)"), ("decode_mib_per_rank", "added by decode / rank (MiB)"),
           ("max_abs_diff", "max |diff| vs plain"), ("relative_diff", "÷ max |plain|")]


def main(argv=None) -> None:
    p = parser(__doc__, "vae_decode_cpu")
    add_run(p, sizes=[512, 1024], ranks=[2, 4])
    add_timing(p, repeat=2, warmup=None)        # each decode's time: the fastest of --repeat (the first warms up)
    p.add_argument("--worker", choices=["plain", "tiling", "strips"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.size, args.repeat, args.out)
    prov = provenance(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            runs = [run("plain", size, 1, args, tmp), run("tiling", size, 1, args, tmp)]
            runs += [run("strips", size, n, args, tmp) for n in args.ranks]
            plain = runs[0]["image"]
            for r in runs:
                r["max_abs_diff"] = (r.pop("image") - plain).abs().max().item()
                r["relative_diff"] = r["max_abs_diff"] / plain.abs().max().item()
                rows.append(r)
            print(table(rows[-len(runs):], COLUMNS), flush=True)
    print(table(rows, COLUMNS))
    path = write_result(
        args.name, "vae_decode", config_of(args), rows, prov, threads_per_process=1,
        vae="AutoencoderKL, block_out_channels (32, 32, 64, 64), 2 resnets per block, fp32, random weights",
        memory="ru_maxrss of a fresh process per configuration (per rank for strips); decode_mib = peak "
               "after minus peak before the decodes")
    print("wrote", path, "and", plot(rows, args.name))


def plot(rows: list[dict], name: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    sizes = sorted({r["size"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "decode_mib_per_rank", "memory added by the decode, per rank (MiB)"),
                           (axes[1], "seconds", "seconds")):
        width = 0.8 / len(methods)
        for k, m in enumerate(methods):
            vals = [next((r[key] for r in rows if r["size"] == s and r["method"] == m), 0) for s in sizes]
            ax.bar([i + k * width for i in range(len(sizes))], vals, width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], [f"{s}²" for s in sizes])
        ax.set_ylabel(label, fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"VAE decode, random-weight AutoencoderKL ({hardware()['device']}, 1 thread per process)", fontsize=9)
    fig.tight_layout()
    return save_plot(fig, name, dpi=110)


if __name__ == "__main__":
    main()
