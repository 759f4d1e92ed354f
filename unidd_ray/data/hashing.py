"""Fingerprints of dataset sources: sha256 over the source's bytes, in a fixed order.

A source fingerprint covers the data files *and* the reader options that decide which sample lands
in which split (a seeded split fraction, a label file) or how it is resized (``resolution``), so two
sources with equal fingerprints hold the same samples.  The writer may still choose the stored
geometry itself (the side of small image files without a ``resolution`` option, the cap of JPEG
storage); :func:`stored_fingerprint` folds that choice in, and it is what ``dataset.json`` records,
so two raw-stored datasets with equal recorded fingerprints have the same ``.beton`` files.  JPEG
quality and write mode are recorded beside the fingerprint in ``dataset.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


class Fingerprint:
    """An incremental sha256 over named parts (files, arrays, option dicts)."""

    def __init__(self, kind: str):
        self._digest = hashlib.sha256(f"unidd_ray source {kind}\n".encode())

    def _part(self, tag: str, payload: bytes) -> None:
        self._digest.update(f"{tag} {len(payload)}\n".encode())
        self._digest.update(payload)

    def add_file(self, name: str, path: str | Path) -> None:
        """Hash a file under a stable ``name`` (its path relative to the source root)."""
        self._part(f"file {name}", bytes.fromhex(file_sha256(path)))

    def add_files(self, names: Iterable[str], paths: Iterable[str | Path], *, threads: int | None = None) -> None:
        """Hash many files in parallel (hashlib releases the GIL); the order of ``names`` is kept."""
        names, paths = list(names), list(paths)
        with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
            digests = list(pool.map(file_sha256, paths, chunksize=64))
        for name, digest in zip(names, digests):
            self._part(f"file {name}", bytes.fromhex(digest))

    def add_listing(self, names: Iterable[str], paths: Iterable[str | Path]) -> None:
        """Hash file names and sizes only (a cheap stand-in for content hashing of huge trees)."""
        for name, path in zip(names, paths):
            self._part(f"stat {name}", str(os.path.getsize(path)).encode())

    def add_array(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._part(f"array {name} {array.dtype.str} {array.shape}", array.tobytes())

    def add_options(self, options: dict) -> None:
        self._part("options", json.dumps(options, sort_keys=True, default=str).encode())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def stored_fingerprint(source_fingerprint: str, geometry: dict | None) -> str:
    """The fingerprint of a prepared dataset: the source's when the source fixed the stored geometry
    (``geometry`` is ``None``), else a sha256 over the source's fingerprint and ``geometry``, the
    stored side and size cap the writer chose (see :func:`unidd_ray.data.beton.writer_geometry`)."""
    if geometry is None:
        return source_fingerprint
    digest = hashlib.sha256(f"unidd_ray stored {source_fingerprint}\n".encode())
    digest.update(json.dumps(geometry, sort_keys=True).encode())
    return digest.hexdigest()
