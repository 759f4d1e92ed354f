"""``unidd-ray pipeline``: prepare → squeeze → stats → recover → evaluate → results (+ report).

Every stage writes into a directory named by a content key: the sha256 of the
settings that change its result and of the identities of its inputs (dataset
fingerprint, teacher sha256, statistics key, distilled set).  A stage whose
directory is complete is reused; a stage killed half-way resumes (squeeze and
recover continue from their Ray Train checkpoints, evaluation keeps every
finished seed, and its key leaves out the seed count, so more seeds train only
the new students).  A recovery's key holds the recover settings its method reads
(``UNREAD_RECOVER_SETTINGS``), so changing one method's settings (cfm's ``beta_max``, sre2l's
``bn_weight``) redoes only that method's recovery and evaluation; a setting every method reads
(``lr``, ``iterations``) redoes them all.  All recoveries run first; then every set
still lacking a ``summary.json`` of the seeds asked for is evaluated in a single Ray Train run, so the
worker group (process start, imports, teacher load) is set up once.  Recoveries run
side by side when the cluster holds several of their worker groups at once
(``parallel_recoveries``): on a small CPU machine one thread does ~0.8× the work
of two on a small batch, so one-thread recoveries side by side get 1.3–1.4× the
throughput of two-thread ones in turn (benchmarks/parallel_recoveries.py).
Settings that only affect speed (actor and worker CPU counts, retries, fault
injection, memory layout) are left out of the keys; thread counts and memory
layout change floating-point summation order, not the computation.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from unidd_ray.artifacts import atomic_write_json, atomic_write_text, read_manifest, sha256_json
from unidd_ray.config import EvaluateConfig, Recipe, RecoverConfig, recipe_to_yaml, to_dict

PERFORMANCE_KEYS = {
    "stats": {"actors", "cpus_per_actor", "gpus_per_actor", "max_retries", "blocks_per_unit"},
    "recover": {"cpus_per_worker", "use_gpu", "max_failures", "fail_at_batch", "save_beton", "channels_last"},
    "evaluate": {"workers", "cpus_per_worker", "use_gpu", "eval_batch_size", "channels_last"},
    "squeeze": {"cpus_per_worker", "use_gpu", "max_failures", "eval_batch_size"},
    "data": {"num_workers"},
}
# Settings that say how much of a stage's work to do, not what any piece of it computes: the evaluation's seed
# count (seed k's student is the same for any count), so a run with more seeds trains only the new ones.
EXTENT_KEYS = {
    "evaluate": {"seeds"},
}
# Settings added after stage directories existed: left out of the key while at these values, so that
# adding a setting keeps every earlier directory valid (a run of the old code computed exactly this).
NEUTRAL_DEFAULTS = {
    "recover": {"precision": "float64", "alpha_scale": "constant"},
}
BASELINES = {"random": False, "random-hard": True}  # real subsets: soft-label and hard-label evaluation
# Recover settings a method does not read (distill.method_filter and Distiller), left out of its recovery's key;
# every setting not named here is in it.  The spectral filters' parameters: cfm's resolvent reads beta_max,
# schedule, beta_min and precision, krr's only beta_max and precision, mtt's mtt_eta and mtt_steps; the
# matching terms (alpha, alpha_scale, signal, covariance, emu) are the spectral methods'; bn_weight is sre2l's.
# cfm keeps every setting, read or not: its key is the one its stored recoveries were made under.
_FILTER_SETTINGS = ("beta_max", "schedule", "beta_min", "precision", "mtt_eta", "mtt_steps")
_MATCHING_SETTINGS = ("alpha", "alpha_scale", "signal", "covariance", "emu")
UNREAD_RECOVER_SETTINGS = {
    "cfm": (),
    "krr": ("schedule", "beta_min", "mtt_eta", "mtt_steps", "bn_weight"),
    "dc": _FILTER_SETTINGS + ("bn_weight",),
    "dm": _FILTER_SETTINGS + ("bn_weight",),
    "mtt": ("beta_max", "schedule", "beta_min", "precision", "bn_weight"),
    "sre2l": _FILTER_SETTINGS + _MATCHING_SETTINGS,
    "ce": _FILTER_SETTINGS + _MATCHING_SETTINGS + ("bn_weight",),
}


def key_settings(kind: str, settings: dict) -> dict:
    """The settings of a ``kind`` stage that go into its key: its performance and extent settings and
    settings at their neutral defaults left out."""
    drop = PERFORMANCE_KEYS.get(kind, set()) | EXTENT_KEYS.get(kind, set())
    neutral = NEUTRAL_DEFAULTS.get(kind, {})
    return {k: v for k, v in settings.items() if k not in drop and not (k in neutral and v == neutral[k])}


def stage_key(kind: str, settings: dict, **inputs) -> str:
    return _hashed_key(kind, key_settings(kind, settings), inputs)


def _hashed_key(kind: str, settings: dict, inputs: dict) -> str:
    """A stage directory's key from the settings that go into it and its inputs."""
    return sha256_json({"kind": kind, "settings": settings, "inputs": inputs})[:12]


def dataset_identity(info) -> dict:
    """The prepared dataset as a stage input: its fingerprint and, for JPEG storage, how it was stored."""
    return {"fingerprint": info.fingerprint, **lossy_storage(info)}


def lossy_storage(info) -> dict:
    """Stage-key inputs for how a prepared dataset was stored, when that changes its pixels.

    Raw storage is a function of the source alone (its fingerprint is in every key already); JPEG
    storage also depends on the size cap and quality, so a teacher, statistics or evaluation made on
    one JPEG copy is not reused for another.
    """
    if info.storage == "raw":
        return {}
    return {"storage": {"storage": info.storage, "max_resolution": info.max_resolution,
                        "jpeg_quality": info.jpeg_quality, "write_mode": info.write_mode}}


# ----------------------------------------------------------------------------- stage keys
# Each stage's directory is named by one of these; they compute the key only and run nothing.
def data_key(recipe: Recipe) -> str:
    """The prepared dataset's key: the source and how it is stored (``data.resolution``, the side the
    teacher and students train at, is not read by prepare)."""
    return stage_key("data", {k: v for k, v in to_dict(recipe.data).items() if k != "resolution"})


def legacy_data_key(recipe: Recipe) -> str:
    """The key prepared datasets had before 2026-12 (``data.resolution`` in): a complete one is still reused."""
    return stage_key("data", to_dict(recipe.data))


def teacher_key(recipe: Recipe, info) -> str:
    """The teacher's key, on the prepared dataset ``info``."""
    return stage_key("squeeze", {**to_dict(recipe.squeeze), **to_dict(recipe.teacher)}, dataset=info.fingerprint,
                     resolution=recipe.data.resolution, **lossy_storage(info))


def stats_key(recipe: Recipe, info, tinfo) -> str:
    """The real statistics' key under the teacher ``tinfo``."""
    return stage_key("stats", to_dict(recipe.stats), teacher=tinfo.sha256, dataset=info.fingerprint,
                     **lossy_storage(info))


def random_key(recipe: Recipe, ipc: int, info, tinfo) -> str:
    """The random real subset's key.  It is written at the teacher's side, like the recovered sets (an input
    only when that differs from the stored side, so that earlier directories keep their keys)."""
    resolution = {} if tinfo.resolution == info.resolution else {"resolution": tinfo.resolution}
    return stage_key("random", {"ipc": ipc, "seed": recipe.recover_for(ipc).seed}, dataset=info.fingerprint,
                     **lossy_storage(info), **resolution)


def recover_settings(cfg: RecoverConfig) -> dict:
    """The settings of ``cfg`` that its method reads (``UNREAD_RECOVER_SETTINGS`` left out)."""
    unread = UNREAD_RECOVER_SETTINGS.get(cfg.method, ())
    return {k: v for k, v in to_dict(cfg).items() if k not in unread}


def recover_key(cfg: RecoverConfig, info, tinfo, stats: str | None) -> str:
    """A recovery's key; ``stats``: the statistics key for a spectral method, else None."""
    return stage_key("recover", recover_settings(cfg), teacher=tinfo.sha256, dataset=info.fingerprint, stats=stats,
                     **lossy_storage(info))


def data_parallel_input(cfg: EvaluateConfig) -> dict:
    """The evaluation's worker count where it changes the result: with ``split: data`` it shards every batch
    (and each worker's BatchNorm sees its shard only); with ``split: seeds`` it is a performance setting."""
    return {"data_parallel_workers": cfg.workers} if cfg.split == "data" and cfg.workers > 1 else {}


def evaluate_settings(cfg: EvaluateConfig) -> dict:
    """What an evaluation's result depends on among its settings: those of its key, which is also what a
    stored per-seed result must have been made with to be reused."""
    return {**key_settings("evaluate", to_dict(cfg)), **data_parallel_input(cfg)}


def evaluate_key(cfg: EvaluateConfig, info, tinfo, distilled: str) -> str:
    """An evaluation's key: its settings but the seed count, the teacher, the dataset and the distilled
    set's images (``distilled``: :func:`unidd_ray.stages.evaluate.distilled_identity`)."""
    return stage_key("evaluate", to_dict(cfg), teacher=tinfo.sha256, distilled=distilled,
                     dataset=info.fingerprint, **lossy_storage(info), **data_parallel_input(cfg))


def legacy_evaluate_key(cfg: EvaluateConfig, info, tinfo, distilled_files: dict) -> str:
    """The key evaluation directories had before 2026-12 (seed count in, the distilled set's whole manifest
    file list, no dataset fingerprint): a finished one is still reused."""
    return _hashed_key("evaluate", {**key_settings("evaluate", to_dict(cfg)), "seeds": cfg.seeds},
                       {"teacher": tinfo.sha256, "distilled": sha256_json(distilled_files), **lossy_storage(info),
                        **data_parallel_input(cfg)})


def _storage(stage_dir: Path, recipe: Recipe) -> Path:
    """Ray Train checkpoints of a stage: beside it, or under the recipe's shared ``storage_path``."""
    from unidd_ray.artifacts import stage_storage

    return stage_storage(stage_dir, recipe.storage_path)


def _log(msg: str) -> None:
    print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _evaluated(eval_dir: Path, seeds: int) -> bool:
    """``eval_dir`` holds a summary of seeds 0 … ``seeds`` − 1."""
    try:
        summary = json.loads((eval_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("seeds") == list(range(seeds))


def _complete_distilled(path: Path) -> bool:
    try:
        read_manifest(path, "distilled", verify=False)
    except ValueError:
        return False
    return True


def _recorded_stat(data_dir: Path) -> str | None:
    from unidd_ray.data.dataset_info import SOURCE_STAT_FILE

    try:
        return json.loads((data_dir / SOURCE_STAT_FILE).read_text()).get("stat")
    except (OSError, ValueError, AttributeError):
        return None


def _record_stat(data_dir: Path, origin: str, stat: str | None) -> None:
    from unidd_ray.data.dataset_info import SOURCE_STAT_FILE

    if stat is not None:
        atomic_write_json(data_dir / SOURCE_STAT_FILE, {"origin": origin, "stat": stat})


def prepare_stage(recipe: Recipe, run: Path):
    """The prepared dataset of the recipe: reused when complete and made from the source as it is now.

    A prepared directory is named by the recipe's data settings and records a stat signature of its
    source's files (:func:`unidd_ray.data.hashing.source_stat`: paths, sizes, modification times).  While
    that matches, the directory is reused without reading the source.  When it does not (or a directory
    from before the record has none), the source is read and fingerprinted: a directory prepared from
    those bytes is reused and its record refreshed; otherwise the source changed in place and is
    prepared again into ``data-<key>-<source fingerprint>``, beside the directory of the old bytes, so the
    stages made on those keep theirs (every later key holds the prepared dataset's fingerprint).
    """
    from unidd_ray.data.hashing import source_stat
    from unidd_ray.data.prepare import prepare_dataset, read_dataset_info
    from unidd_ray.data.sources import load_source

    key = data_key(recipe)
    candidates = dict.fromkeys([run / f"data-{key}", run / f"data-{legacy_data_key(recipe)}",
                                *sorted(run.glob(f"data-{key}-*"))])
    complete = {d: read_dataset_info(d) for d in candidates if (d / "dataset.json").is_file()}
    # one walk per origin (the candidates share theirs), taken before the source is read: a file changed
    # while it is read then fails the next run's check instead of passing it
    stats = {origin: source_stat(origin) for origin in {info.source.get("origin", "") for info in complete.values()}}
    for data_dir, info in complete.items():
        stat = stats[info.source.get("origin", "")]
        if stat is None or stat == _recorded_stat(data_dir):
            _log(f"prepare: reusing {data_dir}")
            return data_dir, info
    source = load_source(recipe.data.dataset, recipe.data.root, **recipe.data.options)
    stat = stats[source.origin] if source.origin in stats else source_stat(source.origin)
    for data_dir, info in complete.items():
        if info.source.get("fingerprint") == source.fingerprint:
            _log(f"prepare: reusing {data_dir} (its source {source.origin} was read again: same bytes)")
            _record_stat(data_dir, source.origin, stat)
            return data_dir, info
    data_dir = run / f"data-{key}"
    if data_dir in complete:
        previous = complete[data_dir].source.get("fingerprint", "?")
        data_dir = run / f"data-{key}-{source.fingerprint[:12]}"
        _log(f"prepare: the source {source.origin} changed since it was prepared (fingerprint {previous[:12]} -> "
             f"{source.fingerprint[:12]}): preparing it again -> {data_dir}")
    else:
        _log(f"prepare: {recipe.data.dataset} -> {data_dir}")
    info = prepare_dataset(source, data_dir, max_resolution=recipe.data.max_resolution,
                           jpeg_quality=recipe.data.jpeg_quality)
    if source_stat(source.origin) == stat:  # not touched while it was written: the record stands for these bytes
        _record_stat(data_dir, source.origin, stat)
    return data_dir, read_dataset_info(data_dir)


def teacher_stage(recipe: Recipe, run: Path, data_dir: Path, info, recipe_yaml: str | None = None):
    """The trained teacher (reused when complete, resumed when a previous run was killed)."""
    from unidd_ray.stages.squeeze import squeeze
    from unidd_ray.teacher import load_teacher, read_teacher_info

    teacher_dir = run / f"teacher-{teacher_key(recipe, info)}"
    try:
        load_teacher(teacher_dir)
        _log(f"squeeze: reusing {teacher_dir}")
    except ValueError:
        resume = (_storage(teacher_dir, recipe) / "squeeze").exists()
        _log(f"squeeze: training {recipe.teacher.arch} -> {teacher_dir}" + (" (resuming)" if resume else ""))
        squeeze(data_dir, teacher_dir, squeeze_cfg=recipe.squeeze, model_cfg=recipe.teacher, data_cfg=recipe.data,
                storage_path=_storage(teacher_dir, recipe), resume=resume, recipe_yaml=recipe_yaml)
    return teacher_dir, read_teacher_info(teacher_dir)


def stats_stage(recipe: Recipe, run: Path, data_dir: Path, info, teacher_dir: Path, tinfo,
                recipe_yaml: str | None = None):
    """The real statistics under the teacher (reused when complete); returns (directory, key)."""
    from unidd_ray.stages.stats import run_stats

    key = stats_key(recipe, info, tinfo)
    stats_dir = run / f"stats-{key}"
    try:
        read_manifest(stats_dir, "stats")
        _log(f"stats: reusing {stats_dir}")
    except ValueError:
        _log(f"stats: {recipe.stats.actors} actors -> {stats_dir}")
        run_stats(data_dir, teacher_dir, stats_dir, recipe.stats, num_workers=recipe.data.num_workers,
                  recipe_yaml=recipe_yaml)
    return stats_dir, key


@dataclass(frozen=True)
class _Recovery:
    method: str
    ipc: int
    cfg: RecoverConfig
    out: Path
    stats_dir: Path | None


def recovery_concurrency(recipe: Recipe, cfgs: list[RecoverConfig] | None = None) -> int:
    """How many recoveries run at once: ``recipe.parallel_recoveries``, or as many of the largest worker group
    among ``cfgs`` (``workers`` × ``cpus_per_worker`` CPUs, one GPU per worker with ``use_gpu``; default: the
    ``recover`` section's) as the Ray cluster holds side by side now; at least one."""
    if recipe.parallel_recoveries is not None:
        return recipe.parallel_recoveries
    import ray

    if not ray.is_initialized():
        return 1
    have = ray.cluster_resources()

    def fits(cfg: RecoverConfig) -> int:
        n = int(have.get("CPU", 0) // (cfg.workers * cfg.cpus_per_worker)) if cfg.cpus_per_worker > 0 else 1
        return min(n, int(have.get("GPU", 0) // cfg.workers)) if cfg.use_gpu else n

    return max(1, min(fits(cfg) for cfg in (cfgs or [recipe.recover])))


T = TypeVar("T")


def run_at_most(at_once: int, tasks: list[Callable[[], T]]) -> list[T]:
    """Call every task, at most ``at_once`` at a time, and return their results in order.

    Several at a time: daemon threads each take the next task until none is left, so a Ctrl-C in
    the driver ends the process at once (every recovery resumes from its checkpoints).  After a
    task fails no new task starts; those running finish, then the first error is raised.
    """
    if at_once <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    results: list = [None] * len(tasks)
    errors: list[BaseException] = []
    lock = threading.Lock()
    queue = iter(range(len(tasks)))

    def worker() -> None:
        while True:
            with lock:
                i = None if errors else next(queue, None)
            if i is None:
                return
            try:
                results[i] = tasks[i]()
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True, name=f"pipeline-{k}")
               for k in range(min(at_once, len(tasks)))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    if errors:
        raise errors[0]
    return results


def run_pipeline(recipe: Recipe, *, report: bool = True) -> dict:
    from unidd_ray.distill import METHODS, SPECTRAL_METHODS
    from unidd_ray.stages.evaluate import (SEEDS, EvalJob, check_student, distilled_identity, finished_seeds,
                                          reusable_keys, run_evaluations, validate_evaluate, write_real_subset)
    from unidd_ray.stages.recover import run_recover, validate_inputs

    unknown = [m for m in recipe.methods if m not in METHODS and m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown methods {unknown} in the recipe; choose from {list(BASELINES) + list(METHODS)}")
    if recipe.parallel_recoveries is not None and recipe.parallel_recoveries < 1:
        raise ValueError(f"parallel_recoveries must be at least 1 (or null: as many as the cluster holds), "
                         f"got {recipe.parallel_recoveries}")
    validate_evaluate(recipe.evaluate)  # the evaluation's settings, before hours of squeeze and recovery
    started = time.perf_counter()
    run = recipe.run_dir.resolve()
    if recipe.ray_address or os.environ.get("RAY_ADDRESS"):
        _log(f"writing to {run}: on a cluster this must be storage that outlives the job (e.g. /mnt/shared)")
    run.mkdir(parents=True, exist_ok=True)
    recipe_yaml = recipe_to_yaml(recipe)
    atomic_write_text(run / "config.yaml", recipe_yaml)
    data_dir, info = prepare_stage(recipe, run)
    teacher_dir, tinfo = teacher_stage(recipe, run, data_dir, info, recipe_yaml)
    stages: dict[str, str] = {"data": str(data_dir), "teacher": str(teacher_dir)}
    _log(f"teacher val top-1 {tinfo.val_top1:.2f}%")
    # what the evaluation can only check with the teacher: its student, and every set's batches (a set holds
    # IPC images of every class), before any statistics or recovery
    check_student(recipe.evaluate, tinfo)
    for ipc in recipe.ipcs:
        validate_evaluate(recipe.evaluate, images=ipc * tinfo.num_classes)
    stats_dir = stats_id = None
    if any(m in SPECTRAL_METHODS for m in recipe.methods):
        stats_dir, stats_id = stats_stage(recipe, run, data_dir, info, teacher_dir, tinfo, recipe_yaml)
        stages["stats"] = str(stats_dir)

    # ---- take the real subsets and plan the recoveries (every IPC and method)
    rows = [{"method": "teacher (full data)", "ipc": None, "top1_mean": tinfo.val_top1, "top1_std": None,
             "seeds": None, "seconds": None}]
    sets = []  # (method, ipc, distilled directory)
    seconds: dict[tuple[str, int], float] = {}  # time spent producing each set in this run
    recoveries = []  # the recoveries still to run
    for ipc in recipe.ipcs:
        if recipe.recover_by_ipc.get(ipc):
            entry = ", ".join(f"{k}={v}" for k, v in recipe.recover_by_ipc[ipc].items())
            _log(f"IPC {ipc}: recover_by_ipc sets {entry} over the recover section")
        for method in recipe.methods:
            if method in BASELINES:
                distilled = run / f"random-ipc{ipc}-{random_key(recipe, ipc, info, tinfo)}"
                t0 = time.perf_counter()
                if not _complete_distilled(distilled):
                    _log(f"random real subset, IPC {ipc} -> {distilled}")
                    write_real_subset(data_dir, distilled, ipc=ipc, seed=recipe.recover_for(ipc).seed,
                                      num_workers=recipe.data.num_workers, recipe_yaml=recipe_yaml,
                                      resolution=tinfo.resolution)
                seconds[method, ipc] = time.perf_counter() - t0
            else:
                cfg = recipe.recover_for(ipc, method=method)
                spectral = method in SPECTRAL_METHODS
                key = recover_key(cfg, info, tinfo, stats_id if spectral else None)
                distilled = run / f"{method}-ipc{ipc}-{key}"
                if _complete_distilled(distilled):
                    _log(f"recover {method} IPC {ipc}: reusing {distilled}")
                    seconds[method, ipc] = 0.0
                else:
                    recoveries.append(_Recovery(method, ipc, cfg, distilled, stats_dir if spectral else None))
            sets.append((method, ipc, distilled))
            stages[f"{method}-ipc{ipc}"] = str(distilled)

    # ---- recover, several at once when the cluster holds their worker groups side by side; every
    # recovery's inputs are checked first, so bad input fails before any of them starts
    checked = [validate_inputs(data_dir, teacher_dir, job.stats_dir, job.cfg) for job in recoveries]
    at_once = min(len(recoveries), recovery_concurrency(recipe, [j.cfg for j in recoveries])) if recoveries else 0
    if at_once > 1:
        _log(f"{len(recoveries)} recoveries, {at_once} at a time")

    def recover(job: _Recovery, inputs: tuple) -> float:
        t0 = time.perf_counter()
        resume = (job.out.parent / f"{job.out.name}.partial" / "plan.json").is_file()
        _log(f"recover {job.method} IPC {job.ipc} -> {job.out}" + (" (resuming)" if resume else ""))
        # the set's config.yaml: the recipe with this recovery's resolved recover section (method, IPC, its
        # recover_by_ipc entry)
        run_recover(data_dir, teacher_dir, job.stats_dir, job.out, job.cfg, storage_path=_storage(job.out, recipe),
                    resume=resume, num_workers=recipe.data.num_workers, checked=inputs,
                    recipe_yaml=recipe_to_yaml(replace(recipe, recover=job.cfg)))
        spent = time.perf_counter() - t0
        _log(f"recover {job.method} IPC {job.ipc}: done in {spent:.0f}s")
        return spent

    tasks = [partial(recover, job, inputs) for job, inputs in zip(recoveries, checked)]
    for job, spent in zip(recoveries, run_at_most(at_once, tasks)):
        seconds[job.method, job.ipc] = spent

    planned = []  # (method, ipc, eval_dir, EvalJob, seconds spent on the set)
    job_keys = {}  # id(EvalJob) -> the keys of the per-seed results it takes
    for method, ipc, distilled in sets:
        hard = BASELINES.get(method, False)
        eval_cfg = replace(recipe.evaluate, hard_labels=hard or recipe.evaluate.hard_labels)
        prefix = f"eval-{method}-ipc{ipc}"
        manifest = read_manifest(distilled, "distilled", verify=False)
        identity = distilled_identity(distilled, manifest)
        eval_dir = run / f"{prefix}-{evaluate_key(eval_cfg, info, tinfo, identity)}"
        legacy = run / f"{prefix}-{legacy_evaluate_key(eval_cfg, info, tinfo, manifest['files'])}"
        if not _evaluated(eval_dir, eval_cfg.seeds) and (legacy / "summary.json").is_file():
            eval_dir = legacy
        elif (legacy / SEEDS).is_dir() and not eval_dir.exists():  # a run interrupted under the old key: its
            legacy.rename(eval_dir)  # finished seeds move to the new directory (their old keys are accepted)
        job = EvalJob(distilled, eval_dir, eval_cfg, recipe_yaml=recipe_yaml, name=f"{method} IPC {ipc}")
        planned.append((method, ipc, eval_dir, job, seconds[method, ipc]))
        job_keys[id(job)] = reusable_keys(job, identity, manifest, tinfo.sha256, dataset_identity(info))
        stages[prefix] = str(eval_dir)

    # ---- evaluate every set that lacks a summary of the seeds asked for, in one worker group
    todo = [job for _, _, eval_dir, job, _ in planned if not _evaluated(eval_dir, job.cfg.seeds)]
    pending = {id(job) for job in todo}
    for method, ipc, eval_dir, job, _ in planned:
        if id(job) in pending:
            stored = [s for s in finished_seeds(eval_dir, job_keys[id(job)]) if s < job.cfg.seeds]
            _log(f"evaluate {method} IPC {ipc}: {job.cfg.seeds} seeds" + (f", {len(stored)} stored" if stored else "")
                 + f", student {job.cfg.student}")
        else:
            _log(f"evaluate {method} IPC {ipc}: reusing {eval_dir}")
    eval_wall = 0.0
    if todo:
        t0 = time.perf_counter()
        run_evaluations(todo, teacher_dir, data_dir, storage_path=_storage(run / "evaluate", recipe),
                        num_workers=recipe.data.num_workers)
        eval_wall = time.perf_counter() - t0
    summaries = {str(eval_dir): json.loads((eval_dir / "summary.json").read_text()) for _, _, eval_dir, _, _ in planned}
    student_seconds = sum(summaries[str(job.out_dir)]["trained_seconds"] for job in todo) or 1.0
    for method, ipc, eval_dir, job, set_seconds in planned:
        summary = summaries[str(eval_dir)]
        # the shared evaluation's wall time, apportioned by the students' own time
        share = eval_wall * summary["trained_seconds"] / student_seconds if id(job) in pending else 0.0
        rows.append({"method": method, "ipc": ipc, "top1_mean": summary["top1_mean"],
                     "top1_std": summary["top1_std"], "seeds": len(summary["seeds"]),
                     "seconds": round(set_seconds + share, 1), "labels": summary["labels"],
                     "top1": summary["top1"]})
    results = {"recipe": recipe.name, "dataset": info.name, "teacher": {"arch": tinfo.arch,
                                                                        "val_top1": tinfo.val_top1},
               "rows": rows, "stages": stages, "seconds": time.perf_counter() - started}
    atomic_write_json(run / "results.json", results)
    table = results_markdown(results)
    atomic_write_text(run / "results.md", table)
    atomic_write_json(run / "pipeline.json", {"stages": stages, "config": str(run / "config.yaml")})
    print(table, flush=True)
    if report:
        from unidd_ray.analysis.report import write_report

        path = write_report(run)
        _log(f"report -> {path}")
    _log(f"done in {results['seconds']:.0f}s -> {run}")
    return results


def results_markdown(results: dict) -> str:
    lines = [f"# {results['recipe']}: distillation results ({results['dataset']})", "",
             "| method | IPC | labels | top-1 (%) | seeds | wall time (s) |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        acc = f"{r['top1_mean']:.2f}" + (f" ± {r['top1_std']:.2f}" if r.get("top1_std") is not None else "")
        lines.append(f"| {r['method']} | {r['ipc'] if r['ipc'] is not None else '–'} | {r.get('labels', '–')} | "
                     f"{acc} | {r['seeds'] or '–'} | {r['seconds'] if r['seconds'] is not None else '–'} |")
    return "\n".join(lines) + "\n"
