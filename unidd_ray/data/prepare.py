"""``prepare_dataset``: write a :class:`~unidd_ray.data.source_types.SourceDataset` as FFCV files.

Output directory::

    train.beton   val.beton   labels.npz   dataset.json

The fields of both ``.beton`` files and the storage choice are described in
:mod:`unidd_ray.data.beton`; the keys of ``dataset.json`` in :mod:`unidd_ray.artifacts.dataset`.
``labels.npz`` holds the ``train`` and ``val`` label arrays (int64) for consumers that need labels
without decoding images.

Storage defaults.  Images up to 64 px (and any single-channel data) are stored as exact uint8
arrays.  Larger RGB images are stored as JPEG (quality 90) with the longer side capped at
``max_resolution`` (256), which is enough for the usual 224 px crops.  For reference, FFCV's own
ImageNet recipes write with ``write_mode="proportion"`` and JPEG quality 90: their ResNet-50
results used a 500 px cap with half of the images JPEG-compressed and half kept as raw pixels,
their ResNet-18 results a 400 px cap with one image in ten compressed.  Raw pixels cost disk and
memory but no decoding; pass ``write_mode="proportion"``, ``compress_probability`` and a larger
``max_resolution`` to follow those recipes when storage and RAM allow.

Atomicity.  Everything is written into a temporary sibling directory ``.<name>.tmp-*`` of
``out_dir``.  Only when every file is complete are they moved into ``out_dir`` -- ``dataset.json``
last, after removing any previous one, so a directory with a ``dataset.json`` is always complete.
On any error the temporary directory is deleted and ``out_dir`` is left as it was before.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from unidd_ray.data.beton import (ArraySamples, ErrorLog, FileSamples, StoragePlan, mean_std, write_beton,
                                  pixel_moments, plan_storage, writer_geometry)
from unidd_ray.artifacts.dataset import (BETON_FILES, FORMAT_VERSION, INFO_FILE, LABELS_FILE, SOURCE_STAT_FILE,
                                         DatasetInfo, file_record, read_dataset_info, verify_dataset)
from unidd_ray.data.hashing import stored_fingerprint
from unidd_ray.data.source_types import SPLITS, SourceDataset, validate_source
from unidd_ray.artifacts.locks import holds_output_lock

OWN_FILES = frozenset({*BETON_FILES.values(), LABELS_FILE, INFO_FILE, SOURCE_STAT_FILE})

__all__ = ["DatasetInfo", "prepare_dataset", "read_dataset_info", "verify_dataset"]


def _write_split(source: SourceDataset, split: str, plan: StoragePlan, path: Path, *, num_workers: int,
                 progress: bool) -> np.ndarray | None:
    """Write one split to ``path``.

    Returns the pixel moments (see :func:`~unidd_ray.data.beton.pixel_moments`) of the images the
    writer decoded from files, or ``None`` for an array-backed source (whose arrays are at hand).
    """
    data = source.split(split)
    errors = ErrorLog(path.with_suffix(".errors"))
    samples = FileSamples(data, plan, errors) if source.file_backed else ArraySamples(data)
    write_beton(path, samples, plan.image_field(), workers=num_workers, progress=progress)
    errors.raise_if_any(f"{source.name} {split} split ({source.origin})")
    errors.path.unlink()
    return samples.moments() if source.file_backed else None


def _split_summary(labels: np.ndarray, num_classes: int) -> dict:
    return {"count": len(labels), "per_class": np.bincount(labels, minlength=num_classes).astype(int).tolist()}


def check_target(out: Path) -> None:
    """Refuse an output that is a file or a directory holding anything but a prepared dataset's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another output directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
    if foreign:
        raise ValueError(f"{out} is not a prepared dataset (it holds {foreign[:5]}); prepare_dataset only replaces "
                         "its own files: choose a new or empty directory")


def _publish(staging: Path, out: Path, names: list[str]) -> None:
    """Move the finished files from ``staging`` into ``out``; ``dataset.json`` last."""
    if not out.exists():
        os.replace(staging, out)
        return
    for stale in (INFO_FILE, SOURCE_STAT_FILE):  # the stat record belonged to the data being replaced
        with contextlib.suppress(FileNotFoundError):
            (out / stale).unlink()
    for name in names:
        os.replace(staging / name, out / name)
    os.replace(staging / INFO_FILE, out / INFO_FILE)


@holds_output_lock()
def prepare_dataset(source: SourceDataset, out_dir: str | os.PathLike, *, max_resolution: int = 256,
                    jpeg_quality: int = 90, write_mode: str = "auto", compress_probability: float = 0.5,
                    num_workers: int | None = None, progress: bool = True) -> DatasetInfo:
    """Write ``source`` to ``out_dir`` as ``train.beton``, ``val.beton``, ``labels.npz``, ``dataset.json``.

    ``write_mode``: ``"auto"`` (raw arrays up to 64 px or single-channel, else JPEG), ``"raw"``,
    ``"jpg"`` or ``"proportion"`` (see :mod:`unidd_ray.data.beton`).  ``num_workers``: writer
    processes (default: every core).  An existing prepared dataset in ``out_dir`` is replaced only
    once the new one is complete; on failure nothing in ``out_dir`` changes.  A directory holding
    other files is refused (``ValueError``) rather than mixed with the dataset.
    """
    validate_source(source)
    if max_resolution < 8:
        raise ValueError(f"max_resolution must be at least 8 px, got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must lie in 1..100, got {jpeg_quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must lie in [0, 1], got {compress_probability}")
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {workers}")
    plan = plan_storage(source, write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                        compress_probability=compress_probability)
    out = Path(out_dir).absolute()
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        decoded = {split: _write_split(source, split, plan, staging / BETON_FILES[split], num_workers=workers,
                                       progress=progress) for split in SPLITS}
        train_moments = decoded["train"] if source.file_backed else pixel_moments(source.train.images)
        np.savez(staging / LABELS_FILE, train=source.train.labels.astype(np.int64),
                 val=source.val.labels.astype(np.int64))
        names = [BETON_FILES["train"], BETON_FILES["val"], LABELS_FILE]
        mean, std = mean_std(train_moments)
        info = DatasetInfo(
            name=source.name, num_classes=source.num_classes, class_names=list(source.class_names),
            splits={s: _split_summary(source.split(s).labels, source.num_classes) for s in SPLITS},
            resolution=plan.output_resolution, channels=plan.channels, mean=mean, std=std, storage=plan.storage,
            fingerprint=stored_fingerprint(source.fingerprint, writer_geometry(source, plan)),
            files={n: file_record(staging / n) for n in names},
            format_version=FORMAT_VERSION, write_mode=plan.ffcv_write_mode or "raw",
            max_resolution=plan.max_resolution, jpeg_quality=plan.jpeg_quality, eval_crop_ratio=plan.eval_crop_ratio,
            source={"origin": source.origin, "options": dict(source.options), "fingerprint": source.fingerprint})
        (staging / INFO_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
        _publish(staging, out, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info
