"""Evaluate stage: train fresh students on a distilled set and test them on the real val split.

Runs on Ray Train: one fit per call, holding every seed of every distilled set
handed to it (the pipeline evaluates all of its sets in one call, so the worker
group starts once); ``split: seeds`` deals the (set, seed) students out to the
workers, ``split: data`` trains each student with DDP over the batch.  Soft labels come online from the teacher
or, with ``soft_labels=DIR``, from a relabel artifact.  Writes ``summary.json``
with ``top1_mean``, ``top1_std`` and the per-seed values.

Also writes *real* distilled-format sets (the random-subset baseline) with the
same seeded image choice as recovery's initialisation, so the baseline is
exactly the starting point the recovery methods improve on.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unidd_ray.config import EvaluateConfig, RecoverConfig, to_dict
from unidd_ray.locks import holds_output_lock, output_lock
from unidd_ray.models import memory_format

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


@holds_output_lock()
def write_real_subset(data_dir: str | Path, out_dir: str | Path, *, ipc: int, seed: int,
                      num_workers: int = 1, recipe_yaml: str | None = None, resolution: int | None = None,
                      group_images: int = 4096) -> Path:
    """The random-real-subset baseline: IPC seeded real images per class, in the distilled format.

    ``resolution``: side of the written images (default: the stored one; the pipeline passes its
    teacher's, the side of the recovered sets); ``group_images``: how many images are read and held at
    once at most (whole classes; a class larger than this is read on its own).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unidd_ray.artifacts import atomic_directory, atomic_write_json, atomic_write_text, write_manifest
    from unidd_ray.data.dataset_info import verify_dataset
    from unidd_ray.data.loading import read_labels
    from unidd_ray.stages.recover import load_real_images, make_plan

    info = verify_dataset(data_dir)
    labels = read_labels(str(data_dir), "train")
    plan = make_plan(labels, info.num_classes, RecoverConfig(ipc=ipc, seed=seed))
    with atomic_directory(out_dir, "distilled") as tmp:
        rows = []
        # one loader per group of classes holding up to ``group_images`` images (one for all of a small
        # set; ImageNet at IPC 50 is 50,000 images, ~30 GB as float32 at 224 px)
        groups, group = [], []
        for k in range(info.num_classes):
            if group and (len(group) + 1) * ipc > group_images:
                groups.append(group)
                group = []
            group.append(k)
        groups.append(group)
        for classes in groups:
            every = [i for k in classes for i in plan.init_index[k]]
            loaded = iter(load_real_images(str(data_dir), every, num_workers=num_workers, resolution=resolution))
            for k in classes:
                _write_class(tmp, k, [next(loaded) for _ in plan.init_index[k]], rows, plan, info, seed)
        pq.write_table(pa.Table.from_pylist(rows), tmp / "manifest.parquet")
        atomic_write_json(tmp / "summary.json", {"method": "random", "ipc": ipc, "seed": seed,
                                                 "images": len(rows), "dataset_fingerprint": info.fingerprint})
        if recipe_yaml is not None:
            atomic_write_text(tmp / "config.yaml", recipe_yaml)
        write_manifest(tmp, "distilled", method="random", ipc=ipc, dataset_fingerprint=info.fingerprint)
    return Path(out_dir)


def _write_class(directory: Path, k: int, images: list[torch.Tensor], rows: list[dict], plan, info, seed: int):
    from unidd_ray.artifacts import sha256_bytes
    from unidd_ray.stages.recover import image_path, to_png_bytes

    for slot, image in enumerate(images):
        data = to_png_bytes(image, info.mean, info.std)
        rel = image_path(k, slot)
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
        rows.append({"class": k, "class_name": info.class_names[k], "slot": slot, "path": rel,
                     "sha256": sha256_bytes(data), "source_index": plan.init_index[k][slot],
                     "method": "random", "seed": seed})


def validate_evaluate(cfg: EvaluateConfig, *, images: int) -> None:
    """Refuse an evaluation of an ``images``-image set that its settings cannot run (the settings themselves
    were checked when ``cfg`` was built): with ``split: data`` every batch is shared out to the workers, so
    none of its batches may hold fewer images than there are workers."""
    if cfg.split == "data" and cfg.workers > 1:
        batch = images if cfg.batch_size is None else min(cfg.batch_size, images)
        smallest = min(batch, images % batch or batch)  # the last batch of an epoch holds the rest
        if smallest < cfg.workers:
            raise ValueError(
                f"evaluate.split 'data' shares every batch out to the {cfg.workers} evaluate.workers, but with "
                f"evaluate.batch_size {cfg.batch_size} a batch of the {images}-image set holds {smallest} images, "
                f"leaving a worker none; use split: seeds, fewer workers, or a batch_size whose batches (the last "
                f"one too) hold at least {cfg.workers}")


def check_student(cfg: EvaluateConfig, tinfo) -> None:
    """Build the student once for the teacher's classes, channels and side: an unknown student or option is
    refused here, naming it, instead of inside every worker."""
    from unidd_ray.models import build_model

    try:
        build_model(cfg.student, num_classes=tinfo.num_classes, in_channels=tinfo.in_channels,
                    resolution=tinfo.resolution, **cfg.student_options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"evaluate.student {cfg.student!r} with evaluate.student_options {cfg.student_options}: "
                         f"{exc}") from None


def _settings(cfg: EvaluateConfig):
    from unidd_ray.evaluation import EvalSettings

    return EvalSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        temperature=cfg.temperature, crop_scale=tuple(cfg.crop_scale), cutmix=cfg.cutmix,
                        hard_labels=cfg.hard_labels, aug_seed=cfg.aug_seed, channels_last=cfg.channels_last)


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


def _evaluate_loop(config: dict) -> list[dict]:
    """One Ray Train worker: trains its share of the (set, seed) tasks of ``config["jobs"]``."""
    import ray.train
    import ray.train.torch

    import unidd_ray  # noqa: F401
    from unidd_ray.artifacts import atomic_write_json
    from unidd_ray.config import from_dict
    from unidd_ray.evaluation import TeacherLabels
    from unidd_ray.stages.relabel import StoredSoftLabels
    from unidd_ray.teacher import load_teacher

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    device = ray.train.torch.get_device()
    teacher, tinfo = load_teacher(config["teacher_dir"], device=device)
    by_seed = config["split"] == "seeds" and world > 1
    tasks = [tuple(t) for t in config["tasks"]]  # (job index, seed), in a fixed order
    mine = deal(tasks, world)[rank] if by_seed else tasks
    done = []
    loaded: dict[int, tuple] = {}
    for j, seed in mine:
        job = config["jobs"][j]
        cfg = from_dict(EvaluateConfig, job["evaluate"])
        if j not in loaded:  # each worker loads a set once, for all of its seeds
            images, labels, _ = load_distilled(job["distilled_dir"], mean=tinfo.mean, std=tinfo.std)
            soft = StoredSoftLabels(job["soft_labels"], device=device) if job.get("soft_labels") else None
            if soft is None and cfg.batch_size is None:  # full batch: the seeds' batches hold the same images
                soft = TeacherLabels(teacher, memo_bytes=config.get("memo_bytes", MEMO_BYTES))
            loaded = {j: (images, labels, soft)}
        images, labels, soft = loaded[j]
        teacher.to(memory_format=memory_format(cfg.channels_last))

        def report(seed, epoch, acc, _cfg=cfg, _name=job["name"]):
            if by_seed or rank == 0:
                log.info(f"[evaluate] {_name} seed {seed} epoch {epoch + 1}/{_cfg.epochs}: val top-1 {acc:.2f}%")

        t0 = time.perf_counter()
        (acc,) = evaluate_in_process(images, labels, teacher, config["data_dir"], cfg, num_classes=tinfo.num_classes,
                                     in_channels=tinfo.in_channels, resolution=tinfo.resolution, seeds=[seed],
                                     device=device, num_workers=config["num_workers"], soft_labels=soft,
                                     report=report, shard=(0, 1) if by_seed else (rank, world),
                                     wrap=_DistWrap() if world > 1 and not by_seed else None)
        record = {"job": j, "seed": seed, "top1": acc, "seconds": time.perf_counter() - t0, "key": job["key"]}
        if by_seed or rank == 0:  # a finished seed survives a crash of the rest of the group
            atomic_write_json(seed_record(job["out_dir"], seed, job["key"]), record)
        done.append(record)
    if by_seed:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, done)
        done = [r for part in gathered for r in part]
    return done  # Ray Train V2 hands rank 0's return value to the driver (Result.return_value)


MEMO_BYTES = 256 << 20  # per set and worker: teacher logits kept for the set's next seeds


def deal(tasks: list, workers: int) -> list[list]:
    """Split ``tasks`` into ``workers`` contiguous, as-equal-as-possible runs (the seeds of one set
    stay together, so a worker reuses the set and its teacher logits across them)."""
    base, extra = divmod(len(tasks), workers)
    runs, start = [], 0
    for w in range(workers):
        size = base + (1 if w < extra else 0)
        runs.append(tasks[start:start + size])
        start += size
    return runs


@dataclass
class EvalJob:
    """One distilled set to evaluate: where it is, where its ``summary.json`` goes, and how."""

    distilled_dir: str | Path
    out_dir: str | Path
    cfg: EvaluateConfig
    soft_labels: str | Path | None = None
    recipe_yaml: str | None = None
    name: str = ""


SEEDS = ".seeds"  # each finished seed's result, under the output directory: a later run with the same settings
# (after a crash, or with more seeds) trains only the seeds missing there


def seed_record(out_dir: str | Path, seed: int, key: str) -> Path:
    """Where a finished seed's result is kept: named by the seed and its :func:`job_key`, so evaluations with
    other settings written to the same ``--out`` keep theirs side by side.  (Before 2026-12 the name held the
    seed only: ``seed-<seed>.json``; :func:`finished_seeds` reads both.)"""
    return Path(out_dir) / SEEDS / f"seed-{seed}-{key[:16]}.json"


def run_evaluate(distilled_dir, teacher_dir, data_dir, out_dir, cfg: EvaluateConfig, *, storage_path,
                 soft_labels: str | Path | None = None, num_workers: int = 1,
                 recipe_yaml: str | None = None, wait: bool = False) -> dict:
    """Evaluate ``distilled_dir`` over ``cfg.seeds`` seeds; writes and returns ``summary.json``."""
    job = EvalJob(distilled_dir, out_dir, cfg, soft_labels=soft_labels, recipe_yaml=recipe_yaml)
    return run_evaluations([job], teacher_dir, data_dir, storage_path=storage_path, num_workers=num_workers,
                           wait=wait)[0]


def _check_job(job: EvalJob, info, tinfo) -> tuple[dict, str]:
    """Validate one job before any worker starts (its student is :func:`check_student`'s); returns its
    distilled manifest and :func:`distilled_identity`."""
    import pyarrow.parquet as pq

    from unidd_ray.artifacts import check_output, read_manifest

    cfg = job.cfg
    check_output(job.out_dir, "evaluation")
    distilled = read_manifest(job.distilled_dir, "distilled")
    if distilled.get("dataset_fingerprint") != info.fingerprint:
        raise ValueError(f"{job.distilled_dir} was distilled from another dataset than the evaluation data")
    images = pq.read_metadata(Path(job.distilled_dir) / "manifest.parquet").num_rows
    validate_evaluate(cfg, images=images)
    identity = distilled_identity(job.distilled_dir, distilled)
    if job.soft_labels is not None and not cfg.hard_labels:  # refuse mismatched labels before starting any worker
        from unidd_ray.stages.relabel import check_soft_labels

        check_soft_labels(job.soft_labels, _settings(cfg), images, teacher_sha256=tinfo.sha256,
                          distilled=identity, distilled_files=distilled["files"])
    return distilled, identity


def distilled_identity(distilled_dir: str | Path, manifest: dict | None = None) -> str:
    """What an evaluation reads of a distilled set: every image's path, class and sha256, in the order of
    ``manifest.parquet`` (an image's row is its id in the augmentation stream and in stored soft labels).
    The set's summary (wall times), config and optional ``.beton`` are left out, so a set recomputed bit for
    bit, or written with other performance settings, is the same input.  ``manifest``: its
    ``manifest.json``, if already read."""
    import pyarrow.parquet as pq

    from unidd_ray.artifacts import read_manifest, sha256_json

    files = (manifest or read_manifest(distilled_dir, "distilled", verify=False))["files"]
    rows = pq.read_table(Path(distilled_dir) / "manifest.parquet", columns=["path", "class"]).to_pylist()
    try:
        return sha256_json([(r["path"], int(r["class"]), files[r["path"]]) for r in rows])
    except KeyError as exc:
        raise ValueError(f"{distilled_dir}: image {exc} of manifest.parquet is not in manifest.json; "
                         "the set is damaged: recover it again") from None


def job_key(job: EvalJob, distilled: str, teacher_sha256: str, dataset: dict) -> str:
    """What a stored per-seed result must match to be reused: the settings the result depends on (those of
    the pipeline's evaluation key, so a re-run with other performance settings or another seed count keeps
    the finished seeds), the distilled images (:func:`distilled_identity`), the teacher, the dataset
    (``pipeline.dataset_identity``) and the labels."""
    from unidd_ray.artifacts import sha256_json
    from unidd_ray.pipeline import evaluate_settings

    return sha256_json({"evaluate": evaluate_settings(job.cfg), "distilled": distilled, "teacher": teacher_sha256,
                        "dataset": dataset, "soft_labels": _soft_labels_content(job)})


def reusable_keys(job: EvalJob, distilled: str, manifest: dict, teacher_sha256: str, dataset: dict) -> set[str]:
    """The keys of the stored per-seed results this job takes: :func:`job_key`, and the two keys results of an
    interrupted run had before 2026-12 (the distilled set's whole manifest file list; the result-relevant
    settings with the seed count, or the whole configuration)."""
    from unidd_ray.artifacts import sha256_json
    from unidd_ray.pipeline import evaluate_settings

    def legacy(settings: dict) -> str:
        return sha256_json({"evaluate": settings, "distilled": manifest["files"], "teacher": teacher_sha256,
                            "soft_labels": str(Path(job.soft_labels).resolve()) if job.soft_labels else None})

    return {job_key(job, distilled, teacher_sha256, dataset),
            legacy({**evaluate_settings(job.cfg), "seeds": job.cfg.seeds}), legacy(to_dict(job.cfg))}


def _soft_labels_content(job: EvalJob) -> str | None:
    """The stored soft labels a job trains with, by content (a relabel into the same folder is other labels),
    or None: online labels, or hard labels (which read none)."""
    from unidd_ray.artifacts import read_manifest, sha256_json

    if not job.soft_labels or job.cfg.hard_labels:
        return None
    return sha256_json(read_manifest(job.soft_labels, verify=False)["files"])


def finished_seeds(out_dir: Path, keys: set[str], *, paths: dict[int, Path] | None = None) -> dict[int, dict]:
    """Per-seed results left by an earlier run of the same evaluation (a key among ``keys``); ``paths``, if
    given, receives the file each was read from."""
    import json

    found = {}
    for path in sorted((Path(out_dir) / SEEDS).glob("seed-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("key") in keys:
            found[int(record["seed"])] = record
            if paths is not None:
                paths[int(record["seed"])] = path
    return found


def run_evaluations(jobs: list[EvalJob], teacher_dir, data_dir, *, storage_path, num_workers: int = 1,
                    wait: bool = False) -> list[dict]:
    """Evaluate several distilled sets in one Ray Train run (one worker group: its start-up is paid
    once) and write each set's ``summary.json``; returns the summaries in the order of ``jobs``.
    Holds the lock of every job's output directory meanwhile (``wait``: see :func:`unidd_ray.locks.output_lock`).

    All jobs share the worker layout (``workers``, ``cpus_per_worker``, ``use_gpu``, ``split``).
    With ``split: seeds`` the (set, seed) tasks are dealt out to the workers; with ``split: data``
    the workers train every student together.  Each finished seed is kept under
    ``<out_dir>/.seeds`` so that a re-run after a crash, or with more seeds, trains only the missing ones.
    """
    with contextlib.ExitStack() as held:
        for out_dir in dict.fromkeys(Path(j.out_dir).resolve() for j in jobs):
            held.enter_context(output_lock(out_dir, wait=wait))
        return _evaluate_jobs(jobs, teacher_dir, data_dir, storage_path=storage_path, num_workers=num_workers)


@dataclass
class CheckedJobs:
    """What :func:`check_evaluations` found: the data, the teacher, and each job's distilled manifest and
    :func:`distilled_identity`."""

    info: object
    tinfo: object
    manifests: list[dict]
    identities: list[str]


def check_evaluations(jobs: list[EvalJob], teacher_dir, data_dir) -> CheckedJobs:
    """Every check of an evaluation that can fail, before Ray or any worker starts: the prepared data
    (verified), the teacher and its agreement with the data, each job's output path, distilled set, batches
    and stored soft labels, and each student (built once for the teacher's classes and side)."""
    import json

    from unidd_ray.data.dataset_info import verify_dataset
    from unidd_ray.teacher import check_teacher_data, read_teacher_info

    info = verify_dataset(data_dir)
    tinfo = read_teacher_info(teacher_dir)
    check_teacher_data(tinfo, info, teacher_dir, data_dir)
    layout = {(j.cfg.workers, j.cfg.cpus_per_worker, j.cfg.use_gpu, j.cfg.split) for j in jobs}
    if len(layout) > 1:
        raise ValueError(f"jobs evaluated together must share evaluate.workers, cpus_per_worker, use_gpu and "
                         f"split; got {sorted(layout, key=str)}: evaluate them in separate calls")
    checked = [_check_job(j, info, tinfo) for j in jobs]
    for cfg in {json.dumps([j.cfg.student, j.cfg.student_options], sort_keys=True): j.cfg for j in jobs}.values():
        check_student(cfg, tinfo)  # once per student, not in every worker
    return CheckedJobs(info, tinfo, [m for m, _ in checked], [d for _, d in checked])


def _evaluate_jobs(jobs: list[EvalJob], teacher_dir, data_dir, *, storage_path, num_workers: int) -> list[dict]:
    import shutil

    from unidd_ray.artifacts import atomic_write_json, atomic_write_text
    from unidd_ray.pipeline import dataset_identity
    from unidd_ray.ray_utils import fit, require_resources, trainer_factory

    if not jobs:
        return []
    checked = check_evaluations(jobs, teacher_dir, data_dir)
    info, tinfo, manifests, identities = checked.info, checked.tinfo, checked.manifests, checked.identities
    cfg0 = jobs[0].cfg
    dataset = dataset_identity(info)
    keys = [job_key(j, d, tinfo.sha256, dataset) for j, d in zip(jobs, identities)]
    paths = [{} for _ in jobs]
    finished = [finished_seeds(Path(j.out_dir), reusable_keys(j, d, m, tinfo.sha256, dataset), paths=p)
                for j, d, m, p in zip(jobs, identities, manifests, paths)]
    for job, key, found, where in zip(jobs, keys, finished, paths):  # records kept under an older key or name
        for seed, record in found.items():  # take the current ones, so a later run with another seed count finds them
            current = seed_record(job.out_dir, seed, key)
            if record["key"] != key or where[seed] != current:
                found[seed] = {**record, "key": key}
                atomic_write_json(current, found[seed])
                if where[seed] != current:
                    where[seed].unlink(missing_ok=True)
    tasks = [(i, s) for i, j in enumerate(jobs) for s in range(j.cfg.seeds) if s not in finished[i]]
    workers = min(cfg0.workers, max(1, len(tasks))) if cfg0.split == "seeds" else cfg0.workers  # none idle
    storage_path = Path(storage_path).resolve()
    started = time.perf_counter()
    records: list[dict] = []  # this run's students
    if tasks:
        require_resources("evaluate", workers=workers, cpus=cfg0.cpus_per_worker, gpus=1 if cfg0.use_gpu else 0)
        shutil.rmtree(storage_path / RUN_NAME, ignore_errors=True)
        job_dicts = [{"evaluate": to_dict(j.cfg), "distilled_dir": str(Path(j.distilled_dir).resolve()),
                      "out_dir": str(Path(j.out_dir).resolve()), "key": k, "name": j.name or Path(j.distilled_dir).name,
                      "soft_labels": str(Path(j.soft_labels).resolve()) if j.soft_labels else None}
                     for j, k in zip(jobs, keys)]
        trainer = trainer_factory(
            _evaluate_loop, {"jobs": job_dicts, "tasks": tasks, "split": cfg0.split,
                             "teacher_dir": str(Path(teacher_dir).resolve()), "data_dir": str(Path(data_dir).resolve()),
                             "num_workers": num_workers, "threads": max(1, int(cfg0.cpus_per_worker))},
            name=RUN_NAME, storage_path=storage_path, workers=workers, cpus_per_worker=cfg0.cpus_per_worker,
            use_gpu=cfg0.use_gpu, keep_checkpoints=None)
        # no retries: every finished seed is kept, so a re-run trains only the missing ones
        result = fit(trainer, what="evaluate", max_failures=0)
        if result.error is not None or result.return_value is None:
            names = ", ".join(str(j.distilled_dir) for j in jobs)
            raise RuntimeError(f"evaluation of {names} failed: {result.error}")
        records = list(result.return_value)
    wall = time.perf_counter() - started
    summaries = []
    for i, (job, manifest) in enumerate(zip(jobs, manifests)):
        trained = {int(r["seed"]): r for r in records if int(r["job"]) == i}
        mine = {**finished[i], **trained}
        seeds = list(range(job.cfg.seeds))
        missing = [s for s in seeds if s not in mine]
        if missing:
            raise RuntimeError(f"evaluation of {job.distilled_dir} returned no result for seeds {missing}")
        accs = [float(mine[s]["top1"]) for s in seeds]
        cfg = job.cfg
        summary = {
            "distilled": str(job.distilled_dir), "method": manifest.get("method"), "ipc": manifest.get("ipc"),
            "student": cfg.student,
            "labels": "hard" if cfg.hard_labels else ("stored" if job.soft_labels else "soft"),
            "seeds": seeds, "top1": accs, "top1_mean": statistics.fmean(accs),
            "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            # the students' own training + testing time; the seeds this call trained (the others were stored),
            # their time, and the wall time of the call, which held ``evaluated_with`` sets
            "seconds": sum(float(mine[s]["seconds"]) for s in seeds),
            "trained_seeds": sorted(trained), "trained_seconds": sum(float(r["seconds"]) for r in trained.values()),
            "wall_seconds": wall, "evaluated_with": len(jobs), "config": to_dict(cfg),
        }
        out_dir = Path(job.out_dir)
        atomic_write_json(out_dir / "summary.json", summary)
        if job.recipe_yaml is not None:
            atomic_write_text(out_dir / "config.yaml", job.recipe_yaml)
        summaries.append(summary)
    return summaries
