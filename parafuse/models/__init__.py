"""Built-in denoisers: named configs, construction and safetensors weights.

`load_model(name)` returns a plain nn.Module called as `model(x, timestep, class_labels=None,
context=None)`; `MODELS[name]` (a ModelSpec) says how to build it, which noise schedule it was made
for, and how images map to its latent.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from parafuse.models.codec import PixelCodec
from parafuse.models.dit import DiT
from parafuse.models.layers import nonzero_init_
from parafuse.models.unet import UNet

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")


class ModelError(ValueError):
    """A problem with a model name or weights file that the user can fix."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str                      # "unet" or "dit"
    config: dict
    codec_factor: int              # pixels per latent row/column
    schedule: dict = field(default_factory=lambda: {"kind": "flow", "shift": 1.0})
    weights: str | None = None     # file name in parafuse/models/weights, or None for a seeded random init
    description: str = ""
    untrained: bool = False        # benchmark-scale random weights: its images are noise, its timings real

    @property
    def latent_channels(self) -> int:
        return 3 * self.codec_factor ** 2

    @property
    def downsample_factor(self) -> int:
        """How many latent rows one row of the model's coarsest level covers."""
        return 2 ** (len(self.config.get("channel_mult", (1, 2, 2))) - 1) if self.arch == "unet" \
            else self.config.get("patch_size", 2)

    @property
    def pixel_factor(self) -> int:
        """Image height and width must be multiples of this."""
        return self.codec_factor * self.downsample_factor

    @property
    def num_classes(self) -> int:
        return self.config.get("num_classes", 0)

    @property
    def context_dim(self) -> int | None:
        return self.config.get("context_dim")

    def codec(self) -> PixelCodec:
        return PixelCodec(self.codec_factor)

    def weights_path(self) -> str | None:
        return os.path.join(WEIGHTS_DIR, self.weights) if self.weights else None

    def build(self, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
        """The architecture with a seeded, non-zero random initialisation, built on `device` (a
        benchmark-scale model is initialised on the GPU it runs on; `meta` allocates nothing)."""
        cls = {"unet": UNet, "dit": DiT}[self.arch]
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            model = cls(self.latent_channels, **self.config)
            if device.type != "meta":
                nonzero_init_(model)
        return model


_UNET_SMALL = dict(channels=64, channel_mult=(1, 2, 2), blocks_per_level=1, attention_levels=(2,), heads=4, groups=16)
_DIT_SMALL = dict(patch_size=2, dim=128, depth=4, heads=4)

MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    # 48 channels, not 64: ~2x cheaper to train and run on a CPU (see weights/MODEL_CARD.md).
    ModelSpec("default", "unet", dict(_UNET_SMALL, channels=48), codec_factor=4, weights="default.safetensors",
              description="the built-in default: a small U-Net on a 4x space-to-depth latent, flow matching"),
    ModelSpec("unet-small", "unet", dict(_UNET_SMALL, num_classes=10), codec_factor=4,
              description="random-initialised U-Net of SDXL's shape, 10 classes (for CFG), flow matching"),
    ModelSpec("unet-small-text", "unet", dict(_UNET_SMALL, context_dim=64), codec_factor=4,
              description="random-initialised U-Net with cross-attention to a text-embedding tensor [B, L, 64]"),
    ModelSpec("unet-small-vp", "unet", dict(_UNET_SMALL, num_classes=10), codec_factor=4,
              schedule={"kind": "vp", "beta_schedule": "scaled_linear", "prediction": "eps"},
              description="random-initialised U-Net on a VP (DDPM scaled-linear, eps-prediction) schedule"),
    ModelSpec("dit-small", "dit", dict(_DIT_SMALL, num_classes=10), codec_factor=4,
              description="random-initialised DiT of PixArt/SD3's shape, 10 classes (for CFG), flow matching"),
    ModelSpec("dit-small-text", "dit", dict(_DIT_SMALL, context_dim=64), codec_factor=4,
              description="random-initialised DiT with cross-attention to a text-embedding tensor [B, L, 64]"),
    # Trained like "default" (weights/MODEL_CARD.md): a DiT whose attention has learnt what a texture model's
    # does, for measuring patch parallelism on a transformer with trained (not random) attention.
    ModelSpec("dit-texture", "dit", dict(_DIT_SMALL), codec_factor=4, weights="dit-texture.safetensors",
              description="a small trained DiT (patch 2 on the 4x latent, 128 x 4), unconditional; weak (blocky "
                          "samples), for measuring the parallel modes on learned attention"),
    # Benchmark-scale, random-initialised (for measuring only). The 8x codec makes 2048 px a 256² latent, the
    # token counts of SDXL's and PixArt's VAE latents at the same image size.
    ModelSpec("unet-xl", "unet", dict(channels=320, channel_mult=(1, 2, 4), blocks_per_level=2, attention_levels=(1, 2),
                                      transformer_depth=(0, 2, 10), head_dim=64, groups=32, context_dim=2048),
              codec_factor=8, untrained=True,
              description="UNTRAINED, for benchmarks: a U-Net of SDXL's widths 320/640/1280, transformer depth 2/10, "
                          "2048-d text context"),
    ModelSpec("dit-xl", "dit", dict(patch_size=2, dim=1152, depth=28, heads=16, context_dim=4096), codec_factor=8,
              untrained=True,
              description="UNTRAINED, for benchmarks: a DiT of PixArt-alpha's size (1152 x 28, 16 heads), "
                          "4096-d text context"),
]}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def check_weights(spec: ModelSpec, path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file and check it fits the spec's architecture; raise ModelError if not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ModelError(f"weights file {path!r} for model {spec.name!r} does not exist")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"weights file {path!r} is not a readable safetensors file ({e})") from None
    expected = {k: v.shape for k, v in spec.build(device="meta").state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        raise ModelError(f"weights file {path!r} does not match model {spec.name!r}: "
                         f"{len(missing)} missing, {len(extra)} unexpected, {len(wrong)} wrongly shaped tensors"
                         f" (first: {(missing + extra + wrong)[0]})")
    return state


def weights_fingerprint(path: str | None) -> tuple | None:
    """(size, SHA-256 of the safetensors header) of a weights file: ranks given files of the same
    name but different contents are told apart without reading the tensors."""
    if path is None:
        return None
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(min(length, 100 << 20))
    return os.path.getsize(path), hashlib.sha256(header).hexdigest()


def load_model(name: str, weights: str | None = None, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """Build model `name` and load its weights (`weights` overrides the spec's file).

    A spec without a weights file gets a seeded random initialisation (built on `device`). The
    returned module is in eval mode and carries its spec as `model.spec`.
    """
    spec = get_spec(name)
    model = spec.build(seed, device if weights is None and spec.weights is None else "cpu")
    path = weights or spec.weights_path()
    if path is not None:
        model.load_state_dict(check_weights(spec, path))
    model.eval().requires_grad_(False)
    model.spec = spec
    return model
