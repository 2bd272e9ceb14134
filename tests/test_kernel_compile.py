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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton.language as tl
    from parafuse_kernels import attention as ka, groupnorm as gn, kv_codec as kc, update as ku

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

    def attention(dtype, d, cfg, qk_norm=False, rope=False):
        ptrs = {p: "*" + dtype for p in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
        ptrs.update({p: "*fp32" for p in ("lse_ptr", "norm_w_ptr", "cos_ptr", "sin_ptr")})
        ptrs.update(qk_scale_log2="fp32", norm_eps="fp32")
        const = dict(HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)), LK_ROUNDED=1024, QK_NORM=qk_norm,
                     ROPE=rope, PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_DOT=False, **cfg.kwargs)
        return build(ka._halo_attention_kernel, ptrs, const, cfg.num_warps, cfg.num_stages)

    for cfg in ka.HOPPER_CONFIGS:                       # every autotune candidate, at the largest head dim
        attention("bf16", 128, cfg)
    small = ka.HOPPER_CONFIGS[-1]
    for d in (64, 72, 80, 96):
        attention("bf16", d, small)
    attention("fp16", 128, small, qk_norm=True, rope=True)
    attention("bf16", 72, small, qk_norm=True, rope=True)
    attention("fp32", 64, small)

    for n_in, n_out, dt in ((3, 2, "bf16"), (7, 3, "fp32")):
        types = {"sources": tuple(["*" + dt] + ["*fp32"] * (n_in - 1)),
                 "outputs": tuple(["*" + dt] + ["*fp32"] * (n_out - 1)),
                 "coeffs": tuple(["fp32"] * (n_in * n_out)), "numel": "i32"}
        build(ku._linear_update_kernel, types, dict(N_IN=n_in, N_OUT=n_out, BLOCK=2048), warps=8)

    build(gn._group_sums_kernel, {"x_ptr": "*bf16", "out_ptr": "*fp32"}, dict(BLOCK=gn.SUMS_BLOCK), warps=8)
    build(gn._group_norm_apply_kernel,
          {"x_ptr": "*bf16", "y_ptr": "*bf16", "sums_ptr": "*fp32", "fallback_ptr": "*fp32", "w_ptr": "*bf16",
           "b_ptr": "*bf16", "inv_count": "fp32", "inv_fallback_count": "fp32", "eps": "fp32"},
          dict(HAS_FALLBACK=True, HAS_AFFINE=True, SILU=True, BLOCK=gn.APPLY_BLOCK))
    for dt, tl_dt, c in (("bf16", tl.bfloat16, 1152), ("fp16", tl.float16, 128), ("fp32", tl.float32, 3072)):
        kv = {"mirror": "*" + dt, "drift": "*" + dt, "signs": "*u8", "scales": "*" + dt}
        const = dict(C=c, BYTES=triton.next_power_of_2(c // 8), DTYPE=tl_dt)
        build(kc._encode_kernel, {"fresh": "*" + dt, **kv}, const)
        build(kc._decode_kernel, kv, const)
    print("compiled")
''')


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "kernels")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
