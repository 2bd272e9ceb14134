"""Halo attention (parafuse_kernels.attention) against its PyTorch reference and SDPA, through the
Triton interpreter on CPU (conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported).

Keys and values are head views of a K/V buffer [tokens, B, 2*dim] laid out [above | local | below]
as the patch runtime keeps it - strided, never copied - with windows of uneven sizes, empty ones
included, and lengths that are not multiples of the blocks. Random inputs (never zeros).
Tolerances: fp32 (IEEE dots) 2e-5 on the output and the log-sum-exp; bf16/fp16 2e-2 absolute on
outputs of magnitude ~1 and on the log-sum-exp (the kernel rounds p to the storage dtype before the
P·V dot, as flash attention does; the reference keeps it in float32). The key counts cover both
loop shapes: a multiple of the interpreter's BLOCK_N (16: whole blocks only, EVEN_N) and not (the
peeled, masked tail block)."""
import pytest

from support import ROOT  # noqa: E402
import torch
import torch.nn.functional as F

from parafuse_kernels import attention as ka


def buffer_views(b, heads, d, above, local, below, dtype, seed=0, pad=0):
    """q [B, H, local, d] and k, v as views of a [above+local+below, B, 2*H*d + pad] buffer (`pad`
    odd: strides that are no multiple of 16 bytes, the generic variant's case)."""
    g = torch.Generator().manual_seed(seed)
    dim = heads * d
    buf = torch.randn(above + local + below, b, 2 * dim + pad, generator=g).to(dtype)
    q = torch.randn(b, local, dim + pad, generator=g).to(dtype)[..., :dim].unflatten(-1, (heads, d)).transpose(1, 2)

    def heads_of(t):
        return t.permute(1, 0, 2).unflatten(-1, (heads, d)).transpose(1, 2)
    return q, heads_of(buf[..., :dim]), heads_of(buf[..., dim:2 * dim]), buf


def run(q, k, v, **kw):
    before = ka.LAUNCHES["halo_attention"]
    out, lse = ka.halo_attention(q, k, v, **kw)
    assert ka.LAUNCHES["halo_attention"] == before + 1          # the Triton kernel ran, not a reference
    return out, lse


TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=0, atol=2e-2),
       torch.float16: dict(rtol=0, atol=2e-2)}


@pytest.mark.parametrize("above, local, below", [(0, 20, 13), (7, 23, 0), (5, 17, 9)])
def test_strided_buffer_windows_match_reference_and_sdpa(above, local, below):
    q, k, v, buf = buffer_views(2, 2, 16, above, local, below, torch.float32)
    assert not k.is_contiguous() and k.data_ptr() == buf.data_ptr()
    out, lse = run(q, k, v)
    ref, ref_lse = ka.halo_attention_reference(q, k, v)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **TOL[torch.float32])
    # a token range of the buffer (the local rows and the window below) is a slice of the same views
    out2, _ = run(q, k[:, :, above:], v[:, :, above:])
    torch.testing.assert_close(out2, ka.halo_attention_reference(q, k[:, :, above:], v[:, :, above:])[0],
                               **TOL[torch.float32])


@pytest.mark.parametrize("d", [64, 72, 80, 96, 128])
def test_every_head_dim(d):
    q, k, v, _ = buffer_views(1, 1, d, 3, 9, 4, torch.float32, seed=d)
    out, lse = run(q, k, v)
    ref, ref_lse = ka.halo_attention_reference(q, k, v)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


@pytest.mark.parametrize("d, parts", [(64, (64, 0)), (72, (64, 16)), (80, (64, 16)), (96, (64, 32)),
                                      (128, (128, 0)), (40, (32, 16)), (8, (16, 0))])
def test_head_dim_parts_split_without_padding_to_a_power_of_two(d, parts):
    assert ka.head_dim_parts(d) == parts
    main, tail = parts
    assert main + tail >= d and (tail == 0 or main < d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [72, 80, 96, 64, 128])
@pytest.mark.parametrize("below", [8, 3])           # 32 keys (whole blocks) or 27 (a masked tail block)
def test_split_dot_head_dims_in_half_precision(dtype, d, below):
    """Random bf16/fp16 inputs at the real head dims: 72/80/96 run as two dots (64 + 16/16/32), 64
    and 128 as one; strides are multiples of 16 bytes, so the aligned variant runs."""
    q, k, v, _ = buffer_views(2, 2, d, 5, 19, below, dtype, seed=d + below)
    assert ka.stride_unit(q, k, v) == 8
    out, lse = run(q, k, v)
    ref, ref_lse = ka.halo_attention_reference(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strides_off_16_bytes_run_the_generic_variant(dtype):
    """A layout whose strides are no multiple of 16 bytes falls back to STRIDE_UNIT = 1 (same
    source, narrower loads), with the same results."""
    q, k, v, _ = buffer_views(1, 2, 72, 3, 11, 4, dtype, seed=11, pad=1)
    assert ka.stride_unit(q, k, v) == 1
    out, lse = run(q, k, v)
    ref, ref_lse = ka.halo_attention_reference(q, k, v)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits, ranges", [(2, 2), (3, 3), (5, 3)])
def test_split_kv_merges_to_the_reference(dtype, splits, ranges):
    """Split-KV: each program attends to one range of whole 16-key blocks (the interpreter's unit;
    128 on the GPU), the partials merge by their log-sum-exps; 5 splits of 40 keys leave 3 ranges
    (none empty). Includes a prologue, a masked tail in the last range and 72 = 64 + 16."""
    q, k, v, _ = buffer_views(1, 2, 72, 9, 20, 11, dtype, seed=splits)
    assert ka.split_keys(k.shape[2], splits)[0] == ranges
    g = torch.Generator().manual_seed(12)
    angles = torch.rand(20, 36, generator=g) * 6.0
    kw = dict(q_norm=(torch.rand(72, generator=g) + 0.5, 1e-6), rope=(angles.cos(), angles.sin()))
    out, lse = run(q, k, v, splits=splits, **kw)
    ref, ref_lse = ka.halo_attention_reference(q, k, v, **kw)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, below, splits", [(72, 3, 1), (72, 8, 2), (64, 3, 2), (128, 8, 1)])
def test_tma_descriptors_match_the_reference(dtype, d, below, splits):
    """K/V by TMA descriptors over the [B, H, Lk, D] views (the interpreter emulates them): rows past
    Lk and the columns 72..79 of the 64 + 16 split arrive as zeros instead of being masked."""
    q, k, v, _ = buffer_views(2, 2, d, 5, 19, below, dtype, seed=d + splits)
    assert ka.tma_ok(k, v)
    out, lse = run(q, k, v, tma=True, splits=splits)
    ref, ref_lse = ka.halo_attention_reference(q, k, v)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)


def test_tma_refuses_views_it_cannot_describe():
    q, k, v, _ = buffer_views(1, 2, 72, 3, 11, 4, torch.bfloat16, pad=1)
    with pytest.raises(ValueError, match="tma=True needs"):
        ka.halo_attention(q, k, v, tma=True)


def test_split_kv_rule_splits_only_where_sms_idle():
    from parafuse_kernels import grid
    unit = 128
    assert grid.kv_splits(512, 100 * unit, 132) == 1           # 97% of the SM slots busy: no split
    assert grid.kv_splits(160, 100 * unit, 132) == 4           # a 28-program last wave: 61% -> 97%
    assert grid.kv_splits(320, 100 * unit, 132) == 2           # 81% -> 97%: the fewest ranges that fill
    assert grid.kv_splits(80, 100 * unit, 132) == 8            # one short wave
    assert grid.kv_splits(80, 5 * unit, 132) == 1              # ranges of >= 2 blocks: 2 at most, no gain
    assert grid.kv_splits(80, 7 * unit, 132) == 3              # 3 at most: 240 programs, 91% busy
    assert grid.kv_splits(132, 100 * unit, 132) == 1           # exactly one full wave
    assert grid.kv_splits(20, 3 * unit, 132) == 1              # too few keys to split
    assert ka.split_keys(100 * ka.KV_SPLIT_UNIT, 7) == (7, 15 * ka.KV_SPLIT_UNIT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    q, k, v, _ = buffer_views(1, 2, 32, 4, 19, 2, dtype, seed=3)
    out, lse = run(q, k, v)
    ref, ref_lse = ka.halo_attention_reference(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-2)


def test_prologue_scale_qk_norm_and_rope():
    d, lq = 32, 21
    q, k, v, _ = buffer_views(1, 2, d, 6, lq, 5, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    weight = torch.rand(d, generator=g) + 0.5
    angles = torch.rand(lq, d // 2, generator=g) * 6.0
    kw = dict(scale=0.3, q_norm=(weight, 1e-6), rope=(angles.cos(), angles.sin()))
    out, lse = run(q, k, v, **kw)
    ref, ref_lse = ka.halo_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])
    # the reference's prologue is the one SD3/Flux apply: RMS norm, then rotation of (even, odd) pairs
    qn = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    qc = torch.view_as_complex(qn.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(angles), angles)
    want = F.scaled_dot_product_attention(torch.view_as_real(qc).flatten(-2), k, v, scale=0.3)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_lse_merges_disjoint_key_sets_exactly():
    """Attention over [A | B] from the attentions over A and over B and their log-sum-exps (how
    text queries are merged across ranks)."""
    q, k, v, _ = buffer_views(1, 2, 16, 0, 18, 0, torch.float32, seed=6)
    o1, l1 = run(q, k[:, :, :7], v[:, :, :7])
    o2, l2 = run(q, k[:, :, 7:], v[:, :, 7:])
    lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]
    torch.testing.assert_close(merged, F.scaled_dot_product_attention(q, k, v), **TOL[torch.float32])


def test_bad_inputs_are_refused_before_launch():
    q, k, v, _ = buffer_views(1, 2, 16, 0, 5, 0, torch.float32)
    with pytest.raises(ValueError, match="at least one key"):
        ka.halo_attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="share one dtype"):
        ka.halo_attention(q, k.half(), v.half())
    with pytest.raises(ValueError, match="cos/sin"):
        ka.halo_attention(q, k, v, rope=(torch.ones(4, 8), torch.ones(4, 8)))
    with pytest.raises(ValueError, match="scale must be positive"):
        ka.halo_attention(q, k, v, scale=0.0)


# ---- the dispatcher (parafuse.attention) ------------------------------------------------------------
import logging  # noqa: E402
import os  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from parafuse import attention as dispatch  # noqa: E402


@pytest.fixture
def backend():
    """Restores the process's attention backend after the test."""
    saved = dispatch.get_backend()
    yield dispatch
    dispatch.set_backend(saved)


@pytest.mark.parametrize("name", ["sdpa", "math", "triton"])
def test_every_backend_returns_output_lse_and_applies_the_prologue(backend, name):
    q, k, v, _ = buffer_views(1, 2, 16, 3, 11, 4, torch.float32, seed=8)
    backend.use_backend(name, "cpu")
    g = torch.Generator().manual_seed(9)
    angles = torch.rand(11, 8, generator=g)
    prologues = [{}, dict(scale=0.2, q_norm=(torch.rand(16, generator=g) + 0.5, 1e-6),
                          rope=(angles.cos(), angles.sin()))]
    for kw in prologues:
        before = ka.LAUNCHES["halo_attention"]
        out, lse = backend.attention(q, k, v, return_lse=True, **kw)
        assert ka.LAUNCHES["halo_attention"] == before + (name == "triton")
        ref, ref_lse = ka.halo_attention_reference(q, k, v, **kw)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        torch.testing.assert_close(lse, ref_lse, **TOL[torch.float32])


def test_unavailable_backends_are_clear_errors(backend, monkeypatch):
    with pytest.raises(backend.BackendError, match="unknown attention backend 'flash'"):
        backend.use_backend("flash", "cpu")
    with pytest.raises(backend.BackendError, match="xformers"):     # not installed here, or CPU
        backend.use_backend("xformers", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(backend.BackendError, match="needs a CUDA device"):
        backend.use_backend("triton", "cpu")
    from parafuse.models import load_model
    from parafuse.runtime import ParallelConfig, RequestError, Runtime
    with pytest.raises(RequestError, match="needs a CUDA device .* or use --attention-backend sdpa"):
        Runtime(load_model("dit-small"), ParallelConfig(), attention_backend="triton")


def test_auto_picks_sdpa_on_cpu_and_says_so_once(backend, caplog):
    backend.use_backend("auto", "cpu")
    backend._auto_said.discard("cpu")
    q, k, v, _ = buffer_views(1, 1, 16, 0, 5, 0, torch.float32)
    with caplog.at_level(logging.INFO, logger="parafuse.attention"):
        backend.attention(q, k, v)
        backend.attention(q, k, v)
    assert [r.getMessage() for r in caplog.records] == ["attention backend auto -> sdpa on cpu (CPU)"]
    assert backend.backend_for("cpu") == "sdpa"


def test_the_auto_table_is_well_formed_and_keeps_sdpa_until_measured(backend):
    """parafuse/attention_auto.json (written by benchmarks/kernel_timings.py --write-auto on a GPU): every
    entry checked; with no GPU measurement yet every one keeps SDPA and says it is pending."""
    entries = backend._auto_entries()
    assert {d for _, d, _ in entries} >= {64, 72, 80, 96, 128} and {s for *_, s in entries} == {"short", "long"}
    for key, e in entries.items():
        assert backend.auto_pick(entries, key)[0] == e["backend"]
        if "pending" in e["source"]:
            assert e["backend"] == "sdpa"
    assert backend.auto_pick(entries, ("sm00", 64, "long")) == ("sdpa", "('sm00', 64, 'long'): not in the auto table")


def test_auto_table_check_refuses_malformed_tables(backend):
    good = {"device": "sm90", "head_dim": 72, "shape": "short", "backend": "triton", "source": "a GPU run",
            "triton_us": 90.0, "sdpa_us": 100.0}
    entries = backend.check_auto_table({"entries": [good]})
    assert backend.auto_pick(entries, ("sm90", 72, "short")) == ("triton", "('sm90', 72, 'short'): a GPU run")
    for bad, match in (([good, good], "twice"), ([dict(good, shape="tall")], "shape"),
                       ([dict(good, backend="flash")], "backend must be"),
                       ([dict(good, triton_us=120.0)], "without measured times"),
                       ([dict(good, backend="triton-tma", triton_us=120.0)], "picks triton-tma without"),
                       ([{k: v for k, v in good.items() if k != "sdpa_us"}], "without measured times")):
        with pytest.raises(ValueError, match=match):
            backend.check_auto_table({"entries": bad})


def test_shape_class_is_the_kernels_split_rule(backend):
    assert backend.shape_class(2 * 20, 512, 4096, 132) == "short"    # 4 query blocks x 40 = 160 programs
    assert backend.shape_class(2 * 16, 2048, 3328, 132) == "long"    # 512 programs: 97% busy
    assert backend.shape_class(2 * 20, 512, 200, 132) == "long"      # too few keys to split


def test_the_environment_variable_sets_the_default():
    env = dict(os.environ, PARAFUSE_ATTENTION_BACKEND="math")
    out = subprocess.run([sys.executable, "-c", "from parafuse import attention; print(attention.get_backend())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "math"


def test_patch_attention_on_the_triton_backend_in_the_emulator(backend):
    """Every attention of a DiT in partial mode on 2 emulated ranks runs the kernel on the K/V
    buffer's views, and the image equals the SDPA run's to float32 rounding; the report records the
    backend that ran."""
    from parafuse.models import load_model
    from parafuse.runtime import emulate
    from parafuse.runtime import ParallelConfig, Request

    req = Request(32, 32, 2, "ddim", seed=1, label=1)
    cfg = ParallelConfig("partial", warmup_steps=1)
    backend.use_backend("triton", "cpu")
    before = ka.LAUNCHES["halo_attention"]
    rts, tri = emulate(load_model("dit-small"), 2, cfg, req)
    assert ka.LAUNCHES["halo_attention"] - before == 2 * 2 * 4      # ranks x steps x blocks
    assert rts[0].attention_backend == "triton"
    backend.use_backend("sdpa", "cpu")
    _, ref = emulate(load_model("dit-small"), 2, cfg, req)
    torch.testing.assert_close(tri[0][0].latent, ref[0][0].latent, rtol=1e-5, atol=1e-5)


def test_cli_attention_backend_flag(tmp_path):
    """`--attention-backend triton` (through the interpreter) runs and is recorded in the report;
    without CUDA or the interpreter it exits 2 with one line saying what to do, writing nothing."""
    root = ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "kernels")]), TRITON_INTERPRET="1")
    out, rep = tmp_path / "a.png", tmp_path / "a.json"
    args = [sys.executable, "-m", "parafuse.generate", "--model", "dit-small", "--height", "32", "--width", "32",
            "--steps", "2", "--no-progress", "--out", str(out), "--report", str(rep)]
    proc = subprocess.run(args + ["--attention-backend", "triton"], capture_output=True, text=True, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(rep.read_text())["attention_backend"] == "triton"
    out.unlink()
    rep.unlink()
    env.pop("TRITON_INTERPRET")
    proc = subprocess.run(args + ["--attention-backend", "triton"], capture_output=True, text=True, cwd=root, env=env)
    assert proc.returncode == 2 and not out.exists() and not rep.exists()
    assert proc.stderr.strip().splitlines() == [
        "parafuse.generate: error: attention backend 'triton' needs a CUDA device (this run is on cpu), or "
        "TRITON_INTERPRET=1 to run it through Triton's interpreter; or use --attention-backend sdpa"]
