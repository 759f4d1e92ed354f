"""Tiny ImageNet (200 classes, 64 x 64 RGB) in its official layout, loaded into arrays.

``root/wnids.txt`` lists the class WordNet ids, ``root/words.txt`` (optional) maps ids to names,
``root/train/<wnid>/images/*.JPEG`` holds the 500 training images per class and
``root/val/images/*.JPEG`` the 10,000 val images, labelled by ``root/val/val_annotations.txt``
(tab-separated: file name, wnid, then a bounding box that is ignored).  The unlabelled ``test``
folder is not used.  Classes are the sorted wnids; ``class_names`` are the first name of each
``words.txt`` entry (the wnid when the file is absent).  Fingerprint: the bytes of every image and
of the two text files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unidd_ray.data.hashing import Fingerprint
from unidd_ray.data.image_files import decode_fixed_size, list_images
from unidd_ray.data.source_types import SourceDataset, SourceError, Split, validate_source

SIDE = 64


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _class_names(root: Path, wnids: list[str]) -> list[str]:
    words = root / "words.txt"
    if not words.is_file():
        return list(wnids)
    mapping = {}
    for line in _read_lines(words):
        wnid, _, text = line.partition("\t")
        mapping[wnid] = text.split(",")[0].strip() or wnid
    names = [mapping.get(w, w) for w in wnids]
    # distinct WordNet ids can share a first name; keep names unique by appending the id
    return [n if names.count(n) == 1 else f"{n} ({w})" for n, w in zip(names, wnids)]


def _train_files(root: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"tiny-imagenet: {train_dir} does not exist; --root must be the extracted "
                                "tiny-imagenet-200 folder")
    folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing, extra = sorted(set(wnids) - set(folders)), sorted(set(folders) - set(wnids))
    if missing or extra:
        raise SourceError(f"tiny-imagenet: the class folders of {train_dir} do not match wnids.txt: "
                          f"missing {missing}, not listed {extra}")
    paths: list[Path] = []
    labels: list[int] = []
    for k, wnid in enumerate(wnids):
        folder = train_dir / wnid / "images"
        files = list_images(folder) if folder.is_dir() else []
        if not files:
            raise SourceError(f"tiny-imagenet: class {wnid!r} has no images in {folder}; the download is "
                              "incomplete")
        paths.extend(files)
        labels.extend([k] * len(files))
    return paths, np.asarray(labels, dtype=np.int64)


def _val_files(root: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"tiny-imagenet: {annotations} is missing; --root must be the extracted "
                                "tiny-imagenet-200 folder")
    index_of = {w: k for k, w in enumerate(wnids)}
    entries = []
    unknown = set()
    for number, line in enumerate(_read_lines(annotations), 1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise SourceError(f"tiny-imagenet: line {number} of {annotations} is not "
                              f"'<file>\\t<wnid>\\t...': {line!r}")
        if fields[1] not in index_of:
            unknown.add(fields[1])
        entries.append((fields[0], fields[1]))
    if unknown:
        raise SourceError(f"tiny-imagenet: {annotations} uses classes not in wnids.txt: {sorted(unknown)}")
    entries.sort()
    paths = [root / "val" / "images" / name for name, _ in entries]
    absent = [p.name for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"tiny-imagenet: {len(absent)} val image(s) listed in {annotations} are missing "
                                f"from {root / 'val' / 'images'}, e.g. {absent[:3]}")
    return paths, np.asarray([index_of[w] for _, w in entries], dtype=np.int64)


def load(root: str | None = None) -> SourceDataset:
    """Read Tiny ImageNet at ``root`` (the extracted ``tiny-imagenet-200`` folder) into arrays."""
    if root is None:
        raise FileNotFoundError("tiny-imagenet: no data directory given; pass --root DIR (the extracted "
                                "tiny-imagenet-200 folder holding wnids.txt)")
    base = Path(root)
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise FileNotFoundError(f"tiny-imagenet: {wnids_file} is missing; --root must be the extracted "
                                "tiny-imagenet-200 folder")
    wnids = sorted(set(_read_lines(wnids_file)))
    train_paths, train_labels = _train_files(base, wnids)
    val_paths, val_labels = _val_files(base, wnids)
    class_names = _class_names(base, wnids)
    digest = Fingerprint("tiny-imagenet")
    text_files = [p for p in (wnids_file, base / "words.txt", base / "val" / "val_annotations.txt") if p.is_file()]
    all_paths = text_files + train_paths + val_paths
    digest.add_files([str(p.relative_to(base)) for p in all_paths], all_paths)
    return validate_source(SourceDataset(
        name="tiny-imagenet", class_names=class_names, channels=3, resolution=SIDE,
        train=Split(labels=train_labels, images=decode_fixed_size(train_paths, SIDE)),
        val=Split(labels=val_labels, images=decode_fixed_size(val_paths, SIDE)),
        fingerprint=digest.hexdigest(), origin=str(base)))
