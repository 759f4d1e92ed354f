"""Relabel stage: store the teacher's soft labels for the evaluation's augmentation stream.

``soft_labels.parquet`` holds one row per (image id, epoch): the augmentation
parameters of that image in that epoch (crop box, flip, CutMix partner and
box) and the teacher's logits on the augmented image.  The stream depends only
on the stream seed, the epoch and the image id (see :mod:`unidd_ray.evaluation`),
so the file serves any batch size and any training seed; ``evaluate
--soft-labels DIR`` checks that the stored parameters are those of its own
stream before using the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from unidd_ray.config import EvaluateConfig

FILE = "soft_labels.parquet"
KIND = "soft_labels"


def relabel(distilled_dir, teacher_dir, out_dir, cfg: EvaluateConfig, *, batch_size: int = 256,
            device: str = "cpu", progress: bool = True) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from unidd_ray.artifacts import atomic_file, read_manifest, write_manifest
    from unidd_ray.evaluation import augment_batch, epoch_augment
    from unidd_ray.stages.evaluate import _settings, load_distilled
    from unidd_ray.teacher import load_teacher

    teacher, tinfo = load_teacher(teacher_dir, device=device)
    distilled = read_manifest(distilled_dir, "distilled")
    images, _, _ = load_distilled(distilled_dir, mean=tinfo.mean, std=tinfo.std)
    images = images.to(device)
    settings = _settings(cfg)
    n = len(images)
    meta = {"aug_seed": settings.aug_seed, "crop_scale": list(settings.crop_scale), "cutmix": settings.cutmix,
            "epochs": settings.epochs, "images": n, "teacher_sha256": tinfo.sha256,
            "distilled_files": distilled["files"]}
    schema = pa.schema([
        pa.field("epoch", pa.int32()), pa.field("image_id", pa.int32()), pa.field("crop", pa.list_(pa.float64(), 4)),
        pa.field("flip", pa.bool_()), pa.field("partner", pa.int32()), pa.field("box", pa.list_(pa.float64(), 4)),
        pa.field("logits", pa.list_(pa.float32())),
    ], metadata={"unidd_ray": json.dumps(meta)})
    out_dir = Path(out_dir)
    with atomic_file(out_dir / FILE) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for epoch in tqdm(range(settings.epochs), desc="relabel", disable=not progress):
            aug = epoch_augment(n, epoch, settings)
            logits = []
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    ids = torch.arange(start, min(n, start + batch_size))
                    mixed, _, _ = augment_batch(images, ids.to(device), aug)
                    logits.append(teacher(mixed).float().cpu())
            z = torch.cat(logits).numpy()
            writer.write_table(pa.table({
                "epoch": np.full(n, epoch, dtype=np.int32), "image_id": np.arange(n, dtype=np.int32),
                "crop": list(aug.crop.numpy()), "flip": aug.flip.numpy(), "partner": aug.partner.numpy().astype(np.int32),
                "box": list(aug.box.numpy()), "logits": list(z),
            }, schema=schema))
    write_manifest(out_dir, KIND, files=[FILE], teacher_sha256=tinfo.sha256, images=n, epochs=settings.epochs)
    return out_dir


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
                      distilled_files: dict | None = None) -> dict:
    """Check a relabel artifact against an evaluation before using it, reading only its metadata: the
    augmentation stream and epochs (as :meth:`StoredSoftLabels.check_stream`), the teacher and the
    distilled set the labels were computed for.  Returns the stored metadata."""
    import pyarrow.parquet as pq

    from unidd_ray.artifacts import read_manifest

    directory = Path(directory)
    read_manifest(directory, KIND)
    meta = json.loads(pq.read_schema(directory / FILE).metadata[b"unidd_ray"])
    _check_stream(meta, settings, n)
    if teacher_sha256 is not None and meta["teacher_sha256"] != teacher_sha256:
        raise ValueError(f"the soft labels in {directory} were made by another teacher "
                         f"(sha256 {meta['teacher_sha256'][:12]}, not {teacher_sha256[:12]}); re-run `unidd-ray relabel`")
    if distilled_files is not None and meta["distilled_files"] != distilled_files:
        raise ValueError(f"the soft labels in {directory} were made for another distilled set; "
                         "re-run `unidd-ray relabel`")
    return meta


class StoredSoftLabels:
    """Soft labels read from a relabel artifact: ``(epoch, ids, mixed) -> logits``."""

    def __init__(self, directory, *, device="cpu"):
        import pyarrow.parquet as pq

        from unidd_ray.artifacts import read_manifest

        directory = Path(directory)
        read_manifest(directory, KIND)
        table = pq.read_table(directory / FILE)
        self.meta = json.loads(table.schema.metadata[b"unidd_ray"])
        n, epochs = self.meta["images"], self.meta["epochs"]
        epoch = table.column("epoch").to_numpy()
        image = table.column("image_id").to_numpy()
        logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))
        self.logits = torch.zeros(epochs, n, logits.shape[1])
        self.logits[epoch, image] = torch.from_numpy(logits)
        self.crop = torch.zeros(epochs, n, 4, dtype=torch.float64)
        self.crop[epoch, image] = torch.from_numpy(np.stack(table.column("crop").to_numpy(zero_copy_only=False)))
        self.partner = torch.zeros(epochs, n, dtype=torch.long)
        self.partner[epoch, image] = torch.from_numpy(table.column("partner").to_numpy().astype(np.int64))
        self.device = device
        self._checked: set[int] = set()

    def check_stream(self, settings, n: int) -> None:
        """Refuse labels stored for another augmentation stream or distilled set."""
        _check_stream(self.meta, settings, n)

    def verify_epoch(self, epoch: int, aug) -> None:
        if epoch in self._checked:
            return
        if not (torch.equal(self.crop[epoch], aug.crop) and torch.equal(self.partner[epoch], aug.partner)):
            raise ValueError(f"epoch {epoch}: the stored augmentation parameters differ from this run's stream")
        self._checked.add(epoch)

    def __call__(self, epoch: int, ids, mixed) -> torch.Tensor:
        return self.logits[epoch, ids.cpu()].to(self.device)
