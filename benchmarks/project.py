"""Projected step time and speedup for N = 1..16 GPUs, from measured per-rank compute, counted
bytes and messages, and a link model: two bounds, both fixed before any result is read. Every
number this file derives is a *projection*: its key starts with `projected_`, the plot says
"projection".

Inputs. `benchmarks/scaling.py` rows: per (model, size, mode, N) one rank's steady-state strip step
measured in one process over a `NullTransport` ("per-rank compute", `seconds`, the slowest strip),
the serial step, and what that rank's step would send: `bytes_per_step` and `messages_per_step`
per kind (an all-reduce is one message; its bytes are already the ring volume 2(N−1)/N × tensor).

The link. One message of b bytes costs latency + b / bandwidth, and the messages of one step go
one after another over the rank's link. A ring all-reduce of N ranks is 2(N−1) sequential hops:
2(N−1) latencies + its (ring) bytes / bandwidth. A system (`nvlink4`, `pcie4`) holds 8 GPUs per
node; N > 8 is several nodes joined by 400 Gb/s InfiniBand (`ib400`): the busiest rank sends its
off-node share of each kind over InfiniBand (all-gathers: (N − 8)/(N − 1) of their peers; neighbour
exchanges: one of its two neighbours, at a node boundary; an all-reduce's ring, whose every hop
waits for its slowest link: all of it). The optimistic bound lets the two links run at once (the
max of the parts), the pessimistic one one after the other (their sum).

Kinds. Off the critical path in the steady state of the asynchronous modes (full, partial, none):
conv_halo and attn_kv (stale: step t uses what was sent during step t−1); norm_stats only with
`--norm corrected` or `stale` (`norm_on_critical_path=False`). On it: latent_halo (fresh every step),
cfg, reduce, gather, text_attn (unless the rows say the stale text merge), and norm_stats with the
default exact statistics. In `sync` every exchange is waited for where it is posted.

Bounds (per row: `projected_*` optimistic, `projected_pessimistic_*`, and the pessimistic bound
with the opt-in stale communicator, `projected_stale_channel_*`):
- optimistic:  step = max(compute, stale) + critical (asynchronous modes), compute + stale +
  critical (sync). Compute and communication do not slow each other down.
- pessimistic: every term at its worst.
  * One communicator: NCCL runs a communicator's work in post order on one stream, so a critical
    collective posted after stale traffic waits for all of it. Where critical collectives are
    posted inside the step (norm_stats with exact statistics, text_attn, reduce), all stale traffic
    is charged serialised ahead of them: step = compute' + stale + critical. The opt-in stale
    communicator (issue 28 item 3) removes the queueing, not the sharing of the rank's one link:
    its own row, `projected_stale_channel_*`.
  * Otherwise (or on the stale communicator) the overlap window is one step (under CUDA graphs
    every exchange is drained at the end of the step): step = max(compute', stale) + tail +
    critical, where tail is one post's stale traffic (the largest), exposed at the drain. On the
    stale communicator the critical kinds' bytes are charged as moving beside stale traffic at
    half the link's bandwidth: critical and stale each take their bytes' time on the link longer.
  * compute' = compute + charge: NCCL's kernels take SMs and HBM bandwidth while they move bytes.
    charge = the largest of (a) the loss the on-device loopback run showed (side-stream copies of
    one rank's traffic inside its graphed step, `gpu_check.py`'s graphs section: read from the
    committed JSON, never typed in), as a fraction of compute, (b) the same loss per byte, times
    this row's bytes, (c) NCCL_SM_SHARE of the SMs for the whole stale transfer time. Not charged
    in sync (nothing overlaps) nor where no loopback figure is given (the CPU validation).
- trace-driven (`projected_fifo_*`, rows whose scaling run recorded a timeline: `scaling.py
  --timeline`, or a separate such run of the same configurations joined with `--timelines`, which
  keeps the recorder's events out of the timed rows; measured N only). The pessimistic bound
  above serialises *all* of a step's stale traffic ahead of the critical collectives, the worst
  over every placement of the posts; the trace says where they are. One rank's recorded steady step (`TimelineRecorder`: each post's kind,
  bytes and messages, each wait, stamped on the compute stream; under graphs a replay's, stamped by
  CUDA events captured in the graph) is replayed (`replay_timeline`) through one FIFO per
  communicator: compute between events is the recorded gaps scaled to the row's compute' (compute
  + the same charge), a post queues its transfer (`kind_seconds`, the cost the other bounds use)
  behind what its FIFO holds, a wait blocks compute until its transfer ends, stale posts waited in
  the next step carry over (identical steps from an idle link, the steady one taken), and under
  graphs everything is drained by the step's end. `projected_fifo_stale_channel_*`: the stale
  kinds on their own FIFO (`STALE_CHANNEL_KINDS`, as the transport routes them), run at the same
  time as the main one on the rank's one link: the transfers moving bytes at a moment split its
  bandwidth (`SharedLink`; the emulator's validation replays each communicator on a link of its
  own, as the emulator models them). Which post is stale or
  critical is not decided here: what is waited when is the trace's.
  While compute is blocked its FIFO is busy, so in the steady state fifo <= compute' + stale +
  critical, the serialised pessimistic step (tested on random timelines); and where every critical
  wait directly follows its post (the engine's all-reduces) each stalls compute by at least its
  transfer, and a step moves at most a step's time of bytes, so fifo >= max(compute, stale) +
  critical, the optimistic step. A trace with host time between a post and its wait (CPU traces:
  Python, and the emulator's copy of each sent tensor) lets that time overlap the transfer, and
  can fall below the optimistic step (a few per cent on the CPU emulator's sync rows). The
  pessimistic bound's other case (max(compute', stale) + one post's tail + critical) assumes stale
  posts spread over the step: where a trace bunches several at the step's end the fifo step can
  exceed it. On two communicators with links of their own (the emulator's validation) the fifo
  step can fall below the one-link optimistic bound where stale traffic alone outlasts compute;
  sharing one link, it lies between that and the one-communicator fifo step (tested). It is a projection from a trace,
  not a measurement, and an estimate, not a bound: on the CPU emulator the emulated step has come
  out above it by more than BOUND_SLACK (`within_fifo` False in the committed validation), since
  it charges neither the ranks' jitter nor the emulator's late thread wake-ups. It holds only as
  far as the trace's post times hold on the real system: the recorded rank is the slowest strip
  (with the busiest strip's bytes per post), every rank is assumed to post at the same times
  (ranks whose timing jitters from step to step meet at each all-reduce later than that:
  `replay_ranks` shows by how much in the emulator), and a
  receive is assumed ready when this rank's own FIFO reaches it.
Projected speedup = serial_seconds / projected step.

N not measured. Per (model, size, mode) the points are the measured N plus N = 1 (the serial
step). Compute is interpolated piecewise linearly in 1/N between neighbouring points (compute = a +
b/N through each pair, exact at the measured points); beyond the largest measured N the last
segment is extended but never falls faster than ideal 1/N scaling from the last point. Bytes and
messages follow each kind's law in N, fitted at the largest measured N (measured N keep their
measured values; every law is checked against the other measured N, `projected_law_deviation`):
    per_peer        messages ∝ N − 1,          bytes ∝ (N − 1)/N    (all-gathers: attn_kv in full/sync/none,
                                                                     gather, stage, text_attn)
    per_neighbour   messages, bytes ∝ min(2, N − 1)                (halos, attn_kv in partial; the busiest
                                                                     strip is an inner one)
    collective      messages constant,         bytes ∝ (N − 1)/N    (all-reduces: norm_stats, reduce, control)
    constant        messages, bytes constant                        (cfg: one partner)
Where two measured N disagree with a kind's default law, the first law that fits every measured
point is taken (so norm_stats sent point to point by the baselines becomes per_peer). Nothing is
interpolated through N = 1. Every row says `compute_source`: measured, interpolated, extrapolated,
or "full" for sync rows derived from full's per-rank compute (sync does the same work per step;
only its waiting differs), added wherever sync was not measured.

Links ("assumed figures", model inputs, not measurements): nvlink4 — NVLink 4 (H100 SXM), 900
GB/s bidirectional per GPU through NVSwitch = 450 GB/s per direction, ~3 µs small-message NCCL
latency, 8 GPUs per node; pcie4 — PCIe 4.0 x16, 32 GB/s theoretical per direction, ~25 GB/s
achieved, ~10 µs, 8 GPUs per node; ib400 — 400 Gb/s InfiniBand NDR = 50 GB/s per direction, ~5 µs
(one NIC per GPU; every peer over it). `measured` is fitted on this machine: a gloo ping-pong
between two processes, 1 KB..8 MB, least squares of latency + bytes/bandwidth (relative
residuals); `measured-loaded` the same with a busy compute thread in each process, as in a
torchrun run. NCCL_SM_SHARE (assumed): NCCL's up to 32 channels, one CTA each, of an H100's 132 SMs.

Emulator validation (`--validate-emulator`, see `validate_emulator`): the thread emulator over a
modelled link against the optimistic and pessimistic bounds (± BOUND_SLACK) and the trace-driven
one (the free-link run's recorded step replayed through the same link: fifo error = fifo /
emulated − 1, the emulated step should be at or below fifo + BOUND_SLACK). Beside it, not a
bound: every rank's recorded free-link run replayed together (`replay_ranks`, their step-to-step
jitter included: an all-reduce ends when the later rank's part does), which shows how much of the
emulated step the one-rank trace's assumption (all ranks post at the same times) leaves out. The
emulator also sleeps to each modelled finish, and a thread wakes late from a sleep (tens of µs on
this CPU), which no replay charges.

Validation (`--validate`): the CPU rows projected with the fitted links against real gloo
`torchrun` runs for N up to the core count, both bounds; the per-rank compute measured with the
thread count torchrun gives each rank (cores // N); the real step is the median steady-state step.
Run it on an idle machine: with another job running, gloo's threads wait for the scheduler.

    python benchmarks/project.py --measure --validate                        # CPU, measures its rows
    python benchmarks/project.py --scaling benchmarks/results/scaling_h100_4096.json
"""
from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS, SCHEMA, add_run, add_timing, config_of, hardware, parser, provenance,  # noqa: E402
                    read_result, rewrite_result, save_plot, table, timing_stats, write_result)
from parafuse.parallel.transport import MAIN, STALE, STALE_CHANNEL_KINDS, channel_of  # noqa: E402


# ---- links ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float      # bytes/s, per direction
    latency: float        # seconds per message
    source: str
    gpus_per_node: int = 0                 # 0: flat, every peer over this link
    inter_node: "Link | None" = None       # the link between nodes, for N > gpus_per_node


IB400 = Link("ib400", 50e9, 5e-6, "assumed: InfiniBand NDR 400 Gb/s = 50 GB/s per direction, ~5 µs, one NIC per GPU")
LINKS = {
    "nvlink4": Link("nvlink4", 450e9, 3e-6, "assumed: NVLink 4 / NVSwitch (H100 SXM), 900 GB/s bidirectional per "
                                            "GPU, ~3 µs NCCL small-message latency; 8 GPUs per node, nodes over ib400",
                    gpus_per_node=8, inter_node=IB400),
    "pcie4": Link("pcie4", 25e9, 10e-6, "assumed: PCIe 4.0 x16, 32 GB/s theoretical per direction, ~25 GB/s achieved, "
                                        "~10 µs; 8 GPUs per node, nodes over ib400", gpus_per_node=8, inter_node=IB400),
    "ib400": IB400,
}

# the links fitted on this machine: name -> with a busy compute thread in each process
MEASURED = {"measured": False, "measured-loaded": True}

NCCL_SM_SHARE = 32 / 132        # assumed: NCCL's up to 32 channels (one CTA each) of an H100's 132 SMs
LOOPBACK_JSON = os.path.join(RESULTS, "gpu_check_nvidia_h100_80gb_hbm3.json")

ASYNC_MODES = ("full", "partial", "none")       # steady state: stale exchanges overlap compute
STALE_KINDS = ("conv_halo", "attn_kv")          # sent at step t, used at step t+1
ALLREDUCE_KINDS = ("norm_stats",)               # ring all-reduces: 2(N−1) latency hops each
# critical collectives posted between the stale posts of a step: they queue behind stale traffic
# on a shared communicator (latent_halo, cfg and gather sit at the step's ends)
MID_STEP_CRITICAL = ("norm_stats", "text_attn", "reduce")


# ---- each kind's law in N ------------------------------------------------------------------------
MESSAGE_LAWS = {"per_peer": lambda n: n - 1, "per_neighbour": lambda n: min(2, n - 1),
                "collective": lambda n: 1, "constant": lambda n: 1}
BYTE_LAWS = {"per_peer": lambda n: (n - 1) / n, "per_neighbour": lambda n: min(2, n - 1),
             "collective": lambda n: (n - 1) / n, "constant": lambda n: 1}


def default_law(kind: str, mode: str) -> str:
    if kind == "attn_kv":
        return "per_neighbour" if mode == "partial" else "per_peer"
    if kind in ("conv_halo", "latent_halo"):
        return "per_neighbour"
    if kind in ("norm_stats", "reduce", "control"):
        return "collective"
    if kind == "cfg":
        return "constant"
    return "per_peer"          # gather, stage, text_attn


def law_deviation(law: str, points: dict[int, tuple[float, float]]) -> float:
    """Largest relative deviation of measured (messages, bytes) at N >= 2 from `law` fitted at the
    largest measured N."""
    ns = sorted(n for n in points if n >= 2)
    if len(ns) < 2:
        return 0.0
    top = ns[-1]
    worst = 0.0
    for which, laws in ((0, MESSAGE_LAWS), (1, BYTE_LAWS)):
        c = points[top][which] / laws[law](top)
        for n in ns[:-1]:
            want, got = c * laws[law](n), points[n][which]
            worst = max(worst, abs(got - want) / max(abs(got), abs(want), 1e-30))
    return worst


def choose_law(kind: str, mode: str, points: dict[int, tuple[float, float]]) -> tuple[str, float]:
    """(law, deviation): the kind's default law unless the measured points contradict it (> 1%);
    then the first law that fits them all."""
    first = default_law(kind, mode)
    for law in [first] + [k for k in MESSAGE_LAWS if k != first]:
        dev = law_deviation(law, points)
        if dev <= 0.01:
            return law, dev
    return first, law_deviation(first, points)


def by_law(law: str, points: dict[int, tuple[float, float]], n: int) -> tuple[float, float]:
    """(messages, bytes) at `n`: measured where measured, else the law through the largest measured N."""
    if n in points:
        return points[n]
    if n == 1:
        return 0.0, 0.0
    top = max(k for k in points if k >= 2)
    m, b = points[top]
    return m / MESSAGE_LAWS[law](top) * MESSAGE_LAWS[law](n), b / BYTE_LAWS[law](top) * BYTE_LAWS[law](n)


def posts(law: str, messages: float, n: int) -> float:
    """How many batches (one per layer) `messages` of one kind are."""
    return messages / MESSAGE_LAWS[law](n) if n > 1 else 0.0


# ---- the cost of one kind ------------------------------------------------------------------------
def _on_link(kind: str, nbytes: float, messages: float | None, n: int, link: Link) -> float:
    hops = 2 * (n - 1) if kind in ALLREDUCE_KINDS else 1
    latency = 0.0 if messages is None else messages * hops * link.latency
    return latency + nbytes / link.bandwidth


def off_node_share(law: str, n: int, link: Link) -> float:
    """The share of one kind's traffic that leaves the node, for the busiest rank."""
    if not link.gpus_per_node or link.inter_node is None or n <= link.gpus_per_node:
        return 0.0
    if law == "per_peer":
        return (n - link.gpus_per_node) / (n - 1)
    if law == "per_neighbour":
        return 1 / min(2, n - 1)
    return 1.0               # a ring over nodes, or the CFG partner: as slow as its slowest hop


def kind_seconds(kind: str, nbytes: float, messages: float | None, n: int, link: Link,
                 law: str | None = None, concurrent: bool = True) -> float:
    """Seconds one rank's link spends on one kind per step: latencies + bytes / bandwidth.
    `messages` None (older rows without counts): the latency term is left out (a lower bound).
    Past one node, the off-node share goes over `link.inter_node`: at the same time as the rest
    (`concurrent`, the optimistic bound) or after it."""
    share = off_node_share(law or default_law(kind, "full"), n, link)
    if share == 0.0:
        return _on_link(kind, nbytes, messages, n, link)
    m = None if messages is None else messages * (1 - share)
    m_off = None if messages is None else messages * share
    inside = _on_link(kind, nbytes * (1 - share), m, n, link)
    outside = _on_link(kind, nbytes * share, m_off, n, link.inter_node)
    return max(inside, outside) if concurrent else inside + outside


def bytes_seconds(kind: str, nbytes: float, n: int, link: Link, law: str) -> float:
    """The part of `kind_seconds` (serialised off-node share) that moves bytes, without the
    latencies: what two communicators on one link share."""
    return kind_seconds(kind, nbytes, 0, n, link, law, concurrent=False)


def step_seconds(compute: float, bytes_per_step: dict, messages_per_step: dict | None, mode: str, n: int,
                 link: Link, norm_on_critical_path: bool = True, laws: dict | None = None,
                 stale_text: bool = False) -> tuple[float, float, float]:
    """Optimistic bound: (comm_async, comm_critical, step) seconds of one steady-state step."""
    stale, critical, _ = split_comm(bytes_per_step, messages_per_step, mode, n, link, norm_on_critical_path,
                                    laws, stale_text, concurrent=True)
    asynchronous = mode in ASYNC_MODES
    step = max(compute, stale) + critical if asynchronous else compute + stale + critical
    return stale, critical, step


def split_comm(bytes_per_step: dict, messages_per_step: dict | None, mode: str, n: int, link: Link,
               norm_on_critical_path: bool = True, laws: dict | None = None, stale_text: bool = False,
               concurrent: bool = True) -> tuple[float, float, dict]:
    """(stale seconds, critical seconds, {kind: seconds}) of one step; in sync everything is critical."""
    asynchronous = mode in ASYNC_MODES
    stale = critical = 0.0
    per_kind = {}
    for kind in sorted(set(bytes_per_step) | set(messages_per_step or {})):
        messages = None if messages_per_step is None else messages_per_step.get(kind, 0)
        law = (laws or {}).get(kind) or default_law(kind, mode)
        t = per_kind[kind] = kind_seconds(kind, bytes_per_step.get(kind, 0), messages, n, link, law, concurrent)
        overlaps = (kind in STALE_KINDS or (kind in ALLREDUCE_KINDS and not norm_on_critical_path)
                    or (kind == "text_attn" and stale_text))
        if asynchronous and overlaps:
            stale += t
        else:
            critical += t
    return stale, critical, per_kind


@dataclass(frozen=True)
class Charge:
    """What NCCL's moving of bytes costs the compute it overlaps (see the module docstring)."""
    loss_fraction: float          # of compute, from the on-device loopback run
    loss_seconds_per_byte: float  # the same loss per byte the loopback run moved
    sm_share: float               # of the SMs, for the transfer time
    source: str

    def seconds(self, compute: float, nbytes: float, transfer_seconds: float) -> float:
        return max(self.loss_fraction * compute, self.loss_seconds_per_byte * nbytes,
                   self.sm_share * transfer_seconds)


def loopback_charge(path: str = LOOPBACK_JSON, sm_share: float = NCCL_SM_SHARE) -> Charge:
    """The loss of the on-device loopback run, from `gpu_check.py`'s committed JSON: its graphs
    section's loopback row against the null-transport row of the same configuration."""
    rows = read_result(path)["sections"]["graphs"]["result"]["rows"]
    return charge_from_rows(rows, os.path.relpath(path, os.path.dirname(RESULTS)), sm_share)


def charge_from_rows(rows: list[dict], where: str, sm_share: float = NCCL_SM_SHARE) -> Charge:
    """`loopback_charge` from graphs-section rows (`where` names them)."""
    same = ("model", "size", "mode", "n", "cuda_graphs", "kernels")
    for loop in (r for r in rows if r.get("transport") == "loopback"):
        null = next((r for r in rows if r.get("transport") == "null" and all(r.get(k) == loop.get(k) for k in same)),
                    None)
        if null is None:
            continue
        lost = loop["seconds"] - null["seconds"]
        nbytes = sum(loop["bytes_per_step"].values())
        return Charge(lost / null["seconds"], lost / nbytes, sm_share,
                      f"{where}: {loop['model']} {loop['size']}² "
                      f"{loop['mode']} N={loop['n']} graphed, loopback {loop['seconds'] * 1e3:.2f} ms vs null "
                      f"{null['seconds'] * 1e3:.2f} ms ({lost / null['seconds']:+.1%}, {nbytes / 1e9:.2f} GB/step); "
                      f"NCCL SM share {sm_share:.3f} (assumed)")
    raise ValueError(f"{where}: no graphs row with transport 'loopback' beside a 'null' one of the same configuration")


def pessimistic_seconds(compute: float, bytes_per_step: dict, messages_per_step: dict | None, mode: str, n: int,
                        link: Link, charge: Charge | None, norm_on_critical_path: bool = True,
                        laws: dict | None = None, stale_text: bool = False, stale_channel: bool = False,
                        shared_link: bool = True) -> tuple[float, float, float, float, float]:
    """Pessimistic bound: (charge, stale, critical, tail, step) seconds of one steady-state step.
    On the stale communicator (`stale_channel`) over one link (`shared_link`), the critical
    transfers' bytes are charged as moving beside stale traffic at half the bandwidth, and the
    stale traffic as slowed by as much."""
    stale, critical, per_kind = split_comm(bytes_per_step, messages_per_step, mode, n, link, norm_on_critical_path,
                                           laws, stale_text, concurrent=False)
    if mode not in ASYNC_MODES:
        return 0.0, stale, critical, 0.0, compute + stale + critical
    stale_kinds = [k for k in per_kind if k in STALE_KINDS or (k in ALLREDUCE_KINDS and not norm_on_critical_path)
                   or (k == "text_attn" and stale_text)]
    stale_bytes = sum(bytes_per_step.get(k, 0) for k in stale_kinds)
    transfer = stale_bytes / link.bandwidth
    extra = charge.seconds(compute, sum(bytes_per_step.values()), transfer) if charge and stale_bytes else 0.0
    mid_step = [k for k in MID_STEP_CRITICAL if k not in stale_kinds and (messages_per_step or bytes_per_step).get(k)]
    if mid_step and stale and not stale_channel:
        return extra, stale, critical, 0.0, compute + extra + stale + critical
    def law(k):
        return (laws or {}).get(k) or default_law(k, mode)
    tail = 0.0
    for k in stale_kinds:
        count = posts(law(k), (messages_per_step or {}).get(k, 0), n)
        tail = max(tail, per_kind[k] / count if count else per_kind[k])
    shared = 0.0
    if stale_channel and shared_link and stale:
        shared = sum(bytes_seconds(k, bytes_per_step.get(k, 0), n, link, law(k))
                     for k in per_kind if k not in stale_kinds)
    stale, critical = stale + shared, critical + shared
    return extra, stale, critical, tail, max(compute + extra, stale) + tail + critical


# ---- the trace-driven estimate: one rank's recorded timeline through one FIFO link per communicator --
FIFO_STEPS = 12           # identical steps replayed from an idle link; the steady step is the mean of the last
FIFO_STEADY = 4           # FIFO_STEADY of them


def post_cost(kind: str, nbytes: float, messages: float, n: int, link: Link, mode: str, stale_channel: bool,
              stale_kinds: tuple[str, ...]) -> tuple[str, float]:
    """(communicator, seconds on its link) of one recorded post: the transport's routing
    (`channel_of`) and the cost the other bounds charge its kind (`kind_seconds`)."""
    return (channel_of(kind, stale_channel, stale_kinds),
            kind_seconds(kind, nbytes, messages, n, link, default_law(kind, mode), concurrent=False))


class SharedLink:
    """One rank's link with a FIFO per communicator. A transfer starts when it reaches its FIFO's
    head: first its latencies, then its bytes. With `shared`, the communicators whose transfers are
    moving bytes at a moment split the link's bandwidth evenly (one NVLink port, one NIC: two
    communicators run at once but move no more bytes together than one); without it each FIFO has
    a link of its own (as the thread emulator models two communicators)."""

    def __init__(self, shared: bool):
        self.shared, self.now = shared, 0.0
        self.queues: dict[str, list] = {MAIN: [], STALE: []}     # [key, latency left, bytes seconds left]
        self.finish: dict = {}

    def post(self, at: float, key, channel: str, latency: float, nbytes: float) -> None:
        self.run(at)
        self.queues[channel].append([key, latency, nbytes])

    def run(self, until: float, key=None) -> None:
        """Move the transfers on to time `until`, or (`key`) until that transfer has finished."""
        while True:
            if key is not None and key in self.finish:
                return
            heads = [q[0] for q in self.queues.values() if q]
            if not heads:
                if key is not None:
                    raise ValueError(f"a wait for {key!r}, which was never posted")
                self.now = max(self.now, until)
                return
            moving = sum(1 for h in heads if h[1] <= 0)
            rate = 1 / moving if self.shared and moving else 1.0
            dt = min(h[1] if h[1] > 0 else h[2] / rate for h in heads)
            if key is None:
                dt = min(dt, until - self.now)
                if dt <= 0:
                    return
            for h in heads:
                if h[1] > 0:
                    h[1] -= dt
                else:
                    h[2] -= dt * rate
            self.now += dt
            for q in self.queues.values():
                while q and q[0][1] <= 1e-15 and q[0][2] <= 1e-15:
                    self.finish[q.pop(0)[0]] = self.now
                if q and q[0][1] < 0:           # the latencies' overshoot of the step (floating point)
                    q[0][1] = 0.0

    def finish_of(self, key) -> float:
        """When transfer `key` finishes (the link moved on to then)."""
        self.run(0.0, key)
        return self.finish[key]

    def drained(self) -> float:
        """When the last posted transfer finishes."""
        for q in self.queues.values():
            while q:
                self.finish_of(q[-1][0])
        return self.now


def replay_timeline(timeline: dict, link: Link, n: int, mode: str = "full", compute: float | None = None,
                    charge: float = 0.0, stale_channel: bool = False,
                    stale_kinds: tuple[str, ...] = STALE_CHANNEL_KINDS, drain: bool | None = None,
                    steps: int = FIFO_STEPS, shared_link: bool = True) -> dict:
    """One recorded step (`TimelineRecorder.timelines()`: its duration and its (t, event, post, kind,
    bytes, messages) events) replayed through one FIFO per communicator on the rank's link, `steps`
    identical steps in a row from an idle link; returns {"step", "compute", "stall", "steps"}
    seconds, "step" the mean of the last FIFO_STEADY steps (the steady state).

    - Compute: the recorded gaps between events, scaled so that the step's compute is `compute`
      (the row's measured per-rank compute; None: the recording's own) plus `charge` (the
      pessimistic bound's SM/HBM charge, `Charge.seconds`), spread over the step in proportion.
    - A post enqueues its transfer behind whatever its FIFO holds (the communicator's: MAIN, or
      STALE for `stale_kinds` with `stale_channel`): `kind_seconds`, the rule the other bounds use
      (latency per message and hop, an all-reduce 2(N-1) hops; bytes / bandwidth; past one node
      the off-node share after the rest). With two communicators, `shared_link` (the projection's
      default) splits the bandwidth between the transfers moving bytes at once (`SharedLink`); the
      emulator's validation replays without it, since the emulator gives each its own link.
    - A wait blocks compute until its post's transfer has finished: "wait" one of this step's posts,
      "wait_prev" the same post of the previous step (a stale exchange; the first step's are free).
    - `drain` (default: the row was graphed, or the timeline is a graph replay's): every post is
      finished before the step ends (a CUDA graph drains its exchanges: a one-step window).
    Nothing here decides which kind is stale or critical: what is waited when is the trace's."""
    events, recorded = timeline["events"], timeline["seconds"]
    if compute is None:
        compute = recorded
    scale = (compute + charge) / recorded if recorded > 0 else 0.0
    drain = timeline.get("graphed", False) if drain is None else drain
    if any(e[1] not in ("post", "wait", "wait_prev") for e in events):
        raise ValueError("the timeline waits for a post older than the previous step: not a steady step")
    cost = {}
    for t, what, post, kind, nbytes, messages in events:
        if what == "post":
            channel, seconds = post_cost(kind, nbytes, messages, n, link, mode, stale_channel, stale_kinds)
            moving = bytes_seconds(kind, nbytes, n, link, default_law(kind, mode))
            cost[post] = (channel, seconds - moving, moving)
    wire = SharedLink(shared_link)
    now, durations = 0.0, []
    for k in range(steps):
        begin, last = now, 0.0
        for t, what, post, kind, nbytes, messages in events:
            now += (t - last) * scale
            last = t
            if what == "post":
                wire.post(now, (k, post), *cost[post])
            elif what == "wait" or (what == "wait_prev" and k > 0 and not drain):
                # wait_prev under a drain: the previous step's posts are done
                now = max(now, wire.finish_of((k if what == "wait" else k - 1, post)))
        now += (recorded - last) * scale
        if drain:
            now = max(now, wire.drained())
        durations.append(now - begin)
    step = statistics.fmean(durations[-FIFO_STEADY:])
    return {"step": step, "compute": compute + charge, "stall": step - compute - charge, "steps": durations}


def timeline_bytes(timeline: dict) -> tuple[dict, dict]:
    """(bytes, messages) per kind of the timeline's posts: the counts the row reports, if it is one step."""
    nbytes, messages = {}, {}
    for t, what, post, kind, b, m in timeline["events"]:
        if what == "post":
            nbytes[kind] = nbytes.get(kind, 0) + b
            messages[kind] = messages.get(kind, 0) + m
    return nbytes, messages


TIMELINE_KEY = ("model", "size", "mode", "n", "kernels", "cuda_graphs", "dtype")


def join_timelines(rows: list[dict], traced: list[dict]) -> list[str]:
    """Each `traced` row's timeline (a `scaling.py --timeline` run of the same configurations, kept
    apart so that the recorder's events stay out of the timed rows) joined to the row of `rows`
    with the same model, size, mode, N, kernels, graphs and dtype; the rows' measured compute is
    what the replay scales the timeline to. Returns the joined rows' names. A traced row matching
    no row is an error: the two runs were not of the same configurations."""
    key = lambda r: tuple(r.get(k, "torch" if k == "kernels" else None) for k in TIMELINE_KEY)   # noqa: E731
    by_key = {key(r): r for r in rows if r.get("mode") not in (None, "serial")}
    joined = []
    for t in (t for t in traced if "timeline" in t):
        row = by_key.get(key(t))
        if row is None:
            raise ValueError(f"the timeline of {dict(zip(TIMELINE_KEY, key(t)))} has no row of that configuration "
                             f"in the --scaling JSON: record the timelines with the same model, size, mode, N, "
                             f"kernels, graphs and dtype")
        row["timeline"] = t["timeline"]
        joined.append(f"{row['model']} {row['size']}² {row['mode']} N={row['n']} {key(t)[4]}")
    return joined


def fifo_seconds(row: dict, compute: float, link: Link, n: int, mode: str, charge: float,
                 stale_text: bool = False) -> dict:
    """`projected_fifo_*` of a measured row with a timeline: one communicator, and the opt-in stale one."""
    tl = row["timeline"]
    drain = bool(row.get("cuda_graphs")) or tl.get("graphed", False)
    one = replay_timeline(tl, link, n, mode, compute, charge, drain=drain)
    kinds = STALE_CHANNEL_KINDS + (("text_attn",) if stale_text else ())
    two = replay_timeline(tl, link, n, mode, compute, charge, stale_channel=True, stale_kinds=kinds, drain=drain)
    nbytes, messages = timeline_bytes(tl)
    return {"projected_fifo_step_seconds": one["step"], "projected_fifo_stall_seconds": one["stall"],
            "projected_fifo_stale_channel_step_seconds": two["step"],
            "projected_fifo_drained": drain,
            "projected_fifo_counts_match": nbytes == {k: v for k, v in row.get("bytes_per_step", {}).items() if v}
            and messages == {k: v for k, v in row.get("messages_per_step", {}).items() if v}}


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
def with_sync_from_full(rows: list[dict]) -> list[dict]:
    """`rows` plus, where a (model, size, kernels, N) has a full row and no sync row, a sync row with
    full's per-rank compute, bytes and messages (sync does the same work, waiting at every exchange),
    marked `compute_from: full`."""
    measured = {(r["model"], r["size"], r.get("kernels", "torch"), r["n"]) for r in rows if r.get("mode") == "sync"}
    derived = [{**{k: v for k, v in r.items() if k != "timeline"}, "mode": "sync", "compute_from": "full"} for r in rows
               if r.get("mode") == "full" and (r["model"], r["size"], r.get("kernels", "torch"), r["n"]) not in measured]
    return rows + derived


def project_rows(rows: list[dict], link: Link, max_n: int = 16, norm_on_critical_path: bool = True,
                 charge: Charge | None = None, derive_sync: bool = False) -> list[dict]:
    """Projected steady-state step and speedup for N = 1..max_n, per (model, size, mode) of `rows`,
    both bounds (see the module docstring).

    `rows`: `benchmarks/scaling.py` rows (`scaling_rows`, or the JSON's "rows"): dicts with model,
    size, mode (serial | sync | full | partial | none), n, seconds (per-rank compute), serial_seconds,
    bytes_per_step and, in new runs, messages_per_step (and `text: "stale"` where the stale text
    merge ran). Rows marked "skipped" or without seconds are ignored. `link`: a `Link` (`LINKS[name]`,
    or `fit_link` on a ping-pong). `charge`: the pessimistic bound's SM/HBM charge (`loopback_charge`;
    None: not charged). `derive_sync`: add sync rows from full's compute where sync was not measured.

    Rows of one (model, size, mode) measured with different patch-layer kernels (`kernels`, absent:
    torch) are projected apart, each against the serial row on the same kernels where there is one
    (else the one serial row serves them all).

    Returns one dict per (model, size, mode, kernels, N), sorted: model, size, mode, kernels, n, link,
    link_bandwidth, link_latency, serial_seconds (inputs), compute_source, messages_known, and the
    projections projected_compute_seconds, projected_bytes_per_step, projected_messages_per_step
    (None if unknown), projected_laws, projected_law_deviation, projected_comm_async_seconds,
    projected_comm_critical_seconds, projected_step_seconds, projected_speedup, projected_bound
    ("compute" or "comm") (the optimistic bound); projected_pessimistic_{charge,comm_async,
    comm_critical,tail,step}_seconds, projected_pessimistic_speedup; projected_stale_channel_step_seconds,
    projected_stale_channel_speedup; and where the row of a measured N carries its recorded `timeline`
    (scaling.py --timeline), the trace-driven estimate `fifo_seconds`: projected_fifo_{step,stall,
    stale_channel_step}_seconds, projected_fifo_speedup, projected_fifo_stale_channel_speedup,
    projected_fifo_drained, projected_fifo_counts_match (the timeline's posts add up to the row's
    bytes and messages). Other N get no fifo keys: a trace is of one N."""
    rows = [r for r in rows if "skipped" not in r and "seconds" in r and "mode" in r]
    if derive_sync:
        rows = with_sync_from_full(rows)
    # the serial step on the same kernels where it was measured so (scaling.py since issue 28), else
    # the one serial row (older results: the plain model's)
    serial = {(r["model"], r["size"], r.get("kernels")): r["seconds"] for r in rows if r["mode"] == "serial"}
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["mode"] != "serial":
            groups.setdefault((r["model"], r["size"], r["mode"], r.get("kernels", "torch")), {})[r["n"]] = r
    out = []
    for (model, size, mode, kernels), measured in sorted(groups.items()):
        serial_s = serial.get((model, size, kernels), serial.get((model, size, None),
                              next(iter(measured.values()))["serial_seconds"]))
        messages_known = all("messages_per_step" in r for r in measured.values())
        stale_text = any(r.get("text") == "stale" for r in measured.values())
        derived_from = next((r["compute_from"] for r in measured.values() if "compute_from" in r), None)
        # N = 1 is the serial step: nothing is sent
        compute = {1: serial_s, **{n: r["seconds"] for n, r in measured.items()}}
        kinds = sorted({k for r in measured.values() for k in r.get("bytes_per_step", {})}
                       | {k for r in measured.values() for k in r.get("messages_per_step", {})})
        points = {k: {n: (float(r.get("messages_per_step", {}).get(k, 0)), float(r.get("bytes_per_step", {}).get(k, 0)))
                      for n, r in measured.items()} for k in kinds}
        laws, deviation = {}, {}
        for k in kinds:
            laws[k], deviation[k] = choose_law(k, mode, points[k])
        for n in range(1, max_n + 1):
            c, source = compute_at(compute, n)
            if derived_from and source == "measured" and n > 1:
                source = derived_from
            at = {k: by_law(laws[k], points[k], n) for k in kinds}
            b = {k: at[k][1] for k in kinds}
            m = {k: at[k][0] for k in kinds} if messages_known else None
            comm_async, comm_critical, step = step_seconds(c, b, m, mode, n, link, norm_on_critical_path, laws,
                                                           stale_text)
            extra, p_async, p_critical, tail, p_step = pessimistic_seconds(
                c, b, m, mode, n, link, charge, norm_on_critical_path, laws, stale_text)
            channel_step = pessimistic_seconds(c, b, m, mode, n, link, charge, norm_on_critical_path, laws,
                                               stale_text, stale_channel=True)[-1]
            out.append({"model": model, "size": size, "mode": mode, "kernels": kernels, "n": n, "link": link.name,
                        "link_bandwidth": link.bandwidth, "link_latency": link.latency, "serial_seconds": serial_s,
                        "compute_source": source, "messages_known": messages_known,
                        "projected_compute_seconds": c, "projected_bytes_per_step": b,
                        "projected_messages_per_step": m, "projected_laws": laws,
                        "projected_law_deviation": deviation,
                        "projected_comm_async_seconds": comm_async, "projected_comm_critical_seconds": comm_critical,
                        "projected_step_seconds": step, "projected_speedup": serial_s / step,
                        "projected_bound": "comm" if mode in ASYNC_MODES and comm_async > c else "compute",
                        "projected_pessimistic_charge_seconds": extra,
                        "projected_pessimistic_comm_async_seconds": p_async,
                        "projected_pessimistic_comm_critical_seconds": p_critical,
                        "projected_pessimistic_tail_seconds": tail,
                        "projected_pessimistic_step_seconds": p_step,
                        "projected_pessimistic_speedup": serial_s / p_step,
                        "projected_stale_channel_step_seconds": channel_step,
                        "projected_stale_channel_speedup": serial_s / channel_step})
            if source == "measured" and n > 1 and "timeline" in measured[n]:
                # the trace-driven estimate: only where this N's own step was recorded (nothing scaled to other N)
                fifo = fifo_seconds(measured[n], c, link, n, mode, extra, stale_text)
                out[-1].update(fifo, projected_fifo_speedup=serial_s / fifo["projected_fifo_step_seconds"],
                               projected_fifo_stale_channel_speedup=serial_s
                               / fifo["projected_fifo_stale_channel_step_seconds"])
    return out


# ---- measuring rows on this machine ------------------------------------------------------------
def measure_rows(model_name: str, sizes, ranks, modes, repeat: int = 5, log=print,
                 timing_warmup: int = 2) -> list[dict]:
    """`scaling.scaling_rows` on this CPU: per-rank compute of the slowest strip, bytes and messages
    of the busiest one."""
    import scaling

    return scaling.scaling_rows(model_name, sizes, ranks, modes, torch.device("cpu"), None, repeat, log=log,
                                timing_warmup=timing_warmup)


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
    one_way = {size: timing_stats(t)["seconds"] for size, t in times.items()}
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
    real_mean = {key: statistics.fmean(v) for key, v in real.items()}
    return {"links": [asdict(k) for k in links], "cores": cores, "torchrun_steps": steps,
            "torchrun_warmup_steps": warmup, "compute_rows": compute_rows,
            **validation_checks(model, size, serial["seconds"], cores, compute_rows, real_s, real_mean, links)}


def validation_checks(model: str, size: int, serial_seconds: float, cores: int, compute_rows: list[dict],
                      real_s: dict, real_mean: dict, links: list[Link]) -> dict:
    """Both bounds projected from the per-rank compute rows against the real torchrun steps
    ({(mode, n): median seconds}, and their means), per link: the checks and the mean errors."""
    checks = []
    serial = {"seconds": serial_seconds}
    for link in links:
        checks.append({"model": model, "size": size, "mode": "serial", "n": 1, "threads": cores, "link": link.name,
                       "measured_compute_seconds": serial["seconds"], "projected_step_seconds": serial["seconds"],
                       "projected_pessimistic_step_seconds": serial["seconds"],
                       "projected_speedup": 1.0, "measured_torchrun_seconds": real_s[("serial", 1)],
                       "measured_torchrun_speedup": 1.0})
        for r in compute_rows:
            args = (r["seconds"], r["bytes_per_step"], r["messages_per_step"], r["mode"], r["n"], link)
            step = step_seconds(*args)[2]
            # no SM charge on a CPU: the loopback loss is a GPU figure
            pessimistic = pessimistic_seconds(*args, charge=None)[-1]
            checks.append({"model": model, "size": size, "mode": r["mode"], "n": r["n"], "threads": r["threads"],
                           "link": link.name, "measured_compute_seconds": r["seconds"], "projected_step_seconds": step,
                           "projected_pessimistic_step_seconds": pessimistic,
                           "projected_speedup": serial["seconds"] / step,
                           "measured_torchrun_seconds": real_s[(r["mode"], r["n"])],
                           "measured_torchrun_speedup": real_s[("serial", 1)] / real_s[(r["mode"], r["n"])]})
    for c in checks:
        c["measured_torchrun_mean_seconds"] = real_mean[(c["mode"], c["n"])]
        c["relative_error"] = c["projected_step_seconds"] / c["measured_torchrun_seconds"] - 1
        c["pessimistic_relative_error"] = c["projected_pessimistic_step_seconds"] / c["measured_torchrun_seconds"] - 1
        c["speedup_relative_error"] = c["projected_speedup"] / c["measured_torchrun_speedup"] - 1

    def mean_abs(link, key):
        return statistics.fmean(abs(c[key]) for c in checks if c["n"] > 1 and c["link"] == link.name)
    return {"checks": checks,
            "mean_abs_relative_error": {k.name: mean_abs(k, "relative_error") for k in links},
            "mean_abs_pessimistic_relative_error": {k.name: mean_abs(k, "pessimistic_relative_error") for k in links},
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


# ---- validation against the thread emulator with a modelled link ---------------------------------
EMULATOR_MODES = ("sync", "full", "partial")
BOUND_SLACK = 0.05        # `within_bounds` allows the emulated step this much outside [optimistic, pessimistic]


def emulator_link(compute: float, bytes_per_step: dict, messages_per_step: dict, comm_share: float = 0.5,
                  latency_share: float = 0.1) -> Link:
    """The modelled link of the emulator validation, sized from `full`'s free-link step on the device
    it runs on, so that communication is a visible part of the step there (CPU or GPU alike): its
    bytes take `comm_share` of that step and its messages' latencies `latency_share`."""
    nbytes, messages = sum(bytes_per_step.values()), sum(messages_per_step.values())
    return Link("modelled", nbytes / (comm_share * compute), latency_share * compute / max(messages, 1),
                f"modelled in the thread transport: full's bytes take {comm_share:.0%} and its messages' latencies "
                f"{latency_share:.0%} of its free-link step ({compute * 1e3:.2f} ms)")


def emulator_checks(rows: list[dict], link: Link) -> list[dict]:
    """Both bounds, projected with `link` from each row's free-link emulated step (`compute_seconds`:
    compute measured the same way, with the link's cost at zero) and its bytes and messages per step,
    against the step emulated over the modelled link (`emulated_seconds`). Rows: mode, n,
    stale_channel, compute_seconds, bytes_per_step, messages_per_step, emulated_seconds. The
    pessimistic bound of a stale-channel row is the stale communicator's (no queueing)."""
    checks = []
    for r in rows:
        args = (r["compute_seconds"], r["bytes_per_step"], r["messages_per_step"], r["mode"], r["n"], link)
        optimistic = step_seconds(*args)[2]
        pessimistic = pessimistic_seconds(*args, charge=None, stale_channel=r["stale_channel"], shared_link=False)[-1]
        real = r["emulated_seconds"]
        checks.append({**r, "link": link.name, "projected_step_seconds": optimistic,
                       "projected_pessimistic_step_seconds": pessimistic,
                       "relative_error": optimistic / real - 1, "pessimistic_relative_error": pessimistic / real - 1,
                       "within_bounds": (1 - BOUND_SLACK) * optimistic <= real <= (1 + BOUND_SLACK) * pessimistic})
        if r.get("timeline"):
            # the trace-driven estimate: the rank's recorded free-link step replayed through the same link,
            # one FIFO per communicator, each on a link of its own, as the emulator has (eager: stale posts
            # waited the next step)
            fifo = replay_timeline(r["timeline"], link, r["n"], r["mode"], r["compute_seconds"],
                                   stale_channel=r["stale_channel"], drain=False, shared_link=False)["step"]
            checks[-1].update(projected_fifo_step_seconds=fifo, fifo_relative_error=fifo / real - 1,
                              within_fifo=real <= (1 + BOUND_SLACK) * fifo)
        if "fifo_all_ranks_seconds" in r:
            checks[-1]["fifo_all_ranks_relative_error"] = r["fifo_all_ranks_seconds"] / real - 1
    return checks


def emulated_timelines(model, req, mode: str, n: int, device: str, warmup: int = 2) -> dict[str, list[list[dict]]]:
    """One free-link run of the thread emulator with each rank's transport wrapped in a
    `TimelineRecorder` (steps cut where the session begins one): per rank, every step's timeline,
    on two clocks: "wall" (a wait's time blocked for the peer is in the gap after it, as it is in
    the free-link step the other bounds call compute: for the one-rank replay) and "compute" (that
    time left out: for replaying every rank together, which makes the waits for peers again)."""
    import copy

    from parafuse.parallel.emulator import emulate_ranks
    from parafuse.parallel.transport import TimelineRecorder
    from parafuse.runtime import ParallelConfig, Runtime

    config = ParallelConfig(mode, warmup)
    recorders: list = [None] * n
    cuda = torch.device(device).type == "cuda"

    def run(layout, transport):
        rec = recorders[layout.rank] = TimelineRecorder(transport)
        rt = Runtime(copy.deepcopy(model), config, device, layout=layout, transport=rec)
        begin = rt.session.begin_step
        rt.session.begin_step = lambda k: (rec.boundary(device if cuda else None), begin(k))[1]
        rt.generate(req)
        rec.finish(device if cuda else None)
        rt.close()

    emulate_ranks(n, config, run, device)
    return {clock: [rec.timelines(clock) for rec in recorders] for clock in ("wall", "compute")}


def steady_timeline(runs: list[list[dict]], warmup: int = 2) -> dict:
    """The single-rank timeline of `emulated_timelines`' runs: the steady step of the slowest rank
    (its median step among the steady ones: after the warmup and the first stale step, before the
    last, which gathers; a run too short for that, a smoke run, gives what follows the warmup), with
    each post's bytes and messages the most any rank's same post had (`busiest_posts`)."""
    per_rank = [tls[warmup + 1:-1] or tls[warmup:] or tls[-1:] for tls in runs]
    medians = [sorted(steps, key=lambda s: s["seconds"])[len(steps) // 2] for steps in per_rank]
    return busiest_posts(max(medians, key=lambda s: s["seconds"]), medians)


def replay_ranks(runs: list[list[dict]], link: Link, n: int, mode: str = "full", stale_channel: bool = False,
                 stale_kinds: tuple[str, ...] = STALE_CHANNEL_KINDS, scale: float = 1.0) -> list[float]:
    """Every rank's recorded run (consecutive steps of `emulated_timelines`, each rank's own gaps,
    its jitter included, times `scale`) replayed together, one FIFO per rank and communicator, each
    post costed as in `replay_timeline`: a wait completes when the same post (step, number) of every
    rank has finished (at N = 2 the one peer, as the emulator's receives and all-reduces do). Returns
    the durations of the steps after the first (the slowest rank's step ends, differenced). Not a
    bound: what the single-rank trace's assumption (every rank posts at the same times) leaves out."""
    ranks = len(runs)
    seqs = []
    for steps in runs:
        seq = []
        for k, st in enumerate(steps):
            last = 0.0
            for t, what, post, kind, nbytes, messages in st["events"]:
                seq.append(((t - last) * scale, what, k - 1 if what == "wait_prev" else k, post, kind, nbytes,
                            messages))
                last = t
            seq.append(((st["seconds"] - last) * scale, "end", k, None, None, 0, 0))
        seqs.append(seq)
    now, at = [0.0] * ranks, [0] * ranks
    busy = [{MAIN: 0.0, STALE: 0.0} for _ in range(ranks)]
    finish: list[dict] = [{} for _ in range(ranks)]
    ends: list[list[float]] = [[] for _ in range(ranks)]
    while any(at[r] < len(seqs[r]) for r in range(ranks)):
        moved = False
        for r in range(ranks):
            while at[r] < len(seqs[r]):
                gap, what, k, post, kind, nbytes, messages = seqs[r][at[r]]
                key = (k, post)
                if what in ("wait", "wait_prev", "wait_older") and k >= 0 and post is not None:
                    if any(key not in finish[q] for q in range(ranks)):
                        break               # a peer has not posted it yet: replay the peers first
                now[r] += gap
                if what == "post":
                    channel, seconds = post_cost(kind, nbytes, messages, n, link, mode, stale_channel, stale_kinds)
                    busy[r][channel] = finish[r][key] = max(now[r], busy[r][channel]) + seconds
                elif what == "end":
                    ends[r].append(now[r])
                elif k >= 0 and post is not None:
                    now[r] = max([now[r]] + [finish[q][key] for q in range(ranks)])
                at[r] += 1
                moved = True
        if not moved:
            raise ValueError("the ranks' timelines wait for posts no rank makes: not one run's recordings")
    done = [max(e[k] for e in ends) for k in range(min(map(len, ends)))]
    return [b - a for a, b in zip(done, done[1:])]


def busiest_posts(timeline: dict, others: list[dict]) -> dict:
    """`timeline` with each post's bytes and messages the largest among the same post (by order and
    kind) of `others` (the other strips' steps: the row's counts are the busiest strip's); unchanged
    where their post sequences differ."""
    def posts(tl):
        return [e for e in tl["events"] if e[1] == "post"]
    mine = posts(timeline)
    if any([e[3] for e in posts(o)] != [e[3] for e in mine] for o in others):
        return timeline
    most = {e[2]: (max(p[i][4] for p in map(posts, others)), max(p[i][5] for p in map(posts, others)))
            for i, e in enumerate(mine)}
    events = [[*e[:4], max(e[4], most[e[2]][0]), max(e[5], most[e[2]][1])] if e[1] == "post" else list(e)
              for e in timeline["events"]]
    return {**timeline, "events": events}


def compact_timeline(timeline: dict) -> dict:
    """A timeline for a results JSON: times rounded to nanoseconds."""
    return {**timeline, "seconds": round(timeline["seconds"], 9),
            "events": [[round(e[0], 9), *e[1:]] for e in timeline["events"]]}


def emulated_steps(model, req, mode: str, n: int, device: str, stale_channel: bool, link: Link) -> list[float]:
    """Seconds of the steady steps (after the warmup and the first stale step, which starts with an
    idle link) of one run of the thread emulator over `link`: per step the slowest rank's."""
    from parafuse.runtime import ParallelConfig, emulate

    warmup = 2
    _, results = emulate(model, n, ParallelConfig(mode, warmup, stale_channel=stale_channel), req, device=device,
                         link=(link.latency, link.bandwidth))
    return [max(s) for s in zip(*(r[0].timing["step_seconds"] for r in results))][warmup + 1:]


def validate_emulator(model_name: str, size: int, n: int = 2, steps: int = 12, device: str = "cpu",
                      link: Link | None = None, repeats: int = 3, log=print) -> dict:
    """The thread emulator over a modelled link (ThreadHub: latency + bytes / bandwidth, one FIFO per
    rank and communicator) against both bounds, for sync, full and partial with one communicator and
    with the opt-in stale one. Each row's compute is the same emulated run over a free link (latency
    0, infinite bandwidth: the same code, syncs included); bytes and messages per step are one strip's
    steady step (scaling.measure, NullTransport), the busiest strip's. Free and modelled runs
    alternate, `repeats` times each, and the median of all their steady steps is taken (a machine
    shared with other work slows them alike). `link` None: `emulator_link`."""
    import scaling
    from parafuse.models import load_model
    from parafuse.runtime import Request

    model = load_model(model_name, device=device)
    req = Request(size, size, steps, "ddim", 1.0, seed=0, label=0 if model.spec.num_classes else None)
    free = Link("free", float("inf"), 0.0, "no cost: the same transport code, the link's time zero")
    counted, runs, timelines = {}, {}, {}
    for mode in EMULATOR_MODES:
        strips = [scaling.measure(model, req, torch.device(device), None, mode, n, s, repeat=1) for s in range(n)]
        busiest = max(strips, key=lambda r: sum(r["bytes_per_step"].values()))
        counted[mode] = (busiest["bytes_per_step"], busiest["messages_per_step"])
        recorded = emulated_timelines(model, req, mode, n, device)
        runs[mode] = recorded["compute"]
        timelines[mode] = compact_timeline(steady_timeline(recorded["wall"]))
    configs = [(mode, channel) for mode in EMULATOR_MODES for channel in (False, True)]
    free_steps = {c: [] for c in configs}
    modelled_steps = {c: [] for c in configs}
    if link is None:
        free_steps[("full", False)] += emulated_steps(model, req, "full", n, device, False, free)
        link = emulator_link(statistics.median(free_steps[("full", False)]), *counted["full"])
    log(f"{model_name} {size}² N={n} on {device}: link {link.latency * 1e6:.1f} µs, {link.bandwidth / 1e6:.1f} MB/s")
    for _ in range(repeats):
        for mode, channel in configs:
            free_steps[(mode, channel)] += emulated_steps(model, req, mode, n, device, channel, free)
            modelled_steps[(mode, channel)] += emulated_steps(model, req, mode, n, device, channel, link)
    def spread(steps_s):       # interquartile range over the median: how noisy the machine made the steps
        q = statistics.quantiles(steps_s, n=4)
        return (q[2] - q[0]) / q[1]

    rows = []
    for mode, channel in configs:
        # all ranks' recorded runs (compute clock) replayed together, scaled so that their free-link replay
        # is this row's free-link step: what the single rank's trace leaves out (the ranks' jitter: an
        # all-reduce ends when the later rank's part does)
        joint_free = replay_ranks(runs[mode], free, n, mode)
        joint = replay_ranks(runs[mode], link, n, mode, channel,
                             scale=statistics.median(free_steps[(mode, channel)])
                             / statistics.median(joint_free[2:-1] or joint_free))
        rows.append({"model": model_name, "size": size, "mode": mode, "n": n, "stale_channel": channel,
                     "fifo_all_ranks_seconds": statistics.median(joint[2:-1] or joint),
                     "compute_seconds": statistics.median(free_steps[(mode, channel)]),
                     "free_link_spread": spread(free_steps[(mode, channel)]),
                     "emulated_spread": spread(modelled_steps[(mode, channel)]),
                     "bytes_per_step": counted[mode][0], "messages_per_step": counted[mode][1],
                     "emulated_seconds": statistics.median(modelled_steps[(mode, channel)]),
                     "free_link_steps": free_steps[(mode, channel)], "emulated_steps": modelled_steps[(mode, channel)],
                     "timeline": timelines[mode]})
        log(f"  {mode}{' (stale channel)' if channel else ''}: free {rows[-1]['compute_seconds'] * 1e3:.1f} ms, "
            f"modelled link {rows[-1]['emulated_seconds'] * 1e3:.1f} ms")
    return {"model": model_name, "size": size, "n": n, "link": asdict(link), "device": device, "steps": steps,
            "repeats": repeats, "checks": emulator_checks(rows, link)}


def emulator_errors(checks: list[dict]) -> dict:
    """{"mode[, stale channel]": (optimistic error, pessimistic error)} per row: what report.py shows."""
    return {f"{c['model']} {c['mode']}" + (", stale channel" if c["stale_channel"] else ""):
            (c["relative_error"], c["pessimistic_relative_error"]) for c in checks}


EMULATOR_COLUMNS = [("model", "model"), ("size", "px"), ("mode", "mode"), ("n", "N"), ("stale_channel", "stale comm."),
                    ("compute_ms", "free-link step ms"), ("free_link_spread", "its IQR / median"), ("projected_ms", "optimistic ms"),
                    ("emulated_ms", "emulated ms"), ("pess_ms", "pessimistic ms"),
                    ("relative_error", "optimistic error"), ("pessimistic_relative_error", "pessimistic error"),
                    ("within_bounds", "within bounds")]
# the trace-driven estimate's columns, where the rows have it (results before it do not)
EMULATOR_FIFO_COLUMNS = [("fifo_ms", "fifo (trace) ms"), ("fifo_relative_error", "fifo error"),
                         ("within_fifo", "at or below fifo"), ("fifo_all_ms", "all ranks' runs replayed ms"),
                         ("fifo_all_ranks_relative_error", "its error")]


def emulator_columns(checks: list[dict]) -> list[tuple[str, str]]:
    return EMULATOR_COLUMNS + (EMULATOR_FIFO_COLUMNS if any("projected_fifo_step_seconds" in c for c in checks)
                               else [])


def emulator_row(c: dict) -> dict:
    """One emulator check with its times in ms, as `emulator_columns` names them (here and in report.py)."""
    ms = {"compute_ms": "compute_seconds", "projected_ms": "projected_step_seconds", "emulated_ms": "emulated_seconds",
          "pess_ms": "projected_pessimistic_step_seconds", "fifo_ms": "projected_fifo_step_seconds",
          "fifo_all_ms": "fifo_all_ranks_seconds"}
    return {**c, **{k: c[v] * 1e3 if v in c else "" for k, v in ms.items()}}


def emulator_table(checks: list[dict]) -> str:
    return table([emulator_row(c) for c in checks], emulator_columns(checks))


def run_emulator_validation(args, argv) -> None:
    """`--validate-emulator`: every --models at the first --sizes, N = 2, written to
    project_emulator_<name>.json."""
    prov = provenance(argv)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))     # each emulated rank a share of the cores
    link = Link("modelled", args.emulator_link[1] * 1e6, args.emulator_link[0] * 1e-6, "given (--emulator-link)") \
        if args.emulator_link else None
    runs = [validate_emulator(m, args.sizes[0], 2, args.emulator_steps, args.device, link, args.emulator_repeats)
            for m in args.models]
    checks = [c for r in runs for c in r["checks"]]
    print(f"\nthe thread emulator over a modelled link against both bounds ({args.device})\n")
    print(emulator_table(checks))
    name = args.name or ("emulator_cpu" if args.device == "cpu" else "emulator_gpu")
    path = write_result(f"project_{name}", "project", config_of(args), checks, prov,
                        device=args.device, runs=[{k: v for k, v in r.items() if k != "checks"} for r in runs],
                        bound_slack=BOUND_SLACK,
                        # 1-minute load average before and after: steps on a busy machine are noisy
                        load_average_1min={"before": load_before, "after": os.getloadavg()[0]},
                        mean_abs_relative_error=statistics.fmean(abs(c["relative_error"]) for c in checks),
                        mean_abs_pessimistic_relative_error=statistics.fmean(abs(c["pessimistic_relative_error"])
                                                                             for c in checks),
                        # the trace-driven estimate: fifo / emulated - 1 per row (>= 0: the emulated step at or below it)
                        fifo_relative_error={f"{c['model']} {c['mode']}" + (", stale channel" if c["stale_channel"]
                                                                            else ""): c["fifo_relative_error"]
                                             for c in checks if "fifo_relative_error" in c})
    print(f"wrote {path}")


# ---- output --------------------------------------------------------------------------------------
def plot(projections: list[dict], validation: dict | None, name: str, hw: str) -> str | None:
    """The projection plot beside the result `name` (its path; None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
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
                sel = [r for r in projections if (r["model"], r["size"], r["link"], r["mode"]) == (model, size, link, mode)
                       and r["kernels"] == max(x["kernels"] for x in projections)]
                sel = sel or [r for r in projections if (r["model"], r["size"], r["link"], r["mode"]) == (model, size, link, mode)]
                if sel:
                    ns = [r["n"] for r in sel]
                    ax.plot(ns, [r["projected_speedup"] for r in sel], styles[i % 4], color=colors[link],
                            label=f"{link} {mode} (projected, optimistic; band down to pessimistic)")
                    ax.fill_between(ns, [r["projected_pessimistic_speedup"] for r in sel],
                                    [r["projected_speedup"] for r in sel], color=colors[link], alpha=0.12)
                    top = max(top, max(ns))
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
    path = save_plot(fig, name)
    plt.close(fig)
    return path


PROJECTION_COLUMNS = [("model", "model"), ("size", "px"), ("mode", "mode"), ("kernels", "kernels"),
                      ("link", "link"), ("n", "N"), ("compute_source", "compute"), ("compute_ms", "proj. compute ms"),
                      ("async_ms", "proj. async comm ms"), ("critical_ms", "proj. critical comm ms"),
                      ("step_ms", "proj. step ms"), ("projected_speedup", "optimistic"),
                      ("projected_bound", "bound"), ("pess_ms", "pess. step ms"),
                      ("projected_pessimistic_speedup", "pessimistic"),
                      ("projected_stale_channel_speedup", "pess., stale comm.")]
VALIDATION_COLUMNS = [("link", "link"), ("mode", "mode"), ("n", "N"), ("threads", "threads"),
                      ("compute_ms", "compute ms"), ("projected_ms", "projected step ms"),
                      ("real_ms", "torchrun step ms"),
                      ("relative_error", "rel. error"), ("pess_ms", "pessimistic step ms"),
                      ("pessimistic_relative_error", "pess. rel. error"), ("projected_speedup", "proj. speedup"),
                      ("measured_torchrun_speedup", "torchrun speedup")]


def link_from(d: dict) -> Link:
    """A link of a results file: the current preset of its name (presets change with this file:
    N > 8 over InfiniBand), else the fitted one as stored."""
    if d["name"] in LINKS:
        return LINKS[d["name"]]
    return Link(d["name"], d["bandwidth"], d["latency"], d.get("source", ""))


def reproject(path: str, argv=None) -> str:
    """A committed project_*.json recomputed by the current arithmetic from its own measured rows and,
    if it has one, its validation's per-rank compute rows and torchrun steps: nothing is measured
    again. Its measurements, hardware and load keep their values; the provenance is this run's."""
    prov = provenance(argv)
    data = read_result(path)
    measured_by = data.get("measured_by") or data.get("command") or (
        data["provenance"].get("command") if data["schema"] == SCHEMA else None) or \
        "python benchmarks/project.py --measure --validate"
    rows, measured_here = data["measured_rows"], data["config"].get("measure", False)
    charge = None if measured_here or data.get("compute_measured_on", "").startswith("cpu") else loopback_charge()
    links = [link_from(d) for d in data["links"]]
    data["rows"] = [r for link in links for r in project_rows(rows, link, data["config"].get("max_n", 16),
                                                            charge=charge, derive_sync=True)]
    data["links"], data["charge"] = [asdict(k) for k in links], asdict(charge) if charge else None
    v = data.get("validation")
    if v:
        fitted = [link_from(d) for d in v["links"]]
        by = {(c["mode"], c["n"]): c for c in v["checks"]}
        real_s = {k: c["measured_torchrun_seconds"] for k, c in by.items()}
        real_mean = {k: c.get("measured_torchrun_mean_seconds", c["measured_torchrun_seconds"]) for k, c in by.items()}
        serial = by[("serial", 1)]["measured_compute_seconds"]
        first = v["compute_rows"][0]
        v.update(validation_checks(first["model"], first["size"], serial, v["cores"], v["compute_rows"], real_s,
                                   real_mean, fitted))
        data["notes"] = [n for n in data.get("notes", []) if not n.startswith(("N=1:", "link ", "full N=", "partial N=",
                                                                                "sync N=", "Where the projection"))]
        data["notes"] += validation_notes(v)
    data["notes"] = data.get("notes", []) + [
        f"Recomputed by `{prov['command']}` from this file's own measured rows and torchrun steps (measured by "
        f"`{measured_by}`): projections and errors of the current arithmetic (both bounds), measurements unchanged."]
    data["provenance"], data["measured_by"] = prov, measured_by
    rewrite_result(path, data)
    plot(data["rows"], v, path, data.get("compute_measured_on", "?"))
    return path


def main(argv=None) -> None:
    p = parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scaling", help="a benchmarks/scaling.py JSON whose rows to project")
    p.add_argument("--timelines", metavar="JSON", default=None,
                   help="with --scaling: a scaling.py --timeline JSON of the same configurations, whose step "
                        "timelines join the --scaling rows they match (the rows' own compute is kept): the "
                        "trace-driven estimate without the recorder in the timed rows")
    src.add_argument("--measure", action="store_true", help="measure the rows here (CPU, as scaling.scaling_rows)")
    src.add_argument("--reproject", metavar="JSON", help="recompute a committed project_*.json from its own "
                                                          "measurements (nothing measured again)")
    src.add_argument("--validate-emulator", action="store_true",
                     help="the thread emulator over a modelled link against both bounds: sync, full, partial, with "
                          "and without the stale communicator, N = 2, each --models at the first --sizes (--device)")
    add_run(p, models=["dit-small"], sizes=[256], ranks=[1, 2, 4, 8], modes=["full", "partial"])
    add_timing(p, repeat=5, warmup=2)
    p.add_argument("--links", nargs="+", default=["nvlink4", "pcie4", "ib400"], choices=[*LINKS, *MEASURED],
                   help="presets, and/or the links fitted here (fitted anyway with --validate)")
    p.add_argument("--max-n", type=int, default=16)
    p.add_argument("--charge-from", default=None,
                   help="gpu_check JSON whose graphs section's loopback row sets the pessimistic SM/HBM charge "
                        f"(default with --scaling: {os.path.relpath(LOOPBACK_JSON)}; 'none': no charge; with "
                        "--measure (CPU rows): none)"),
    p.add_argument("--validate", action="store_true",
                   help="CPU: compare projections with the fitted links against real torchrun gloo runs "
                        "(N <= cores) of the --modes and sync, for the first model and size")
    p.add_argument("--validate-steps", type=int, default=20, help="steps of each torchrun run (2 warmup steps)")
    p.add_argument("--name", default=None, help="output name: project_<name>.json/.png (default: cpu, or the "
                                                "scaling file's suffix)")
    p.add_argument("--device", default="cpu", help="--validate-emulator: the emulated ranks' device (cuda: one GPU)")
    p.add_argument("--emulator-link", nargs=2, type=float, metavar=("LATENCY_US", "MB_PER_S"), default=None,
                   help="--validate-emulator: the modelled link (default: sized from full's free-link step)")
    p.add_argument("--emulator-steps", type=int, default=12, help="--validate-emulator: steps of each run (2 warmup)")
    p.add_argument("--emulator-repeats", type=int, default=3, help="--validate-emulator: runs of each configuration")
    args = p.parse_args(argv)
    if args.timelines and not args.scaling:
        p.error("--timelines goes with --scaling")
    if args.validate_emulator:
        run_emulator_validation(args, argv)
        return
    if args.reproject:
        print(f"wrote {reproject(args.reproject, argv)}")
        return
    prov = provenance(argv)

    load_before = os.getloadavg()
    if args.measure:
        hw = hardware()
        rows = []
        for m in args.models:
            rows += measure_rows(m, args.sizes, args.ranks, args.modes, args.repeat, timing_warmup=args.timing_warmup)
        name = args.name or "cpu"
        compute_on = hw["device"]
    else:
        data = read_result(args.scaling)
        rows, hw = data["rows"], hardware()
        compute_on = data.get("hardware", {}).get("device", "unknown hardware")
        name = args.name or os.path.splitext(os.path.basename(args.scaling))[0].removeprefix("scaling_")
        if args.timelines:
            joined = join_timelines(rows, read_result(args.timelines)["rows"])
            print(f"timelines of {args.timelines} joined to {len(joined)} rows: {', '.join(joined) or 'none'}")

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
    charge_from = args.charge_from or ("none" if args.measure else LOOPBACK_JSON)
    charge = None if charge_from == "none" else loopback_charge(charge_from)
    notes.append("Pessimistic SM/HBM charge: " + (charge.source if charge else "none (CPU rows, or --charge-from none)"))
    if any(r.get("compute_from") for r in with_sync_from_full(rows)):
        notes.append("sync rows marked compute 'full' take full's measured per-rank compute (sync does the same "
                     "work per step; only its waiting differs): sync was not measured there.")
    projections = [r for link in links for r in project_rows(rows, link, args.max_n, charge=charge, derive_sync=True)]

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
                  "step_ms": r["projected_step_seconds"] * 1e3,
                  "pess_ms": r["projected_pessimistic_step_seconds"] * 1e3} for r in projections if r["n"] in shown],
                PROJECTION_COLUMNS))
    if validation:
        print(f"\nvalidation: projected with the measured links vs real torchrun (gloo) on {hw['device']}\n")
        print(table([{**c, "compute_ms": c["measured_compute_seconds"] * 1e3,
                      "projected_ms": c["projected_step_seconds"] * 1e3,
                      "real_ms": c["measured_torchrun_seconds"] * 1e3,
                      "pess_ms": c["projected_pessimistic_step_seconds"] * 1e3} for c in validation["checks"]],
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

    path = write_result(f"project_{name}", "project", config_of(args), projections, prov, hw,   # rows: projections
        compute_measured_on=compute_on,
        # 1-minute load average before and after: timings on a machine busy with other work are not clean
        load_average_1min={"before": load_before[0], "after": load_after[0]},
        model="optimistic: step = max(compute, comm_async) + comm_critical (full/partial/none), compute + comm "
              "(sync); pessimistic: stale traffic serialised ahead of mid-step critical collectives on one "
              "communicator, else max(compute + charge, stale) + one post's tail + critical; comm = messages x "
              "latency + bytes / bandwidth, all-reduce 2(N-1) latency hops, N > 8 over ib400; see the docstring",
        # the stale communicator's rows share the rank's link with the main one (half the bandwidth for
        # critical bytes beside stale traffic); absent in projections made before that was charged
        stale_channel_link="shared",
        charge=asdict(charge) if charge else None,
        norm_stats_on_critical_path=True,
        links=[asdict(k) for k in links],
        pingpong_one_way_seconds={k: {str(b): t for b, t in v.items()} for k, v in one_way.items()},
        measured_rows=rows, validation=validation, notes=notes)
    png = plot(projections, validation, f"project_{name}", compute_on)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
