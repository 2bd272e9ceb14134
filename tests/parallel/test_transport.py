"""The emulator's transport behaves like NCCL where correctness depends on it: messages between two
ranks match in posting order whatever their kind (no tags), a mismatched pair raises, receive
buffers are poisoned until their receive completes, and a send buffer changed in flight raises."""
import threading

import pytest

from support import ROOT  # noqa: E402
import torch

from parafuse.parallel.transport import COLLECTIVE, ExchangeMismatch, LoopbackTransport, NullTransport, ThreadHub, \
    ThreadTransport, ring_bytes


def run_ranks(n, fn, hub=None):
    """Run fn(rank, transport) on n threads; returns per-rank results, re-raising the first error."""
    hub = hub or ThreadHub(n, timeout=5.0)
    out, errors = [None] * n, []

    def body(r):
        try:
            out[r] = fn(r, ThreadTransport(r, hub))
        except BaseException as e:      # noqa: BLE001 - re-raised below
            hub.fail(str(e))
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not str(e).startswith("emulated rank")), errors[0])
    return out


def test_messages_match_in_posting_order_whatever_the_kind():
    """Two sends of the same kind and size to one peer arrive in posting order, even if the
    receiver waits on the second receive first."""
    def fn(rank, tr):
        if rank == 0:
            tr.start([(torch.full((3,), 1.0), 1)], [], "conv_halo").wait()
            tr.start([(torch.full((3,), 2.0), 1)], [], "conv_halo").wait()
            return None
        a, b = torch.empty(3), torch.empty(3)
        pa = tr.start([], [(a, 0)], "conv_halo")
        pb = tr.start([], [(b, 0)], "conv_halo")
        pb.wait()
        pa.wait()
        return a, b
    a, b = run_ranks(2, fn)[1]
    assert torch.equal(a, torch.full((3,), 1.0)) and torch.equal(b, torch.full((3,), 2.0))


@pytest.mark.parametrize("what", ["kind", "size"])
def test_mismatched_pair_raises(what):
    def fn(rank, tr):
        if rank == 0:
            tr.start([(torch.ones(4), 1)], [], "conv_halo").wait()
        else:
            buf = torch.empty(4 if what == "kind" else 5)
            tr.start([], [(buf, 0)], "attn_kv" if what == "kind" else "conv_halo").wait()
    with pytest.raises(ExchangeMismatch, match="different orders"):
        run_ranks(2, fn)


def test_receive_buffer_is_poisoned_until_its_receive_completes():
    seen = {}

    def fn(rank, tr):
        if rank == 0:
            buf = torch.zeros(4)
            p = tr.start([], [(buf, 1)], "attn_kv")
            seen["before"] = buf.clone()
            p.wait()
            return buf
        tr.start([(torch.arange(4.0), 0)], [], "attn_kv").wait()
    got = run_ranks(2, fn)[0]
    assert torch.isnan(seen["before"]).all()
    assert torch.equal(got, torch.arange(4.0))


def test_send_buffer_changed_in_flight_raises():
    def fn(rank, tr):
        if rank == 0:
            buf = torch.ones(4)
            p = tr.start([(buf, 1)], [], "conv_halo")
            buf.add_(1)                     # the race NCCL would turn into corrupted halos
            p.wait()
        else:
            tr.start([], [(torch.empty(4), 0)], "conv_halo").wait()
    with pytest.raises(RuntimeError, match="changed a conv_halo send buffer"):
        run_ranks(2, fn)


def test_all_reduce_sums_in_rank_order_and_counts_ring_bytes():
    vals = [torch.tensor([1e8, 1.0, -3.0]), torch.tensor([1.0, 2.0, 5.0]), torch.tensor([-1e8, 0.5, 7.0])]

    def fn(rank, tr):
        t = vals[rank].clone()
        tr.all_reduce(t, "norm_stats").wait()
        return t, dict(tr.bytes_sent["norm_stats"])
    out = run_ranks(3, fn)
    want = (vals[0] + vals[1]) + vals[2]
    for t, sent in out:
        assert torch.equal(t, want)                      # the same bits on every rank
        assert sent == {COLLECTIVE: ring_bytes(12, 3)} and ring_bytes(12, 3) == 16


def test_null_transport_counts_and_moves_nothing():
    tr = NullTransport(1, 3)
    buf = torch.full((2, 5), 7.0)
    tr.start([(torch.ones(3), 0)], [(buf, 2)], "attn_kv").wait()
    tr.all_reduce(buf, "norm_stats").wait()
    assert torch.equal(buf, torch.full((2, 5), 7.0))
    assert tr.bytes_sent["attn_kv"] == {0: 12} and tr.bytes_received["attn_kv"] == {2: 40}
    assert tr.bytes_sent["norm_stats"] == {COLLECTIVE: ring_bytes(40, 3)}
    assert dict(tr.messages_sent) == {"attn_kv": 1, "norm_stats": 1}


def test_loopback_transport_moves_bytes_through_mailboxes_and_counts_them():
    tr = LoopbackTransport(1, 3)
    sent = torch.arange(6.0).view(2, 3)
    recv = torch.full((2, 3), 7.0)
    tr.start([(sent, 0)], [(recv, 2)], "attn_kv").wait()
    assert torch.equal(recv, sent)                 # the mailbox of its size holds this rank's last send
    other = torch.full((5,), 3.0)
    tr.start([], [(other, 0)], "conv_halo").wait()
    assert torch.equal(other, torch.zeros(5))      # nothing of that size sent yet
    stats = torch.tensor([1.0, 2.0])
    tr.all_reduce(stats, "norm_stats").wait()
    assert torch.equal(stats, torch.tensor([1.0, 2.0]))
    assert tr.bytes_sent["attn_kv"] == {0: 24} and tr.bytes_received["attn_kv"] == {2: 24}
    assert dict(tr.messages_sent) == {"attn_kv": 1, "norm_stats": 1}


def test_a_strip_step_runs_over_the_loopback_transport():
    from parafuse.models import load_model
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.runtime import ParallelConfig, Request, Runtime

    rt = Runtime(load_model("unet-small"), ParallelConfig("full", 1), layout=ParallelLayout(1, 3),
                 transport=LoopbackTransport(1, 3))
    out = rt.rank_step(Request(96, 64, 3, "ddim", label=1))()
    assert torch.isfinite(out).all() and rt.transport.bytes_sent["attn_kv"]


class RecordedOrder:
    """Stands in for CUDA events: `mark` hands out a token naming the message and the thread that
    produced it; `wait` records which thread waited on which token for which tensor."""

    def __init__(self):
        self.marks, self.waits = [], []

    def mark(self, t):
        token = (threading.current_thread().name, t.data_ptr())
        self.marks.append(token)
        return token

    def wait(self, token, used):
        self.waits.append((threading.current_thread().name, token, used.data_ptr()))


def test_each_copy_out_of_a_mailbox_waits_for_the_work_that_filled_it():
    """On one GPU the ranks are threads on their own streams: a receive (and an all-reduce) may
    only copy a message after the sender's stream produced it, and must do so on the receiver's."""
    order = RecordedOrder()
    hub = ThreadHub(3, timeout=5.0, order=order)

    def fn(rank, tr):
        threading.current_thread().name = f"rank-{rank}"
        got = torch.empty(2)
        tr.start([(torch.full((2,), float(rank)), (rank + 1) % 3)], [(got, (rank - 1) % 3)], "conv_halo").wait()
        stats = torch.full((3,), float(rank))
        tr.all_reduce(stats, "norm_stats").wait()
        return got, stats
    out = run_ranks(3, fn, hub)
    for rank, (got, stats) in enumerate(out):
        assert torch.equal(got, torch.full((2,), float((rank - 1) % 3)))
        assert torch.equal(stats, torch.full((3,), 3.0))
    assert len(order.marks) == 6          # 3 messages + 3 contributions, each marked by its producer
    # each rank waited on the one message sent to it (by its left neighbour) and on all 3 contributions
    for rank in range(3):
        waited = [(token, ptr) for thread, token, ptr in order.waits if thread == f"rank-{rank}"]
        assert len(waited) == 4
        producers = sorted(token[0] for token, _ in waited)
        assert producers == sorted([f"rank-{(rank - 1) % 3}", "rank-0", "rank-1", "rank-2"])
        assert all(token[1] == ptr for token, ptr in waited)   # the token is the message's own


def test_emulated_ranks_cannot_be_graph_captured():
    from parafuse.models import load_model
    from parafuse.parallel.distributed import ParallelLayout
    from parafuse.runtime import ParallelConfig, RequestError, Runtime

    with pytest.raises(RequestError, match="cannot capture emulated ranks"):
        Runtime(load_model("unet-small"), ParallelConfig("full", 1), layout=ParallelLayout(0, 2),
                transport=ThreadTransport(0, ThreadHub(2)), cuda_graphs=True)


# ---- the opt-in stale channel (a second communicator for stale traffic) ---------------------------
def channel_run(n, fn, stale_channel, hub=None):
    """run_ranks with transports that have (or not) the stale channel."""
    hub = hub or ThreadHub(n, timeout=5.0)
    return run_ranks(n, lambda r, _: fn(r, ThreadTransport(r, hub, stale_channel=stale_channel)), hub)


def test_stale_channel_is_off_by_default_and_routes_by_kind():
    from parafuse.parallel.transport import MAIN, STALE

    assert NullTransport(0, 2).channel("attn_kv") == MAIN
    t = NullTransport(0, 2, stale_channel=True)
    assert [t.channel(k) for k in ("attn_kv", "conv_halo", "latent_halo", "norm_stats", "text_attn")] == \
        [STALE, STALE, MAIN, MAIN, MAIN]
    assert NullTransport(0, 2, stale_channel=True, stale_kinds=("attn_kv", "text_attn")).channel("text_attn") == STALE
    with pytest.raises(ValueError, match="not message kinds"):
        NullTransport(0, 2, stale_channel=True, stale_kinds=("kv",))


def test_stale_and_main_messages_match_within_their_channel():
    """Posted in one global order, a stale and a main message between two ranks arrive intact, and
    each is counted as before."""
    def fn(rank, tr):
        if rank == 0:
            tr.start([(torch.full((3,), 1.0), 1)], [], "attn_kv").wait()
            tr.start([(torch.full((2,), 2.0), 1)], [], "latent_halo").wait()
            return dict(tr.messages_sent), tr.totals()[0]
        kv, halo = torch.empty(3), torch.empty(2)
        pk = tr.start([], [(kv, 0)], "attn_kv")
        ph = tr.start([], [(halo, 0)], "latent_halo")
        ph.wait()
        pk.wait()
        return kv, halo
    (msgs, sent), (kv, halo) = channel_run(2, fn, True)
    assert torch.equal(kv, torch.full((3,), 1.0)) and torch.equal(halo, torch.full((2,), 2.0))
    assert msgs == {"attn_kv": 1, "latent_halo": 1} and sent == {"attn_kv": 12, "latent_halo": 8}


@pytest.mark.parametrize("second", ["p2p", "all_reduce"])
def test_channels_posted_in_different_orders_raise(second):
    """Rank 0 posts a stale K/V send, then a main-channel operation; rank 1 posts the main one first:
    on NCCL two communicators posted in different orders may deadlock, so the emulator refuses it."""
    def main_op(rank, tr):
        if second == "all_reduce":
            return tr.all_reduce(torch.ones(2), "norm_stats")
        return tr.start([(torch.ones(2), 1)], [], "latent_halo") if rank == 0 else \
            tr.start([], [(torch.empty(2), 0)], "latent_halo")

    def stale_op(rank, tr):
        return tr.start([(torch.ones(3), 1)], [], "attn_kv") if rank == 0 else tr.start([], [(torch.empty(3), 0)], "attn_kv")

    def fn(rank, tr):
        ops = [stale_op(rank, tr), main_op(rank, tr)] if rank == 0 else [main_op(rank, tr), stale_op(rank, tr)]
        for op in ops:
            op.wait()
    with pytest.raises(ExchangeMismatch, match="different orders"):
        channel_run(2, fn, True)

    def same_order(rank, tr):
        for op in (stale_op(rank, tr), main_op(rank, tr)):
            op.wait()
    channel_run(2, same_order, True)        # one global order: accepted


def test_a_modelled_link_queues_the_all_reduce_behind_stale_traffic_on_one_communicator_only():
    """One FIFO per communicator: a small all-reduce posted after a large stale send finishes after
    it on one communicator, and long before it when the stale send has its own (modelled times)."""
    latency, bandwidth, big = 1e-3, 1e6, 50_000        # the stale send alone: 1 ms + 50 ms

    def fn(rank, tr):
        peer = 1 - rank
        kv = tr.start([(torch.ones(big // 4), peer)], [(torch.empty(big // 4), peer)], "attn_kv")
        tr.all_reduce(torch.ones(2), "norm_stats").wait()
        kv.wait()

    finish = {}
    for stale_channel in (False, True):
        hub = ThreadHub(2, timeout=5.0, link=(latency, bandwidth))
        channel_run(2, fn, stale_channel, hub)
        times = {(r, kind): f for r, _, kind, f in hub.finish_times}
        finish[stale_channel] = {r: times[(r, "norm_stats")] - times[(r, "attn_kv")] for r in (0, 1)}
    for r in (0, 1):
        # queued: the all-reduce (2 latencies + 8 ring bytes) starts when the K/V has finished
        assert finish[False][r] == pytest.approx(2 * latency + 8 / bandwidth, rel=1e-6)
        # its own channel: it finishes ~49 ms before the K/V does
        assert finish[True][r] < -0.04


def test_a_modelled_link_delays_the_receiver_and_the_all_reduce_to_the_senders_finish():
    """A receive completes no sooner than its sender's modelled send finished, even where the
    receiver sends nothing itself; an all-reduce no sooner than the last rank's part of it (rank 0
    posts its part late: a rank's own post time is not when the sum exists)."""
    import time

    hub = ThreadHub(2, timeout=5.0, link=(1e-3, 1e6))
    done = {}

    def fn(rank, tr):
        if rank == 0:
            tr.start([(torch.ones(5000), 1)], [], "attn_kv").wait()           # 20 kB: 21 ms
            time.sleep(0.01)
        else:
            tr.start([], [(torch.empty(5000), 0)], "attn_kv").wait()
            done["recv"] = time.perf_counter()
        tr.all_reduce(torch.ones(2), "norm_stats").wait()
        done[("reduce", rank)] = time.perf_counter()

    run_ranks(2, fn, hub)
    finish = {(r, kind): f for r, _, kind, f in hub.finish_times}
    assert (1, "attn_kv") not in finish                   # rank 1 sent nothing: its own FIFO is idle
    assert done["recv"] >= finish[(0, "attn_kv")]
    assert done[("reduce", 1)] >= finish[(0, "norm_stats")] > finish[(1, "norm_stats")]


@pytest.mark.parametrize("model", ["unet-small", "dit-small"])
def test_the_stale_channel_changes_neither_results_nor_bytes(model):
    """The engine over transports with the stale channel (halos and K/V routed to it): the same
    latents bit for bit and the same bytes per kind as over one communicator, the posting order
    checked at every operation."""
    from parafuse.models import load_model
    from parafuse.runtime import ParallelConfig, Request, emulate

    req = Request(64, 48, 3, "ddim", 1.0, seed=7, label=3)
    runs = {}
    for stale_channel in (False, True):       # PatchConfig(stale_channel=...) reaches the emulated transports
        rts, res = emulate(load_model(model), 3, ParallelConfig("full", 1, stale_channel=stale_channel), req)
        runs[stale_channel] = (res[0][0].latent, [rt.transport.totals() for rt in rts])      # rank 0 holds the image
        assert all(rt.transport.stale_channel is stale_channel for rt in rts)
    assert torch.equal(runs[False][0], runs[True][0])
    assert runs[False][1] == runs[True][1] and any(s.get("attn_kv") for s, _ in runs[True][1])


STALE_CHANNEL_WORKER = r"""
import sys
import torch, torch.distributed as dist
from parafuse.parallel.transport import TorchTransport
dist.init_process_group("gloo")
rank = dist.get_rank()
tr = TorchTransport(rank, 2, [[0, 1]], stale_channel=True)
peer = 1 - rank
kv_in, halo_in = torch.empty(5), torch.empty(3)
kv = tr.start([(torch.full((5,), float(rank + 1)), peer)], [(kv_in, peer)], "attn_kv")          # stale channel
halo = tr.start([(torch.full((3,), 10.0 * (rank + 1)), peer)], [(halo_in, peer)], "latent_halo")   # main
s = torch.full((2,), float(rank + 1))
tr.all_reduce(s, "norm_stats").wait()
halo.wait()
kv.wait()
assert torch.equal(kv_in, torch.full((5,), float(peer + 1))), kv_in
assert torch.equal(halo_in, torch.full((3,), 10.0 * (peer + 1))), halo_in
assert torch.equal(s, torch.full((2,), 3.0)), s
sys.stdout.write(f"ok {rank}\n"); sys.stdout.flush()   # one write: the ranks share the pipe
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.torchrun
def test_torch_transport_stale_channel_over_gloo(tmp_path):
    """torchrun, 2 ranks over gloo: a K/V exchange on the second process group, a halo and an
    all-reduce on the main one, all delivered."""
    from support import launch

    script = tmp_path / "worker.py"
    script.write_text(STALE_CHANNEL_WORKER)
    proc = launch.run(2, str(script), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ok 0" in proc.stdout and "ok 1" in proc.stdout
