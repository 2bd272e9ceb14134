"""The projection arithmetic of benchmarks/project.py on synthetic rows, against closed forms
worked out by hand. No measurement, no torchrun: pure arithmetic."""
import math
import os

import pytest

from project import (LINKS, LOOPBACK_JSON, Charge, Link, fit_link, interpolate, kind_seconds,  # noqa: E402
                     loopback_charge, pessimistic_seconds, project_rows, step_seconds)

LINK = Link("test", bandwidth=1e9, latency=1e-5, source="synthetic")      # 1 GB/s, 10 µs


def rows(mode="full", messages=True):
    """Serial 100 ms; N = 2, 4, 8 with compute 60, 35, 20 ms and growing all-gather K/V."""
    out = [{"model": "m", "size": 64, "mode": "serial", "n": 1, "seconds": 0.1, "serial_seconds": 0.1,
            "bytes_per_step": {}}]
    for n, c in ((2, 0.06), (4, 0.035), (8, 0.02)):
        r = {"model": "m", "size": 64, "mode": mode, "n": n, "seconds": c, "serial_seconds": 0.1,
             "bytes_per_step": {"attn_kv": 1_000_000 * (n - 1) // n, "latent_halo": 2048 * min(2, n - 1),
                                "norm_stats": 2 * (n - 1) * 64 // n},      # ring bytes of a 64-byte tensor
             "strip_seconds": {"0": c}}
        if messages:
            # the busiest strip: an inner one, two neighbours (at N = 2 both strips have one)
            r["messages_per_step"] = {"attn_kv": 10 * (n - 1), "latent_halo": min(2, n - 1), "norm_stats": 3}
        out.append(r)
    return out


def test_point_to_point_and_ring_all_reduce_cost():
    assert kind_seconds("attn_kv", 2e6, 4, 8, LINK) == pytest.approx(4 * 1e-5 + 2e-3)
    # a ring all-reduce over N ranks: 2(N-1) sequential hops, each one latency; bytes are already ring bytes
    assert kind_seconds("norm_stats", 112, 3, 8, LINK) == pytest.approx(3 * 14 * 1e-5 + 112 / 1e9)
    assert kind_seconds("norm_stats", 0, 1, 2, LINK) == pytest.approx(2e-5)
    assert kind_seconds("attn_kv", 1e6, None, 8, LINK) == pytest.approx(1e-3)     # messages unknown: no latency


def test_asynchronous_step_is_max_of_compute_and_stale_comm_plus_critical():
    b = {"attn_kv": 3e6, "conv_halo": 1e6, "latent_halo": 1e4, "norm_stats": 100}
    m = {"attn_kv": 6, "conv_halo": 20, "latent_halo": 2, "norm_stats": 5}
    n = 4
    stale = 6e-5 + 3e-3 + 20e-5 + 1e-3 + 5 * 6 * 1e-5 + 100 / 1e9    # attn_kv + conv_halo + norm_stats (async)
    critical = 2e-5 + 1e4 / 1e9
    for compute in (1e-3, 10e-3):          # comm-bound, then compute-bound
        a, c, step = step_seconds(compute, b, m, "full", n, LINK, norm_on_critical_path=False)   # --norm corrected
        assert a == pytest.approx(stale) and c == pytest.approx(critical)
        assert step == pytest.approx(max(compute, stale) + critical)
    # GroupNorm statistics on the critical path (exact norm, the default): moved from the async sum to the critical one
    a, c, step = step_seconds(1e-3, b, m, "partial", n, LINK)
    ar = 5 * 6 * 1e-5 + 100 / 1e9
    assert a == pytest.approx(stale - ar) and c == pytest.approx(critical + ar)
    assert step == pytest.approx(max(1e-3, stale - ar) + critical + ar)


def test_sync_step_is_compute_plus_all_comm():
    b = {"attn_kv": 3e6, "conv_halo": 1e6, "latent_halo": 1e4, "norm_stats": 100}
    m = {"attn_kv": 6, "conv_halo": 20, "latent_halo": 2, "norm_stats": 5}
    total = 6e-5 + 3e-3 + 20e-5 + 1e-3 + 5 * 6 * 1e-5 + 100 / 1e9 + 2e-5 + 1e4 / 1e9
    assert step_seconds(10e-3, b, m, "sync", 4, LINK)[2] == pytest.approx(10e-3 + total)
    assert step_seconds(10e-3, {}, {}, "none", 4, LINK)[2] == 10e-3


def test_interpolation_is_linear_in_inverse_n_and_exact_at_measured_points():
    pts = {1: 0.1, 2: 0.06, 4: 0.035}
    assert interpolate(pts, 2) == (0.06, "measured")
    # between N=2 and N=4, v = a + b/N through both points: b = (0.06-0.035)/(1/2-1/4) = 0.1, a = 0.01
    v, src = interpolate(pts, 3)
    assert src == "interpolated" and v == pytest.approx(0.01 + 0.1 / 3)
    v, src = interpolate(pts, 8)
    assert src == "extrapolated" and v == pytest.approx(0.01 + 0.1 / 8)
    # message counts: linear in N
    assert interpolate({1: 0, 2: 10, 4: 30}, 3, inverse=False)[0] == pytest.approx(20)


def test_projection_reproduces_measured_points_exactly():
    free = Link("free", math.inf, 0.0, "no cost")
    out = project_rows(rows(), free, max_n=8)
    assert [r["n"] for r in out] == list(range(1, 9))
    by_n = {r["n"]: r for r in out}
    for r in rows()[1:]:
        p = by_n[r["n"]]
        assert p["compute_source"] == "measured"
        assert p["projected_compute_seconds"] == r["seconds"]
        assert p["projected_bytes_per_step"] == {k: float(v) for k, v in r["bytes_per_step"].items()}
        assert p["projected_messages_per_step"] == {k: float(v) for k, v in r["messages_per_step"].items()}
        assert p["projected_step_seconds"] == r["seconds"]           # a free link: the step is compute
        assert p["projected_speedup"] == pytest.approx(0.1 / r["seconds"])
    assert by_n[1]["projected_step_seconds"] == 0.1 and by_n[1]["projected_bytes_per_step"]["attn_kv"] == 0
    assert by_n[3]["compute_source"] == "interpolated"


def test_projection_of_an_unmeasured_n_follows_each_kinds_law():
    out = {r["n"]: r for r in project_rows(rows(), LINK, max_n=16, norm_on_critical_path=False)}   # --norm corrected
    r = out[6]                 # between N=4 and N=8
    w = (1 / 6 - 1 / 4) / (1 / 8 - 1 / 4)
    compute = 0.035 + w * (0.02 - 0.035)           # compute: a + b/N through the neighbouring measured points
    kv = 1_000_000 * 5 / 6                        # all-gather: (N-1)/N of the whole K/V
    ar_bytes = 64 * 2 * 5 / 6                     # ring all-reduce of 64 bytes
    kv_msgs = 10 * 5                              # one message per peer per layer
    comm_async = kv_msgs * 1e-5 + kv / 1e9 + 3 * 2 * 5 * 1e-5 + ar_bytes / 1e9
    critical = 2e-5 + 4096 / 1e9                  # the latent halo: the same at every N
    assert r["projected_laws"] == {"attn_kv": "per_peer", "latent_halo": "per_neighbour", "norm_stats": "collective"}
    assert r["projected_messages_per_step"] == pytest.approx({"attn_kv": 50, "latent_halo": 2, "norm_stats": 3})
    assert r["projected_compute_seconds"] == pytest.approx(compute)
    assert r["projected_comm_async_seconds"] == pytest.approx(comm_async)
    assert r["projected_step_seconds"] == pytest.approx(max(compute, comm_async) + critical)
    assert r["projected_speedup"] == pytest.approx(0.1 / (max(compute, comm_async) + critical))


def test_message_counts_are_not_interpolated_through_n_1():
    """Measured at N = 8 only: a constant count stays constant down to N = 2 (the old interpolation
    through (1, 0) halved it at N = 4), a per-neighbour count halves only at N = 2 (one neighbour),
    a per-peer count goes with N - 1."""
    only8 = [r for r in rows() if r["n"] in (1, 8)]
    only8[1]["bytes_per_step"]["conv_halo"] = 1000
    only8[1]["messages_per_step"]["conv_halo"] = 76
    out = {r["n"]: r for r in project_rows(only8, LINK, max_n=16)}
    assert out[2]["projected_messages_per_step"] == pytest.approx(
        {"attn_kv": 10, "latent_halo": 1, "norm_stats": 3, "conv_halo": 38})
    assert out[4]["projected_messages_per_step"] == pytest.approx(
        {"attn_kv": 30, "latent_halo": 2, "norm_stats": 3, "conv_halo": 76})
    assert out[16]["projected_messages_per_step"]["norm_stats"] == 3
    assert out[16]["projected_bytes_per_step"]["conv_halo"] == 1000
    assert out[16]["projected_bytes_per_step"]["attn_kv"] == pytest.approx(1_000_000 * 15 / 16)
    # the figure: 46 all-reduces at N = 16 over one ring of 3 µs hops cost 46 x 30 x 3 µs = 4.14 ms
    assert kind_seconds("norm_stats", 0, 46, 16, Link("nv", math.inf, 3e-6, "")) == pytest.approx(4.14e-3)


def test_a_law_the_measured_points_contradict_is_replaced():
    """The baselines send GroupNorm statistics point to point (N - 1 messages): measured at N = 4 and
    8, the collective law (constant count) does not fit and per_peer does."""
    rs = rows()
    for r in rs[1:]:
        r["messages_per_step"]["norm_stats"] = 3 * (r["n"] - 1)
        r["bytes_per_step"]["norm_stats"] = 64 * (r["n"] - 1) // r["n"]
    out = {r["n"]: r for r in project_rows(rs, LINK, max_n=16)}
    assert out[16]["projected_laws"]["norm_stats"] == "per_peer"
    assert out[16]["projected_messages_per_step"]["norm_stats"] == pytest.approx(45)
    assert out[16]["projected_law_deviation"]["norm_stats"] < 0.01


def test_past_eight_gpus_the_off_node_share_goes_over_infiniband():
    nv, ib = LINKS["nvlink4"], LINKS["nvlink4"].inter_node
    assert ib.name == "ib400" and nv.gpus_per_node == 8
    # N <= 8: all on NVLink
    assert kind_seconds("attn_kv", 7e9, 7 * 28, 8, nv, "per_peer") == pytest.approx(7 * 28 * 3e-6 + 7e9 / 450e9)
    # N = 16: 8 of a rank's 15 peers are on the other node
    b, m, share = 15e9, 15 * 28, 8 / 15
    inside = m * (1 - share) * 3e-6 + b * (1 - share) / 450e9
    outside = m * share * 5e-6 + b * share / 50e9
    assert kind_seconds("attn_kv", b, m, 16, nv, "per_peer") == pytest.approx(max(inside, outside))
    assert kind_seconds("attn_kv", b, m, 16, nv, "per_peer", concurrent=False) == pytest.approx(inside + outside)
    # a halo at a node boundary: one of the two neighbours over InfiniBand
    assert kind_seconds("conv_halo", 2e6, 76, 16, nv, "per_neighbour", concurrent=False) == pytest.approx(
        38 * 3e-6 + 1e6 / 450e9 + 38 * 5e-6 + 1e6 / 50e9)
    # an all-reduce over two nodes: every hop of the ring waits for InfiniBand
    assert kind_seconds("norm_stats", 1000, 46, 16, nv, "collective") == pytest.approx(46 * 30 * 5e-6 + 1000 / 50e9)


CHARGE = Charge(loss_fraction=0.05, loss_seconds_per_byte=1e-12, sm_share=0.25, source="synthetic")


def test_pessimistic_serialises_stale_traffic_ahead_of_exact_all_reduces():
    b = {"attn_kv": 3e6, "conv_halo": 1e6, "latent_halo": 1e4, "norm_stats": 100}
    m = {"attn_kv": 6, "conv_halo": 20, "latent_halo": 2, "norm_stats": 5}
    n, compute = 4, 10e-3
    kv, halo = 6e-5 + 3e-3, 20e-5 + 1e-3
    critical = 2e-5 + 1e4 / 1e9 + 5 * 6 * 1e-5 + 100 / 1e9
    charge = max(0.05 * compute, 1e-12 * sum(b.values()), 0.25 * 4e6 / 1e9)
    extra, stale, crit, tail, step = pessimistic_seconds(compute, b, m, "full", n, LINK, CHARGE)
    assert extra == pytest.approx(charge) and stale == pytest.approx(kv + halo) and crit == pytest.approx(critical)
    assert tail == 0 and step == pytest.approx(compute + charge + kv + halo + critical)
    # the opt-in stale communicator: no queueing; the largest single post of stale traffic is exposed
    # at the step's end (attn_kv: 6 messages to 3 peers = 2 posts; conv_halo: 20 to 2 neighbours = 10);
    # on the rank's one link the critical bytes move beside stale traffic at half the bandwidth
    *_, tail, step = pessimistic_seconds(compute, b, m, "full", n, LINK, CHARGE, stale_channel=True)
    shared = (1e4 + 100) / 1e9
    assert tail == pytest.approx(max(kv / 2, halo / 10))
    assert step == pytest.approx(max(compute + charge, kv + halo + shared) + tail + critical + shared)
    *_, own = pessimistic_seconds(compute, b, m, "full", n, LINK, CHARGE, stale_channel=True, shared_link=False)
    assert own == pytest.approx(max(compute + charge, kv + halo) + tail + critical)
    # statistics off the critical path (--norm corrected): nothing critical mid-step, no queueing either
    *_, step2 = pessimistic_seconds(compute, b, m, "full", n, LINK, CHARGE, norm_on_critical_path=False)
    assert step2 < compute + charge + kv + halo + critical
    # sync: the optimistic and pessimistic bounds coincide (nothing overlaps, nothing to charge)
    assert pessimistic_seconds(compute, b, m, "sync", n, LINK, CHARGE)[-1] == pytest.approx(
        step_seconds(compute, b, m, "sync", n, LINK)[2])


def test_charge_is_the_largest_of_its_three_terms():
    assert CHARGE.seconds(1.0, 0, 0) == pytest.approx(0.05)
    assert CHARGE.seconds(1.0, 1e11, 0) == pytest.approx(0.1)
    assert CHARGE.seconds(1.0, 0, 0.8) == pytest.approx(0.2)


def test_loopback_charge_is_read_from_the_committed_gpu_json():
    import json

    rows_ = json.load(open(LOOPBACK_JSON))["sections"]["graphs"]["result"]["rows"]
    loop = next(r for r in rows_ if r.get("transport") == "loopback")
    null = next(r for r in rows_ if r.get("transport") == "null" and r["kernels"] == loop["kernels"]
                and (r["model"], r["size"], r["mode"], r["n"]) == (loop["model"], loop["size"], loop["mode"], loop["n"]))
    c = loopback_charge()
    assert c.loss_fraction == pytest.approx(loop["seconds"] / null["seconds"] - 1) and c.loss_fraction > 0
    assert c.loss_seconds_per_byte == pytest.approx((loop["seconds"] - null["seconds"]) / sum(loop["bytes_per_step"].values()))


def test_pessimistic_bound_is_never_below_the_optimistic_one():
    for link in (LINK, LINKS["nvlink4"]):
        for mode in ("full", "partial", "sync"):
            for r in project_rows(rows(mode), link, max_n=16, charge=CHARGE):
                assert r["projected_pessimistic_step_seconds"] >= r["projected_step_seconds"] * (1 - 1e-12)
                assert r["projected_pessimistic_step_seconds"] >= r["projected_stale_channel_step_seconds"] * (1 - 1e-12)


def test_sync_rows_are_derived_from_full_where_sync_was_not_measured():
    out = project_rows(rows(), LINK, max_n=8, derive_sync=True)
    sync = {r["n"]: r for r in out if r["mode"] == "sync"}
    assert sync[8]["compute_source"] == "full" and sync[3]["compute_source"] == "interpolated"
    full = {r["n"]: r for r in out if r["mode"] == "full"}
    total = full[8]["projected_comm_async_seconds"] + full[8]["projected_comm_critical_seconds"]
    assert sync[8]["projected_step_seconds"] == pytest.approx(0.02 + total)


def test_extrapolated_compute_never_beats_ideal_scaling_from_the_last_point():
    superlinear = [{"model": "m", "size": 8, "mode": "partial", "n": n, "seconds": s, "serial_seconds": 0.1,
                    "bytes_per_step": {}, "messages_per_step": {}} for n, s in ((4, 0.04), (8, 0.01))]
    out = {r["n"]: r for r in project_rows(superlinear, LINK, max_n=16)}
    # the last segment a + b/N has a = -0.02 < 0 (0 at N = 16): held at 0.01 * 8 / N instead
    assert out[16]["compute_source"] == "extrapolated"
    assert out[16]["projected_compute_seconds"] == pytest.approx(0.01 * 8 / 16)


def test_rows_without_message_counts_leave_latency_out_and_say_so():
    out = project_rows(rows(messages=False), LINK, max_n=4)
    assert all(r["messages_known"] is False and r["projected_messages_per_step"] is None for r in out)
    r = next(r for r in out if r["n"] == 4)
    assert r["projected_comm_async_seconds"] == pytest.approx(750_000 / 1e9)    # exact statistics: critical
    assert r["projected_comm_critical_seconds"] == pytest.approx((4096 + 96) / 1e9)     # 96: ring bytes of 64


def test_rows_of_each_kernel_choice_are_projected_apart():
    faster = [{**r, "kernels": "triton", "seconds": r["seconds"] / 2} for r in rows()[1:]]
    out = project_rows(rows() + faster, Link("free", math.inf, 0.0, "no cost"), max_n=8)
    by = {(r["kernels"], r["n"]): r for r in out}
    assert len(out) == 16 and by[("torch", 8)]["projected_speedup"] == pytest.approx(0.1 / 0.02)
    assert by[("triton", 8)]["projected_speedup"] == pytest.approx(0.1 / 0.01)
    assert by[("triton", 1)]["projected_speedup"] == pytest.approx(1.0)     # the one serial row serves both


def test_skipped_rows_are_ignored():
    out = project_rows(rows() + [{"model": "x", "size": 9, "skipped": "time budget"}], LINK, max_n=2)
    assert {r["model"] for r in out} == {"m"}


def test_every_projected_number_is_labelled_projected():
    inputs = {"n", "size", "serial_seconds", "link_bandwidth", "link_latency"}
    labels = {"projected_laws"}
    for r in project_rows(rows(), LINK, max_n=16) + project_rows(rows("sync"), LINK, max_n=5):
        for key, value in r.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, dict)
            if numeric and key not in inputs | labels:
                assert key.startswith("projected_"), key
        assert r["projected_bound"] in ("compute", "comm")


def test_fit_link_recovers_latency_and_bandwidth():
    link = fit_link({s: 20e-6 + s / 2e9 for s in (1024, 8192, 65536, 1 << 20, 8 << 20)})
    assert link.latency == pytest.approx(20e-6, rel=1e-6) and link.bandwidth == pytest.approx(2e9, rel=1e-6)


def test_reproject_recomputes_a_committed_validation_without_measuring(tmp_path):
    """--reproject: the committed CPU projection's own rows and torchrun steps, projected by the current
    arithmetic: the measurements are unchanged, every check has both bounds and its errors."""
    import json
    import shutil

    from project import RESULTS, reproject

    src = os.path.join(RESULTS, "project_cpu.json")
    path = tmp_path / "project_cpu.json"
    shutil.copy(src, path)
    before = json.load(open(src))
    after = json.load(open(reproject(str(path), [])))
    assert after["measured_rows"] == before["measured_rows"]
    old = {(c["link"], c["mode"], c["n"]): c for c in before["validation"]["checks"]}
    for c in after["validation"]["checks"]:
        o = old[(c["link"], c["mode"], c["n"])]
        assert c["measured_torchrun_seconds"] == o["measured_torchrun_seconds"]
        assert c["projected_pessimistic_step_seconds"] >= c["projected_step_seconds"]
        assert c["pessimistic_relative_error"] == pytest.approx(
            c["projected_pessimistic_step_seconds"] / c["measured_torchrun_seconds"] - 1)
    assert after["schema"] == "parafuse.bench/1" and after["benchmark"] == "project"     # rewritten in the schema
    assert {r["mode"] for r in after["rows"]} >= {"full", "partial", "sync"}                # rows: the projections
    assert after["provenance"]["commit"] and after["validation"]["mean_abs_pessimistic_relative_error"]


def test_emulator_validation_compares_both_bounds_from_the_free_link_step():
    """benchmarks/project.py --validate-emulator's arithmetic: the link sized from full's free-link
    step, each row's bounds from its free-link step, bytes and messages, and the errors against the
    emulated step; a stale-channel row's pessimistic bound does not queue the all-reduces."""
    from project import emulator_checks, emulator_link

    b = {"attn_kv": 2_000_000, "norm_stats": 96, "latent_halo": 4096}
    m = {"attn_kv": 4, "norm_stats": 3, "latent_halo": 1}
    link = emulator_link(0.04, b, m)
    assert link.bandwidth == pytest.approx(sum(b.values()) / 0.02) and link.latency == pytest.approx(0.004 / 8)
    rows = [{"mode": mode, "n": 2, "stale_channel": channel, "compute_seconds": 0.04, "bytes_per_step": b,
             "messages_per_step": m, "emulated_seconds": 0.05} for mode in ("sync", "full") for channel in (False, True)]
    by = {(c["mode"], c["stale_channel"]): c for c in emulator_checks(rows, link)}
    kv = 4 * link.latency + 2e6 / link.bandwidth
    norm = 3 * 2 * link.latency + 96 / link.bandwidth          # all-reduces: 2(N-1) hops
    halo = link.latency + 4096 / link.bandwidth
    assert by[("sync", False)]["projected_step_seconds"] == pytest.approx(0.04 + kv + norm + halo)
    assert by[("sync", False)]["projected_pessimistic_step_seconds"] == pytest.approx(0.04 + kv + norm + halo)
    assert by[("full", False)]["projected_step_seconds"] == pytest.approx(max(0.04, kv) + norm + halo)
    # one communicator: the stale K/V queued ahead of the GroupNorm all-reduces
    assert by[("full", False)]["projected_pessimistic_step_seconds"] == pytest.approx(0.04 + kv + norm + halo)
    # the stale communicator: one post's K/V (4 messages to one peer: 4 posts) exposed at the end of the step
    assert by[("full", True)]["projected_pessimistic_step_seconds"] == pytest.approx(max(0.04, kv) + kv / 4 + norm + halo)
    c = by[("full", False)]
    assert c["relative_error"] == pytest.approx(c["projected_step_seconds"] / 0.05 - 1)
    assert c["pessimistic_relative_error"] == pytest.approx(c["projected_pessimistic_step_seconds"] / 0.05 - 1)
    assert c["within_bounds"] == (0.95 * c["projected_step_seconds"] <= 0.05 <= 1.05 * c["projected_pessimistic_step_seconds"])
    assert not by[("sync", False)]["within_bounds"]         # 0.05 s is below what sync must take
