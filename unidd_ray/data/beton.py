"""What goes into a ``.beton``: the storage plan, the FFCV fields and the per-sample providers.

Every ``.beton`` has three fields, in this order: ``image``, ``label`` (``IntField``) and ``index``
(``IntField``, the sample's position in its split, so a loader reading any subset of rows can say
which samples it returned).  Images are stored in one of two ways:

- ``raw``: ``NDArrayField(uint8, (H, W, C))`` -- exact pixels, 1 or 3 channels alike; used for
  small images (side <= 64 px) and for single-channel data.  Image files without a fixed size are
  stored this way when ``max_resolution`` <= 64: each is resized (shorter side) and centre-cropped
  to a ``max_resolution`` square.
- ``jpeg``: FFCV's ``RGBImageField`` (3 channels) with the longer side capped at ``max_resolution``;
  ``write_mode="jpg"`` compresses every image, ``"proportion"`` a random ``compress_probability``
  share of them and stores the rest as raw pixels.

FFCV's writer runs the providers below in forked worker processes.  An exception there would leave
the writer waiting forever, so file decoding errors are caught, logged to a file shared by the
workers (:class:`ErrorLog`) and raised by the parent once the writer returns.  Pixel moments for
``mean``/``std`` are exact integer sums; for file-backed sources each worker stores the sums of the
images it decoded in a shared array (one row per sample), so no extra decoding pass is needed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unidd_ray.data.image_files import decode_rgb
from unidd_ray.data.source_types import SourceDataset, SourceError, Split

FIELD_NAMES = ("image", "label", "index")
RAW_MAX_SIDE = 64
WRITE_MODES = ("auto", "raw", "jpg", "proportion")
IMAGENET_EVAL_CROP_RATIO = 224 / 256


@dataclass(frozen=True)
class StoragePlan:
    """How the images of a source are written.

    ``side``: the fixed side of stored images (``None`` when file-backed images keep their aspect
    ratio); ``ffcv_write_mode``: the ``RGBImageField`` mode for JPEG storage.
    """

    storage: str
    channels: int
    side: int | None
    max_resolution: int | None
    jpeg_quality: int | None
    ffcv_write_mode: str | None
    compress_probability: float

    @property
    def output_resolution(self) -> int:
        """Default side of the loader's output: the stored side, or 224/256 of the JPEG cap."""
        if self.side is not None:
            return self.side
        return max(1, round(self.max_resolution * IMAGENET_EVAL_CROP_RATIO))

    @property
    def eval_crop_ratio(self) -> float:
        """Centre-crop ratio of the eval pipeline: 224/256 for aspect-preserving JPEGs, else 1."""
        return IMAGENET_EVAL_CROP_RATIO if self.side is None else 1.0

    def image_field(self):
        """The FFCV field of the ``image`` column (``label`` and ``index`` are integer fields)."""
        from ffcv.fields import NDArrayField, RGBImageField  # lazy: importing FFCV sets torch's thread count

        if self.storage == "raw":
            return NDArrayField(dtype=np.dtype("uint8"), shape=(self.side, self.side, self.channels))
        return RGBImageField(write_mode=self.ffcv_write_mode, max_resolution=self.max_resolution,
                             jpeg_quality=self.jpeg_quality, compress_probability=self.compress_probability)


def page_size_for(image_field) -> int:
    """FFCV page size: FFCV's 2 MiB minimum, doubled until it holds four of the largest samples.

    (FFCV's own default, 8 MiB per page and writer process, bloats small datasets.)  The largest
    sample is the field's fixed size, or an uncompressed RGB image at the field's ``max_resolution``.
    """
    element_size = getattr(image_field, "element_size", None)
    if element_size is None:
        side = image_field.max_resolution or 4096
        element_size = side * side * 3
    page = 1 << 21
    while page < 4 * int(element_size):
        page *= 2
    return page


def plan_storage(source: SourceDataset, *, write_mode: str, max_resolution: int, jpeg_quality: int,
                 compress_probability: float) -> StoragePlan:
    """Choose raw or JPEG storage for ``source`` (see the module docstring)."""
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {list(WRITE_MODES)}, got {write_mode!r}")
    side = source.resolution
    if side is None and source.file_backed and max_resolution <= RAW_MAX_SIDE and write_mode in ("auto", "raw"):
        side = max_resolution  # small files: store squares of max_resolution as exact pixels
    if write_mode == "auto":
        small = side is not None and side <= RAW_MAX_SIDE
        write_mode = "raw" if small or source.channels == 1 else "jpg"
    if write_mode == "raw":
        if side is None:
            raise ValueError(f"{source.name}: raw storage needs images of one fixed size, but this source keeps each "
                             "image's own size; use write_mode='jpg' or the imagefolder option resolution=N")
        return StoragePlan("raw", source.channels, side, None, None, None, compress_probability)
    if source.channels != 3:
        raise ValueError(f"{source.name}: JPEG storage (write_mode={write_mode!r}) needs RGB images, but the source "
                         f"has {source.channels} channel(s); use write_mode='raw'")
    cap = max_resolution if side is None else min(side, max_resolution)
    fixed = None if side is None else cap
    return StoragePlan("jpeg", 3, fixed, cap, jpeg_quality, write_mode, compress_probability)


def writer_geometry(source: SourceDataset, plan: StoragePlan) -> dict | None:
    """The stored geometry when :func:`plan_storage` chose it rather than the source, else ``None``.

    The source fixes it when its images are stored at their own side (``plan.side ==
    source.resolution``: Fashion-MNIST, CIFAR, image folders read with ``resolution=N``).  Otherwise
    the side of small image files or the JPEG cap came from ``max_resolution``, and
    ``{"side", "max_resolution"}`` goes into the recorded fingerprint
    (:func:`~unidd_ray.data.hashing.stored_fingerprint`).
    """
    if source.resolution is not None and plan.side == source.resolution:
        return None
    return {"side": plan.side, "max_resolution": plan.max_resolution}


def pixel_moments(images: np.ndarray, pixels_per_chunk: int = 1 << 22) -> np.ndarray:
    """Exact ``[count, sum_c..., sumsq_c...]`` (int64) over every pixel of ``(N, H, W, C)`` uint8 images."""
    channels = images.shape[-1]
    chunk = max(1, pixels_per_chunk // max(1, images.shape[1] * images.shape[2]))
    total = np.zeros(1 + 2 * channels, dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, channels).astype(np.int64)
        total[0] += len(block)
        total[1:1 + channels] += block.sum(axis=0)
        total[1 + channels:] += np.einsum("ij,ij->j", block, block)
    return total


def mean_std(moments: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std in [0, 1] from :func:`pixel_moments` sums.

    The variance numerator ``n * sum(x^2) - sum(x)^2`` is formed in exact integer arithmetic, so
    no precision is lost to cancellation.
    """
    count = int(moments[0])
    channels = (len(moments) - 1) // 2
    sums = [int(v) for v in moments[1:1 + channels]]
    squares = [int(v) for v in moments[1 + channels:]]
    mean = [s / count / 255.0 for s in sums]
    std = [math.sqrt((count * q - s * s) / (count * count)) / 255.0 for s, q in zip(sums, squares)]
    return mean, std


class ErrorLog:
    """A file that forked writer processes append ``path<TAB>message`` lines to."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.touch()

    def record(self, item: str, exc: BaseException) -> None:
        text = f"{item}\t{type(exc).__name__}: {exc}".replace("\n", " ") + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def raise_if_any(self, what: str) -> None:
        lines = [line.split("\t", 1) for line in self.path.read_text().splitlines() if line]
        if lines:
            first = "; ".join(f"{item} ({message})" for item, message in lines[:3])
            raise SourceError(f"{what}: {len(lines)} image file(s) could not be decoded (truncated or corrupt): "
                              f"{first}; replace or delete them and prepare again")


class ArraySamples:
    """``(image, label, index)`` rows of an array-backed split, for ``DatasetWriter.from_indexed_dataset``."""

    def __init__(self, split: Split):
        self.images = split.images
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), int(i)


class FileSamples:
    """``(image, label, index)`` rows of a file-backed split, decoded with PIL in the writer's workers.

    A file that cannot be decoded is recorded in ``errors`` and replaced by a black image, so the
    writer finishes and the parent can report every bad file.  The pixel sums of each decoded image
    go to row ``i`` of a shared int64 array (see :meth:`moments`).
    """

    def __init__(self, split: Split, plan: StoragePlan, errors: ErrorLog):
        self.paths = split.paths
        self.labels = split.labels
        self.plan = plan
        self.errors = errors
        width = 1 + 2 * plan.channels
        self._sums = multiprocessing.RawArray("q", len(self.paths) * width)
        self._width = width

    def __len__(self) -> int:
        return len(self.labels)

    def _decode(self, path: str) -> np.ndarray:
        if self.plan.storage == "raw" or self.plan.side is not None:
            return decode_rgb(path, square=self.plan.side)
        return decode_rgb(path, max_side=self.plan.max_resolution)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            image = self._decode(path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is reported by the parent
            self.errors.record(path, exc)
            side = self.plan.side or 8
            image = np.zeros((side, side, 3), dtype=np.uint8)
        else:
            table = np.frombuffer(self._sums, dtype=np.int64).reshape(-1, self._width)
            table[i] = pixel_moments(image[None])
        return image, int(self.labels[i]), int(i)

    def moments(self) -> np.ndarray:
        """Pixel sums over every image decoded so far (call after the writer has finished)."""
        return np.frombuffer(self._sums, dtype=np.int64).reshape(-1, self._width).sum(axis=0)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence the tqdm bar of FFCV's writer when ``enabled`` is false.

    tqdm reads its environment overrides once at import, so the writer module's ``tqdm`` name is
    swapped for a disabled variant for the duration of the block.
    """
    import ffcv.writer  # lazy: importing FFCV sets torch's thread count (see unidd_ray.data.loading)

    if enabled:
        yield
        return
    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def write_beton(path: Path, rows, field, *, workers: int, progress: bool = True) -> None:
    """Write ``rows`` (indexable ``(image, label, index)`` tuples) to ``path`` with FFCV's writer.

    ``field`` is the FFCV field of the images; ``label`` and ``index`` are integer fields.
    """
    from ffcv.fields import IntField  # lazy: importing FFCV sets torch's thread count
    from ffcv.writer import DatasetWriter

    fields = {"image": field, "label": IntField(), "index": IntField()}
    writer = DatasetWriter(str(path), fields, page_size=page_size_for(field),
                           num_workers=max(1, min(workers, len(rows))))
    with _progress_bars(progress):
        writer.from_indexed_dataset(rows)


def write_image_beton(path: Path, arrays: list[np.ndarray], labels: list[int]) -> None:
    """A ``.beton`` of raw uint8 images (all of one shape): ``image``, ``label`` and ``index`` (the position in
    ``arrays``), for FFCV loaders over a distilled set."""
    from ffcv.fields import NDArrayField  # lazy: importing FFCV sets torch's thread count

    field = NDArrayField(dtype=np.dtype("uint8"), shape=arrays[0].shape)
    write_beton(path, [(a, int(k), i) for i, (a, k) in enumerate(zip(arrays, labels))], field, workers=1,
                progress=False)
