"""CUDA graphs of the model evaluation, for steps whose plan repeats.

A rank's strip is 1/N of the image, so on GPUs its kernels are small and a step costs more to
launch than to run. Once a step plan repeats (the stale plan after the synchronous warmup, or
every step of a serial or `sync` run), the evaluation is captured once and replayed:

    1st evaluation under a plan   eager (it also warms cuDNN/cuBLAS plan selection and autotuning)
    2nd                           captured, then replayed
    later                         replayed

What changes between evaluations lives in static tensors updated eagerly before each replay:
the input strip (copied in) and the timestep (the runtime fills a device scalar). Guidance and
the conditioning tensors are fixed per request, so graphs are captured per request.

Exchanges are captured with the evaluation: the point-to-point sends and receives and the
GroupNorm all-reduces a stale step posts become NCCL nodes of the graph. The engine drains them at
the end of the captured region, so every stream the exchanges fork joins before capture ends and
a replay leaves nothing in flight; the exchange of one layer still overlaps the layers after it
in the same step. The data semantics are the eager ones: step t reads what step t-1 sent.

On by default on CUDA (Runtime's `graphs_by_default`): on an H100, benchmarks/gpu_check.py found
replay equal to eager bit for bit, for a serial run and for a strip's steady steps. Unverified: the
exchanges as NCCL nodes of a graph with one process per GPU (benchmarks/multi_gpu_check.py checks
it where several GPUs are lent). What it relies on: the process group is created bound to the
device (communicators exist before any capture), the first evaluation of each plan runs eagerly
with the same peers as the captured one, and PyTorch's NCCL group can capture batched isend/irecv
(capturability fixed in pytorch/pytorch#148462, torch 2.7).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map


class CaptureError(RuntimeError):
    """Capturing an evaluation failed: what CUDA said, and how to run without graphs."""


class GraphedEvaluations:
    """Runs `evaluate(*inputs)` per key (a step plan's name, or a pipeline call's signature): eager,
    then captured, then replayed. Every input tensor is copied into its static buffer before a
    replay; the output (a tensor, or a structure of them) is cloned out. `pool`: one memory pool
    shared by a session's graphs. `capture(region, pool) -> (replay, output)` records `region`;
    the default makes a CUDA graph (`capture_cuda_graph`)."""

    def __init__(self, evaluate: Callable, engine=None, transport=None, pool=None, capture=None):
        self.evaluate = evaluate
        self.engine = engine
        self.transport = transport
        self.pool = pool
        self.capture = capture or capture_cuda_graph
        self.seen: dict = {}
        self.graphs: dict = {}

    def __call__(self, plan, *inputs: torch.Tensor):
        if plan in self.graphs:
            replay, statics, static_out, counts = self.graphs[plan]
            for static, x in zip(statics, inputs):
                static.copy_(x)
            replay()
            self._count(counts)                  # a replay moves what the captured evaluation moved
            return _clone(static_out)            # the caller may keep it; the next replay overwrites
        self.seen[plan] = self.seen.get(plan, 0) + 1
        if self.seen[plan] == 1:
            return self.evaluate(*inputs)
        return self._capture(plan, inputs)

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def _capture(self, plan, inputs) -> torch.Tensor:
        if self.engine is not None:
            self.engine.drain()                  # the eager step's exchanges land before capture
        statics = [x.clone() for x in inputs]
        before = self._snapshot()

        def region():
            out = self.evaluate(*statics)
            if self.engine is not None:
                self.engine.drain()              # join the exchange streams inside the capture
            return out

        try:
            replay, static_out = self.capture(region, self.pool)
        except RuntimeError as e:                # graphs are on by default: say how to turn them off
            raise CaptureError(f"capturing the step plan {plan!r} as a CUDA graph failed: {e}. Run with "
                               "--no-cuda-graphs (cuda_graphs=False) to run every step eagerly") from e
        counts = self._delta(before)
        self.graphs[plan] = (replay, statics, static_out, counts)
        replay()                                 # capture runs nothing: this is the evaluation
        return _clone(static_out)

    # byte accounting: capture counts the evaluation's exchanges once (for its first replay);
    # each later replay adds the same counts
    def _snapshot(self):
        if self.transport is None:
            return None
        return ({k: dict(v) for k, v in self.transport.bytes_sent.items()},
                {k: dict(v) for k, v in self.transport.bytes_received.items()},
                dict(self.transport.messages_sent))

    def _delta(self, before):
        if before is None:
            return None
        sent0, recv0, msg0 = before
        tr = self.transport
        sent = {k: {p: n - sent0.get(k, {}).get(p, 0) for p, n in v.items()} for k, v in tr.bytes_sent.items()}
        recv = {k: {p: n - recv0.get(k, {}).get(p, 0) for p, n in v.items()} for k, v in tr.bytes_received.items()}
        msgs = {k: n - msg0.get(k, 0) for k, n in tr.messages_sent.items()}
        return sent, recv, msgs

    def _count(self, counts) -> None:
        if counts is None:
            return
        sent, recv, msgs = counts
        for k, v in sent.items():
            for p, n in v.items():
                self.transport.bytes_sent[k][p] += n
        for k, v in recv.items():
            for p, n in v.items():
                self.transport.bytes_received[k][p] += n
        for k, n in msgs.items():
            self.transport.messages_sent[k] += n


def capture_cuda_graph(region: Callable, pool=None):
    """`region` captured as a CUDA graph: (its replay, its static output)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = region()
    return graph.replay, out


def rerun_capture(region: Callable, pool=None):
    """A stand-in for `capture_cuda_graph` where no GPU is (tests): a replay runs `region` again on
    the same static inputs and copies its result into the static output - what a graph replay does
    to the data, so that a missing copy into a static input shows as a wrong output on the CPU.
    Recording here runs the region, so that run is the evaluation and the first replay (the one
    right after a real capture) does nothing. Not faithful in one respect: a rerun counts its
    exchanges' bytes again, on top of the counts a replay adds."""
    out = region()
    ran = [True]

    def replay():
        if ran[0]:
            ran[0] = False
            return
        tree_map(lambda static, new: static.copy_(new) if isinstance(static, torch.Tensor) else static,
                 out, region())
    return replay, out


def _clone(out):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
