"""Moving tensors between ranks, and counting every byte that moves.

Two primitives:
- `start(sends, recvs, kind)`: post point-to-point sends and receives as one batch;
- `all_reduce(t, kind)`: sum `t` in place over the patch group (GroupNorm statistics);
both return a handle whose `wait()` completes them. All byte accounting happens here, per layer
kind and per peer, so `sent(i->j) == received(j<-i)` can be checked. An all-reduce is counted
under the peer `COLLECTIVE` with the volume a ring all-reduce moves: 2(n-1)/n of the tensor,
sent and received by every rank.

Messages carry no tag: NCCL ignores point-to-point tags and matches the operations between two
ranks in the order they were posted, so every rank must post its exchanges in the same order.

`TorchTransport` posts through torch.distributed (NCCL on GPUs, gloo on CPU). `ThreadTransport`
connects N threads of one process and behaves like NCCL where it matters for correctness (see
`ThreadHub`): the single-process emulator runs the same exchange logic over it, on CPU or with N
ranks on one GPU (each thread on its own stream, messages ordered by CUDA events: `StreamOrder`). `NullTransport`
counts bytes and moves nothing: one process measures one rank's compute with it.
`LoopbackTransport` measures one rank with its communication work: copies on a side stream.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict

import torch

KINDS = ("latent_halo", "conv_halo", "attn_kv", "norm_stats", "cfg", "gather", "reduce", "control", "text_attn",
         "stage")
COLLECTIVE = -1      # the peer key under which all-reduce bytes are counted


class ExchangeMismatch(RuntimeError):
    """Two ranks posted operations that do not pair up (another kind or size): on NCCL this would
    hang or silently deliver the wrong bytes."""


class Pending:
    """Handle of posted operations; `wait()` is idempotent. Holds the tensors in flight, so that
    a temporary send buffer cannot be freed (and its memory reused) before the send completes."""

    def __init__(self, waits=(), tensors=()):
        self._waits = list(waits)
        self._tensors = list(tensors)

    def wait(self) -> None:
        waits, self._waits = self._waits, []
        for w in waits:
            w()
        self._tensors = []

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self._tensors


def ring_bytes(nbytes: int, n: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of `nbytes` over `n` ranks."""
    return math.ceil(2 * (n - 1) * nbytes / n)


class Transport:
    def __init__(self, rank: int, world_size: int, group: list[int] | None = None):
        self.rank = rank
        self.world_size = world_size
        self.group = list(group) if group is not None else list(range(world_size))   # the patch group
        self.bytes_sent: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.bytes_received: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.messages_sent: dict[str, int] = defaultdict(int)      # sends and all-reduces, per kind

    def start(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
              kind: str) -> Pending:
        """Post `sends` (tensor, peer) and `recvs` (buffer to fill, peer); peers are global ranks."""
        assert kind in KINDS, kind
        for t, peer in sends:
            self.bytes_sent[kind][peer] += t.numel() * t.element_size()
            self.messages_sent[kind] += 1
        for t, peer in recvs:
            self.bytes_received[kind][peer] += t.numel() * t.element_size()
        if not sends and not recvs:
            return Pending()
        return self._post(sends, recvs, kind)

    def all_reduce(self, t: torch.Tensor, kind: str) -> Pending:
        """Sum `t` in place over the patch group; every rank gets the same bits."""
        assert kind in KINDS, kind
        if len(self.group) == 1:
            return Pending()
        nbytes = ring_bytes(t.numel() * t.element_size(), len(self.group))
        self.bytes_sent[kind][COLLECTIVE] += nbytes
        self.bytes_received[kind][COLLECTIVE] += nbytes
        self.messages_sent[kind] += 1
        return self._all_reduce(t, kind)

    def agree(self, t: torch.Tensor) -> Pending:
        """Sum `t` in place over every rank of the job (both CFG branches, not only the patch
        group): the small health exchange that makes all ranks stop together (`parafuse.health`).
        Counted under the kind `control`, like an all-reduce."""
        if self.world_size == 1:
            return Pending()
        nbytes = ring_bytes(t.numel() * t.element_size(), self.world_size)
        self.bytes_sent["control"][COLLECTIVE] += nbytes
        self.bytes_received["control"][COLLECTIVE] += nbytes
        self.messages_sent["control"] += 1
        return self._agree(t)

    def _post(self, sends, recvs, kind) -> Pending:
        raise NotImplementedError

    def _all_reduce(self, t, kind) -> Pending:
        raise NotImplementedError

    def _agree(self, t) -> Pending:
        return Pending()      # transports without peers (Null, Loopback): this rank's values

    def reset_counts(self) -> None:
        self.bytes_sent.clear()
        self.bytes_received.clear()
        self.messages_sent.clear()

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Bytes sent and received per kind, summed over peers."""
        return ({k: sum(v.values()) for k, v in self.bytes_sent.items()},
                {k: sum(v.values()) for k, v in self.bytes_received.items()})


def sum_in_rank_order(parts) -> torch.Tensor:
    """parts[0] + parts[1] + ..., left to right: the same bits wherever it is computed."""
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


class TorchTransport(Transport):
    """torch.distributed: point-to-point on the world group, all-reduce on the patch group.

    On gloo (CPU) the all-reduce is made of point-to-point sends to every peer and a sum in rank
    order: gloo runs its collectives on worker threads that can still hold the last reference to
    a finished collective's tensors when the main thread reaches interpreter shutdown, which aborts
    the process (seen here as an occasional SIGABRT at exit); its point-to-point operations do not.
    The bytes are counted as the all-reduce they stand for."""

    def __init__(self, rank: int, world_size: int, groups: list[list[int]]):
        import torch.distributed as dist

        mine = next(g for g in groups if rank in g)
        super().__init__(rank, world_size, mine)
        self._group = None
        for g in groups:                 # every rank creates every group, in the same order
            pg = dist.new_group(g) if len(groups) > 1 else dist.group.WORLD
            if g is mine:
                self._group = pg
        self._p2p_all_reduce = dist.get_backend() == "gloo"

    def _post(self, sends, recvs, kind) -> Pending:
        import torch.distributed as dist

        ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
        works = dist.batch_isend_irecv(ops)
        return Pending([w.wait for w in works], [t for t, _ in sends + recvs])

    def _all_reduce(self, t, kind) -> Pending:
        import torch.distributed as dist

        if not self._p2p_all_reduce:
            work = dist.all_reduce(t, group=self._group, async_op=True)
            return Pending([work.wait], [t])
        return self._p2p_sum(t, self.group)

    def _agree(self, t) -> Pending:
        import torch.distributed as dist

        if not self._p2p_all_reduce:
            work = dist.all_reduce(t, async_op=True)
            return Pending([work.wait], [t])
        return self._p2p_sum(t, list(range(self.world_size)))

    def _p2p_sum(self, t, group: list[int]) -> Pending:
        import torch.distributed as dist

        parts = [t if r == self.rank else torch.empty_like(t) for r in group]
        peers = [r for r in group if r != self.rank]
        ops = [dist.P2POp(dist.isend, t, r) for r in peers]
        ops += [dist.P2POp(dist.irecv, parts[group.index(r)], r) for r in peers]
        works = dist.batch_isend_irecv(ops)
        # the sum overwrites t only once every send of it has completed
        return Pending([w.wait for w in works] + [lambda: t.copy_(sum_in_rank_order(parts))], [t] + parts)

    def close(self) -> None:
        self._group = None


class NullTransport(Transport):
    """Counts every byte that would move and moves nothing: receive buffers keep what they hold and
    an all-reduce leaves the local values. One process then runs exactly one rank's compute."""

    def _post(self, sends, recvs, kind) -> Pending:
        return Pending()

    def _all_reduce(self, t, kind) -> Pending:
        return Pending()


class LoopbackTransport(Transport):
    """One rank's exchanges on one device, without its peers: every send is a copy into a mailbox
    and every receive a copy out of one, on a side stream ordered as NCCL orders its work (after
    the work that produced the data; before the work that reads it, through `wait`). Counts like
    the others. Unlike the NullTransport it moves the bytes, so a measured step - and its CUDA
    graph - contains the communication work, and its overlap with compute shows in a profile.

    What a receive delivers is a mailbox of its size, holding this rank's last send of that size
    (zeros before any): for timing and graph checks, not for images. An all-reduce copies the
    tensor out and back (about a ring all-reduce's volume) and leaves its values."""

    def __init__(self, rank: int, world_size: int, group: list[int] | None = None):
        super().__init__(rank, world_size, group)
        self._mailboxes: dict[tuple, torch.Tensor] = {}
        self._streams: dict[torch.device, object] = {}

    def _mailbox(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.device, t.dtype, t.numel())
        if key not in self._mailboxes:
            self._mailboxes[key] = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        return self._mailboxes[key].view(t.shape)

    def _copies(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Pending:
        """`dst.copy_(src)` for each pair: on CUDA on the side stream, after the current stream's
        work; waiting makes the current stream wait for them."""
        device = pairs[0][0].device
        if device.type != "cuda":
            for dst, src in pairs:
                dst.copy_(src)
            return Pending()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src)
        for dst, src in pairs:         # the allocator must not reuse them before the side stream is done
            dst.record_stream(stream)
            src.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
        return Pending([lambda: current.wait_event(done)], [t for pair in pairs for t in pair])

    def _post(self, sends, recvs, kind) -> Pending:
        pairs = [(self._mailbox(t), t) for t, _ in sends] + [(b, self._mailbox(b)) for b, _ in recvs]
        return self._copies(pairs)

    def _all_reduce(self, t, kind) -> Pending:
        box = self._mailbox(t)
        return self._copies([(box, t), (t, box)])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class StreamOrder:
    """The stream dependencies NCCL imposes, for ranks that are threads of one process on one GPU,
    each issuing its work on its own current stream:

    - a message is ready once the sender's stream has produced it: `mark` records an event there
      when the send is posted;
    - the receiver's copy runs on the receiver's stream after that event: `wait` makes the
      receiver's current stream wait for it, and tells the caching allocator that the message is
      also used on the receiver's stream (so its memory is not reused before the copy ran).

    On CPU tensors both are no-ops: work is synchronous."""

    def mark(self, t: torch.Tensor):
        if t.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(t.device))
        return event

    def wait(self, token, used: torch.Tensor) -> None:
        if token is None:
            return
        stream = torch.cuda.current_stream(used.device)
        stream.wait_event(token)
        used.record_stream(stream)


class ThreadHub:
    """Mailboxes between the N threads of the emulator, with NCCL's rules made strict.

    - Matching: the operations between a (source, destination) pair are matched in the order they
      were posted, whatever their kind (NCCL has no tags). A pair whose kinds or sizes differ raises
      `ExchangeMismatch` instead of delivering the wrong bytes.
    - Send buffers are read when the send is posted; if a send buffer has changed by the time its
      send is waited on (a race NCCL would expose), the sender raises.
    - Receive buffers are filled with NaN when posted (strict), so code that reads a buffer before
      its receive completes produces NaN instead of silently reading stale data.
    - All-reduces of a group are matched in posting order and summed in rank order, so every rank
      gets the same bits.
    - On one GPU, each copy out of a mailbox is ordered after the work that filled it (`order`).
    """

    def __init__(self, world_size: int, timeout: float = 300.0, strict: bool = True,
                 order: StreamOrder | None = None):
        self.world_size = world_size
        self.timeout = timeout
        self.strict = strict
        self.order = order or StreamOrder()
        self.failed: str | None = None
        self._messages: dict[tuple[int, int, int], tuple[str, torch.Tensor, object]] = {}
        self._sent: dict[tuple[int, int], int] = defaultdict(int)
        self._posted: dict[tuple[int, int], int] = defaultdict(int)
        self._reduce_posted: dict[tuple[tuple[int, ...], int], int] = defaultdict(int)
        self._reductions: dict[tuple[tuple[int, ...], int], dict[int, tuple[str, torch.Tensor, object]]] = {}
        self._reduce_taken: dict[tuple[tuple[int, ...], int], int] = defaultdict(int)
        self._cond = threading.Condition()

    def _wait_for(self, ready, dst: int, what: str):
        waited = 0.0
        while not ready():
            if self.failed:
                raise RuntimeError(f"emulated rank {dst} stopped: {self.failed}")
            if waited > self.timeout:
                raise RuntimeError(f"emulated rank {dst} waited {waited:.0f} s for {what}: "
                                   f"a rank is stuck or exchanges are mismatched")
            self._cond.wait(timeout=0.5)
            waited += 0.5

    # ---- point to point ------------------------------------------------------------------
    def put(self, src: int, dst: int, kind: str, t: torch.Tensor) -> None:
        """`t` is the message itself (the sender's copy), produced on the caller's stream."""
        ready = self.order.mark(t)
        with self._cond:
            seq = self._sent[(src, dst)]
            self._sent[(src, dst)] += 1
            self._messages[(src, dst, seq)] = (kind, t, ready)
            self._cond.notify_all()

    def post_recv(self, src: int, dst: int) -> int:
        with self._cond:
            seq = self._posted[(src, dst)]
            self._posted[(src, dst)] += 1
            return seq

    def take(self, src: int, dst: int, seq: int, kind: str, buf: torch.Tensor) -> None:
        key = (src, dst, seq)
        with self._cond:
            self._wait_for(lambda: key in self._messages, dst, f"message {seq} from rank {src}")
            got_kind, t, ready = self._messages.pop(key)
        if got_kind != kind or t.numel() * t.element_size() != buf.numel() * buf.element_size():
            raise ExchangeMismatch(
                f"rank {dst}'s receive #{seq} from rank {src} expects {kind} of {buf.numel() * buf.element_size()} "
                f"bytes, but rank {src}'s send #{seq} to it is {got_kind} of {t.numel() * t.element_size()} bytes: "
                f"the two ranks posted their exchanges in different orders")
        self.order.wait(ready, t)
        buf.copy_(t.view(buf.shape))

    # ---- all-reduce ----------------------------------------------------------------------
    def contribute(self, group: tuple[int, ...], rank: int, kind: str, t: torch.Tensor) -> int:
        ready = self.order.mark(t)
        with self._cond:
            seq = self._reduce_posted[(group, rank)]
            self._reduce_posted[(group, rank)] += 1
            self._reductions.setdefault((group, seq), {})[rank] = (kind, t, ready)
            self._cond.notify_all()
            return seq

    def reduced(self, group: tuple[int, ...], rank: int, seq: int, out: torch.Tensor) -> None:
        key = (group, seq)
        with self._cond:
            self._wait_for(lambda: len(self._reductions.get(key, {})) == len(group), rank,
                           f"all-reduce #{seq} of group {list(group)}")
            parts = self._reductions[key]
            self._reduce_taken[key] += 1
            if self._reduce_taken[key] == len(group):
                del self._reductions[key], self._reduce_taken[key]
        mine_kind, mine, _ = parts[rank]
        for r, (kind, t, ready) in parts.items():
            if kind != mine_kind or t.shape != mine.shape:
                raise ExchangeMismatch(
                    f"all-reduce #{seq} of group {list(group)}: rank {rank} posted {mine_kind} {tuple(mine.shape)}, "
                    f"rank {r} posted {kind} {tuple(t.shape)}: the ranks posted their collectives in different orders")
            self.order.wait(ready, t)
        out.copy_(sum_in_rank_order([parts[r][1] for r in group]))

    def fail(self, message: str) -> None:
        with self._cond:
            self.failed = self.failed or message
            self._cond.notify_all()


class ThreadTransport(Transport):
    def __init__(self, rank: int, hub: ThreadHub, group: list[int] | None = None):
        super().__init__(rank, hub.world_size, group)
        self.hub = hub

    def _post(self, sends, recvs, kind) -> Pending:
        waits = []
        for t, peer in sends:
            # the bytes are taken now (a real send reads its buffer while in flight); strict mode
            # checks at the wait that the buffer was left alone meanwhile
            sent = t.detach().clone()
            self.hub.put(self.rank, peer, kind, sent)
            if self.hub.strict:
                waits.append(lambda t=t, sent=sent, peer=peer: self._check_unchanged(t, sent, peer, kind))
        for buf, peer in recvs:
            seq = self.hub.post_recv(peer, self.rank)
            if self.hub.strict:
                # bytes of all ones: a float NaN, and NaN scales in a K/V codec's byte payload
                buf.fill_(float("nan")) if buf.is_floating_point() else buf.fill_(-1 if buf.is_signed() else 255)
            waits.append(lambda buf=buf, peer=peer, seq=seq: self.hub.take(peer, self.rank, seq, kind, buf))
        return Pending(waits, [t for t, _ in sends + recvs])

    def _check_unchanged(self, t: torch.Tensor, sent: torch.Tensor, peer: int, kind: str) -> None:
        if not torch.equal(_bits(t), _bits(sent)):
            raise RuntimeError(f"rank {self.rank} changed a {kind} send buffer (to rank {peer}) before the send "
                               f"completed: on NCCL the peer would receive partly overwritten data")

    def _agree(self, t) -> Pending:
        return self._reduce_over(t, tuple(range(self.world_size)), "control")

    def _all_reduce(self, t, kind) -> Pending:
        return self._reduce_over(t, tuple(self.group), kind)

    def _reduce_over(self, t, group: tuple[int, ...], kind: str) -> Pending:
        seq = self.hub.contribute(group, self.rank, kind, t.detach().clone())
        if self.hub.strict and t.is_floating_point():
            t.fill_(float("nan"))
        return Pending([lambda: self.hub.reduced(group, self.rank, seq, t)], [t])
