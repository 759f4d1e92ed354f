"""Stored soft labels: the teacher's logits for every image and epoch of an evaluation's augmentation stream.

``soft_labels.parquet`` holds one row per (epoch, image id): the augmentation parameters of that image in that
epoch (crop box, flip, CutMix partner and box) and the teacher's logits on the augmented image, each epoch its own
row groups.  The stream depends only on the stream seed, the epoch and the image id (see
:mod:`unidd_ray.core.evaluation`), so the file serves any batch size and any training seed.  Its schema metadata
(key ``unidd_ray``) records the stream, the epochs, the image count, the teacher's sha256 and the distilled set
the labels were made for; an evaluation checks them (:func:`check_soft_labels`) and that every epoch's stored
parameters are its own (:meth:`StoredSoftLabels.verify_epoch`) before using the logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from unidd_ray.artifacts.files import read_manifest, write_manifest

FILE = "soft_labels.parquet"
CONFIG = "config.yaml"
KIND = "soft_labels"


def schema(meta: dict) -> pa.Schema:
    """The file's schema, with ``meta`` (the stream, epochs, images, teacher and distilled set) as its metadata."""
    return pa.schema([
        pa.field("epoch", pa.int32()), pa.field("image_id", pa.int32()), pa.field("crop", pa.list_(pa.float64(), 4)),
        pa.field("flip", pa.bool_()), pa.field("partner", pa.int32()), pa.field("box", pa.list_(pa.float64(), 4)),
        pa.field("logits", pa.list_(pa.float32())),
    ], metadata={"unidd_ray": json.dumps(meta)})


def epoch_table(epoch: int, aug, logits: np.ndarray, table_schema: pa.Schema) -> pa.Table:
    """One epoch's rows: every image's augmentation parameters (``aug``, an ``EpochAugment``) and logits."""
    n = len(logits)
    return pa.table({
        "epoch": np.full(n, epoch, dtype=np.int32), "image_id": np.arange(n, dtype=np.int32),
        "crop": list(aug.crop.numpy()), "flip": aug.flip.numpy(), "partner": aug.partner.numpy().astype(np.int32),
        "box": list(aug.box.numpy()), "logits": list(logits),
    }, schema=table_schema)


def finish(directory: str | Path, *, config_text: str, teacher_sha256: str, images: int, epochs: int) -> None:
    """Write the artifact's ``config.yaml`` and its manifest (last) beside its ``soft_labels.parquet``."""
    directory = Path(directory)
    (directory / CONFIG).write_text(config_text)
    write_manifest(directory, KIND, files=[FILE, CONFIG], teacher_sha256=teacher_sha256, images=images,
                   epochs=epochs)


PAPER_REFUSED = ("evaluate.protocol 'paper' mixes each batch with one CutMix box and an in-batch partner, so its "
                 "teacher labels depend on the batch and cannot be stored per image: evaluate it with online soft "
                 "labels (no --soft-labels / relabel), or use protocol 'ours'")


def _check_stream(meta: dict, settings, n: int) -> None:
    if getattr(settings, "protocol", "ours") == "paper":
        raise ValueError(PAPER_REFUSED)
    wanted = {"aug_seed": settings.aug_seed, "crop_scale": list(settings.crop_scale), "cutmix": settings.cutmix}
    stored = {k: meta[k] for k in wanted}
    if stored != wanted or meta["images"] != n:
        raise ValueError(f"the stored soft labels were made for stream {stored} on {meta['images']} "
                         f"images, not for {wanted} on {n}; re-run `unidd-ray relabel`")
    if settings.epochs > meta["epochs"]:
        raise ValueError(f"the stored soft labels cover {meta['epochs']} epochs, "
                         f"evaluation needs {settings.epochs}")


def check_soft_labels(directory, settings, n: int, *, teacher_sha256: str | None = None,
                      distilled: str | None = None) -> dict:
    """Check a relabel artifact against an evaluation before using it, reading only its metadata: the
    augmentation stream and epochs (as :meth:`StoredSoftLabels.check_stream`), the teacher and the distilled
    set the labels were computed for (``distilled``: its :func:`unidd_ray.keys.distilled_identity`).  Returns
    the stored metadata."""
    directory = Path(directory)
    read_manifest(directory, KIND)
    meta = json.loads(pq.read_schema(directory / FILE).metadata[b"unidd_ray"])
    _check_stream(meta, settings, n)
    if teacher_sha256 is not None and meta["teacher_sha256"] != teacher_sha256:
        raise ValueError(f"the soft labels in {directory} were made by another teacher "
                         f"(sha256 {meta['teacher_sha256'][:12]}, not {teacher_sha256[:12]}); re-run `unidd-ray relabel`")
    if distilled is not None and meta.get("distilled") != distilled:
        raise ValueError(f"the soft labels in {directory} were made for another distilled set; "
                         "re-run `unidd-ray relabel`")
    return meta


def content_of(directory: str | Path) -> dict[str, str]:
    """The artifact's files by content (its manifest's checksums): what identifies a set of stored labels."""
    return read_manifest(directory, verify=False)["files"]


@dataclass
class StoredEpoch:
    """One epoch of a relabel artifact, rows in image-id order: the augmentation parameters (as
    :class:`unidd_ray.core.evaluation.EpochAugment` holds them) and the teacher's logits."""

    crop: torch.Tensor  # (n, 4) float64
    flip: torch.Tensor  # (n,) bool
    partner: torch.Tensor  # (n,) int64
    box: torch.Tensor  # (n, 4) float64
    logits: torch.Tensor  # (n, classes) float32


class StoredSoftLabels:
    """Soft labels read from a relabel artifact: ``(epoch, ids, mixed) -> logits``.

    Holds one epoch at a time (training asks for the epochs in order), read from that epoch's row groups:
    the whole artifact is epochs x images x classes logits, far more than one epoch's.
    """

    def __init__(self, directory, *, device="cpu"):
        directory = Path(directory)
        read_manifest(directory, KIND)
        self.path = directory / FILE
        self.meta = json.loads(pq.read_schema(self.path).metadata[b"unidd_ray"])
        self.device = device
        self._checked: set[int] = set()
        self._held: tuple[int, StoredEpoch] | None = None

    def read_epoch(self, epoch: int) -> StoredEpoch:
        """Epoch ``epoch`` of the artifact (only the row groups whose statistics admit it are read)."""
        n, epochs = self.meta["images"], self.meta["epochs"]
        if not 0 <= epoch < epochs:
            raise ValueError(f"the soft labels in {self.path.parent} cover epochs 0..{epochs - 1}, not {epoch}")
        table = pq.read_table(self.path, filters=[("epoch", "=", int(epoch))])
        image = table.column("image_id").to_numpy().astype(np.int64)
        if len(image) != n or not np.array_equal(np.sort(image), np.arange(n)):
            raise ValueError(f"{self.path} does not hold one row per image for epoch {epoch} "
                             f"({len(image)} rows for {n} images); re-run `unidd-ray relabel`")
        order = np.argsort(image)

        def column(name: str, dtype) -> torch.Tensor:
            values = table.column(name).to_numpy(zero_copy_only=False)
            array = np.stack(values) if values.dtype == object else values
            return torch.from_numpy(np.ascontiguousarray(array[order]).astype(dtype, copy=False))

        return StoredEpoch(crop=column("crop", np.float64), flip=column("flip", np.bool_),
                           partner=column("partner", np.int64), box=column("box", np.float64),
                           logits=column("logits", np.float32))

    def epoch(self, epoch: int) -> StoredEpoch:
        """Epoch ``epoch``, read unless it is the one held."""
        if self._held is None or self._held[0] != epoch:
            self._held = None  # the previous epoch is released before the next is read
            self._held = (epoch, self.read_epoch(epoch))
        return self._held[1]

    def check_stream(self, settings, n: int) -> None:
        """Refuse labels stored for another augmentation stream or distilled set."""
        _check_stream(self.meta, settings, n)

    def verify_epoch(self, epoch: int, aug) -> None:
        """Refuse an epoch whose stored crop, flip, CutMix partner or box is not this run's."""
        if epoch in self._checked:
            return
        stored = self.epoch(epoch)
        differ = [name for name in ("crop", "flip", "partner", "box")
                  if not torch.equal(getattr(stored, name), getattr(aug, name))]
        if differ:
            raise ValueError(f"epoch {epoch}: the stored augmentation parameters ({', '.join(differ)}) differ from "
                             "this run's stream; re-run `unidd-ray relabel`")
        self._checked.add(epoch)

    def __call__(self, epoch: int, ids, mixed) -> torch.Tensor:
        return self.epoch(epoch).logits[ids.cpu()].to(self.device)
