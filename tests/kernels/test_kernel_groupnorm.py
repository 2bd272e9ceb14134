"""The GroupNorm kernels against their PyTorch references, through the Triton interpreter on CPU
(TRITON_INTERPRET=1 is set by conftest.py before any kernel module is imported). Random inputs with
a mean far from zero (the one-pass variance's hard case), sizes that are not multiples of the
blocks, batch 2, fp32 and bf16. Tolerances: fp32 sums to 1e-5 relative; the normalised output to
1e-5 (fp32) or one bf16 rounding, 1/128 relative (bf16)."""
import importlib.util

from dataclasses import replace

import pytest
import torch

from parafuse_kernels import groupnorm as gn


def activation(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2.0 + 3.0).to(dtype)


@pytest.mark.parametrize("shape, groups", [((2, 8, 5, 7), 4), ((1, 12, 9, 13), 3), ((2, 4, 3, 700), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_sums_match_the_reference(shape, groups, dtype):
    x = activation(shape, dtype)
    out = torch.full((2, shape[0], groups), 123.0)        # stale contents must not leak in
    before = gn.LAUNCHES["group_sums"]
    gn.group_sums(x, groups, out)
    assert gn.LAUNCHES["group_sums"] == before + 1
    torch.testing.assert_close(out, gn.group_sums_reference(x, groups), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_apply_matches_the_reference_and_torch(dtype, affine):
    x = activation((2, 12, 7, 9), dtype, seed=1)
    groups = 4
    weight = torch.randn(12).to(dtype) if affine else None
    bias = torch.randn(12).to(dtype) if affine else None
    sums = gn.group_sums_reference(x, groups)
    count = x[0, :3].numel()
    before = gn.LAUNCHES["group_norm_apply"]
    y = gn.group_norm_apply(x, sums, count, weight, bias, 1e-5)
    assert gn.LAUNCHES["group_norm_apply"] == before + 1 and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1 / 64)
    torch.testing.assert_close(y, gn.group_norm_apply_reference(x, sums, count, weight, bias, 1e-5), **tol)
    want = torch.nn.functional.group_norm(x.float(), groups, None if weight is None else weight.float(),
                                          None if bias is None else bias.float(), 1e-5).to(dtype)
    torch.testing.assert_close(y, want, **tol)


def test_negative_variance_falls_back_to_the_given_statistics():
    """Where a stale estimate's variance is negative, the fallback sums give mean and variance."""
    x = activation((1, 6, 5, 5), torch.float32, seed=2)
    groups = 3
    good = gn.group_sums_reference(x, groups)
    count = x[0, :2].numel()
    bad = good.clone()
    bad[1, 0, 1] = 0.0                                    # Σx² = 0 with Σx ≠ 0: negative variance in group 1
    y = gn.group_norm_apply(x, bad, count, None, None, 1e-5, fallback=good, fallback_count=count)
    ref = gn.group_norm_apply_reference(x, bad, count, None, None, 1e-5, fallback=good, fallback_count=count)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 2:4], torch.nn.functional.group_norm(x, groups, eps=1e-5)[:, 2:4],
                               rtol=1e-5, atol=1e-5)


# ---- in the patch runtime ----------------------------------------------------------------------
from parafuse.models import load_model  # noqa: E402
from parafuse.parallel.distributed import ParallelLayout  # noqa: E402
from parafuse.runtime import emulate  # noqa: E402
from parafuse.parallel.layers import PatchGroupNorm  # noqa: E402
from parafuse.parallel.transport import NullTransport  # noqa: E402
from parafuse.profile import OpCounter  # noqa: E402
from parafuse.parallel.config import ConfigError, PatchConfig  # noqa: E402
from parafuse.runtime import ParallelConfig, Request, RequestError, Runtime  # noqa: E402

REQ = Request(48, 32, 2, "ddim", seed=5, label=2)


@pytest.mark.parametrize("mode", ["sync", "full"])
def test_triton_groupnorm_in_the_emulator_matches_the_torch_path(mode):
    """sync with the kernels equals the serial run; the stale mode (corrected statistics, with their
    fallback) equals the same run with the PyTorch GroupNorm - to float32 rounding: the kernels
    add partial sums in another order."""
    before = dict(gn.LAUNCHES)
    cfg = ParallelConfig(mode, warmup_steps=1)
    req = REQ if mode == "full" else replace(REQ, steps=1)     # sync: one step shows it; full: a stale one
    _, tri = emulate(load_model("unet-small"), 2, cfg, req, kernels="triton")
    assert gn.LAUNCHES["group_sums"] > before["group_sums"] and gn.LAUNCHES["group_norm_apply"] > before["group_norm_apply"]
    _, ref = emulate(load_model("unet-small"), 2, cfg, req)
    assert (tri[0][0].latent - ref[0][0].latent).abs().max() <= 1e-4
    if mode == "sync":
        serial = Runtime(load_model("unet-small"), ParallelConfig()).generate(req).latent
        assert (tri[0][0].latent - serial).abs().max() <= 1e-4


def test_a_triton_groupnorm_is_three_launches_and_two_small_ops(monkeypatch):
    """In a synchronous step a patched GroupNorm on the kernels issues three Triton launches (the
    partial sums, their fixed-order sum, the apply) and two ATen ops (allocating the partials and
    the output), plus its all-reduce. (The kernels are stubbed here: under the interpreter their own
    emulation would run ATen ops.)"""
    launched = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.name)

    monkeypatch.setattr(gn, "_group_sums_kernel", Stub("sums"))
    monkeypatch.setattr(gn, "_sum_parts_kernel", Stub("parts"))
    monkeypatch.setattr(gn, "_group_norm_apply_kernel", Stub("apply"))
    rt = Runtime(load_model("unet-small"), ParallelConfig("sync"), layout=ParallelLayout(0, 2),
                 transport=NullTransport(0, 2), kernels="triton")
    norm = [m for m in rt.model.modules() if isinstance(m, PatchGroupNorm)][3]
    step = rt.rank_step(REQ)
    counter, inside = OpCounter(), []

    def enter(*_):
        launched.clear()
        counter.__enter__()

    def leave(*_):
        counter.__exit__(None, None, None)
        inside.extend(launched)

    norm.register_forward_pre_hook(enter)
    norm.register_forward_hook(leave)
    step()
    assert inside == ["sums", "parts", "apply"]
    assert counter.ops == {"empty": 1, "empty_like": 1}, counter.ops


def test_triton_kernels_without_cuda_or_the_interpreter_are_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RequestError, match="needs a CUDA device"):
        Runtime(load_model("dit-small"), ParallelConfig(), kernels="triton")


def test_default_kernels_are_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    # the interpreter runs Triton on CPU for tests only: a CPU run's default stays on PyTorch ops
    assert Runtime(load_model("dit-small"), ParallelConfig()).kernels == "torch"
    assert PatchConfig().on(torch.device("cuda")).kernels == "triton"
    assert PatchConfig(kernels="torch").on(torch.device("cuda")).kernels == "torch"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="the default on CUDA.*use kernels 'torch'"):
        PatchConfig().on(torch.device("cuda"))


# ---- the SiLU that follows, fused where it is the only reader --------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_apply_with_silu(dtype):
    x = activation((2, 8, 5, 9), dtype, seed=3)
    weight, bias = torch.randn(8).to(dtype), torch.randn(8).to(dtype)
    sums = gn.group_sums_reference(x, 4)
    count = x[0, :2].numel()
    y = gn.group_norm_apply(x, sums, count, weight, bias, 1e-5, silu=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1 / 128, atol=1 / 64)
    torch.testing.assert_close(y, gn.group_norm_apply_reference(x, sums, count, weight, bias, 1e-5, silu=True), **tol)
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 4, weight.float(), bias.float(), 1e-5))
    torch.testing.assert_close(y, want.to(dtype), **tol)


class Readers(torch.nn.Module):
    """GroupNorms read by F.silu only, by an nn.SiLU module only, by a SiLU and a residual, by a conv."""

    def __init__(self):
        super().__init__()
        self.only_f = torch.nn.GroupNorm(2, 4)
        self.only_module = torch.nn.GroupNorm(2, 4)
        self.act = torch.nn.SiLU()
        self.shared = torch.nn.GroupNorm(2, 4)
        self.to_conv = torch.nn.GroupNorm(2, 4)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, t):
        x = torch.nn.functional.silu(self.only_f(x))
        x = self.act(self.only_module(x))
        h = self.shared(x)
        x = torch.nn.functional.silu(h) + h
        return self.conv(self.to_conv(x))


def test_the_trace_marks_groupnorms_whose_only_reader_is_silu():
    from parafuse.profile import ModelProfile
    sites = {s.key: s.silu for s in ModelProfile.trace(Readers(), 4, 1).sites if s.kind == "norm"}
    assert sites == {"only_f": True, "only_module": True, "shared": False, "to_conv": False}
    m = load_model("unet-small")
    unet = {s.key: s.silu for s in ModelProfile.trace(m, m.spec.latent_channels, m.spec.downsample_factor).sites
            if s.kind == "norm"}
    assert unet["down.0.res.norm1"] and unet["norm_out"] and not unet["mid_attn.norm"]


def test_a_fused_silu_output_refuses_other_readers():
    from parafuse.parallel.layers import SiLUApplied
    y = torch.randn(2, 3).as_subclass(SiLUApplied)
    out = torch.nn.functional.silu(y)
    assert type(out) is torch.Tensor and torch.equal(out, y.as_subclass(torch.Tensor)) and y.shape == (2, 3)
    with pytest.raises(RuntimeError, match="only a SiLU"):
        y + 1


def test_fused_silu_groupnorms_leave_no_silu_op(monkeypatch):
    """In a synchronous U-Net step on the kernels, every GroupNorm that the trace marked launches its
    two kernels and the model's SiLU after it issues no ATen op: the step has as many `silu` ops
    fewer than on the PyTorch path as there are marked GroupNorms. (Kernels stubbed as above.)"""
    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(gn, "_group_sums_kernel", Stub())
    monkeypatch.setattr(gn, "_sum_parts_kernel", Stub())
    monkeypatch.setattr(gn, "_group_norm_apply_kernel", Stub())
    counts = {}
    for kernels in ("torch", "triton"):
        rt = Runtime(load_model("unet-small"), ParallelConfig("sync"), layout=ParallelLayout(0, 2),
                     transport=NullTransport(0, 2), kernels=kernels)
        step = rt.rank_step(REQ)
        with OpCounter() as counter:
            step()
        counts[kernels] = counter.ops.get("silu", 0)
    marked = sum(s.silu for s in rt.profile.sites if s.kind == "norm")
    assert marked == 23 and counts["torch"] - counts["triton"] == marked
