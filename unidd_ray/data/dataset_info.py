"""``dataset.json``: the description of a prepared dataset directory, and its integrity check.

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
source's own fingerprint), ``format_version`` and ``files`` (``{file name: {"sha256", "bytes"}}``
for the two ``.beton`` files and ``labels.npz``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from unidd_ray.data.hashing import file_sha256

FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
# Written beside dataset.json by the pipeline: the stat signature of the source when it was last checked
# (unidd_ray.data.hashing.source_stat), so a re-run reads the source's bytes again only when files changed.
SOURCE_STAT_FILE = "source-stat.json"
LABELS_FILE = "labels.npz"
BETON_FILES = {"train": "train.beton", "val": "val.beton"}
STORAGES = ("raw", "jpeg")


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
        return asdict(self)


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
    info = DatasetInfo(**{k: v for k, v in data.items() if k in known})
    if info.storage not in STORAGES:
        raise ValueError(f"{path}: unknown storage {info.storage!r} (expected one of {list(STORAGES)})")
    return info


def verify_dataset(data_dir: str | Path) -> DatasetInfo:
    """Check that every file recorded in ``dataset.json`` exists and matches its sha256.

    Returns the :class:`DatasetInfo`; raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming the first file whose size or sha256 differs (modified or truncated).
    """
    info = read_dataset_info(data_dir)
    for name, record in info.files.items():
        path = Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {INFO_FILE} but missing; prepare the dataset again")
        if path.stat().st_size != record["bytes"] or file_sha256(path) != record["sha256"]:
            raise ValueError(f"{path} does not match its sha256 recorded in {INFO_FILE}: the file was modified or "
                             "truncated; prepare the dataset again")
    return info
