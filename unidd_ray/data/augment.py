"""Batched image augmentations in torch (CPU or GPU tensors, float NCHW)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x − mean) / std per channel."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def crop_resize(images: Tensor, crop: Tensor, flip: Tensor, size: int) -> Tensor:
    """Per-image crop boxes ``crop`` (N, 4: top, left, height, width as fractions of the side), bilinear
    resize to ``size`` and horizontal flips, in one ``grid_sample`` call."""
    n = images.shape[0]
    top, left, h, w = crop.to(device=images.device, dtype=images.dtype).unbind(1)
    flip = flip.to(images.device)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, (n, images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_crops(n: int, scale: tuple[float, float], *, ratio=(3 / 4, 4 / 3), generator: torch.Generator | None = None
                 ) -> Tensor:
    """RandomResizedCrop boxes as fractions (N, 4): area fraction in ``scale``, log-uniform aspect ratio."""
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64))
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    top = (1 - h) * torch.rand(n, generator=generator, dtype=torch.float64)
    left = (1 - w) * torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.stack([top, left, h, w], 1)


class RandomResizedCropFlip(nn.Module):
    """An independent RandomResizedCrop and horizontal flip for every image of a batch."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        crops = sample_crops(n, self.scale, ratio=self.ratio, generator=self.generator)
        flips = (torch.rand(n, generator=self.generator) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        return crop_resize(x, crops, flips, self.size)
