"""The patch plan and what it fixes ahead of time: devices, memory by mode, the benchmark configs."""
import dataclasses
import json
import math

import pytest

from parafuse.models import load_model
from parafuse.parallel.adapter import BUILTIN
from parafuse.parallel.parallelize import PATCH_LAYERS
from parafuse.parallel.plan import Site, SiteKind
from parafuse.parallel.distributed import ParallelLayout
from parafuse.runtime import emulate
from parafuse.parallel.geometry import StripGeometry
from parafuse.parallel.transport import NullTransport
from parafuse.runtime import ParallelConfig, Request, Runtime


def strip_runtime(model, mode, n=2, strip=0, device=None, **kw):
    return Runtime(model, ParallelConfig(mode, warmup_steps=1, **kw), device=device,
                   layout=ParallelLayout(strip, n), transport=NullTransport(strip, n))


@pytest.mark.parametrize("name", ["unet-small-text", "dit-small"])
def test_model_on_meta_device_runs_the_trace_and_a_patched_step(name):
    """A model that is not on the CPU (on a GPU, or here on `meta`) must get its shape trace, plan
    buffers and every patch layer's temporaries on its own device: one CPU tensor mixed in raises."""
    model = load_model(name, device="meta")
    assert next(model.parameters()).device.type == "meta"
    serial = Runtime(model, ParallelConfig(), device="meta")
    assert serial.profile.sites
    req = Request(64, 48, 2, "ddim", seed=1)
    out = strip_runtime(load_model(name, device="meta"), "full", n=3, strip=1, device="meta").rank_step(req)()
    assert out.device.type == "meta" and out.shape[2] == StripGeometry(16, 12, 3, 4 if "unet" in name else 2).rows[1]


@pytest.mark.slow
@pytest.mark.parametrize("name, attn_sites, norm_sites", [("unet-xl", 70, 46), ("dit-xl", 28, 0)])
def test_benchmark_configs_plan_at_scale_on_meta(name, attn_sites, norm_sites):
    """unet-xl (SDXL's widths, transformer depth 2/10) and dit-xl (PixArt-alpha) build, trace and
    plan at 2048 px on 8 strips without allocating their weights."""
    model = load_model(name, device="meta")
    assert model.spec.untrained
    rt = strip_runtime(model, "partial", n=8, strip=3, device="meta")
    kinds = [s.kind for s in rt.profile.sites]
    assert kinds.count("attn") == attn_sites and kinds.count("norm") == norm_sites
    geometry = rt.check(Request(2048, 2048))
    assert geometry.height == 256                 # the 8x codec: SDXL's and PixArt's latent size at 2048 px
    params = sum(p.numel() for p in model.parameters())
    assert params > 5e8


def kv_state(rt) -> int:
    return sum(b["kv"].untyped_storage().nbytes() for b in rt.engine.buffers.values() if "kv" in b)


def test_partial_holds_only_its_windows_between_steps():
    """After the synchronous warmup, `partial` keeps K/V windows of ceil(p * rows) rows of each
    neighbour (ceil rounding included) - never the whole-image K/V that `full` keeps."""
    req = Request(112, 48, 3, "ddim", seed=2, label=1)      # 28 latent rows: 7 rows at 1/4 over 3 strips: 3/2/2
    p = 0.3
    runtimes, _ = emulate(load_model("unet-small"), 3, ParallelConfig("partial", 1, p), req)
    full_rts, _ = emulate(load_model("unet-small"), 3, ParallelConfig("full", 1), req)
    attn = [s for s in runtimes[0].profile.sites if s.kind == "attn"]
    geo = StripGeometry(28, 12, 3, 4)
    for strip, (rt, full) in enumerate(zip(runtimes, full_rts)):
        want = 0
        for s in attn:
            lv = geo.level(s.factor)
            rows = lv.rows[strip]
            for j in (strip - 1, strip + 1):
                if 0 <= j < 3:
                    rows += min(lv.rows[j], max(1, math.ceil(p * lv.rows[j])))
            want += rows * lv.width * 2 * s.channels * 4        # K and V, float32, batch 1
        assert kv_state(rt) == want
        assert not rt.engine.scratch                              # the warmup's whole-image K/V is gone
        assert kv_state(full) == len(attn) * geo.level(attn[0].factor).height * geo.width // 4 * 2 * attn[0].channels * 4
        assert rt.engine.state_bytes() < full.engine.state_bytes()
        assert rt.engine.state_bytes() == rt.engine.state_bytes()  # deterministic walk


def test_report_state_bytes_falls_with_mode():
    req = Request(128, 64, 3, "ddim", seed=2, label=1)
    state = {}
    for mode in ("full", "partial", "none"):
        _, res = emulate(load_model("dit-small"), 2, ParallelConfig(mode, 1), req)
        state[mode] = res[0][0].rank_stats["state_bytes"]
    assert state["full"] > state["partial"] > state["none"] > 0


def test_fused_kv_weight_follows_weights_loaded_after_parallelize():
    """The K|V projection is one GEMM with a cached fused weight; weights loaded in place after
    parallelize() must be the ones used."""
    req = Request(64, 32, 2, "ddim", seed=3, label=2)
    other = load_model("dit-small", seed=5)
    want = Runtime(other, ParallelConfig()).generate(req).latent

    weights = other.state_dict()         # built here: the emulator's threads share one RNG

    def load_other(rt):
        rt.model.load_state_dict(weights)
    _, res = emulate(load_model("dit-small"), 2, ParallelConfig("sync"), req, on_rank=load_other)
    assert (res[0][0].latent - want).abs().max() <= 2e-4


@pytest.mark.parametrize("name", ["unet-small-text", "dit-small"])
def test_builtin_site_kinds_are_site_kind_members(name):
    """The built-in adapter answers with SiteKind members (or None), never a bare string; the
    sites the shape trace builds carry the same members."""
    model = load_model(name, device="meta")
    kinds = {BUILTIN.site_kind(m) for m in model.modules()} - {None}
    assert kinds and all(type(k) is SiteKind for k in kinds)
    sites = Runtime(model, ParallelConfig(), device="meta").profile.sites
    assert {s.kind for s in sites} <= kinds and all(type(s.kind) is SiteKind for s in sites)
    assert set(PATCH_LAYERS) == {SiteKind.CONV, SiteKind.NORM, SiteKind.ATTN, SiteKind.POSITIONS}


def test_site_kind_from_a_string_is_the_member_and_an_unknown_one_is_refused():
    assert Site("a", "conv", 1).kind is SiteKind.CONV
    with pytest.raises(ValueError, match="'conv2d' is not a valid SiteKind"):
        Site("a", "conv2d", 1)


def test_site_kind_serializes_as_its_old_string():
    """JSON, f-strings and str() of a kind are the plain strings they were before SiteKind, and a
    kind is equal to and looked up as its string."""
    sites = Runtime(load_model("unet-small-text", device="meta"), ParallelConfig(), device="meta").profile.sites
    for s in sites:
        plain = {**dataclasses.asdict(s), "kind": s.kind.value}
        assert type(plain["kind"]) is str
        assert json.dumps(dataclasses.asdict(s)) == json.dumps(plain)
        assert f"{s.kind}" == str(s.kind) == s.kind.value and s.kind == s.kind.value
        assert {s.kind.value: 1}[s.kind] == 1
    assert {s.kind.value for s in sites} == {"conv", "norm", "attn"}
