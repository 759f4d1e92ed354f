"""Squeeze stage: train the teacher on the real data with Ray Train (DDP over gloo/NCCL).

SGD with Nesterov momentum and a per-step cosine schedule (optional linear
warm-up), RandomResizedCrop + flip through the FFCV train pipeline, a checkpoint
every epoch through ``ray.train.report``, restarts after a worker fault
(:func:`unidd_ray.runtime.train.fit`) and ``resume=True`` to continue a killed
command (Ray Train restores the latest checkpoint of a run with the same name
and storage path).  ``squeeze.identity.json`` beside the checkpoints records
what the training depends on (:func:`unidd_ray.keys.training_identity`); a
resume with anything else is refused, naming what differs.  The teacher is
written to a temporary sibling of the output directory and moved into place
whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from unidd_ray.artifacts.dataset import read_dataset_info, read_labels, verify_dataset
from unidd_ray.artifacts.files import (atomic_directory, atomic_write_json, atomic_write_text, check_output,
                                       sha256_file)
from unidd_ray.artifacts.locks import holds_output_lock
from unidd_ray.artifacts.teacher import TeacherInfo, save_teacher
from unidd_ray.config import DataConfig, ModelConfig, SqueezeConfig
from unidd_ray.core.evaluation import top1_on_split
from unidd_ray.data.loading import make_loader
from unidd_ray.data.normalization import normalization_source, resolve_normalization
from unidd_ray.keys import check_resumable, training_identity
from unidd_ray.models import build_model, load_weights
from unidd_ray.runtime import console
from unidd_ray.runtime.cluster import require_resources
from unidd_ray.runtime.train import WorkerInputError, fit, trainer_factory

log = logging.getLogger(__name__)

RUN_NAME = "squeeze"
IDENTITY = f"{RUN_NAME}.identity.json"  # beside the Ray Train run directory, under storage_path
PROGRESS = f"{RUN_NAME}.progress.json"  # rank 0's epochs done, beside it


@dataclass(frozen=True)
class SqueezeJob:
    """What every worker of a teacher training is given."""

    squeeze: SqueezeConfig
    model: ModelConfig
    data: DataConfig
    data_dir: str
    progress_file: str


def _cosine_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Trainer:
    """One worker's teacher training: the model, its optimiser and the data of an epoch."""

    def __init__(self, job: SqueezeJob):
        self.job, self.cfg = job, job.squeeze
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_worker)))  # the worker's CPUs, whatever FFCV uses
        torch.manual_seed(self.cfg.seed + self.rank)
        self.device = ray.train.torch.get_device()
        info = read_dataset_info(job.data_dir)
        self.resolution = job.data.resolution or info.resolution
        # the teacher's (mean, std)
        self.normalization = resolve_normalization(job.model.normalization, info, job.model.arch)
        self.model = build_model(job.model.arch, num_classes=info.num_classes, in_channels=info.channels,
                                 resolution=self.resolution, **job.model.options)
        if job.model.weights:
            load_weights(self.model, job.model.weights)
        self.model = self.model.to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                         nesterov=self.cfg.nesterov, weight_decay=self.cfg.weight_decay)
        self.start_epoch = self._restore()
        self.ddp = ray.train.torch.prepare_model(self.model, move_to_device=False) if self.world > 1 else self.model
        self.n_train = len(read_labels(job.data_dir, "train"))
        self.n_val = len(read_labels(job.data_dir, "val"))
        self.per_worker = self.n_train // self.world
        self.steps_per_epoch = self.per_worker // self.cfg.batch_size  # at least 1: check_squeeze refuses fewer
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)

    def _restore(self) -> int:
        """The first epoch to train: after the latest checkpoint's, whose model and optimiser are loaded."""
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return 0
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["epoch"]) + 1

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One epoch on this worker's shard of a seeded permutation; returns (summed loss, images seen)."""
        cfg = self.cfg
        order = np.random.default_rng(cfg.seed + epoch).permutation(self.n_train)
        shard = np.sort(order[self.rank * self.per_worker:(self.rank + 1) * self.per_worker])
        loader = make_loader(self.job.data_dir, "train", batch_size=cfg.batch_size,
                             num_workers=self.job.data.num_workers, indices=shard, train=True, order="random",
                             seed=cfg.seed + 1000 * epoch + self.rank, device=str(self.device),
                             resolution=self.resolution, crop_scale=tuple(cfg.crop_scale), drop_last=True,
                             normalize=self.normalization)
        self.ddp.train()
        total_steps = self.steps_per_epoch * cfg.epochs
        loss_sum, seen = 0.0, 0
        for step, (images, labels, _) in enumerate(loader):
            factor = _cosine_factor(epoch * self.steps_per_epoch + step, total_steps,
                                    cfg.warmup_epochs * self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * factor
            loss = self.criterion(self.ddp(images.to(self.device)), labels.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        return loss_sum, seen

    def report(self, epoch: int, loss_sum: float, seen: int) -> None:
        """Test on the val split (each worker its share), then report the epoch with a checkpoint (rank 0's)."""
        correct, total = top1_on_split(self.model, self.job.data_dir, batch_size=self.cfg.eval_batch_size,
                                       num_workers=self.job.data.num_workers, device=self.device,
                                       indices=np.arange(self.rank, self.n_val, self.world),
                                       resolution=self.resolution, normalize=self.normalization)
        counts = torch.tensor([correct, total, loss_sum, seen], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(counts)
        metrics = {"epoch": epoch, "train_loss": float(counts[2] / max(counts[3], 1)),
                   "val_top1": float(100 * counts[0] / max(counts[1], 1))}
        where = (f"epoch {epoch + 1}/{self.cfg.epochs}  train loss {metrics['train_loss']:.4f}" if epoch >= 0
                 else "given weights, no training")
        log.info(f"[squeeze] {where}  val top-1 {metrics['val_top1']:.2f}%")
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0:
                torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "epoch": epoch}, Path(d) / "state.pt")
                ckpt = ray.train.Checkpoint.from_directory(d)
                atomic_write_json(self.job.progress_file, {"epochs": epoch + 1})
            ray.train.report(metrics, checkpoint=ckpt)


def _train_loop(config: dict) -> None:
    trainer = _Trainer(config["job"])
    for epoch in range(trainer.start_epoch, trainer.cfg.epochs):
        trainer.report(epoch, *trainer.train_epoch(epoch))
    if trainer.cfg.epochs == 0:  # pretrained weights (teacher.weights): evaluate them and hand them on unchanged
        trainer.report(-1, 0.0, 0)


def check_squeeze(data_dir: str | Path, out_dir: str | Path, *, squeeze_cfg: SqueezeConfig, model_cfg: ModelConfig,
                  data_cfg: DataConfig):
    """Every check of a teacher training that can fail, before Ray starts or any worker does: the output path,
    the prepared data (verified), a batch that each worker's share holds, the model and its starting weights
    (inside the workers a bad option would only surface as a worker error), its normalisation (as many channels
    as the data's).  Returns the dataset's info."""
    check_output(out_dir, "teacher")
    info = verify_dataset(data_dir)
    try:
        resolve_normalization(model_cfg.normalization, info, model_cfg.arch)
    except ValueError as exc:
        raise ValueError(f"teacher.normalization {model_cfg.normalization!r} {exc}; choose a normalisation with "
                         f"{info.channels} channel(s) (e.g. dataset)") from None
    n_train = len(read_labels(str(data_dir), "train"))
    if squeeze_cfg.epochs > 0 and n_train // squeeze_cfg.workers < squeeze_cfg.batch_size:
        # each worker's loader drops its last partial batch: a shard smaller than a batch trains on nothing
        fewer = (f" or squeeze.workers to at most {n_train // squeeze_cfg.batch_size}"
                 if n_train >= squeeze_cfg.batch_size else "")
        raise ValueError(f"squeeze.batch_size {squeeze_cfg.batch_size} is larger than each worker's share of the "
                         f"{n_train} training images ({n_train // squeeze_cfg.workers} with squeeze.workers "
                         f"{squeeze_cfg.workers}), so no full batch would be trained on; lower squeeze.batch_size "
                         f"to at most {n_train // squeeze_cfg.workers}{fewer}")
    probe = build_model(model_cfg.arch, num_classes=info.num_classes, in_channels=info.channels,
                        resolution=data_cfg.resolution or info.resolution, **model_cfg.options)
    if model_cfg.weights:
        load_weights(probe, model_cfg.weights)
    return info


def _checkpoints(storage_path: Path, identity: dict, *, resume: bool) -> bool:
    """Make ``storage_path`` ready for the run: a resumed run's checkpoints must have been made with
    ``identity``; a fresh run removes earlier ones and records ``identity``.  Returns whether it is fresh."""
    run_dir = storage_path / RUN_NAME
    if resume and run_dir.exists():
        try:
            recorded = json.loads((storage_path / IDENTITY).read_text())
        except FileNotFoundError:
            recorded = None
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot resume: {storage_path / IDENTITY} is not valid JSON ({exc})") from None
        check_resumable(recorded, identity, what=f"the checkpoints in {run_dir}",
                        fix=f"start over without --resume, give another --out, or remove {run_dir}")
        return False
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: never pick up the checkpoints of an earlier one
    atomic_write_json(storage_path / IDENTITY, identity)  # before Ray Train makes run_dir
    (storage_path / PROGRESS).unlink(missing_ok=True)
    return True


def _discard_checkpoints(storage_path: Path) -> None:
    """What a fresh run that ended at once left: its (empty) run, identity and progress."""
    shutil.rmtree(storage_path / RUN_NAME, ignore_errors=True)
    for name in (IDENTITY, PROGRESS):
        (storage_path / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        storage_path.rmdir()  # when nothing else is kept there


def _epochs_done(progress_file: Path) -> int:
    try:
        return int(json.loads(progress_file.read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return 0


@holds_output_lock()
def squeeze(data_dir: str | Path, out_dir: str | Path, *, squeeze_cfg: SqueezeConfig, model_cfg: ModelConfig,
            data_cfg: DataConfig, storage_path: str | Path, resume: bool = False,
            recipe_yaml: str | None = None, trainer_class=None, progress: bool = True) -> Path:
    """Train the teacher and write ``teacher.pt`` + ``teacher.json`` (+ ``config.yaml``) to ``out_dir``.

    A worker fault is retried from the last checkpoint up to ``squeeze.max_failures`` times; a worker that
    refuses its input ends the run at once, and a fresh run then leaves no checkpoints behind.
    ``trainer_class``: see :func:`unidd_ray.runtime.train.trainer_factory`; ``progress``: a progress bar."""
    info = check_squeeze(data_dir, out_dir, squeeze_cfg=squeeze_cfg, model_cfg=model_cfg, data_cfg=data_cfg)
    require_resources("squeeze", workers=squeeze_cfg.workers, cpus=squeeze_cfg.cpus_per_worker,
                      gpus=1 if squeeze_cfg.use_gpu else 0)
    resolution = data_cfg.resolution or info.resolution
    storage_path = Path(storage_path).resolve()
    weights = sha256_file(model_cfg.weights) if model_cfg.weights else None
    fresh = _checkpoints(storage_path, training_identity(squeeze_cfg, model_cfg, info, resolution, weights),
                         resume=resume)
    job = SqueezeJob(squeeze_cfg, model_cfg, data_cfg, str(Path(data_dir).resolve()), str(storage_path / PROGRESS))
    extra = {} if trainer_class is None else {"trainer_class": trainer_class}
    trainer = trainer_factory(_train_loop, {"job": job}, name=RUN_NAME, storage_path=storage_path,
                              workers=squeeze_cfg.workers, cpus_per_worker=squeeze_cfg.cpus_per_worker,
                              use_gpu=squeeze_cfg.use_gpu, **extra)
    try:
        with console.watch(lambda: _epochs_done(storage_path / PROGRESS), max(1, squeeze_cfg.epochs),
                           f"teacher {model_cfg.arch}", unit="epoch", enabled=progress):
            result = fit(trainer, what="squeeze", max_failures=squeeze_cfg.max_failures)
    except WorkerInputError:
        if fresh:  # nothing worth resuming: leave no checkpoints behind
            _discard_checkpoints(storage_path)
        raise
    if result.checkpoint is None:
        raise RuntimeError("teacher training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    mean, std = resolve_normalization(model_cfg.normalization, info, model_cfg.arch)  # what the workers trained with
    source = normalization_source(model_cfg.normalization, model_cfg.arch)  # (None but for `model`)
    teacher_info = TeacherInfo(
        arch=model_cfg.arch, options=dict(model_cfg.options), num_classes=info.num_classes,
        in_channels=info.channels, resolution=resolution, dataset=info.name, dataset_fingerprint=info.fingerprint,
        mean=mean, std=std, val_top1=float(result.metrics["val_top1"]),
        extra={"epochs": squeeze_cfg.epochs, "train_loss": float(result.metrics["train_loss"]),
               **({"normalization_source": source} if source else {})},
    )
    model = teacher_info.build()
    model.load_state_dict(state["model"])
    with atomic_directory(out_dir, "teacher") as staging:
        save_teacher(model, teacher_info, staging)
        if recipe_yaml is not None:
            atomic_write_text(staging / "config.yaml", recipe_yaml)
    return Path(out_dir)
