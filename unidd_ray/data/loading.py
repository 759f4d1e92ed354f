"""``make_loader``: the one factory of FFCV loaders for prepared datasets, and ``load_real_images``.

Every loader yields ``(images, labels, index)``:

- ``images``: float32 ``(B, C, H, W)`` on ``device``, normalised with ``normalize=(mean, std)`` (the
  teacher's: ``TeacherInfo.mean``/``std``, see :mod:`~unidd_ray.data.normalization`), with ``dataset.json``'s
  mean/std (``normalize=True``: the ``dataset`` normalisation, for code without a teacher) or scaled to [0, 1]
  (``normalize=False``);
- ``labels``: int64 ``(B,)`` on ``device``;
- ``index``: int64 ``(B,)`` on the CPU, each row's position in its split.

Order.  FFCV's ``Loader`` takes ``indices`` as given: with ``order="sequential"`` rows come back
in exactly the order of ``indices`` (not sorted; checked by the tests), ``"random"`` draws a seeded
permutation of them per epoch (``seed + epoch``), and ``"quasi_random"`` a page-aware shuffle that
reads less of the file.  Consumers should rely on ``index`` rather than on the order.

Pipelines.  Decoding: raw storage uses ``NDArrayDecoder``; JPEG storage uses FFCV's
``RandomResizedCropRGBImageDecoder`` for training (its crops come from numpy's global generator,
so they are not governed by ``seed``) and ``CenterCropRGBImageDecoder`` with ratio
``eval_crop_ratio`` (224/256 for images stored with their aspect ratio) for evaluation.
Conversion of the uint8 ``(B, H, W, C)`` batch to normalised float NCHW: on the CPU,
:class:`~unidd_ray.data.ffcv_ops.ToFloatNCHW` (numba; for JPEG training it also applies the
horizontal flips, seeded by ``seed``) then ``ToTensor``; on an accelerator, FFCV's
``RandomHorizontalFlip`` (JPEG training), ``ToTensor`` -> ``ToDevice`` (uint8 is 4x less to copy)
-> :class:`ToFloatImages` (torch, on the device).  Raw storage then adds, with ``train=True``,
:class:`~unidd_ray.data.augment.RandomResizedCropFlip` (per-image crop with area fraction in
``crop_scale`` and flip, seeded by ``seed``), or resizes the whole image when an eval
``resolution`` differs from the stored side.  Every yielded tensor is freshly allocated (FFCV's
own buffers are reused between batches), so batches may be kept.

Threads.  FFCV sets torch's intra-op thread count to ``num_workers`` whenever it is imported, one
of its loaders is created or starts an epoch (``ffcv.pipeline.compiler.Compiler.set_num_threads``).
:func:`make_loader` returns a :class:`ThreadKeepingLoader` that puts torch's count back each time,
so a process keeps the threads it chose (``num_workers`` still sizes FFCV's own decoding threads).

``drop_last`` and ``num_workers`` are always passed to FFCV explicitly (its defaults are
``drop_last=True`` and "all cores").  The first loader of a process also installs
:mod:`~unidd_ray.data.numba_noise`, which drops numba's harmless finalizer ``KeyError`` messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unidd_ray.artifacts.dataset import DatasetInfo, beton_path, read_dataset_info
from unidd_ray.data import numba_noise
from unidd_ray.data.augment import Normalize, RandomResizedCropFlip
from unidd_ray.data.beton import FIELD_NAMES

ORDERS = ("sequential", "random", "quasi_random")


class ToFloatImages(nn.Module):
    """uint8 ``(B, H, W, C)`` -> a fresh float32 contiguous ``(B, C, H, W)`` in [0, 1], optionally normalised.

    The torch counterpart of :class:`~unidd_ray.data.ffcv_ops.ToFloatNCHW`, used on accelerators
    (where the uint8 batch is copied to the device first).  One conversion pass writes the NCHW
    layout directly, then ``(x - 255 mean) / (255 std)`` is applied in place.  Without
    normalisation the result is exactly ``x / 255``.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.centred = mean is not None
        if self.centred:
            Normalize(mean, std)  # validates the statistics
            offset = 255.0 * torch.tensor(list(mean), dtype=torch.float64)
            divisor = 255.0 * torch.tensor(list(std), dtype=torch.float64)
        else:
            offset, divisor = torch.zeros(1, dtype=torch.float64), torch.full((1,), 255.0, dtype=torch.float64)
        self.register_buffer("offset", offset.to(torch.float32).view(1, -1, 1, 1))
        self.register_buffer("divisor", divisor.to(torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        out = torch.empty((batch, channels, height, width), dtype=torch.float32, device=x.device)
        out.copy_(x.permute(0, 3, 1, 2))
        if self.centred:
            out.sub_(self.offset.to(x.device))
        return out.div_(self.divisor.to(x.device))


class ResizeImages(nn.Module):
    """Resize float NCHW images to ``size x size`` (the whole image, antialiased bilinear)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)


class Column(nn.Module):
    """``(B, 1)`` int64 scalars -> a fresh ``(B,)`` tensor (FFCV reuses its buffers between batches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1).clone()


def _check_indices(indices, count: int, split: str, data_dir) -> np.ndarray | None:
    if indices is None:
        return None
    array = np.asarray(indices)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D sequence of integers, got {array.dtype} {array.shape}")
    if array.min() < 0 or array.max() >= count:
        raise ValueError(f"indices must lie in 0..{count - 1} (the {split} split of {data_dir} has {count} samples), "
                         f"got values from {int(array.min())} to {int(array.max())}")
    return array.astype(np.int64)


def _to_device(device: torch.device) -> list:
    """FFCV's ``ToDevice`` for an accelerator; nothing for the CPU (it would only add a copy)."""
    from ffcv.transforms import ToDevice  # lazy, like every FFCV import here (see Threads above)

    return [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]


def _normalization(info: DatasetInfo, normalize) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    """The (mean, std) that ``normalize`` asks for (``(None, None)``: scale to [0, 1])."""
    if normalize is True:
        return info.mean, info.std
    if normalize is False or normalize is None:
        return None, None
    try:
        mean, std = normalize
    except (TypeError, ValueError):
        raise ValueError(f"normalize must be a (mean, std) pair, True (dataset.json's) or False, got {normalize!r}") \
            from None
    if len(mean) != info.channels:
        raise ValueError(f"normalize gives {len(mean)} channel(s) of mean but the images have {info.channels}")
    return mean, std


def _image_pipeline(info: DatasetInfo, *, train: bool, device: torch.device, normalize, resolution: int,
                    crop_scale: tuple[float, float], seed: int) -> list:
    # lazy, like every FFCV import here (see Threads above)
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, NDArrayDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    from unidd_ray.data.ffcv_ops import ToFloatNCHW

    on_cpu = device.type == "cpu"
    if info.storage == "jpeg":
        if train:
            stages = [RandomResizedCropRGBImageDecoder((resolution, resolution), scale=crop_scale)]
            if not on_cpu:
                stages.append(RandomHorizontalFlip())
        else:
            stages = [CenterCropRGBImageDecoder((resolution, resolution), ratio=info.eval_crop_ratio)]
    else:
        stages = [NDArrayDecoder()]
    mean, std = _normalization(info, normalize)
    if on_cpu:  # convert (and, for JPEG training, flip) in numba
        flip_seed = seed if train and info.storage == "jpeg" else None
        stages += [ToFloatNCHW.for_stats(info.channels, mean, std, flip_seed=flip_seed), ToTensor()]
    else:  # ship uint8 to the accelerator and convert there
        stages += [ToTensor(), *_to_device(device), ToFloatImages(mean, std)]
    if info.storage == "raw":
        if train:
            generator = torch.Generator().manual_seed(seed)
            stages.append(RandomResizedCropFlip(resolution, scale=crop_scale, generator=generator))
        elif resolution != info.resolution:
            stages.append(ResizeImages(resolution))
    return stages


def make_loader(data_dir: str | Path, split: str, *, batch_size: int, num_workers: int,
                indices: Sequence[int] | np.ndarray | None = None, train: bool = False, order: str = "sequential",
                seed: int = 0, device: str = "cpu", normalize=True, resolution: int | None = None,
                crop_scale: tuple[float, float] = (0.08, 1.0), drop_last: bool = False):
    """An ``ffcv.loader.Loader`` over ``split`` of the prepared dataset in ``data_dir``.

    ``indices``: rows to read (default: all); ``train``: add the training augmentation;
    ``order``: ``"sequential"``, ``"random"`` or ``"quasi_random"`` (``seed`` seeds the order and the
    raw-storage augmentation); ``resolution``: output side (default: ``dataset.json``'s);
    ``drop_last``: drop a final partial batch; ``normalize``: ``(mean, std)`` (the teacher's, what every stage
    passes), ``True`` (``dataset.json``'s) or ``False`` ([0, 1]).  See the module docstring for what is yielded.
    """
    threads = torch.get_num_threads()  # before FFCV's import, which sets it to 1: FFCV is imported here, lazily
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor

    torch.set_num_threads(threads)
    numba_noise.install()
    info = read_dataset_info(data_dir)
    path = beton_path(data_dir, split)
    record = info.files.get(path.name, {})
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing although {data_dir}/dataset.json lists it; prepare the "
                                "dataset again")
    if record and path.stat().st_size != record.get("bytes"):
        raise ValueError(f"{path} has {path.stat().st_size} bytes but dataset.json records {record.get('bytes')}: the "
                         "file was truncated or replaced; prepare the dataset again")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1 (FFCV would otherwise use every core), got {num_workers}")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
    missing = [name for name in FIELD_NAMES if name not in Reader(str(path)).handlers]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}; it was not written by prepare_dataset: prepare again")
    rows = _check_indices(indices, info.count(split), split, data_dir)
    side = int(resolution or info.resolution)
    target = torch.device(device)
    pipelines = {
        "image": _image_pipeline(info, train=train, device=target, normalize=normalize, resolution=side,
                                 crop_scale=tuple(crop_scale), seed=seed),
        "label": [IntDecoder(), ToTensor(), *_to_device(target), Column()],
        "index": [IntDecoder(), ToTensor(), Column()],
    }
    order_option = {"sequential": OrderOption.SEQUENTIAL, "random": OrderOption.RANDOM,
                    "quasi_random": OrderOption.QUASI_RANDOM}[order]
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, order=order_option, seed=seed,
                    indices=rows, pipelines=pipelines, drop_last=drop_last, os_cache=order != "quasi_random")
    torch.set_num_threads(threads)
    return ThreadKeepingLoader(loader, threads)


class ThreadKeepingLoader:
    """An FFCV ``Loader`` that leaves torch's intra-op thread count as it found it.

    FFCV's ``Compiler.set_num_threads`` also calls ``torch.set_num_threads(num_workers)``: on
    import, on construction and at the start of every epoch.  A Ray worker that runs its model on
    one thread next to another such worker would then run two threads per process and
    oversubscribe the cores (measured: four evaluation seeds on two 1-CPU workers took 252 s
    instead of ~140 s).  Everything else is the wrapped loader's.
    """

    def __init__(self, loader, threads: int):
        self.loader = loader
        self.threads = threads

    def __iter__(self):
        batches = iter(self.loader)
        torch.set_num_threads(self.threads)
        return batches

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name in ("loader", "threads"):  # not set yet (e.g. during copying): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def load_real_images(data_dir: str | Path, indices: list[int], *, num_workers: int = 1, resolution: int | None = None,
                     batch_size: int = 256, normalize=True) -> torch.Tensor:
    """Normalised eval-pipeline images of the given train indices, in the given order.

    ``resolution``: output side (default: the stored one; a recovery asks for its teacher's);
    ``batch_size``: images per loader batch, which bounds the loader's buffers; ``normalize``: as for
    :func:`make_loader` (a recovery passes its teacher's ``(mean, std)``).
    """
    unique = sorted(set(indices))
    loader = make_loader(data_dir, "train", batch_size=max(1, min(batch_size, len(unique))), num_workers=num_workers,
                         indices=unique, train=False, order="sequential", resolution=resolution,
                         normalize=normalize)
    rows = {}
    for images, _, index in loader:
        for i, img in zip(index.tolist(), images):
            rows[i] = img
    return torch.stack([rows[i] for i in indices])
