"""Would a cheap far-field summary close `partial`'s quality gap on a DiT? Measured without staleness.

During a serial generation every self-attention layer is replaced (a swapped module, from outside
the model) by a strip-wise approximation for all N strips at once: the queries of strip i attend to
  [ own strip's K/V exact | ceil(p·rows) rows (>= 1) of each neighbour's K/V exact (partial's window) |
    the remaining ("far") tokens' K/V average-pooled over blocks of r × r tokens ],
each pooled key carrying a logit bias ln(c), c = the number of far tokens it averages (exact when
those keys are equal: c equal keys get c times the weight of one). Blocks are cut inside each strip
(rows grouped by r from the strip's top, columns by r), since a rank owns only its rows: rank s can
send one pooled summary of its strip (with the counts fixed by the geometry), and a receiver takes
the window rows it also holds out of a block's mean exactly (mean · c minus their sum).
The first `warmup` steps stay exact (partial's synchronous warmup); the final image is compared (PSNR)
with the plain serial image of the same seed.

Bytes per rank per step, as a share of DistriFusion's whole-K/V all-gather (closed form; rank s owns
h_s token rows of W tokens, sends K and V of C channels per layer; the busiest rank is reported):
    DistriFusion:  2·C · h_s·W · (N−1)                           (its strip to every other rank)
    window:        2·C · w_s·W · n_s                             (w_s = min(h_s, max(1, ceil(p·h_s))) rows
                                                                  to each of its n_s <= 2 neighbours)
    pooled far:    2·C · ceil(h_s/r)·ceil(W/r) · (N−1)           (its strip's summary to every other rank)
so an interior rank of uniform strips sends (2w + ceil(h/r)·ceil(W/r)·(N−1)/W) / (h·(N−1)) of
DistriFusion's K/V bytes (= 2w/(h(N−1)) + 1/(r·min(r, h)) when r divides W, and h or r >= h).

    python benchmarks/far_field.py --model dit-texture --size 256 --ranks 8 --portions 0.3 0.1 --radii 2 4 8 --warmups 0 4 --seeds 0 1 2 3
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_run, add_seeds, config_of, hardware, parser, patch_config, provenance, save_plot,  # noqa: E402
                    table, write_result)

from parafuse.models import load_model  # noqa: E402
from parafuse.models.layers import Attention  # noqa: E402
from parafuse.parallel.geometry import StripGeometry  # noqa: E402
from parafuse.parallel.plan import window_rows  # noqa: E402
from parafuse.report import psnr  # noqa: E402
from parafuse.runtime import Request, Runtime  # noqa: E402


def strip_windows(rows: tuple[int, ...], portion: float) -> list[int]:
    """Rows of each strip that `partial` shows its neighbours (parafuse.parallel.plan.window_rows)."""
    return [window_rows(r, portion) for r in rows]


def strip_plan(rows: tuple[int, ...], width: int, portion: float | None, radius: int | None) -> list[dict]:
    """Per strip: its query tokens, the exact key tokens (own strip + neighbours' windows; own strip
    only when `portion` is None), and the far pooling [M, L] (block means over far tokens) with the
    bias ln(count) of each pooled key; no pooled keys when `radius` is None (the window alone)."""
    n_rows = sum(rows)
    starts = [sum(rows[:s]) for s in range(len(rows))]
    token_row = torch.arange(n_rows * width) // width
    token_col = torch.arange(n_rows * width) % width
    # block id of every token: (strip, row group inside the strip, column group)
    block = torch.empty(n_rows * width, dtype=torch.long)
    if radius is not None:
        first = 0
        for s, (start, h) in enumerate(zip(starts, rows)):
            inside = (token_row >= start) & (token_row < start + h)
            groups_w = math.ceil(width / radius)
            block[inside] = first + ((token_row[inside] - start) // radius) * groups_w + token_col[inside] // radius
            first += math.ceil(h / radius) * groups_w
        blocks = nn.functional.one_hot(block, first).T.float()                     # [M, L]
    win = strip_windows(rows, portion) if portion is not None else None
    plans = []
    for s, (start, h) in enumerate(zip(starts, rows)):
        lo, hi = start, start + h
        if win is not None:
            lo -= win[s - 1] if s else 0
            hi += win[s + 1] if s + 1 < len(rows) else 0
        exact = (token_row >= lo) & (token_row < hi)
        plan = {"queries": ((token_row >= start) & (token_row < start + h)).nonzero().squeeze(1),
                "exact": exact.nonzero().squeeze(1)}
        if radius is not None:
            far = blocks * (~exact).float()[None]
            count = far.sum(1)
            keep = count > 0
            plan["pool"] = far[keep] / count[keep, None]
            plan["bias"] = count[keep].log()
        plans.append(plan)
    return plans


def strip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: list[dict]) -> torch.Tensor:
    """[B, heads, L, d] -> [B, heads, L, d]: each strip's queries over its exact keys and pooled far keys."""
    out = torch.empty_like(q)
    scale = 1 / math.sqrt(q.shape[-1])
    for plan in plans:
        qs = q[:, :, plan["queries"]]
        keys, values = k[:, :, plan["exact"]], v[:, :, plan["exact"]]
        logits = qs @ keys.transpose(-1, -2) * scale
        if "pool" in plan:
            pk, pv = plan["pool"] @ k, plan["pool"] @ v                     # [B, heads, M, d]
            logits = torch.cat([logits, qs @ pk.transpose(-1, -2) * scale + plan["bias"]], dim=-1)
            values = torch.cat([values, pv], dim=-2)
        out[:, :, plan["queries"]] = torch.softmax(logits, dim=-1) @ values
    return out


class StripApproxAttention(nn.Module):
    """Swapped in for a DiT block's self-attention: the same projections, the strip-wise approximation."""

    def __init__(self, inner: Attention, plans: list[dict], tokens: int, warmup: int):
        super().__init__()
        self.inner, self.plans, self.tokens, self.warmup = inner, plans, tokens, warmup
        self.calls = 0

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] != self.tokens:
            return self.inner(x, context)       # the runtime's FLOP trace at small sizes, not the image
        self.calls += 1
        if self.calls <= self.warmup:
            return self.inner(x, context)       # partial's synchronous warmup steps see the whole image
        a = self.inner
        q, k, v = a.split_heads(a.to_q(x)), a.split_heads(a.to_k(x)), a.split_heads(a.to_v(x))
        out = strip_attention(q, k, v, self.plans)
        return a.to_out(out.transpose(1, 2).reshape(x.shape))


def generate(model, size: int, steps: int, seed: int, plans: list[dict] | None = None, tokens: int = 0,
             warmup: int = 0) -> torch.Tensor:
    """The serial image; with `plans`, every self-attention approximated after `warmup` exact steps
    (one model evaluation per step: guidance 1)."""
    saved = [blk.attn for blk in model.blocks]
    if plans is not None:
        for blk in model.blocks:
            blk.attn = StripApproxAttention(blk.attn, plans, tokens, warmup)
    try:
        req = Request(size, size, steps, "dpmpp-2m", 1.0, seed, 0 if model.spec.num_classes else None)
        return Runtime(model, patch_config()).generate(req).image
    finally:
        for blk, attn in zip(model.blocks, saved):
            blk.attn = attn


def kv_share(rows: tuple[int, ...], width: int, portion: float | None, radius: int | None) -> float:
    """Busiest rank's K/V elements sent per layer over its DistriFusion all-gather (docstring formula)."""
    n = len(rows)
    win = strip_windows(rows, portion) if portion is not None else [0] * n
    shares = []
    for s, h in enumerate(rows):
        sent = win[s] * width * ((s > 0) + (s + 1 < n))
        if radius is not None:
            sent += math.ceil(h / radius) * math.ceil(width / radius) * (n - 1)
        shares.append((sent, h * width * (n - 1)))
    sent, base = max(shares)
    return sent / base


def variants(portions, radii):
    for portion in portions:
        yield portion, None                     # window only: partial without staleness
        for r in radii:
            yield portion, r                    # window + pooled far
    for r in radii:
        yield None, r                           # pooled far, no window


def main(argv=None) -> int:
    p = parser(__doc__, "far_field_cpu")
    add_run(p, model="dit-texture", size=256, steps=20, ranks=8, portions=[0.3, 0.1],
            warmups=[0, 4])         # exact steps first (partial's synchronous warmup); 0: every step approximated
    p.add_argument("--radii", nargs="+", type=int, default=[2, 4, 8])
    add_seeds(p, [0, 1, 2, 3])
    a = p.parse_args(argv)
    prov = provenance(argv)
    torch.set_num_threads(1)
    model = load_model(a.model)
    spec = model.spec
    if spec.arch != "dit":
        raise SystemExit(f"far_field.py swaps a DiT's self-attention; {a.model!r} is a {spec.arch}")
    latent = a.size // spec.codec_factor
    width = latent // spec.downsample_factor
    rows = StripGeometry(latent, latent, a.ranks, spec.downsample_factor).level(spec.downsample_factor).rows
    plans = {c: strip_plan(rows, width, *c) for c in variants(a.portions, a.radii)}
    per = {(w, *c): [] for w in a.warmups for c in plans}
    with torch.no_grad():
        for seed in a.seeds:
            ref = generate(model, a.size, a.steps, seed)
            for w, portion, radius in per:
                image = generate(model, a.size, a.steps, seed, plans[(portion, radius)], sum(rows) * width, w)
                per[(w, portion, radius)].append(psnr(image, ref))
                print(f"seed {seed} warmup {w} p={portion} r={radius}: {per[(w, portion, radius)][-1]:.2f} dB",
                      flush=True)
    out = []
    for (warmup, portion, radius), vals in per.items():
        out.append({"warmup": warmup, "portion": portion, "radius": radius,
                    "variant": ("window" if radius is None else "window + pooled far") if portion is not None
                    else "pooled far only", "seeds": len(vals), "psnr_db": statistics.mean(vals),
                    "psnr_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "psnr_per_seed": vals,
                    "kv_share": kv_share(rows, width, portion, radius)})
    hw = hardware()
    print(table(out, [("warmup", "exact warmup"), ("variant", "variant"), ("portion", "p"), ("radius", "r"), ("seeds", "seeds"),
                      ("psnr_db", "PSNR dB vs serial"), ("psnr_sd", "± sd"),
                      ("kv_share", "bytes / DistriFusion K/V (busiest rank)")]))
    path = write_result(a.name, "far_field", config_of(a), out, prov, hw, token_rows_per_strip=list(rows),
                        token_width=width)
    png = plot(out, a.name, f"{prov['command']}\n{hw['device']}, torch {hw['torch']}")
    print(f"wrote {path} and {png}")
    return 0


def plot(rows: list[dict], name: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    warmups = list(dict.fromkeys(r["warmup"] for r in rows))
    fig, axes = plt.subplots(1, len(warmups), figsize=(6 * len(warmups), 5), squeeze=False, sharey=True)
    for ax, warmup in zip(axes[0], warmups):
        mine = [r for r in rows if r["warmup"] == warmup]
        for portion in dict.fromkeys(r["portion"] for r in mine):
            pts = [r for r in mine if r["portion"] == portion]
            ax.errorbar([r["kv_share"] for r in pts], [r["psnr_db"] for r in pts],
                        yerr=[r["psnr_sd"] for r in pts], fmt="o", capsize=3,
                        label="no window" if portion is None else f"window p = {portion}")
            for r in pts:
                ax.annotate("window" if r["radius"] is None else f"r={r['radius']}", (r["kv_share"], r["psnr_db"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axvline(0.1, color="gray", ls=":", label="10% of DistriFusion")
        ax.set_xlabel("bytes per step, busiest rank / DistriFusion's K/V all-gather")
        ax.set_title(f"{warmup} exact warmup steps", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("PSNR vs serial image (dB), no staleness")
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    path = save_plot(fig, name)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
