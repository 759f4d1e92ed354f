"""The prepared dataset: its card (``dataset.json``), its labels, and the check of its files.

A prepared directory holds ``train.beton``, ``val.beton``, ``labels.npz`` and ``dataset.json``;
``dataset.json`` is written last, so its presence marks a complete directory.  Its keys:

``name``, ``num_classes``, ``class_names``, ``splits`` (``{"train": {"count", "per_class"}, "val":
{...}}``), ``resolution`` (default side of the loader's output images), ``channels``, ``mean`` and
``std`` (per channel, over the train images in [0, 1], float64), ``storage`` (``"raw"`` uint8
arrays or ``"jpeg"`` FFCV RGB images), ``write_mode`` (``"raw"``, or FFCV's ``"jpg"`` /
``"proportion"`` for JPEG storage), ``max_resolution`` and ``jpeg_quality`` (JPEG storage),
``eval_crop_ratio`` (the centre-crop ratio of the eval pipeline for JPEG storage), ``fingerprint``
(the source's, extended by the stored geometry when the writer chose it: see
:func:`unidd_ray.data.hashing.stored_fingerprint`), ``source`` (origin, reader options and the
source's own fingerprint), ``format_version``, ``files`` (``{file name: {"sha256", "bytes",
"chunk_bytes", "chunks"}}`` for the two ``.beton`` files and ``labels.npz``: the whole file's sha256 and
that of every ``chunk_bytes`` piece) and ``info_sha256``, the sha256 of every other key (so an edited
``mean`` or ``num_classes`` is refused).

Checking a dataset before a stage reads it (:func:`verify_dataset`) hashes the pieces of each file in
parallel threads and names the damaged byte ranges; with SHA extensions a core hashes about 1.2 GB/s
(0.8 s per GB and core, ~20 s for a 40 GB ImageNet file on 2 cores of page-cached data; a cold disk
bounds it by its read rate).  A process checks a file once while its size, inode and times stay the
same.  Datasets prepared before the pieces were recorded are checked whole (one thread).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from unidd_ray.artifacts.files import atomic_write_json, sha256_file

FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
# Written beside dataset.json by the pipeline: the stat signature of the source when it was last checked
# (unidd_ray.data.hashing.source_stat), so a re-run reads the source's bytes again only when files changed.
SOURCE_STAT_FILE = "source-stat.json"
LABELS_FILE = "labels.npz"
BETON_FILES = {"train": "train.beton", "val": "val.beton"}
STORAGES = ("raw", "jpeg")
CHUNK_BYTES = 64 << 20  # the pieces whose sha256 dataset.json records: checked in parallel, damage located


class DamagedDataset(ValueError):
    """A prepared dataset's files no longer hold what was prepared (modified, truncated, edited)."""


@dataclass
class DatasetInfo:
    """The content of ``dataset.json`` (see the module docstring for each key)."""

    name: str
    num_classes: int
    class_names: list[str]
    splits: dict[str, dict]
    resolution: int
    channels: int
    mean: list[float]
    std: list[float]
    storage: str
    fingerprint: str
    files: dict[str, dict]
    format_version: int = FORMAT_VERSION
    write_mode: str = "raw"
    max_resolution: int | None = None
    jpeg_quality: int | None = None
    eval_crop_ratio: float = 1.0
    source: dict = field(default_factory=dict)

    def count(self, split: str) -> int:
        """Number of samples in ``split``."""
        return int(self.splits[split]["count"])

    def to_json(self) -> dict:
        """The content of ``dataset.json``: every field and ``info_sha256``, their checksum."""
        data = asdict(self)
        return {**data, "info_sha256": content_sha256(data)}

    def rebuild_hint(self, data_dir: str | Path) -> str:
        """How to prepare this dataset again into ``data_dir``."""
        command = ["unidd-ray prepare", f"--dataset {self.name}"]
        origin = self.source.get("origin")
        if origin and Path(origin).exists():  # (a source bundled with a library has a name, not a folder)
            command.append(f"--root {origin}")
        command += [f"--option {k}={v}" for k, v in (self.source.get("options") or {}).items()]
        command.append(f"--out {data_dir}")
        return f"prepare it again: `{' '.join(command)}` (a pipeline run prepares it again by itself)"


def content_sha256(data: dict) -> str:
    """The checksum ``dataset.json`` records of its other keys (canonical JSON: sorted keys)."""
    body = {k: v for k, v in data.items() if k != "info_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_record(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """What ``dataset.json`` records of one file: its sha256, its size and the sha256 of every piece."""
    whole, pieces = hashlib.sha256(), []
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            whole.update(block)
            pieces.append(hashlib.sha256(block).hexdigest())
    return {"sha256": whole.hexdigest(), "bytes": Path(path).stat().st_size, "chunk_bytes": chunk_bytes,
            "chunks": pieces}


def beton_path(data_dir: str | Path, split: str) -> Path:
    """Path of the ``.beton`` file of ``split`` (``"train"`` or ``"val"``) in a prepared directory."""
    if split not in BETON_FILES:
        raise ValueError(f"unknown split {split!r}; a prepared dataset has the splits {list(BETON_FILES)}")
    return Path(data_dir) / BETON_FILES[split]


def read_dataset_info(data_dir: str | Path) -> DatasetInfo:
    """Read ``dataset.json`` of a prepared directory.

    Raises ``FileNotFoundError`` when the directory or its ``dataset.json`` is missing (the
    directory was never prepared or preparation did not finish) and ``ValueError`` when the file is
    corrupt, lacks keys, or has another format version.
    """
    path = Path(data_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {data_dir} is not a prepared dataset (or its preparation did "
                                "not finish); run `unidd-ray prepare` (unidd_ray.data.prepare.prepare_dataset) first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt ({exc}); prepare the dataset again") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt: it holds a {type(data).__name__}, not an object; prepare it again")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {data.get('format_version')!r}; this unidd_ray reads version "
                         f"{FORMAT_VERSION}: prepare the dataset again")
    known = {f.name for f in fields(DatasetInfo)}
    required = {"name", "num_classes", "class_names", "splits", "resolution", "channels", "mean", "std", "storage",
                "fingerprint", "files"}
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{path} lacks the key(s) {missing}; it was not written by prepare_dataset: prepare again")
    recorded = data.get("info_sha256")
    if recorded is not None and recorded != content_sha256(data):
        raise DamagedDataset(f"{path} was edited after it was written (its info_sha256 no longer matches its "
                             f"content): its mean, classes or files cannot be trusted; prepare the dataset again")
    info = DatasetInfo(**{k: v for k, v in data.items() if k in known})
    if info.storage not in STORAGES:
        raise ValueError(f"{path}: unknown storage {info.storage!r} (expected one of {list(STORAGES)})")
    return info


_VERIFIED: dict[tuple, str] = {}  # (path, device, inode, size, mtime, ctime) -> sha256, checked in this process
_VERIFIED_LOCK = threading.Lock()


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _piece_sha256(path: Path, index: int, size: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, end = index * size, (index + 1) * size
        while offset < end:
            block = os.pread(fd, min(4 << 20, end - offset), offset)
            if not block:
                break
            digest.update(block)
            offset += len(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _damaged_pieces(path: Path, record: dict, threads: int) -> list[int]:
    size = int(record["chunk_bytes"])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        digests = list(pool.map(lambda i: _piece_sha256(path, i, size), range(len(record["chunks"]))))
    return [i for i, (got, want) in enumerate(zip(digests, record["chunks"])) if got != want]


def verify_file(path: str | Path, record: dict, *, threads: int | None = None) -> None:
    """Check one file against its ``dataset.json`` record (size, then the sha256 of every piece, in
    parallel; the whole file's sha256 for records without pieces).  Raises :class:`DamagedDataset` naming
    the file and the damaged byte ranges; a file checked before in this process and untouched since is
    not read again."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in {INFO_FILE} but missing")
    if path.stat().st_size != record["bytes"]:
        raise DamagedDataset(f"{path} has {path.stat().st_size} bytes but {INFO_FILE} records {record['bytes']}: "
                             "the file was truncated or replaced")
    key = _identity(path)
    with _VERIFIED_LOCK:
        if _VERIFIED.get(key) == record["sha256"]:
            return
    if record.get("chunks"):
        damaged = _damaged_pieces(path, record, threads or os.cpu_count() or 1)
        if damaged:
            size = int(record["chunk_bytes"])
            ranges = ", ".join(f"{i * size}-{min((i + 1) * size, record['bytes']) - 1}" for i in damaged[:3])
            raise DamagedDataset(f"{path} does not match the sha256 recorded in {INFO_FILE}: bytes {ranges}"
                                 + (f" and {len(damaged) - 3} more ranges" if len(damaged) > 3 else "")
                                 + " were modified")
    elif sha256_file(path) != record["sha256"]:
        raise DamagedDataset(f"{path} does not match its sha256 recorded in {INFO_FILE}: the file was modified or "
                             "truncated")
    with _VERIFIED_LOCK:
        _VERIFIED[key] = record["sha256"]


def verify_dataset(data_dir: str | Path, *, threads: int | None = None) -> DatasetInfo:
    """Check that every file recorded in ``dataset.json`` exists and matches its checksums
    (:func:`verify_file`), before a stage reads them.

    Returns the :class:`DatasetInfo`; raises ``FileNotFoundError`` for a missing file and
    :class:`DamagedDataset` (a ``ValueError``) naming the file, the damaged bytes and how to rebuild it.
    """
    info = read_dataset_info(data_dir)
    for name, record in info.files.items():
        try:
            verify_file(Path(data_dir) / name, record, threads=threads)
        except (DamagedDataset, FileNotFoundError) as exc:
            raise type(exc)(f"{exc}; {info.rebuild_hint(data_dir)}") from None
    return info


def read_labels(data_dir: str | Path, split: str) -> np.ndarray:
    """The int64 labels of ``split`` from ``labels.npz``, without decoding any image."""
    if split not in BETON_FILES:
        raise ValueError(f"unknown split {split!r}; a prepared dataset has the splits {list(BETON_FILES)}")
    path = Path(data_dir) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {data_dir} is not a prepared dataset; run `unidd-ray prepare`")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive[split].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is corrupt or lacks the {split!r} array ({exc}); prepare the dataset again") from exc


def recorded_source_stat(data_dir: str | Path) -> str | None:
    """The stat signature of the source recorded when ``data_dir`` was last checked against it (None: none)."""
    try:
        return json.loads((Path(data_dir) / SOURCE_STAT_FILE).read_text()).get("stat")
    except (OSError, ValueError, AttributeError):
        return None


def record_source_stat(data_dir: str | Path, origin: str, stat: str | None) -> None:
    """Record that ``data_dir`` holds the bytes of its source ``origin`` as it was when its stat was ``stat``."""
    if stat is not None:
        atomic_write_json(Path(data_dir) / SOURCE_STAT_FILE, {"origin": origin, "stat": stat})
