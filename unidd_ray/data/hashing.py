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

from unidd_ray.artifacts.files import sha256_file



class Fingerprint:
    """An incremental sha256 over named parts (files, arrays, option dicts)."""

    def __init__(self, kind: str):
        self._digest = hashlib.sha256(f"unidd_ray source {kind}\n".encode())

    def _part(self, tag: str, payload: bytes) -> None:
        self._digest.update(f"{tag} {len(payload)}\n".encode())
        self._digest.update(payload)

    def add_file(self, name: str, path: str | Path) -> None:
        """Hash a file under a stable ``name`` (its path relative to the source root)."""
        self._part(f"file {name}", bytes.fromhex(sha256_file(path)))

    def add_files(self, names: Iterable[str], paths: Iterable[str | Path], *, threads: int | None = None) -> None:
        """Hash many files in parallel (hashlib releases the GIL); the order of ``names`` is kept."""
        names, paths = list(names), list(paths)
        with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
            digests = list(pool.map(sha256_file, paths, chunksize=64))
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


def source_stat(origin: str | Path) -> str | None:
    """A cheap signature of the files of a source: sha256 over the relative path, size and modification
    time (ns) of every file under ``origin`` (or of ``origin`` itself when it is a file).

    Unlike a fingerprint it reads no file's bytes, so it can be taken on every run of a pipeline to tell
    whether a source may have changed since it was prepared: an equal signature means the same files
    untouched; a different one (also a file merely touched) calls for the real fingerprint.  ``None``
    when ``origin`` is not a path on disk (a source bundled with a library, such as ``digits``).
    """
    if not str(origin):
        return None
    root = Path(origin)
    if not root.exists():
        return None
    if root.is_file():
        entries = [(root.name, root)]
    else:
        entries = sorted((str(Path(dirpath, name).relative_to(root)), Path(dirpath, name))
                         for dirpath, _, names in os.walk(root) for name in names)
    digest = hashlib.sha256(b"unidd_ray source stat\n")
    for name, path in entries:
        try:
            st = path.stat()
        except OSError:  # a dangling link or a file removed while walking: part of the signature as such
            digest.update(f"{name}\0missing\n".encode())
            continue
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
