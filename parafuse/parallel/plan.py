"""The patch plan: every parallel site of a model at one geometry, fixed before the first step.

A model's sites (which convolutions need halo rows, which GroupNorms need global statistics,
which self-attentions need neighbours' keys/values, and at which resolution level each runs) are
read once from a shape-only trace of the plain model (`parafuse.profile`). When a request's
geometry is known, `PatchPlan` fixes for this strip every site's rows, halos, K/V window and the
shapes of its exchange buffers, and the two step plans that the engine switches between:

    sync   every exchange complete before its layer runs (warmup steps, `sync` mode)
    stale  layers use what the neighbours sent during the previous step while this step's
           exchange runs behind compute (`full`, `partial`); the latent halo stays fresh
    local  no exchange at all (`none`, and `partial` with p = 0)

Nothing here touches tensors: the plan is a pure function of (sites, geometry, strip, settings).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass

import torch

from parafuse.parallel.config import Mode, PatchConfig
from parafuse.parallel.geometry import Level, StripGeometry


class SiteKind(enum.StrEnum):
    """What a parallel site needs of the other strips. A StrEnum: a kind is equal to, hashes as,
    prints and serializes as its old string ("conv", ...), so reports and string comparisons do
    not change."""
    CONV = "conv"              # a Conv2d whose kernel reaches across rows: halo rows of its neighbours
    NORM = "norm"              # a GroupNorm: statistics over the whole image
    ATTN = "attn"              # a self- (or joint) attention: keys/values of other strips
    POSITIONS = "positions"    # a grid position embedding: computed for the whole grid, sliced to the strip
    # diffusers' Downsample2D with padding=0: a layer to swap (`StripDownsample2D`), never a Site of
    # its own (the shape trace records none): its conv is the conv site
    DOWNSAMPLE = "downsample"


@dataclass(frozen=True)
class Site:
    key: str              # module path in the model
    kind: SiteKind        # a string is taken as its SiteKind (an unknown one refused: ValueError)
    factor: int           # latent rows per row at this site's level
    channels: int = 0     # conv input channels / GroupNorm channels / attention width
    groups: int = 0       # GroupNorm groups
    top: int = 0          # conv halo rows taken from the strip above / below
    bottom: int = 0
    first: bool = False   # a conv that reads the model input: its halo is the latent's, always fresh
    silu: bool = False    # a GroupNorm whose output's only reader is a SiLU (the traced graph says so)
    heads: int = 0        # joint text+image attention (SD3, Flux, Qwen-Image): its heads and replicated text tokens
    text: int = 0

    def __post_init__(self):
        object.__setattr__(self, "kind", SiteKind(self.kind))


@dataclass(frozen=True)
class StepPlan:
    name: str             # "sync" | "stale" | "local"
    halos: str            # "fresh" | "stale" | "zeros"
    kv: str               # "whole" (complete, exchanged before attention) | "stale-whole" | "stale-window" | "local"
    norm: str             # "exact" | "corrected" | "stale" | "local"
    # joint attention's text queries over every strip's image keys: "exact" (log-sum-exps gathered,
    # reweighted partial outputs all-reduced), "gather" (every strip's partial output and lse
    # all-gathered and merged in rank order: exact, and it seeds "stale"), "stale" (this strip's
    # partial fresh, the others' from the previous step, this step's sent behind compute)
    text: str = "exact"

    @property
    def stale(self) -> bool:
        return self.name == "stale"


SYNC = StepPlan("sync", "fresh", "whole", "exact")
LOCAL = StepPlan("local", "zeros", "local", "local")


def window_rows(rows: int, portion: float) -> int:
    """Rows of a strip of `rows` rows that its neighbours attend to in `partial` mode with halo
    portion p: ceil(p * rows), at least one (partial never silently degenerates to none), at most
    the whole strip."""
    return min(rows, max(1, math.ceil(portion * rows)))


class PatchPlan:
    """Sites and buffer shapes of one strip of one geometry, batch and dtype."""

    def __init__(self, sites: list[Site], geometry: StripGeometry, strip: int, batch: int, dtype: torch.dtype,
                 settings: PatchConfig):
        self.sites = {s.key: s for s in sites}
        self.geometry = geometry
        self.strip = strip
        self.batch = batch
        self.dtype = dtype
        self.settings = settings
        self.n = geometry.n
        if not settings.exchanges:
            self.sync_step = self.stale_step = LOCAL
        else:
            self.sync_step = SYNC
            mode = settings.computes
            kv = {Mode.SYNC: "whole", Mode.FULL: "stale-whole", Mode.PARTIAL: "stale-window"}[mode]
            self.stale_step = SYNC if mode == Mode.SYNC else StepPlan("stale", "stale", kv, settings.norm_mode.value)
            if settings.text_merge == "stale" and self.stale_step.stale:
                # synchronous steps gather every strip's partial text output, so the first stale
                # step finds its neighbours' previous ones
                self.sync_step = dataclasses.replace(SYNC, text="gather")
                self.stale_step = dataclasses.replace(self.stale_step, text="stale")

    @property
    def key(self) -> tuple:
        # the sites too: a model changed between images (a LoRA wrapped a layer) has other sites
        return (self.geometry, self.strip, self.batch, self.dtype, self.settings, tuple(self.sites.values()))

    def step_plan(self, step: int, first_of_image: bool) -> StepPlan:
        """The first step of an image and the warmup steps run synchronously."""
        if first_of_image or step < self.settings.warmup_steps:
            return self.sync_step
        return self.stale_step

    def level(self, site: Site) -> Level:
        return self.geometry.level(site.factor)

    @property
    def up(self) -> int | None:
        return self.strip - 1 if self.strip > 0 else None

    @property
    def down(self) -> int | None:
        return self.strip + 1 if self.strip < self.n - 1 else None

    # ---- attention -----------------------------------------------------------------------
    # A site's K/V are tokens: the rows of the strips times the width, over every grid of a token
    # sequence (`StripGeometry.tokens`); a buffer holds whole strips' tokens, each strip's in its own
    # order (attention does not depend on the order of its keys).
    def window_rows(self, level: Level, strip: int) -> int:
        """Rows of strip `strip` that its neighbours attend to in `partial` mode (`window_rows`)."""
        return window_rows(level.rows[strip], self.settings.halo_portion)

    def strip_tokens(self, site: Site) -> tuple[int, ...]:
        """Every strip's tokens at `site`."""
        return self.geometry.tokens(site.factor)

    def strip_start(self, site: Site, strip: int) -> int:
        """Where strip `strip`'s tokens start in a K/V buffer of every strip's (in strip order)."""
        return sum(self.strip_tokens(site)[:strip])

    def window_spans(self, site: Site, strip: int, down: bool) -> list[tuple[int, int]]:
        """The tokens [a, b) of strip `strip` (0 = its first) that its neighbour below (`down`) or
        above attends to in `partial` mode: the last or first window rows of each of its grids."""
        spans, start = [], 0
        for lv in (g.level(site.factor) for g in self.geometry.grids):
            rows, k = lv.rows[strip], self.window_rows(lv, strip)
            top = start + (rows - k) * lv.width if down else start
            spans.append((top, top + k * lv.width))
            start += rows * lv.width
        return spans

    def kv_tokens(self, site: Site, kv: str) -> tuple[int, int]:
        """Tokens from above and below in the K/V buffer of `site` for the step plan's `kv`."""
        tokens, i = self.strip_tokens(site), self.strip
        if kv in ("whole", "stale-whole"):
            return self.strip_start(site, i), sum(tokens[i + 1:])
        if kv == "stale-window":
            def shown(strip, down):
                return sum(b - a for a, b in self.window_spans(site, strip, down))
            return (shown(i - 1, True) if self.up is not None else 0,
                    shown(i + 1, False) if self.down is not None else 0)
        return 0, 0

    def local_tokens(self, site: Site, kv: str) -> tuple[int, int]:
        """The range [start, end) of this strip's own tokens in the K/V buffer of `site` for `kv`."""
        start = self.kv_tokens(site, kv)[0]
        return start, start + self.strip_tokens(site)[self.strip]

    def kv_shape(self, site: Site, kv: str) -> tuple[int, int, int]:
        above, below = self.kv_tokens(site, kv)
        return (above + self.strip_tokens(site)[self.strip] + below, self.batch, 2 * site.channels)

    def text_shape(self, site: Site) -> tuple[int, int, int, int]:
        """[B, heads, text tokens, head dim]: one strip's partial output of the text queries of
        joint attention `site` (its log-sum-exps: the same less the last)."""
        return (self.batch, site.heads, site.text, site.channels // site.heads)

    @property
    def text_dtype(self) -> torch.dtype:
        """The dtype of the partial text outputs both text merges send (the stale one to its peers,
        the exact one through its all-reduce): the compute dtype (the merged output is cast to it;
        rounding each strip's part costs about as much as that cast, tests/parallel/test_text_merge.py,
        benchmarks/peers.py). Their log-sum-exps stay float32: they are exponentiated, and bf16
        rounds an lse of 10 by up to 0.02: 2% on its weight."""
        return self.dtype

    def text_message_bytes(self, site: Site) -> int:
        """Bytes of one strip's partial text result as the stale text merge sends it: its
        log-sum-exps in float32, its output in `text_dtype`."""
        b, heads, text, d = self.text_shape(site)
        return b * heads * text * (4 + d * self.text_dtype.itemsize)

    # ---- conv halos ----------------------------------------------------------------------
    def halo_shapes(self, site: Site) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the rows attached above (`top`) and below (`bottom`) the strip: received from
        the neighbour, or zeros at the image edge (what the conv's own zero padding would give)."""
        w = self.level(site).width
        return (self.batch, site.channels, site.top, w), (self.batch, site.channels, site.bottom, w)

    def norm_counts(self, site: Site) -> tuple[float, float]:
        """Elements per (sample, group): in this strip, and in the whole image."""
        lv = self.level(site)
        per_row = site.channels // site.groups * lv.width
        return float(per_row * lv.rows[self.strip]), float(per_row * lv.height)
