"""What the K/V codec tests compare: every rank's received rows against their sender's mirror."""


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
            site, lv, i = eng.plan.sites[key], eng.plan.level(eng.plan.sites[key]), eng.strip
            w, kv = lv.width, bufs["kv"]
            if eng.mode == "full":
                for j in range(eng.n):
                    if j != i:
                        theirs = runtimes[j].engine.buffers[key]["mirror"]
                        pairs.append((kv[lv.offsets[j] * w:(lv.offsets[j] + lv.rows[j]) * w], theirs))
            else:
                above, below = eng.plan.kv_rows(site, "stale-window")
                if above:
                    pairs.append((kv[:above * w], runtimes[i - 1].engine.buffers[key]["mirror"][-above * w:]))
                if below:
                    pairs.append((kv[kv.shape[0] - below * w:], runtimes[i + 1].engine.buffers[key]["mirror"][:below * w]))
    return pairs
