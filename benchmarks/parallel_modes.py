"""Bytes per step per rank and PSNR against the serial run, for every mode, N and built-in model.

Each configuration is one `torchrun --nproc_per_node N -m parafuse.generate --compare-serial`
(gloo on CPU, NCCL on GPUs); the numbers are read from its run report.

    python benchmarks/parallel_modes.py --models default dit-small --ranks 1 2 4 --size 256 --steps 20
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_run, config_flags, config_of, hardware, parser, patch_config, provenance,  # noqa: E402
                    save_plot, table, write_result)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("sync", "full", "partial", "none")


def run(model: str, n: int, mode: str, args, tmp: str) -> dict:
    rep = os.path.join(tmp, f"{model}-{n}-{mode}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "parafuse.generate", "--model", model, "--height", str(args.size), "--width", str(args.size),
           "--steps", str(args.steps), "--solver", args.solver,
           *config_flags(patch_config(mode, args.warmup, args.portion)),     # the run's PatchConfig as flags
           "--compare-serial", "--no-progress", "--out", os.path.join(tmp, "x.png"), "--report", rep, "--overwrite"]
    if model != "default":
        cmd += ["--guidance", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n))))
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    r = json.load(open(rep))
    per_rank = [sum(x["bytes_sent"].values()) / len(r["step_seconds"]) for x in r["ranks"]]
    return {"model": model, "ranks": n, "mode": mode if n > 1 else "serial",
            "bytes_per_step_per_rank": sum(per_rank) / n, "max_rank_bytes_per_step": max(per_rank),
            "psnr_db": r["compare"]["psnr_db"], "max_abs_diff": r["compare"]["max_abs_diff"],
            "seconds": r["total_seconds"]}


def main(argv=None) -> None:
    p = parser(__doc__, "parallel_modes_cpu")
    add_run(p, models=["default", "dit-small"], ranks=[1, 2, 4], size=256, steps=20, warmup=4, portion=0.3,
            solver="dpmpp-2m")
    args = p.parse_args(argv)
    prov = provenance(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for n in args.ranks:
                for mode in (MODES if n > 1 else ("sync",)):
                    rows.append(run(model, n, mode, args, tmp))
                    print(rows[-1], flush=True)
    hw = hardware()
    cols = [("model", "model"), ("ranks", "N"), ("mode", "mode"), ("bytes_per_step_per_rank", "bytes/step/rank"),
            ("psnr_db", "PSNR vs serial (dB)"), ("max_abs_diff", "max abs diff"), ("seconds", "denoise s")]
    print(f"\n{args.size}x{args.size}, {args.steps} steps {args.solver}, warmup {args.warmup}, p={args.portion}; "
          f"{hw['device']}, torch {hw['torch']}\n")
    print(table(rows, cols))
    path = write_result(args.name, "parallel_modes", config_of(args), rows, prov, hw)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in args.models:
        for mode in MODES:
            pts = [r for r in rows if r["model"] == model and r["mode"] == mode]
            if pts:
                axes[0].plot([r["ranks"] for r in pts], [r["bytes_per_step_per_rank"] / 1e6 for r in pts], "o-", label=f"{model} {mode}")
                axes[1].plot([r["ranks"] for r in pts], [99 if r["psnr_db"] is None else min(r["psnr_db"], 99) for r in pts], "o-", label=f"{model} {mode}")
    axes[0].set(xlabel="ranks", ylabel="MB sent per step per rank", title="communication")
    axes[1].set(xlabel="ranks", ylabel="PSNR vs serial (dB, capped at 99)", title="quality")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{args.size}² {args.steps} steps — {hw['device']}")
    fig.tight_layout()
    print(f"wrote {path} and {save_plot(fig, args.name)}")


if __name__ == "__main__":
    main()
