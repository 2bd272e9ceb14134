"""Training data for the built-in models: random crops of the photographs bundled with scikit-image.

scikit-image ships a handful of real photographs in its data folder (no download needed), which is
enough to train a small natural-texture denoiser on a CPU. Grayscale photographs are replicated to
three channels (R = G = B, which is what a gray photograph *is* in RGB); binary, synthetic, tiny or
text images are left out. Whole photographs are held out for evaluation, never cropped for training.
"""
from __future__ import annotations

import os

import numpy as np
import torch

# file name in skimage's data folder for every photograph we use.
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "ihc": "ihc.png",
    # grayscale photographs -> RGB by channel replication
    "camera": "camera.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "moon": "moon.png",
    "coins": "coins.png",
}
# Left out on purpose: horse (binary silhouette), chessboard_*, color, phantom, logo (synthetic),
# page, text (documents), microaneurysms (102 px), cell, clock_motion (blurred, low contrast).

DEFAULT_HELD_OUT = ("chelsea", "rocket")


class DataError(ValueError):
    """A bad photograph name or crop size; the message says what is valid."""


def data_dir() -> str:
    import skimage.data
    return os.path.dirname(skimage.data.__file__)


def load_photo(name: str) -> torch.Tensor:
    """Photograph `name` as a float32 tensor [3, H, W] in [-1, 1]."""
    from PIL import Image

    if name not in PHOTOS:
        raise DataError(f"unknown photograph {name!r}; valid: {', '.join(PHOTOS)}")
    with Image.open(os.path.join(data_dir(), PHOTOS[name])) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)   # "L" -> RGB replicates the gray channel
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def split_names(held_out: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(training names, held-out names); every held-out name must be a known photograph."""
    held_out = list(dict.fromkeys(held_out))
    for n in held_out:
        if n not in PHOTOS:
            raise DataError(f"unknown held-out photograph {n!r}; valid: {', '.join(PHOTOS)}")
    train = [n for n in PHOTOS if n not in held_out]
    if not train:
        raise DataError("every photograph is held out; nothing is left to train on")
    return train, held_out


class CropSampler:
    """Random `crop` x `crop` crops with random horizontal flips, drawn from one torch.Generator.

    Every photograph is equally likely (not weighted by area), so the 1411 px retina does not
    dominate. All randomness comes from `generator`, so a saved generator state resumes exactly.
    """

    def __init__(self, names: list[str], crop: int):
        self.names = list(names)
        self.images = [load_photo(n) for n in self.names]
        small = [n for n, im in zip(self.names, self.images) if min(im.shape[1:]) < crop]
        if small:
            raise DataError(f"crop {crop} is larger than photograph(s) {', '.join(small)}")
        self.crop = crop

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        c = self.crop
        out = torch.empty(batch, 3, c, c)
        idx = torch.randint(len(self.images), (batch,), generator=generator)
        u = torch.rand(batch, 3, generator=generator)               # top, left, flip
        for b in range(batch):
            im = self.images[int(idx[b])]
            top = int(u[b, 0] * (im.shape[1] - c + 1))
            left = int(u[b, 1] * (im.shape[2] - c + 1))
            x = im[:, top:top + c, left:left + c]
            out[b] = x.flip(-1) if u[b, 2] < 0.5 else x
        return out


def fixed_crops(names: list[str], crop: int, per_image: int, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of crops (no flips) from photographs `names`, for evaluation."""
    sampler = CropSampler(names, crop)
    g = torch.Generator().manual_seed(seed)
    out = []
    for im in sampler.images:
        for _ in range(per_image):
            top = int(torch.randint(im.shape[1] - crop + 1, (1,), generator=g))
            left = int(torch.randint(im.shape[2] - crop + 1, (1,), generator=g))
            out.append(im[:, top:top + crop, left:left + crop])
    return torch.stack(out)
