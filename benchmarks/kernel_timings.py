"""parafuse's Triton kernels against the alternatives, at the strip shapes of real models.

    PYTHONPATH=.:kernels python benchmarks/kernel_timings.py                 # on a GPU
    PYTHONPATH=.:kernels python benchmarks/kernel_timings.py --write-auto    # ... and update `auto`'s table
    PYTHONPATH=.:kernels python benchmarks/kernel_timings.py --smoke         # logic check on CPU (interpreter)

Timing (`time_us`, by common.time_calls): back-to-back calls - a CUDA graph of ~2 ms of calls replayed --repeat (20) times (eager
back-to-back launches where a backend cannot be captured) - median, quartiles and spread per call;
never one call from an idle GPU.
attention  one strip's self-attention at the runtime's own layout: queries of strip 1 of N (a view
           of [B, Lq, H·D]), keys the whole image for `full`, the strip plus two windows of
           ceil(p·rows/N) rows for `partial` (p = 0.3), read as head views of the K/V buffer
           [tokens, B, 2·dim]; CFG batch B = 2; SDXL's two attention levels (10 heads × 64 at 1/16
           of the pixels, 20 × 64 at 1/32), PixArt-size (16 × 72) and Flux-size (24 × 128) models
           at 1/16, 2048 px (--sizes), N = 1, 2, 4, 8.
           Backends: the Triton halo attention (its autotuned config and split-KV count recorded),
           SDPA's own dispatch, SDPA forced to cuDNN, flash and efficient (sdpa_kernel), cuDNN with
           its log-sum-exp (what the SD3/Flux text merge needs), xformers where installed.
           Flux-size rows add the q prologue (RMS norm + RoPE): fused in the kernel vs separate
           ops + SDPA. TFLOP/s (4·B·H·Lq·Lk·d) and the fraction of the card's measured bf16 GEMM
           peak. The rows give `auto`'s table (per head dim and shape class: the Triton kernel where
           it beats SDPA's dispatch), written with --write-auto.
update     the fused solver update (dpmpp-2m, steady state, CFG fused) against the eager step, fp32
           and bf16, on a tensor far larger than L2 and at a real strip latent (SDXL 4K, N = 8);
           GB/s (bytes each path must move at least) and the fraction of a measured device copy.
groupnorm  a patched GroupNorm (SDXL 640 channels): the Triton kernels (+ fused SiLU) vs the PyTorch
           path of PatchGroupNorm + SiLU; their GB/s (3 passes over x at least) against a copy; and
           the sums bit for bit (reruns, graph replay vs eager) at unet-xl 2048², N = 8, level 0.
Writes benchmarks/results/kernels_<device>.json (common.write_result: the attention rows as `rows`,
the other sections beside them) and .png, and prints
the tables. `--smoke` runs tiny shapes through Triton's interpreter on CPU: it checks this script,
its timings say nothing.
"""
from __future__ import annotations

import json
import math
import os
import sys

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"          # read when the kernel modules are imported

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS, add_device, add_timing, config_of, hardware, median_seconds, parser,  # noqa: E402
                    provenance, save_plot, table, time_calls, write_result)


from parafuse.attention import AUTO_TABLE  # noqa: E402

# heads, head dim, pixels per token: SDXL's U-Net attends at 1/16 of the image (10 heads) and 1/32
# (20 heads); PixArt and Flux at 1/16 (latent /8, patch 2)
MODELS = {"sdxl-l1": (10, 64, 16), "sdxl-l2": (20, 64, 32), "pixart": (16, 72, 16), "flux": (24, 128, 16)}
SMOKE_MODELS = {"sdxl": (2, 64, 32), "pixart": (1, 72, 32), "flux": (2, 128, 32)}
PORTION = 0.3
BATCH = 2                                   # CFG: conditional and unconditional in one batch
SAMPLES = 20                                # timed samples per backend and shape (median and spread): --repeat


def strip_shape(px: int, n: int, mode: str, patch_px: int = 16) -> tuple[int, int]:
    """(queries, keys) of strip 1 of n (a middle strip: two neighbours) at `px`² pixels."""
    rows = cols = px // patch_px
    mine = rows // n + (1 if rows % n > 1 else 0)
    if n == 1 or mode == "full":
        return mine * cols, rows * cols
    window = math.ceil(PORTION * mine)
    return mine * cols, (mine + 2 * window) * cols


def attention_inputs(lq, lk, heads, d, dtype, device, batch=1, make=torch.randn):
    """q [B, H, Lq, D] (a view of [B, Lq, H·D]) and k, v: head views of a K/V buffer [Lk, B, 2·H·D],
    as the patch layers lay them out (`make`: torch.randn, or torch.empty for compile-only uses)."""
    dim = heads * d
    q = make(batch, lq, dim, device=device, dtype=dtype).view(batch, lq, heads, d).transpose(1, 2)
    buf = make(lk, batch, 2 * dim, device=device, dtype=dtype)

    def heads_of(t):
        return t.permute(1, 0, 2).unflatten(-1, (heads, d)).transpose(1, 2)
    return q, heads_of(buf[..., :dim]), heads_of(buf[..., dim:])


def time_us(fn, device, a) -> dict:
    """Per-call time of `fn` by common.time_calls from back-to-back calls, not one call from an idle
    device: on CUDA ~2 ms of calls captured in one CUDA graph and replayed --repeat times (eager
    back-to-back launches where the capture fails), each replay timed by events; --timing-warmup
    calls first (autotuning). Median, quartiles and the spread (max - min) / median, in µs per call."""
    t = time_calls(fn, device, repeat=1 if a.smoke else a.repeat, warmup=a.timing_warmup, replay=True)
    return {"us": t["seconds"] * 1e6, "p25_us": t["seconds_p25"] * 1e6, "p75_us": t["seconds_p75"] * 1e6,
            "spread": t["spread"], "samples": t["count"], "inner": t["inner"], "timing": t["timing"]}


def attention_backends(device):
    """name -> fn(q, k, v) -> out; every SDPA backend forced with sdpa_kernel on CUDA, beside SDPA's
    own dispatch ("sdpa": what the sdpa backend and `auto` run) and cuDNN with its log-sum-exp (what
    the SD3/Flux text merge needs from a non-Triton backend)."""
    from parafuse_kernels.attention import halo_attention
    fns = {"triton": lambda q, k, v: halo_attention(q, k, v)[0], "sdpa": F.scaled_dot_product_attention}
    if device.type == "cuda":               # K/V by TMA descriptors (Hopper): timed beside, never auto's pick yet
        fns["triton-tma"] = lambda q, k, v: halo_attention(q, k, v, tma=True)[0]
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, kind in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                           ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(q, k, v, kind=kind):
                with sdpa_kernel(kind):
                    return F.scaled_dot_product_attention(q, k, v)
            fns[name] = run
        fns["cudnn-lse"] = lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True)[0]
        try:
            import xformers.ops as xops
            fns["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        except ImportError:
            pass
    return fns


def gemm_peak(device, smoke) -> float:
    """Measured bf16 GEMM TFLOP/s (the card's practical tensor-core peak)."""
    n = 256 if smoke else 8192
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, device, repeat=1 if smoke else 20) / 1e12


def _sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def bench_attention(a, device, peak) -> list[dict]:
    """Every backend at the runtime's own layout (q a view of [B, Lq, H·D], K/V head views of the
    buffer [tokens, B, 2·H·D], B = 2 for CFG) for each model, size, N and mode."""
    from parafuse.attention import q_prologue, shape_class
    from parafuse_kernels import attention as ka
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes, ns = (a.sizes, (1, 2, 4, 8)) if not a.smoke else ((128,), (1, 4))
    models = MODELS if not a.smoke else SMOKE_MODELS
    backends = attention_backends(device)
    rows = []
    for model, (heads, d, patch_px) in models.items():
        for px in sizes:
            for n in ns:
                for mode in (("full",) if n == 1 else ("full", "partial")):
                    lq, lk = strip_shape(px, n, mode, patch_px)
                    q, k, v = attention_inputs(lq, lk, heads, d, dtype, device, batch=BATCH)
                    flops = 4 * BATCH * heads * lq * lk * d
                    programs = -(-lq // 128) * BATCH * heads
                    splits = ka.kv_splits(programs, lk, _sms(device)) if device.type == "cuda" else 1
                    row = {"model": model, "heads": heads, "head_dim": d, "px": px, "n": n, "mode": mode,
                           "queries": lq, "keys": lk, "programs": programs,
                           "shape": shape_class(BATCH * heads, lq, lk, _sms(device)), "triton_splits": splits}
                    if splits > 1:              # the rule's split against none, to check the rule
                        row["triton_unsplit_us"] = time_us(lambda: ka.halo_attention(q, k, v, splits=1)[0],
                                                              device, a)["us"]
                    for name, fn in backends.items():
                        try:
                            t = time_us(lambda: fn(q, k, v), device, a)
                        except RuntimeError as e:          # a backend that does not take this shape
                            row[f"{name}_error"] = str(e).split("\n")[0][:120]
                            continue
                        row[f"{name}_us"], row[f"{name}_spread"] = t["us"], t["spread"]
                        row[f"{name}_timing"] = f"{t['timing']} x{t['inner']}, {t['samples']} samples"
                        row[f"{name}_tflops"] = flops / (t["us"] * 1e-6) / 1e12
                        if name == "triton":
                            row["triton_config"] = ka.chosen_config()      # None under the interpreter
                    if model == "flux":                    # the q prologue: fused vs separate ops
                        w = torch.rand(d, device=device, dtype=dtype) + 0.5
                        ang = torch.rand(lq, d // 2, device=device)
                        cos, sin = ang.cos(), ang.sin()

                        def separate():
                            return F.scaled_dot_product_attention(q_prologue(q, (w, 1e-6), (cos, sin)), k, v)
                        sep = time_us(separate, device, a)
                        fused = time_us(lambda: ka.halo_attention(q, k, v, q_norm=(w, 1e-6), rope=(cos, sin)),
                                           device, a)
                        row["prologue_separate_us"], row["prologue_fused_us"] = sep["us"], fused["us"]
                        row["prologue_speedup"] = sep["us"] / fused["us"]
                    sdpa = [row[f"{n_}_us"] for n_ in backends if n_.startswith("sdpa") and f"{n_}_us" in row]
                    row["fastest_sdpa_us"] = min(sdpa)
                    row["triton_over_fastest_sdpa"] = row["triton_us"] / row["fastest_sdpa_us"]
                    for key in [k_ for k_ in row if k_.endswith("_tflops")]:
                        row[key.replace("_tflops", "_of_peak")] = row[key] / peak
                    rows.append(row)
    return rows


def auto_table(rows: list[dict], device_class: str, source: str) -> list[dict]:
    """One entry per (head dim, shape class): the backend `auto` should run - the Triton kernel (its
    TMA variant where that is the faster of the two) where its summed time over the group's shapes
    beats SDPA's own dispatch (what the sdpa backend runs), else SDPA - with the times and the
    fastest forced SDPA backend's, for the record."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["head_dim"], r["shape"]), []).append(r)
    entries = []
    for (d, shape), group in sorted(groups.items()):
        kernel = "triton"
        if all("triton-tma_us" in r for r in group) and \
                sum(r["triton-tma_us"] for r in group) < sum(r["triton_us"] for r in group):
            kernel = "triton-tma"
        tri, sdpa = sum(r[f"{kernel}_us"] for r in group), sum(r["sdpa_us"] for r in group)
        fastest = sum(r["fastest_sdpa_us"] for r in group)
        entries.append({"device": device_class, "head_dim": d, "shape": shape,
                        "backend": kernel if tri < sdpa else "sdpa", "triton_us": tri, "sdpa_us": sdpa,
                        "fastest_sdpa_us": fastest, "shapes": len(group), "source": source})
    return entries


def write_auto_table(entries: list[dict], path: str, measured_on: str) -> None:
    """Merge `entries` into the auto table at `path` (other device classes' entries kept) and check it."""
    from parafuse.attention import check_auto_table
    table = {"entries": []}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    mine = {(e["device"], e["head_dim"], e["shape"]) for e in entries}
    table["entries"] = [e for e in table["entries"] if (e["device"], e["head_dim"], e["shape"]) not in mine] + entries
    table["measured_on"] = measured_on
    check_auto_table(table)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


def bench_update(a, device) -> list[dict]:
    from parafuse.solvers import make_schedule, make_solver
    from parafuse_kernels.update import fused_step, fused_step_reference
    solver = make_solver("dpmpp-2m", make_schedule("flow", shift=3.0), num_steps=20)
    shapes = {"large": (1, 4, 4096, 8192), "strip_sdxl_4k_n8": (1, 4, 64, 512)} if not a.smoke else \
        {"large": (1, 4, 64, 64), "strip": (1, 4, 8, 32)}
    rows = []
    for label, shape in shapes.items():
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=device).to(dt)
            cond, uncond = torch.randn(shape, device=device), torch.randn(shape, device=device)
            state = {"x0s": [torch.randn(shape, device=device)]}
            k = 5
            # at least: read x, cond, uncond, one history entry; write x_next and the new x̂0
            numel = x.numel()
            moved = numel * (2 * x.element_size() + 4 * 4)
            dst = torch.empty(shape, device=device)
            copy_s = time_us(lambda: dst.copy_(cond), device, a)["us"] * 1e-6
            eager_s = time_us(lambda: fused_step_reference(solver, k, x, cond, state, uncond=uncond, guidance=4.0),
                                 device, a)["us"] * 1e-6
            fused_s = time_us(lambda: fused_step(solver, k, x, cond, state, uncond=uncond, guidance=4.0),
                                 device, a)["us"] * 1e-6
            copy_gbps = 2 * numel * 4 / copy_s / 1e9
            rows.append({"shape": label, "dtype": str(dt).replace("torch.", ""), "elements": numel,
                         "copy_GBps": copy_gbps, "eager_us": eager_s * 1e6, "fused_us": fused_s * 1e6,
                         "eager_GBps": moved / eager_s / 1e9, "fused_GBps": moved / fused_s / 1e9,
                         "fused_of_copy": moved / fused_s / 1e9 / copy_gbps})
    return rows


def groupnorm_bits(a, device) -> dict:
    """The GroupNorm sums bit for bit: 10 reruns, and (CUDA) a graph replay, against the first eager
    run, at unet-xl 2048², N = 8, level 0 (B = 2, 320 channels, a 32 x 256 strip: 20 programs per
    group) - where float atomics made the bits vary."""
    from parafuse_kernels import groupnorm as gn
    shape, groups = ((2, 320, 32, 256), 32) if not a.smoke else ((2, 8, 4, 40), 4)
    x = (torch.randn(shape, device=device) * 2 + 3).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = torch.empty(2, shape[0], groups, device=device)
    first = gn.group_sums(x, groups, out).clone()
    result = {"shape": "x".join(map(str, shape)), "programs_per_group": -(-x[0, : shape[1] // groups].numel()
                                                                        // gn.SUMS_BLOCK),
              "reruns_equal": all(torch.equal(gn.group_sums(x, groups, out), first) for _ in range(10))}
    if device.type == "cuda":
        replayed = torch.empty_like(out)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gn.group_sums(x, groups, replayed)
        graph.replay()
        torch.cuda.synchronize(device)
        result["replay_equals_eager"] = torch.equal(replayed, first)
    return result


def bench_groupnorm(a, device) -> list[dict]:
    from parafuse.parallel.engine import moments_from_sums
    from parafuse.parallel.layers import normalize, strip_sums
    from parafuse_kernels import groupnorm as gn
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, c, groups = 1, (640 if not a.smoke else 32), 32 if not a.smoke else 8
    rows = []
    for h in ((32, 128) if not a.smoke else (8,)):
        x = (torch.randn(b, c, h, 4 * h, device=device) * 2 + 3).to(dtype)
        w, bias = torch.randn(c, device=device).to(dtype), torch.randn(c, device=device).to(dtype)
        sums = torch.empty(2, b, groups, device=device)
        count = x[0, : c // groups].numel()
        wf, bf = w.float().repeat(b), bias.float().repeat(b)

        def torch_path():
            strip_sums(x, groups, sums)
            return F.silu(normalize(x, moments_from_sums(sums, count), wf, bf, 1e-5))

        def triton_path():
            gn.group_sums(x, groups, sums)
            return gn.group_norm_apply(x, sums, count, w, bias, 1e-5, silu=True)
        dst = torch.empty_like(x)
        copy_gbps = 2 * x.nbytes / (time_us(lambda: dst.copy_(x), device, a)["us"] * 1e-6) / 1e9
        torch_s = time_us(torch_path, device, a)["us"] * 1e-6
        triton_s = time_us(triton_path, device, a)["us"] * 1e-6
        moved = 3 * x.nbytes                      # at least: x read for the sums, read and written by the apply
        rows.append({"shape": f"{b}x{c}x{h}x{4 * h}", "torch_silu_us": torch_s * 1e6, "triton_silu_us": triton_s * 1e6,
                     "triton_GBps": moved / triton_s / 1e9, "triton_of_copy": moved / triton_s / 1e9 / copy_gbps})
    return rows


def plot(rows, device: str, smoke: bool, out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({k[:-7] for r in rows for k in r if k.endswith("_tflops")})
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.35), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(f"{name}_tflops", 0) for r in rows], width,
               label=name)
    ax.set_xticks([j + 0.4 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['model']} {r['px']} N{r['n']} {r['mode'][0]}" for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"strip attention, {device}" + (" (smoke: interpreter, not speed)" if smoke else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_plot(fig, out, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = parser(__doc__)
    add_device(p, dtype=False)
    add_timing(p, repeat=SAMPLES, warmup=2)
    p.add_argument("--smoke", action="store_true", help="tiny shapes through the interpreter on CPU (logic only)")
    p.add_argument("--only", nargs="+", choices=("attention", "update", "groupnorm"),
                   default=["attention", "update", "groupnorm"])
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernels_<device>.json)")
    p.add_argument("--sizes", nargs="+", type=int, default=[2048], help="image sizes (px) of the attention sweep")
    p.add_argument("--write-auto", nargs="?", const=AUTO_TABLE, default=None, metavar="PATH",
                   help=f"write what `auto` should pick from this run's attention rows (default path {AUTO_TABLE})")
    a = p.parse_args(argv)
    prov = provenance(argv)
    device = torch.device(a.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("on CPU the kernels run only through Triton's interpreter: use --smoke (or TRITON_INTERPRET=1)")
    results = {"hardware": hardware(), "smoke": a.smoke, "batch": BATCH}
    if "attention" in a.only:
        from parafuse.attention import device_class
        results["gemm_peak_tflops"] = gemm_peak(device, a.smoke)
        results["attention"] = rows = bench_attention(a, device, results["gemm_peak_tflops"])
        cols = [("model", "model"), ("px", "px"), ("n", "N"), ("mode", "mode"), ("queries", "Lq"), ("keys", "Lk"),
                ("shape", "grid")]
        cols += [(k, k.replace("_us", " µs")) for k in rows[0] if k.endswith("_us") and not k.startswith("prologue")]
        cols += [("triton_over_fastest_sdpa", "triton / fastest SDPA"), ("triton_config", "triton config")]
        print(table(rows, cols))
        source = (f"benchmarks/kernel_timings.py{' --smoke' if a.smoke else ''} on {results['hardware']['device']}, "
                  f"commit {(prov['commit'] or 'unknown')[:10]}")
        results["auto"] = auto_table(rows, device_class(device), source)
        if a.write_auto:
            write_auto_table(results["auto"], a.write_auto, source)
            print(f"wrote the auto table {a.write_auto}")
    if "update" in a.only:
        results["update"] = bench_update(a, device)
        print(table(results["update"], [(k, k) for k in results["update"][0]]))
    if "groupnorm" in a.only:
        results["groupnorm"] = bench_groupnorm(a, device)
        print(table(results["groupnorm"], [(k, k) for k in results["groupnorm"][0]]))
        results["groupnorm_bits"] = groupnorm_bits(a, device)
        print("GroupNorm sums bit for bit:", results["groupnorm_bits"])
    tag = "smoke" if a.smoke else device.type
    path = a.out or os.path.join(RESULTS, f"kernels_{tag}.json")
    rows, hw = results.pop("attention", []), results.pop("hardware")
    write_result(os.path.abspath(path), "kernel_timings", config_of(a), rows, prov, hw, **results)
    if rows:
        plot(rows, hw["device"], a.smoke, os.path.abspath(path))
    print(f"wrote {path}" + (" (smoke: tiny shapes through the interpreter - no speed figures)" if a.smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
