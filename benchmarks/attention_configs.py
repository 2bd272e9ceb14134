"""The halo attention's autotune candidates, pruned on a CPU: every configuration of the grid
(BLOCK_M 64/128 x BLOCK_N 32/64/128 x stages 2-4 x warps 4/8) compiled for Hopper (sm_90a) with
Triton's compiler and the ptxas its wheel ships - no GPU - at the runtime's own K/V buffer views,
specialised by Triton itself from the launch's real argument values (as a launch would compile
it). Read off the artifacts: registers and spill bytes (ptxas -v on the PTX), shared memory
(Triton's metadata), and the width of every global load (the PTX's cp.async / ld.global /
cp.async.bulk.tensor). Kept per head dim: no spills, shared memory <= 227 KiB, no global load
narrower than 16 bytes (a [BLOCK_N, 16] tail tile spread over 8 warps gets 8-byte loads), at most
8, one of each tile shape first (the short grids of small strips want BLOCK_M 64; long ones 128).

    PYTHONPATH=.:kernels python benchmarks/attention_configs.py       # prints the table and CONFIGS
    PYTHONPATH=.:kernels python benchmarks/attention_configs.py --precompile DIR
        # compiles every kept configuration at every shape of benchmarks/kernel_timings.py's attention sweep
        # (H100/H200: 132 SMs for the split-KV rule) into the Triton cache DIR: carried to the GPU
        # machine as TRITON_CACHE_DIR (same Triton, sm_90), the sweep spends no time compiling

Writes benchmarks/results/attention_configs_sm90.json. The compile test
(tests/kernels/test_kernel_compile.py) checks the kept configurations with the functions here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)        # compiled kernels, not interpreted ones
if "--precompile" in sys.argv:                  # read by Triton when it first looks at its cache
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(sys.argv[sys.argv.index("--precompile") + 1])

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import config_of, parser, provenance, table, write_result  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)              # compiles for sm_90a
SHARED_LIMIT = 227 * 1024                       # shared memory per block on H100 / H200
GRID = [(bm, bn, w, s) for bm in (128, 64) for bn in (64, 128, 32) for w in (4, 8) for s in (3, 2, 4)]
MAX_KEPT = 8
# (model, heads, head dim) whose K/V buffer layouts the compile specialises for (the first of each
# head dim prunes); 80 and 96 have no model in the project: layouts of 16 heads at those dims
LAYOUTS = [("sdxl", 20, 64), ("sdxl", 10, 64), ("pixart", 16, 72), ("d80", 16, 80), ("d96", 16, 96),
           ("flux", 24, 128)]
HEAD_DIMS = sorted({d for _, _, d in LAYOUTS})
CASE = dict(px=2048, n=8, mode="partial", batch=2)     # a strip of the runtime at 2048², N = 8, CFG batch 2
TAIL_KEYS = 40          # keys added for the variant with a partial key block (square images at
                        # 16-px patches give whole 128-key blocks; other sizes do not)


def ptxas_path() -> str:
    """The ptxas of the pinned Triton wheel; an error (not a skip) when it is missing."""
    from triton import knobs
    path = knobs.nvidia.ptxas.path
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"the Triton wheel's ptxas is missing ({path}); reinstall the pinned triton")
    return path


def launch_views(heads: int, d: int, dtype: torch.dtype, extra_keys: int = 0, **case):
    """q and the K/V buffer's head views for the middle strip of `n` at px², allocated (not filled)
    on the CPU as the runtime lays them out: q [B, Lq, H·D] viewed as heads, K/V [tokens, B, 2·H·D]."""
    from kernel_timings import attention_inputs, strip_shape
    case = {**CASE, **case}
    lq, lk = strip_shape(case["px"], case["n"], case["mode"], case.get("patch_px", 16))
    return attention_inputs(lq, lk + extra_keys, heads, d, dtype, "cpu", batch=case["batch"], make=torch.empty)


def compile_launch(q, k, v, config, splits: int = 1, prologue: bool = False, tma: bool = False):
    """triton.compile of the halo attention for sm_90a exactly as a launch at these tensors would
    specialise it (Triton's own binder on the real arguments: pointer alignment, integer divisibility);
    `prologue`: with the QK-norm + RoPE prologue; `tma`: K/V by TMA descriptors."""
    from parafuse_kernels import attention as ka
    b, heads, lq, d = q.shape
    out = torch.empty((splits, b, lq, heads, d), dtype=q.dtype if splits == 1 else torch.float32).transpose(2, 3)
    lse = torch.empty((splits, b, heads, lq), dtype=torch.float32)
    q_norm = (torch.empty(d, dtype=q.dtype), 1e-6) if prologue else None
    rope = (torch.empty(lq, d // 2), torch.empty(lq, d // 2)) if prologue else None
    args, meta = ka.launch_args(q, k, v, out, lse, d ** -0.5, q_norm, rope, splits=splits, tma=tma)
    bm, bn, warps, stages = config
    kwargs = dict(meta, BLOCK_M=bm, BLOCK_N=bn)
    ka._descriptor_blocks({**dict(zip(ka._halo_attention_kernel.arg_names, args)), **kwargs})   # the pre-hook
    kwargs["EVEN_N"] = ka._even_n({**dict(zip(ka._halo_attention_kernel.arg_names, args)), **kwargs})
    kwargs.update(num_warps=warps, num_stages=stages)
    fn = ka._halo_attention_kernel
    backend = make_backend(HOPPER)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=HOPPER, options=options.__dict__), meta


def ptxas_usage(ptx: str) -> dict:
    """Registers, spill store / load bytes and stack frame of the PTX, from the wheel's ptxas -v
    (the flags Triton compiles with)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas_path(), "-lineinfo", "-v", "--gpu-name=sm_90a", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    num = lambda pattern: int(re.search(pattern, log).group(1))        # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def sass(kernel) -> str:
    """The SASS of a compiled kernel's cubin (the wheel's cuobjdump): the instructions the GPU runs."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True,
                              check=True).stdout


_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16, "b32": 32, "u32": 32,
         "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


def global_loads(ptx: str) -> dict[str, int]:
    """Bytes per global load instruction -> how many: ld.global[.vN].type (N·bits/8), cp.async
    (its cp-size operand), cp.async.bulk.tensor (a TMA tile: counted as 'tma')."""
    widths: dict[str, int] = {}
    for m in re.finditer(r"\bld\.global((?:\.\w+)*)\s", ptx):
        parts = m.group(1).split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next(_BITS[p] for p in reversed(parts) if p in _BITS)
        key = f"ld.global {vec * bits // 8}B"
        widths[key] = widths.get(key, 0) + 1
    for m in re.finditer(r"\bcp\.async\.c[ag]\.shared\.global[^\n;]*?\],\s*(0x[0-9a-f]+|\d+)", ptx):
        key = f"cp.async {int(m.group(1), 0)}B"
        widths[key] = widths.get(key, 0) + 1
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    if tma:
        widths["tma"] = tma
    return widths


def narrow_loads(widths: dict[str, int]) -> dict[str, int]:
    """The global loads narrower than 16 bytes (none may read K or V: the plain kernel's only global
    loads are the q, K and V tiles)."""
    return {k: n for k, n in widths.items() if k != "tma" and int(k.split()[-1][:-1]) < 16}


def inspect(heads: int, d: int, dtype: torch.dtype, config, extra_keys: int = 0, splits: int = 1,
            prologue: bool = False, tma: bool = False, **case) -> dict:
    """Compile one configuration at a layout of `heads` x `d` and read its artifacts."""
    q, k, v = launch_views(heads, d, dtype, extra_keys, **case)
    kernel, meta = compile_launch(q, k, v, config, splits=splits, prologue=prologue, tma=tma)
    loads = global_loads(kernel.asm["ptx"])
    return {"heads": heads, "head_dim": d, "dtype": str(dtype).replace("torch.", ""), "keys": k.shape[2],
            "splits": splits, "prologue": prologue, "tma": tma, "config": list(config), "stride_unit": meta["STRIDE_UNIT"],
            "shared": kernel.metadata.shared, **ptxas_usage(kernel.asm["ptx"]), "loads": loads,
            "narrow_loads": narrow_loads(loads)}


def kv_loads_unchanged(variant: dict, plain: dict) -> bool:
    """The prologue variant loads K and V as the plain one does: the same count of 16-byte cp.async
    (its own extra loads - the RoPE partner gather, the cos/sin tables - are q-side, once per program)."""
    return variant["loads"].get("cp.async 16B", 0) == plain["loads"].get("cp.async 16B", 0) > 0


def keep(rows: list[dict]) -> list[tuple]:
    """At most MAX_KEPT of the configurations that neither spill (the QK-norm + RoPE prologue variant
    neither) nor exceed shared memory and load only 16 bytes at a time: the first good one of each
    tile shape (GRID's order of preference), then the next ones, round by round."""
    good = [tuple(r["config"]) for r in rows if r["spill_stores"] == 0 and r["spill_loads"] == 0
            and r["shared"] <= SHARED_LIMIT and not r["narrow_loads"] and r.get("prologue_spills") == 0]
    by_tile: dict[tuple, list] = {}
    for c in good:
        by_tile.setdefault(c[:2], []).append(c)
    kept = []
    while len(kept) < MAX_KEPT and any(by_tile.values()):
        for tile in list(by_tile):
            if by_tile[tile] and len(kept) < MAX_KEPT:
                kept.append(by_tile[tile].pop(0))
    return kept


def precompile(sizes=(2048,), sms: int = 132) -> int:
    """Compile what benchmarks/kernel_timings.py's sweep will launch (bf16): each model, size, N and mode,
    every kept configuration, the split-KV count the rule gives at `sms`, and the Flux rows' prologue
    variant. Returns how many compiles ran (Triton's cache makes repeated specialisations free)."""
    from kernel_timings import BATCH, MODELS, strip_shape
    from parafuse_kernels import attention as ka
    done = 0
    for model, (heads, d, patch_px) in MODELS.items():
        for px in sizes:
            for n in (1, 2, 4, 8):
                for mode in (("full",) if n == 1 else ("full", "partial")):
                    lq, lk = strip_shape(px, n, mode, patch_px)
                    q, k, v = launch_views(heads, d, torch.bfloat16, px=px, n=n, mode=mode, batch=BATCH,
                                           patch_px=patch_px)
                    splits = ka.kv_splits(-(-lq // 128) * BATCH * heads, lk, sms)
                    for config in ka.configs_for(d):
                        for prologue in ((False, True) if model == "flux" else (False,)):
                            compile_launch(q, k, v, config, splits=splits, prologue=prologue)
                            done += 1
    return done


def main(argv=None) -> int:
    p = parser(__doc__, "attention_configs_sm90")
    p.add_argument("--precompile", metavar="DIR", default=None,
                   help="compile every kept configuration at every shape of kernel_timings.py's attention sweep "
                        "into the Triton cache DIR (read from sys.argv before Triton is imported)")
    a = p.parse_args(argv)
    if a.precompile:
        print(f"compiled {precompile()} launches into {os.environ['TRITON_CACHE_DIR']}")
        return 0
    prov = provenance(argv)
    results = {"target": "sm_90a", "triton": triton.__version__, "case": CASE, "layouts": LAYOUTS, "rows": [],
               "kept": {}}
    for d in HEAD_DIMS:
        heads = next(h for _, h, dim in LAYOUTS if dim == d)
        rows = []
        for config in GRID:
            try:
                rows.append(inspect(heads, d, torch.bfloat16, config))
                if rows[-1]["spill_stores"] == 0 and not rows[-1]["narrow_loads"]:
                    variant = inspect(heads, d, torch.bfloat16, config, prologue=True)
                    rows[-1]["prologue_spills"] = variant["spill_stores"] + variant["spill_loads"]
            except Exception as e:                       # e.g. out of resources at compile time
                rows.append({"head_dim": d, "config": list(config), "error": str(e).split("\n")[0][:160],
                             "spill_stores": -1, "spill_loads": -1, "shared": 1 << 30, "narrow_loads": {}})
            print(rows[-1], flush=True)
        results["kept"][d] = keep(rows)
        for r in rows:
            r["kept"] = tuple(r["config"]) in results["kept"][d]
        results["rows"] += rows
    cols = [("head_dim", "D"), ("config", "BM, BN, warps, stages"), ("registers", "regs"), ("spill_stores", "spill st"),
            ("spill_loads", "spill ld"), ("shared", "shared B"), ("loads", "global loads"),
            ("prologue_spills", "prologue spills"), ("kept", "kept"),
            ("error", "error")]
    print(table(results["rows"], cols))
    print("CONFIGS = {")
    for d, kept in results["kept"].items():
        print(f"    {d}: {kept},")
    print("}")
    rows = results.pop("rows")
    print("wrote", write_result(a.name, "attention_configs", config_of(a), rows, prov, **results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
