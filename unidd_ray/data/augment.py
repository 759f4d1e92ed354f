"""Batched image augmentations on float ``(N, C, H, W)`` tensors, on CPU or GPU.

Each image of a batch gets its own random crop and flip, drawn from an optional
``torch.Generator`` (on the CPU, so results do not depend on the device) and applied in one
``affine_grid`` + ``grid_sample`` call, without a Python loop over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ATTEMPTS = 10


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean``/``std`` are sequences of length C."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: every std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"Normalize: expected {self.mean.shape[1]} channels, got input of shape {tuple(x.shape)}")
        return (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)


def sample_crops(n: int, scale: tuple[float, float], *, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 generator: torch.Generator | None = None, image_aspect: float = 1.0) -> torch.Tensor:
    """Random crop boxes ``(n, 4)`` as ``(top, left, height, width)`` fractions of the image, float64.

    The usual random-resized-crop rule: the crop's share of the image area is uniform in ``scale``
    and its aspect ratio (width / height, in pixels) log-uniform in ``ratio``; up to 10 draws per
    image, the whole image when none fits.  The offsets are uniform over the positions where the
    box fits.  ``image_aspect`` is the images' width / height (1 for squares).
    """
    area = torch.empty(n, _ATTEMPTS, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, _ATTEMPTS, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                    generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect / image_aspect)
    h = torch.sqrt(area / aspect * image_aspect)
    fits = (w <= 1) & (h <= 1)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    ones = torch.ones(n, dtype=torch.float64)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), ones)
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), ones)
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    return torch.stack([u[:, 0] * (1 - h), u[:, 1] * (1 - w), h, w], dim=1)


def crop_resize(images: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor | None, size: int) -> torch.Tensor:
    """Crop each image to its box (fractions, see :func:`sample_crops`) and resize it to ``size x size``.

    Bilinear sampling through ``F.affine_grid``/``F.grid_sample`` (``align_corners=False``), one call
    for the whole batch; ``flip`` (bool per image, or ``None``) mirrors the crop horizontally.
    """
    n = images.shape[0]
    top, left, h, w = crop.detach().cpu().to(torch.float64).unbind(1)
    sx = torch.where(flip.detach().cpu().to(torch.bool), -w, w) if flip is not None else w
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    dtype = images.dtype if images.is_floating_point() else torch.float32
    grid = F.affine_grid(theta.to(device=images.device, dtype=dtype), [n, images.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)


class RandomResizedCropFlip(nn.Module):
    """An independent random resized crop (and horizontal flip with probability 1/2) per image.

    ``size``: output side; ``scale``: range of the crop's area fraction; ``ratio``: range of its
    aspect ratio.  Pass ``generator`` for reproducible draws (it is advanced by every call).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"RandomResizedCropFlip: scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"RandomResizedCropFlip: ratio must satisfy 0 < min <= max, got {ratio}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = flip
        self.generator = generator

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        gen = generator if generator is not None else self.generator
        boxes = sample_crops(x.shape[0], self.scale, ratio=self.ratio, generator=gen,
                             image_aspect=x.shape[3] / x.shape[2])
        flips = torch.rand(x.shape[0], generator=gen) < 0.5 if self.flip else None
        return crop_resize(x, boxes, flips, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip}"


def center_crop_resize(x: torch.Tensor, size: int, ratio: float = 1.0) -> torch.Tensor:
    """Central square crop of side ``ratio * min(H, W)``, resized to ``size`` (antialiased bilinear)."""
    height, width = x.shape[-2:]
    side = max(1, round(ratio * min(height, width)))
    top, left = (height - side) // 2, (width - side) // 2
    crop = x[..., top:top + side, left:left + side]
    if side == size:
        return crop
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return F.interpolate(crop.to(dtype), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
