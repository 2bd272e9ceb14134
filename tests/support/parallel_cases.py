"""The matrix of patch-parallel cases run under torchrun (tests/support/dist_worker.py) and in the
single-process emulator (tests/parallel/test_parallel.py): one definition, so both run the same thing."""
from __future__ import annotations

from parafuse.runtime import ParallelConfig, Request

# 80 px = 20 latent rows = 5 units of the U-Net's factor 4 (10 of the DiT's 2): uneven strips at N = 2, 3, 4
HEIGHT, WIDTH = 80, 48
STEPS, WARMUP = 3, 1          # step 0 synchronous, steps 1-2 asynchronous (stale)
# 128 px = 32 latent rows: at N = 2 each strip has 4 rows at the U-Net's attention level (1/4), so
# ceil(p * 4) = 4p rows for p in {0.25, 0.5, 1}: partial-mode K/V bytes are exactly linear in p
LINEAR_HEIGHT = 128
MODELS = ("unet-small", "dit-small")


def cases(world_size: int) -> dict[str, tuple[str, ParallelConfig, Request]]:
    out = {}
    req = Request(HEIGHT, WIDTH, STEPS, "ddim", 1.0, seed=7, label=3)
    for model in MODELS:
        for name, cfg in {
            "sync": ParallelConfig("sync"),
            "full": ParallelConfig("full", WARMUP),
            "partial": ParallelConfig("partial", WARMUP, 0.3),
            "partial0": ParallelConfig("partial", WARMUP, 0.0),
            "none": ParallelConfig("none", WARMUP),
            # the baselines' traffic with parafuse's (exact) statistics: their counterparts' values
            "distrifusion": ParallelConfig("distrifusion", WARMUP, norm_mode="exact"),
            "pcpp": ParallelConfig("pcpp", WARMUP, 0.3, norm_mode="exact"),
        }.items():
            out[f"{model}-{name}"] = (model, cfg, req)
        out[f"{model}-guided-full"] = (model, ParallelConfig("full", WARMUP), Request(HEIGHT, WIDTH, STEPS, "ddim", 3.0, 7, 3))
    # stale K/V as one-bit messages (parafuse.parallel.kv_codec), uint8 payloads on the wire: the
    # engine's K/V path is the same for both models, so the DiT alone
    for name, portion in (("full", None), ("partial", 0.3)):
        out[f"dit-small-{name}-sign"] = ("dit-small", ParallelConfig(name, WARMUP, portion, kv_codec="sign"), req)
    if world_size == 2:
        for p in (0.25, 0.5, 1.0):
            out[f"linear-{p}"] = ("unet-small", ParallelConfig("partial", WARMUP, p),
                                  Request(LINEAR_HEIGHT, WIDTH, STEPS, "ddim", 1.0, 7, 3))
    if world_size % 2 == 0:
        guided = Request(HEIGHT, WIDTH, STEPS, "ddim", 3.0, seed=7, label=3)
        out["cfgpar-sync"] = ("unet-small", ParallelConfig("sync", cfg_parallel=True), guided)
        out["cfgpar-full"] = ("unet-small", ParallelConfig("full", WARMUP, cfg_parallel=True), guided)
    return out
