"""How much of a DiT's self-attention falls inside `partial`'s window: why `partial` keeps or loses quality.

During one serial generation, every self-attention layer's probabilities are recorded at every step,
and for each query the mass on the keys that `partial` at N strips and portion p lets its rank see
(its own strip's token rows plus ceil(p · strip rows), at least 1, of each neighbour's) is summed;
the rest of the mass is what `partial` drops (`full` keeps it, stale). Uniform attention would put
(strip rows + 2·window) / image rows of its mass inside; a model whose attention is local puts ~1.

    python benchmarks/attention_reach.py --models dit-texture dit-small --size 256 --ranks 8 --portions 0.1 0.3 0.5
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_run, add_seeds, config_of, parser, patch_config, provenance, table, write_result  # noqa: E402

from parafuse.models import load_model  # noqa: E402
from parafuse.models.layers import Attention  # noqa: E402
from parafuse.parallel.geometry import StripGeometry  # noqa: E402
from parafuse.parallel.plan import window_rows  # noqa: E402
from parafuse.runtime import Request, Runtime  # noqa: E402


def visible_mask(rows: tuple[int, ...], width: int, portion: float) -> torch.Tensor:
    """[L, L] bool: query token i may attend key token j under `partial` (row-major tokens, strips of `rows`)."""
    row_strip = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
    starts = torch.tensor([0] + list(rows)).cumsum(0)
    lo, hi = starts[:-1], starts[1:]
    below = [window_rows(r, portion) for r in rows]                   # each strip's window
    first = torch.tensor([lo[s] - (below[s - 1] if s else 0) for s in range(len(rows))])
    last = torch.tensor([hi[s] + (below[s + 1] if s + 1 < len(rows) else 0) for s in range(len(rows))])
    key_row = torch.arange(sum(rows))
    ok = (key_row[None] >= first[row_strip][:, None]) & (key_row[None] < last[row_strip][:, None])    # [H, H]
    return ok.repeat_interleave(width, 0).repeat_interleave(width, 1)


def measure(model, size: int, steps: int, seed: int, masks: dict) -> dict:
    """Mean attention mass inside each mask over layers, heads, queries and steps of one serial run."""
    mass = {k: [] for k in masks}

    def hook(module, args, kwargs, out):
        x = args[0]
        if kwargs.get("context", args[1] if len(args) > 1 else None) is not None:
            return
        if x.shape[1] != next(iter(masks.values())).shape[0]:
            return                      # the runtime's FLOP trace at small sizes, not the image
        q, k = module.split_heads(module.to_q(x)), module.split_heads(module.to_k(x))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)     # [B, heads, L, L]
        for key, m in masks.items():
            mass[key].append((p * m).sum(-1).mean().item())

    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
             if isinstance(m, Attention) and not m.is_cross]
    try:
        Runtime(model, patch_config()).generate(Request(size, size, steps, "dpmpp-2m", 1.0, seed,
                                                          0 if model.spec.num_classes else None))
    finally:
        for h in hooks:
            h.remove()
    return {k: statistics.mean(v) for k, v in mass.items()}


def main(argv=None) -> int:
    p = parser(__doc__, "attention_reach_cpu")
    add_run(p, models=["dit-texture", "dit-small"], size=256, steps=20, ranks=[8], portions=[0.1, 0.3, 0.5])
    add_seeds(p, [0, 1])
    a = p.parse_args(argv)
    prov = provenance(argv)
    torch.set_num_threads(1)
    rows = []
    for name in a.models:
        model = load_model(name)
        spec = model.spec
        if spec.arch != "dit":
            raise SystemExit(f"attention_reach.py measures DiTs (one attention level); {name!r} is a {spec.arch}")
        latent = a.size // spec.codec_factor
        tokens = latent // spec.downsample_factor
        masks = {}
        for n in a.ranks:
            geo = StripGeometry(latent, latent, n, spec.downsample_factor)
            strip_rows = geo.level(spec.downsample_factor).rows
            for portion in a.portions:
                masks[(n, portion)] = visible_mask(strip_rows, tokens, portion).float()
        per_seed = [measure(model, a.size, a.steps, seed, masks) for seed in a.seeds]
        for (n, portion), m in masks.items():
            inside = [s[(n, portion)] for s in per_seed]
            rows.append({"model": name, "size": a.size, "n": n, "portion": portion, "seeds": len(a.seeds),
                         "mass_inside": statistics.mean(inside), "uniform_inside": m.mean().item()})
    print(table(rows, [("model", "model"), ("size", "size"), ("n", "N"), ("portion", "p"), ("seeds", "seeds"),
                       ("mass_inside", "attention mass inside partial's window"),
                       ("uniform_inside", "uniform attention's")]))
    path = write_result(a.name, "attention_reach", config_of(a), rows, prov)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
