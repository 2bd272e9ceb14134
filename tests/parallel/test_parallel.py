"""Patch parallelism under torchrun (gloo, CPU) against the serial model and the single-process
emulator. One torchrun launch per N runs the whole case matrix (tests/support/parallel_cases.py)."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

from support.parallel_cases import HEIGHT, STEPS, WIDTH, cases  # noqa: E402

from parafuse.health import CHECK_EVERY  # noqa: E402
from parafuse.models import load_model  # noqa: E402
from parafuse.models.layers import Attention  # noqa: E402
from parafuse.runtime import emulate  # noqa: E402
from parafuse.parallel.config import BASELINES, PatchConfig  # noqa: E402
from parafuse.parallel.engine import ExchangeEngine  # noqa: E402
from parafuse.parallel.geometry import StripGeometry  # noqa: E402
from parafuse.parallel.transport import COLLECTIVE, ring_bytes  # noqa: E402
from parafuse.runtime import ParallelConfig, Request, Runtime  # noqa: E402

from support import ROOT, launch  # noqa: E402

WORLD_SIZES = (2, 3, 4)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"N{n}")
def dist_run(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"dist{n}")
    proc = launch.run(n, os.path.join(ROOT, "tests", "support", "dist_worker.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(n)]
               for name in cases(n)}
    return n, results


_cache = {}


def serial(model: str, req: Request) -> torch.Tensor:
    key = (model, req)
    if key not in _cache:
        _cache[key] = Runtime(load_model(model), ParallelConfig()).generate(req).latent
    return _cache[key]


def emulated(n: int, name: str):
    key = ("emu", n, name)
    if key not in _cache:
        model, cfg, req = cases(n)[name]
        _, results = emulate(load_model(model), n, cfg, req)
        _cache[key] = [r[0] for r in results]
    return _cache[key]


def latent(results) -> torch.Tensor:
    return results[0]["image"]


def test_sync_equals_serial_and_activations_are_strips(dist_run):
    n, results = dist_run
    for model in ("unet-small", "dit-small"):
        _, cfg, req = cases(n)[f"{model}-sync"]
        ref = Runtime(load_model(model), ParallelConfig()).generate(req)
        got = results[f"{model}-sync"]
        assert (got[0]["image"] - ref.image).abs().max() <= 2e-4
        # every conv on rank r saw only its strip's rows at that conv's level, never the whole image
        spec = load_model(model).spec
        geo = StripGeometry(HEIGHT // spec.codec_factor, WIDTH // spec.codec_factor, n, spec.downsample_factor)
        plain = load_model(model)
        widths = {}
        for name, mod in plain.named_modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.register_forward_hook(lambda m, a, o, name=name: widths.setdefault(name, a[0].shape[-1]) and None)
        plain(torch.randn(1, spec.latent_channels, geo.height, geo.width), 1.0)
        for r in range(n):
            for conv, rows in got[r]["conv_rows"].items():
                level = geo.level_of_width(widths[conv])
                assert rows == level.rows[r], (model, r, conv, rows, level.rows)


def test_cfg_parallel_sync_equals_serial_guidance(dist_run):
    n, results = dist_run
    if n % 2:
        pytest.skip("CFG parallel needs an even number of ranks")
    model, _, req = cases(n)["cfgpar-sync"]
    ref = Runtime(load_model(model), ParallelConfig()).generate(req)
    assert (results["cfgpar-sync"][0]["image"] - ref.image).abs().max() <= 2e-4


@pytest.mark.parametrize("model, case", [(m, c) for m in ("unet-small", "dit-small")
                                         for c in ("full", "partial", "guided-full")]
                         + [("dit-small", "full-sign"), ("dit-small", "partial-sign")])
def test_async_modes_equal_emulator_and_differ_from_serial(dist_run, model, case):
    n, results = dist_run
    name = f"{model}-{case}"
    got = results[name]
    emu = emulated(n, name)
    assert (got[0]["image"] - emu[0].image).abs().max() <= 1e-5
    for r in range(n):
        assert got[r]["rank_stats"]["bytes_sent_per_peer"] == emu[r].rank_stats["bytes_sent_per_peer"]
    _, cfg, req = cases(n)[name]
    ref = Runtime(load_model(model), ParallelConfig()).generate(req).image
    assert (got[0]["image"] - ref).abs().max() > 1e-3, "a stale mode that equals the serial run exchanged too much"


@pytest.mark.parametrize("baseline", sorted(BASELINES))
@pytest.mark.parametrize("model", ["unet-small", "dit-small"])
def test_baselines_compute_their_modes_values_with_their_own_traffic(dist_run, model, baseline):
    """DistriFusion and PCPP as comparison modes: with the same GroupNorm statistics they compute the
    values of `full` / `partial` (bit for bit: the same data reaches every layer), moved the way
    those systems move it - more bytes."""
    n, results = dist_run
    got, ours = results[f"{model}-{baseline}"], results[f"{model}-{BASELINES[baseline]}"]
    assert torch.equal(got[0]["image"], ours[0]["image"])
    for r in range(n):
        assert sum(got[r]["rank_stats"]["bytes_sent"].values()) > sum(ours[r]["rank_stats"]["bytes_sent"].values())


def test_cfg_parallel_async_equals_emulator(dist_run):
    n, results = dist_run
    if n % 2:
        pytest.skip("CFG parallel needs an even number of ranks")
    emu = emulated(n, "cfgpar-full")
    assert (results["cfgpar-full"][0]["image"] - emu[0].image).abs().max() <= 1e-5


def test_partial_with_zero_portion_equals_none(dist_run):
    _, results = dist_run
    for model in ("unet-small", "dit-small"):
        a, b = results[f"{model}-partial0"][0]["image"], results[f"{model}-none"][0]["image"]
        assert torch.equal(a, b)
        sent = results[f"{model}-none"][0]["rank_stats"]["bytes_sent"]
        assert sum(sent.values()) == sent["gather"] + sent["control"]


def test_sent_equals_received_per_peer(dist_run):
    n, results = dist_run
    for name, per_rank in results.items():
        for i in range(n):
            for kind, peers in per_rank[i]["rank_stats"]["bytes_sent_per_peer"].items():
                for j, nbytes in peers.items():
                    if j == COLLECTIVE:   # an all-reduce: every rank sends and receives the ring volume
                        assert per_rank[i]["rank_stats"]["bytes_received_per_peer"][kind][j] == nbytes
                        continue
                    assert per_rank[j]["rank_stats"]["bytes_received_per_peer"][kind][i] == nbytes, (name, kind, i, j)


# ---- bytes: a closed form from the model's layer shapes ----------------------------------------
def layer_table(model_name: str, height: int, width: int):
    """(convs, groupnorms, self-attentions) of the serial model at a latent size, from hooks."""
    model = load_model(model_name)
    convs, norms, attns = [], [], []

    def conv_hook(name):
        def fn(m, a, o):
            k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
            top, bottom = p, max(0, (k - 1) - p - s + 1)
            if top or bottom:
                convs.append((name, m.in_channels, a[0].shape[-1], width // a[0].shape[-1], top, bottom))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_hook(name))
        elif isinstance(m, torch.nn.GroupNorm):
            m.register_forward_hook(lambda m, a, o: norms.append(m.num_groups))
        elif isinstance(m, Attention) and not m.is_cross:
            m.register_forward_hook(lambda m, a, o: attns.append((int(math.sqrt(height * width / a[0].shape[1])),
                                                                  a[0].shape[-1])))
    with torch.no_grad():
        model(torch.randn(1, model.spec.latent_channels, height, width), 1.0)
    return model.spec, convs, norms, attns


def expected_bytes(n: int, model_name: str, cfg: ParallelConfig, req: Request) -> list[dict]:
    """Bytes each rank sends to each peer, per kind, over the whole generation (float32)."""
    spec0 = load_model(model_name).spec
    h, w = req.height // spec0.codec_factor, req.width // spec0.codec_factor
    spec, convs, norms, attns = layer_table(model_name, h, w)
    geo = StripGeometry(h, w, n // (2 if cfg.cfg_parallel else 1), spec.downsample_factor)
    p_deg = geo.n
    batch = req.batch * (2 if req.guidance != 1.0 and not cfg.cfg_parallel else 1)
    baseline = cfg.mode in BASELINES        # all-gather halos, statistics and the model output
    mode = BASELINES.get(cfg.mode, cfg.mode)
    exchanges = mode != "none" and not (mode == "partial" and cfg.halo_portion == 0)
    out = []
    for g in range(n):
        i, base = g % p_deg, g - g % p_deg
        sent = {}

        def add(kind, peer, nbytes):
            if nbytes:
                peer = peer if peer == COLLECTIVE else base + peer
                sent.setdefault(kind, {}).setdefault(peer, 0)
                sent[kind][peer] += nbytes

        others = [j for j in range(p_deg) if j != i]
        for step in range(req.steps):
            sync = mode == "sync" or step < max(1, cfg.warmup_steps)
            if exchanges:
                for name, c, width_in, f, top, bottom in convs:
                    kind = "latent_halo" if name == "conv_in" else "conv_halo"
                    if baseline and name != "conv_in":     # both boundaries, to every rank
                        for j in others:
                            add(kind, j, 4 * batch * c * (top + bottom) * width_in)
                        continue
                    if i > 0:
                        add(kind, i - 1, 4 * batch * c * bottom * width_in)
                    if i < p_deg - 1:
                        add(kind, i + 1, 4 * batch * c * top * width_in)
                for groups in norms:          # (Σx, Σx²) per sample and group, float32, one all-reduce
                    if baseline:
                        for j in others:
                            add("norm_stats", j, 4 * 2 * batch * groups)
                    else:
                        add("norm_stats", COLLECTIVE, ring_bytes(4 * 2 * batch * groups, p_deg))
                if baseline:                  # the model output, every step, to every rank
                    for j in others:
                        add("gather", j, 4 * batch * spec.latent_channels * geo.rows[i] * w)
                for f, d in attns:
                    lv = geo.level(f)
                    # a token's K|V: 2d float32 values, or (kv_codec sign, stale steps) 2d sign bits
                    # and two float32 scales
                    token = 4 * 2 * d if sync or cfg.kv_codec == "none" else 2 * d // 8 + 2 * 4
                    if sync or mode == "full":
                        for j in range(p_deg):
                            if j != i:
                                add("attn_kv", j, token * batch * lv.rows[i] * lv.width)
                    else:
                        rows = min(lv.rows[i], max(1, math.ceil(cfg.halo_portion * lv.rows[i])))
                        for j in (i - 1, i + 1):
                            if 0 <= j < p_deg:
                                add("attn_kv", j, token * batch * rows * lv.width)
            if cfg.cfg_parallel:
                peer = (g + p_deg) % n
                sent.setdefault("cfg", {}).setdefault(peer, 0)
                sent["cfg"][peer] += 4 * batch * spec.latent_channels * geo.rows[i] * w
        if i > 0 and base == 0:
            add("gather", 0, 4 * req.batch * spec.latent_channels * geo.rows[i] * w)
        # the health check (parafuse.health): one float per rank summed over the job, every
        # CHECK_EVERY evaluations and after the last
        checks = sum(1 for k in range(req.steps - 1) if (k + 1) % CHECK_EVERY == 0) + 1
        add("control", COLLECTIVE, checks * ring_bytes(4 * n, n))
        out.append(sent)
    return out


def test_bytes_match_closed_form(dist_run):
    n, results = dist_run
    for name, (model, cfg, req) in cases(n).items():
        want = expected_bytes(n, model, cfg, req)
        for r in range(n):
            got = {k: v for k, v in results[name][r]["rank_stats"]["bytes_sent_per_peer"].items() if any(v.values())}
            got = {k: {int(p): b for p, b in v.items() if b} for k, v in got.items()}
            assert got == want[r], (name, r)


def test_attention_bytes_linear_in_portion(dist_run):
    n, results = dist_run
    if n != 2:
        pytest.skip("linearity geometry is laid out for N = 2")
    kv = [results[f"linear-{p}"][0]["rank_stats"]["bytes_sent"]["attn_kv"] for p in (0.25, 0.5, 1.0)]
    assert kv[0] < kv[1] < kv[2]
    assert kv[2] - kv[1] == 2 * (kv[1] - kv[0])


# ---- single-process properties -------------------------------------------------------------------
def test_default_groupnorm_statistics_per_mode():
    """Exact statistics wherever parafuse exchanges; the baselines keep the published corrected-async
    estimate; `none` has only its own strip."""
    from parafuse.parallel.transport import NullTransport
    want = {"sync": "exact", "full": "exact", "partial": "exact", "none": "local",
            "distrifusion": "corrected", "pcpp": "corrected"}
    for mode, norm in want.items():
        assert ExchangeEngine(NullTransport(0, 2), [0, 1], PatchConfig(mode=mode)).norm_mode == norm, mode

def test_switching_halo_exchange_off_breaks_sync(monkeypatch):
    req = Request(HEIGHT, WIDTH, STEPS, "ddim", 1.0, 7, 3)
    ref = serial("unet-small", req)
    _, res = emulate(load_model("unet-small"), 2, ParallelConfig("sync"), req)
    assert (res[0][0].latent - ref).abs().max() <= 2e-4
    original = ExchangeEngine.conv_input

    def no_halo(self, key, x):
        step, self.step = self.step, dataclasses.replace(self.step, halos="zeros")
        try:
            return original(self, key, x)
        finally:
            self.step = step

    monkeypatch.setattr(ExchangeEngine, "conv_input", no_halo)
    _, res = emulate(load_model("unet-small"), 2, ParallelConfig("sync"), req)
    assert (res[0][0].latent - ref).abs().max() > 1e-2


@pytest.mark.torchrun
def test_rank_failure_stops_every_rank(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import torch\n"
        "from parafuse.parallel.distributed import run_guarded\n"
        "from parafuse.runtime import Runtime, ParallelConfig, Request\n"
        "def main():\n"
        "    rt = Runtime('dit-small', ParallelConfig('full', 1))\n"
        "    if rt.layout.rank == 1:\n"
        "        rt.model.blocks[0].register_forward_hook(lambda *a: 1 / 0)\n"
        "    rt.generate(Request(64, 64, 3, 'ddim'))\n"
        "run_guarded(main)\n")
    proc = launch.run(3, str(script), timeout=300)
    assert proc.returncode != 0
    assert "rank 1 failed: ZeroDivisionError" in proc.stderr
