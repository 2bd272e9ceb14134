"""The trace-driven estimate (benchmarks/project.py `replay_timeline`): hand-made timelines
with closed-form answers, its place between the other two bounds, and the recorder that makes the
timelines (parafuse.parallel.transport.TimelineRecorder) counting what NullTransport counts."""
import random

import pytest

from project import (Link, fifo_seconds, kind_seconds, pessimistic_seconds, project_rows,  # noqa: E402
                     replay_timeline, split_comm, step_seconds, timeline_bytes)

# 1 byte per second, no latency: a transfer takes its bytes in seconds
SLOW = Link("slow", bandwidth=1.0, latency=0.0, source="synthetic")


def tl(seconds, *events):
    return {"seconds": seconds, "graphed": False, "events": [list(e) for e in events]}


def test_an_all_reduce_posted_after_stale_traffic_waits_for_it():
    # K/V (3 s of link) posted at 0 and waited one step later; an all-reduce (1 s) posted at 1 and waited at once
    t = tl(10, (0, "wait_prev", 0, "attn_kv", 3, 1), (0, "post", 0, "attn_kv", 3, 1),
           (1, "post", 1, "norm_stats", 1, 1), (1, "wait", 1, "norm_stats", 1, 1))
    one = replay_timeline(t, SLOW, 2)
    # behind the K/V: posted at 1, it waits for the 2 s of K/V left, then takes its own 1
    assert one["step"] == pytest.approx(10 + 2 + 1) and one["stall"] == pytest.approx(3)
    # posted together, nothing overlaps: the existing pessimistic bound's serialised step
    both = tl(10, *[[0, *e[1:]] for e in t["events"]])
    assert replay_timeline(both, SLOW, 2)["step"] == pytest.approx(10 + 3 + 1)
    # on the opt-in stale communicator the all-reduce queues behind nothing, but shares the link with
    # the K/V still moving: half the bandwidth for its 1 s of bytes
    assert replay_timeline(t, SLOW, 2, stale_channel=True)["step"] == pytest.approx(10 + 2)
    # a link of its own for each communicator (the emulator's model): the all-reduce's own second
    assert replay_timeline(t, SLOW, 2, stale_channel=True, shared_link=False)["step"] == pytest.approx(10 + 1)


def test_two_communicators_on_one_link_split_its_bandwidth():
    from project import MAIN, STALE, SharedLink

    def finishes(shared):
        wire = SharedLink(shared)
        wire.post(0.0, "a", MAIN, 1.0, 2.0)      # 1 s of latencies, then 2 s of bytes
        wire.post(0.0, "b", STALE, 0.0, 2.0)     # 2 s of bytes at once
        return wire.drained(), wire.finish
    end, at = finishes(shared=True)
    # b alone moves 1 s of its bytes while a's latencies run, then both move at half the rate: b's last
    # second takes 2 (done at 3), a has 1 s left then, alone (done at 4)
    assert at == pytest.approx({"a": 4.0, "b": 3.0}) and end == pytest.approx(4.0)
    end, at = finishes(shared=False)
    assert at == pytest.approx({"a": 3.0, "b": 2.0}) and end == pytest.approx(3.0)


def test_the_stale_channels_pessimistic_bound_charges_the_shared_link():
    b, m = {"attn_kv": 8.0, "norm_stats": 2.0}, {"attn_kv": 1, "norm_stats": 1}
    *_, own = pessimistic_seconds(10.0, b, m, "full", 2, SLOW, None, stale_channel=True, shared_link=False)
    *_, shared = pessimistic_seconds(10.0, b, m, "full", 2, SLOW, None, stale_channel=True)
    # the all-reduce's 2 s of bytes at half the link beside the K/V: 2 s more, the K/V's 8 + 2 still under compute
    assert own == pytest.approx(max(10, 8) + 8 + 2) and shared == pytest.approx(own + 2)


def test_stale_posts_spread_over_enough_compute_do_not_stall():
    events = [e for k in range(4)
              for e in ((2 * k, "wait_prev", k, "attn_kv", 1, 1), (2 * k, "post", k, "attn_kv", 1, 1))]
    t = tl(10, *events, (8, "post", 4, "norm_stats", 1, 1), (8, "wait", 4, "norm_stats", 1, 1))
    assert replay_timeline(t, SLOW, 2)["step"] == pytest.approx(10 + 1)     # only the all-reduce's own second


def test_graphs_drain_every_post_at_the_step_end():
    t = tl(10, (5, "wait_prev", 0, "attn_kv", 3, 1), (9, "post", 0, "attn_kv", 3, 1))
    assert replay_timeline(t, SLOW, 2, drain=False)["step"] == pytest.approx(10)    # done by 5 of the next step
    assert replay_timeline(t, SLOW, 2, drain=True)["step"] == pytest.approx(12)     # exposed: 9 + 3
    assert replay_timeline({**t, "graphed": True}, SLOW, 2)["step"] == pytest.approx(12)   # a graph replay's trace


def test_a_backlog_carries_into_the_next_step():
    # 15 s of K/V a step against 10 s of compute, waited a step later: the link sets the pace
    t = tl(10, (0, "wait_prev", 0, "attn_kv", 15, 1), (0, "post", 0, "attn_kv", 15, 1))
    assert replay_timeline(t, SLOW, 2)["step"] == pytest.approx(15)


def test_compute_is_scaled_to_the_rows_and_charged():
    t = tl(2, (1, "post", 0, "norm_stats", 1, 1), (1, "wait", 0, "norm_stats", 1, 1))
    r = replay_timeline(t, SLOW, 2, compute=10, charge=1)
    assert r["step"] == pytest.approx(11 + 1) and r["compute"] == pytest.approx(11)


def test_a_post_costs_what_the_other_bounds_charge_its_kind():
    link = Link("l", bandwidth=1e9, latency=1e-5, source="synthetic")
    for kind, nbytes, messages, n in (("attn_kv", 2e6, 7, 8), ("norm_stats", 112, 1, 8), ("conv_halo", 4096, 2, 4)):
        t = tl(0, (0, "post", 0, kind, nbytes, messages), (0, "wait", 0, kind, nbytes, messages))
        assert replay_timeline(t, link, n)["step"] == pytest.approx(kind_seconds(kind, nbytes, messages, n, link))


def random_timeline(rng, posts=12, seconds=1.0):
    """Stale K/V and halos posted and waited one step later, all-reduces and halos waited at once."""
    events, t = [], 0.0
    for k in range(posts):
        t += rng.uniform(0, seconds / posts)
        if rng.random() < 0.5:
            kind = rng.choice(["attn_kv", "conv_halo"])
            b = rng.uniform(0, 0.2 * seconds * 1e6)
            events += [[t, "wait_prev", k, kind, b, 2], [t, "post", k, kind, b, 2]]
        else:
            kind = rng.choice(["norm_stats", "latent_halo"])
            b = rng.uniform(0, 0.02 * seconds * 1e6)
            events += [[t, "post", k, kind, b, 1], [t, "wait", k, kind, b, 1]]
    return {"seconds": max(t, seconds), "graphed": False, "events": events}


@pytest.mark.parametrize("drain", [False, True])
def test_fifo_lies_between_the_optimistic_and_the_serialised_bound(drain):
    """Proof sketch (project.py docstring): while compute is blocked the link is busy, so a steady
    step is at most compute + all its transfers; every waited-at-once post stalls compute by at
    least its own transfer, and the link moves at most a step's time of bytes per step, so it is at
    least max(compute, stale) + critical. Checked here on random timelines and links."""
    rng = random.Random(0)
    for _ in range(200):
        t = random_timeline(rng)
        link = Link("r", bandwidth=rng.choice([1e6, 3e6, 3e7]), latency=rng.choice([0.0, 1e-4, 1e-3]), source="")
        b, m = timeline_bytes(t)
        compute = t["seconds"]
        optimistic = step_seconds(compute, b, m, "full", 2, link)[2]
        stale, critical, _ = split_comm(b, m, "full", 2, link, concurrent=False)
        fifo = replay_timeline(t, link, 2, drain=drain, steps=40)["step"]
        channel = replay_timeline(t, link, 2, drain=drain, steps=40, stale_channel=True)["step"]
        own_links = replay_timeline(t, link, 2, drain=drain, steps=40, stale_channel=True, shared_link=False)["step"]
        assert optimistic * (1 - 1e-9) <= fifo <= (compute + stale + critical) * (1 + 1e-9)
        # two communicators sharing one link: never faster than each on a link of its own, never
        # slower than one FIFO (the link keeps moving bytes while compute waits)
        assert own_links * (1 - 1e-9) <= channel <= fifo * (1 + 1e-9)
        # on links of their own (as the emulator models them) two FIFOs can fall below the one-link
        # optimistic bound only where the stale traffic alone outlasts compute
        assert own_links >= (compute + critical) * (1 - 1e-9)
        if stale <= compute:
            assert own_links >= optimistic * (1 - 1e-9)
        if "norm_stats" in b:       # the existing bound's serialised case: the fifo estimate is at most it
            assert fifo <= pessimistic_seconds(compute, b, m, "full", 2, link, None)[-1] * (1 + 1e-9)


def test_projected_rows_get_fifo_keys_only_at_a_measured_n_with_a_timeline():
    t = tl(0.02, (0, "wait_prev", 0, "attn_kv", 1e6, 1), (0, "post", 0, "attn_kv", 1e6, 1),
           (5e-4, "post", 1, "norm_stats", 100, 1), (5e-4, "wait", 1, "norm_stats", 100, 1))
    b, m = timeline_bytes(t)
    rows = [{"model": "m", "size": 64, "mode": "serial", "n": 1, "seconds": 0.04, "bytes_per_step": {}},
            {"model": "m", "size": 64, "mode": "full", "n": 2, "seconds": 0.02, "serial_seconds": 0.04,
             "bytes_per_step": b, "messages_per_step": m, "timeline": t}]
    link = Link("l", bandwidth=1e9, latency=1e-5, source="synthetic")
    out = {(r["mode"], r["n"]): r for r in project_rows(rows, link, max_n=4, derive_sync=True)}
    r = out[("full", 2)]
    assert r["projected_fifo_counts_match"] and not r["projected_fifo_drained"]
    eps = 1e-12
    assert r["projected_step_seconds"] - eps <= r["projected_fifo_step_seconds"]
    assert r["projected_fifo_step_seconds"] <= r["projected_pessimistic_step_seconds"] + eps
    # the K/V (10 µs + 1 ms) posted at 0, the all-reduce (2 hops x 10 µs + 100 B) at 0.5 ms, waited at once
    assert r["projected_fifo_step_seconds"] == pytest.approx(0.02 + 1.01e-3 + 2e-5 + 100 / 1e9 - 5e-4)
    assert r["projected_fifo_speedup"] == pytest.approx(0.04 / r["projected_fifo_step_seconds"])
    # on its own communicator the all-reduce's 100 B move beside the K/V's: at half the bandwidth
    assert r["projected_fifo_stale_channel_step_seconds"] == pytest.approx(0.02 + 2e-5 + 2 * 100 / 1e9, rel=1e-12)
    assert fifo_seconds(rows[1], 0.02, link, 2, "full", 0.0)["projected_fifo_step_seconds"] == pytest.approx(
        r["projected_fifo_step_seconds"])
    for key in (("full", 3), ("full", 4), ("sync", 2)):      # not recorded: no fifo row (sync's is full's compute)
        assert not any(k.startswith("projected_fifo") for k in out[key])


def test_the_recorder_counts_what_the_null_transport_counts_and_records_steady_steps():
    import torch

    import scaling
    from parafuse.models import load_model
    from parafuse.runtime import Request

    model = load_model("unet-small")
    req = Request(64, 64, 8, "ddim", 1.0, seed=0, label=3)
    dev = torch.device("cpu")
    for mode in ("full", "sync"):
        plain = scaling.measure(model, req, dev, None, mode, 4, 1, repeat=1, timing_warmup=0)
        rec = scaling.measure(model, req, dev, None, mode, 4, 1, repeat=1, timing_warmup=0, timeline=True)
        assert rec["bytes_per_step"] == plain["bytes_per_step"] and plain["bytes_per_step"]
        assert rec["messages_per_step"] == plain["messages_per_step"]
        t = rec["timeline"]
        assert timeline_bytes(t) == (plain["bytes_per_step"], plain["messages_per_step"])
        kinds = {e[1] for e in t["events"]}
        assert kinds == ({"post", "wait", "wait_prev"} if mode == "full" else {"post", "wait"})
        times = [e[0] for e in t["events"]]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= t["seconds"]
        posts = [e for e in t["events"] if e[1] == "post"]
        assert [e[2] for e in posts] == list(range(len(posts)))
        # every post is waited exactly once, in this step or (stale) in the next
        waits = sorted(e[2] for e in t["events"] if e[1] != "post")
        assert waits == list(range(len(posts)))


def test_the_emulator_validation_replays_each_rows_trace_through_its_link():
    from project import emulator_checks, emulator_columns

    t = tl(0.02, (0, "wait_prev", 0, "attn_kv", 1e6, 1), (0, "post", 0, "attn_kv", 1e6, 1),
           (5e-4, "post", 1, "norm_stats", 100, 1), (5e-4, "wait", 1, "norm_stats", 100, 1))
    b, m = timeline_bytes(t)
    link = Link("modelled", bandwidth=1e9, latency=1e-5, source="synthetic")
    rows = [{"model": "m", "size": 64, "mode": "full", "n": 2, "stale_channel": channel, "compute_seconds": 0.02,
             "bytes_per_step": b, "messages_per_step": m, "emulated_seconds": 0.0215, "timeline": t}
            for channel in (False, True)]
    one, two = emulator_checks(rows, link)
    assert one["projected_fifo_step_seconds"] == pytest.approx(0.02 + 1.01e-3 + 2e-5 + 1e-7 - 5e-4)
    assert two["projected_fifo_step_seconds"] == pytest.approx(0.02 + 2e-5 + 1e-7)
    assert one["fifo_relative_error"] == pytest.approx(one["projected_fifo_step_seconds"] / 0.0215 - 1)
    assert one["within_fifo"] and not two["within_fifo"]          # 21.5 ms: within 20.53 + 5%, above 20.02 + 5%
    assert {"fifo_ms", "fifo_relative_error", "within_fifo"} <= {k for k, _ in emulator_columns([one])}
    no_trace = emulator_checks([{k: v for k, v in rows[0].items() if k != "timeline"}], link)
    assert "projected_fifo_step_seconds" not in no_trace[0] and "fifo_ms" not in dict(emulator_columns(no_trace))


def test_all_ranks_replayed_together_wait_for_the_later_ranks_part():
    from project import replay_ranks

    def step(t_reduce):    # K/V (3 s) posted at 0 and waited a step later; an all-reduce (1 s) at t_reduce
        return tl(10, (0, "wait_prev", 0, "attn_kv", 3, 1), (0, "post", 0, "attn_kv", 3, 1),
                  (t_reduce, "post", 1, "norm_stats", 1, 1), (t_reduce, "wait", 1, "norm_stats", 1, 1))
    same = [[step(1)] * 6, [step(1)] * 6]
    assert replay_ranks(same, SLOW, 2)[-1] == pytest.approx(replay_timeline(step(1), SLOW, 2)["step"])
    # rank 1 reaches the all-reduce 4 s later: rank 0 waits for it (an all-reduce ends with its last part),
    # so rank 0 starts its next step 4 s later and the two post their all-reduces together, rank 0's
    # behind its own K/V posted 1 s before: 2 s of queue + 1 s, the single-rank step again
    late = [[step(1)] * 6, [step(5)] * 6]
    assert replay_ranks(late, SLOW, 2)[-1] == pytest.approx(10 + 2 + 1)
    assert replay_ranks(late, SLOW, 2, stale_channel=True)[-1] == pytest.approx(10 + 1)
    # every step's own gaps, jitter included: when the late rank alternates, the early one idles 4 s for it
    # at every all-reduce (10 + 4 + 1), more than the 11 and 13 s of ranks that post together
    mixed = [[step(1), step(5)] * 3, [step(5), step(1)] * 3]
    assert replay_ranks(mixed, SLOW, 2) == pytest.approx([15.0] * 5)
    assert replay_ranks([[step(1), step(5)] * 3] * 2, SLOW, 2) == pytest.approx([11.0, 13.0] * 2 + [11.0])


def test_the_compute_clock_leaves_out_the_time_a_wait_blocks():
    import time

    import torch

    from parafuse.parallel.transport import Pending, TimelineRecorder, Transport

    class Slow(Transport):          # a peer that answers 50 ms late
        def _post(self, sends, recvs, kind):
            return Pending([lambda: time.sleep(0.05)])

    rec = TimelineRecorder(Slow(0, 2))
    x = torch.zeros(4)
    rec.boundary()
    rec.start([(x, 1)], [(x.clone(), 1)], "latent_halo").wait()
    rec.finish()
    wall, compute = rec.timelines()[0], rec.timelines("compute")[0]
    assert [e[1] for e in wall["events"]] == ["post", "wait"] and wall["events"][0][4:] == (16, 1)
    assert wall["seconds"] >= 0.05 > compute["seconds"] + 0.04


def test_a_scaling_row_carries_the_slowest_strips_timeline_with_the_busiest_strips_counts():
    """scaling.py --timeline end to end: N = 4 measures the first strip (one neighbour) and a middle
    one (two); the row's timeline adds up to the row's counts (the busiest strip's), and project.py
    gives that N, and only it, the trace-driven estimate."""
    import torch

    import scaling
    from project import LINKS

    rows = scaling.scaling_rows("unet-small", [64], [1, 4], ["full"], torch.device("cpu"), None, repeat=1,
                                log=lambda *_: None, timing_warmup=0, timeline=True)
    strip = next(r for r in rows if r["mode"] == "full")
    assert timeline_bytes(strip["timeline"]) == (strip["bytes_per_step"], strip["messages_per_step"])
    out = [r for r in project_rows(rows, LINKS["pcie4"], max_n=8) if "projected_fifo_step_seconds" in r]
    assert [r["n"] for r in out] == [4] and out[0]["projected_fifo_counts_match"]
    assert out[0]["projected_fifo_step_seconds"] <= out[0]["projected_pessimistic_step_seconds"] * (1 + 1e-9)


def test_busiest_posts_takes_each_posts_largest_counts_where_the_strips_post_alike():
    from project import busiest_posts

    edge = tl(1, (0.1, "post", 0, "conv_halo", 10, 1), (0.2, "wait", 0, "conv_halo", 10, 1),
              (0.3, "post", 1, "norm_stats", 8, 1))
    inner = tl(2, (0.5, "post", 0, "conv_halo", 20, 2), (0.6, "wait", 0, "conv_halo", 20, 2),
               (0.7, "post", 1, "norm_stats", 8, 1))
    got = busiest_posts(edge, [edge, inner])
    assert got["seconds"] == 1 and [e[0] for e in got["events"]] == [0.1, 0.2, 0.3]     # the slow strip's times
    assert timeline_bytes(got) == ({"conv_halo": 20, "norm_stats": 8}, {"conv_halo": 2, "norm_stats": 1})
    other = tl(1, (0.1, "post", 0, "attn_kv", 99, 9))
    assert busiest_posts(edge, [edge, other]) == edge          # different sequences: left as recorded


def test_stale_posts_bunched_at_a_drained_steps_end_exceed_the_one_post_tail():
    """The limitation the docstring states: with nothing critical mid-step the existing pessimistic
    bound exposes one post's stale traffic at the drain; a trace with two at the very end exposes both."""
    t = {**tl(10, (10, "post", 0, "attn_kv", 2, 1), (10, "post", 1, "attn_kv", 2, 1)), "graphed": True}
    b, m = timeline_bytes(t)
    fifo = replay_timeline(t, SLOW, 2)["step"]
    assert fifo == pytest.approx(10 + 2 + 2)
    assert pessimistic_seconds(10, b, m, "full", 2, SLOW, None)[-1] == pytest.approx(10 + 2)     # max(10, 4) + 2


def test_timelines_of_a_separate_run_join_the_rows_of_the_same_configuration():
    """project.py --timelines: the recorder runs apart from the timed rows (its CUDA events stay out
    of them); its timelines join the rows of the same configuration, whose compute is kept, and a
    timeline of a configuration the rows lack is an error, not dropped."""
    from project import join_timelines

    base = {"model": "unet-xl", "size": 4096, "n": 8, "kernels": "torch", "cuda_graphs": True, "dtype": "bf16"}
    rows = [{**base, "mode": "serial", "n": 1, "seconds": 8.0},
            {**base, "mode": "full", "seconds": 1.0}, {**base, "mode": "full", "kernels": "triton", "seconds": 0.9}]
    trace = tl(1.3, (0, "post", 0, "attn_kv", 3, 1))
    traced = [{**base, "mode": "full", "seconds": 1.3, "timeline": trace}, {**base, "mode": "serial", "n": 1}]
    assert join_timelines(rows, traced) == ["unet-xl 4096² full N=8 torch"]
    assert rows[1]["timeline"] is trace and rows[1]["seconds"] == 1.0
    assert "timeline" not in rows[2] and "timeline" not in rows[0]
    with pytest.raises(ValueError, match="no row of that configuration"):
        join_timelines(rows, [{**base, "mode": "partial", "timeline": trace}])
