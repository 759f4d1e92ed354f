"""Writers of small fake datasets in the real on-disk formats (helpers for the data tests; no tests here).

Every file is produced the way the real one is: gzip-compressed IDX with the official magic numbers,
CIFAR batches pickled (protocol 2, ``bytes`` keys as in the official Python 2 files) from the same
dict layout, JPEG/PNG files written by PIL, and ``.npz`` files written by ``np.savez``.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (unsigned bytes) holding ``array``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fashion_mnist(root: Path, *, n_train: int = 30, n_val: int = 20, seed: int = 0) -> dict:
    """The four gzip IDX files of Fashion-MNIST with random 28 x 28 images; returns the arrays."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
        arrays[prefix] = (images, labels)
    return arrays


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def cifar_batch(images: np.ndarray, labels: list[int], label_key: bytes) -> dict:
    """A batch dict in the official layout: ``data`` rows are the R, G and B planes of each image."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return {b"batch_label": b"fake batch", label_key: list(labels), b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}


def _py2_pickle_body(obj) -> bytes:
    if isinstance(obj, bytes):  # a Python 2 str: SHORT_BINSTRING or BINSTRING
        return (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<i", len(obj))) + obj
    if isinstance(obj, int):
        return b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    if isinstance(obj, list):
        return b"]" + (b"(" + b"".join(map(_py2_pickle_body, obj)) + b"e" if obj else b"")
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2_pickle_body(k) + _py2_pickle_body(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 2:
        shape = b"".join(_py2_pickle_body(n) for n in obj.shape) + b"\x86"
        dtype = (b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
                 b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
                b"(K\x01" + shape + dtype + b"\x89" + _py2_pickle_body(obj.tobytes()) + b"tb")
    raise TypeError(f"no Python 2 pickle form for {type(obj).__name__} here")


def py2_pickle(obj) -> bytes:
    """``obj`` (a dict/list of bytes, small ints and 2-D uint8 arrays) pickled the way Python 2's cPickle
    (protocol 2) and numpy 1.x wrote the official CIFAR batches: byte strings as ``str`` opcodes, the
    dtype built from ``('u1', 0, 1)`` with byte order ``'|'`` as a Python 2 ``str``."""
    return b"\x80\x02" + _py2_pickle_body(obj) + b"."


def _pickle_py2(path: Path, obj) -> None:
    path.write_bytes(py2_pickle(obj))


def write_cifar10(root: Path, *, per_batch: int = 10, seed: int = 0, python2: bool = False) -> dict:
    """``root/cifar-10-batches-py`` with five train batches, a test batch and ``batches.meta``.

    ``python2``: write every file in the byte form of the official Python 2 pickles (:func:`py2_pickle`).
    """
    dump = _pickle_py2 if python2 else _pickle
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    out = {"train": [], "val": []}
    for file_name, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "val")]:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [int(k) for k in rng.permutation(np.arange(per_batch) % 10)]
        dump(folder / file_name, cifar_batch(images, labels, b"labels"))
        out[split].append((images, labels))
    return out


def write_cifar100(root: Path, *, seed: int = 0) -> dict:
    """``root/cifar-100-python`` with ``train`` (200 images), ``test`` (100) and ``meta``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    _pickle(folder / "meta", {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                              b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]})
    out = {}
    for file_name, n in (("train", 200), ("test", 100)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = [k % 100 for k in range(n)]
        batch = cifar_batch(images, fine, b"fine_labels")
        batch[b"coarse_labels"] = [k // 5 for k in fine]
        _pickle(folder / file_name, batch)
        out[file_name] = (images, fine)
    return out


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-looking RGB image: upsampled low-resolution noise plus a little grain."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(path: Path, image: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(image).save(path, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(path, format="PNG")


def write_imagefolder(root: Path, *, classes=("cat", "dog", "eel"), per_class=(3, 2), sizes=((40, 56), (70, 50)),
                      flat_val: bool = False, seed: int = 0) -> dict:
    """``root/train/<class>/*.JPEG`` (+ a PNG) and ``root/val/<class>/*`` or a flat ``root/val`` + labels file.

    Returns ``{"train": [(path, label)], "val": [(path, label)], "labels_file": path or None}``.
    """
    rng = np.random.default_rng(seed)
    out: dict = {"train": [], "val": [], "labels_file": None}
    for split, count in zip(("train", "val"), per_class):
        for k, name in enumerate(classes):
            for i in range(count):
                height, width = sizes[(i + k) % len(sizes)]
                ext = ".png" if (split, i) == ("train", 0) and k == 0 else ".JPEG"
                if split == "val" and flat_val:
                    path = root / "val" / f"val_{k:02d}_{i:02d}{ext}"
                else:
                    path = root / split / name / f"{name}_{i:02d}{ext}"
                write_image(path, smooth_image(rng, height, width))
                out[split].append((path, k))
    if flat_val:
        labels_file = root / "val_labels.txt"
        entries = sorted(out["val"], key=lambda item: item[0].name)
        labels_file.write_text("".join(f"{p.name} {classes[k]}\n" for p, k in entries))
        out["labels_file"] = labels_file
    return out


def write_tiny_imagenet(root: Path, *, wnids=("n02", "n01", "n03"), per_class: int = 3, val_per_class: int = 2,
                        seed: int = 0) -> dict:
    """The tiny-imagenet-200 layout with 64 x 64 JPEGs; returns the file lists per split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}, other name\n" for w in wnids))
    out: dict = {"train": [], "val": []}
    for w in wnids:
        for i in range(per_class):
            path = root / "train" / w / "images" / f"{w}_{i}.JPEG"
            write_image(path, smooth_image(rng, 64, 64))
            out["train"].append((path, w))
    lines = []
    for i in range(val_per_class * len(wnids)):
        w = wnids[i % len(wnids)]
        path = root / "val" / "images" / f"val_{i}.JPEG"
        write_image(path, smooth_image(rng, 64, 64))
        lines.append(f"{path.name}\t{w}\t0\t0\t63\t63\n")
        out["val"].append((path, w))
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return out
