"""A distilled set: lossless PNGs in an ImageFolder layout and ``manifest.parquet``, one row per image.

Layout of a set directory::

    images/<class:04d>/<slot:04d>.png   manifest.parquet   summary.json   config.yaml   manifest.json

A row of ``manifest.parquet`` names the image's ``class``, ``class_name``, ``slot``, ``path``, ``sha256``,
``source_index`` (the real train image it started from), ``method`` and ``seed``, and for a recovered set its
``beta``, batch, worker and final loss parts; rows are sorted by class, then slot, and an image's row is its id
in an evaluation.  ``manifest.json`` holds the sha256 of every file; :func:`load_distilled` and
:func:`iter_distilled` verify them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from unidd_ray.artifacts.files import (atomic_write_bytes, atomic_write_json, atomic_write_text, read_manifest,
                                       write_manifest)

KIND = "distilled"
IMAGES = "images"
TABLE = "manifest.parquet"
BETON = "distilled.beton"


def image_path(cls: int, slot: int) -> str:
    """Where the image of ``cls`` at IPC slot ``slot`` is kept, relative to the set."""
    return f"{IMAGES}/{cls:04d}/{slot:04d}.png"


def to_png_bytes(image: torch.Tensor, mean, std) -> bytes:
    """Lossless 8-bit PNG of one normalised (C, H, W) image."""
    mean = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    pixels = ((image.cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    mode = "L" if array.shape[2] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image(directory: str | Path, cls: int, slot: int, data: bytes) -> str:
    """Write one image's PNG bytes (atomically) into the set being built in ``directory``; returns its path."""
    rel = image_path(cls, slot)
    atomic_write_bytes(Path(directory) / rel, data)
    return rel


def publish(directory: str | Path, rows: list[dict], *, summary: dict, config_text: str, method: str, ipc: int,
            dataset_fingerprint: str) -> None:
    """Finish the set being built in ``directory``: ``manifest.parquet`` (rows sorted by class, slot), its
    ``summary.json`` and ``config.yaml``, then ``manifest.json`` with every file's sha256 (written last: its
    presence marks a finished set)."""
    directory = Path(directory)
    rows = sorted(rows, key=lambda r: (r["class"], r["slot"]))
    pq.write_table(pa.Table.from_pylist(rows), directory / TABLE)
    atomic_write_json(directory / "summary.json", summary)
    atomic_write_text(directory / "config.yaml", config_text)
    write_manifest(directory, KIND, method=method, ipc=ipc, dataset_fingerprint=dataset_fingerprint)


def verify(directory: str | Path) -> dict:
    """The set's ``manifest.json``, every file's checksum verified (``ArtifactError`` naming one that fails)."""
    return read_manifest(directory, KIND)


def manifest(directory: str | Path) -> dict:
    """The set's ``manifest.json``, unverified (for a set verified already)."""
    return read_manifest(directory, KIND, verify=False)


def read_rows(directory: str | Path, columns: list[str] | None = None) -> list[dict]:
    """The rows of the set's ``manifest.parquet`` (every column, or ``columns``)."""
    return pq.read_table(Path(directory) / TABLE, columns=columns).to_pylist()


def count(directory: str | Path) -> int:
    """How many images the set holds (read from ``manifest.parquet``'s metadata)."""
    return pq.read_metadata(Path(directory) / TABLE).num_rows


def identity_inputs(directory: str | Path, recorded: dict | None = None) -> tuple[list[dict], dict[str, str]]:
    """What :func:`unidd_ray.keys.distilled_identity` reads of a set: its rows' paths and classes, and its
    manifest's checksums (``recorded``: the manifest, when read already)."""
    files = (recorded or manifest(directory))["files"]
    return read_rows(directory, ["path", "class"]), files


def iter_distilled(directory: str | Path, *, mean, std,
                   chunk: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    """The images (normalised float32 NCHW), labels and rows of a set, ``chunk`` consecutive rows of
    ``manifest.parquet`` at a time, every checksum verified first (when called, before the first chunk is read):
    the memory it takes is that of one chunk, not the set's."""
    directory = Path(directory)
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    verify(directory)
    rows = read_rows(directory)
    if not rows:
        raise ValueError(f"{directory} holds no images")
    return _chunks(directory, rows, mean, std, int(chunk))


def _chunks(directory: Path, rows: list[dict], mean, std,
            chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        x = torch.from_numpy(np.stack(read_arrays(directory, part))).permute(0, 3, 1, 2).float() / 255
        yield (x - m) / s, torch.tensor([r["class"] for r in part], dtype=torch.long), part


def load_distilled(directory: str | Path, *, mean, std) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Images (normalised float32 NCHW), labels and rows of a set, every checksum verified first: the whole set
    at once (:func:`iter_distilled` reads it a chunk at a time)."""
    images, labels, rows = zip(*iter_distilled(directory, mean=mean, std=std))
    return torch.cat(images), torch.cat(labels), [r for part in rows for r in part]


def read_arrays(directory: str | Path, rows: list[dict]) -> list[np.ndarray]:
    """The uint8 (H, W, C) pixels of ``rows``' images."""
    arrays = []
    for r in rows:
        with Image.open(Path(directory) / r["path"]) as im:
            a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    return arrays
