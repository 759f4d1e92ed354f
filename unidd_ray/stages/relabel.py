"""Relabel stage: store the teacher's soft labels for the evaluation's augmentation stream.

For every epoch of the stream (:func:`unidd_ray.core.evaluation.epoch_augment`) the teacher labels every image
of the distilled set as the online evaluation would augment it; the logits and the augmentation parameters go
to a stored soft-labels artifact (:mod:`unidd_ray.artifacts.soft_labels`), which ``evaluate --soft-labels DIR``
reads instead of running the teacher.  No Ray: one process, one device.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from unidd_ray.artifacts import distilled, soft_labels
from unidd_ray.artifacts.files import atomic_directory, check_output
from unidd_ray.artifacts.locks import holds_output_lock
from unidd_ray.artifacts.teacher import load_teacher, read_teacher_info
from unidd_ray.config import EvaluateConfig, to_dict
from unidd_ray.core.evaluation import augment_batch, epoch_augment
from unidd_ray.keys import distilled_identity
from unidd_ray.models import memory_format
from unidd_ray.runtime import console


def _logits(images: torch.Tensor, teacher, aug, batch_size: int, layout) -> torch.Tensor:
    """The teacher's logits on every image as the epoch ``aug`` augments it, in image-id order."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            ids = torch.arange(start, min(len(images), start + batch_size))
            mixed, _, _ = augment_batch(images, ids.to(images.device), aug)
            out.append(teacher(mixed.contiguous(memory_format=layout)).float().cpu())
    return torch.cat(out)


@holds_output_lock()
def relabel(distilled_dir, teacher_dir, out_dir, cfg: EvaluateConfig, *, batch_size: int = 256,
            device: str = "cpu", progress: bool = True, recipe_yaml: str | None = None) -> Path:
    """Store the teacher's logits for ``cfg.epochs`` epochs of the evaluation stream of ``distilled_dir``.

    Writes ``soft_labels.parquet``, ``config.yaml`` (``recipe_yaml``, else the evaluate section) and the
    manifest into ``out_dir`` (as a whole: assembled beside it and moved into place when complete); the
    output path, inputs and settings are checked before any epoch is computed.
    """
    check_output(out_dir, soft_labels.KIND)
    if cfg.protocol == "paper":
        raise ValueError(soft_labels.PAPER_REFUSED)
    if batch_size < 1:
        raise ValueError(f"relabel's batch_size must be at least 1, got {batch_size}")
    manifest = distilled.verify(distilled_dir)
    if manifest.get("dataset_fingerprint") != read_teacher_info(teacher_dir).dataset_fingerprint:
        raise ValueError(f"the teacher in {teacher_dir} was trained on another dataset than the one {distilled_dir} "
                         "was distilled from; relabel it with that dataset's teacher")
    teacher, tinfo = load_teacher(teacher_dir, device=device)
    layout = memory_format(cfg.channels_last)  # the teacher and batches as the online evaluation lays them out
    teacher.to(memory_format=layout)
    images, _, _ = distilled.load_distilled(distilled_dir, mean=tinfo.mean, std=tinfo.std)
    images = images.to(device)
    n = len(images)
    meta = {"aug_seed": cfg.aug_seed, "crop_scale": list(cfg.crop_scale), "cutmix": cfg.cutmix, "epochs": cfg.epochs,
            "images": n, "teacher_sha256": tinfo.sha256,
            "distilled": distilled_identity(*distilled.identity_inputs(distilled_dir, manifest))}
    schema = soft_labels.schema(meta)
    with atomic_directory(out_dir, soft_labels.KIND) as staging:
        # one table per epoch: each epoch is its own row groups, which StoredSoftLabels reads on their own
        bar = console.progress(cfg.epochs, "relabel", unit="epoch") if progress else None
        with pq.ParquetWriter(staging / soft_labels.FILE, schema, compression="zstd") as writer:
            for epoch in range(cfg.epochs):
                aug = epoch_augment(n, epoch, cfg)
                writer.write_table(soft_labels.epoch_table(epoch, aug, _logits(images, teacher, aug, batch_size,
                                                                               layout).numpy(), schema))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        config_text = recipe_yaml if recipe_yaml is not None else yaml.safe_dump({"evaluate": to_dict(cfg)},
                                                                                 sort_keys=False)
        soft_labels.finish(staging, config_text=config_text, teacher_sha256=tinfo.sha256, images=n,
                           epochs=cfg.epochs)
    return Path(out_dir)

