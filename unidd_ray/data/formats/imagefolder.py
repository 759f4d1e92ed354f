"""Image folders in the ImageNet-1K / Imagenette layout.

``root/train/<class>/<image>`` for training; for validation either the same layout
(``root/val/<class>/<image>``) or ImageNet's flat folder ``root/val/<image>`` plus a label file given
as the option ``val_labels=PATH``.  Class names are the sorted ``train`` sub-folder names (for
ImageNet, the WordNet ids ``n01440764`` ...), and a label is the position of its class in that list.

The label file is text, one entry per line; blank lines, ``#`` comments and a header line
starting with ``ImageId`` are skipped.  Two forms are accepted (not mixed):

- ``<file> <class>`` -- the image file name (with or without extension), then its class as a
  class *name* (e.g. ``n01751748``) or a 0-based class *index*, separated by whitespace or a
  comma.  Later tokens on the line are ignored, so Kaggle's ``LOC_val_solution.csv`` works as is.
- ``<index>`` alone -- one 0-based class index per line, for the val images in sorted file-name
  order.  Note: ImageNet's devkit file ``ILSVRC2012_validation_ground_truth.txt`` uses 1-based
  ILSVRC ids, which are *not* in sorted-WordNet-id order; convert it to the first form instead.

Images are decoded with PIL and converted to RGB while the ``.beton`` is written.  Option
``resolution=N`` resizes every image (shorter side to ``N``, then a central ``N x N`` crop);
without it the images keep their aspect ratio and the writer caps the longer side.  Fingerprint
(option ``fingerprint``): ``"content"`` (default) hashes every image's bytes; ``"listing"``
hashes only file names and sizes (fast for the 1.3 M ImageNet files).  The labels of both
splits and the ``resolution`` option are always included.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from unidd_ray.data.hashing import Fingerprint
from unidd_ray.data.image_files import list_images
from unidd_ray.data.source_types import SourceDataset, SourceError, Split, check_label_range, validate_source

_SEPARATOR = re.compile(r"[,\s]+")


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_folders(split_dir: Path, class_names: list[str], split: str) -> tuple[list[str], np.ndarray]:
    """Files and labels of a ``<split>/<class>/<image>`` tree; every class folder must hold images."""
    paths: list[str] = []
    labels: list[int] = []
    for k, name in enumerate(class_names):
        files = list_images(split_dir / name)
        if not files:
            raise SourceError(f"imagefolder: class {name!r} has no images in {split_dir / name}; every class "
                              f"needs at least one {split} image (remove the folder or add images)")
        paths.extend(str(f) for f in files)
        labels.extend([k] * len(files))
    return paths, np.asarray(labels, dtype=np.int64)


def _check_same_classes(train_classes: list[str], val_classes: list[str], val_dir: Path) -> None:
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    if only_train or only_val:
        raise SourceError(f"imagefolder: train and val classes differ in {val_dir.parent}: only in train {only_train}, "
                          f"only in val {only_val}; both splits need the same class folders")


def _parse_label_file(path: Path, files: list[Path], class_names: list[str]) -> np.ndarray:
    """Labels for the sorted flat val ``files`` from a label file (see the module docstring)."""
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        is_header = not lines and text.lower().startswith("imageid")
        if text and not text.startswith("#") and not is_header:
            lines.append((number, [t for t in _SEPARATOR.split(text) if t]))
    if not lines:
        raise SourceError(f"imagefolder: label file {path} has no entries")
    forms = {len(tokens) == 1 for _, tokens in lines}
    if len(forms) > 1:
        raise SourceError(f"imagefolder: label file {path} mixes '<index>' lines and '<file> <class>' lines; "
                          "use one form")
    index_of = {name: k for k, name in enumerate(class_names)}

    def class_index(token: str, number: int) -> int:
        if token in index_of:
            return index_of[token]
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        raise SourceError(f"imagefolder: unknown class {token!r} on line {number} of {path}; classes are the train "
                          f"folder names ({class_names[:3]}...) or 0-based indices")

    if forms == {True}:
        if len(lines) != len(files):
            raise SourceError(f"imagefolder: label file {path} has {len(lines)} index lines but {files[0].parent} "
                              f"holds {len(files)} images; one line per image (sorted by file name) is needed")
        labels = np.asarray([class_index(tokens[0], n) for n, tokens in lines], dtype=np.int64)
    else:
        by_name: dict[str, int] = {}
        for number, tokens in lines:
            by_name[tokens[0]] = class_index(tokens[1], number)
        labels = np.empty(len(files), dtype=np.int64)
        unlabelled = []
        for i, file in enumerate(files):
            label = by_name.pop(file.name, None)
            stem_label = by_name.pop(file.stem, None)
            label = label if label is not None else stem_label
            if label is None:
                unlabelled.append(file.name)
            else:
                labels[i] = label
        if unlabelled:
            raise SourceError(f"imagefolder: {len(unlabelled)} val image(s) have no entry in {path}, e.g. "
                              f"{unlabelled[:3]}")
        if by_name:
            raise SourceError(f"imagefolder: {path} labels {len(by_name)} file(s) that are not in {files[0].parent}, "
                              f"e.g. {sorted(by_name)[:3]}")
    check_label_range(labels, len(class_names), "val", str(path))
    return labels


def load(root: str | None = None, *, val_labels: str | None = None, resolution: int | None = None,
         fingerprint: str = "content") -> SourceDataset:
    """Read an image-folder dataset at ``root`` (see the module docstring for the layout)."""
    if root is None:
        raise FileNotFoundError("imagefolder: no data directory given; pass --root DIR holding train/ and val/")
    base = Path(root)
    train_dir, val_dir = base / "train", base / "val"
    for directory in (train_dir, val_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f"imagefolder: {directory} does not exist; --root must hold train/<class>/ "
                                    "and val/ (class folders, or flat images with val_labels=PATH)")
    if fingerprint not in ("content", "listing"):
        raise ValueError(f"imagefolder: fingerprint must be 'content' or 'listing', got {fingerprint!r}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"imagefolder: resolution must be a positive side length, got {resolution}")
    class_names = [d.name for d in _subdirs(train_dir)]
    if not class_names:
        raise SourceError(f"imagefolder: {train_dir} has no class folders; expected train/<class>/<image>")
    train_paths, train_labels = _class_folders(train_dir, class_names, "train")
    val_classes = [d.name for d in _subdirs(val_dir)]
    if val_classes:
        if val_labels is not None:
            raise SourceError(f"imagefolder: {val_dir} has class folders, so val_labels={val_labels} is not used; "
                              "drop the option (it is for a flat val folder)")
        _check_same_classes(class_names, val_classes, val_dir)
        val_paths, val_label_array = _class_folders(val_dir, class_names, "val")
    else:
        files = list_images(val_dir)
        if not files:
            raise SourceError(f"imagefolder: {val_dir} holds neither class folders nor images")
        if val_labels is None:
            raise SourceError(f"imagefolder: {val_dir} is a flat folder of images; pass the option "
                              "val_labels=PATH (a label file, see unidd_ray.data.formats.imagefolder)")
        label_file = Path(val_labels)
        if not label_file.is_file():
            raise FileNotFoundError(f"imagefolder: label file {label_file} (option val_labels) does not exist")
        val_label_array = _parse_label_file(label_file, files, class_names)
        val_paths = [str(f) for f in files]
    digest = Fingerprint("imagefolder")
    all_paths = train_paths + val_paths
    names = [str(Path(p).relative_to(base)) for p in all_paths]
    if fingerprint == "content":
        digest.add_files(names, all_paths)
    else:
        digest.add_listing(names, all_paths)
    digest.add_array("train_labels", train_labels)
    digest.add_array("val_labels", val_label_array)
    options = {"resolution": resolution, "fingerprint": fingerprint}
    digest.add_options({"resolution": resolution})
    return validate_source(SourceDataset(
        name=base.name or "imagefolder", class_names=class_names, channels=3, resolution=resolution,
        train=Split(labels=train_labels, paths=train_paths), val=Split(labels=val_label_array, paths=val_paths),
        fingerprint=digest.hexdigest(), origin=str(base), options=options))
