"""benchmarks/peers.py: diffusers' Ulysses and parafuse's modes on a Flux-config pipeline (narrow
widths, N = 2): both run, the bytes each sends per step match the closed forms the counted rows use,
and Ulysses and parafuse's sync equal the single-process output."""

import peers


def test_closed_forms_by_hand():
    cfg = peers.FLUX
    t = (4096 // 16) ** 2                  # 65 536 image tokens at 4096²
    u = peers.ulysses_bytes(cfg, 4096, 8, 2)
    assert u["attn_all_to_all"] == (57 * 4 * 7 / 8 * (t + 512) / 8 * 3072 * 2, True)
    p = peers.parafuse_bytes(cfg, 4096, 8, 2, "full", "sign", "exact")
    assert p["attn_kv"] == (57 * 7 * t / 8 * (2 * 3072 // 8 + 4), False)         # stale: off the critical path
    # the exact merge: every peer's lse (float32) all-gathered, the reweighted output (bf16) all-reduced
    assert p["text_attn"] == (57 * (7 * 24 * 512 * 4 + 2 * 7 / 8 * 24 * 512 * 128 * 2), True)
    assert peers.parafuse_bytes(cfg, 4096, 8, 2, "sync", "sign", "exact")["attn_kv"] == (57 * 7 * t / 8 * 2 * 3072 * 2, True)
    # the stale merge: each peer gets every text token's lse (float32) and output (bf16) per head
    assert peers.parafuse_bytes(cfg, 4096, 8, 2, "full", "none", "stale")["text_attn"] == \
        (57 * 7 * 24 * 512 * (4 + 128 * 2), False)
    assert peers.parafuse_bytes(cfg, 4096, 8, 4, "full", "none", "stale")["text_attn"] == (57 * 7 * 24 * 512 * 129 * 4, False)


def test_measured_bytes_match_the_closed_forms_and_exact_modes_are_exact():
    rows = peers.measure(peers.NARROW, 64, [2], steps=3, warmup=1, text_len=16, log=lambda *a: None)
    by = {r["system"]: r for r in rows}
    assert set(by) == {"diffusers ulysses"} | {peers.label(*m) for m in peers.PARAFUSE_MODES}
    for r in rows:
        assert r["check"] and max(r["check"].values()) == 0, (r["system"], r["check"], r["bytes_per_step"])
    assert by["diffusers ulysses"]["max_abs"] < 1e-5
    assert by[peers.label("sync", "none", "exact")]["max_abs"] < 1e-5
    assert by[peers.label("full", "sign", "exact")]["bytes_per_step"]["attn_kv"] < \
        by[peers.label("full", "none", "exact")]["bytes_per_step"]["attn_kv"] / 3
