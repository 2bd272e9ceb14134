"""Joint attention's text-query merge in the stale modes: exact (every step) vs stale (the other
strips' partial outputs of the previous step), on the tests' tiny random-weight SD3 and Flux
pipelines (parafuse/diffusers/tiny.py) in the thread emulator (the real engine; torchrun equals it).

For each family, N, mode and merge: PSNR of the final latents against diffusers' own
single-process output (what `sync` equals to 1e-6), text_attn bytes and messages per rank and
step, and the waits each joint attention puts on the rank's critical path in a stale step.

    OMP_NUM_THREADS=1 python benchmarks/text_merge.py --steps 8 --warmup 2 --ranks 2 3
"""
from __future__ import annotations

import math
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (add_run, config_of, hardware, parser, patch_config, provenance, save_plot, table,  # noqa: E402
                    write_result)

from parafuse.diffusers import load_pipeline  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.diffusers.tiny import call_kwargs, images, pipeline_path  # noqa: E402

# waits on the critical path per joint attention in a stale step (ExchangeEngine.merge_text): exact
# waits for the lse all-gather before it can reweight, and for the all-reduce after the image
# attention it overlaps; stale waits for nothing (last step's receives completed long before)
BLOCKING = {"exact": 2, "stale": 0}


def psnr(a, b) -> float:
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10((b.max() - b.min()).item() ** 2 / mse)


def main(argv=None) -> None:
    p = parser(__doc__, "text_merge_cpu")
    p.add_argument("--families", nargs="+", default=["sd3", "flux"])
    add_run(p, ranks=[2, 3], modes=["full", "partial"], steps=8, warmup=2)
    args = p.parse_args(argv)
    prov = provenance(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            pipe = load_pipeline(pipeline_path(tmp, family))
            kw = lambda: {**call_kwargs(family), "num_inference_steps": args.steps}   # noqa: E731
            ref = images(pipe(**kw()))
            for n in args.ranks:
                for mode in args.modes:
                    runs = {}
                    for merge in ("exact", "stale"):
                        outs = emulate_pipeline(pipe, n, lambda q: images(q(**kw())),
                                                patch_config(mode, args.warmup, text_merge=merge))
                        runs[merge] = outs[0][0]
                        stats = [s for _, s in outs]
                        rows.append({"family": family, "ranks": n, "mode": mode, "text_merge": merge,
                                     "psnr_db": psnr(outs[0][0], ref),
                                     "text_attn_bytes_per_step": max(s["bytes_sent"]["text_attn"] for s in stats)
                                     / args.steps,
                                     "all_bytes_per_step": max(sum(s["bytes_sent"].values()) for s in stats)
                                     / args.steps,
                                     "blocking_waits_per_joint_attention": BLOCKING[merge]})
                    rows[-1]["psnr_vs_exact_db"] = psnr(runs["stale"], runs["exact"])
                    print(table(rows[-2:], COLUMNS), flush=True)
    print(table(rows, COLUMNS))
    path = write_result(args.name, "text_merge", config_of(args), rows, prov,
                        reference="diffusers' single-process output (= sync to 1e-6)")
    print("wrote", path, "and", plot(rows, args.name))


COLUMNS = [("family", "family"), ("ranks", "N"), ("mode", "mode"), ("text_merge", "text merge"),
           ("psnr_db", "PSNR vs serial (dB)"), ("psnr_vs_exact_db", "stale vs exact (dB)"),
           ("text_attn_bytes_per_step", "text_attn B/step/rank"), ("all_bytes_per_step", "all B/step/rank"),
           ("blocking_waits_per_joint_attention", "blocking waits")]


def plot(rows: list[dict], name: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["family"], r["ranks"], r["mode"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(configs)), 3.5))
    for k, merge in enumerate(("exact", "stale")):
        vals = [next(r["psnr_db"] for r in rows if (r["family"], r["ranks"], r["mode"]) == c and r["text_merge"] == merge)
                for c in configs]
        ax.bar([i + 0.4 * k for i in range(len(configs))], vals, 0.4, label=f"text merge {merge}")
    ax.set_xticks([i + 0.2 for i in range(len(configs))], [f"{f}\nN={n} {m}" for f, n, m in configs], fontsize=8)
    ax.set_ylabel("PSNR vs serial (dB)")
    ax.set_title(f"text-query merge, tiny random-weight pipelines ({hardware()['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_plot(fig, name, dpi=110)


if __name__ == "__main__":
    main()
