"""Image <-> latent for the built-in models: a space-to-depth "latent" of the RGB image.

A factor-f codec folds each f x f block of pixels into 3*f*f channels, so the denoiser works at
1/f of the image resolution, like a VAE latent but exact and free. Images are in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PixelCodec:
    def __init__(self, factor: int):
        self.factor = factor
        self.channels = 3 * factor * factor

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(image, self.factor)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latent, self.factor)
