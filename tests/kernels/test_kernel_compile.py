"""Every Triton kernel compiles for Hopper (sm_90) to a cubin, on this CPU machine: Triton's own
compiler and the ptxas it ships, no GPU needed. This checks what the interpreter cannot - that the
source is valid for the GPU compiler (types, layouts, tl.dot shapes and precisions, tuple arguments,
each autotune configuration's shared memory fitting the card) - not that it runs or how fast.
It runs in a subprocess: under TRITON_INTERPRET=1 (conftest.py) `@triton.jit` makes interpreted
functions that cannot be compiled."""
import os
import subprocess
import sys
import textwrap

from support import ROOT  # noqa: E402

SCRIPT = textwrap.dedent(r'''
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import sys
    import torch
    import triton.language as tl
    from parafuse_kernels import attention as ka, groupnorm as gn, kv_codec as kc, update as ku
    ROOT = %r

    HOPPER = GPUTarget("cuda", 90, 32)

    def build(fn, types, const, warps=4, stages=3):
        sig = {name: types.get(name, "i32") for name in fn.arg_names}
        sig.update({k: "constexpr" for k in const})
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        kernel = triton.compile(src, target=HOPPER, options={"num_warps": warps, "num_stages": stages})
        assert kernel.asm["cubin"], fn
        # the card's shared memory per block (227 KiB on H100/H200)
        assert kernel.metadata.shared <= 227 * 1024, (const, kernel.metadata.shared)
        return kernel
    import attention_configs as ac
    # the halo attention as launches at the runtime's buffer views would specialise it; every kept
    # configuration is checked in test_halo_attention_kept_configs_*: here the variants around them
    small = ka.configs_for(64)[0]
    for heads, d, dtype in ((2, 128, torch.float16), (2, 72, torch.bfloat16)):
        ac.compile_launch(*ac.launch_views(heads, d, dtype, px=512), small, prologue=True)
    ac.compile_launch(*ac.launch_views(2, 72, torch.bfloat16, px=512), small, splits=3)
    ac.compile_launch(*ac.launch_views(2, 64, torch.float32, px=512), (64, 32, 4, 2))
    ac.compile_launch(*ac.launch_views(2, 40, torch.bfloat16, px=512), small)          # 32 + 16, padded

    for n_in, n_out, dt in ((3, 2, "bf16"), (7, 3, "fp32")):
        types = {"sources": tuple(["*" + dt] + ["*fp32"] * (n_in - 1)),
                 "outputs": tuple(["*" + dt] + ["*fp32"] * (n_out - 1)),
                 "coeffs": tuple(["fp32"] * (n_in * n_out)), "numel": "i32"}
        build(ku._linear_update_kernel, types, dict(N_IN=n_in, N_OUT=n_out, BLOCK=2048), warps=8)

    # the GroupNorm kernels: deterministic, so no atomic (atom / red) instruction in any of them
    import re
    norms = [build(gn._group_sums_kernel, {"x_ptr": "*bf16", "parts_ptr": "*fp32"}, dict(BLOCK=gn.SUMS_BLOCK), warps=8),
             build(gn._sum_parts_kernel, {"parts_ptr": "*fp32", "out_ptr": "*fp32"}, dict(BLOCK=gn.PARTS_BLOCK)),
             build(gn._group_norm_apply_kernel,
                   {"x_ptr": "*bf16", "y_ptr": "*bf16", "sums_ptr": "*fp32", "fallback_ptr": "*fp32", "w_ptr": "*bf16",
                    "b_ptr": "*bf16", "inv_count": "fp32", "inv_fallback_count": "fp32", "eps": "fp32"},
                   dict(HAS_FALLBACK=True, HAS_AFFINE=True, SILU=True, BLOCK=gn.APPLY_BLOCK))]
    for kernel in norms:
        ptx = kernel.asm["ptx"]
        assert "ld.global" in ptx and not re.search(r"\b(atom|red)\.", ptx), kernel.name
        sass = ac.sass(kernel)
        assert "LDG" in sass and not re.search(r"\b(ATOM|ATOMG|RED|REDG)\b", sass), kernel.name
    for dt, tl_dt, c in (("bf16", tl.bfloat16, 1152), ("fp16", tl.float16, 128), ("fp32", tl.float32, 3072)):
        kv = {"mirror": "*" + dt, "drift": "*" + dt, "signs": "*u8", "scales": "*" + dt}
        const = dict(C=c, BYTES=triton.next_power_of_2(c // 8), DTYPE=tl_dt)
        build(kc._encode_kernel, {"fresh": "*" + dt, **kv}, const)
        build(kc._decode_kernel, kv, const)
    print("compiled")
''') % ROOT


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"), os.path.join(ROOT, "benchmarks")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


KEPT = textwrap.dedent('''
    import os, sys, json
    import torch
    import attention_configs as ac
    from parafuse_kernels import attention as ka

    ac.ptxas_path()                             # the wheel's ptxas: a missing one is an error, not a skip
    rows, prologue, tma = [], [], []
    for model, heads, d in ac.LAYOUTS:
        first = (model, heads, d) == next(layout for layout in ac.LAYOUTS if layout[2] == d)
        for config in ka.configs_for(d):
            for dtype in (torch.bfloat16, torch.float16):
                rows.append(ac.inspect(heads, d, dtype, config))
            rows.append(ac.inspect(heads, d, torch.bfloat16, config, extra_keys=ac.TAIL_KEYS))  # a masked block
            if first:                           # split-KV (float32 partials), TMA, and the q prologue
                tma.append(ac.inspect(heads, d, torch.bfloat16, config, tma=True))
                rows.append(ac.inspect(heads, d, torch.bfloat16, config, splits=4))
                variant = ac.inspect(heads, d, torch.bfloat16, config, prologue=True)
                prologue.append(dict(variant, kv_unchanged=ac.kv_loads_unchanged(variant, rows[-4])))
    # the check bites: strides off 16 bytes (the generic variant) compile to narrower loads at d = 72
    q, k, v = ac.launch_views(16, 72, torch.bfloat16)
    buf = torch.empty(k.shape[2], 2, 2 * 16 * 72 + 1, dtype=torch.bfloat16)
    kv = buf.permute(1, 0, 2)[..., : 2 * 16 * 72].unflatten(-1, (2, 16, 72))
    generic, meta = ac.compile_launch(q, kv[..., 0, :, :].transpose(1, 2), kv[..., 1, :, :].transpose(1, 2),
                                      ka.configs_for(72)[0])
    print(json.dumps({"rows": rows, "prologue": prologue, "tma": tma, "generic_unit": meta["STRIDE_UNIT"],
                      "generic_loads": ac.global_loads(generic.asm["ptx"])}))
''')


def test_halo_attention_kept_configs_do_not_spill_and_load_16_bytes():
    """Every autotune configuration kept for a head dim (64, 72, 80, 96, 128), in bf16 and fp16, with
    a partial key block and split 4 ways, compiled for sm_90a as a launch at the runtime's K/V
    buffer views (2048², N = 8, partial, CFG batch 2) would be - Triton's own specialisation of the
    real arguments: ptxas reports no spills, shared memory fits, and every global load (q, K and V
    tiles: the plain kernel has no other) is 16 bytes wide (cp.async / ld.global.v4 / TMA). With the
    QK-norm + RoPE prologue: no spills and the same 16-byte K/V loads (its own q-side gathers are
    narrower). With TMA descriptors: no spills, K/V by cp.async.bulk.tensor. The generic variant
    (strides off 16 bytes) shows the check can fail."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"), os.path.join(ROOT, "benchmarks")])
    proc = subprocess.run([sys.executable, "-c", KEPT], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = res["rows"]
    assert len(rows) >= 6 * 2 * 4 and {r["head_dim"] for r in rows} == {64, 72, 80, 96, 128}
    for r in rows:
        where = (r["heads"], r["head_dim"], r["dtype"], r["keys"], r["config"])
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (where, r)
        assert r["shared"] <= 227 * 1024, (where, r)
        assert r["stride_unit"] == 8 and not r["narrow_loads"], (where, r["loads"])
        assert r["loads"].get("cp.async 16B", 0) + r["loads"].get("tma", 0) + r["loads"].get("ld.global 16B", 0) > 0
    assert len(res["tma"]) >= 5 * 4                # K/V by TMA (cp.async.bulk.tensor), q by 16-byte loads
    for r in res["tma"]:
        assert r["spill_stores"] == 0 and r["shared"] <= 227 * 1024 and r["loads"].get("tma", 0) > 0, r
        assert not r["narrow_loads"] and "cp.async 16B" not in r["loads"], r
    assert len(prologue := res["prologue"]) >= 5 * 4
    for r in prologue:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["kv_unchanged"], r
    assert res["generic_unit"] == 1 and any(int(key.split()[-1][:-1]) < 16 for key in res["generic_loads"]), res
