"""A solver evaluation as explicit linear maps, for a fused kernel to apply in one pass.

Every solver step is linear in its tensors: x̂0 = p·x + q·raw (the prediction conversion), and
``_update`` builds x_next and the new history with ``combine`` - sums of python-float multiples of
x, x̂0 and the old history. So each tensor a step writes is Σ c_j·source_j over the tensors it
reads, with coefficients that depend only on the σ grid and the step index. ``linear_step`` finds
them without any solver-specific code: it runs the solver's own ``data_prediction`` and ``_update``
on float64 one-hot "probe" vectors, one per source (``combine`` is elementwise, so entry j of an
output is its coefficient on source j), and composes the two maps in float64.

Dynamic thresholding is not linear (a quantile over the whole image): with it, x̂0 is computed and
thresholded in torch and becomes a source itself. Classifier-free guidance is linear
(raw = uncond + g·(cond − uncond)), so with ``guidance`` given the sources are cond and uncond.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Slot = tuple[str, int | None]      # a state tensor: state[key] (None) or state[key][index]


def state_slots(state: dict) -> list[Slot]:
    """The tensors of a solver state, in a fixed order."""
    slots = []
    for key in sorted(state):
        value = state[key]
        if torch.is_tensor(value):
            slots.append((key, None))
        elif isinstance(value, list) and value and all(torch.is_tensor(t) for t in value):
            slots.extend((key, i) for i in range(len(value)))
    return slots


def get_slot(state: dict, slot: Slot) -> torch.Tensor:
    key, i = slot
    return state[key] if i is None else state[key][i]


def put_slot(state: dict, slot: Slot, t) -> None:
    key, i = slot
    if i is None:
        state[key] = t
    else:
        state[key][i] = t


@dataclass
class LinearStep:
    """One evaluation's update. ``sources`` name what it reads: "x", "raw" (the guided model output)
    or "cond" and "uncond", "x0" (only under thresholding), and old state slots. ``rows`` give every
    tensor it writes ("x_next" and computed new state slots) as coefficients over ``sources``.
    ``aliases``: new state slots that are an existing tensor (a source) passed through unchanged.
    ``template``: the new state with its python numbers and list shapes (tensor places to fill)."""
    sources: list
    rows: dict
    aliases: dict
    template: dict


def _one_hot(n: int, j: int) -> torch.Tensor:
    e = torch.zeros(n, dtype=torch.float64)
    e[j] = 1.0
    return e


def linear_step(solver, k: int, state: dict, guidance: float | None = None) -> LinearStep:
    """The update of evaluation ``k`` of ``solver`` from ``state`` as linear maps (see the module).
    ``guidance``: the CFG scale when the sources are to be cond and uncond (None: one raw output)."""
    slots = state_slots(state)
    n = 2 + len(slots)                               # probe basis of _update: x, x̂0, old slots
    probes = [_one_hot(n, j) for j in range(n)]
    probe_state = {key: (list(v) if isinstance(v, list) else v) for key, v in state.items()}
    for slot, e in zip(slots, probes[2:]):
        put_slot(probe_state, slot, e)
    x_next, new_state = solver._update(solver.start_index + k, k, probes[0], probes[1], dict(probe_state))

    names = ["x", "x0"] + slots
    rows, aliases, template = {}, {}, {key: (list(v) if isinstance(v, list) else v) for key, v in new_state.items()}
    for target, t in [("x_next", x_next)] + [(s, get_slot(new_state, s)) for s in state_slots(new_state)]:
        same = [name for name, e in zip(names, probes) if t is e]
        if same and target != "x_next":
            aliases[target] = same[0]
        else:
            rows[target] = [float(c) for c in t]

    if solver.thresholding:                          # x̂0 is thresholded in torch: it is a source
        return _pruned(names, rows, aliases, template)

    # compose with the prediction conversion x̂0 = p·x + q·raw
    p, q = (float(c) for c in solver.data_prediction(k, _one_hot(2, 0), _one_hot(2, 1)))
    raw = ["raw"] if guidance is None else ["cond", "uncond"]
    to_raw = [q] if guidance is None else [q * guidance, q * (1.0 - guidance)]
    for target, alias in list(aliases.items()):
        if alias == "x0":                            # x̂0 itself enters the history: now computed
            del aliases[target]
            rows[target] = [0.0, 1.0] + [0.0] * len(slots)
    composed = {}
    for target, row in rows.items():
        cx, c0 = row[0], row[1]
        composed[target] = [cx + c0 * p] + [c0 * c for c in to_raw] + row[2:]
    return _pruned(["x"] + raw + slots, composed, aliases, template)


def _pruned(sources, rows, aliases, template) -> LinearStep:
    """Keep only the sources some output reads (a zero coefficient is never multiplied: 0·inf stays
    out). Aliases name their tensor directly and need no column."""
    used = [j for j in range(len(sources)) if any(row[j] != 0.0 for row in rows.values())]
    return LinearStep([sources[j] for j in used], {t: [row[j] for j in used] for t, row in rows.items()},
                      aliases, template)
