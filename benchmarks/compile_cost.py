"""What torch.compile costs under the pipeline door: a parallel pipeline whose denoiser is compiled
before `parafuse.parallelize` (`pipe.unet = torch.compile(pipe.unet)`) or in place after it
(`pipe.unet.compile()`), beside the same pipeline uncompiled, on the tests' tiny random-weight
pipelines (parafuse/diffusers/tiny.py: `sdxl-depth` has SDXL's count of layers at tiny widths) in
the thread emulator.

Per family and way of compiling: the first pipeline call (dynamo's tracing and the backend's
compile, then the steps) and the steady calls after it (`--repeat` of them: guards and the compiled
pieces; median, min and max), wall time of the whole emulated job on this machine; the frames dynamo compiled (each piece between two
graph breaks is one), its graph breaks, and the functions that reached its recompile limit (dynamo
runs those eagerly past it). The default backend "eager" runs dynamo alone: the steady time then
shows what the graph breaks and guards cost, not what a compiler's kernels gain (`--backend
inductor` for those; on a GPU, torch.compile's speed under parafuse is unmeasured). Not a GPU
figure: this machine's CPU, shared by the emulated ranks.

    python benchmarks/compile_cost.py --families sdxl-depth sd-lite --ranks 2
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (add_run, add_timing, config_of, hardware, parser, patch_config, provenance, save_plot,  # noqa: E402
                    table, timing_stats, write_result)

import torch  # noqa: E402

from parafuse.diffusers import load_pipeline  # noqa: E402
from parafuse.diffusers.emulator import emulate_pipeline  # noqa: E402
from parafuse.diffusers.tiny import call_kwargs, images, pipeline_path  # noqa: E402

WAYS = ("uncompiled", "before", "in-place")


class LimitHits(logging.Handler):
    """The files of the functions for which dynamo logs that it reached a recompile limit."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.files: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message:
            hit = re.search(r"function: '([^']*)' \(([^:]+):", message)
            self.files.append(f"{hit.group(1)} {os.path.relpath(hit.group(2))}" if hit else message.split("\n")[0])


def run(pipe, family: str, way: str, n: int, steps: int, config, backend: str, repeat: int) -> dict:
    """1 + `repeat` pipeline calls of the parallel pipeline compiled `way`, from an empty dynamo cache."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"     # the denoiser
    if way == "before":
        setattr(pipe, name, torch.compile(getattr(pipe, name), backend=backend))
    seconds: list[float] = []

    def call(par):
        if way == "in-place":
            getattr(par, name).compile(backend=backend)
        for _ in range(1 + repeat):
            start = time.perf_counter()
            images(par(**{**call_kwargs(family), "num_inference_steps": steps}))
            if par.layout.rank == 0:
                seconds.append(time.perf_counter() - start)
    hits = LimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    try:
        emulate_pipeline(pipe, n, call, config, cuda_graphs=False)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(hits)
        if way == "before":
            setattr(pipe, name, getattr(pipe, name)._orig_mod)
    steady = timing_stats(seconds[1:])
    return {"family": family, "ranks": n, "way": way, "backend": None if way == "uncompiled" else backend,
            "first_call_s": seconds[0], "steady_call_s": steady["seconds"], "steady_spread": steady["spread"],
            "steady": steady, "frames_compiled": counters["frames"]["ok"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompile_limit_hits": len(hits.files), "limit_hit_functions": sorted(set(hits.files))}


def main(argv=None) -> None:
    p = parser(__doc__, "compile_cost_cpu")
    p.add_argument("--families", nargs="+", default=["sdxl-depth", "sd-lite"])
    p.add_argument("--backend", default="eager", help="torch.compile's backend (default: %(default)s, dynamo alone)")
    add_run(p, ranks=[2], mode="partial", steps=3, warmup=1)
    add_timing(p, repeat=5, warmup=None)
    args = p.parse_args(argv)
    prov = provenance(argv)
    config = patch_config(args.mode, args.warmup)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            pipe = load_pipeline(pipeline_path(tmp, family))
            for n in args.ranks:
                for way in WAYS:
                    rows.append(run(pipe, family, way, n, args.steps, config, args.backend, args.repeat))
                    print(table(rows[-1:], COLUMNS), flush=True)
    print(table(rows, COLUMNS))
    for r in rows:
        for f in r["limit_hit_functions"]:
            print(f"  {r['family']} {r['way']}: recompile limit reached by {f}")
    path = write_result(args.name, "compile_cost", config_of(args), rows, prov,
                        note="wall time of the whole emulated job (all ranks' threads) on this CPU; "
                             "not a GPU figure")
    print("wrote", path, "and", plot(rows, args.name))


COLUMNS = [("family", "family"), ("ranks", "N"), ("way", "compiled"), ("backend", "backend"),
           ("first_call_s", "first call s"), ("steady_call_s", "steady call s (median)"),
           ("steady_spread", "spread"),
           ("frames_compiled", "frames"), ("graph_breaks", "graph breaks"),
           ("recompile_limit_hits", "limit hits")]


def plot(rows: list[dict], name: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['family']}\nN={r['ranks']} {r['way']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["first_call_s"] for r in rows], 0.4, label="first call")
    ax.bar([x + 0.2 for x in xs], [r["steady_call_s"] for r in rows], 0.4, label="steady call")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("seconds (whole emulated job)")
    ax.set_yscale("log")
    ax.set_title(f"torch.compile under the pipeline door, backend {rows[0]['backend'] or rows[-1]['backend']} "
                 f"({hardware()['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_plot(fig, name, dpi=110)


if __name__ == "__main__":
    main()
