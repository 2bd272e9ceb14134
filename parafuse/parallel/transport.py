"""Moving tensors between ranks, and counting every byte that moves.

One primitive, `start(sends, recvs, kind, tag)`: post point-to-point sends and receives as one
batch and return a handle whose `wait()` completes them. All byte accounting happens here, per
layer kind and per peer, so `sent(i->j) == received(j<-i)` can be checked.

`TorchTransport` posts through torch.distributed (NCCL on GPUs, gloo on CPU). `ThreadTransport`
connects N threads of one process through queues: the single-process emulator runs the same
exchange logic over it, so distributed runs can be checked against it.
"""
from __future__ import annotations

import threading
from collections import defaultdict

import torch

KINDS = ("latent_halo", "conv_halo", "attn_kv", "norm_stats", "cfg", "gather", "reduce")


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


class Transport:
    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.bytes_sent: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.bytes_received: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))

    def start(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
              kind: str, tag: int = 0) -> Pending:
        """Post `sends` (tensor, peer) and `recvs` (buffer to fill, peer); peers are global ranks."""
        assert kind in KINDS, kind
        for t, peer in sends:
            self.bytes_sent[kind][peer] += t.numel() * t.element_size()
        for t, peer in recvs:
            self.bytes_received[kind][peer] += t.numel() * t.element_size()
        if not sends and not recvs:
            return Pending()
        return self._post(sends, recvs, tag)

    def _post(self, sends, recvs, tag) -> Pending:
        raise NotImplementedError

    def reset_counts(self) -> None:
        self.bytes_sent.clear()
        self.bytes_received.clear()

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Bytes sent and received per kind, summed over peers."""
        return ({k: sum(v.values()) for k, v in self.bytes_sent.items()},
                {k: sum(v.values()) for k, v in self.bytes_received.items()})


class TorchTransport(Transport):
    def _post(self, sends, recvs, tag) -> Pending:
        import torch.distributed as dist

        ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer in recvs]
        works = dist.batch_isend_irecv(ops)
        return Pending([w.wait for w in works], [t for t, _ in sends + recvs])


class ThreadHub:
    """Mailboxes between the N threads of the emulator.

    Messages between a (source, destination, tag) are matched in the order the operations were
    *posted*, like a real process group: a receive posted early (for next step) gets the message
    sent first, even if a receive posted later is waited on first."""

    def __init__(self, world_size: int, timeout: float = 300.0):
        self.world_size = world_size
        self.timeout = timeout
        self.failed: str | None = None
        self._messages: dict[tuple[int, int, int, int], torch.Tensor] = {}
        self._sent: dict[tuple[int, int, int], int] = defaultdict(int)
        self._posted: dict[tuple[int, int, int], int] = defaultdict(int)
        self._cond = threading.Condition()

    def put(self, src: int, dst: int, tag: int, t: torch.Tensor) -> None:
        with self._cond:
            seq = self._sent[(src, dst, tag)]
            self._sent[(src, dst, tag)] += 1
            self._messages[(src, dst, tag, seq)] = t
            self._cond.notify_all()

    def post_recv(self, src: int, dst: int, tag: int) -> int:
        with self._cond:
            seq = self._posted[(src, dst, tag)]
            self._posted[(src, dst, tag)] += 1
            return seq

    def take(self, src: int, dst: int, tag: int, seq: int) -> torch.Tensor:
        key, waited = (src, dst, tag, seq), 0.0
        with self._cond:
            while key not in self._messages:
                if self.failed:
                    raise RuntimeError(f"emulated rank {dst} stopped: {self.failed}")
                if waited > self.timeout:
                    raise RuntimeError(f"emulated rank {dst} waited {waited:.0f} s for rank {src} (tag {tag}): "
                                       f"a rank is stuck or exchanges are mismatched")
                self._cond.wait(timeout=0.5)
                waited += 0.5
            return self._messages.pop(key)

    def fail(self, message: str) -> None:
        with self._cond:
            self.failed = self.failed or message
            self._cond.notify_all()


class ThreadTransport(Transport):
    def __init__(self, rank: int, hub: ThreadHub):
        super().__init__(rank, hub.world_size)
        self.hub = hub

    def _post(self, sends, recvs, tag) -> Pending:
        for t, peer in sends:
            # a copy: the sender may overwrite its buffer before the receiver reads it, as with a real send
            self.hub.put(self.rank, peer, tag, t.detach().clone())
        waits = []
        for buf, peer in recvs:
            seq = self.hub.post_recv(peer, self.rank, tag)
            waits.append(lambda buf=buf, peer=peer, seq=seq: buf.copy_(self.hub.take(peer, self.rank, tag, seq)))
        return Pending(waits)
