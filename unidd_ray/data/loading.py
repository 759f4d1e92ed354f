"""One factory for FFCV loaders over a prepared split.

``make_loader`` yields ``(images, labels, index)``: float32 NCHW images on the
requested device (normalised with the dataset's mean/std, or in [0, 1]), int64
labels and the int64 index of each row within its split.  ``drop_last`` and
``num_workers`` are always passed to FFCV explicitly (its defaults are
``drop_last=True`` and all cores).  With ``order="sequential"`` rows come in
the order of ``indices`` as given.

Pipelines:

- raw storage: ``NDArrayDecoder`` → tensor → (device) → float/scale/normalise
  → training adds an independent RandomResizedCrop + flip per image (torch);
- JPEG storage: training decodes with FFCV's ``RandomResizedCropRGBImageDecoder``
  + ``RandomHorizontalFlip``; evaluation with ``CenterCropRGBImageDecoder``
  (crop ratio 224/256).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unidd_ray.data.augment import Normalize, RandomResizedCropFlip
from unidd_ray.data.prepare import LABELS_FILE, read_dataset_info

ORDERS = ("sequential", "random", "quasi_random")


class _ToFloatImages(nn.Module):
    """uint8 (B, H, W, C) → float32 (B, C, H, W) in [0, 1], resized to ``size`` if needed."""

    def __init__(self, size: int | None):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float().div_(255).contiguous()
        if self.size is not None and x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                          antialias=True)
        return x


class _Flat(nn.Module):
    """(B, 1) → (B,): unlike a squeeze, keeps a batch of one a 1-D tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)


class _ChannelsFirstFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float().div_(255).contiguous()


def read_labels(data_dir: str | os.PathLike, split: str) -> np.ndarray:
    """All labels of a split (from ``labels.npz``, without decoding images)."""
    path = Path(data_dir) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {data_dir} is not a prepared dataset")
    with np.load(path, allow_pickle=False) as data:
        if split not in data.files:
            raise ValueError(f"unknown split {split!r}; prepared splits: {data.files}")
        return data[split].astype(np.int64)


def make_loader(data_dir: str | os.PathLike, split: str, *, batch_size: int, num_workers: int, indices=None,
                train: bool = False, order: str = "sequential", seed: int = 0, device: str = "cpu",
                normalize: bool = True, resolution: int | None = None, crop_scale=(0.08, 1.0),
                drop_last: bool = False):
    """An FFCV ``Loader`` over ``split`` of a prepared dataset (see the module docstring)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if batch_size < 1 or num_workers < 1:
        raise ValueError(f"batch_size and num_workers must be positive, got {batch_size} and {num_workers}")
    info = read_dataset_info(data_dir)
    path = Path(data_dir) / f"{split}.beton"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: re-run `unidd-ray prepare`")
    size = resolution or info.resolution
    dev = torch.device(device)
    to_device = [ToDevice(dev, non_blocking=True)] if dev.type != "cpu" else []
    post: list[nn.Module] = []
    if info.storage == "raw":
        image_pipe = [NDArrayDecoder(), ToTensor(), *to_device, _ToFloatImages(size)]
        if train:
            post.append(RandomResizedCropFlip(size, scale=tuple(crop_scale),
                                              generator=torch.Generator().manual_seed(seed)))
    else:
        if train:
            image_pipe = [RandomResizedCropRGBImageDecoder((size, size), scale=tuple(crop_scale)),
                          RandomHorizontalFlip(), ToTensor(), *to_device, _ChannelsFirstFloat()]
        else:
            image_pipe = [CenterCropRGBImageDecoder((size, size), ratio=224 / 256), ToTensor(), *to_device,
                          _ChannelsFirstFloat()]
    if normalize:
        post.append(Normalize(info.mean, info.std))
    image_pipe += post
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        count = info.splits[split]["count"]
        if len(indices) and (indices.min() < 0 or indices.max() >= count):
            raise ValueError(f"indices must lie in [0, {count}) for the {split} split")
    orders = {"sequential": OrderOption.SEQUENTIAL, "random": OrderOption.RANDOM,
              "quasi_random": OrderOption.QUASI_RANDOM}
    return Loader(
        str(path), batch_size=batch_size, num_workers=num_workers, order=orders[order], drop_last=drop_last,
        indices=indices, seed=seed, os_cache=True,
        pipelines={"image": image_pipe, "label": [IntDecoder(), ToTensor(), _Flat()],
                   "index": [IntDecoder(), ToTensor(), _Flat()]},
    )
