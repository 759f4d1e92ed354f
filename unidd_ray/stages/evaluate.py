"""Evaluate stage: train fresh students on a distilled set and test them on the real val split.

Runs on Ray Train (one fit per distilled set, all seeds inside it; DDP over the
batch when ``evaluate.workers > 1``).  Soft labels come online from the teacher
or, with ``soft_labels=DIR``, from a relabel artifact.  Writes ``summary.json``
with ``top1_mean``, ``top1_std`` and the per-seed values.

Also writes *real* distilled-format sets (the random-subset baseline) with the
same seeded image choice as recovery's initialisation, so the baseline is
exactly the starting point the recovery methods improve on.
"""

from __future__ import annotations

import io
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from unidd_ray.config import EvaluateConfig, RecoverConfig, to_dict

log = logging.getLogger(__name__)

RUN_NAME = "evaluate"


def load_distilled(distilled_dir: str | Path, *, mean, std) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Images (normalised float32 NCHW), labels and manifest rows of a distilled set (checksums verified)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from unidd_ray.artifacts import read_manifest

    distilled_dir = Path(distilled_dir)
    read_manifest(distilled_dir, "distilled")
    rows = pq.read_table(distilled_dir / "manifest.parquet").to_pylist()
    if not rows:
        raise ValueError(f"{distilled_dir} holds no images")
    arrays = []
    for r in rows:
        with Image.open(io.BytesIO((distilled_dir / r["path"]).read_bytes())) as img:
            a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    labels = torch.tensor([r["class"] for r in rows], dtype=torch.long)
    return (x - m) / s, labels, rows


def write_real_subset(data_dir: str | Path, out_dir: str | Path, *, ipc: int, seed: int,
                      num_workers: int = 1, recipe_yaml: str | None = None) -> Path:
    """The random-real-subset baseline: IPC seeded real images per class, in the distilled format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unidd_ray.artifacts import atomic_directory, atomic_write_json, atomic_write_text, sha256_bytes, \
        write_manifest
    from unidd_ray.data.loading import read_labels
    from unidd_ray.data.prepare import read_dataset_info
    from unidd_ray.stages.recover import image_path, load_real_images, make_plan, to_png_bytes

    info = read_dataset_info(data_dir)
    labels = read_labels(str(data_dir), "train")
    plan = make_plan(labels, info.num_classes, RecoverConfig(ipc=ipc, seed=seed))
    with atomic_directory(out_dir) as tmp:
        rows = []
        for k in range(info.num_classes):
            images = load_real_images(str(data_dir), plan.init_index[k], num_workers=num_workers)
            for slot, image in enumerate(images):
                data = to_png_bytes(image, info.mean, info.std)
                rel = image_path(k, slot)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
                rows.append({"class": k, "class_name": info.class_names[k], "slot": slot, "path": rel,
                             "sha256": sha256_bytes(data), "source_index": plan.init_index[k][slot],
                             "method": "random", "seed": seed})
        pq.write_table(pa.Table.from_pylist(rows), tmp / "manifest.parquet")
        atomic_write_json(tmp / "summary.json", {"method": "random", "ipc": ipc, "seed": seed,
                                                 "images": len(rows), "dataset_fingerprint": info.fingerprint})
        if recipe_yaml is not None:
            atomic_write_text(tmp / "config.yaml", recipe_yaml)
        write_manifest(tmp, "distilled", method="random", ipc=ipc, dataset_fingerprint=info.fingerprint)
    return Path(out_dir)


def _settings(cfg: EvaluateConfig):
    from unidd_ray.evaluation import EvalSettings

    return EvalSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        temperature=cfg.temperature, crop_scale=tuple(cfg.crop_scale), cutmix=cfg.cutmix,
                        hard_labels=cfg.hard_labels, aug_seed=cfg.aug_seed)


def evaluate_in_process(images, labels, teacher, data_dir: str, cfg: EvaluateConfig, *, num_classes: int,
                        in_channels: int, resolution: int, seeds: list[int], device="cpu", num_workers: int = 1,
                        soft_labels=None, report=None, shard: tuple[int, int] = (0, 1), wrap=None,
                        val_classes: list[int] | None = None) -> list[float]:
    """Top-1 (%) of one student per seed.  ``report(seed, epoch, top1)`` receives intermediate
    accuracies when ``cfg.eval_every`` > 0 (Ray Tune uses it for early stopping).  ``val_classes``
    restricts the validation images to those classes (for sets distilled from a class subset)."""
    from unidd_ray.data.loading import read_labels
    from unidd_ray.evaluation import TeacherLabels, train_student
    from unidd_ray.models import build_model
    from unidd_ray.stages.common import evaluate_top1

    settings = _settings(cfg)
    source = None if cfg.hard_labels else (soft_labels or TeacherLabels(teacher))
    val_labels = read_labels(data_dir, "val")
    val_indices = np.arange(len(val_labels))
    if val_classes is not None:
        val_indices = val_indices[np.isin(val_labels, val_classes)]
    val_indices = val_indices[shard[0]::shard[1]]

    def top1(model) -> float:
        correct, total = evaluate_top1(model, data_dir, batch_size=cfg.eval_batch_size, num_workers=num_workers,
                                       device=device, indices=val_indices, resolution=resolution)
        counts = torch.tensor([correct, total], dtype=torch.float64)
        if wrap is not None:
            counts = wrap.sum(counts)
        return float(100 * counts[0] / counts[1])

    results = []
    for seed in seeds:
        torch.manual_seed(seed)
        student = build_model(cfg.student, num_classes=num_classes, in_channels=in_channels,
                              resolution=resolution, **cfg.student_options)

        def on_epoch(epoch, model, _seed=seed):
            if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                acc = top1(model)
                if report is not None:
                    report(_seed, epoch, acc)

        trained = train_student(student, images, labels, settings, seed=seed, soft_labels=source,
                                num_classes=num_classes, device=device, on_epoch=on_epoch, shard=shard,
                                wrap_model=wrap.wrap_model if wrap is not None else None)
        acc = top1(trained)
        if report is not None:
            report(seed, cfg.epochs - 1, acc)
        results.append(acc)
    return results


class _DistWrap:
    """DDP helpers for evaluation workers."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t

    def wrap_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)


def _evaluate_loop(config: dict) -> list[float]:
    import ray.train
    import ray.train.torch

    import unidd_ray  # noqa: F401
    from unidd_ray.config import from_dict
    from unidd_ray.stages.relabel import StoredSoftLabels
    from unidd_ray.teacher import load_teacher

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    device = ray.train.torch.get_device()
    cfg = from_dict(EvaluateConfig, config["evaluate"])
    teacher, tinfo = load_teacher(config["teacher_dir"], device=device)
    images, labels, _ = load_distilled(config["distilled_dir"], mean=tinfo.mean, std=tinfo.std)
    soft = StoredSoftLabels(config["soft_labels"], device=device) if config.get("soft_labels") else None

    def report(seed, epoch, acc):
        if rank == 0:
            log.info(f"[evaluate] seed {seed} epoch {epoch + 1}/{cfg.epochs}: val top-1 {acc:.2f}%")

    seeds = list(range(cfg.seeds))
    by_seed = cfg.split == "seeds" and world > 1
    accs = evaluate_in_process(images, labels, teacher, config["data_dir"], cfg, num_classes=tinfo.num_classes,
                               in_channels=tinfo.in_channels, resolution=tinfo.resolution,
                               seeds=seeds[rank::world] if by_seed else seeds, device=device,
                               num_workers=config["num_workers"], soft_labels=soft, report=report,
                               shard=(0, 1) if by_seed else (rank, world),
                               wrap=_DistWrap() if world > 1 and not by_seed else None)
    if by_seed:  # worker w trained seeds w, w + W, ...: put them back in seed order
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, accs)
        accs = [gathered[s % world][s // world] for s in seeds]
    return accs  # Ray Train V2 hands rank 0's return value to the driver (Result.return_value)


def run_evaluate(distilled_dir, teacher_dir, data_dir, out_dir, cfg: EvaluateConfig, *, storage_path,
                 soft_labels: str | Path | None = None, num_workers: int = 1,
                 recipe_yaml: str | None = None) -> dict:
    """Evaluate ``distilled_dir`` over ``cfg.seeds`` seeds; writes and returns ``summary.json``."""
    import shutil

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from unidd_ray.artifacts import atomic_write_json, atomic_write_text, read_manifest
    from unidd_ray.data.prepare import read_dataset_info
    from unidd_ray.ray_utils import require_resources
    from unidd_ray.teacher import read_teacher_info

    info = read_dataset_info(data_dir)
    tinfo = read_teacher_info(teacher_dir)
    distilled = read_manifest(distilled_dir, "distilled")
    if distilled.get("dataset_fingerprint") != info.fingerprint:
        raise ValueError(f"{distilled_dir} was distilled from another dataset than {data_dir}")
    if tinfo.dataset_fingerprint != info.fingerprint:
        raise ValueError(f"the teacher in {teacher_dir} was trained on another dataset than {data_dir}")
    if cfg.seeds < 1:
        raise ValueError("evaluate.seeds must be at least 1")
    if cfg.split not in ("data", "seeds"):
        raise ValueError(f"evaluate.split must be 'data' (DDP over the distilled set) or 'seeds' "
                         f"(one student per worker), got {cfg.split!r}")
    if soft_labels is not None and not cfg.hard_labels:  # refuse mismatched labels before starting any worker
        import pyarrow.parquet as pq

        from unidd_ray.stages.relabel import check_soft_labels

        images = pq.read_metadata(Path(distilled_dir) / "manifest.parquet").num_rows
        check_soft_labels(soft_labels, _settings(cfg), images, teacher_sha256=tinfo.sha256,
                          distilled_files=distilled["files"])
    workers = min(cfg.workers, cfg.seeds) if cfg.split == "seeds" else cfg.workers  # seeds: none idle
    require_resources("evaluate", workers=workers, cpus=cfg.cpus_per_worker, gpus=1 if cfg.use_gpu else 0)
    storage_path = Path(storage_path).resolve()
    shutil.rmtree(storage_path / RUN_NAME, ignore_errors=True)
    started = time.perf_counter()
    trainer = TorchTrainer(
        _evaluate_loop,
        train_loop_config={"evaluate": to_dict(cfg), "distilled_dir": str(Path(distilled_dir).resolve()),
                           "teacher_dir": str(Path(teacher_dir).resolve()), "data_dir": str(Path(data_dir).resolve()),
                           "soft_labels": str(Path(soft_labels).resolve()) if soft_labels else None,
                           "num_workers": num_workers, "threads": max(1, int(cfg.cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(storage_path)),
    )
    result = trainer.fit()
    if result.error is not None or result.return_value is None:
        raise RuntimeError(f"evaluation of {distilled_dir} failed: {result.error}")
    accs = [float(a) for a in result.return_value]
    summary = {
        "distilled": str(distilled_dir), "method": distilled.get("method"), "ipc": distilled.get("ipc"),
        "student": cfg.student, "labels": "hard" if cfg.hard_labels else ("stored" if soft_labels else "soft"),
        "seeds": list(range(cfg.seeds)), "top1": accs, "top1_mean": statistics.fmean(accs),
        "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "seconds": time.perf_counter() - started, "config": to_dict(cfg),
    }
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "summary.json", summary)
    if recipe_yaml is not None:
        atomic_write_text(out_dir / "config.yaml", recipe_yaml)
    return summary
