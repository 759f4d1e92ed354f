"""CIFAR-10 and CIFAR-100 from the official "python version" pickle batches.

CIFAR-10 (``cifar-10-batches-py/``): ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch``
(val), ``batches.meta`` (``label_names``).  CIFAR-100 (``cifar-100-python/``): ``train``, ``test``,
``meta`` (``fine_label_names``); the 100 fine labels are used.  Each batch is a dict with ``data``,
a ``(N, 3072)`` uint8 array holding the red, green and blue 32 x 32 planes of each image, and the
labels as a list of ints.  ``root`` is the directory holding these files or its parent.  The
pickles are read with :func:`~unidd_ray.data.safe_pickle.load_restricted_pickle`, so a file
supplied by someone else cannot run code.  Fingerprint: the bytes of every file read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unidd_ray.data.hashing import Fingerprint
from unidd_ray.data.safe_pickle import load_restricted_pickle
from unidd_ray.data.source_types import SourceDataset, SourceError, Split, check_label_range, validate_source

_LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "val": ["test_batch"], "meta": "batches.meta", "names": "label_names", "labels": "labels",
                "classes": 10},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "val": ["test"], "meta": "meta",
                 "names": "fine_label_names", "labels": "fine_labels", "classes": 100},
}


def _text(value, path: Path) -> str:
    """A key or class name as text: Python 2 pickles hold UTF-8 bytes; anything else is a corrupt file."""
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes):
        raise SourceError(f"{path}: expected text, found a {type(value).__name__}; the file is corrupt")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: {value[:40]!r} is not UTF-8 text ({exc.reason}); the file is corrupt") from None


def _load_dict(path: Path) -> dict:
    """A batch/meta pickle as a dict with ``str`` keys (Python 2 pickles have ``bytes`` keys)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the CIFAR python version must be complete (extract the "
                                "whole archive)")
    data = load_restricted_pickle(path)
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a CIFAR batch: it holds a {type(data).__name__}, not a dict")
    return {_text(key, path): value for key, value in data.items()}


def _field(batch: dict, key: str, path: Path):
    if key not in batch:
        raise SourceError(f"{path} is not a CIFAR batch of this dataset: key {key!r} is missing "
                          f"(found {sorted(batch)})")
    return batch[key]


def _integer_labels(labels, path: Path, key: str) -> np.ndarray:
    """``labels`` (a list of ints, or an integer array) as int64; floats, bools and other values are refused."""
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu":
            raise SourceError(f"{path}: {key!r} must hold integers, got an array of {labels.dtype}; the file is corrupt")
    elif isinstance(labels, list):
        for i, value in enumerate(labels):
            if type(value) is not int and not isinstance(value, np.integer):  # bool is an int subclass: refused
                raise SourceError(f"{path}: {key!r} must be a list of integers, but entry {i} is "
                                  f"{type(value).__name__} {value!r}; the file is corrupt")
    else:
        raise SourceError(f"{path}: {key!r} must be a list of integers, got a {type(labels).__name__}; the file is "
                          "corrupt")
    try:
        return np.asarray(labels, dtype=np.int64)
    except OverflowError as exc:
        raise SourceError(f"{path}: {key!r} holds an integer beyond int64 ({exc}); the file is corrupt") from exc


def _read_batch(path: Path, split: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_dict(path)
    data = _field(batch, "data", path)
    labels = _field(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise SourceError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got "
                          f"{getattr(data, 'dtype', type(data).__name__)} {shape}; the file is corrupt")
    labels = _integer_labels(labels, path, label_key)
    if labels.shape != (len(data),):
        raise SourceError(f"{path}: {len(data)} images but {labels.shape} labels under {label_key!r}")
    check_label_range(labels, num_classes, split, str(path))
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _resolve_root(root: str | None, name: str, folder: str, probe: str) -> Path:
    if root is None:
        raise FileNotFoundError(f"{name}: no data directory given; pass --root DIR pointing at {folder}/ (from "
                                f"the official python-version archive) or at its parent")
    base = Path(root)
    for candidate in (base, base / folder):
        if (candidate / probe).is_file():
            return candidate
    raise FileNotFoundError(f"{name}: neither {base} nor {base / folder} holds {probe}; pass --root pointing at "
                            f"{folder}/ or at its parent")


def _load(name: str, root: str | None) -> SourceDataset:
    layout = _LAYOUTS[name]
    directory = _resolve_root(root, name, layout["folder"], layout["meta"])
    fingerprint = Fingerprint(name)
    meta_path = directory / layout["meta"]
    names = _field(_load_dict(meta_path), layout["names"], meta_path)
    if not isinstance(names, list):
        raise SourceError(f"{meta_path}: {layout['names']!r} must be a list of class names, got a "
                          f"{type(names).__name__}; the file is corrupt")
    names = [_text(n, meta_path) for n in names]
    if len(names) != layout["classes"]:
        raise SourceError(f"{meta_path}: expected {layout['classes']} names under {layout['names']!r}, got "
                          f"{len(names)}; the file belongs to another dataset")
    fingerprint.add_file(layout["meta"], meta_path)
    splits = {}
    for split in ("train", "val"):
        parts = []
        for file_name in layout[split]:
            path = directory / file_name
            parts.append(_read_batch(path, split, layout["labels"], layout["classes"]))
            fingerprint.add_file(file_name, path)
        splits[split] = Split(labels=np.concatenate([p[1] for p in parts]),
                              images=np.concatenate([p[0] for p in parts]))
    return validate_source(SourceDataset(name=name, class_names=names, channels=3, resolution=32,
                                         train=splits["train"], val=splits["val"],
                                         fingerprint=fingerprint.hexdigest(), origin=str(directory)))


def load_cifar10(root: str | None = None) -> SourceDataset:
    """CIFAR-10: 50,000 train / 10,000 val images, 32 x 32 RGB, 10 classes."""
    return _load("cifar10", root)


def load_cifar100(root: str | None = None) -> SourceDataset:
    """CIFAR-100: 50,000 train / 10,000 val images, 32 x 32 RGB, 100 fine classes."""
    return _load("cifar100", root)
