"""FreeU (`pipe.enable_freeu(s1=..., s2=..., b1=..., b2=...)`) on a strip of the U-Net.

diffusers applies FreeU in the up blocks of `resolution_idx` 0 and 1 (`apply_freeu` in UpBlock2D
and CrossAttnUpBlock2D), before each resnet, whose input is cat([hidden_states, res_hidden_states]):
the backbone features' first half of channels times b (row-local), and the skip features through
`fourier_filter`, which scales a box of low frequencies of the whole image by s. The box holds
frequencies 0 and -1 of each axis (0 alone on an axis of length 1), so the filter is

    x + (s - 1) * Re(ifft2(box * fft2(x)))

whose correction depends on x through at most four Fourier coefficients per (sample, channel),
each a sum over the whole image. A strip computes its rows' share of them, at its rows' indices in
the image (`box_coefficients`); the strips sum them (`StripReduce.sum`, kind `reduce`: the same
bits on every rank), and each strip computes its rows of the correction (`filtered_rows`). Exact,
for one small reduction per up block and evaluation, waited for in every mode that exchanges; in
mode `none` (no exchange) and on a rank that holds the whole image, diffusers' own FreeU runs.

`StripFreeU` does this with module hooks on the strip's U-Net, which keeps diffusers' settings:
`enable_freeu` / `disable_freeu` write them on the up blocks, before or after parallelize, and
they are read at every block call. The up block's pre-hook sets them aside while the block runs -
diffusers' own FreeU would filter the strip as if it were the image - and filters the block's skip
features, all of them in one reduction; each resnet's pre-hook scales the backbone half of its
input; the block's forward hook puts the settings back, also when the block raises.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D

from parafuse.parallel.plan import LOCAL
from parafuse.parallel.reduce import StripReduce

# the up blocks whose forward applies FreeU (`apply_freeu`) in the U-Nets parafuse splits
FREEU_BLOCKS = (UpBlock2D, CrossAttnUpBlock2D)
SETTINGS = ("s1", "s2", "b1", "b2")


def freeu_scales(block: nn.Module) -> tuple[float, float] | None:
    """(s, b) of the FreeU diffusers applies in `block` - (s1, b1) at resolution_idx 0, (s2, b2) at
    1 - or None where it applies none. diffusers' rule: on when all four settings are set and
    non-zero."""
    if not isinstance(block, FREEU_BLOCKS) or not all(getattr(block, k, None) for k in SETTINGS):
        return None
    return {0: (block.s1, block.b1), 1: (block.s2, block.b2)}.get(block.resolution_idx)


def box_basis(n: int, start: int, count: int, device: torch.device) -> torch.Tensor:
    """exp(-2πi k j / n) [K, count] (complex64) for the frequencies k of the filter's box on an axis
    of n positions - 0 and n - 1 (= -1), 0 alone when n = 1 - and positions j = start, ..., start +
    count - 1."""
    k = torch.arange(min(n, 2), device=device) * (n - 1)
    j = torch.arange(start, start + count, device=device)
    angle = (k[:, None] * j % n).float() * (-2 * math.pi / n)      # k j reduced mod n in integers: exact
    return torch.polar(torch.ones_like(angle), angle)


def box_coefficients(x: torch.Tensor, top: int, height: int) -> torch.Tensor:
    """The box's Fourier coefficients [B, C, K, K'] (complex64) of rows `x` [B, C, rows, W], rows
    top, ..., top + rows - 1 of an image of `height` rows: the image's own when x is the image,
    else x's share, which summed over the strips is the image's."""
    rows = box_basis(height, top, x.shape[-2], x.device)
    cols = box_basis(x.shape[-1], 0, x.shape[-1], x.device)
    return torch.einsum("uh,bchw,vw->bcuv", rows, x.to(torch.complex64), cols)


def filtered_rows(x: torch.Tensor, coefficients: torch.Tensor, scale: float, top: int, height: int) -> torch.Tensor:
    """Rows `x` (rows top, ... of an image of `height` rows) of diffusers' fourier_filter(image,
    threshold=1, scale), given the image's box coefficients: x + (scale - 1) * Re(ifft2(box *
    fft2(image))) at those rows, in float32, returned in x's dtype (as diffusers computes it)."""
    rows = box_basis(height, top, x.shape[-2], x.device)
    cols = box_basis(x.shape[-1], 0, x.shape[-1], x.device)
    low = torch.einsum("bcuv,uh,vw->bchw", coefficients, rows.conj(), cols.conj()).real
    return torch.add(x.float(), low, alpha=(scale - 1) / (height * x.shape[-1])).to(x.dtype)


def fourier_filter(x: torch.Tensor, scale: float) -> torch.Tensor:
    """diffusers' fourier_filter(x, threshold=1, scale) (FreeU's) of a whole image x [B, C, H, W]."""
    return filtered_rows(x, box_coefficients(x, 0, x.shape[-2]), scale, 0, x.shape[-2])


class StripFreeU:
    """FreeU on the strip of `strips` (a StripDenoiser: its layers, engine, geometry and patch
    index): the hooks of the module docstring, on its U-Net's FreeU up blocks and their resnets."""

    def __init__(self, strips):
        self.strips = strips
        self.reduce = None if strips.engine is None else StripReduce(strips.engine)
        self._settings: dict[nn.Module, dict] = {}       # block -> its settings, set aside while it runs
        self._backbone: dict[nn.Module, tuple] = {}      # resnet -> (its skip's channels, b) for its call
        self._handles = []
        for block in strips.layers.modules():
            if isinstance(block, FREEU_BLOCKS):
                # outside torch.compile's tracing, as the denoiser's hooks (StripModel): they set the
                # block's settings aside and exchange the skips' coefficients
                self._handles += [block.register_forward_pre_hook(torch.compiler.disable(self._block_in), with_kwargs=True),
                                  block.register_forward_hook(torch.compiler.disable(self._block_out), always_call=True)]
                self._handles += [resnet.register_forward_pre_hook(torch.compiler.disable(self._resnet_in))
                                  for resnet in block.resnets]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _block_in(self, block, args, kwargs):
        scales = freeu_scales(block)
        engine = self.strips.engine
        if scales is None or engine is None or engine.step is LOCAL:
            return None         # no FreeU here; the whole image; or no exchange (mode none, the shape trace)
        self._settings[block] = {k: getattr(block, k) for k in SETTINGS}
        for k in SETTINGS:
            setattr(block, k, None)
        s, b = scales
        named = "res_hidden_states_tuple" in kwargs
        skips = kwargs["res_hidden_states_tuple"] if named else args[1]
        for resnet, skip in zip(block.resnets, reversed(skips)):     # each resnet takes the last skip left
            self._backbone[resnet] = (skip.shape[1], b)
        skips = self._filter(skips, s)
        if named:
            return args, {**kwargs, "res_hidden_states_tuple": skips}
        return (args[0], skips) + tuple(args[2:]), kwargs

    def _block_out(self, block, args, output):
        for k, v in self._settings.pop(block, {}).items():
            setattr(block, k, v)
        for resnet in block.resnets:
            self._backbone.pop(resnet, None)

    def _resnet_in(self, resnet, args):
        backbone = self._backbone.pop(resnet, None)
        if backbone is not None:
            skip_channels, b = backbone
            x = args[0]
            # x is the block's fresh cat([hidden_states, skip]): its backbone half scaled in place,
            # as diffusers scales hidden_states before the cat
            x[:, :(x.shape[1] - skip_channels) // 2].mul_(b)

    def _filter(self, skips: tuple[torch.Tensor, ...], scale: float) -> tuple[torch.Tensor, ...]:
        """The block's skip features, this strip's rows of each filtered as the whole image is: every
        skip's coefficients summed over the strips in one reduction."""
        i = self.strips.layout.patch_index
        levels = [self.strips.geometry.level_of_width(skip.shape[-1]) for skip in skips]
        parts = [box_coefficients(skip, lv.offsets[i], lv.height) for skip, lv in zip(skips, levels)]
        shares = torch.view_as_real(torch.cat([p.flatten(1) for p in parts], 1))
        whole = torch.view_as_complex(self.reduce.sum(shares)).split([p[0].numel() for p in parts], 1)
        return tuple(filtered_rows(skip, c.reshape(p.shape), scale, lv.offsets[i], lv.height)
                     for skip, c, p, lv in zip(skips, whole, parts, levels))
