"""The projection arithmetic of benchmarks/project.py on synthetic rows, against closed forms
worked out by hand. No measurement, no torchrun: pure arithmetic."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from project import Link, fit_link, interpolate, kind_seconds, project_rows, step_seconds  # noqa: E402

LINK = Link("test", bandwidth=1e9, latency=1e-5, source="synthetic")      # 1 GB/s, 10 µs


def rows(mode="full", messages=True):
    """Serial 100 ms; N = 2, 4, 8 with compute 60, 35, 20 ms and growing all-gather K/V."""
    out = [{"model": "m", "size": 64, "mode": "serial", "n": 1, "seconds": 0.1, "serial_seconds": 0.1,
            "bytes_per_step": {}}]
    for n, c in ((2, 0.06), (4, 0.035), (8, 0.02)):
        r = {"model": "m", "size": 64, "mode": mode, "n": n, "seconds": c, "serial_seconds": 0.1,
             "bytes_per_step": {"attn_kv": 1_000_000 * (n - 1) // n, "latent_halo": 4096,
                                "norm_stats": 2 * (n - 1) * 8},      # ring bytes: grow with N
             "strip_seconds": {"0": c}}
        if messages:
            r["messages_per_step"] = {"attn_kv": 10 * (n - 1), "latent_halo": 2, "norm_stats": 3}
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


def test_projection_of_an_interpolated_n_matches_the_closed_form():
    out = {r["n"]: r for r in project_rows(rows(), LINK, max_n=16, norm_on_critical_path=False)}   # --norm corrected
    r = out[6]                 # between N=4 and N=8
    w = (1 / 6 - 1 / 4) / (1 / 8 - 1 / 4)
    compute = 0.035 + w * (0.02 - 0.035)
    kv = 750_000 + w * (875_000 - 750_000)
    ar_bytes = 48 + w * (112 - 48)
    kv_msgs = 30 + (6 - 4) / (8 - 4) * (70 - 30)
    comm_async = kv_msgs * 1e-5 + kv / 1e9 + 3 * 2 * 5 * 1e-5 + ar_bytes / 1e9
    critical = 2e-5 + 4096 / 1e9
    assert r["projected_compute_seconds"] == pytest.approx(compute)
    assert r["projected_comm_async_seconds"] == pytest.approx(comm_async)
    assert r["projected_step_seconds"] == pytest.approx(max(compute, comm_async) + critical)
    assert r["projected_speedup"] == pytest.approx(0.1 / (max(compute, comm_async) + critical))


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
    assert r["projected_comm_critical_seconds"] == pytest.approx((4096 + 48) / 1e9)


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
    for r in project_rows(rows(), LINK, max_n=16) + project_rows(rows("sync"), LINK, max_n=5):
        for key, value in r.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, dict)
            if numeric and key not in inputs:
                assert key.startswith("projected_"), key
        assert r["projected_bound"] in ("compute", "comm")


def test_fit_link_recovers_latency_and_bandwidth():
    link = fit_link({s: 20e-6 + s / 2e9 for s in (1024, 8192, 65536, 1 << 20, 8 << 20)})
    assert link.latency == pytest.approx(20e-6, rel=1e-6) and link.bandwidth == pytest.approx(2e9, rel=1e-6)
