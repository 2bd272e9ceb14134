"""The shipped default model has learned something real.

On a fixed held-out batch (crops of photographs never trained on, fixed σ and seeded noise) its
denoising error, the MSE of x̂0 = x_σ - σ·v̂ on the interior of each crop, must be clearly below
both the untrained model's and the best linear (Wiener) denoiser's fitted on the training crops
(see parafuse.train.WienerDenoiser). Runs in ~15 s on one CPU thread.
"""
from __future__ import annotations

import pytest
import torch

from parafuse.data import DEFAULT_HELD_OUT, split_names
from parafuse.models import MODELS, load_model
from parafuse.train import _euler_sample, evaluate

MARGIN = 0.8        # trained must be at most 80% of Wiener's mean x0-MSE (and below it at every σ)


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(1)
    train_names, held_out = split_names(DEFAULT_HELD_OUT)
    return evaluate(MODELS["default"], load_model("default"), held_out, train_names)


def test_held_out_loss_ordering(result):
    mean = {k: sum(result[k]) / len(result[k]) for k in ("trained", "untrained", "wiener")}
    assert mean["trained"] < MARGIN * mean["wiener"], mean
    assert mean["wiener"] < MARGIN * mean["untrained"], mean
    for s, tr, w, u in zip(result["sigmas"], result["trained"], result["wiener"], result["untrained"]):
        assert tr < w < u, (s, tr, w, u)


def test_sample_is_an_image_not_noise():
    torch.set_num_threads(1)
    img = _euler_sample(load_model("default"), MODELS["default"], 128, 128, steps=10, seed=1)
    assert torch.isfinite(img).all()
    # neighbouring pixels of a photograph-like image are strongly correlated; of noise, not at all
    a, b = img[:, :, :-1].flatten(), img[:, :, 1:].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.7, float(corr)
    assert 0.02 < img.std() < 0.9
