"""Writing a source as FFCV ``.beton`` files: ``train.beton``, ``val.beton``, ``dataset.json``.

Each beton has three fields: ``image``, ``label`` (int) and ``index`` (the row's
index within its split, so a loader over any ``indices`` can tell which sample
each row is).

Storage:

- ``raw`` — images of at most 64 px (and every array-backed source) are stored
  as uint8 ``NDArrayField`` of shape (H, W, C): lossless, any channel count.
- ``jpeg`` — larger image files go through FFCV's ``RGBImageField``: resized so
  the longer side is at most ``max_resolution`` and JPEG-encoded at
  ``jpeg_quality``.  For ImageNet-1K, FFCV's published configurations store
  images at a maximum side of 256 px (512 px for their high-resolution runs),
  encode in "proportion" mode (each image is JPEG-compressed with probability
  0.5, otherwise kept raw) and use JPEG quality 90; ``write_mode="proportion"``
  with ``compress_probability=0.5`` reproduces that trade of disk for decode
  speed, the default ``"jpg"`` compresses every image.

Everything is written into a temporary sibling directory and moved into place
only when complete, so a crash never leaves a partial ``.beton`` behind.
``dataset.json`` records the per-split and per-class counts, the per-channel
mean/std (in [0, 1] units, from the train split; for JPEG storage from a seeded
sample of up to 5000 train images), the source fingerprint, and the sha256 of
every file written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unidd_ray.artifacts import ArtifactError, atomic_directory, sha256_file
from unidd_ray.data.sources import SourceDataset, SourceError, decode_image

FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
LABELS_FILE = "labels.npz"
SPLITS = ("train", "val")
RAW_MAX_SIDE = 64


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    class_names: list[str]
    splits: dict  # {split: {"count": int, "per_class": [int]}}
    resolution: int  # side length of the images the loaders produce by default
    channels: int
    mean: list[float]
    std: list[float]
    storage: str  # raw | jpeg
    fingerprint: str  # identifies the prepared data: source fingerprint + storage settings
    source_fingerprint: str
    files: dict = field(default_factory=dict)  # name -> sha256
    storage_options: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


class _ArrayRows:
    """Indexed dataset of array-backed images for FFCV's writer."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), int(i)


class _FileRows:
    """Indexed dataset of image files (decoded with PIL in the writer's processes)."""

    def __init__(self, paths: list[str], labels: np.ndarray):
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return decode_image(self.paths[i]), int(self.labels[i]), int(i)


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).tolist(), x.std(0).tolist()


def _sampled_stats(paths: list[str], seed: int = 0, limit: int = 5000) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(limit, len(paths)), replace=False)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in chosen:
        x = decode_image(paths[i], size=64).reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    return mean.tolist(), np.sqrt(np.maximum(total_sq / count - mean * mean, 0)).tolist()


def _write_beton(path: Path, rows, image_field, num_workers: int) -> None:
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    writer = DatasetWriter(str(path), {"image": image_field, "label": IntField(), "index": IntField()},
                           num_workers=num_workers)
    writer.from_indexed_dataset(rows)


def prepare_dataset(source: SourceDataset, out_dir: str | os.PathLike, *, max_resolution: int = 256,
                    jpeg_quality: int = 90, write_mode: str = "jpg", compress_probability: float = 0.5,
                    num_workers: int | None = None) -> DatasetInfo:
    """Write ``source`` into ``out_dir`` (train/val betons, labels.npz, dataset.json), atomically."""
    from ffcv.fields import NDArrayField, RGBImageField

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / INFO_FILE).is_file():
        raise ValueError(f"{out_dir} exists and is not a prepared dataset; choose an empty or new directory")
    if write_mode not in ("jpg", "proportion", "raw"):
        raise ValueError(f"write_mode must be 'jpg', 'proportion' or 'raw', got {write_mode!r}")
    workers = num_workers or os.cpu_count() or 1
    file_backed = source.train.images is None
    raw_files = file_backed and max_resolution <= RAW_MAX_SIDE
    if file_backed and raw_files:  # small image files: decode once into arrays, stored losslessly
        for split in SPLITS:
            s = getattr(source, split)
            s.images = np.stack([decode_image(p, size=max_resolution) for p in s.paths])
        source = dataclasses.replace(source, resolution=max_resolution)
        file_backed = False
    if not file_backed:
        shapes = {getattr(source, s).images.shape[1:] for s in SPLITS}
        if len(shapes) != 1:
            raise SourceError(f"{source.name}: train and val images have different shapes {sorted(shapes)}")
        (h, w, c), = shapes
        if h != w:
            raise SourceError(f"{source.name}: images must be square, got {h}x{w}")
        image_field = NDArrayField(dtype=np.dtype("uint8"), shape=(h, w, c))
        storage, resolution, channels = "raw", h, c
        mean, std = _channel_stats(source.train.images)
        options = {}
    else:
        image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                                    compress_probability=compress_probability)
        storage, channels = "jpeg", 3
        resolution = int(round(max_resolution * 224 / 256))
        mean, std = _sampled_stats(source.train.paths)
        options = {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode,
                   "compress_probability": compress_probability}
    settings = json.dumps({"storage": storage, **options}, sort_keys=True)
    fingerprint = hashlib.sha256(f"{source.fingerprint}\n{settings}".encode()).hexdigest()
    with atomic_directory(out_dir) as tmp:
        for split in SPLITS:
            s = getattr(source, split)
            rows = _ArrayRows(s.images, s.labels) if storage == "raw" else _FileRows(s.paths, s.labels)
            _write_beton(tmp / f"{split}.beton", rows, image_field, workers)
        np.savez(tmp / LABELS_FILE, train=source.train.labels.astype(np.int64), val=source.val.labels.astype(np.int64))
        files = {name: sha256_file(tmp / name) for name in ("train.beton", "val.beton", LABELS_FILE)}
        info = DatasetInfo(
            name=source.name, num_classes=source.num_classes, class_names=list(source.class_names),
            splits={split: {"count": len(getattr(source, split)),
                            "per_class": np.bincount(getattr(source, split).labels,
                                                     minlength=source.num_classes).tolist()} for split in SPLITS},
            resolution=resolution, channels=channels, mean=mean, std=std, storage=storage, fingerprint=fingerprint,
            source_fingerprint=source.fingerprint, files=files, storage_options=options,
        )
        (tmp / INFO_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    return info


def read_dataset_info(data_dir: str | os.PathLike) -> DatasetInfo:
    path = Path(data_dir) / INFO_FILE
    if not path.is_file():
        raise ArtifactError(f"{data_dir} is not a prepared dataset: {INFO_FILE} is missing "
                            "(run `unidd-ray prepare` first)")
    try:
        data = json.loads(path.read_text())
        info = DatasetInfo(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"{path} is corrupt: {exc}") from exc
    if info.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {info.format_version}, expected {FORMAT_VERSION}")
    return info


def verify_dataset(data_dir: str | os.PathLike) -> DatasetInfo:
    """Check every file of a prepared dataset against the sha256 in ``dataset.json``."""
    info = read_dataset_info(data_dir)
    for name, digest in info.files.items():
        path = Path(data_dir) / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the prepared dataset")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path} does not match its sha256 in {INFO_FILE}: re-run `unidd-ray prepare`")
    return info
