"""The one-bit stale K/V codec (parafuse.parallel.kv_codec): the packed messages against a plain
reference of the update rule, sender and receiver mirrors bit for bit (alone and inside the engine
on every rank), how well the mirror tracks drifting K/V, and the settings it refuses. Its bytes in
closed form and torchrun = emulator are in tests/parallel/test_parallel.py (cases full-sign, partial-sign)."""
import pytest
import torch

from parafuse.models import load_model
from parafuse.parallel import kv_codec
from parafuse.runtime import emulate
from parafuse.runtime import ParallelConfig, Request, Runtime
from support.codec import mirror_pairs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reference_step(fresh, mirror, drift):
    """The docstring's rule, unpacked: P = M + D, r = K - P, s = mean|r| over each half's channels
    (rounded to the dtype), D += s sign(r) (sign(0) = +1), M += D. Returns the new (mirror, drift)."""
    t, b, c2 = fresh.shape
    r = fresh - (mirror + drift)
    s = r.view(t, b, 2, c2 // 2).abs().mean(-1, dtype=torch.float32).to(fresh.dtype)[..., None]
    q = torch.where(r.view(t, b, 2, c2 // 2) >= 0, s, -s).view(t, b, c2)
    drift = drift + q
    return mirror + drift, drift


def trajectory(steps, t=6, b=2, c=32, dtype=torch.float32, seed=0):
    """K/V that drift smoothly (a velocity that turns slowly) plus a little noise: what stale steps see."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(t, b, 2 * c, generator=g)
    v0, v1 = torch.randn(t, b, 2 * c, generator=g), torch.randn(t, b, 2 * c, generator=g)
    out = []
    for i in range(steps):
        k = k + 0.1 * (v0 + i / steps * v1) + 0.005 * torch.randn(t, b, 2 * c, generator=g)
        out.append(k.to(dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_messages_equal_the_unpacked_reference_and_mirrors_stay_equal(dtype):
    ks = trajectory(8, dtype=dtype)
    t, b, c2 = ks[0].shape
    payload = torch.empty((t, b, kv_codec.payload_bytes(c2 // 2, dtype)), dtype=torch.uint8)
    sender = [ks[0].clone(), torch.zeros_like(ks[0])]
    receiver = [ks[0].clone(), torch.zeros_like(ks[0])]
    ref = (ks[0].clone(), torch.zeros_like(ks[0]))
    for k in ks[1:]:
        kv_codec.encode(k, *sender, payload)
        kv_codec.decode(payload.clone(), *receiver)
        ref = reference_step(k, *ref)
        assert torch.equal(sender[0], receiver[0]) and torch.equal(sender[1], receiver[1])
        assert torch.equal(sender[0], ref[0]) and torch.equal(sender[1], ref[1])


def test_payload_is_sign_bytes_then_two_scales():
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)):
        for c in (16, 96, 128, 1152):
            assert kv_codec.payload_bytes(c, dtype) == 2 * c // 8 + 2 * size
    # bf16 at PixArt's width: 6.3% of the exact message, at dit-texture's: 7.0%
    assert kv_codec.payload_bytes(1152, torch.bfloat16) / (2 * 1152 * 2) == pytest.approx(0.0634, abs=1e-4)
    assert kv_codec.payload_bytes(128, torch.bfloat16) / (2 * 128 * 2) == pytest.approx(0.0703, abs=1e-4)
    with pytest.raises(ValueError, match="divisible by 16"):
        kv_codec.check_channels(72, "attention 'x'")


def test_mirror_tracks_drifting_kv_far_better_than_the_frozen_copy():
    """Error feedback with the linear prediction: after a few steps the mirror is within a small
    part of one step's change of the truth; the last exact copy (no messages) falls ever further
    behind. Measured here: 0.39 of a step's change after 11 steps; the frozen copy is 11 steps behind."""
    ks = trajectory(12)
    mirror, drift = ks[0].clone(), torch.zeros_like(ks[0])
    payload = torch.empty((6, 2, kv_codec.payload_bytes(32, torch.float32)), dtype=torch.uint8)
    for k in ks[1:]:
        kv_codec.encode(k, mirror, drift, payload)
    step = (ks[-1] - ks[-2]).abs().mean()
    assert (mirror - ks[-1]).abs().mean() < 0.5 * step
    assert (ks[0] - ks[-1]).abs().mean() > 5 * step





@pytest.mark.parametrize("mode", ["full", "partial"])
def test_every_rank_holds_the_senders_mirror_bit_for_bit(mode):
    model = load_model("dit-small")
    req = Request(64, 48, 5, "ddim", 1.0, seed=3, label=1)
    portion = 0.3 if mode == "partial" else None          # a window only where the mode has one
    runtimes, results = emulate(model, 3, ParallelConfig(mode, 1, portion, kv_codec="sign"), req)
    pairs = mirror_pairs(runtimes)
    assert len(pairs) >= 2 * len(model.blocks)
    for held, sent in pairs:
        assert torch.equal(held, sent)
    assert torch.isfinite(results[0][0].image).all()


def test_sign_codec_changes_the_image_little_and_moves_few_bytes():
    """`full` with one-bit messages against exact stale K/V (same N, warmup, request): close to it
    (a codec that dropped its updates would sit at the frozen-K/V floor, far below), and its stale
    steps move under a tenth of the K/V bytes."""
    model = load_model("dit-small")
    req = Request(64, 64, 6, "ddim", 1.0, seed=5, label=2)
    serial = Runtime(model, ParallelConfig()).generate(req).image

    def run(codec):
        rts, res = emulate(model, 4, ParallelConfig("full", 2, kv_codec=codec), req)
        return res[0][0].image, [rt.transport.totals()[0]["attn_kv"] for rt in rts]

    exact, kv_exact = run("none")
    signed, kv_sign = run("sign")
    err_exact, err_sign = ((img - serial).pow(2).mean().item() for img in (exact, signed))
    assert err_sign < 2 * err_exact
    # every rank: 2 synchronous steps send whole K/V in both runs; the 4 stale steps send
    # 2d/8 + 8 bytes a token (d = 128, float32) where `full` sends 8d
    for got, whole in zip(kv_sign, kv_exact):
        per_step = whole / 6
        assert got == pytest.approx(2 * per_step + 4 * per_step * (2 * 128 // 8 + 8) / (8 * 128), rel=1e-12)


@pytest.mark.parametrize("mode, portion, match", [
    ("sync", None, "'sync' sends none"), ("none", None, "'none' sends none"),
    ("partial", 0.0, "with halo portion 0 sends none"), ("distrifusion", None, "published system"),
    ("pcpp", 0.3, "published system")])
def test_codec_refused_where_no_stale_kv_is_sent(mode, portion, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(mode, 1, portion, kv_codec="sign")


def test_unknown_codec_lists_valid():
    with pytest.raises(ValueError, match="valid: none, sign"):
        ParallelConfig("full", kv_codec="int4")
