"""The exchange engine: every line of neighbour-exchange logic, shared by all patch layers.

Patch layers ask the engine for what their strip lacks: halo rows for a conv, a K/V buffer for
self-attention, global GroupNorm statistics. The engine decides, per step, whether the answer is
fresh (synchronous exchange, then wait) or stale (what the neighbours sent during the previous
step, while the exchange for the next step is posted and runs behind compute). It sits on a
`Transport`, so the distributed runtime and the single-process emulator run this same code.

Modes: sync (every exchange fresh and complete: equals the serial model), full (stale K/V of the
whole image, DistriFusion), partial (stale K/V of a window of ceil(p * rows) rows of each
neighbour, at least one; PCPP), none (no exchange at all). Steps before `warmup_steps`, and the
first step after `configure`, are synchronous in every mode but none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from parafuse.parallel.geometry import Level, StripGeometry
from parafuse.parallel.transport import Pending, Transport

MODES = ("sync", "full", "partial", "none")
NORM_MODES = ("exact", "corrected", "stale", "local")


def check_settings(mode: str, halo_portion: float, warmup_steps: int, norm_mode: str | None) -> None:
    """Raise ValueError, saying what is allowed, for settings the engine cannot run."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not 0.0 <= halo_portion <= 1.0:
        raise ValueError(f"halo portion must lie in [0, 1], got {halo_portion}")
    if warmup_steps < 0:
        raise ValueError(f"warmup steps must be >= 0, got {warmup_steps}")
    if norm_mode is not None and norm_mode not in NORM_MODES:
        raise ValueError(f"unknown GroupNorm mode {norm_mode!r}; valid: {', '.join(NORM_MODES)}")


@dataclass
class LayerState:
    pending: Pending = field(default_factory=Pending)
    buffers: dict = field(default_factory=dict)


class ExchangeEngine:
    def __init__(self, transport: Transport, patch_ranks: list[int], mode: str = "sync",
                 halo_portion: float = 0.3, warmup_steps: int = 4, norm_mode: str | None = None):
        check_settings(mode, halo_portion, warmup_steps, norm_mode)
        norm_mode = norm_mode or {"sync": "exact", "none": "local"}.get(mode, "corrected")
        self.transport = transport
        self.patch_ranks = list(patch_ranks)          # global rank of each strip, top to bottom
        self.index = self.patch_ranks.index(transport.rank)
        self.n = len(self.patch_ranks)
        self.mode = mode
        self.halo_portion = halo_portion
        self.warmup_steps = warmup_steps
        self.norm_mode = norm_mode
        # partial with p = 0 conditions a strip on nothing of its neighbours: that is `none`.
        self.exchanges = mode != "none" and not (mode == "partial" and halo_portion == 0.0)
        self.geometry: StripGeometry | None = None
        self.sync = True
        self.model_input: torch.Tensor | None = None
        self.state: dict[str, LayerState] = {}
        self._fresh_after_configure = True

    # ---- lifecycle -------------------------------------------------------------------------
    def configure(self, geometry: StripGeometry) -> None:
        """Start a new image or resolution: stale state from another geometry is meaningless."""
        if geometry.n != self.n:
            raise ValueError(f"geometry has {geometry.n} strips, the patch group {self.n}")
        self.drain()
        self.geometry = geometry
        self.state.clear()
        self._fresh_after_configure = True

    def begin_step(self, step: int) -> None:
        """Called by the sampling loop before each denoising step of a stage."""
        self.sync = self.mode == "sync" or step < self.warmup_steps or self._fresh_after_configure
        self._fresh_after_configure = False

    def begin_forward(self, x: torch.Tensor) -> None:
        """Model pre-hook: remember the model input, whose halo the first conv takes fresh."""
        self.model_input = x

    def drain(self) -> None:
        """Complete every posted exchange (before reconfiguring or shutting down)."""
        for st in self.state.values():
            st.pending.wait()

    def layer(self, key: str) -> LayerState:
        st = self.state.get(key)
        if st is None:
            st = self.state[key] = LayerState()
        return st

    @property
    def rank(self) -> int:
        return self.index

    @property
    def up(self) -> int | None:
        return self.patch_ranks[self.index - 1] if self.index > 0 else None

    @property
    def down(self) -> int | None:
        return self.patch_ranks[self.index + 1] if self.index < self.n - 1 else None

    # ---- conv halos ------------------------------------------------------------------------
    def conv_input(self, key: str, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """`x` [B, C, h, W] with `top` rows of the strip above and `bottom` rows of the strip below
        attached (zeros at the image edge, as the conv's own zero padding would give)."""
        if top == 0 and bottom == 0:
            return x
        b, c, _, w = x.shape
        st = self.layer(key)
        fresh = x is self.model_input
        kind = "latent_halo" if fresh else "conv_halo"
        if not self.exchanges:
            halos = (x.new_zeros(b, c, top, w), x.new_zeros(b, c, bottom, w))
            return torch.cat([halos[0], x, halos[1]], dim=2)
        st.pending.wait()
        if "top" not in st.buffers:
            st.buffers["top"] = x.new_zeros(b, c, top, w)
            st.buffers["bottom"] = x.new_zeros(b, c, bottom, w)
            fresh = True                               # nothing stale to use yet
        top_buf, bottom_buf = st.buffers["top"], st.buffers["bottom"]
        sends, recvs = [], []
        if self.up is not None:
            if bottom:
                sends.append((x[:, :, :bottom].contiguous(), self.up))
            if top:
                recvs.append((top_buf, self.up))
        if self.down is not None:
            if top:
                sends.append((x[:, :, -top:].contiguous(), self.down))
            if bottom:
                recvs.append((bottom_buf, self.down))
        if fresh or self.sync:
            self.transport.start(sends, recvs, kind, tag=1).wait()
            return torch.cat([top_buf, x, bottom_buf], dim=2)
        out = torch.cat([top_buf, x, bottom_buf], dim=2)   # the stale halos, copied before the receive lands
        st.pending = self.transport.start(sends, recvs, kind, tag=1)
        return out

    # ---- attention K/V ---------------------------------------------------------------------
    def kv_window_rows(self, level: Level) -> tuple[int, int]:
        """Rows of K/V taken from the strip above and below in `partial` mode."""
        def take(neighbour):
            if neighbour is None:
                return 0
            return min(level.rows[neighbour], max(1, math.ceil(self.halo_portion * level.rows[neighbour])))
        i = self.index
        return take(i - 1 if i > 0 else None), take(i + 1 if i < self.n - 1 else None)

    def kv_buffer(self, key: str, level: Level, batch: int, width: int, dtype, device):
        """The layer's K/V buffer [tokens, B, 2*dim] laid out [from above | local | from below], and
        the token range of the local rows in it. Waits for last step's receives into it first."""
        st = self.layer(key)
        st.pending.wait()
        whole = self.sync or self.mode == "full"
        name = "whole" if whole else "window"
        w = level.width
        if whole:
            above_rows, below_rows = level.offsets[self.index], level.height - level.offsets[self.index] - level.rows[self.index]
        elif self.exchanges:
            above_rows, below_rows = self.kv_window_rows(level)
        else:
            above_rows = below_rows = 0
        local = level.rows[self.index] * w
        total = (above_rows + below_rows) * w + local
        buf = st.buffers.get(name)
        if buf is None or buf.shape != (total, batch, width) or buf.dtype != dtype:
            buf = st.buffers[name] = torch.zeros(total, batch, width, dtype=dtype, device=device)
            st.buffers["fresh_" + name] = True
        return buf, above_rows * w, above_rows * w + local

    def exchange_kv(self, key: str, level: Level, before: bool) -> None:
        """Exchange the K/V buffer written by `kv_buffer`'s caller.

        Called twice per attention: `before=True` after the local K/V are written (a synchronous
        step exchanges here and waits), `before=False` after attention has read the buffer (an
        asynchronous step posts here the exchange whose data the next step will use)."""
        if not self.exchanges:
            return
        st = self.layer(key)
        whole = self.sync or self.mode == "full"
        name = "whole" if whole else "window"
        buf = st.buffers[name]
        # fresh (a synchronous step, or a buffer with nothing stale in it yet): exchange before
        # attention and wait; stale: post after attention, for the next step to use
        first_use = st.buffers.pop("fresh_" + name, False)     # popped on every call: once per buffer
        fresh = self.sync or first_use
        if before != fresh:
            return
        w, i = level.width, self.index
        local_rows = level.rows[i]
        sends, recvs = [], []
        if whole:
            off = level.offsets[i] * w
            mine = buf[off: off + local_rows * w]
            for j, g in enumerate(self.patch_ranks):
                if j != i:
                    sends.append((mine, g))
                    recvs.append((buf[level.offsets[j] * w: (level.offsets[j] + level.rows[j]) * w], g))
        else:
            above, below = self.kv_window_rows(level)
            start = above * w
            mine_rows = max(1, math.ceil(self.halo_portion * local_rows))
            mine_rows = min(local_rows, mine_rows)
            if self.up is not None:
                sends.append((buf[start: start + mine_rows * w], self.up))
                recvs.append((buf[:start], self.up))
            if self.down is not None:
                end = start + local_rows * w
                sends.append((buf[end - mine_rows * w: end], self.down))
                recvs.append((buf[end:], self.down))
        pending = self.transport.start(sends, recvs, "attn_kv", tag=2)
        if fresh:
            pending.wait()
            if self.mode == "partial" and whole:
                self._window_from_whole(st, level, buf)
        else:
            st.pending = pending

    def _window_from_whole(self, st: LayerState, level: Level, whole: torch.Tensor) -> None:
        """After a synchronous step in partial mode, seed the window buffer's neighbour rows with the
        rows just received, so that the first asynchronous step has a stale window to use."""
        above, below = self.kv_window_rows(level)
        w, i = level.width, self.index
        local = level.rows[i] * w
        off = level.offsets[i] * w
        win = st.buffers.get("window")
        shape = ((above + below) * w + local, whole.shape[1], whole.shape[2])
        if win is None or win.shape != shape:
            win = st.buffers["window"] = whole.new_zeros(shape)
        win[: above * w] = whole[off - above * w: off]
        win[above * w + local:] = whole[off + local: off + local + below * w]

    # ---- GroupNorm statistics --------------------------------------------------------------
    def norm_stats(self, key: str, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Global (count, sum, sum of squares) per sample and group, float32 [3, B, G].

        Returns (stats, fallback): `fallback` are the local stats where the mode may need them
        (corrected mode falls back to local where its estimate of the variance is negative)."""
        if not self.exchanges or self.norm_mode == "local":
            return local, None
        st = self.layer(key)
        st.pending.wait()
        peers = [g for j, g in enumerate(self.patch_ranks) if j != self.index]
        has_stale = "gathered" in st.buffers and st.buffers["gathered"].shape[1:] == local.shape

        def post(now: bool):
            gathered = local.new_empty((self.n,) + tuple(local.shape))
            gathered[self.index] = local
            recvs = [(gathered[j], g) for j, g in enumerate(self.patch_ranks) if j != self.index]
            pending = self.transport.start([(local, g) for g in peers], recvs, "norm_stats", tag=3)
            st.buffers["gathered"] = gathered
            st.buffers["local"] = local
            if now:
                pending.wait()
            else:
                st.pending = pending
            return gathered

        if self.sync or self.norm_mode == "exact" or not has_stale:
            return post(now=True).sum(0), None     # summed in rank order: every rank gets the same bits
        stale_global = st.buffers["gathered"].sum(0)
        stale_local = st.buffers["local"]
        post(now=False)
        if self.norm_mode == "stale":
            return stale_global, None
        return stale_global - stale_local + local, local   # corrected: swap in this strip's fresh part

    # ---- whole-tensor collectives ----------------------------------------------------------
    def gather_rows(self, x: torch.Tensor, dim: int, rows: tuple[int, ...], dst: int | None = None,
                    kind: str = "gather") -> torch.Tensor | None:
        """Concatenate every strip's `x` along `dim` (strip j has rows[j] there), on every rank
        (dst None) or only on patch index `dst` (others get None)."""
        shape = list(x.shape)
        parts = []
        for j, r in enumerate(rows):
            shape[dim] = r
            parts.append(x if j == self.index else x.new_empty(shape))
        x = x.contiguous()
        sends, recvs = [], []
        for j, g in enumerate(self.patch_ranks):
            if j == self.index:
                continue
            if dst is None or j == dst:
                sends.append((x, g))
            if dst is None or self.index == dst:
                recvs.append((parts[j], g))
        self.transport.start(sends, recvs, kind, tag=4).wait()
        if dst is not None and self.index != dst:
            return None
        return torch.cat(parts, dim=dim)
