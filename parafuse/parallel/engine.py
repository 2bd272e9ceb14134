"""The exchange engine: every line of neighbour-exchange logic, shared by all patch layers.

Patch layers ask the engine for what their strip lacks: halo rows for a conv, a K/V buffer for
self-attention, global GroupNorm statistics. What each answer is - fresh (exchange, then wait),
stale (what the neighbours sent during the previous step, while this step's exchange is posted
and runs behind compute) or local - is fixed by the step plan that `begin_step` picks from the
patch plan (`parafuse.parallel.plan`); the buffers are allocated by `configure`, once per plan.
The engine sits on a `Transport`, so the distributed runtime and the single-process emulator run
this same code.

Modes: sync (every exchange fresh and complete: equals the serial model), full (stale K/V of the
whole image, DistriFusion), partial (stale K/V of a window of ceil(p * rows) rows of each
neighbour, at least one; PCPP), none (no exchange at all). Steps before `warmup_steps`, and the
first step of every image, are synchronous in every mode but none.

The published systems' own communication, for comparison on the same model and geometry
(`config.BASELINES`): with the same GroupNorm statistics `distrifusion` computes what `full` computes and
`pcpp` what `partial` computes (their default statistics are the published corrected-async
estimate, parafuse's are exact), but they move data the way those systems do (the `all-gather`
pattern): conv halo rows and
GroupNorm sums go to every rank (only the neighbours use the halos), and every step the model
output is all-gathered (DistriFusion runs its scheduler redundantly on the whole latent; the
scheduler is elementwise, so running it on the strip gives the same values, and the gathered
output's compute is not repeated here, only its bytes). `distrifusion` all-gathers K/V like `full`;
`pcpp` sends its windows to the two neighbours like `partial`. Two differences, both small and
in the baselines' favour or neutral: the first conv's latent rows still come from the neighbours
(DistriFusion reads them from its redundant whole latent), and the final gather to rank 0 stays.

Between steps a rank holds only the exchange state of its mode: halo rows, GroupNorm sums, and
K/V of the whole image (`full`) or of the windows (`partial`). The whole-image K/V that the
synchronous steps of `sync` and `partial` need is one scratch buffer per K/V shape, shared by all
attention sites of that shape (a synchronous attention is complete before the next one starts),
and dropped when the stale steps begin.

Streams: a pipeline that calls its denoiser more than once per step with different inputs (SD3's
skip-layer guidance after its CFG call, Flux's true CFG: the conditional call, then the
unconditional one) runs one stream of evaluations per kind of call, each with its own plan and
exchange state (`ExchangeState`: buffers, pending exchanges, its first step synchronous), so that
a call reads what its own kind's previous evaluation left. `configure(plan, device, stream)` starts
a stream of the image, `use_stream` makes a started one current; every method reads the current
stream's state. The whole-image scratch is shared (nothing of it outlives a synchronous step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from parafuse.parallel import kv_codec
from parafuse.parallel.config import Kernels, Mode, PatchConfig
from parafuse.parallel.plan import PatchPlan, Site, SiteKind, StepPlan
from parafuse.parallel.transport import Pending, Transport, sum_in_rank_order

def _spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of token ranges [a, b) as disjoint sorted spans (one encode per row, however many
    peers receive it)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass
class ExchangeState:
    """What one stream of evaluations keeps between its evaluations (see the module docstring)."""
    plan: PatchPlan | None = None
    buffers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)
    first_step: bool = True
    begun: bool = False        # started in the current image (`configure`)


class ExchangeEngine:
    """Every exchange of one rank's strip (see the module docstring). The methods that traced code
    calls - the attention processors' K/V and text merge, and the gathers - are outside
    torch.compile's tracing (`torch.compiler.disable`): posting and waiting are a graph break
    anyway, and dynamo traced into their bookkeeping and recompiled it per layer key, peer and rank
    (in the thread emulator); left out, each call is one graph break. The conv halos and GroupNorm
    statistics are called only by PatchConv2d and PatchGroupNorm, whose forwards are outside it whole."""

    nonfinite: torch.Tensor | None = None   # device bool: statistics of this request were NaN or infinite

    def __init__(self, transport: Transport, patch_ranks: list[int], config: PatchConfig):
        self.settings = config                        # validated, its mode-dependent defaults filled
        self.transport = transport
        self.patch_ranks = list(patch_ranks)          # global rank of each strip, top to bottom
        self.strip = self.patch_ranks.index(transport.rank)
        self.n = len(self.patch_ranks)
        self.step: StepPlan | None = None
        self.streams: dict[int, ExchangeState] = {0: ExchangeState()}
        self.stream = 0                               # the current stream, whose state the methods use
        self.scratch: dict[tuple, torch.Tensor] = {}
        self.device: torch.device | None = None
        self.kernels = config.kernels or Kernels.TORCH   # the patch layers' kernels
        # the Triton GroupNorm may apply the SiLU its trace saw as its only reader, marking its output
        # (layers.SiLUApplied); off while a compiled model runs, whose traced SiLU dynamo cannot hand
        # a marked tensor (the door sets it per model call)
        self.fused_silu = True

    @property
    def state(self) -> ExchangeState:
        return self.streams[self.stream]

    @property
    def plan(self) -> PatchPlan | None:
        return self.state.plan

    @property
    def buffers(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.state.buffers

    @property
    def pending(self) -> dict[str, Pending]:
        return self.state.pending

    @property
    def mode(self) -> Mode:
        """The mode whose values this engine computes (a baseline's: full's or partial's)."""
        return self.settings.computes

    @property
    def norm_mode(self) -> str:
        return self.settings.norm_mode

    @property
    def geometry(self):
        return self.plan.geometry

    # ---- lifecycle -------------------------------------------------------------------------
    def configure(self, plan: PatchPlan, device: torch.device, stream: int = 0) -> None:
        """Start stream `stream` of an image (0: a new image, whose first call it is) and make it
        current: buffers for `plan` (kept if the stream's plan is unchanged: everything the first,
        synchronous step reads is written by it first), no stale state is used."""
        if plan.n != self.n or plan.strip != self.strip:
            raise ValueError(f"plan for strip {plan.strip} of {plan.n}, engine is strip {self.strip} of {self.n}")
        if stream == 0:
            self.drain()
            for state in self.streams.values():
                state.begun = False
        self.stream = stream
        state = self.streams.setdefault(stream, ExchangeState())
        self._drain(state)
        if state.plan is None or state.plan.key != plan.key:
            state.buffers = {key: self._allocate(plan, site, device) for key, site in plan.sites.items()}
            self.scratch.clear()
        state.plan, state.first_step, state.begun = plan, True, True
        self.device = device

    def use_stream(self, stream: int) -> None:
        """Make `stream`, started in this image (`configure`), the current one."""
        state = self.streams.get(stream)
        if state is None or not state.begun:
            raise ValueError(f"stream {stream} was not started in this image (configure it first)")
        self.stream = stream

    def end_image(self) -> None:
        """After an image: every exchange complete; the streams the image did not start dropped
        with their buffers (the next image starts at stream 0)."""
        self.drain()
        self.streams = {k: s for k, s in self.streams.items() if k == 0 or s.begun}
        self.stream = 0

    def _allocate(self, plan: PatchPlan, site: Site, device) -> dict[str, torch.Tensor]:
        dt, stale = plan.dtype, plan.stale_step
        all_gather = plan.settings.exchanges and plan.settings.pattern == "all-gather"
        if site.kind == SiteKind.CONV:
            top, bottom = plan.halo_shapes(site)
            bufs = {"top": torch.zeros(top, dtype=dt, device=device),
                    "bottom": torch.zeros(bottom, dtype=dt, device=device)}
            if all_gather and not site.first:
                # what this strip gives every rank: its first `bottom` rows, then its last `top` rows
                b, c, _, w = top
                bufs["payload"] = torch.empty((b, c, site.top + site.bottom, w), dtype=dt, device=device)
                bufs["gathered"] = torch.zeros((self.n,) + bufs["payload"].shape, dtype=dt, device=device)
            elif plan.settings.exchanges:
                # what the neighbours need of this strip: its first `bottom` rows go up, its last
                # `top` rows go down; one [2, ...] buffer when both have the same shape
                if site.top == site.bottom and plan.up is not None and plan.down is not None:
                    bufs["sends"] = torch.empty((2,) + top, dtype=dt, device=device)
                else:
                    if plan.up is not None and site.bottom:
                        bufs["to_up"] = torch.empty(bottom, dtype=dt, device=device)
                    if plan.down is not None and site.top:
                        bufs["to_down"] = torch.empty(top, dtype=dt, device=device)
            return bufs
        if site.kind == SiteKind.NORM:
            shape = (2, plan.batch, site.groups)
            bufs = {"sums": torch.zeros(shape, dtype=torch.float32, device=device)}
            if stale.norm in ("corrected", "stale"):
                bufs["local"] = torch.zeros(shape, dtype=torch.float32, device=device)
            if stale.norm == "corrected":
                bufs["previous"] = torch.zeros(shape, dtype=torch.float32, device=device)
            if all_gather:
                bufs["gathered"] = torch.zeros((self.n,) + shape, dtype=torch.float32, device=device)
            return bufs
        if site.kind == SiteKind.ATTN:
            bufs = {}
            if stale.kv != "whole":      # sync mode: every step uses the shared scratch
                bufs["kv"] = torch.zeros(plan.kv_shape(site, stale.kv), dtype=dt, device=device)
            if stale.stale and plan.settings.kv_codec == "sign":
                # the one-bit messages (parafuse.parallel.kv_codec): the drift of every row of the
                # buffer (the local rows': the sender's own), the mirror of the local rows, and the
                # byte payloads out (local rows) and in (laid out as the buffer)
                tokens, batch, width = bufs["kv"].shape
                local = plan.strip_tokens(site)[self.strip]
                row = kv_codec.payload_bytes(width // 2, dt)
                bufs["drift"] = torch.zeros_like(bufs["kv"])
                bufs["mirror"] = torch.zeros((local, batch, width), dtype=dt, device=device)
                bufs["packed_out"] = torch.zeros((local, batch, row), dtype=torch.uint8, device=device)
                bufs["packed_in"] = torch.zeros((tokens, batch, row), dtype=torch.uint8, device=device)
                kv_codec.bit_shifts(device)
            if site.text and stale.text == "stale":
                # every strip's message in a row of bytes, rounded up to 4: each row's float32
                # log-sum-exps start aligned
                row = -(-plan.text_message_bytes(site) // 4) * 4
                bufs["text"] = torch.zeros((self.n, row), dtype=torch.uint8, device=device)
            return bufs
        return {}

    def begin_step(self, step: int) -> None:
        """Called by the sampling loop before each denoising step of a stage (`step`: the current
        stream's evaluations before this one)."""
        self.step = self.plan.step_plan(step, self.state.first_step)
        self.state.first_step = False
        if self.step.stale:
            self.scratch.clear()

    def drain(self) -> None:
        """Complete every posted exchange of every stream (before a new image, a capture or shutting down)."""
        for state in self.streams.values():
            self._drain(state)

    @staticmethod
    def _drain(state: ExchangeState) -> None:
        for p in state.pending.values():
            p.wait()
        state.pending.clear()

    def _wait(self, key: str) -> None:
        p = self.pending.pop(key, None)
        if p is not None:
            p.wait()

    def peer(self, strip: int) -> int:
        return self.patch_ranks[strip]

    def state_bytes(self) -> int:
        """Bytes of the exchange buffers this rank holds between steps, every stream's, by walking
        the storages (each counted once)."""
        seen, total = set(), 0
        streams = self.streams.values()
        tensors = [t for s in streams for bufs in s.buffers.values() for t in bufs.values()]
        tensors += list(self.scratch.values()) + [t for s in streams for p in s.pending.values() for t in p.tensors]
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        return total

    # ---- conv halos ------------------------------------------------------------------------
    def conv_input(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """`x` [B, C, h, W] with the halo rows of the strips above and below attached (zeros at the
        image edge, as the conv's own zero padding would give)."""
        site, bufs = self.plan.sites[key], self.buffers[key]
        halos = self.step.halos
        if site.first and halos == "stale":
            halos = "fresh"           # the latent rows exist before the step starts: never stale
        if halos == "zeros":
            return torch.cat([bufs["top"], x, bufs["bottom"]], dim=2)
        self._wait(key)
        if "payload" in bufs:
            return self._conv_input_all_gather(site, bufs, key, x, halos)
        sends, recvs = [], []
        up, down = self.plan.up, self.plan.down
        if "sends" in bufs:
            torch.stack([x[:, :, :site.bottom], x[:, :, x.shape[2] - site.top:]], out=bufs["sends"])
            sends = [(bufs["sends"][0], self.peer(up)), (bufs["sends"][1], self.peer(down))]
        else:
            if "to_up" in bufs:
                sends.append((bufs["to_up"].copy_(x[:, :, :site.bottom]), self.peer(up)))
            if "to_down" in bufs:
                sends.append((bufs["to_down"].copy_(x[:, :, x.shape[2] - site.top:]), self.peer(down)))
        if up is not None and site.top:
            recvs.append((bufs["top"], self.peer(up)))
        if down is not None and site.bottom:
            recvs.append((bufs["bottom"], self.peer(down)))
        kind = "latent_halo" if site.first else "conv_halo"
        if halos == "fresh":
            self.transport.start(sends, recvs, kind).wait()
            return torch.cat([bufs["top"], x, bufs["bottom"]], dim=2)
        out = torch.cat([bufs["top"], x, bufs["bottom"]], dim=2)   # the stale rows, read before the receive lands
        self.pending[key] = self.transport.start(sends, recvs, kind)
        return out

    def _conv_input_all_gather(self, site: Site, bufs: dict, key: str, x: torch.Tensor, halos: str) -> torch.Tensor:
        """The baselines' conv halos: every strip's boundary rows go to every rank; a rank keeps
        its neighbours' (`_unpack_halos`) once the receives complete."""
        h = x.shape[2]
        torch.cat([x[:, :, :site.bottom], x[:, :, h - site.top:]], dim=2, out=bufs["payload"])
        others = [j for j in range(self.n) if j != self.strip]
        sends = [(bufs["payload"], self.peer(j)) for j in others]
        recvs = [(bufs["gathered"][j], self.peer(j)) for j in others]
        if halos == "fresh":
            self.transport.start(sends, recvs, "conv_halo").wait()
            self._unpack_halos(site, bufs)
            return torch.cat([bufs["top"], x, bufs["bottom"]], dim=2)
        out = torch.cat([bufs["top"], x, bufs["bottom"]], dim=2)   # the stale rows, read before the receives land
        posted = self.transport.start(sends, recvs, "conv_halo")
        self.pending[key] = Pending([posted.wait, lambda: self._unpack_halos(site, bufs)], posted.tensors)
        return out

    def _unpack_halos(self, site: Site, bufs: dict) -> None:
        up, down = self.plan.up, self.plan.down
        if up is not None and site.top:
            bufs["top"].copy_(bufs["gathered"][up][:, :, site.bottom:])
        if down is not None and site.bottom:
            bufs["bottom"].copy_(bufs["gathered"][down][:, :, :site.bottom])

    # ---- attention K/V ---------------------------------------------------------------------
    @torch.compiler.disable
    def kv_buffer(self, key: str) -> tuple[torch.Tensor, int, int]:
        """The K/V buffer [tokens, B, 2*dim] of `key` for this step, laid out [from above | local |
        from below], and the token range of the local rows in it. Waits for last step's receives
        into it first."""
        site, kv = self.plan.sites[key], self.step.kv
        if kv == "whole" and self.mode != "full":
            shape = self.plan.kv_shape(site, "whole")
            buf = self.scratch.get(shape)
            if buf is None:
                buf = self.scratch[shape] = torch.empty(shape, dtype=self.plan.dtype, device=self.device)
        else:
            self._wait(key)
            buf = self.buffers[key]["kv"]
        return (buf,) + self.plan.local_tokens(site, kv)

    @torch.compiler.disable
    def exchange_kv(self, key: str, buf: torch.Tensor, before: bool) -> None:
        """Exchange the K/V buffer returned by `kv_buffer`, whose local rows the caller has written.

        Called twice per attention: `before=True` before attention reads the buffer (a synchronous
        step exchanges here and waits), `before=False` after (a stale step posts here the exchange
        whose data the next step will use; with the sign codec, its one-bit messages, decoded into
        the buffer when the next step waits for them)."""
        kv = self.step.kv
        if kv == "local" or before != (kv == "whole"):
            return
        site = self.plan.sites[key]
        start, end = self.plan.local_tokens(site, kv)
        sends, recvs = self._kv_routes(site, kv, start, end)
        bufs = self.buffers.get(key, {})
        if kv != "whole" and "mirror" in bufs:
            codec = self._codec()
            for a, b in _spans([rows for rows, _ in sends]):     # only the rows sent (partial: its windows)
                codec.encode(buf[start + a:start + b], bufs["mirror"][a:b], bufs["drift"][start + a:start + b],
                             bufs["packed_out"][a:b])
            packed_in = bufs["packed_in"]
            posted = self.transport.start([(bufs["packed_out"][a:b], peer) for (a, b), peer in sends],
                                          [(packed_in[a:b], peer) for (a, b), peer in recvs], "attn_kv")
            decode = [lambda a=a, b=b: codec.decode(packed_in[a:b], buf[a:b], bufs["drift"][a:b])
                      for (a, b), _ in recvs]
            self.pending[key] = Pending([posted.wait] + decode, posted.tensors)
            return
        pending = self.transport.start([(buf[start + a: start + b], peer) for (a, b), peer in sends],
                                       [(buf[a:b], peer) for (a, b), peer in recvs], "attn_kv")
        if kv != "whole":
            self.pending[key] = pending
            return
        pending.wait()
        if self.plan.stale_step.kv == "stale-window":
            self._seed_window(key, buf)
        if "mirror" in bufs:
            # the codec's mirrors start from this exact K/V (the receivers' copies are these bits)
            bufs["mirror"].copy_(buf[start:end])
            bufs["drift"].zero_()

    def _codec(self):
        """The K/V codec's implementation: PyTorch ops, or one Triton launch per message
        (`--kernels triton`; parafuse_kernels.kv_codec, the same bits on decode)."""
        if self.kernels == "triton":
            from parafuse_kernels import kv_codec as fused
            return fused
        return kv_codec

    def _kv_routes(self, site: Site, kv: str, start: int, end: int) -> tuple[list, list]:
        """Token ranges of a K/V exchange: sends [((a, b), peer)] in the local tokens (0 = the first
        local token), receives [((a, b), peer)] in the buffer. The whole image: the strip to every
        rank, each strip's tokens from it; windows: the first / last window rows of each grid up /
        down (`PatchPlan.window_spans`), the neighbours' one after another above / below the local
        tokens. A pair of ranks matches its messages in posting order: both post them by grid."""
        plan, i = self.plan, self.strip
        if kv in ("whole", "stale-whole"):
            others = [j for j in range(self.n) if j != i]
            return ([((0, end - start), self.peer(j)) for j in others],
                    [((plan.strip_start(site, j), plan.strip_start(site, j + 1)), self.peer(j)) for j in others])
        sends, recvs = [], []
        for j, down, at in ((plan.up, False, 0), (plan.down, True, end)):
            if j is None:
                continue
            sends += [(span, self.peer(j)) for span in plan.window_spans(site, i, down)]
            for a, b in plan.window_spans(site, j, not down):
                recvs.append(((at, at + b - a), self.peer(j)))
                at += b - a
        return sends, recvs

    def _seed_window(self, key: str, whole: torch.Tensor) -> None:
        """After a synchronous step in partial mode, copy the neighbours' tokens that the window keeps
        (laid out as `_kv_routes` receives them) from the whole K/V `whole` (each strip's tokens at
        its place), so that the first stale step has a stale window to use."""
        site, plan, i = self.plan.sites[key], self.plan, self.strip
        win = self.buffers[key]["kv"]
        below = plan.kv_tokens(site, "stale-window")[1]
        for j, at in ((plan.up, 0), (plan.down, win.shape[0] - below)):
            if j is None:
                continue
            first = plan.strip_start(site, j)
            for a, b in plan.window_spans(site, j, down=j < i):
                win[at: at + b - a].copy_(whole[first + a: first + b])
                at += b - a

    # ---- joint attention: text queries over every strip's image keys ----------------------------
    @torch.compiler.disable
    def merge_text(self, key: str, out: torch.Tensor, lse: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Joint attention `key`'s text queries over the keys of every strip, from this strip's
        partial result: `out` [B, heads, L, d] (softmax-weighted values over this strip's keys,
        float32) and its log-sum-exp `lse` [B, heads, L]. Returns a function that completes the
        merge and returns the merged output [B, heads, L, d]; call it as late as possible (after
        the image attention), so that the exchange runs behind that compute. The step plan says how
        (`StepPlan.text`), all under the kind `text_attn`; gather and stale send each strip's output
        in the compute dtype and its lse in float32 (one message a peer, `text_partials`):

            exact    lse all-gathered (small; waited here), `out` reweighted by exp(lse - total),
                     rounded to the compute dtype (`PatchPlan.text_dtype`) and all-reduced
                     (waited by the returned function; the sum arrives in that dtype)
            gather   every strip's (out, lse) all-gathered and merged in rank order (exact, the
                     same bits on every rank); fills the buffer that stale steps read
            stale    this strip's (out, lse) merged with the other strips' of the previous step;
                     this step's sent to them behind compute, for the next step. Nothing waits."""
        how = self.step.text
        if how == "exact":
            everyone = self.gather_rows(lse[None], 0, (1,) * self.n, kind="text_attn")
            weighted = out.mul_(torch.exp(lse - torch.logsumexp(everyone, 0))[..., None]).to(self.plan.text_dtype)
            posted = self.transport.all_reduce(weighted, "text_attn")
            return lambda: (posted.wait(), weighted)[1]
        pending_key = key + "/text"
        self._wait(pending_key)
        site = self.plan.sites[key]
        messages, lses, outs = text_partials(self.buffers[key]["text"], self.plan.text_shape(site),
                                             self.plan.text_message_bytes(site), self.plan.text_dtype)
        lses[self.strip].copy_(lse)
        outs[self.strip].copy_(out)            # rounded to the compute dtype, as the peers receive it
        others = [j for j in range(self.n) if j != self.strip]
        sends = [(messages[self.strip], self.peer(j)) for j in others]
        recvs = [(messages[j], self.peer(j)) for j in others]
        if how == "gather":
            posted = self.transport.start(sends, recvs, "text_attn")
            return lambda: (posted.wait(), merge_partials(outs, lses))[1]
        merged = merge_partials(outs, lses)    # read the previous step's rows before the receives land
        self.pending[pending_key] = self.transport.start(sends, recvs, "text_attn")
        return lambda: merged

    # ---- GroupNorm statistics --------------------------------------------------------------
    def norm_sums(self, key: str) -> torch.Tensor:
        """The float32 [2, B, G] buffer into which the layer writes this strip's Σx and Σx²."""
        self._wait(key)
        bufs = self.buffers[key]
        return bufs.get("local", bufs["sums"])

    def norm_statistics(self, key: str) -> tuple[torch.Tensor, float, torch.Tensor | None, float]:
        """(sums, count, fallback, fallback_count): [Σx, Σx²] per (sample, group) over `count`
        elements - of the whole image, or the mode's estimate of it - from the sums written into
        `norm_sums(key)`; where `fallback` is given (corrected mode), the variance of `sums` can
        come out negative and `fallback` (this strip's own sums) is to be used there. Call
        `norm_done(key)` once the layer has read them.

        Buffers: `local` (this step's sums, when stale steps follow), `previous` (last step's
        local sums, corrected mode) and `sums`, reduced in place: after a stale step's reduction
        completes it holds last step's global sums."""
        site, bufs, norm = self.plan.sites[key], self.buffers[key], self.step.norm
        n_local, n_total = self.plan.norm_counts(site)
        local, sums = bufs.get("local", bufs["sums"]), bufs["sums"]
        if norm == "local":
            return local, n_local, None, 1.0
        if norm == "exact":
            if "local" in bufs:                # stale steps follow: keep this step's local sums
                sums.copy_(local)
            if "previous" in bufs:
                bufs["previous"].copy_(local)
            self._reduce_sums(bufs).wait()
            return sums, n_total, None, 1.0
        if norm == "stale":
            return sums, n_total, None, 1.0
        # corrected (DistriFusion): last step's global sums with this strip's part made fresh
        return torch.sub(sums, bufs["previous"]).add_(local), n_total, local, n_local

    def check_statistics(self) -> None:
        """After an evaluation: set the device flag `nonfinite` if any GroupNorm statistics it used
        were NaN or ±Inf - this strip's sums, and the reduced ones where no reduction is in flight.
        A strip's Σx² that overflows makes the exchanged variance infinite and the normalised output
        zero: finite, so the latent alone would never show it (one process's GroupNorm makes NaN).
        One check over every site per evaluation (a few launches, no host sync), none inside the
        layers; the finite-value watch reads the flag with the latent (parafuse.health)."""
        parts = []
        for key, bufs in self.buffers.items():
            if "sums" not in bufs:
                continue
            if "local" in bufs:
                parts.append(bufs["local"].reshape(-1))
            if key not in self.pending:
                parts.append(bufs["sums"].reshape(-1))
        if not parts:
            return
        if self.nonfinite is None or self.nonfinite.device != parts[0].device:
            self.nonfinite = torch.zeros((), dtype=torch.bool, device=parts[0].device)
        torch.logical_or(self.nonfinite, ~torch.isfinite(torch.cat(parts)).all(), out=self.nonfinite)

    def norm_done(self, key: str) -> None:
        """After the layer has used this step's statistics: a stale step posts the reduction of
        this step's local sums, for the next step to use."""
        bufs, norm = self.buffers[key], self.step.norm
        if norm not in ("stale", "corrected"):
            return
        if norm == "corrected":
            bufs["previous"].copy_(bufs["local"])
        bufs["sums"].copy_(bufs["local"])
        self.pending[key] = self._reduce_sums(bufs)

    def _reduce_sums(self, bufs: dict) -> Pending:
        """Sum `bufs["sums"]` in place over the strips: one all-reduce, or (the baselines) every
        strip's sums sent to every rank and added in rank order - the same bits."""
        sums = bufs["sums"]
        if "gathered" not in bufs:
            return self.transport.all_reduce(sums, "norm_stats")
        parts = bufs["gathered"]
        parts[self.strip].copy_(sums)
        others = [j for j in range(self.n) if j != self.strip]
        posted = self.transport.start([(parts[self.strip], self.peer(j)) for j in others],
                                      [(parts[j], self.peer(j)) for j in others], "norm_stats")
        return Pending([posted.wait, lambda: sums.copy_(sum_in_rank_order(parts))], posted.tensors)

    def norm_moments(self, key: str) -> torch.Tensor:
        """[mean, biased variance] [2, B, G] of `norm_statistics(key)`, with its fallback applied."""
        sums, count, fallback, fallback_count = self.norm_statistics(key)
        moments = moments_from_sums(sums, count)
        if fallback is not None:
            moments = torch.where(moments[1] < 0, moments_from_sums(fallback, fallback_count), moments)
        return moments

    # ---- whole-tensor collectives ----------------------------------------------------------
    @torch.compiler.disable
    def gather_output(self, out: torch.Tensor) -> None:
        """The baselines' per-step all-gather of the model output [B, C, rows, W] (what
        DistriFusion's redundant scheduler consumes; see the module docstring). Parafuse's own
        modes keep the latent sharded and send nothing here."""
        if self.settings.pattern == "all-gather" and self.settings.exchanges:
            self.gather_rows(out, 2, self.plan.geometry.rows)

    @torch.compiler.disable
    def gather_rows(self, x: torch.Tensor, dim: int, rows: tuple[int, ...], dst: int | None = None,
                    kind: str = "gather") -> torch.Tensor | None:
        """Concatenate every strip's `x` along `dim` (strip j has rows[j] there), on every rank
        (dst None) or only on strip `dst` (others get None)."""
        shape = list(x.shape)
        parts = []
        for j, r in enumerate(rows):
            shape[dim] = r
            parts.append(x if j == self.strip else x.new_empty(shape))
        x = x.contiguous()
        sends, recvs = [], []
        for j in range(self.n):
            if j == self.strip:
                continue
            if dst is None or j == dst:
                sends.append((x, self.peer(j)))
            if dst is None or self.strip == dst:
                recvs.append((parts[j], self.peer(j)))
        self.transport.start(sends, recvs, kind).wait()
        if dst is not None and self.strip != dst:
            return None
        return torch.cat(parts, dim=dim)


def text_partials(raw: torch.Tensor, shape: tuple[int, int, int, int], message_bytes: int,
                  dtype: torch.dtype) -> tuple[list, list, list]:
    """Views of the stale text merge's buffer `raw` [strips, row bytes] (uint8): per strip its
    message (the first `message_bytes` of its row: what is sent), its log-sum-exps [B, heads, L]
    (float32, first) and its output [B, heads, L, d] (`dtype`, the compute dtype, after them)."""
    b, heads, text, d = shape
    lse_bytes = b * heads * text * 4
    messages = [row[:message_bytes] for row in raw]
    lses = [m[:lse_bytes].view(torch.float32).view(b, heads, text) for m in messages]
    outs = [m[lse_bytes:].view(dtype).view(b, heads, text, d) for m in messages]
    return messages, lses, outs


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Softmax attention over the union of the strips' keys, from each strip's partial result:
    outs[j] its output over its own keys, lses[j] their log-sum-exp (float32). In float32 (a
    compute-dtype output is promoted by its weight), added in strip order: the same bits wherever
    it is computed."""
    lse = torch.stack(lses)
    weights = torch.exp(lse - torch.logsumexp(lse, 0))[..., None]
    return sum_in_rank_order([outs[j] * weights[j] for j in range(len(outs))])


def moments_from_sums(sums: torch.Tensor, count: float) -> torch.Tensor:
    """[mean, biased variance] from [Σx, Σx²] over `count` elements."""
    m = sums * (1.0 / count)
    m[1].addcmul_(m[0], m[0], value=-1.0)
    return m
