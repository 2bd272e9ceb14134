"""Quality against the serial image, and bytes against the published systems, for every mode and N.

For each model, size, step count and seed, the serial image is made once; every parallel run of
the same request is compared with it: PSNR, max abs difference and SSIM (scikit-image's, on the
decoded image in [-1, 1]) - and, pooled over the seeds, the multi-scale 7x7 patch-SWD (benchmarks/swd.py)
of each configuration's images against the serial images of the same seeds: distribution against
distribution, the patches of both sets taken at the same positions (seeded per seed), so identical
images score 0 and `none` gives the floor. Parallel runs use the single-process emulator (N threads running the
real runtime; a torchrun run equals it, tests/parallel/test_parallel.py), so N = 8 runs on a 2-core machine.

Bytes per rank per step (the busiest rank, averaged over the run's steps, warmup included) come
from the same runs' transports. The baselines `distrifusion` and `pcpp` run as the published
systems do: their traffic (all-gathered halos, statistics and model output) and their GroupNorm
statistics (DistriFusion's corrected-async estimate), against parafuse's exact statistics.

Grid: N x mode at `--warmup` and `--portion`; at the largest N also `--warmups` and `--portions`
(the knobs users turn) for full and partial.

    python benchmarks/quality.py                                   # the committed CPU grid (256², both models)
    python benchmarks/quality.py --models default --sizes 1024 --ranks 8 --modes full partial \\
        --seeds 0 1 2 3 --name quality_1024_cpu                     # the issue's 1024² target
    python benchmarks/quality.py --models dit-texture --sizes 256 --ranks 8 --modes full partial distrifusion \
        pcpp none --warmups 1 2 4 --portions 0.1 0.3 0.5 --name quality_256_dit_texture_cpu   # the DiT target
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_dtype, add_run, add_seeds, config_of, hardware, parser, patch_config, provenance,  # noqa: E402
                    read_result, result_path, save_plot, table, write_result)
from swd import PATCHES_PER_LEVEL, pyramid_depth, pyramid_patches, swd  # noqa: E402

from parafuse.models import load_model  # noqa: E402
from parafuse.runtime import emulate  # noqa: E402
from parafuse.report import psnr  # noqa: E402
from parafuse.runtime import Request, Runtime  # noqa: E402

def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from skimage.metrics import structural_similarity
    x, y = (t[0].permute(1, 2, 0).double().numpy() for t in (a, b))
    return float(structural_similarity(x, y, data_range=2.0, channel_axis=2))


def request(model, size: int, steps: int, seed: int) -> Request:
    return Request(size, size, steps, "dpmpp-2m", 1.0, seed, 0 if model.spec.num_classes else None)


def busiest_bytes_per_step(runtimes, steps: int) -> float:
    return max(sum(rt.transport.totals()[0].values()) for rt in runtimes) / steps


def parallel_run(model, n: int, mode: str, warmup: int, portion: float, req: Request, dtype: str = "fp32"):
    """(image, busiest rank's bytes per step over the run, its bytes per steady-state step): the
    latter is the median over the stale steps (after the warmup, before the last step's gather)."""
    marks: dict[int, list[int]] = {}

    def count_steps(rt):
        if rt.engine is None:
            return
        begin, mine = rt.engine.begin_step, marks.setdefault(rt.layout.rank, [])

        def begin_step(k):
            mine.append(sum(rt.transport.totals()[0].values()))
            begin(k)
        rt.engine.begin_step = begin_step

    runtimes, results = emulate(model, n, patch_config(mode, warmup, portion), req, strict=False,
                                on_rank=count_steps, dtype=dtype)
    steady = [statistics.median(m[k + 1] - m[k] for k in range(warmup, len(m) - 1))
              for m in marks.values() if len(m) - 1 > warmup]
    return results[0][0].image, busiest_bytes_per_step(runtimes, req.steps), max(steady, default=None)


def configurations(a) -> list[tuple[int, str, int, float]]:
    """(N, mode, warmup, portion): N x mode at the default knobs, then the knob sweeps at max N."""
    out = [(n, mode, a.warmup, a.portion) for n in a.ranks for mode in a.modes]
    top = max(a.ranks)
    out += [(top, mode, w, a.portion) for w in a.warmups if w != a.warmup for mode in a.modes
            if mode.partition("+")[0] in ("full", "partial", "distrifusion")]
    out += [(top, mode, a.warmup, p) for p in a.portions if p != a.portion for mode in a.modes
            if mode.partition("+")[0] == "partial"]
    return out


def seed_patches(image: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """The patch-SWD descriptors of one image: the same positions for every image of `seed`."""
    return pyramid_patches(image, PATCHES_PER_LEVEL, seed=100 + seed, depth=pyramid_depth(min(image.shape[-2:])))


def pooled_swd(mine: list[list[torch.Tensor]], ref: list[list[torch.Tensor]]) -> list[float]:
    """Patch-SWD per pyramid level of the pooled patches of several images against the pooled reference."""
    return swd([torch.cat(level) for level in zip(*mine)], [torch.cat(level) for level in zip(*ref)])


def measure(a, log=print) -> list[dict]:
    rows = []
    for name in a.models:
        model = load_model(name)
        for size in a.sizes:
            for steps in a.steps:
                per: dict[tuple, list] = {}
                ref_patches, cfg_patches = [], {}
                for seed in a.seeds:
                    req = request(model, size, steps, seed)
                    t0 = time.perf_counter()
                    ref = Runtime(model, patch_config(dtype=a.dtype)).generate(req).image.float()
                    log(f"{name} {size}² {steps} steps seed {seed}: serial {time.perf_counter() - t0:.1f} s")
                    ref_patches.append(seed_patches(ref, seed))
                    for cfg in configurations(a):
                        n, mode, warmup, portion = cfg
                        image, nbytes, steady = parallel_run(model, n, mode, warmup, portion, req, a.dtype)
                        image = image.float()
                        per.setdefault(cfg, []).append({"psnr_db": psnr(image, ref),
                                                        "max_abs_diff": (image - ref).abs().max().item(),
                                                        "ssim": ssim(image, ref), "bytes": nbytes,
                                                        "steady_bytes": steady})
                        cfg_patches.setdefault(cfg, []).append(seed_patches(image, seed))
                        log(f"  N={n} {mode} warmup {warmup} p={portion}: {per[cfg][-1]['psnr_db']:.2f} dB, "
                            f"{nbytes / 1e6:.3f} MB/step busiest rank")
                for (n, mode, warmup, portion), runs in per.items():
                    levels = pooled_swd(cfg_patches[(n, mode, warmup, portion)], ref_patches)
                    rows.append(dict(summarise(name, size, steps, n, mode, warmup, portion, runs),
                                     patch_swd=sum(levels) / len(levels), patch_swd_levels=levels,
                                     patch_swd_images=len(runs)))
    return rows


def summarise(model, size, steps, n, mode, warmup, portion, runs) -> dict:
    def stats(key):
        vals = [r[key] for r in runs]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
    (p, p_sd), (m, _), (s, s_sd) = stats("psnr_db"), stats("max_abs_diff"), stats("ssim")
    return {"model": model, "size": size, "steps": steps, "n": n, "mode": mode, "warmup": warmup,
            "portion": portion if mode.partition("+")[0] in ("partial", "pcpp") else None, "seeds": len(runs),
            "psnr_db": p, "psnr_sd": p_sd, "max_abs_diff": m, "ssim": s, "ssim_sd": s_sd,
            "bytes_per_step_busiest_rank": runs[0]["bytes"],
            "steady_bytes_per_step_busiest_rank": runs[0]["steady_bytes"]}


def targets(rows: list[dict]) -> list[dict]:
    """Issue 13's targets, where the grid has the rows: the bytes of `partial` (and of every mode
    with a K/V codec) against DistriFusion's at the largest N (the issue's N = 8; <= 20% on the
    U-Net, <= 10% on a DiT) with PSNR no more than 1 dB below. Two verdicts: `met` on the bytes
    averaged over the whole run, warmup included - where both modes all-gather whole K/V, so with
    4 warmup steps of 20 no mode can go under ~20% - and `met_steady` on the stale steps' bytes."""
    out = []
    top = max(r["n"] for r in rows)
    for r in rows:
        if not (r["mode"] == "partial" or "+" in r["mode"]) or r["n"] != top:
            continue
        base = next((b for b in rows if b["mode"] == "distrifusion" and all(
            b[k] == r[k] for k in ("model", "size", "steps", "n", "warmup"))), None)
        if base is None:
            continue
        limit = 0.2 if r["model"].startswith(("default", "unet")) else 0.1
        share = r["bytes_per_step_busiest_rank"] / base["bytes_per_step_busiest_rank"]
        steady = r.get("steady_bytes_per_step_busiest_rank")
        steady_share = steady / base["steady_bytes_per_step_busiest_rank"] if steady is not None else None
        close = base["psnr_db"] - r["psnr_db"] <= 1.0
        out.append({"model": r["model"], "size": r["size"], "steps": r["steps"], "n": r["n"], "mode": r["mode"],
                    "warmup": r["warmup"], "portion": r["portion"], "bytes_share": share,
                    "steady_bytes_share": steady_share, "bytes_limit": limit,
                    "psnr_gap_db": base["psnr_db"] - r["psnr_db"], "met": share <= limit and close,
                    "met_steady": steady_share is not None and steady_share <= limit and close})
    return out


def plot(rows: list[dict], a, hw: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(a.ranks)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for model in a.models:
        for mode in a.modes:
            pts = [r for r in rows if r["model"] == model and r["mode"] == mode and r["warmup"] == a.warmup
                   and r["portion"] in (None, a.portion) and r["size"] == a.sizes[0] and r["steps"] == a.steps[0]]
            if not pts:
                continue
            ns = [r["n"] for r in pts]
            axes[0].errorbar(ns, [r["psnr_db"] for r in pts], [r["psnr_sd"] for r in pts], fmt="o-",
                             capsize=3, label=f"{model} {mode}")
            axes[1].plot(ns, [r["bytes_per_step_busiest_rank"] / 1e6 for r in pts], "o-", label=f"{model} {mode}")
        for knob, key, mode_list in (("warmup", "warmup", ("full", "partial", "distrifusion")),
                                     ("portion", "portion", ("partial",))):
            for mode in mode_list:
                pts = sorted((r for r in rows if r["model"] == model and r["mode"] == mode and r["n"] == top
                              and r["size"] == a.sizes[0] and r["steps"] == a.steps[0]
                              and (r["warmup"] == a.warmup if knob == "portion" else r["portion"] in (None, a.portion))),
                             key=lambda r: r[key])
                if len(pts) > 1:
                    axes[2].errorbar([r[key] for r in pts], [r["psnr_db"] for r in pts], [r["psnr_sd"] for r in pts],
                                     fmt="o-", capsize=3, label=f"{model} {mode} vs {knob}")
    axes[0].set(xlabel="N", ylabel="PSNR vs serial (dB)", title=f"quality, warmup {a.warmup}, p = {a.portion}")
    axes[1].set(xlabel="N", ylabel="MB per step, busiest rank", title="communication (baselines included)")
    axes[2].set(xlabel="warmup steps / portion p", ylabel="PSNR vs serial (dB)", title=f"the knobs, N = {top}")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
        else:   # a run with one warmup and one p (or one N) has nothing to draw here
            ax.text(0.5, 0.5, "not swept in this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{a.sizes[0]}², {a.steps[0]} steps, {len(a.seeds)} seeds (mean ± sd) — {hw['device']}; "
                 f"python benchmarks/quality.py")
    fig.tight_layout()
    return save_plot(fig, a.name)


def main(argv=None) -> int:
    p = parser(__doc__, "quality_cpu")
    add_run(p, models=["default", "dit-small"], sizes=[256], steps=[20], ranks=[2, 4, 8],
            modes=["full", "partial", "none", "distrifusion", "pcpp"], warmup=4, warmups=[1, 2, 4], portion=0.3,
            portions=[0.1, 0.3, 0.5])
    add_seeds(p, [0, 1, 2, 3])
    add_dtype(p, "fp32", "the model's dtype, serial and parallel (K/V and halos travel in it)")
    p.add_argument("--replot", action="store_true", help="redraw the plot of the results already in --name's JSON")
    a = p.parse_args(argv)
    prov = provenance(argv)
    if a.replot:
        res = read_result(result_path(a.name))
        plot(res["rows"], argparse.Namespace(**res["config"]), res["hardware"])
        return 0
    begin = time.perf_counter()
    rows = measure(a)
    hw = hardware()
    cols = [("model", "model"), ("size", "size"), ("steps", "steps"), ("n", "N"), ("mode", "mode"),
            ("warmup", "warmup"), ("portion", "p"), ("psnr_db", "PSNR dB"), ("psnr_sd", "± sd"), ("ssim", "SSIM"),
            ("patch_swd", "patch-SWD"), ("max_abs_diff", "max abs"), ("bytes_per_step_busiest_rank", "bytes/step (busiest)"),
            ("steady_bytes_per_step_busiest_rank", "steady bytes/step")]
    print(f"\n{hw['device']}, torch {hw['torch']}; {len(a.seeds)} seeds; dpmpp-2m; patch-SWD x 1e3 of the "
          f"{len(a.seeds)} images of each row against the {len(a.seeds)} serial images\n")
    print(table(rows, cols))
    goal = targets(rows)
    if goal:
        print()
        print(table(goal, [("model", "model"), ("size", "size"), ("n", "N"), ("mode", "mode"), ("warmup", "warmup"),
                           ("portion", "p"), ("bytes_share", "bytes / distrifusion's (run)"),
                           ("steady_bytes_share", "steady-state share"), ("bytes_limit", "limit"),
                           ("psnr_gap_db", "PSNR gap dB"), ("met", "met (run)"), ("met_steady", "met (steady)")]))
    path = write_result(a.name, "quality", config_of(a), rows, prov, hw, seconds=time.perf_counter() - begin,
                        targets=goal)
    print(f"wrote {path} and {plot(rows, a, hw)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
