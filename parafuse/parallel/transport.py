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

The stale channel (opt-in, `stale_channel=True` on a transport; off by default): point-to-point
messages of the kinds in `stale_kinds` (default `STALE_CHANNEL_KINDS`: K/V and conv halos, whose
stale sends nothing waits for) go to a second communicator, so that the exact all-reduces and fresh
exchanges of the main one need not queue behind them (NCCL runs a communicator's work in post
order on one stream). Routing is by kind, inside the transport: the engine's call sites do not
change, nor do the byte counts. All-reduces stay on the main communicator. The stale text merge
shares its kind, text_attn, with the exact merge's waited-for exchanges: add it to `stale_kinds`
only where the text merge is stale. NCCL lets two communicators run concurrently only when every
rank posts to them in one global order; the thread emulator asserts that order (`ThreadHub`), no
multi-GPU machine has proven it: hence off by default.

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
import time
from collections import defaultdict

import torch

KINDS = ("latent_halo", "conv_halo", "attn_kv", "norm_stats", "cfg", "gather", "reduce", "control", "text_attn",
         "stage")
COLLECTIVE = -1      # the peer key under which all-reduce bytes are counted
STALE_CHANNEL_KINDS = ("attn_kv", "conv_halo")     # what the opt-in stale channel carries by default
MAIN, STALE = "main", "stale"                       # the channels (communicators)


def channel_of(kind: str, stale_channel: bool, stale_kinds: tuple[str, ...] = STALE_CHANNEL_KINDS) -> str:
    """The communicator a point-to-point message of `kind` goes to (all-reduces: always MAIN)."""
    return STALE if stale_channel and kind in stale_kinds else MAIN


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
    # whether the peers are real ranks that answer (torch.distributed, emulated threads), or stand-ins
    # of one rank's measurement (Null, Loopback): what a comparison across ranks can rely on
    reaches_peers = True
    # whether the ranks are threads of one process (the emulator): one global RNG, one set of modules
    ranks_share_process = False

    def __init__(self, rank: int, world_size: int, group: list[int] | None = None, stale_channel: bool = False,
                 stale_kinds: tuple[str, ...] = STALE_CHANNEL_KINDS):
        self.rank = rank
        self.world_size = world_size
        self.group = list(group) if group is not None else list(range(world_size))   # the patch group
        unknown = set(stale_kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"stale_kinds {sorted(unknown)} are not message kinds: choose from {KINDS}")
        self.stale_channel = stale_channel
        self.stale_kinds = tuple(stale_kinds)
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

    def channel(self, kind: str) -> str:
        """The communicator a point-to-point message of `kind` goes to (all-reduces: always MAIN)."""
        return channel_of(kind, self.stale_channel, self.stale_kinds)

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

    def __init__(self, rank: int, world_size: int, groups: list[list[int]], stale_channel: bool = False,
                 stale_kinds: tuple[str, ...] = STALE_CHANNEL_KINDS):
        import torch.distributed as dist

        mine = next(g for g in groups if rank in g)
        super().__init__(rank, world_size, mine, stale_channel, stale_kinds)
        self._group = None
        for g in groups:                 # every rank creates every group, in the same order
            pg = dist.new_group(g) if len(groups) > 1 else dist.group.WORLD
            if g is mine:
                self._group = pg
        # the stale channel: a second communicator over every rank (point-to-point peers are global
        # ranks), created after the patch groups by every rank alike
        self._stale_group = dist.new_group(list(range(world_size))) if stale_channel else None
        self._p2p_all_reduce = dist.get_backend() == "gloo"

    def _post(self, sends, recvs, kind) -> Pending:
        import torch.distributed as dist

        group = self._stale_group if self.channel(kind) == STALE else None
        ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs]
        works = dist.batch_isend_irecv(ops)
        return Pending([w.wait for w in works], [t for t, _ in sends + recvs])

    def _all_reduce(self, t, kind) -> Pending:
        if not self._p2p_all_reduce:
            return self._device_sum(t, self._group)
        return self._p2p_sum(t, self.group)

    def _agree(self, t) -> Pending:
        if not self._p2p_all_reduce:
            return self._device_sum(t, None)
        return self._p2p_sum(t, list(range(self.world_size)))

    def _device_sum(self, t, group) -> Pending:
        """dist.all_reduce on NCCL, which reduces device memory only: a host tensor (the agreement's
        digests, the seed and RNG states a pipeline call shares) is summed through a copy on this
        process's GPU and copied back at the wait."""
        import torch.distributed as dist

        on_device = t if t.is_cuda else t.to(torch.device("cuda", torch.cuda.current_device()))
        work = dist.all_reduce(on_device, group=group, async_op=True)
        if on_device is t:
            return Pending([work.wait], [t])
        return Pending([work.wait, lambda: t.copy_(on_device)], [t, on_device])

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
        self._group = self._stale_group = None


class NullTransport(Transport):
    """Counts every byte that would move and moves nothing: receive buffers keep what they hold and
    an all-reduce leaves the local values. One process then runs exactly one rank's compute."""

    reaches_peers = False

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

    reaches_peers = False

    def __init__(self, rank: int, world_size: int, group: list[int] | None = None, **channels):
        super().__init__(rank, world_size, group, **channels)
        self._mailboxes: dict[tuple, torch.Tensor] = {}
        self._streams: dict[tuple, object] = {}       # (device, channel): one side stream per communicator

    def _mailbox(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.device, t.dtype, t.numel())
        if key not in self._mailboxes:
            self._mailboxes[key] = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        return self._mailboxes[key].view(t.shape)

    def _copies(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], channel: str = MAIN) -> Pending:
        """`dst.copy_(src)` for each pair: on CUDA on the channel's side stream, after the current
        stream's work; waiting makes the current stream wait for them."""
        device = pairs[0][0].device
        if device.type != "cuda":
            for dst, src in pairs:
                dst.copy_(src)
            return Pending()
        stream = self._streams.get((device, channel))
        if stream is None:
            stream = self._streams[(device, channel)] = torch.cuda.Stream(device)
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
        return self._copies(pairs, self.channel(kind))

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


def sleep_until(finish: float | None) -> None:
    """Return no sooner than `finish` (time.perf_counter), a modelled link's finish time."""
    if finish is not None:
        time.sleep(max(0.0, finish - time.perf_counter()))


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
    - Communicators (`channel`: MAIN, and STALE where a transport has the opt-in stale channel):
      point-to-point operations match within their channel. Every rank must post to the channels
      in one global order (NCCL's rule for concurrent communicators): for any two ranks, the
      operations they share, taken in the order one posted them, are in the order the other posted
      them too; a pair posted the other way round raises `ExchangeMismatch`.
    - `link` (latency s, bandwidth B/s), optional: a modelled link, one FIFO per (rank, channel): an
      operation starts when the rank's previous one on its channel has finished, takes latency +
      bytes / bandwidth (an all-reduce 2(n-1) latencies + its ring bytes), and `wait` returns no
      sooner than its modelled finish - on both sides: a receive no sooner than its sender's send
      finished, an all-reduce no sooner than every rank's part of it; `finish_times` records (rank,
      channel, kind, finish).
    """

    def __init__(self, world_size: int, timeout: float = 300.0, strict: bool = True,
                 order: StreamOrder | None = None, link: tuple[float, float] | None = None):
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
        # the global posting order: each rank's post counter, the post number of each side of each
        # point-to-point message until both sides posted it, and per pair of ranks and FIFO (channel,
        # direction or group) the post numbers of the operations both shared, in FIFO order
        self._posts: dict[int, int] = defaultdict(int)
        self._half: dict[tuple, int] = {}
        self._shared: dict[tuple[int, int], dict[tuple, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
        self.link = link
        self._busy: dict[tuple[int, str], float] = defaultdict(float)
        self.finish_times: list[tuple[int, str, str, float]] = []
        self._reduce_posts: dict[tuple, dict[int, int]] = {}

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

    # ---- the global posting order and the modelled link ----------------------------------------
    def next_post(self, rank: int) -> int:
        """A new post number of `rank`: one per batch (its operations are posted together)."""
        with self._cond:
            self._posts[rank] += 1
            return self._posts[rank]

    def _shared_op(self, fifo: tuple, a: int, post_a: int, b: int, post_b: int) -> None:
        """Record an operation ranks a and b share, with each one's post number, and raise if another
        FIFO of theirs (another channel) holds one they posted in the opposite order. Each FIFO's list
        grows in order on both sides, so the neighbours by a's post number are the ones to check."""
        import bisect

        if a > b:
            a, post_a, b, post_b = b, post_b, a, post_a
        fifos = self._shared[(a, b)]
        for other, ops in fifos.items():
            if other[0] == fifo[0] or not ops:
                continue
            i = bisect.bisect_left(ops, (post_a, -1))
            before, after = ops[i - 1] if i else None, ops[i] if i < len(ops) else None
            if (before and before[1] > post_b) or (after and after[1] < post_b):
                self.failed = self.failed or "channels posted out of order"
                raise ExchangeMismatch(
                    f"ranks {a} and {b} posted to the {fifo[0]} and {other[0]} communicators in different orders "
                    f"(rank {a}'s post {post_a} against rank {b}'s post {post_b}): NCCL may deadlock when "
                    f"concurrent communicators are not posted to in one global order")
        fifos[fifo].append((post_a, post_b))

    def schedule(self, rank: int, channel: str, kind: str, nbytes: int, hops: int = 1) -> float | None:
        """The modelled finish time (time.perf_counter) of an operation posted now, or None without a link."""
        if self.link is None:
            return None
        latency, bandwidth = self.link
        with self._cond:
            start = max(time.perf_counter(), self._busy[(rank, channel)])
            finish = self._busy[(rank, channel)] = start + hops * latency + nbytes / bandwidth
            self.finish_times.append((rank, channel, kind, finish))
        return finish

    # ---- point to point ------------------------------------------------------------------
    def put(self, src: int, dst: int, kind: str, t: torch.Tensor, channel: str = MAIN, post: int = 0,
            finish: float | None = None) -> None:
        """`t` is the message itself (the sender's copy), produced on the caller's stream; `finish`:
        its modelled arrival (a modelled link), before which no receive of it completes."""
        ready = self.order.mark(t)
        with self._cond:
            seq = self._sent[(channel, src, dst)]
            self._sent[(channel, src, dst)] += 1
            self._messages[(channel, src, dst, seq)] = (kind, t, ready, finish)
            self._pair_posted((channel, src, dst, seq), src, post, dst)
            self._cond.notify_all()

    def post_recv(self, src: int, dst: int, channel: str = MAIN, post: int = 0) -> int:
        with self._cond:
            seq = self._posted[(channel, src, dst)]
            self._posted[(channel, src, dst)] += 1
            self._pair_posted((channel, src, dst, seq), dst, post, src)
            return seq

    def _pair_posted(self, key: tuple, rank: int, post: int, peer: int) -> None:
        """One side of message `key` posted (under the lock): once both have, record it as shared."""
        other = self._half.pop(key, None)
        if other is None:
            self._half[key] = post
        else:
            self._shared_op((key[0], "p2p", key[1], key[2]), rank, post, peer, other)

    def take(self, src: int, dst: int, seq: int, kind: str, buf: torch.Tensor, channel: str = MAIN) -> None:
        key = (channel, src, dst, seq)
        with self._cond:
            self._wait_for(lambda: key in self._messages, dst, f"message {seq} from rank {src}")
            got_kind, t, ready, finish = self._messages.pop(key)
        sleep_until(finish)
        if got_kind != kind or t.numel() * t.element_size() != buf.numel() * buf.element_size():
            raise ExchangeMismatch(
                f"rank {dst}'s receive #{seq} from rank {src} expects {kind} of {buf.numel() * buf.element_size()} "
                f"bytes, but rank {src}'s send #{seq} to it is {got_kind} of {t.numel() * t.element_size()} bytes: "
                f"the two ranks posted their exchanges in different orders")
        self.order.wait(ready, t)
        buf.copy_(t.view(buf.shape))

    # ---- all-reduce ----------------------------------------------------------------------
    def contribute(self, group: tuple[int, ...], rank: int, kind: str, t: torch.Tensor, post: int = 0,
                   finish: float | None = None) -> int:
        ready = self.order.mark(t)
        with self._cond:
            seq = self._reduce_posted[(group, rank)]
            self._reduce_posted[(group, rank)] += 1
            parts = self._reductions.setdefault((group, seq), {})
            parts[rank] = (kind, t, ready, finish)
            self._reduce_posts.setdefault((group, seq), {})[rank] = post
            if len(parts) == len(group):          # every rank posted it: shared by every pair of the group
                posts = self._reduce_posts.pop((group, seq))
                for i, a in enumerate(group):
                    for b in group[i + 1:]:
                        self._shared_op((MAIN, "reduce", group), a, posts[a], b, posts[b])
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
        sleep_until(max((p[3] for p in parts.values() if p[3] is not None), default=None))
        mine_kind, mine, _, _ = parts[rank]
        for r, (kind, t, ready, _) in parts.items():
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
    ranks_share_process = True

    def __init__(self, rank: int, hub: ThreadHub, group: list[int] | None = None, **channels):
        super().__init__(rank, hub.world_size, group, **channels)
        self.hub = hub

    def _post(self, sends, recvs, kind) -> Pending:
        channel, post = self.channel(kind), self.hub.next_post(self.rank)
        nbytes = sum(t.numel() * t.element_size() for t, _ in sends)
        finish = self._modelled(channel, kind, nbytes, len(sends), any(t.is_cuda for t, _ in sends))
        waits = [lambda: sleep_until(finish)] if finish is not None else []
        for t, peer in sends:
            # the bytes are taken now (a real send reads its buffer while in flight); strict mode
            # checks at the wait that the buffer was left alone meanwhile
            sent = t.detach().clone()
            self.hub.put(self.rank, peer, kind, sent, channel, post, finish)
            if self.hub.strict:
                waits.append(lambda t=t, sent=sent, peer=peer: self._check_unchanged(t, sent, peer, kind))
        for buf, peer in recvs:
            seq = self.hub.post_recv(peer, self.rank, channel, post)
            if self.hub.strict:
                # bytes of all ones: a float NaN, and NaN scales in a K/V codec's byte payload
                buf.fill_(float("nan")) if buf.is_floating_point() else buf.fill_(-1 if buf.is_signed() else 255)
            waits.append(lambda buf=buf, peer=peer, seq=seq: self.hub.take(peer, self.rank, seq, kind, buf, channel))
        return Pending(waits, [t for t, _ in sends + recvs])

    def _modelled(self, channel: str, kind: str, nbytes: int, hops: int, cuda: bool = False) -> float | None:
        """With a modelled link: the operation's modelled finish (None without one, or nothing to
        send). On CUDA the host waits for this rank's stream first: the transfer starts when the
        data exists, not when the host ran ahead to post it."""
        if self.hub.link is None or not hops:
            return None
        if cuda:
            torch.cuda.current_stream().synchronize()
        return self.hub.schedule(self.rank, channel, kind, nbytes, hops)

    def _check_unchanged(self, t: torch.Tensor, sent: torch.Tensor, peer: int, kind: str) -> None:
        if not torch.equal(_bits(t), _bits(sent)):
            raise RuntimeError(f"rank {self.rank} changed a {kind} send buffer (to rank {peer}) before the send "
                               f"completed: on NCCL the peer would receive partly overwritten data")

    def _agree(self, t) -> Pending:
        return self._reduce_over(t, tuple(range(self.world_size)), "control")

    def _all_reduce(self, t, kind) -> Pending:
        return self._reduce_over(t, tuple(self.group), kind)

    def _reduce_over(self, t, group: tuple[int, ...], kind: str) -> Pending:
        n = len(group)
        post = self.hub.next_post(self.rank)
        finish = self._modelled(MAIN, kind, ring_bytes(t.numel() * t.element_size(), n), 2 * (n - 1), t.is_cuda)
        seq = self.hub.contribute(group, self.rank, kind, t.detach().clone(), post, finish)
        if self.hub.strict and t.is_floating_point():
            t.fill_(float("nan"))
        return Pending([lambda: self.hub.reduced(group, self.rank, seq, t)], [t])


class TimelineRecorder(Transport):
    """One rank's timeline of posts and waits, recorded around another transport (`inner`, which
    moves the bytes, or not: a NullTransport) without changing the engine: what
    `benchmarks/project.py`'s trace-driven bound replays through a modelled link.

    It counts bytes and messages itself, by `Transport`'s own rules (`start`, `all_reduce`, `agree`),
    so its counts are the ones `inner` would have made; `inner` only moves the data (`_post`,
    `_all_reduce`, `_agree`), and anything else is asked of it (`__getattr__`). Per post it notes
    the kind, the bytes and messages it added to the counts, and a timestamp on the compute stream;
    per wait of that post, a timestamp when compute reached the wait. Steps are what lies between
    two `boundary()` calls (the caller knows where a step starts: the engine is not told).

    Timestamps: on CPU `time.perf_counter()`: wall clock (the time a wait blocks for a peer stays in
    the gap after it, as it does in the step), or with `timelines("compute")` less the time blocked
    inside `inner`'s waits (what a replay of every rank together needs); on CUDA a timing event
    with `external=True` recorded on the current stream - recorded into the graph while a CUDA graph
    is captured, so each replay stamps it again (`torch.cuda.Event(external=True)`; unrun here, no
    GPU). A step that posted nothing itself while an earlier capture recorded posts is a replay of
    that capture: its timeline is the captured events, stamped by the latest replay.

    `timelines()`: per recorded step, {"seconds": its duration, "clock", "graphed", "events": [(t
    seconds from the step's start, event, post, kind, bytes, messages)]}, event "post", "wait" (of
    this step's post number `post`) or "wait_prev" (of the previous step's post `post`: a stale
    exchange waited one step later); posts are numbered from 0 in each step; messages are the sends
    of a point-to-point batch, 1 for an all-reduce (the projection's `_on_link` charges an all-reduce
    its 2(N-1) hops)."""

    def __init__(self, inner: Transport):
        super().__init__(inner.rank, inner.world_size, inner.group, inner.stale_channel, inner.stale_kinds)
        self.inner = inner
        self.reaches_peers, self.ranks_share_process = inner.reaches_peers, inner.ranks_share_process
        self._blocked = 0.0             # CPU: seconds spent inside inner's waits so far
        self._where: dict[int, tuple[int, int]] = {}    # post id -> (step, index in that step)
        self._next_id = 0
        self._step = -1                 # the open step (-1: none)
        self._open: dict | None = None  # {"start": marker, "events": [...], "posts": count}
        self._captured: list | None = None              # the events recorded in the latest capture
        self._capturing = False
        self._done: list[dict] = []

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ---- the clock -----------------------------------------------------------------------------
    def _marker(self, device: torch.device | None):
        if device is not None and device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True, external=True)
            event.record(torch.cuda.current_stream(device))
            return event
        return time.perf_counter(), self._blocked

    def boundary(self, device: torch.device | str | None = None) -> None:
        """End the open step (if any) and start the next one here."""
        device = None if device is None else torch.device(device)
        marker = self._marker(device)
        if self._open is not None:
            self._open["end"] = marker
            self._done.append(self._open)
        self._step += 1
        self._open = {"start": marker, "events": [], "posts": 0, "step": self._step}

    def finish(self, device: torch.device | str | None = None) -> None:
        """End the open step; no new one starts."""
        self.boundary(device)
        self._open = None

    # ---- recording posts and waits ----------------------------------------------------------------
    def _note(self, kind: str, tensors, post) -> Pending:
        device = next((t.device for t in tensors if t.is_cuda), None)
        capturing = device is not None and torch.cuda.is_current_stream_capturing()
        if capturing and not self._capturing:
            self._captured = []          # a new capture: its events replace the last one's
        self._capturing = capturing
        into = self._captured if capturing else (self._open["events"] if self._open is not None else None)
        before = (sum(self.bytes_sent[kind].values()), self.messages_sent[kind])
        marker = self._marker(device) if into is not None else None    # outside a step: nothing stamped
        pending = post()
        nbytes = sum(self.bytes_sent[kind].values()) - before[0]
        messages = self.messages_sent[kind] - before[1]
        pid = self._next_id
        self._next_id += 1
        if capturing:
            index = sum(1 for e in self._captured if e[1] == "post")
            self._where[pid] = (-1, index)       # -1: the captured step
        elif self._open is not None:
            index = self._open["posts"]
            self._open["posts"] += 1
            self._where[pid] = (self._step, index)
        if into is not None:
            into.append([marker, "post", pid, kind, nbytes, messages])

        def waited():            # compute reached the wait: stamped before inner's wait blocks
            w_capturing = device is not None and torch.cuda.is_current_stream_capturing()
            target = self._captured if w_capturing else (self._open["events"] if self._open is not None else None)
            if target is not None:
                target.append([self._marker(device), "wait", pid, kind, nbytes, messages])
            t0 = time.perf_counter()
            pending.wait()
            self._blocked += time.perf_counter() - t0
        return Pending([waited], pending.tensors)

    def start(self, sends, recvs, kind: str) -> Pending:
        if not sends and not recvs:
            return super().start(sends, recvs, kind)
        return self._note(kind, [t for t, _ in sends + recvs], lambda: super(TimelineRecorder, self).start(
            sends, recvs, kind))

    def all_reduce(self, t: torch.Tensor, kind: str) -> Pending:
        if len(self.group) == 1:
            return super().all_reduce(t, kind)
        return self._note(kind, [t], lambda: super(TimelineRecorder, self).all_reduce(t, kind))

    def agree(self, t: torch.Tensor) -> Pending:
        if self.world_size == 1:
            return super().agree(t)
        return self._note("control", [t], lambda: super(TimelineRecorder, self).agree(t))

    def _post(self, sends, recvs, kind) -> Pending:
        return self.inner._post(sends, recvs, kind)

    def _all_reduce(self, t, kind) -> Pending:
        return self.inner._all_reduce(t, kind)

    def _agree(self, t) -> Pending:
        return self.inner._agree(t)

    # ---- reading the timelines ---------------------------------------------------------------------
    def timelines(self, clock: str = "wall") -> list[dict]:
        """The recorded (closed) steps' timelines, oldest first (CUDA: synchronises first). `clock`
        on CPU: "wall", or "compute" (time blocked in waits left out)."""
        out = []
        compute = clock == "compute"
        for st in self._done:
            cuda = not isinstance(st["start"], tuple)
            if cuda:
                st["end"].synchronize()

            def since(m, st=st, cuda=cuda):
                if cuda:
                    return st["start"].elapsed_time(m) / 1e3
                return m[0] - st["start"][0] - (m[1] - st["start"][1] if compute else 0.0)
            events, graphed = st["events"], False
            if not any(e[1] == "post" for e in events) and self._captured:
                events, graphed = self._captured, True
            rows = []
            for marker, what, pid, kind, nbytes, messages in events:
                step, index = self._where.get(pid, (None, None))
                if not graphed and what == "wait" and step != st["step"]:
                    what = "wait_prev" if step == st["step"] - 1 else "wait_older"
                rows.append((since(marker), what, index, kind, nbytes, messages))
            rows.sort(key=lambda r: r[0])
            out.append({"seconds": since(st["end"]), "clock": "cuda-events" if cuda else f"perf_counter, {clock}",
                        "graphed": graphed, "events": rows})
        return out
