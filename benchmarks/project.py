"""Projected step time and speedup for N = 1..16 GPUs, from measured per-rank compute, counted
bytes and messages, and a link model. Every number this file derives is a *projection*: its key
starts with `projected_`, the plot says "projection".

Inputs. `benchmarks/scaling.py` rows: per (model, size, mode, N) one rank's steady-state strip step
measured in one process over a `NullTransport` ("per-rank compute", `seconds`, the slowest strip),
the serial step, and what that rank's step would send: `bytes_per_step` and `messages_per_step`
per kind (an all-reduce is one message; its bytes are already the ring volume 2(N−1)/N × tensor).

The link is (bandwidth per direction, latency per message). One message of b bytes costs
latency + b / bandwidth, and the messages of one step go one after another over the rank's link
(concurrent sends of a batch share the bandwidth; counting their latencies serially is a
conservative upper bound). A ring all-reduce of N ranks is 2(N−1) sequential hops, so it costs
2(N−1) latencies + its (ring) bytes / bandwidth.

Per kind, in the steady state of the asynchronous modes (full, partial, none):
- off the critical path (overlaps compute): conv_halo and attn_kv, which are stale (step t uses
  what was sent during step t−1); norm_stats only with `--norm corrected` or `stale` (the
  all-reduce is posted asynchronously and waited for at the same layer of the next step, so it has
  a whole step to complete: `project_rows(..., norm_on_critical_path=False)`). With the default
  `exact` GroupNorm statistics the all-reduce is on the critical path.
- on the critical path: latent_halo (fresh every step, before the first conv), cfg (the CFG
  pair's swap of the strip output), reduce and gather (exact, waited for at once).
    step = max(compute, comm_async) + comm_critical
In `sync` every exchange is waited for where it is posted:
    step = compute + comm_async + comm_critical
Projected speedup = serial_seconds / projected step. Assumed, not modelled: compute and
communication do not slow each other down (on GPUs copy engines / NCCL kernels take few SMs; on a
CPU they share cores — see the validation), links of different peers do not contend beyond one
rank's own bandwidth, and one strip stands for every rank: the slowest strip's compute, with the
bytes and messages of the busiest strip (scaling.py's rows keep the per-kind maximum over the strips
they measure).

N not measured. Per (model, size, mode) the points are the measured N plus N = 1 (the serial
step, nothing sent). Compute and bytes are interpolated piecewise linearly in 1/N between
neighbouring measured points — i.e. compute = a + b/N through each pair, which reproduces the
measured points exactly and is exact for all-gathered K/V ((N−1)/N of the image) and ring bytes.
Message counts are interpolated linearly in N (an all-gather sends N−1 messages, neighbour
exchanges a constant number). Beyond the largest measured N the last segment is extended, and the
compute never falls faster than ideal 1/N scaling from the last measured point (a segment with
a < 0, superlinear scaling, would otherwise reach zero). Every row says `compute_source`:
measured, interpolated or extrapolated.

Links ("assumed figures", model inputs, not measurements): nvlink4 — NVLink 4 (H100 SXM), 900
GB/s bidirectional per GPU through NVSwitch = 450 GB/s per direction, ~3 µs small-message NCCL
latency; pcie4 — PCIe 4.0 x16, 32 GB/s theoretical per direction, ~25 GB/s achieved, ~10 µs;
ib400 — 400 Gb/s InfiniBand NDR = 50 GB/s per direction, ~5 µs. `measured` is fitted on this
machine: a gloo ping-pong between two processes, 1 KB..8 MB, least squares of latency +
bytes/bandwidth (relative residuals); `measured-loaded` the same with a busy compute thread in each
process, as in a torchrun run.

Validation (`--validate`): the CPU rows projected with the fitted links against real gloo
`torchrun` runs for N up to the core count, the per-rank compute measured with the thread count
torchrun gives each rank (cores // N); the real step is the median steady-state step. Run it on an
idle machine: with another job running, gloo's threads wait for the scheduler and a ping-pong here
took ~2 ms per message instead of ~0.1 ms, and the real steps doubled.

    python benchmarks/project.py --measure --validate                        # CPU, measures its rows
    python benchmarks/project.py --scaling benchmarks/results/scaling_cpu.json --links nvlink4 pcie4
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, hardware, table, write_json  # noqa: E402


# ---- links ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float      # bytes/s, per direction
    latency: float        # seconds per message
    source: str


LINKS = {
    "nvlink4": Link("nvlink4", 450e9, 3e-6, "assumed: NVLink 4 / NVSwitch (H100 SXM), 900 GB/s bidirectional per GPU, "
                                            "~3 µs NCCL small-message latency"),
    "pcie4": Link("pcie4", 25e9, 10e-6, "assumed: PCIe 4.0 x16, 32 GB/s theoretical per direction, ~25 GB/s achieved, "
                                        "~10 µs"),
    "ib400": Link("ib400", 50e9, 5e-6, "assumed: InfiniBand NDR 400 Gb/s = 50 GB/s per direction, ~5 µs"),
}

# the links fitted on this machine: name -> with a busy compute thread in each process
MEASURED = {"measured": False, "measured-loaded": True}

ASYNC_MODES = ("full", "partial", "none")       # steady state: stale exchanges overlap compute
STALE_KINDS = ("conv_halo", "attn_kv")          # sent at step t, used at step t+1
ALLREDUCE_KINDS = ("norm_stats",)               # ring all-reduces: 2(N−1) latency hops each
# everything else (latent_halo, cfg, reduce, gather) is waited for where it is posted


def kind_seconds(kind: str, nbytes: float, messages: float | None, n: int, link: Link) -> float:
    """Seconds one rank's link spends on one kind per step: latencies + bytes / bandwidth.
    `messages` None (older rows without counts): the latency term is left out (a lower bound)."""
    hops = 2 * (n - 1) if kind in ALLREDUCE_KINDS else 1
    latency = 0.0 if messages is None else messages * hops * link.latency
    return latency + nbytes / link.bandwidth


def step_seconds(compute: float, bytes_per_step: dict, messages_per_step: dict | None, mode: str, n: int,
                 link: Link, norm_on_critical_path: bool = True) -> tuple[float, float, float]:
    """(comm_async, comm_critical, step) seconds of one steady-state step (see the module docstring)."""
    asynchronous = mode in ASYNC_MODES
    comm_async = comm_critical = 0.0
    for kind in sorted(set(bytes_per_step) | set(messages_per_step or {})):
        messages = None if messages_per_step is None else messages_per_step.get(kind, 0)
        t = kind_seconds(kind, bytes_per_step.get(kind, 0), messages, n, link)
        overlaps = kind in STALE_KINDS or (kind in ALLREDUCE_KINDS and not norm_on_critical_path)
        if asynchronous and overlaps:
            comm_async += t
        else:
            comm_critical += t
    step = max(compute, comm_async) + comm_critical if asynchronous else compute + comm_async + comm_critical
    return comm_async, comm_critical, step


# ---- interpolation over N ------------------------------------------------------------------------
def interpolate(points: dict[int, float], n: int, inverse: bool = True) -> tuple[float, str]:
    """Value at `n` from {N: value}, piecewise linear in 1/N (`inverse`) or in N, through the two
    nearest points (extended beyond the ends); and whether it was measured, interpolated or
    extrapolated."""
    if n in points:
        return points[n], "measured"
    ns = sorted(points)
    if len(ns) == 1:
        return points[ns[0]], "extrapolated"
    if n < ns[0]:
        lo, hi, source = ns[0], ns[1], "extrapolated"
    elif n > ns[-1]:
        lo, hi, source = ns[-2], ns[-1], "extrapolated"
    else:
        hi = next(m for m in ns if m > n)
        lo, source = ns[ns.index(hi) - 1], "interpolated"
    x = (lambda m: 1.0 / m) if inverse else float
    w = (x(n) - x(lo)) / (x(hi) - x(lo))
    return points[lo] + w * (points[hi] - points[lo]), source


def compute_at(points: dict[int, float], n: int) -> tuple[float, str]:
    """Per-rank compute at `n`: a + b/N between measured points; beyond the last one, never faster
    than ideal 1/N scaling from it."""
    value, source = interpolate(points, n)
    last = max(points)
    if n > last:
        value = max(value, points[last] * last / n)
    return value, source


# ---- the projection ------------------------------------------------------------------------------
def project_rows(rows: list[dict], link: Link, max_n: int = 16, norm_on_critical_path: bool = True) -> list[dict]:
    """Projected steady-state step and speedup for N = 1..max_n, per (model, size, mode) of `rows`.

    `rows`: `benchmarks/scaling.py` rows (`scaling_rows`, or the JSON's "rows"): dicts with model,
    size, mode (serial | sync | full | partial | none), n, seconds (per-rank compute), serial_seconds,
    bytes_per_step and, in new runs, messages_per_step. Rows marked "skipped" or without seconds
    are ignored. `link`: a `Link` (`LINKS[name]`, or `fit_link` on a ping-pong).

    Rows of one (model, size, mode) measured with different patch-layer kernels (`kernels`, absent:
    torch) are projected apart; the serial row serves them all.

    Returns one dict per (model, size, mode, kernels, N), sorted: model, size, mode, kernels, n, link,
    link_bandwidth, link_latency, serial_seconds (inputs), compute_source, messages_known, and the
    projections projected_compute_seconds, projected_bytes_per_step, projected_messages_per_step
    (None if unknown), projected_comm_async_seconds, projected_comm_critical_seconds,
    projected_step_seconds, projected_speedup, projected_bound ("compute" or "comm")."""
    rows = [r for r in rows if "skipped" not in r and "seconds" in r and "mode" in r]
    serial = {(r["model"], r["size"]): r["seconds"] for r in rows if r["mode"] == "serial"}
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["mode"] != "serial":
            groups.setdefault((r["model"], r["size"], r["mode"], r.get("kernels", "torch")), {})[r["n"]] = r
    out = []
    for (model, size, mode, kernels), measured in sorted(groups.items()):
        serial_s = serial.get((model, size), next(iter(measured.values()))["serial_seconds"])
        messages_known = all("messages_per_step" in r for r in measured.values())
        # N = 1 is the serial step: nothing is sent
        compute = {1: serial_s, **{n: r["seconds"] for n, r in measured.items()}}
        kinds = sorted({k for r in measured.values() for k in r.get("bytes_per_step", {})}
                       | {k for r in measured.values() for k in r.get("messages_per_step", {})})
        nbytes = {k: {1: 0, **{n: r.get("bytes_per_step", {}).get(k, 0) for n, r in measured.items()}} for k in kinds}
        msgs = {k: {1: 0, **{n: r.get("messages_per_step", {}).get(k, 0) for n, r in measured.items()}} for k in kinds}
        for n in range(1, max_n + 1):
            c, source = compute_at(compute, n)
            b = {k: max(0.0, interpolate(nbytes[k], n)[0]) for k in kinds}
            m = {k: max(0.0, interpolate(msgs[k], n, inverse=False)[0]) for k in kinds} if messages_known else None
            comm_async, comm_critical, step = step_seconds(c, b, m, mode, n, link, norm_on_critical_path)
            out.append({"model": model, "size": size, "mode": mode, "kernels": kernels, "n": n, "link": link.name,
                        "link_bandwidth": link.bandwidth, "link_latency": link.latency, "serial_seconds": serial_s,
                        "compute_source": source, "messages_known": messages_known,
                        "projected_compute_seconds": c, "projected_bytes_per_step": b,
                        "projected_messages_per_step": m,
                        "projected_comm_async_seconds": comm_async, "projected_comm_critical_seconds": comm_critical,
                        "projected_step_seconds": step, "projected_speedup": serial_s / step,
                        "projected_bound": "comm" if mode in ASYNC_MODES and comm_async > c else "compute"})
    return out


# ---- measuring rows on this machine ------------------------------------------------------------
def measure_rows(model_name: str, sizes, ranks, modes, repeat: int = 5, log=print) -> list[dict]:
    """`scaling.scaling_rows` on this CPU: per-rank compute of the slowest strip, bytes and messages
    of the busiest one."""
    import scaling

    return scaling.scaling_rows(model_name, sizes, ranks, modes, torch.device("cpu"), None, repeat, log=log)


# ---- the measured link: a gloo ping-pong ---------------------------------------------------------
PING_SIZES = [2 ** k for k in range(10, 24)]     # 1 KB .. 8 MB


def _pingpong(rank: int, port: int, sizes: list[int], repeat: int, loaded: bool, queue) -> None:
    import threading

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop = threading.Event()
    if loaded:
        # a compute thread per process keeps a core busy, as a rank's compute does in a torchrun
        # run: gloo's threads then wait to be scheduled
        def spin():
            a = torch.randn(256, 256)
            while not stop.is_set():
                torch.mm(a, a)
        threading.Thread(target=spin, daemon=True).start()
    bufs = {size: torch.zeros(size // 4, dtype=torch.float32) for size in sizes}
    times = {size: [] for size in sizes}
    # sizes interleaved round by round, so that a slow moment of the machine hits every size alike;
    # the first round sets up the connection's buffers and is not counted
    for round_ in range(repeat + 1):
        for size in sizes:
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(bufs[size], 1)
                dist.recv(bufs[size], 1)
            else:
                dist.recv(bufs[size], 0)
                dist.send(bufs[size], 0)
            if round_:
                times[size].append((time.perf_counter() - t0) / 2)
    stop.set()
    one_way = {size: statistics.median(t) for size, t in times.items()}
    if rank == 0:
        queue.put(one_way)
    dist.barrier()
    dist.destroy_process_group()


def measure_pingpong(sizes: list[int] = PING_SIZES, repeat: int = 30, loaded: bool = False) -> dict[int, float]:
    """{bytes: one-way seconds}: median half round trip between two gloo processes on this machine
    (with a busy compute thread in each, `loaded`)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_pingpong, args=(port, sizes, repeat, loaded, queue), nprocs=2, join=True)
    return queue.get()


def fit_link(one_way: dict[int, float], name: str = "measured", source: str = "") -> Link:
    """Least-squares latency + bytes / bandwidth through {bytes: seconds}, on relative residuals
    (so that the small sizes, which fix the latency, count as much as the large ones)."""
    sizes = torch.tensor(sorted(one_way), dtype=torch.float64)
    t = torch.tensor([one_way[int(s)] for s in sizes], dtype=torch.float64)
    a = torch.stack([1 / t, sizes / t], dim=1)
    latency, inv_bw = torch.linalg.lstsq(a, torch.ones_like(t).unsqueeze(1)).solution.flatten().tolist()
    if latency < 0:        # the bytes alone explain the times: latency 0, refit the bandwidth
        latency, inv_bw = 0.0, float((sizes / t).sum() / (sizes ** 2 / t ** 2).sum())
    return Link(name, 1 / inv_bw, latency, source or "fitted: gloo ping-pong between 2 processes on this machine, "
                                                    f"{int(sizes[0])} B..{int(sizes[-1])} B")


# ---- validation against real torchrun runs -------------------------------------------------------
def validate(model: str, size: int, modes: list[str], links: list[Link], steps: int = 20, warmup: int = 2,
             repeat: int = 5, log=print) -> dict:
    """Projected (with each of `links`) against real gloo `torchrun` step seconds (the median
    steady-state step), for N up to the core count.

    torchrun gives each of N ranks OMP_NUM_THREADS = cores // N, so the per-rank compute of N is
    measured here with torch.set_num_threads(cores // N), and the serial step with all cores."""
    import scaling

    cores = os.cpu_count() or 1
    ranks = list(range(2, cores + 1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        serial = measure_rows(model, [size], [1], [], repeat, log=log)[0]
        compute_rows = []
        for n in ranks:
            torch.set_num_threads(max(1, cores // n))
            compute_rows += [{**r, "threads": max(1, cores // n), "serial_seconds": serial["seconds"]}
                             for r in measure_rows(model, [size], [n], modes, repeat, log=log) if r["mode"] != "serial"]
    finally:
        torch.set_num_threads(before)
    # the steady state, which the projection is of: the median step (the mean is kept too; the
    # first stale steps after the switch from the synchronous warmup run slower)
    real = {("serial", 1): scaling.torchrun_steps(model, size, 1, "sync", steps, warmup)}
    real.update({(mode, n): scaling.torchrun_steps(model, size, n, mode, steps, warmup) for n in ranks for mode in modes})
    real_s = {key: statistics.median(v) for key, v in real.items()}
    checks = []
    for link in links:
        checks.append({"model": model, "size": size, "mode": "serial", "n": 1, "threads": cores, "link": link.name,
                       "measured_compute_seconds": serial["seconds"], "projected_step_seconds": serial["seconds"],
                       "projected_speedup": 1.0, "measured_torchrun_seconds": real_s[("serial", 1)],
                       "measured_torchrun_speedup": 1.0})
        for r in compute_rows:
            _, _, step = step_seconds(r["seconds"], r["bytes_per_step"], r["messages_per_step"], r["mode"], r["n"],
                                      link)
            checks.append({"model": model, "size": size, "mode": r["mode"], "n": r["n"], "threads": r["threads"],
                           "link": link.name, "measured_compute_seconds": r["seconds"], "projected_step_seconds": step,
                           "projected_speedup": serial["seconds"] / step,
                           "measured_torchrun_seconds": real_s[(r["mode"], r["n"])],
                           "measured_torchrun_speedup": real_s[("serial", 1)] / real_s[(r["mode"], r["n"])]})
    for c in checks:
        c["measured_torchrun_mean_seconds"] = statistics.fmean(real[(c["mode"], c["n"])])
        c["relative_error"] = c["projected_step_seconds"] / c["measured_torchrun_seconds"] - 1
        c["speedup_relative_error"] = c["projected_speedup"] / c["measured_torchrun_speedup"] - 1

    def mean_abs(link, key):
        return statistics.fmean(abs(c[key]) for c in checks if c["n"] > 1 and c["link"] == link.name)
    return {"links": [asdict(k) for k in links], "cores": cores, "torchrun_steps": steps,
            "torchrun_warmup_steps": warmup, "checks": checks, "compute_rows": compute_rows,
            "mean_abs_relative_error": {k.name: mean_abs(k, "relative_error") for k in links},
            "mean_abs_speedup_relative_error": {k.name: mean_abs(k, "speedup_relative_error") for k in links}}


def validation_notes(v: dict) -> list[str]:
    """What the validation errors say, read off the numbers."""
    notes = []
    first = v["links"][0]["name"]
    by = {(c["mode"], c["n"]): c for c in v["checks"] if c["link"] == first}
    s = by[("serial", 1)]
    notes.append(f"N=1: the torchrun step is {s['measured_torchrun_seconds'] * 1e3:.1f} ms (median of the steady "
                 f"steps) against {s['measured_compute_seconds'] * 1e3:.1f} ms (median) of the model evaluation alone "
                 f"(projection error {s['relative_error']:+.0%}): run-to-run noise, plus what a real step adds "
                 "outside the model (solver update, bookkeeping).")
    for (mode, n), c in by.items():
        if n > 1:
            notes.append(f"{mode} N={n}: real step {c['measured_torchrun_seconds'] * 1e3:.1f} ms, per-rank compute "
                         f"at {c['threads']} thread(s) {c['measured_compute_seconds'] * 1e3:.1f} ms, difference "
                         f"{(c['measured_torchrun_seconds'] - c['measured_compute_seconds']) * 1e3:+.1f} ms "
                         "(communication not hidden, contention, noise).")
    for k in v["links"]:
        notes.append(f"link {k['name']} ({k['bandwidth'] / 1e9:.2f} GB/s, {k['latency'] * 1e6:.0f} µs): mean "
                     f"|relative error| of the projected step {v['mean_abs_relative_error'][k['name']]:.0%} (N > 1).")
    if any(c["relative_error"] < -0.1 for c in v["checks"] if c["n"] > 1):
        notes.append("Where the projection is low (most in sync, which waits at every exchange): the N ranks and gloo's communication threads share "
                     f"{v['cores']} CPU cores, so sending (a memcpy through the loopback TCP stack) takes cycles from "
                     "compute instead of overlapping it, every message waits for a gloo thread to be scheduled, and "
                     "the ranks run in lockstep, so the slower rank of a step sets the pace; any other job on the "
                     "machine makes this much worse. The projection assumes that compute and communication do not "
                     "slow each other down, which GPUs with NVLink/NCCL come much closer to; a CPU cannot confirm "
                     "that.")
    return notes


# ---- output --------------------------------------------------------------------------------------
def plot(projections: list[dict], validation: dict | None, path: str, hw: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(r["model"], r["size"]) for r in projections})
    cols = min(2, len(panels))
    grid_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(8 * cols, 5.5 * grid_rows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    links = sorted({r["link"] for r in projections})
    modes = sorted({r["mode"] for r in projections} | {c["mode"] for c in (validation or {}).get("checks", [])})
    colors = {name: f"C{i}" for i, name in enumerate(links)}
    styles = ["-", "--", ":", "-."]
    markers = {mode: "osD^v"[i % 5] for i, mode in enumerate(modes)}
    for ax, (model, size) in zip(axes.flat, panels):
        top = 1
        for link in links:
            for i, mode in enumerate(sorted({r["mode"] for r in projections})):
                pts = [(r["n"], r["projected_speedup"]) for r in projections
                       if (r["model"], r["size"], r["link"], r["mode"]) == (model, size, link, mode)]
                if pts:
                    ax.plot(*zip(*pts), styles[i % 4], color=colors[link], label=f"{link} {mode} (projected)")
                    top = max(top, max(n for n, _ in pts))
        if validation:
            checks = [c for c in validation["checks"] if (c["model"], c["size"]) == (model, size) and c["n"] > 1]
            for c in {(c["mode"], c["n"]): c for c in checks}.values():
                ax.plot(c["n"], c["measured_torchrun_speedup"], markers[c["mode"]], color="k", ms=8,
                        label=f"torchrun gloo {c['mode']} (measured)")
            for c in checks:
                ax.plot(c["n"], c["projected_speedup"], markers[c["mode"]], color=colors.get(c["link"], "k"),
                        mfc="none", ms=8, label=f"{c['mode']}, {c['link']} link (projected)")
        ax.plot([1, top], [1, top], color="0.6", lw=0.8, label="ideal")
        ax.set(xlabel="N (GPUs / ranks)", ylabel="speedup over the serial step", title=f"{model} {size}²")
        ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.suptitle(f"projection: speedup vs N, per-rank compute measured on {hw}\nlinks assumed (presets) or fitted "
                 "on this machine (measured*); where compute bounds the step the links' lines coincide", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


PROJECTION_COLUMNS = [("model", "model"), ("size", "px"), ("mode", "mode"), ("kernels", "kernels"),
                      ("link", "link"), ("n", "N"), ("compute_source", "compute"), ("compute_ms", "proj. compute ms"),
                      ("async_ms", "proj. async comm ms"), ("critical_ms", "proj. critical comm ms"),
                      ("step_ms", "proj. step ms"), ("projected_speedup", "proj. speedup"),
                      ("projected_bound", "bound")]
VALIDATION_COLUMNS = [("link", "link"), ("mode", "mode"), ("n", "N"), ("threads", "threads"),
                      ("compute_ms", "compute ms"), ("projected_ms", "projected step ms"),
                      ("real_ms", "torchrun step ms"),
                      ("relative_error", "rel. error"), ("projected_speedup", "proj. speedup"),
                      ("measured_torchrun_speedup", "torchrun speedup")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scaling", help="a benchmarks/scaling.py JSON whose rows to project")
    src.add_argument("--measure", action="store_true", help="measure the rows here (CPU, as scaling.scaling_rows)")
    p.add_argument("--models", nargs="+", default=["dit-small"])
    p.add_argument("--sizes", nargs="+", type=int, default=[256])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--modes", nargs="+", default=["full", "partial"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--links", nargs="+", default=["nvlink4", "pcie4", "ib400"], choices=[*LINKS, *MEASURED],
                   help="presets, and/or the links fitted here (fitted anyway with --validate)")
    p.add_argument("--max-n", type=int, default=16)
    p.add_argument("--validate", action="store_true",
                   help="CPU: compare projections with the fitted links against real torchrun gloo runs "
                        "(N <= cores) of the --modes and sync, for the first model and size")
    p.add_argument("--validate-steps", type=int, default=20, help="steps of each torchrun run (2 warmup steps)")
    p.add_argument("--name", default=None, help="output name: project_<name>.json/.png (default: cpu, or the "
                                                "scaling file's suffix)")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    if args.measure:
        hw = hardware()
        rows = []
        for m in args.models:
            rows += measure_rows(m, args.sizes, args.ranks, args.modes, args.repeat)
        name = args.name or "cpu"
        compute_on = hw["device"]
    else:
        data = json.load(open(args.scaling))
        rows, hw = data["rows"], hardware()
        compute_on = data.get("hardware", {}).get("device", "unknown hardware")
        name = args.name or os.path.splitext(os.path.basename(args.scaling))[0].removeprefix("scaling_")

    notes = []
    if any("messages_per_step" not in r for r in rows if "seconds" in r and r.get("mode") != "serial"):
        notes.append("Some rows have no messages_per_step (an older scaling run): for them latency is left out "
                     "(messages_known false), so their projected communication is a lower bound.")
    slower = [f"{r['model']} {r['size']}² {r['mode']} N={r['n']}" for r in rows
              if r.get("mode") not in (None, "serial") and "seconds" in r and r["seconds"] > 1.5 * r["serial_seconds"]]
    if slower:
        notes.append(f"Per-rank compute far slower than the serial step ({', '.join(slower)}): a strip of 1/N of "
                     "the image should not cost 1.5x the whole; was another job running? Projections from these "
                     "rows are suspect.")
    fitted, one_way = {}, {}
    if args.validate or any(n in MEASURED for n in args.links):
        for link_name, loaded in MEASURED.items():
            how = "a busy compute thread in each" if loaded else "idle"
            print(f"fitting {link_name} (gloo ping-pong, 2 processes, {how})")
            one_way[link_name] = measure_pingpong(loaded=loaded)
            link = fitted[link_name] = fit_link(one_way[link_name], link_name, "fitted: gloo ping-pong between 2 "
                                                f"processes on this machine, 1 KB..8 MB, {how}")
            print(f"{link_name}: {link.bandwidth / 1e9:.2f} GB/s, {link.latency * 1e6:.1f} µs")
    links = [fitted.get(n) or LINKS[n] for n in args.links]
    links += [k for k in fitted.values() if k.name not in args.links]   # the links of this machine, projected too
    projections = [r for link in links for r in project_rows(rows, link, args.max_n)]

    validation = None
    if args.validate:
        modes = list(dict.fromkeys(args.modes + ["sync"]))
        validation = validate(args.models[0] if args.measure else rows[0]["model"],
                              args.sizes[0] if args.measure else rows[0]["size"], modes, list(fitted.values()),
                              steps=args.validate_steps, repeat=args.repeat)
        notes += validation_notes(validation)

    print("\nlinks (model inputs)\n")
    print(table([{**asdict(k), "gbs": k.bandwidth / 1e9, "us": k.latency * 1e6} for k in links],
                [("name", "link"), ("gbs", "GB/s per direction"), ("us", "latency µs"), ("source", "source")]))
    shown = {n for n in (1, 2, 4, 8, 16, args.max_n) if n <= args.max_n}
    print(f"\nprojection (per-rank compute measured on {compute_on}; N in {sorted(shown)}; every N in the JSON)\n")
    print(table([{**r, "compute_ms": r["projected_compute_seconds"] * 1e3,
                  "async_ms": r["projected_comm_async_seconds"] * 1e3,
                  "critical_ms": r["projected_comm_critical_seconds"] * 1e3,
                  "step_ms": r["projected_step_seconds"] * 1e3} for r in projections if r["n"] in shown],
                PROJECTION_COLUMNS))
    if validation:
        print(f"\nvalidation: projected with the measured links vs real torchrun (gloo) on {hw['device']}\n")
        print(table([{**c, "compute_ms": c["measured_compute_seconds"] * 1e3,
                      "projected_ms": c["projected_step_seconds"] * 1e3,
                      "real_ms": c["measured_torchrun_seconds"] * 1e3} for c in validation["checks"]],
                    VALIDATION_COLUMNS))
        for k in fitted:
            print(f"\n{k}: mean |relative error| of the projected step (N > 1) "
                  f"{validation['mean_abs_relative_error'][k]:.1%}, of the projected speedup "
                  f"{validation['mean_abs_speedup_relative_error'][k]:.1%}")
    load_after = os.getloadavg()
    if max(load_before[0], load_after[0]) > 1.5 * (os.cpu_count() or 1):
        notes.append(f"The machine was busy (1-minute load {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
                     f"{os.cpu_count()} cores): the timings are disturbed.")
    for note in notes:
        print(f"note: {note}")

    path = write_json(f"project_{name}.json", {
        "hardware": hw, "compute_measured_on": compute_on,
        "command": "python benchmarks/project.py " + " ".join(sys.argv[1:] if argv is None else argv), "args": vars(args),
        # 1-minute load average before and after: timings on a machine busy with other work are not clean
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "model": "step = max(compute, comm_async) + comm_critical (full/partial/none), compute + comm (sync); "
                 "comm = messages x latency + bytes / bandwidth, all-reduce 2(N-1) latency hops; see the docstring",
        "norm_stats_on_critical_path": True,
        "links": [asdict(k) for k in links],
        "pingpong_one_way_seconds": {k: {str(b): t for b, t in v.items()} for k, v in one_way.items()},
        "measured_rows": rows, "projections": projections, "validation": validation, "notes": notes})
    png = os.path.join(RESULTS, f"project_{name}.png")
    print(f"wrote {path}" + (f" and {png}" if plot(projections, validation, png, compute_on) else ""))


if __name__ == "__main__":
    main()
