"""parafuse's Triton kernels against the alternatives, at the strip shapes of real models.

    PYTHONPATH=.:kernels python benchmarks/kernels.py                 # on a GPU
    PYTHONPATH=.:kernels python benchmarks/kernels.py --smoke         # logic check on CPU (interpreter)

attention  one strip's self-attention (queries of strip 1 of N; keys: the whole image for `full`,
           the strip plus two windows of ceil(p·rows/N) rows for `partial`, p = 0.3), read as head
           views of the K/V buffer [tokens, B, 2·dim] as the patch layers keep it, for SDXL-size
           (20 heads × 64, tokens = (px/16)² at the highest attention level), PixArt-size (16 × 72)
           and Flux-size (24 × 128) models at 2048 and 4096 px, N = 1, 2, 4, 8. Backends: the Triton
           halo attention, SDPA forced to its cuDNN, flash and efficient kernels, xformers where
           installed. Flux-size rows add the q prologue (RMS norm + RoPE): fused in the kernel vs
           separate ops + cuDNN SDPA. TFLOP/s (4·B·H·Lq·Lk·d) and the fraction of the card's
           measured bf16 GEMM peak.
update     the fused solver update (dpmpp-2m, steady state, CFG fused) against the eager step, fp32
           and bf16, on a tensor far larger than L2 and at a real strip latent (SDXL 4K, N = 8);
           GB/s (bytes each path must move at least) and the fraction of a measured device copy.
groupnorm  a patched GroupNorm (SDXL 640 channels): the Triton pair (+ fused SiLU) vs the PyTorch
           path of PatchGroupNorm + SiLU; the pair's GB/s (3 passes over x at least) against a copy.
Writes benchmarks/results/kernels_<device>.json and .png and prints the tables. `--smoke` runs
tiny shapes through Triton's interpreter on CPU: it checks this script, its timings say nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"          # read when the kernel modules are imported

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, hardware, provenance, table, write_json  # noqa: E402
from scaling import time_step  # noqa: E402

MODELS = {"sdxl": (20, 64), "pixart": (16, 72), "flux": (24, 128)}      # heads, head dim
PORTION = 0.3


def strip_shape(px: int, n: int, mode: str, patch_px: int = 16) -> tuple[int, int]:
    """(queries, keys) of strip 1 of n (a middle strip: two neighbours) at `px`² pixels."""
    rows = cols = px // patch_px
    mine = rows // n + (1 if rows % n > 1 else 0)
    if n == 1 or mode == "full":
        return mine * cols, rows * cols
    window = math.ceil(PORTION * mine)
    return mine * cols, (mine + 2 * window) * cols


def attention_inputs(lq, lk, heads, d, dtype, device, batch=1):
    dim = heads * d
    q = torch.randn(batch, lq, dim, device=device, dtype=dtype).view(batch, lq, heads, d).transpose(1, 2)
    buf = torch.randn(lk, batch, 2 * dim, device=device, dtype=dtype)

    def heads_of(t):
        return t.permute(1, 0, 2).unflatten(-1, (heads, d)).transpose(1, 2)
    return q, heads_of(buf[..., :dim]), heads_of(buf[..., dim:])


def attention_backends(device):
    from parafuse_kernels.attention import halo_attention
    fns = {"triton": lambda q, k, v: halo_attention(q, k, v)[0]}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name, kind in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                           ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(q, k, v, kind=kind):
                with sdpa_kernel(kind):
                    return F.scaled_dot_product_attention(q, k, v)
            fns[name] = run
        try:
            import xformers.ops as xops
            fns["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        except ImportError:
            pass
    else:
        fns["sdpa"] = F.scaled_dot_product_attention
    return fns


def gemm_peak(device, smoke) -> float:
    """Measured bf16 GEMM TFLOP/s (the card's practical tensor-core peak)."""
    n = 256 if smoke else 8192
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    return 2 * n ** 3 / time_step(lambda: a @ b, device, repeat=1 if smoke else 20) / 1e12


def bench_attention(a, device, peak) -> list[dict]:
    from parafuse.attention import q_prologue
    from parafuse_kernels.attention import halo_attention
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes, ns = ((2048, 4096), (1, 2, 4, 8)) if not a.smoke else ((128,), (1, 4))
    models = MODELS if not a.smoke else {"sdxl": (2, 64), "pixart": (1, 72), "flux": (2, 128)}
    backends = attention_backends(device)
    rows = []
    for model, (heads, d) in models.items():
        for px in sizes:
            for n in ns:
                for mode in (("full",) if n == 1 else ("full", "partial")):
                    lq, lk = strip_shape(px, n, mode, 16 if not a.smoke else 32)
                    q, k, v = attention_inputs(lq, lk, heads, d, dtype, device)
                    flops = 4 * heads * lq * lk * d
                    row = {"model": model, "px": px, "n": n, "mode": mode, "queries": lq, "keys": lk}
                    for name, fn in backends.items():
                        try:
                            s = time_step(lambda: fn(q, k, v), device, warmup=1 if a.smoke else 3,
                                          repeat=1 if a.smoke else 20)
                            row[f"{name}_tflops"] = flops / s / 1e12
                        except RuntimeError as e:          # a backend that does not take this shape
                            row[f"{name}_error"] = str(e).split("\n")[0][:120]
                    if model == "flux":                    # the q prologue: fused vs separate ops
                        w = torch.rand(d, device=device, dtype=dtype) + 0.5
                        ang = torch.rand(lq, d // 2, device=device)
                        cos, sin = ang.cos(), ang.sin()

                        def separate():
                            qq = q_prologue(q, (w, 1e-6), (cos, sin))
                            return F.scaled_dot_product_attention(qq, k, v)
                        s_sep = time_step(separate, device, warmup=1, repeat=1 if a.smoke else 20)
                        s_fused = time_step(lambda: halo_attention(q, k, v, q_norm=(w, 1e-6), rope=(cos, sin)),
                                            device, warmup=1, repeat=1 if a.smoke else 20)
                        row["prologue_separate_us"], row["prologue_fused_us"] = s_sep * 1e6, s_fused * 1e6
                        row["prologue_speedup"] = s_sep / s_fused
                    for key in [k_ for k_ in row if k_.endswith("_tflops")]:
                        row[key.replace("_tflops", "_of_peak")] = row[key] / peak
                    rows.append(row)
    return rows


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
            reps = 1 if a.smoke else 50
            copy_s = time_step(lambda: dst.copy_(cond), device, repeat=reps)
            eager_s = time_step(lambda: fused_step_reference(solver, k, x, cond, state, uncond=uncond, guidance=4.0),
                                device, repeat=reps)
            fused_s = time_step(lambda: fused_step(solver, k, x, cond, state, uncond=uncond, guidance=4.0),
                                device, repeat=reps)
            copy_gbps = 2 * numel * 4 / copy_s / 1e9
            rows.append({"shape": label, "dtype": str(dt).replace("torch.", ""), "elements": numel,
                         "copy_GBps": copy_gbps, "eager_us": eager_s * 1e6, "fused_us": fused_s * 1e6,
                         "eager_GBps": moved / eager_s / 1e9, "fused_GBps": moved / fused_s / 1e9,
                         "fused_of_copy": moved / fused_s / 1e9 / copy_gbps})
    return rows


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
        reps = 1 if a.smoke else 50
        dst = torch.empty_like(x)
        copy_gbps = 2 * x.nbytes / time_step(lambda: dst.copy_(x), device, repeat=reps) / 1e9
        torch_s, triton_s = time_step(torch_path, device, repeat=reps), time_step(triton_path, device, repeat=reps)
        moved = 3 * x.nbytes                      # at least: x read for the sums, read and written by the apply
        rows.append({"shape": f"{b}x{c}x{h}x{4 * h}", "torch_silu_us": torch_s * 1e6, "triton_silu_us": triton_s * 1e6,
                     "triton_GBps": moved / triton_s / 1e9, "triton_of_copy": moved / triton_s / 1e9 / copy_gbps})
    return rows


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["attention"]
    names = sorted({k[:-7] for r in rows for k in r if k.endswith("_tflops")})
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.35), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(f"{name}_tflops", 0) for r in rows], width,
               label=name)
    ax.set_xticks([j + 0.4 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['model']} {r['px']} N{r['n']} {r['mode'][0]}" for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"strip attention, {results['hardware']['device']}" + (" (smoke: interpreter, not speed)"
                                                                      if results["smoke"] else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes through the interpreter on CPU (logic only)")
    p.add_argument("--only", nargs="+", choices=("attention", "update", "groupnorm"),
                   default=["attention", "update", "groupnorm"])
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernels_<device>.json)")
    a = p.parse_args(argv)
    prov = provenance(argv)
    device = torch.device(a.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("on CPU the kernels run only through Triton's interpreter: use --smoke (or TRITON_INTERPRET=1)")
    results = {"hardware": hardware(), "smoke": a.smoke}
    if "attention" in a.only:
        results["gemm_peak_tflops"] = gemm_peak(device, a.smoke)
        results["attention"] = bench_attention(a, device, results["gemm_peak_tflops"])
        cols = [("model", "model"), ("px", "px"), ("n", "N"), ("mode", "mode"), ("queries", "Lq"), ("keys", "Lk")]
        cols += [(k, k.replace("_tflops", " TFLOP/s")) for k in results["attention"][0] if k.endswith("_tflops")]
        print(table(results["attention"], cols))
    if "update" in a.only:
        results["update"] = bench_update(a, device)
        print(table(results["update"], [(k, k) for k in results["update"][0]]))
    if "groupnorm" in a.only:
        results["groupnorm"] = bench_groupnorm(a, device)
        print(table(results["groupnorm"], [(k, k) for k in results["groupnorm"][0]]))
    tag = "smoke" if a.smoke else device.type
    path = a.out or os.path.join(RESULTS, f"kernels_{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(os.path.abspath(path), results, prov)          # an absolute path is kept as it is
    if "attention" in results:
        plot(results, os.path.splitext(path)[0] + ".png")
    print(f"wrote {path}" + (" (smoke: tiny shapes through the interpreter - no speed figures)" if a.smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
