"""Per-rank compute scaling: how much faster one rank's strip step is than the whole image.

For each model, image size, N and mode, one process runs the steady-state step of one strip (the
stale step plan after the synchronous warmup) over a NullTransport, which counts every byte the
step would send and moves nothing: the time is compute alone, what N GPUs would each spend if
communication hid perfectly behind it. The slowest of the first strip (the most rows, one
neighbour) and a middle strip (two neighbours) counts. The serial baseline runs in the same
dtype and attention backend. Also per row: bytes and messages per step by kind (of the busiest of
the two strips), exchange state held between steps, ATen ops per step and peak memory.

Like with like (issue 28): the serial step runs with the same kernels as the strips (`--kernels
triton`: a one-strip engine puts the same patch layers, and their Triton GroupNorm, into the
serial model; it sends nothing), so each kernel choice has its own serial row and the kernel gain
is reported apart (`kernel_gain`: the PyTorch serial step over this one). Peak memory is measured
after the model is in its dtype (`weights_bytes` then, `peak_memory_bytes` the peak above zero,
`activation_peak_bytes` the peak above the weights). On CUDA each row also records the host's time
to issue one step (`host_seconds`) and flags `host_bound` where issuing takes at least 90% of the
step: the GPU then waits for Python, and the row measures the host, not the kernels. `sync` is
among the default modes, beside full and partial.

With `--timeline` each strip row also carries one steady step's timeline: when each exchange was
posted and waited on the compute stream, with its kind, bytes and messages (`TimelineRecorder`
around the transport; same counts), which `benchmarks/project.py` replays through a FIFO link.

With `--transport loopback` the step also does its communication, as device-to-device copies on
a side stream (`LoopbackTransport`), which overlap compute as NCCL's would. On CPU it also times
real `torchrun` runs (gloo) for N up to the core count: mean seconds of the steady-state steps
from the run report, against the serial run.

    python benchmarks/scaling.py                                    # CPU: default + dit-small
    python benchmarks/scaling.py --models unet-xl dit-xl --sizes 2048 4096 --device cuda --dtype bf16
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_device, add_run, add_timing, config_flags, config_of, hardware, parser,  # noqa: E402
                    patch_config, provenance, save_plot, table, time_calls, write_result)

from parafuse.models import load_model  # noqa: E402
from parafuse.parallel.distributed import ParallelLayout  # noqa: E402
from parafuse.parallel.parallelize import unparallelize  # noqa: E402
from parafuse.parallel.transport import LoopbackTransport, NullTransport, TimelineRecorder  # noqa: E402
from parafuse.profile import OpCounter  # noqa: E402
from parafuse.parallel.config import Kernels  # noqa: E402
from parafuse.runtime import Request, Runtime  # noqa: E402

KERNELS = [k.value for k in Kernels]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HOST_BOUND = 0.9     # issuing a step takes at least this share of its GPU time: the host sets the pace


def serial_runtime(model, device, dtype, cuda_graphs: bool, kernels: str, patch_layers: bool) -> Runtime:
    """The serial step's runtime on `kernels`; with `patch_layers`, the strips' patch layers on the
    whole image (a one-strip engine: no peers, nothing sent), so that their kernels run there too."""
    rt = Runtime(model, patch_config(dtype=dtype, cuda_graphs=cuda_graphs, kernels=kernels), device=str(device),
                 transport=NullTransport(0, 1))
    if patch_layers:
        from parafuse.parallel.engine import ExchangeEngine
        from parafuse.parallel.parallelize import parallelize

        rt.session.engine = ExchangeEngine(rt.transport, [0], rt.config.replace(mode="sync"))
        parallelize(rt.model, rt.engine)
    return rt


def measure(model, req: Request, device, dtype, mode: str | None, n: int, strip: int, warmup_steps: int = 1,
            repeat: int = 5, cuda_graphs: bool = False, transport: str = "null", kernels: str = "torch",
            timing_warmup: int = 2, timeline: bool = False) -> dict:
    """One strip's steady-state step (or the serial step, mode None): seconds (median, with the
    spread of the timed calls), host seconds, bytes per step by kind, state bytes, ATen ops, memory.
    `transport`: "null" (compute alone) or "loopback" (the step's communication done as device
    copies on a side stream). `kernels`: the patch layers' - the serial step's too: other than
    "torch", a one-strip engine puts the same patch layers into the serial model. Memory is
    measured from after the model is in its dtype. Timed by common.time_calls (`timing_warmup`
    untimed calls, then `repeat`, at most 20 s of them). `timeline`: the transport wrapped in a
    `TimelineRecorder` (it counts the same bytes), and the row's `timeline` one steady step's posts
    and waits after the timed calls (under graphs a replay's, stamped by the captured events).
    Leaves `model` plain."""
    if mode is None:
        rt = serial_runtime(model, device, dtype, cuda_graphs, kernels, patch_layers=kernels != "torch")
    else:
        moves = (LoopbackTransport if transport == "loopback" else NullTransport)(strip, n)
        rt = Runtime(model, patch_config(mode, warmup_steps, dtype=dtype, cuda_graphs=cuda_graphs, kernels=kernels),
                     device=str(device), layout=ParallelLayout(strip, n),
                     transport=TimelineRecorder(moves) if timeline else moves)
    weights = None
    if device.type == "cuda":          # from here: the model is in its dtype on the device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        weights = torch.cuda.memory_allocated(device)
    try:
        step = rt.rank_step(req)
        timed = time_calls(step, device, repeat=repeat, warmup=timing_warmup, max_seconds=20.0)
        seconds, host_seconds = timed["seconds"], timed["host_seconds"]
        eager = rt.rank_step(req) if cuda_graphs else step     # its first call runs eagerly
        with OpCounter() as ops:       # a replayed graph dispatches no ATen ops: count the eager step
            eager()
        if rt.transport is not None:
            rt.transport.reset_counts()
        step()
        sent = rt.transport.totals()[0] if rt.transport is not None else {}
        messages = dict(rt.transport.messages_sent) if rt.transport is not None else {}
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        recorded = {}
        if timeline and mode is not None:
            recorded["timeline"] = recorded_step(rt.transport, step, device)
        return {**recorded, "seconds": seconds, "seconds_min": timed["seconds_min"],
                "seconds_max": timed["seconds_max"],
                "repeats": timed["count"], "timing": timed["timing"],
                "host_seconds": host_seconds, "ops_per_ms": ops.total / (seconds * 1e3),
                "host_bound": (host_seconds >= HOST_BOUND * seconds and not cuda_graphs) if device.type == "cuda"
                else None,
                "bytes_per_step": {k: v for k, v in sent.items() if v},
                "messages_per_step": {k: v for k, v in messages.items() if v},
                "state_bytes": rt.engine.state_bytes() if rt.engine is not None else 0,
                "aten_ops": ops.total, "peak_memory_bytes": peak, "weights_bytes": weights,
                "activation_peak_bytes": None if peak is None else peak - weights}
    finally:
        if rt.engine is not None:
            rt.engine.drain()
        unparallelize(model)


def recorded_step(recorder: TimelineRecorder, step, device) -> dict:
    """One steady step's timeline: two steps between boundaries, the second kept (its stale waits
    are of the first one's posts)."""
    from project import compact_timeline

    marks = device if device.type == "cuda" else None
    recorder.boundary(marks)
    step()
    recorder.boundary(marks)
    step()
    recorder.finish(marks)
    return compact_timeline(recorder.timelines()[-1])


def scaling_rows(model_name: str, sizes, ranks, modes, device, dtype, repeat: int = 5,
                 deadline: float | None = None, log=print, cuda_graphs: bool = False,
                 transport: str = "null", kernels=("torch",), serial_rows=(), timing_warmup: int = 2,
                 timeline: bool = False) -> list[dict]:
    """Rows of (model, size, N, mode, kernels): the slowest strip's step against the serial step,
    both graphed or both eager, both on the same kernels (like with like). `kernels`: the patch
    layers' kernels to measure each strip with, and a serial row with each (`kernel_gain`: the
    PyTorch serial step over it, where both were measured). `timeline`: each strip row carries one
    steady step's recorded posts and waits (`measure`; project.py's trace-driven estimate). `serial_rows`:
    serial rows of an earlier call (same model, device and graphs), reused instead of measured again
    and not repeated in the result."""
    model = load_model(model_name, device=device)
    rows = []
    for size in sizes:
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({"model": model_name, "size": size, "mode": "serial", "n": 1, "skipped": "time budget"})
            continue
        req = Request(size, size, steps=8, solver="ddim", seed=0,
                      context=None, label=0 if model.spec.num_classes else None)
        serials = {}
        for kern in kernels:
            serial = next((r for r in serial_rows if (r["model"], r["size"], r["mode"]) == (model_name, size, "serial")
                           and r.get("kernels", "torch") == kern and "seconds" in r), None)
            if serial is None:
                serial = measure(model, req, device, dtype, None, 1, 0, repeat=repeat, cuda_graphs=cuda_graphs,
                                 kernels=kern, timing_warmup=timing_warmup)
                log(f"{model_name} {size}² serial ({kern} kernels): {serial['seconds'] * 1e3:.1f} ms")
                rows.append({"model": model_name, "size": size, "mode": "serial", "n": 1, "cuda_graphs": cuda_graphs,
                             "kernels": kern, **serial, "serial_seconds": serial["seconds"], "speedup": 1.0})
            serials[kern] = serial
        for r in rows:
            if r.get("mode") == "serial" and r.get("size") == size and "torch" in serials and "seconds" in r:
                r["kernel_gain"] = serials["torch"]["seconds"] / r["seconds"]
        for n in ranks:
            if n == 1:
                continue
            for mode in modes:
                for kern in kernels:
                    if deadline is not None and time.perf_counter() > deadline:
                        rows.append({"model": model_name, "size": size, "mode": mode, "n": n, "kernels": kern,
                                     "skipped": "time budget"})
                        continue
                    serial = serials[kern]
                    rows.append(strip_row(model, model_name, size, req, device, dtype, mode, n, serial, repeat,
                                          cuda_graphs, transport, kern, timing_warmup, timeline))
                    r = rows[-1]
                    if "torch" in serials:       # against the PyTorch serial step: the kernel gain included
                        r["speedup_vs_torch_serial"] = serials["torch"]["seconds"] / r["seconds"]
                    log(f"{model_name} {size}² N={n} {mode} ({kern} kernels): {r['seconds'] * 1e3:.1f} ms "
                        f"(strip {r['strip']}), speedup {r['speedup']:.2f}x against the serial step on the same "
                        f"kernels, {sum(r['bytes_per_step'].values()) / 1e6:.2f} MB/step, {r['aten_ops']} ops vs "
                        f"{serial['aten_ops']}" + (", HOST-BOUND" if r.get("host_bound") else ""))
    del model
    return rows


def strip_row(model, model_name, size, req, device, dtype, mode, n, serial, repeat, cuda_graphs, transport,
              kernels, timing_warmup: int = 2, timeline: bool = False) -> dict:
    """The slower of the first and a middle strip against the serial step. With `timeline`, the
    slower strip's recorded step, each post's bytes and messages the busier strip's (as the row's
    counts are)."""
    strips = sorted({0, n // 2})
    per = {s: measure(model, req, device, dtype, mode, n, s, repeat=repeat, cuda_graphs=cuda_graphs,
                      transport=transport, kernels=kernels, timing_warmup=timing_warmup, timeline=timeline)
           for s in strips}
    slow = max(per, key=lambda s: per[s]["seconds"])
    if timeline:
        from project import busiest_posts

        per[slow]["timeline"] = busiest_posts(per[slow]["timeline"], [per[s]["timeline"] for s in strips])
    # traffic of the busiest strip, per kind: the slowest can be the first strip, with one
    # neighbour and half the neighbour traffic of a middle one
    busiest = {key: {k: max(per[s][key].get(k, 0) for s in per) for k in {k for s in per for k in per[s][key]}}
               for key in ("bytes_per_step", "messages_per_step")}
    return {"model": model_name, "size": size, "mode": mode, "n": n, "strip": slow, "cuda_graphs": cuda_graphs,
            "transport": transport, "kernels": kernels,
            **per[slow], **busiest,
            "strip_seconds": {str(s): per[s]["seconds"] for s in strips},
            "serial_seconds": serial["seconds"], "serial_aten_ops": serial["aten_ops"],
            "serial_peak_memory_bytes": serial["peak_memory_bytes"],
            "speedup": serial["seconds"] / per[slow]["seconds"]}


def torchrun_steps(model_name: str, size: int, n: int, mode: str, steps: int, warmup: int,
                   dtype: str | None = None) -> list[float]:
    """Seconds of the steady-state steps (after `warmup`) of one real gloo run on this machine:
    `torchrun --nproc_per_node n -m parafuse.generate`, each rank with OMP_NUM_THREADS = cores // n."""
    with tempfile.TemporaryDirectory() as tmp:
        rep = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "parafuse.generate", "--model", model_name, "--height", str(size), "--width", str(size),
               "--steps", str(steps), "--solver", "ddim", *config_flags(patch_config(mode, warmup, dtype=dtype)),
               "--no-progress", "--out", os.path.join(tmp, "x.png"), "--report", rep, "--overwrite"]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)), PYTHONPATH=ROOT)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.load(open(rep))["step_seconds"][warmup:]


def torchrun_rows(model_name: str, size: int, ranks, modes, steps: int, warmup: int, dtype: str | None) -> list[dict]:
    """Real gloo runs on this machine: mean seconds of the steady-state steps, against the serial run."""
    def run(n, mode):
        steady = torchrun_steps(model_name, size, n, mode, steps, warmup, dtype)
        return sum(steady) / len(steady)

    serial = run(1, "sync")
    rows = [{"model": model_name, "size": size, "mode": "serial", "n": 1, "seconds": serial, "speedup": 1.0}]
    for n in ranks:
        if 1 < n <= (os.cpu_count() or 1):
            for mode in modes:
                s = run(n, mode)
                rows.append({"model": model_name, "size": size, "mode": mode, "n": n, "seconds": s, "speedup": serial / s})
    return rows


COLUMNS = [("model", "model"), ("size", "px"), ("mode", "mode"), ("kernels", "kernels"), ("n", "N"),
           ("seconds", "step s"), ("spread", "min..max s"), ("speedup", "speedup"), ("kernel_gain", "kernel gain"),
           ("mb_per_step", "MB/step"), ("state_mb", "state MB"), ("aten_ops", "ATen ops"), ("ops_per_ms", "ops/ms"),
           ("host", "host-bound"), ("peak_gb", "peak GB"), ("act_gb", "activations GB")]


def printable(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        r["mb_per_step"] = sum(r.get("bytes_per_step", {}).values()) / 1e6
        r["state_mb"] = r.get("state_bytes", 0) / 1e6
        r["peak_gb"] = r["peak_memory_bytes"] / 1e9 if r.get("peak_memory_bytes") else ""
        r["act_gb"] = r["activation_peak_bytes"] / 1e9 if r.get("activation_peak_bytes") is not None else ""
        r["spread"] = f"{r['seconds_min']:.4g}..{r['seconds_max']:.4g}" if "seconds_min" in r else ""
        r["host"] = {True: "YES", False: "no", None: ""}[r.get("host_bound")]
        out.append(r)
    return out


def plot(rows: list[dict], name: str, title: str) -> str | None:
    """The speedup plot beside the result `name` (its path; None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r["model"], r["size"], r["mode"]) for r in rows if r["mode"] != "serial" and "speedup" in r})
    top = 1
    for model, size, mode in keys:
        pts = [(1, 1.0)] + [(r["n"], r["speedup"]) for r in rows if (r["model"], r["size"], r["mode"]) == (model, size, mode)
                            and "speedup" in r]
        ax.plot(*zip(*pts), "o-", label=f"{model} {size}² {mode}")
        top = max(top, max(n for n, _ in pts))
    ax.plot([1, top], [1, top], "k:", label="ideal")
    ax.set(xlabel="N (strips)", ylabel="compute speedup of the slowest strip", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_plot(fig, name)


def main(argv=None) -> None:
    p = parser(__doc__, None)
    p.add_argument("--name", default=None, help="output name under benchmarks/results (default: scaling_<device>)")
    add_run(p, models=["default", "dit-small"], sizes=[256, 512], ranks=[1, 2, 4, 8], modes=["sync", "full", "partial"])
    add_device(p)
    add_timing(p, repeat=5, warmup=2)
    p.add_argument("--cuda-graphs", action="store_true", help="graph the serial and the strip steps (CUDA)")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=["torch"],
                   help="the patch layers' kernels (parafuse.generate --kernels), each measured, the serial step "
                        "with each too (like with like; kernel_gain reports the kernels' own gain)")
    p.add_argument("--transport", choices=("null", "loopback"), default="null",
                   help="null: compute alone; loopback: with the step's communication as device copies")
    p.add_argument("--budget", type=float, default=None, help="seconds; configurations past it are skipped")
    p.add_argument("--timeline", action="store_true",
                   help="record one steady step's posts and waits per strip row (with --cuda-graphs: a replay's, "
                        "stamped by CUDA events captured in the graph): project.py's trace-driven estimate")
    p.add_argument("--torchrun-size", type=int, default=256, help="CPU: image size of the real torchrun runs (0: none)")
    args = p.parse_args(argv)
    prov = provenance(argv)
    device = torch.device(args.device)
    deadline = time.perf_counter() + args.budget if args.budget else None
    rows = []
    for m in args.models:
        rows += scaling_rows(m, args.sizes, args.ranks, args.modes, device, args.dtype, args.repeat, deadline,
                             cuda_graphs=args.cuda_graphs, transport=args.transport, kernels=args.kernels,
                             timing_warmup=args.timing_warmup, timeline=args.timeline)
    real = []
    if device.type == "cpu" and args.torchrun_size:
        for m in args.models:
            real += torchrun_rows(m, args.torchrun_size, args.ranks, args.modes, steps=6, warmup=2, dtype=args.dtype)
    hw = hardware()
    name = args.name or f"scaling_{device.type}"
    print(f"\nper-rank compute (one process, NullTransport), {hw['device']}, torch {hw['torch']}\n")
    print(table(printable([r for r in rows if "skipped" not in r]), COLUMNS))
    if real:
        print("\nreal torchrun (gloo) runs, mean steady-state step\n")
        print(table(real, [("model", "model"), ("size", "px"), ("mode", "mode"), ("n", "N"), ("seconds", "step s"),
                           ("speedup", "speedup")]))
    path = write_result(name, "scaling", config_of(args), rows, prov, hw, torchrun=real)
    png = plot(rows, name, f"per-rank compute — {hw['device']}")
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
