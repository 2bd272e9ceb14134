"""`PatchSession`: one process's part of a patch-parallel job, under both front doors.

    session = PatchSession(PatchConfig(mode="partial"))   # joins torchrun's job (or one rank alone)
    session.attach(model, adapter)                        # patch layers swapped in, by type
    plan = session.plan(sites, geometry, batch)           # per image: buffers fixed, first step sync
    session.begin_image(plan)
    ... the door's own loop: session.begin_step(k), the model on its strip, session.watch ...
    session.gather_rows(x, dim, geometry.rows, dst=0)     # the image's strips on rank 0
    session.rank_stats(...)                               # bytes per kind and peer, memory: one schema

A session owns what every door needs and nothing of a door's own loop: the resolved config, the
device, the process layout (torchrun's, or an emulator's layout and transport), the transport, the
exchange engine, the host deadlines (`parafuse.watchdog`), the non-finite watch
(`parafuse.health`), CUDA graphs of a repeated evaluation (`parafuse.graphs`) and the memory
floor. `parafuse.Runtime` is a session plus the built-in sampling loop (solvers, stages, fused
update); `parafuse.parallelize(pipe)` is a session plus hooks on the pipeline's models, which keep
their own loop and scheduler. Nothing here imports either door.
"""
from __future__ import annotations

import resource
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from parafuse import attention, watchdog
from parafuse.checks import check_device
from parafuse.graphs import GraphedEvaluations, capture_cuda_graph
from parafuse.health import FiniteWatch
from parafuse.parallel.adapter import BUILTIN
from parafuse.parallel.agreement import check_same
from parafuse.parallel.config import ConfigError, PatchConfig
from parafuse.parallel.distributed import ParallelLayout, init_distributed, launched_by_torchrun, pick_device
from parafuse.parallel.engine import ExchangeEngine
from parafuse.parallel.geometry import StripGeometry
from parafuse.parallel.parallelize import parallelize
from parafuse.parallel.plan import PatchPlan, Site
from parafuse.parallel.transport import KINDS, TorchTransport, Transport


class PatchSession:
    """See the module docstring. `device`: None picks this rank's GPU (LOCAL_RANK) or the CPU; `layout`
    and `transport` given: an emulated rank (threads) or a measurement transport, no process group."""

    def __init__(self, config: PatchConfig | None = None, *, device: str | torch.device | None = None,
                 layout: ParallelLayout | None = None, transport: Transport | None = None):
        config = PatchConfig() if config is None else config
        if not isinstance(config, PatchConfig):
            raise ConfigError(f"the parallel settings must be a PatchConfig, got {type(config).__name__}")
        check_device(None if device is None else str(device), allow_meta=True)
        self.device = pick_device(None if device is None else str(device))
        # emulated: the ranks are threads of one process (the emulator's transport, recorded or not)
        config = config.on(self.device, emulated=transport is not None and transport.ranks_share_process)
        try:                    # None: the process's backend ($PARAFUSE_ATTENTION_BACKEND, else auto)
            backend = attention.use_backend(config.attention_backend, self.device)
        except attention.BackendError as e:
            raise ConfigError(str(e)) from None
        self.config = config.replace(attention_backend=backend)
        if layout is None:
            rank, world = (init_distributed(self.device, config.backend_timeout) if launched_by_torchrun()
                           else (0, 1))
            layout = ParallelLayout(rank, world, 2 if config.cfg_parallel else 1)
        self.layout = layout
        if transport is None and layout.world_size > 1:
            groups = [list(range(b * layout.patch_degree, (b + 1) * layout.patch_degree))
                      for b in range(layout.cfg_degree)]
            transport = TorchTransport(layout.rank, layout.world_size, groups, **self.config.channels())
        self.transport = transport
        # host deadlines on every exchange of a torch.distributed run (parafuse.watchdog)
        self.watchdog = (watchdog.start(layout.rank, layout.world_size, config.startup_timeout,
                                        config.exchange_timeout)
                         if isinstance(transport, TorchTransport) else None)
        self.engine = ExchangeEngine(transport, layout.patch_ranks, self.config) if layout.patch_degree > 1 else None
        self.capture = capture_cuda_graph
        self._pool = None

    # ---- the resolved settings -------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.config.torch_dtype

    @property
    def emulated(self) -> bool:
        return self.transport is not None and self.transport.ranks_share_process

    # ---- the model -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, adapter=BUILTIN) -> None:
        """Swap patch layers into `model` (in place, by type and behaviour; idempotent). Nothing to
        swap on a single strip."""
        if self.engine is not None:
            parallelize(model, self.engine, adapter)

    def plan(self, sites: list[Site], geometry: StripGeometry, batch: int,
             dtype: torch.dtype | None = None) -> PatchPlan:
        return PatchPlan(sites, geometry, self.layout.patch_index, batch, dtype or self.dtype, self.config)

    # ---- an image --------------------------------------------------------------------------------
    def begin_image(self, plan: PatchPlan | None, stream: int = 0) -> None:
        """A new image (or stage): the plan's buffers, its first step synchronous; counts from zero
        happen in `reset_counts`, once per request. `stream` > 0: another kind of call of the same
        image starts its own stream of evaluations (`ExchangeEngine.configure`)."""
        if self.engine is not None and plan is not None:
            self.engine.configure(plan, self.device, stream)

    def begin_step(self, k: int) -> None:
        """Before evaluation k of the current image: the heartbeat, and the engine's step plan."""
        if self.watchdog is not None:
            self.watchdog.progress()
        if self.engine is not None:
            self.engine.begin_step(k)

    def reset_counts(self) -> None:
        """At the start of a request: bytes and peak memory counted from here."""
        if self.transport is not None:
            self.transport.reset_counts()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def row_range(self, geometry: StripGeometry) -> tuple[int, int]:
        return geometry.row_range(self.layout.patch_index)

    def gather_rows(self, x: torch.Tensor, dim: int, rows: tuple[int, ...], dst: int | None = None,
                    kind: str = "gather") -> torch.Tensor | None:
        """Every strip's `x` concatenated along `dim`, on every strip (dst None) or on strip `dst`
        (the others get None); a single strip's `x` as it is."""
        if self.engine is None:
            return x
        return self.engine.gather_rows(x, dim, rows, dst=dst, kind=kind)

    def drain(self) -> None:
        if self.engine is not None:
            self.engine.drain()

    def watch(self, num_evals: int | None) -> FiniteWatch:
        """The non-finite watch of one image (`num_evals` None: a pipeline's loop, whose length the
        door does not know; it checks every CHECK_EVERY evaluations and at `finish`)."""
        return FiniteWatch(self.transport, self.layout.rank, self.layout.world_size, self.device, num_evals,
                           engine=self.engine)

    def check_same_call(self, values: dict, what: str) -> None:
        """Before any compute of a call, both doors: `values` compared across the ranks
        (`agreement.check_same`), a difference refused on every rank naming the values and the ranks.
        Skipped where no peer is reached (one rank; the Null and Loopback transports measure a rank
        alone, so its peers' values are not there to compare)."""
        tr = self.transport
        if tr is None or tr.world_size == 1 or not tr.reaches_peers:
            return
        with self.watchdog.guard(f"comparing {what} across the ranks", 1) if self.watchdog else nullcontext():
            check_same(values, what, transport=tr)

    def guard(self, what: str):
        """The host deadline around a request (none without a watchdog): the first steps - warmup,
        graph capture - get the startup deadline, later ones the exchange deadline."""
        if self.watchdog is None:
            return nullcontext()
        return self.watchdog.guard(what, self.config.warmup_steps + 3)

    def graphs(self, evaluate, always: bool = False) -> GraphedEvaluations | None:
        """`evaluate(*inputs)` captured once per key and replayed, else None (CUDA graphs off and not
        `always`). Every graph of the session shares one memory pool; `self.capture` records them
        (a CUDA graph; tests put `parafuse.graphs.rerun_capture` there)."""
        if not (self.config.cuda_graphs or always):
            return None
        if self._pool is None and self.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        return GraphedEvaluations(evaluate, self.engine, self.transport, self._pool, self.capture)

    # ---- what a rank reports ------------------------------------------------------------------
    def rank_stats(self, rows: int | None, state_bytes: int = 0, evaluations: int | None = None) -> dict:
        """This rank's row of every report, the same keys in both doors."""
        tr = self.transport
        sent, received = tr.totals() if tr is not None else ({}, {})
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:   # CPU: the process's peak resident memory (shared by all ranks of an emulator)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rank": self.layout.rank, "rows": rows, "evaluations": evaluations,
                "bytes_sent": {k: sent.get(k, 0) for k in KINDS},
                "bytes_received": {k: received.get(k, 0) for k in KINDS},
                "bytes_sent_per_peer": {k: dict(v) for k, v in tr.bytes_sent.items()} if tr else {},
                "bytes_received_per_peer": {k: dict(v) for k, v in tr.bytes_received.items()} if tr else {},
                "peak_memory_bytes": peak, "state_bytes": state_bytes}

    def gather_rank_stats(self, stats: dict) -> list[dict] | None:
        """Every rank's stats on rank 0 of a torch.distributed job (None on the others); a rank's
        own elsewhere (one process, or an emulated rank: the emulator collects them)."""
        if not isinstance(self.transport, TorchTransport):
            return [stats]
        import torch.distributed as dist
        out = [None] * self.layout.world_size if self.layout.rank == 0 else None
        with self.watchdog.guard("gathering rank statistics") if self.watchdog else nullcontext():
            dist.gather_object(stats, out, dst=0)
        return out

    def close(self) -> None:
        self.drain()
        if isinstance(self.transport, TorchTransport):
            self.transport.close()          # no reference to the process group outlives the run


class StepClock:
    """Seconds per step. On CUDA, events recorded around each step and read once at the end: a
    synchronisation after every step would wait for the exchanges in flight and remove the overlap
    that the stale modes exist for."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self) -> None:
        self.marks.append([self._now(), None])

    def stop(self) -> None:
        self.marks[-1][1] = self._now()

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in self.marks]
        return [b - a for a, b in self.marks]
