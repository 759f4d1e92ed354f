"""Evaluate stage: train fresh students on distilled sets and test them on the real val split, on Ray Train.

One Ray Train run holds every seed of every distilled set handed to it (the pipeline evaluates all of its sets
in one call, so the worker group starts once); ``split: seeds`` deals the (set, seed) students out to the
workers, ``split: data`` trains each student with DDP over the batch.  Soft labels come online from the
teacher or, with ``soft_labels=DIR``, from a relabel artifact.  Every finished student's record is kept at once
(:mod:`unidd_ray.artifacts.evaluation`), so a re-run after a crash, or with more seeds, trains only the seeds
missing; each set's ``summary.json`` holds ``top1_mean``, ``top1_std``, the per-seed values and the ``protocol``
(with ``paper`` also the test-selected figures, ``top1_selected``…).  ``evaluate.batch_size_by_ipc`` is resolved
for each set's IPC (its manifest's) before anything else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from unidd_ray.artifacts import distilled, evaluation, soft_labels
from unidd_ray.artifacts.dataset import verify_dataset
from unidd_ray.artifacts.files import atomic_write_json, check_output, sha256_json
from unidd_ray.artifacts.locks import output_lock
from unidd_ray.artifacts.teacher import check_teacher_data, load_teacher, read_teacher_info
from unidd_ray.config import EvaluateConfig, to_dict
from unidd_ray.core.evaluation import (PAPER, SELECTED_NOTE, TeacherLabels, check_batches, check_student,
                                       evaluate_students)
from unidd_ray.core.recovery import TorchDistReducer
from unidd_ray.keys import dataset_identity, distilled_identity, seed_key, teacher_identity
from unidd_ray.models import memory_format
from unidd_ray.runtime import console
from unidd_ray.runtime.cluster import require_resources
from unidd_ray.runtime.train import fit, trainer_factory

log = logging.getLogger(__name__)

RUN_NAME = "evaluate"
MEMO_BYTES = 256 << 20  # per set and worker: teacher logits kept for the set's next seeds
PROGRESS = "progress"  # under the run's storage: one file per student, its epochs done


@dataclass
class EvalJob:
    """One distilled set to evaluate: where it is, where its ``summary.json`` goes, and how."""

    distilled_dir: str | Path
    out_dir: str | Path
    cfg: EvaluateConfig
    soft_labels: str | Path | None = None
    recipe_yaml: str | None = None
    name: str = ""


@dataclass(frozen=True)
class _SetJob:
    """One set as its workers see it."""

    cfg: EvaluateConfig
    distilled_dir: str
    out_dir: str
    key: str  # what its students' results depend on (keys.seed_key)
    name: str
    soft_labels: str | None


@dataclass(frozen=True)
class _Run:
    """What every worker of an evaluation run is given: the sets, the (set, seed) students to train, where."""

    jobs: tuple[_SetJob, ...]
    tasks: tuple[tuple[int, int], ...]  # (job index, seed), in a fixed order
    split: str
    teacher_dir: str
    data_dir: str
    num_workers: int
    threads: int
    progress_dir: str


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


# ----------------------------------------------------------------------------- the workers
class _DistWrap(TorchDistReducer):
    """DDP helpers for the workers of ``split: data``: sums over the group (the recovery's reducer) and the
    DDP-wrapped student."""

    def wrap_model(self, model):
        return ray.train.torch.prepare_model(model, move_to_device=False)


def _progress_file(run: _Run, job: int, seed: int) -> Path:
    return Path(run.progress_dir) / f"{job}-{seed}.json"


def _evaluate_loop(config: dict) -> list[dict]:
    """One Ray Train worker: trains its share of the (set, seed) students of the run."""
    run: _Run = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, run.threads))
    device = ray.train.torch.get_device()
    teacher, tinfo = load_teacher(run.teacher_dir, device=device)
    by_seed = run.split == "seeds" and world > 1
    writes = by_seed or rank == 0  # who records a finished student (it survives a crash of the rest of the group)
    done = []
    loaded: dict[int, tuple] = {}
    for j, seed in deal(list(run.tasks), world)[rank] if by_seed else run.tasks:
        job = run.jobs[j]
        if j not in loaded:  # each worker loads a set once, for all of its seeds
            images, labels, _ = distilled.load_distilled(job.distilled_dir, mean=tinfo.mean, std=tinfo.std)
            soft = soft_labels.StoredSoftLabels(job.soft_labels, device=device) if job.soft_labels else None
            if soft is None and job.cfg.batch_size is None:  # full batch: the seeds' batches hold the same images
                soft = TeacherLabels(teacher, memo_bytes=MEMO_BYTES)
            loaded = {j: (images, labels, soft)}
        images, labels, soft = loaded[j]
        teacher.to(memory_format=memory_format(job.cfg.channels_last))

        def report(seed, epoch, acc, _job=job):
            if writes:
                log.info(f"[evaluate] {_job.name} seed {seed} epoch {epoch + 1}/{_job.cfg.epochs}: val top-1 {acc:.2f}%")

        def epoch_done(seed, epoch, _j=j):
            if writes:
                atomic_write_json(_progress_file(run, _j, seed), {"epochs": epoch + 1})

        t0 = time.perf_counter()
        (result,) = evaluate_students(images, labels, teacher, run.data_dir, job.cfg, num_classes=tinfo.num_classes,
                                      in_channels=tinfo.in_channels, resolution=tinfo.resolution, seeds=[seed],
                                      device=device, num_workers=run.num_workers, soft_labels=soft, report=report,
                                      shard=(0, 1) if by_seed else (rank, world),
                                      wrap=_DistWrap() if world > 1 and not by_seed else None, epoch_done=epoch_done,
                                      normalize=(tinfo.mean, tinfo.std))
        # the student's protocol, final top-1 and (paper) its late checks and their test-selected best
        record = {"job": j, **result, "seconds": time.perf_counter() - t0, "key": job.key}
        if writes:
            evaluation.write_seed_record(job.out_dir, record)
        done.append(record)
    if by_seed:
        gathered = [None] * world
        dist.all_gather_object(gathered, done)
        done = [r for part in gathered for r in part]
    return done  # Ray Train V2 hands rank 0's return value to the driver (Result.return_value)


# ----------------------------------------------------------------------------- checks
@dataclass
class CheckedJobs:
    """What :func:`check_evaluations` found: the data, the teacher, and each job's distilled manifest and
    :func:`unidd_ray.keys.distilled_identity`."""

    info: object
    tinfo: object
    manifests: list[dict]
    identities: list[str]


def _check_job(job: EvalJob, info, tinfo) -> tuple[dict, str]:
    """One job's output path, distilled set (verified), batches and stored soft labels."""
    check_output(job.out_dir, "evaluation")
    manifest = distilled.verify(job.distilled_dir)
    if manifest.get("dataset_fingerprint") != info.fingerprint:
        raise ValueError(f"{job.distilled_dir} was distilled from another dataset than the evaluation data")
    images = distilled.count(job.distilled_dir)
    check_batches(job.cfg, images=images)
    identity = distilled_identity(*distilled.identity_inputs(job.distilled_dir, manifest))
    if job.soft_labels is not None and not job.cfg.hard_labels:  # refuse mismatched labels before any worker
        soft_labels.check_soft_labels(job.soft_labels, job.cfg, images, teacher_sha256=tinfo.sha256,
                                      distilled=identity)
    return manifest, identity


def for_set(job: EvalJob) -> EvalJob:
    """``job`` with its settings for its set's IPC (``evaluate.batch_size_by_ipc``; the manifest's ``ipc``)."""
    if job.cfg.batch_size_by_ipc is None:
        return job
    return replace(job, cfg=job.cfg.for_ipc(distilled.manifest(job.distilled_dir).get("ipc")))


def check_evaluations(jobs: list[EvalJob], teacher_dir, data_dir) -> CheckedJobs:
    """Every check of an evaluation that can fail, before Ray or any worker starts: the prepared data
    (verified), the teacher and its agreement with the data, each job's output path, distilled set, batches
    and stored soft labels, and each student (built once for the teacher's classes and side)."""
    jobs = [for_set(j) for j in jobs]
    info = verify_dataset(data_dir)
    tinfo = read_teacher_info(teacher_dir)
    check_teacher_data(tinfo, info, teacher_dir, data_dir)
    layout = {(j.cfg.workers, j.cfg.cpus_per_worker, j.cfg.use_gpu, j.cfg.split) for j in jobs}
    if len(layout) > 1:
        raise ValueError(f"jobs evaluated together must share evaluate.workers, cpus_per_worker, use_gpu and "
                         f"split; got {sorted(layout, key=str)}: evaluate them in separate calls")
    checked = [_check_job(j, info, tinfo) for j in jobs]
    for cfg in {json.dumps([j.cfg.student, j.cfg.student_options], sort_keys=True): j.cfg for j in jobs}.values():
        check_student(cfg, num_classes=tinfo.num_classes, in_channels=tinfo.in_channels, resolution=tinfo.resolution)
    return CheckedJobs(info, tinfo, [m for m, _ in checked], [d for _, d in checked])


def job_key(job: EvalJob, identity: str, tinfo, info) -> str:
    """What a stored student of ``job`` must match to be reused (:func:`unidd_ray.keys.seed_key`)."""
    labels = None if not job.soft_labels or job.cfg.hard_labels else sha256_json(soft_labels.content_of(job.soft_labels))
    return seed_key(job.cfg, identity, teacher_identity(tinfo, info), dataset_identity(info), labels)


# ----------------------------------------------------------------------------- the driver
def run_evaluate(distilled_dir, teacher_dir, data_dir, out_dir, cfg: EvaluateConfig, *, storage_path,
                 soft_labels: str | Path | None = None, num_workers: int = 1,
                 recipe_yaml: str | None = None, wait: bool = False) -> dict:
    """Evaluate ``distilled_dir`` over ``cfg.seeds`` seeds; writes and returns ``summary.json``."""
    job = EvalJob(distilled_dir, out_dir, cfg, soft_labels=soft_labels, recipe_yaml=recipe_yaml)
    return run_evaluations([job], teacher_dir, data_dir, storage_path=storage_path, num_workers=num_workers,
                           wait=wait)[0]


def run_evaluations(jobs: list[EvalJob], teacher_dir, data_dir, *, storage_path, num_workers: int = 1,
                    wait: bool = False, trainer_class=None, progress: bool = True) -> list[dict]:
    """Evaluate several distilled sets in one Ray Train run (one worker group: its start-up is paid once) and
    write each set's ``summary.json``; returns the summaries in the order of ``jobs``.  Holds the lock of every
    job's output directory meanwhile (``wait``: see :func:`unidd_ray.artifacts.locks.output_lock`).

    All jobs share the worker layout (``workers``, ``cpus_per_worker``, ``use_gpu``, ``split``).  With
    ``split: seeds`` the (set, seed) tasks are dealt out to the workers; with ``split: data`` the workers train
    every student together.  ``trainer_class``: see :func:`unidd_ray.runtime.train.trainer_factory`;
    ``progress``: a progress bar per set.
    """
    if not jobs:
        return []
    jobs = [for_set(j) for j in jobs]  # each set's batch size for its IPC (evaluate.batch_size_by_ipc)
    with contextlib.ExitStack() as held:
        for out_dir in dict.fromkeys(Path(j.out_dir).resolve() for j in jobs):
            held.enter_context(output_lock(out_dir, wait=wait))
        checked = check_evaluations(jobs, teacher_dir, data_dir)
        keys = [job_key(j, d, checked.tinfo, checked.info) for j, d in zip(jobs, checked.identities)]
        stored = [evaluation.finished_seeds(j.out_dir, k) for j, k in zip(jobs, keys)]
        started = time.perf_counter()
        records = _train(jobs, keys, stored, teacher_dir, data_dir, storage_path=Path(storage_path).resolve(),
                         num_workers=num_workers, trainer_class=trainer_class, progress=progress)
        wall = time.perf_counter() - started
        return [_summarise(job, manifest, stored[i], {int(r["seed"]): r for r in records if int(r["job"]) == i},
                           wall=wall, evaluated_with=len(jobs))
                for i, (job, manifest) in enumerate(zip(jobs, checked.manifests))]


def _train(jobs: list[EvalJob], keys: list[str], stored: list[dict], teacher_dir, data_dir, *, storage_path: Path,
           num_workers: int, trainer_class, progress: bool) -> list[dict]:
    """Train every student not stored, in one Ray Train run; returns their records."""
    tasks = [(i, s) for i, j in enumerate(jobs) for s in range(j.cfg.seeds) if s not in stored[i]]
    if not tasks:
        return []
    cfg0 = jobs[0].cfg
    workers = min(cfg0.workers, len(tasks)) if cfg0.split == "seeds" else cfg0.workers  # none idle
    require_resources("evaluate", workers=workers, cpus=cfg0.cpus_per_worker, gpus=1 if cfg0.use_gpu else 0)
    shutil.rmtree(storage_path / RUN_NAME, ignore_errors=True)
    progress = storage_path / PROGRESS
    shutil.rmtree(progress, ignore_errors=True)
    progress.mkdir(parents=True)
    run = _Run(jobs=tuple(_SetJob(j.cfg, str(Path(j.distilled_dir).resolve()), str(Path(j.out_dir).resolve()), k,
                                  j.name or Path(j.distilled_dir).name,
                                  str(Path(j.soft_labels).resolve()) if j.soft_labels else None)
                          for j, k in zip(jobs, keys)),
               tasks=tuple(tasks), split=cfg0.split, teacher_dir=str(Path(teacher_dir).resolve()),
               data_dir=str(Path(data_dir).resolve()), num_workers=num_workers,
               threads=max(1, int(cfg0.cpus_per_worker)), progress_dir=str(progress))
    extra = {} if trainer_class is None else {"trainer_class": trainer_class}
    trainer = trainer_factory(_evaluate_loop, {"run": run}, name=RUN_NAME, storage_path=storage_path,
                              workers=workers, cpus_per_worker=cfg0.cpus_per_worker, use_gpu=cfg0.use_gpu,
                              keep_checkpoints=None, **extra)
    with contextlib.ExitStack() as bars:
        for i, job in enumerate(run.jobs):
            mine = [seed for j, seed in tasks if j == i]
            if mine:
                bars.enter_context(console.watch(lambda i=i, mine=mine: sum(_epochs(run, i, s) for s in mine),
                                                 len(mine) * job.cfg.epochs, f"evaluate {job.name}", unit="epoch",
                                                 enabled=progress))
        # no retries: every finished seed is kept, so a re-run trains only the missing ones
        result = fit(trainer, what="evaluate", max_failures=0)
    if result.error is not None or result.return_value is None:
        names = ", ".join(str(j.distilled_dir) for j in jobs)
        raise RuntimeError(f"evaluation of {names} failed: {result.error}")
    return list(result.return_value)


def _epochs(run: _Run, job: int, seed: int) -> int:
    try:
        return int(json.loads(_progress_file(run, job, seed).read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return 0


def _summarise(job: EvalJob, manifest: dict, stored: dict[int, dict], trained: dict[int, dict], *, wall: float,
               evaluated_with: int) -> dict:
    """Write and return the set's summary of seeds 0 … seeds − 1 from its stored and newly trained students."""
    mine = {**stored, **trained}
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
        "wall_seconds": wall, "evaluated_with": evaluated_with, "config": to_dict(cfg),
        "protocol": cfg.protocol,
    }
    if cfg.protocol == PAPER:  # the best of each student's late tests, chosen on the test set as the paper does
        selected = [float(mine[s]["top1_selected"]) for s in seeds]
        summary.update(top1_selected=selected, top1_selected_mean=statistics.fmean(selected),
                       top1_selected_std=statistics.stdev(selected) if len(selected) > 1 else 0.0,
                       selected_epochs=[int(mine[s]["selected_epoch"]) for s in seeds],
                       top1_selected_note=SELECTED_NOTE)
    evaluation.write_summary(job.out_dir, summary, job.recipe_yaml)
    return summary
