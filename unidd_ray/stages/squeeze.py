"""Squeeze stage: train the teacher on the real data with Ray Train (DDP over gloo/NCCL).

SGD with Nesterov momentum and a per-step cosine schedule (optional linear
warm-up), RandomResizedCrop + flip through the FFCV train pipeline, a checkpoint
every epoch through ``ray.train.report``, automatic restarts after a worker
failure (``FailureConfig``) and ``resume=True`` to continue a killed command
(Ray Train restores the latest checkpoint of a run with the same name and
storage path).  ``squeeze.identity.json`` beside the checkpoints records what
the training depends on (settings, model, starting weights, dataset); a resume
with anything else is refused, naming what differs.  The teacher is written to
a temporary sibling of the output directory and moved into place whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch

from unidd_ray.config import DataConfig, ModelConfig, SqueezeConfig, to_dict
from unidd_ray.locks import holds_output_lock

log = logging.getLogger(__name__)

RUN_NAME = "squeeze"
IDENTITY = f"{RUN_NAME}.identity.json"  # beside the Ray Train run directory, under storage_path


def _cosine_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _train_loop(config: dict) -> None:
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    import unidd_ray  # noqa: F401
    from unidd_ray.config import from_dict
    from unidd_ray.data.loading import make_loader, read_labels
    from unidd_ray.data.prepare import read_dataset_info
    from unidd_ray.models import build_model, load_weights
    from unidd_ray.stages.common import evaluate_top1

    cfg = from_dict(SqueezeConfig, config["squeeze"])
    model_cfg = from_dict(ModelConfig, config["model"])
    data_cfg = from_dict(DataConfig, config["data"])
    data_dir = config["data_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # the worker's CPUs, whatever FFCV's loader uses
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    info = read_dataset_info(data_dir)
    resolution = data_cfg.resolution or info.resolution
    model = build_model(model_cfg.arch, num_classes=info.num_classes, in_channels=info.channels,
                        resolution=resolution, **model_cfg.options)
    if model_cfg.weights:
        load_weights(model, model_cfg.weights)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    n_train = len(read_labels(data_dir, "train"))
    per_worker = n_train // world
    steps_per_epoch = per_worker // cfg.batch_size  # at least 1: squeeze() refuses smaller shards
    total_steps = steps_per_epoch * cfg.epochs
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    n_val = len(read_labels(data_dir, "val"))

    def evaluate_and_report(epoch: int, loss_sum: float, seen: int) -> None:
        val_indices = np.arange(rank, n_val, world)
        correct, total = evaluate_top1(model, data_dir, batch_size=cfg.eval_batch_size,
                                       num_workers=data_cfg.num_workers, device=device, indices=val_indices,
                                       resolution=resolution)
        counts = torch.tensor([correct, total, loss_sum, seen], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)
        metrics = {"epoch": epoch, "train_loss": float(counts[2] / max(counts[3], 1)),
                   "val_top1": float(100 * counts[0] / max(counts[1], 1))}
        where = f"epoch {epoch + 1}/{cfg.epochs}  train loss {metrics['train_loss']:.4f}" if epoch >= 0 else \
            "given weights, no training"
        log.info(f"[squeeze] {where}  val top-1 {metrics['val_top1']:.2f}%")
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                           Path(d) / "state.pt")
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    for epoch in range(start_epoch, cfg.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(n_train)
        shard = np.sort(order[rank * per_worker:(rank + 1) * per_worker])
        loader = make_loader(data_dir, "train", batch_size=cfg.batch_size, num_workers=data_cfg.num_workers,
                             indices=shard, train=True, order="random", seed=cfg.seed + 1000 * epoch + rank,
                             device=str(device), resolution=resolution, crop_scale=tuple(cfg.crop_scale),
                             drop_last=True)
        ddp_model.train()
        loss_sum, seen = 0.0, 0
        for step, (images, labels, _) in enumerate(loader):
            global_step = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _cosine_factor(global_step, total_steps, cfg.warmup_epochs * steps_per_epoch)
            loss = criterion(ddp_model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        evaluate_and_report(epoch, loss_sum, seen)
    if cfg.epochs == 0:  # pretrained weights (teacher.weights): evaluate them and hand them on unchanged
        evaluate_and_report(-1, 0.0, 0)


def training_identity(squeeze_cfg: SqueezeConfig, model_cfg: ModelConfig, info, resolution: int) -> dict:
    """What the trained weights depend on: the squeeze settings of the teacher's key (performance settings
    left out), the model, the sha256 of its starting weights, the side and the dataset."""
    from unidd_ray.artifacts import sha256_file
    from unidd_ray.pipeline import dataset_identity, key_settings

    return {"squeeze": key_settings("squeeze", to_dict(squeeze_cfg)),
            "teacher": {"arch": model_cfg.arch, "options": to_dict(model_cfg)["options"],
                        "weights": sha256_file(model_cfg.weights) if model_cfg.weights else None},
            "resolution": resolution, "dataset": dataset_identity(info)}


def check_resumable(storage_path: Path, identity: dict) -> None:
    """Refuse to resume the checkpoints under ``storage_path`` unless they were made with ``identity``."""
    from unidd_ray.artifacts import differences

    path = storage_path / IDENTITY
    fix = f"start over without --resume, give another --out, or remove {storage_path / RUN_NAME}"
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"cannot resume: {storage_path / RUN_NAME} has no {IDENTITY} recording the settings "
                         f"and inputs of its checkpoints (an earlier unidd_ray made them); {fix}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot resume: {path} is not valid JSON ({exc}); {fix}") from None
    differ = differences(recorded, identity)
    if differ:
        raise ValueError(f"cannot resume: the checkpoints in {storage_path / RUN_NAME} were made with other "
                         f"settings or inputs ({'; '.join(differ)}); {fix}")


def check_squeeze(data_dir: str | Path, out_dir: str | Path, *, squeeze_cfg: SqueezeConfig, model_cfg: ModelConfig,
                  data_cfg: DataConfig):
    """Every check of a teacher training that can fail, before Ray starts or any worker does: the output path,
    the prepared data (verified), a batch that each worker's share holds, the model and its starting weights
    (inside the workers a bad option would only surface as a worker error).  Returns the dataset's info."""
    from unidd_ray.artifacts import check_output
    from unidd_ray.data.dataset_info import verify_dataset
    from unidd_ray.data.loading import read_labels
    from unidd_ray.models import build_model, load_weights

    check_output(out_dir, "teacher")
    info = verify_dataset(data_dir)
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


@holds_output_lock()
def squeeze(data_dir: str | Path, out_dir: str | Path, *, squeeze_cfg: SqueezeConfig, model_cfg: ModelConfig,
            data_cfg: DataConfig, storage_path: str | Path, resume: bool = False,
            recipe_yaml: str | None = None) -> Path:
    """Train the teacher and write ``teacher.pt`` + ``teacher.json`` (+ ``config.yaml``) to ``out_dir``.

    A worker fault is retried from the last checkpoint up to ``squeeze.max_failures`` times; a worker that
    refuses its input ends the run at once, and a fresh run then leaves no checkpoints behind."""
    from unidd_ray.artifacts import atomic_directory, atomic_write_json, atomic_write_text
    from unidd_ray.ray_utils import WorkerInputError, fit, require_resources, trainer_factory
    from unidd_ray.teacher import TeacherInfo, save_teacher

    info = check_squeeze(data_dir, out_dir, squeeze_cfg=squeeze_cfg, model_cfg=model_cfg, data_cfg=data_cfg)
    require_resources("squeeze", workers=squeeze_cfg.workers, cpus=squeeze_cfg.cpus_per_worker,
                      gpus=1 if squeeze_cfg.use_gpu else 0)
    resolution = data_cfg.resolution or info.resolution
    storage_path = Path(storage_path).resolve()
    run_dir = storage_path / RUN_NAME
    identity = training_identity(squeeze_cfg, model_cfg, info, resolution)
    fresh = not (resume and run_dir.exists())
    if not fresh:
        check_resumable(storage_path, identity)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run: never pick up the checkpoints of an earlier one
        atomic_write_json(storage_path / IDENTITY, identity)  # before Ray Train makes run_dir
    trainer = trainer_factory(
        _train_loop, {"squeeze": to_dict(squeeze_cfg), "model": to_dict(model_cfg), "data": to_dict(data_cfg),
                      "data_dir": str(Path(data_dir).resolve())},
        name=RUN_NAME, storage_path=storage_path, workers=squeeze_cfg.workers,
        cpus_per_worker=squeeze_cfg.cpus_per_worker, use_gpu=squeeze_cfg.use_gpu)
    try:
        result = fit(trainer, what="squeeze", max_failures=squeeze_cfg.max_failures)
    except WorkerInputError:
        if fresh:  # nothing worth resuming: leave no checkpoints behind
            shutil.rmtree(run_dir, ignore_errors=True)
            (storage_path / IDENTITY).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                storage_path.rmdir()  # when nothing else is kept there
        raise
    if result.checkpoint is None:
        raise RuntimeError("teacher training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    teacher_info = TeacherInfo(
        arch=model_cfg.arch, options=dict(model_cfg.options), num_classes=info.num_classes,
        in_channels=info.channels, resolution=resolution, dataset=info.name, dataset_fingerprint=info.fingerprint,
        mean=list(info.mean), std=list(info.std), val_top1=float(result.metrics["val_top1"]),
        extra={"epochs": squeeze_cfg.epochs, "train_loss": float(result.metrics["train_loss"])},
    )
    model = teacher_info.build()
    model.load_state_dict(state["model"])
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, "teacher") as staging:
        save_teacher(model, teacher_info, staging)
        if recipe_yaml is not None:
            atomic_write_text(staging / "config.yaml", recipe_yaml)
    return out_dir
