"""The emulator's transport behaves like NCCL where correctness depends on it: messages between two
ranks match in posting order whatever their kind (no tags), a mismatched pair raises, receive
buffers are poisoned until their receive completes, and a send buffer changed in flight raises."""
import threading

import pytest
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
