"""The patch-SWD of benchmarks/swd.py against closed forms: identical sets score 0, a constant shift of
every descriptor scores the mean |projection| of the shift, the pyramid splits an image exactly."""
import math
import os
import sys

import pytest
import torch

from benchmarks.swd import (DIRECTIONS, PATCH, laplacian_pyramid, pyramid_depth, pyramid_patches,  # noqa: E402
                            swd)


def descriptors(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(count, 3, PATCH, PATCH, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
            for _ in range(2)]


def test_identical_sets_score_zero():
    ref = descriptors(300, 0)
    assert swd(ref, [r.clone() for r in ref]) == [0.0, 0.0]
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    levels = pyramid_patches(images, 64, seed=5, depth=pyramid_depth(64))
    assert swd(levels, pyramid_patches(images.clone(), 64, seed=5, depth=3)) == [0.0] * 3


def test_a_constant_shift_scores_its_mean_projection():
    """x = y + δ_c (a constant per channel): normalised by y's std, every projection onto a unit direction
    d moves by s·d with s = δ_c / std_c, so every quantile moves by it and SWD = 1e3 · mean_d |s·d|; in
    expectation over uniform directions in D dimensions that is |s| · Γ(D/2) / (√π Γ((D+1)/2))."""
    ref = descriptors(400, 1)
    delta = torch.tensor([0.3, -0.5, 0.1])
    shifted = [r + delta[:, None, None] for r in ref]
    got = swd(shifted, ref, seed=7)
    g = torch.Generator().manual_seed(7)
    for level, (r, value) in enumerate(zip(ref, got)):
        s = (delta / r.std((0, 2, 3)))[:, None, None].expand(3, PATCH, PATCH).flatten().double()
        d = torch.randn(s.numel(), DIRECTIONS, generator=g, dtype=torch.float64)
        d /= d.norm(dim=0, keepdim=True)
        assert value == pytest.approx(1e3 * (s @ d).abs().mean().item(), rel=1e-6)   # normalised in fp32
        dim = s.numel()
        expected = s.norm().item() * math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
        assert value == pytest.approx(1e3 * expected, rel=0.1)       # 512 directions: a few % of sampling error


def test_pyramid_levels_and_depth():
    x = torch.rand(1, 3, 32, 32)
    levels = laplacian_pyramid(x, 3)
    assert [tuple(t.shape[-2:]) for t in levels] == [(32, 32), (16, 16), (8, 8)]
    const = laplacian_pyramid(torch.full((1, 3, 32, 32), 0.25), 3)
    assert all(t.abs().max() < 1e-6 for t in const[:-1]) and torch.allclose(const[-1], torch.tensor(0.25))
    assert [pyramid_depth(s) for s in (64, 256, 1024)] == [3, 5, 5]
