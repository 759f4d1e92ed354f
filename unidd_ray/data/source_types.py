"""The in-memory description of a dataset source: two labelled splits and their class names.

A source is either *array-backed* (``Split.images`` holds every image as ``(N, H, W, C)`` uint8)
or *file-backed* (``Split.paths`` lists image files that are decoded while the ``.beton`` is
written).  :func:`validate_source` enforces the invariants every reader must satisfy, so the
writer never has to second-guess its input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "val")


class SourceError(ValueError):
    """The files of a dataset source are missing pieces, corrupt, or inconsistent.

    A ``ValueError``, so callers may catch either; the message names the file (or class) and the fix.
    """


@dataclass
class Split:
    """One split (train or val) of a source.

    ``labels`` is ``(N,)`` int64.  Exactly one of ``images`` (``(N, H, W, C)`` uint8, array-backed
    sources) and ``paths`` (``N`` image files, file-backed sources) is set.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SourceDataset:
    """A labelled dataset with a train and a val split, as read by one of the registered sources.

    ``resolution`` is the side of the stored (square) images for array-backed sources; for
    file-backed sources it is the side the images are resized and centre-cropped to, or ``None``
    when the writer decides (images keep their aspect ratio, the longer side is capped by
    ``prepare_dataset(max_resolution=...)``).  ``fingerprint`` is a sha256 over the source's bytes
    (see each reader for what exactly is hashed); later stages use it to check that artifacts
    belong to the same data.
    """

    name: str
    class_names: list[str]
    channels: int
    resolution: int | None
    train: Split
    val: Split
    fingerprint: str
    origin: str = ""  # where the data came from (a directory or file), for messages
    options: dict = field(default_factory=dict)  # the reader options that shaped the splits

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def file_backed(self) -> bool:
        return self.train.paths is not None

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; a SourceDataset has the splits {list(SPLITS)}")
        return self.train if name == "train" else self.val


def check_label_range(labels: np.ndarray, num_classes: int, split: str, where: str) -> None:
    """Raise :class:`SourceError` naming the first out-of-range label of ``split`` and ``where`` it came from."""
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        value = int(labels[np.argmax(bad)])
        raise SourceError(f"{split} label {value} is out of range for {num_classes} classes (valid labels are "
                          f"0..{num_classes - 1}) in {where}; the file is corrupt or belongs to another dataset")


def check_nonempty_classes(labels: np.ndarray, class_names: list[str], split: str, where: str) -> None:
    """Raise :class:`SourceError` naming every class without a sample in ``split``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    empty = [class_names[k] for k in np.flatnonzero(counts == 0)]
    if empty:
        raise SourceError(f"{where}: the {split} split has no samples of class(es) {empty}; every class needs "
                         "at least one image in each split (remove the class or add images)")


def validate_source(source: SourceDataset) -> SourceDataset:
    """Check the invariants of a :class:`SourceDataset`; returns it unchanged.

    Raises :class:`SourceError` naming the source and what is wrong: label dtype/shape, labels out of
    range, a class without samples, arrays of the wrong dtype/shape, a split with both/neither of
    ``images`` and ``paths``, one split of arrays beside one of files, or image files declared with
    other than 3 channels (they are always decoded to RGB).
    """
    where = f"{source.name} source at {source.origin}" if source.origin else f"{source.name} source"
    if source.channels not in (1, 3):
        raise SourceError(f"{where}: images must have 1 or 3 channels, got {source.channels}")
    if len(set(source.class_names)) != len(source.class_names):
        raise SourceError(f"{where}: class names are not unique: {source.class_names}")
    for name in SPLITS:
        split = source.split(name)
        if (split.images is None) == (split.paths is None):
            raise SourceError(f"{where}: the {name} split must have exactly one of images= and paths=")
        labels = np.asarray(split.labels)
        if labels.ndim != 1 or labels.dtype != np.int64:
            raise SourceError(f"{where}: {name} labels must be a 1-D int64 array, got {labels.dtype} {labels.shape}")
        if split.images is not None:
            images = split.images
            expected = (len(labels), source.resolution, source.resolution, source.channels)
            if images.dtype != np.uint8 or images.shape != expected:
                raise SourceError(f"{where}: {name} images must be uint8 of shape {expected}, got "
                                 f"{images.dtype} {images.shape}")
        elif len(split.paths) != len(labels):
            raise SourceError(f"{where}: the {name} split has {len(split.paths)} files but {len(labels)} labels")
        check_label_range(labels, source.num_classes, name, where)
        check_nonempty_classes(labels, source.class_names, name, where)
    if (source.train.paths is None) != (source.val.paths is None):
        kinds = {name: "image files (paths=)" if source.split(name).paths is not None else "arrays (images=)"
                 for name in SPLITS}
        raise SourceError(f"{where}: the train split holds {kinds['train']} but the val split holds {kinds['val']}; "
                          "both splits must be arrays or both image files (load the files of one split into an "
                          "array, or write the arrays of the other as image files)")
    if source.file_backed and source.channels != 3:
        raise SourceError(f"{where}: image files are always decoded to RGB, so a file-backed source must declare "
                          f"channels=3, got {source.channels}")
    return source
