"""The one-bit K/V codec kernels against the PyTorch codec (parafuse.parallel.kv_codec), through
the Triton interpreter on CPU (TRITON_INTERPRET=1 is set by conftest.py). Random drifting K/V,
widths that fill and that do not fill the byte tiles (C = 16, 48, 96), batch 2, fp32, bf16 and fp16.
Tolerances: decode gives the reference's bits exactly; encode gives the reference's sign bits
exactly and its scales to the float32 reduction order (1e-6 relative in fp32, one rounding of
the dtype otherwise), and whatever the scale, sender and receiver mirrors are equal bit for bit."""
import pytest
import torch

from parafuse.parallel import kv_codec as ref
from parafuse_kernels import kv_codec as kern

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def drifting(steps, t, b, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(t, b, 2 * c, generator=g)
    v = torch.randn(t, b, 2 * c, generator=g)
    out = []
    for i in range(steps):
        k = k + 0.1 * v + 0.01 * torch.randn(t, b, 2 * c, generator=g)
        out.append(k.to(dtype))
    return out


def state(x):
    return x.clone(), torch.zeros_like(x)


@pytest.mark.parametrize("c", [16, 48, 96])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_gives_the_references_bits(c, dtype):
    ks = drifting(5, 7, 2, c, dtype)
    payload = torch.empty(7, 2, ref.payload_bytes(c, dtype), dtype=torch.uint8)
    sender, by_torch, by_kernel = state(ks[0]), state(ks[0]), state(ks[0])
    before = kern.LAUNCHES["decode"]
    for k in ks[1:]:
        ref.encode(k, *sender, payload)
        ref.decode(payload, *by_torch)
        kern.decode(payload, *by_kernel)
        assert torch.equal(by_kernel[0], by_torch[0]) and torch.equal(by_kernel[1], by_torch[1])
    assert torch.equal(by_kernel[0], sender[0])
    assert kern.LAUNCHES["decode"] == before + 4


@pytest.mark.parametrize("c", [16, 48, 96])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_encode_matches_the_reference_and_its_receivers(c, dtype):
    ks = drifting(5, 7, 2, c, dtype, seed=1)
    nsign = 2 * c // 8
    mine = torch.empty(7, 2, ref.payload_bytes(c, dtype), dtype=torch.uint8)
    theirs = torch.empty_like(mine)
    sender, receiver = state(ks[0]), state(ks[0])
    before = kern.LAUNCHES["encode"]
    for k in ks[1:]:
        # the same starting state for both encoders: the kernel's step against the reference's
        m0, d0 = sender[0].clone(), sender[1].clone()
        ref.encode(k, m0, d0, theirs)
        kern.encode(k, *sender, mine)
        assert torch.equal(mine[..., :nsign], theirs[..., :nsign])
        got, want = ref.split_payload(mine, dtype)[1], ref.split_payload(theirs, dtype)[1]
        tol = dict(rtol=1e-6, atol=0) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=0)
        torch.testing.assert_close(got, want, **tol)
        kern.decode(mine, *receiver)
        assert torch.equal(receiver[0], sender[0]) and torch.equal(receiver[1], sender[1])
    assert kern.LAUNCHES["encode"] == before + 4
    assert (sender[0].float() - ks[-1].float()).abs().mean() < (ks[0].float() - ks[-1].float()).abs().mean() / 4


def test_kernels_refuse_non_contiguous_rows():
    kv = torch.randn(4, 2, 64)[:, :, :32]
    with pytest.raises(ValueError, match="contiguous"):
        kern.decode(torch.zeros(4, 2, ref.payload_bytes(16, torch.float32), dtype=torch.uint8), kv,
                    torch.zeros_like(kv))


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_kernels_triton_run_the_codec_in_the_engine_with_the_torch_paths_image(mode):
    """`--kernels triton` sends the one-bit messages through the fused kernels: on dit-small (no
    GroupNorm) the image equals the PyTorch path's to 1e-5 (the scales' reduction order and the
    fused solver update differ), and every rank's mirror is its sender's bit for bit
    (tests/unit/test_kv_codec.py's check)."""
    from support.codec import mirror_pairs

    from parafuse.models import load_model
    from parafuse.runtime import emulate
    from parafuse.runtime import ParallelConfig, Request

    req = Request(48, 32, 4, "ddim", seed=5, label=2)
    cfg = ParallelConfig(mode, 1, 0.3 if mode == "partial" else None, kv_codec="sign")
    before = dict(kern.LAUNCHES)
    rts, tri = emulate(load_model("dit-small"), 3, cfg, req, kernels="triton")
    assert kern.LAUNCHES["encode"] > before["encode"] and kern.LAUNCHES["decode"] > before["decode"]
    for held, sent in mirror_pairs(rts):
        assert torch.equal(held, sent)
    _, plain = emulate(load_model("dit-small"), 3, cfg, req)
    assert (tri[0][0].latent - plain[0][0].latent).abs().max() <= 1e-5
