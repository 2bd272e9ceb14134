"""Strip geometry: which latent rows each rank owns, at every level of a model, and the halo each
convolution needs. Pure functions of (height, width, number of strips, model unit).

Strips are cut in *units* of the model's downsample factor, so that every strip has a whole
number of rows at every level (a stride-2 conv never straddles a strip boundary). Units are
spread as evenly as possible: the first `units % n` strips get one more, so any n works.

A token sequence may hold several grids one after another (Flux Kontext appends the conditioning
image's tokens to the latent's): `others` are the grids after the first, each cut into the same
number of strips by the same rule, and strip i holds its rows of every grid (`token_spans`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property


class GeometryError(ValueError):
    """A resolution / strip-count combination that cannot be split; the message says what to change."""


def conv_halo(kernel: int, stride: int, padding: int, dilation: int = 1) -> tuple[int, int]:
    """Rows above and below a strip that a conv needs, for a strip whose first row is a multiple of
    `stride`: output rows [a/s, b/s) read input rows [a - p, b - s - p + d(k-1) + 1)."""
    return padding, max(0, dilation * (kernel - 1) - padding - stride + 1)


@dataclass(frozen=True)
class Level:
    """One resolution level inside the model: `factor` latent rows per row here."""
    factor: int
    rows: tuple[int, ...]       # rows of every strip at this level
    width: int                  # columns (strips are full-width)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for r in self.rows:
            out.append(acc)
            acc += r
        return tuple(out)

    @property
    def height(self) -> int:
        return sum(self.rows)


@dataclass(frozen=True)
class StripGeometry:
    height: int                 # latent rows of the whole image
    width: int                  # latent columns
    n: int                      # number of strips
    unit: int                   # model downsample factor: strips are cut in multiples of this
    # (height, width) of each further grid of a token sequence, after this one, in sequence order
    others: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.n < 1:
            raise GeometryError(f"need at least one strip, got {self.n}")
        if self.height % self.unit or self.width % self.unit:
            raise GeometryError(f"latent size {self.height}x{self.width} is not a multiple of the model's "
                                f"downsample factor {self.unit}")
        if self.height // self.unit < self.n:
            raise GeometryError(
                f"latent height {self.height} has only {self.height // self.unit} rows of {self.unit} "
                f"(the model's downsample factor), fewer than the {self.n} strips: use fewer GPUs or a "
                f"taller image (at least {self.n * self.unit} latent rows)")
        for k, (h, w) in enumerate(self.others, 1):
            try:
                StripGeometry(h, w, self.n, self.unit)
            except GeometryError as e:
                raise GeometryError(f"grid {k + 1} of the token sequence ({h}x{w}, after the latent's "
                                    f"{self.height}x{self.width}): {e}") from None

    @cached_property
    def grids(self) -> tuple[StripGeometry, ...]:
        """Every grid of the token sequence, in sequence order: this one (without `others`), then each
        of `others`, all cut into `n` strips in units of `unit`."""
        return (replace(self, others=()),) + tuple(StripGeometry(h, w, self.n, self.unit) for h, w in self.others)

    def tokens(self, factor: int) -> tuple[int, ...]:
        """Tokens of every strip at level `factor`: its rows times the width, summed over the grids."""
        levels = [g.level(factor) for g in self.grids]
        return tuple(sum(lv.rows[j] * lv.width for lv in levels) for j in range(self.n))

    def token_spans(self, strip: int, factor: int = 1) -> list[tuple[int, int]]:
        """Strip `strip`'s tokens [a, b) of the whole sequence at level `factor` (the grids one after
        another, each row-major), one span per grid."""
        spans, start = [], 0
        for lv in (g.level(factor) for g in self.grids):
            top = start + lv.offsets[strip] * lv.width
            spans.append((top, top + lv.rows[strip] * lv.width))
            start += lv.height * lv.width
        return spans

    @property
    def units(self) -> tuple[int, ...]:
        total = self.height // self.unit
        base, extra = divmod(total, self.n)
        return tuple(base + (1 if r < extra else 0) for r in range(self.n))

    def level(self, factor: int) -> Level:
        if self.unit % factor or self.width % factor:
            raise GeometryError(f"no level with factor {factor} in a model whose unit is {self.unit}")
        return Level(factor, tuple(u * self.unit // factor for u in self.units), self.width // factor)

    @property
    def rows(self) -> tuple[int, ...]:
        return self.level(1).rows

    def row_range(self, rank: int) -> tuple[int, int]:
        lv = self.level(1)
        return lv.offsets[rank], lv.offsets[rank] + lv.rows[rank]

    def level_of_width(self, width: int) -> Level:
        """The level whose column count is `width` (strips are full-width, so width names the level)."""
        if width <= 0 or self.width % width:
            raise GeometryError(f"activation width {width} is not a level of a {self.width}-wide latent")
        return self.level(self.width // width)

    def level_of_tokens(self, tokens: int, strip: int) -> Level:
        """The level at which strip `strip` holds `tokens` positions (its rows times the level's
        width), for a flattened activation that has lost its width: at most one level matches,
        since a strip's positions shrink with the square of the level's factor."""
        for factor in (f for f in range(1, self.unit + 1) if self.unit % f == 0):
            level = self.level(factor)
            if level.rows[strip] * level.width == tokens:
                return level
        raise GeometryError(f"{tokens} tokens are no level of strip {strip} of a {self.height}x{self.width} latent "
                            f"split into {self.n}")

    def check_halo(self, factor: int, top: int, bottom: int, what: str) -> None:
        """Raise before any compute if a neighbour strip is thinner than the halo taken from it."""
        lv = self.level(factor)
        need = max(top, bottom)
        if need and min(lv.rows) < need:
            raise GeometryError(
                f"{what} needs {need} halo rows from each neighbour at 1/{factor} resolution, but a strip "
                f"has only {min(lv.rows)} rows there ({self.n} strips over {self.height} latent rows): "
                f"use fewer GPUs or a taller image")
