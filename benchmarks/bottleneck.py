"""Quality and cost of the bottleneck schedule against one-stage schedules.

Re-noising at a stage change changes the image, so distributions are compared, not pixels: the
sliced Wasserstein distance (SWD) between multi-scale 7x7 patches of each generated image and
those of the default model's held-out photographs (parafuse/data.py: chelsea, rocket), as in
Karras et al. 2018: a Laplacian pyramid with the levels of a 256² crop (4 bands and the 16 px
residual; a larger image keeps 256² photograph crops and gets the same bands in cycles per
pixel), patches normalised per channel - here with the reference's statistics at every level, so
that a colour or contrast shift counts -, x 1e3, averaged over levels (per level in the JSON).
One SWD per seed; mean and standard error over seeds.

Schedules, per --steps S (serial, one process):
  bottleneck   --schedule bottleneck (full, half, full resolution; parafuse/stages.py's default)
  plain        the one-stage schedule of S steps
  equal-flops  a one-stage schedule whose step count spends the bottleneck's FLOPs
  bottleneck-published  the paper's setting (steps 6/20/8, strengths 1/0.8/0.6, shifts 3x/2x/3x)
  bottleneck-bicubic    the bottleneck schedule with bicubic instead of Lanczos upsampling
  bottleneck-unshifted  its stages without re-shifting (the model's own shift in every stage)
A second reference is the model's own distribution: the plain schedule at the largest --steps,
from other seeds (1000, 1001, ...). The issue's targets are judged against both references and
printed last: FLOPs saving >= 2.5x (goal 3x), patch-SWD at most 10% above the plain schedule's
and below the equal-FLOPs run's. The images are made from seeds 0, 1, ...; the default stage
setting was tuned on seeds 500-511 (stages.py), so these seeds are disjoint from the tuning.
Also the upsampling filters alone: held-out photographs area-downsampled 2x and upsampled back,
PSNR against the original.

    python benchmarks/bottleneck.py --size 256 --steps 20 50 --seeds 12

Writes benchmarks/results/bottleneck_<cpu|cuda>_<size>.{json,png}, and seed 0 of every run in
bottleneck_<cpu|cuda>_<size>_samples.png.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (add_run, add_seeds, config_of, hardware, parser, patch_config, provenance,  # noqa: E402
                               save_plot, table, timing_stats, write_result)
from parafuse.data import DEFAULT_HELD_OUT, fixed_crops, load_photo  # noqa: E402
from parafuse.report import psnr  # noqa: E402
from parafuse.runtime import Request, Runtime  # noqa: E402
from parafuse.solvers import make_schedule  # noqa: E402
from parafuse.stages import bottleneck, resize  # noqa: E402
from benchmarks.swd import (DIRECTIONS, MIN_LEVEL, PATCH, PATCHES_PER_LEVEL, PHOTO_CROP, QUANTILES,  # noqa: E402
                            pyramid_depth, pyramid_patches, swd)

SCHEDULES = ("bottleneck", "plain", "equal-flops", "bottleneck-published", "bottleneck-bicubic",
             "bottleneck-unshifted")


# ---- runs ------------------------------------------------------------------------------------------
def targets(rows: list[dict], names=("bottleneck", "bottleneck-published")) -> list[dict]:
    """The issue's targets per --steps, schedule and reference: FLOPs saving >= 2.5x (goal 3x);
    patch-SWD at most 10% above the plain schedule's of the same --steps, and below the
    equal-FLOPs run's. Judged on the means; the standard errors are given beside them."""
    out = []
    for steps in dict.fromkeys(r["steps"] for r in rows):
        row = {r["schedule"]: r for r in rows if r["steps"] == steps}
        for name in (n for n in names if n in row and "plain" in row and "equal-flops" in row):
            me, plain, equal = row[name], row["plain"], row["equal-flops"]
            for ref in ("model", "photos"):
                m, se = me[f"swd_{ref}_mean"], me[f"swd_{ref}_se"]
                out.append({"steps": steps, "schedule": name, "reference": ref, "flops_saving": me["flops_saving"],
                            "flops_met": me["flops_saving"] >= 2.5, "flops_goal_met": me["flops_saving"] >= 3.0,
                            "swd": m, "swd_se": se, "swd_plain": plain[f"swd_{ref}_mean"],
                            "swd_plain_se": plain[f"swd_{ref}_se"], "swd_equal": equal[f"swd_{ref}_mean"],
                            "swd_equal_se": equal[f"swd_{ref}_se"],
                            "vs_plain": m / plain[f"swd_{ref}_mean"] - 1,
                            "within_10pct_of_plain_met": m <= 1.1 * plain[f"swd_{ref}_mean"],
                            "below_equal_flops_met": m < equal[f"swd_{ref}_mean"]})
    return out


def verdict(t: dict) -> dict:
    """One printed row of targets(): met / missed in words."""
    said = {True: "met", False: "MISSED"}
    return {**t, "flops": f"{t['flops_saving']:.2f}x {said[t['flops_met']]}"
                          + (", goal 3x met" if t["flops_goal_met"] else ", goal 3x missed"),
            "ten": f"{t['swd']:.0f}±{t['swd_se']:.0f} vs {t['swd_plain']:.0f}±{t['swd_plain_se']:.0f} "
                   f"({100 * t['vs_plain']:+.0f}%): {said[t['within_10pct_of_plain_met']]}",
            "equal": f"{t['swd']:.0f} vs {t['swd_equal']:.0f}±{t['swd_equal_se']:.0f}: "
                     f"{said[t['below_equal_flops_met']]}"}


def mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)
    return m, math.sqrt(var / len(values))


def upsampling_filters(size: int) -> list[dict]:
    rows = []
    for name in DEFAULT_HELD_OUT:
        photo = load_photo(name)[None]
        h, w = (photo.shape[-2] // 2) * 2, (photo.shape[-1] // 2) * 2
        photo = photo[..., :h, :w]
        low = resize(photo, h // 2, w // 2)
        rows.append({"photo": name, **{f"psnr_{up}_db": psnr(resize(low, h, w, up).clamp(-1, 1), photo)
                                       for up in ("lanczos", "bicubic")}})
    return rows


def main(argv=None) -> int:
    p = parser(__doc__, None)
    p.add_argument("--name", default=None, help="result name (default: bottleneck_<cpu|cuda>_<size>)")
    add_run(p, model="default", size=256, steps=[20, 50], solver="dpmpp-2m")
    add_seeds(p, 8)
    p.add_argument("--ref-seeds", type=int, default=8,
                   help="images of the plain schedule at the largest --steps (seeds 1000, 1001, ...) that make "
                        "the second reference, the model's own distribution")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES,
                   help="which runs (default: every one; the targets need bottleneck, plain and equal-flops)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine two threads ran ~20x slower)")
    args = p.parse_args(argv)
    prov = provenance(argv)
    torch.set_num_threads(args.threads)

    rt = Runtime(args.model, patch_config(), device="cpu")
    own = make_schedule(**rt.spec.schedule)
    own_shift = own.shift if own.kind == "flow" else None
    crop = min(args.size, PHOTO_CROP)
    depth = pyramid_depth(args.size)                          # 256 px: 4 bands + the 16 px residual
    ref_images = fixed_crops(list(DEFAULT_HELD_OUT), crop, per_image=8, seed=0)
    # 4x as many patches per level as one image gives: 16 crops x 64
    refs = {"photos": pyramid_patches(ref_images, 4 * PATCHES_PER_LEVEL // len(ref_images), seed=1, depth=depth)}
    top = max(args.steps)
    model_images = torch.cat([rt.generate(Request(args.size, args.size, top, args.solver, seed=1000 + i)).image
                              for i in range(args.ref_seeds)])
    refs["model"] = pyramid_patches(model_images, 4 * PATCHES_PER_LEVEL // args.ref_seeds, seed=2, depth=depth)
    rows, samples = [], {}
    for steps in args.steps:
        req = Request(args.size, args.size, steps, args.solver, schedule="bottleneck")
        stages, _, _, evals = rt.stage_plan(req)
        budget = sum(rt.eval_flops(req, rt.stage_geometry(st)) * n for st, n in zip(stages, evals))
        per_eval = rt.eval_flops(req, rt.check(req))
        equal = max(1, round(budget / per_eval))        # one-stage steps that spend the bottleneck's FLOPs
        runs = {
            "bottleneck": dict(schedule="bottleneck"),
            "plain": {},
            "equal-flops": dict(steps=equal),
            "bottleneck-published": dict(stages=bottleneck(args.size, args.size, steps, rt.spec.pixel_factor, own_shift,
                                                           published=True)),
            "bottleneck-bicubic": dict(schedule="bottleneck", upsample="bicubic"),
            # the paper's ablation: the same stages without re-shifting (every stage at the model's own shift)
            "bottleneck-unshifted": dict(stages=tuple(replace(st, shift=None) for st in rt.stages(req))),
        }
        for name, change in ((k, v) for k, v in runs.items() if k in args.schedules):
            levels, seconds, flops, evals = {k: [] for k in refs}, [], None, None
            for seed in range(args.seeds):
                req = Request(args.size, args.size, change.get("steps", steps), args.solver, seed=seed,
                              schedule=change.get("schedule", "plain"), upsample=change.get("upsample", "lanczos"),
                              stages=change.get("stages"))
                t0 = time.perf_counter()
                res = rt.generate(req)
                seconds.append(time.perf_counter() - t0)
                mine = pyramid_patches(res.image, PATCHES_PER_LEVEL, seed=100 + seed, depth=depth)
                for k, ref in refs.items():
                    levels[k].append(swd(mine, ref))
                flops, evals = res.timing["flops"]["total"], len(res.timing["step_seconds"])
                if seed == 0:
                    samples[(steps, name)] = res.image[0]
            row = {"steps": steps, "schedule": name, "evaluations": evals, "flops_g": flops / 1e9,
                   "flops_saving": steps * per_eval / flops, "seconds_mean": sum(seconds) / len(seconds),
                   **{k: v for k, v in timing_stats(seconds).items()          # one image per seed: their spread
                      if k in ("seconds_min", "seconds_max", "count")}}
            for k, lv in levels.items():
                scores = [sum(v) / len(v) for v in lv]
                row[f"swd_{k}_mean"], row[f"swd_{k}_se"] = mean_se(scores)
                row[f"swd_{k}"] = scores
                row[f"swd_{k}_per_level_mean"] = [sum(v) / len(v) for v in zip(*lv)]
            rows.append(row)
            print(f"steps {steps} {name:20s} evals {evals:3d}  FLOPs saving {row['flops_saving']:5.2f}x  "
                  f"patch-SWD vs photos {row['swd_photos_mean']:7.1f} ± {row['swd_photos_se']:5.1f}, "
                  f"vs plain {top}-step images {row['swd_model_mean']:7.1f} ± {row['swd_model_se']:5.1f}  "
                  f"{row['seconds_mean']:.2f} s/image", flush=True)
    ref_self = [sum(v) / len(v) for v in (swd(pyramid_patches(ref_images[i:i + 1], PATCHES_PER_LEVEL, 200 + i, depth),
                                              refs["photos"]) for i in range(len(ref_images)))]
    filters = upsampling_filters(args.size)

    print()
    print(table(rows, [("steps", "--steps"), ("schedule", "schedule"), ("evaluations", "model evaluations"),
                       ("flops_saving", "FLOPs saving vs plain"), ("swd_photos_mean", "patch-SWD vs photos"),
                       ("swd_photos_se", "± s.e."), ("swd_model_mean", f"patch-SWD vs plain {top}-step"),
                       ("swd_model_se", "± s.e."), ("seconds_mean", "s / image")]))
    m, se = mean_se(ref_self)
    print(f"\nheld-out crops themselves (one crop against the pooled reference, which includes it): {m:.2f} ± {se:.2f}")
    print(table(filters, [("photo", "held-out photo"), ("psnr_lanczos_db", "2x down-up PSNR, Lanczos-3 (dB)"),
                          ("psnr_bicubic_db", "bicubic (dB)")]))
    goals = targets(rows)
    print(f"\nThe issue's targets (reference 'model': plain {top}-step images of seeds 1000+; 'photos': the "
          f"held-out photographs; judged on the means):")
    print(table([verdict(t) for t in goals],
                [("steps", "--steps"), ("schedule", "schedule"), ("reference", "reference"),
                 ("flops", "FLOPs saving >= 2.5x"), ("ten", "patch-SWD <= 1.1 x plain"),
                 ("equal", "patch-SWD < equal-FLOPs run")]))
    tag = "cpu" if not torch.cuda.is_available() else "cuda"
    hw = hardware()
    data = {"torch_threads": torch.get_num_threads(),
            "reference": {"photos": list(DEFAULT_HELD_OUT), "crops": len(ref_images), "swd_self_mean": m,
                          "swd_self_se": se, "model": f"plain {top} steps, seeds 1000..{999 + args.ref_seeds}"},
            "targets": goals,
            "seeds_note": f"images from seeds 0..{args.seeds - 1}; the default stage setting was tuned on seeds "
                          f"500-511 (parafuse/stages.py), disjoint from these and from the reference's 1000+",
            "upsampling": filters,
            "metric": {"patch": PATCH, "min_level_px": MIN_LEVEL, "photo_crop": crop, "levels": depth, "patches_per_level_per_image": PATCHES_PER_LEVEL,
                       "directions": DIRECTIONS, "quantiles": QUANTILES}}
    name = args.name or f"bottleneck_{tag}_{args.size}"
    path = write_result(name, "bottleneck", config_of(args), rows, prov, hw, **data)
    print(f"\nwrote {path}")
    plot(rows, samples, name, {**data, "model": args.model, "size": args.size, "seeds": args.seeds, "hardware": hw})
    return 0


def plot(rows, samples, out, data) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["steps"] for r in rows})
    names = list(dict.fromkeys(r["schedule"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(names)
    for ax, ref, what in zip(axes, ("photos", "model"), ("held-out photographs", data["reference"]["model"])):
        for j, name in enumerate(names):
            sel = [next(r for r in rows if r["steps"] == s and r["schedule"] == name) for s in steps]
            ax.bar([i + j * width for i in range(len(steps))], [r[f"swd_{ref}_mean"] for r in sel], width,
                   yerr=[r[f"swd_{ref}_se"] for r in sel], capsize=3,
                   label=f"{name}" + ("" if name == "plain" else " (" + ", ".join(
                       f"{r['flops_saving']:.1f}x" for r in sel) + " fewer FLOPs)"))
        if ref == "model":
            for i, s in enumerate(steps):
                plain = next(r for r in rows if r["steps"] == s and r["schedule"] == "plain")["swd_model_mean"]
                ax.hlines(1.1 * plain, i - width / 2, i + 0.8 - width / 2, colors="black", linestyles=":", lw=1,
                          label="1.1 x plain (the target)" if i == 0 else None)
        if ref == "photos":
            ax.axhline(data["reference"]["swd_self_mean"], color="gray", ls="--", lw=1,
                       label="held-out crops themselves")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(steps))], [f"--steps {s}" for s in steps])
        ax.set_ylabel("patch-SWD ×1e3 (lower is closer)")
        ax.set_title(f"against {what}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['model']} {data['size']}², {data['seeds']} seeds, mean ± s.e.; {data['hardware']['device']}",
                 fontsize=9)
    fig.tight_layout()
    save_plot(fig, out, dpi=120)
    plt.close(fig)

    keys = list(samples)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.2 * len(keys), 2.6))
    for ax, key in zip(axes, keys):
        ax.imshow(((samples[key].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        ax.set_title(f"{key[1]}\n--steps {key[0]}, seed 0", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    save_plot(fig, out + "_samples", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
