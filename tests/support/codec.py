"""What the K/V codec tests compare: every rank's received rows against their sender's mirror."""
import torch


def mirror_pairs(runtimes):
    """For every attention site and every pair of neighbouring/other strips: (what rank r holds of
    strip j's K/V rows, strip j's own mirror of those rows)."""
    for rt in runtimes:
        rt.engine.drain()        # the last step's messages decoded
    pairs = []
    for rt in runtimes:
        eng = rt.engine
        for key, bufs in eng.buffers.items():
            if "mirror" not in bufs:
                continue
            site, i = eng.plan.sites[key], eng.strip
            kv = bufs["kv"]
            if eng.mode == "full":
                for j in range(eng.n):
                    if j != i:
                        theirs = runtimes[j].engine.buffers[key]["mirror"]
                        pairs.append((kv[eng.plan.strip_start(site, j):eng.plan.strip_start(site, j + 1)], theirs))
            else:
                above, below = eng.plan.kv_tokens(site, "stale-window")
                for j, held in ((i - 1, kv[:above]), (i + 1, kv[kv.shape[0] - below:])):
                    if held.shape[0]:
                        mirror = runtimes[j].engine.buffers[key]["mirror"]
                        shown = eng.plan.window_spans(site, j, down=j < i)
                        pairs.append((held, torch.cat([mirror[a:b] for a, b in shown])))
    return pairs
