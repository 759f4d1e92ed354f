"""Relabel stage: store the teacher's soft labels for the evaluation's augmentation stream.

``soft_labels.parquet`` holds one row per (image id, epoch): the augmentation
parameters of that image in that epoch (crop box, flip, CutMix partner and
box) and the teacher's logits on the augmented image.  The stream depends only
on the stream seed, the epoch and the image id (see :mod:`unidd_ray.evaluation`),
so the file serves any batch size and any training seed; ``evaluate
--soft-labels DIR`` checks that the stored parameters are those of its own
stream before using the logits, and reads one epoch at a time (each epoch is
written as its own row groups).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unidd_ray.config import EvaluateConfig, to_dict
from unidd_ray.locks import holds_output_lock

FILE = "soft_labels.parquet"
CONFIG = "config.yaml"
KIND = "soft_labels"


@holds_output_lock()
def relabel(distilled_dir, teacher_dir, out_dir, cfg: EvaluateConfig, *, batch_size: int = 256,
            device: str = "cpu", progress: bool = True, recipe_yaml: str | None = None) -> Path:
    """Store the teacher's logits for ``cfg.epochs`` epochs of the evaluation stream of ``distilled_dir``.

    Writes ``soft_labels.parquet``, ``config.yaml`` (``recipe_yaml``, else the evaluate section) and the
    manifest into ``out_dir`` (as a whole: assembled beside it and moved into place when complete); the
    output path, inputs and settings are checked before any epoch is computed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from tqdm.auto import tqdm

    from unidd_ray.artifacts import atomic_directory, atomic_write_text, check_output, read_manifest, write_manifest
    from unidd_ray.models import memory_format
    from unidd_ray.stages.evaluate import _settings, distilled_identity, load_distilled
    from unidd_ray.teacher import load_teacher, read_teacher_info

    check_output(out_dir, "soft_labels")
    if batch_size < 1:
        raise ValueError(f"relabel's batch_size must be at least 1, got {batch_size}")
    distilled = read_manifest(distilled_dir, "distilled")
    if distilled.get("dataset_fingerprint") != read_teacher_info(teacher_dir).dataset_fingerprint:
        raise ValueError(f"the teacher in {teacher_dir} was trained on another dataset than the one {distilled_dir} "
                         "was distilled from; relabel it with that dataset's teacher")
    teacher, tinfo = load_teacher(teacher_dir, device=device)
    layout = memory_format(cfg.channels_last)  # the teacher and batches as the online evaluation lays them out
    teacher.to(memory_format=layout)
    images, _, _ = load_distilled(distilled_dir, mean=tinfo.mean, std=tinfo.std)
    images = images.to(device)
    settings = _settings(cfg)
    n = len(images)
    meta = {"aug_seed": settings.aug_seed, "crop_scale": list(settings.crop_scale), "cutmix": settings.cutmix,
            "epochs": settings.epochs, "images": n, "teacher_sha256": tinfo.sha256,
            "distilled": distilled_identity(distilled_dir, distilled), "distilled_files": distilled["files"]}
    schema = pa.schema([
        pa.field("epoch", pa.int32()), pa.field("image_id", pa.int32()), pa.field("crop", pa.list_(pa.float64(), 4)),
        pa.field("flip", pa.bool_()), pa.field("partner", pa.int32()), pa.field("box", pa.list_(pa.float64(), 4)),
        pa.field("logits", pa.list_(pa.float32())),
    ], metadata={"unidd_ray": json.dumps(meta)})
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, KIND) as staging:
        # one table per epoch: each epoch is its own row groups, which StoredSoftLabels reads on their own
        with pq.ParquetWriter(staging / FILE, schema, compression="zstd") as writer:
            for epoch in tqdm(range(settings.epochs), desc="relabel", disable=not progress):
                writer.write_table(_epoch_table(images, teacher, epoch, settings, batch_size, layout, schema))
        atomic_write_text(staging / CONFIG, recipe_yaml if recipe_yaml is not None
                          else yaml.safe_dump({"evaluate": to_dict(cfg)}, sort_keys=False))
        write_manifest(staging, KIND, files=[FILE, CONFIG], teacher_sha256=tinfo.sha256, images=n,
                       epochs=settings.epochs)
    return out_dir


def _epoch_table(images, teacher, epoch: int, settings, batch_size: int, layout, schema):
    """One epoch of the artifact: every image's augmentation parameters and the teacher's logits on it."""
    import pyarrow as pa

    from unidd_ray.evaluation import augment_batch, epoch_augment

    n = len(images)
    aug = epoch_augment(n, epoch, settings)
    logits = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            ids = torch.arange(start, min(n, start + batch_size))
            mixed, _, _ = augment_batch(images, ids.to(images.device), aug)
            logits.append(teacher(mixed.contiguous(memory_format=layout)).float().cpu())
    z = torch.cat(logits).numpy()
    return pa.table({
        "epoch": np.full(n, epoch, dtype=np.int32), "image_id": np.arange(n, dtype=np.int32),
        "crop": list(aug.crop.numpy()), "flip": aug.flip.numpy(), "partner": aug.partner.numpy().astype(np.int32),
        "box": list(aug.box.numpy()), "logits": list(z),
    }, schema=schema)


def _check_stream(meta: dict, settings, n: int) -> None:
    wanted = {"aug_seed": settings.aug_seed, "crop_scale": list(settings.crop_scale), "cutmix": settings.cutmix}
    stored = {k: meta[k] for k in wanted}
    if stored != wanted or meta["images"] != n:
        raise ValueError(f"the stored soft labels were made for stream {stored} on {meta['images']} "
                         f"images, not for {wanted} on {n}; re-run `unidd-ray relabel`")
    if settings.epochs > meta["epochs"]:
        raise ValueError(f"the stored soft labels cover {meta['epochs']} epochs, "
                         f"evaluation needs {settings.epochs}")


def check_soft_labels(directory, settings, n: int, *, teacher_sha256: str | None = None,
                      distilled: str | None = None, distilled_files: dict | None = None) -> dict:
    """Check a relabel artifact against an evaluation before using it, reading only its metadata: the
    augmentation stream and epochs (as :meth:`StoredSoftLabels.check_stream`), the teacher and the
    distilled set the labels were computed for: its images (``distilled``, from
    :func:`unidd_ray.stages.evaluate.distilled_identity`), or for labels stored before 2026-12, which
    record the set's whole manifest file list only, ``distilled_files``.  Returns the stored metadata."""
    import pyarrow.parquet as pq

    from unidd_ray.artifacts import read_manifest

    directory = Path(directory)
    read_manifest(directory, KIND)
    meta = json.loads(pq.read_schema(directory / FILE).metadata[b"unidd_ray"])
    _check_stream(meta, settings, n)
    if teacher_sha256 is not None and meta["teacher_sha256"] != teacher_sha256:
        raise ValueError(f"the soft labels in {directory} were made by another teacher "
                         f"(sha256 {meta['teacher_sha256'][:12]}, not {teacher_sha256[:12]}); re-run `unidd-ray relabel`")
    if "distilled" in meta:
        other = distilled is not None and meta["distilled"] != distilled
    else:
        other = distilled_files is not None and meta["distilled_files"] != distilled_files
    if other:
        raise ValueError(f"the soft labels in {directory} were made for another distilled set; "
                         "re-run `unidd-ray relabel`")
    return meta


@dataclass
class StoredEpoch:
    """One epoch of a relabel artifact, rows in image-id order: the augmentation parameters (as
    :class:`unidd_ray.evaluation.EpochAugment` holds them) and the teacher's logits."""

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
        import pyarrow.parquet as pq

        from unidd_ray.artifacts import read_manifest

        directory = Path(directory)
        read_manifest(directory, KIND)
        self.path = directory / FILE
        self.meta = json.loads(pq.read_schema(self.path).metadata[b"unidd_ray"])
        self.device = device
        self._checked: set[int] = set()
        self._held: tuple[int, StoredEpoch] | None = None

    def read_epoch(self, epoch: int) -> StoredEpoch:
        """Epoch ``epoch`` of the artifact (only the row groups whose statistics admit it are read)."""
        import pyarrow.parquet as pq

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
