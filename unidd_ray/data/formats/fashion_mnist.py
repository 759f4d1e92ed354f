"""Fashion-MNIST from its four IDX files (as installed by Debian's ``dataset-fashion-mnist``).

Files: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``
and ``t10k-labels-idx1-ubyte.gz`` (uncompressed copies without ``.gz`` are accepted too).  The
``t10k`` files form the val split.  Fingerprint: the bytes of the four files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unidd_ray.data.hashing import Fingerprint
from unidd_ray.data.idx import read_idx
from unidd_ray.data.source_types import SourceDataset, SourceError, Split, check_label_range, validate_source

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"fashion-mnist: {root / (stem + '.gz')} is missing; install the data with "
                            "`apt-get install dataset-fashion-mnist` or pass --root DIR holding the four IDX files")


def _read_split(root: Path, split: str, fingerprint: Fingerprint) -> Split:
    image_file, label_file = (_find(root, stem) for stem in _FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise SourceError(f"{image_file}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise SourceError(f"{label_file}: expected {len(images)} labels (one per image of {image_file.name}), "
                          f"got shape {labels.shape}")
    labels = labels.astype(np.int64)
    check_label_range(labels, len(CLASS_NAMES), split, str(label_file))
    for path in (image_file, label_file):
        fingerprint.add_file(path.name.removesuffix(".gz"), path)
    return Split(labels=labels, images=images[..., None])


def load(root: str | None = None) -> SourceDataset:
    """Read Fashion-MNIST (60,000 train / 10,000 val images, 28 x 28, 1 channel, 10 classes)."""
    directory = Path(root or DEFAULT_ROOT)
    if not directory.is_dir():
        raise FileNotFoundError(f"fashion-mnist: directory {directory} does not exist; install the data with "
                                "`apt-get install dataset-fashion-mnist` or pass --root DIR holding the IDX files")
    fingerprint = Fingerprint("fashion-mnist")
    train = _read_split(directory, "train", fingerprint)
    val = _read_split(directory, "val", fingerprint)
    return validate_source(SourceDataset(name="fashion-mnist", class_names=list(CLASS_NAMES), channels=1,
                                         resolution=28, train=train, val=val, fingerprint=fingerprint.hexdigest(),
                                         origin=str(directory)))
