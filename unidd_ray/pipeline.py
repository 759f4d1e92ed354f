"""``unidd-ray pipeline``: prepare → squeeze → stats → recover → evaluate → results (+ report).

Every stage writes into a directory named by a content key: the sha256 of the
settings that change its result and of the identities of its inputs (dataset
fingerprint, teacher sha256, statistics key, distilled set).  A stage whose
directory is complete is reused; a stage killed half-way resumes (squeeze and
recover continue from their Ray Train checkpoints, evaluation keeps every
finished seed, and its key leaves out the seed count, so more seeds train only
the new students).  A recovery's key holds the recover settings its method reads
(its :mod:`unidd_ray.methods` entry's ``unread`` left out), so changing one method's settings
(cfm's ``beta_max``, sre2l's ``bn_weight``) redoes only that method's recovery and evaluation; a
setting every method reads (``lr``, ``iterations``) redoes them all.  A reused stage is verified
first (checksums of every file it holds); a damaged one is computed again.  All recoveries run first; then every set
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
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from unidd_ray.artifacts import (RUN_RECORD, atomic_write_json, atomic_write_text, check_output, read_manifest,
                                 sha256_json)
from unidd_ray.config import ConfigError, EvaluateConfig, Recipe, RecoverConfig, recipe_to_yaml, to_dict
from unidd_ray.locks import output_lock
from unidd_ray.methods import BASELINES, get_method
from unidd_ray.ray_utils import init_ray

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
    """The settings of ``cfg`` that its method reads (its registry entry's ``unread`` left out)."""
    unread = get_method(cfg.method).unread
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
    return isinstance(summary, dict) and summary.get("seeds") == list(range(seeds))


def _discard(path: Path, why: BaseException | str) -> None:
    """Remove a stage directory of this run that failed its checks, so that the stage runs again.  Only
    directories the pipeline named itself inside the run directory it holds the lock of come here."""
    _log(f"{path.name} is damaged ({why}); computing it again")
    aside = path.parent / f".{path.name}.damaged"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _intact(path: Path, check: Callable[[Path], object]) -> bool:
    """Whether the stage directory ``path`` is complete and passes ``check`` (its verifier: checksums and all);
    a directory that exists but fails is discarded.  A directory that does not exist is simply not there."""
    if not path.exists():
        return False
    try:
        check(path)
    except (ValueError, OSError) as exc:
        _discard(path, exc)
        return False
    return True


def _verified_dataset(data_dir: Path):
    """The dataset in ``data_dir`` with its files verified, or None (a damaged one is discarded)."""
    from unidd_ray.data.dataset_info import verify_dataset

    return verify_dataset(data_dir) if _intact(data_dir, verify_dataset) else None


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
    stages made on those keep theirs (every later key holds the prepared dataset's fingerprint).  A prepared
    directory whose files fail their checksums is discarded and prepared again.
    """
    from unidd_ray.data.hashing import source_stat
    from unidd_ray.data.prepare import prepare_dataset, read_dataset_info
    from unidd_ray.data.sources import load_source

    key = data_key(recipe)
    candidates = dict.fromkeys([run / f"data-{key}", run / f"data-{legacy_data_key(recipe)}",
                                *sorted(run.glob(f"data-{key}-*"))])
    # complete directories, their files verified (a damaged one is discarded and prepared again)
    complete = {d: info for d in candidates if (info := _verified_dataset(d)) is not None}
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
    """The trained teacher (reused when intact, resumed when a previous run was killed, trained again when
    damaged)."""
    from unidd_ray.stages.squeeze import squeeze
    from unidd_ray.teacher import check_teacher_data, load_teacher, read_teacher_info

    teacher_dir = run / f"teacher-{teacher_key(recipe, info)}"

    def check(path: Path) -> None:
        check_teacher_data(load_teacher(path)[1], info, path, data_dir)

    if _intact(teacher_dir, check):
        _log(f"squeeze: reusing {teacher_dir}")
    else:
        resume = (_storage(teacher_dir, recipe) / "squeeze").exists()
        _log(f"squeeze: training {recipe.teacher.arch} -> {teacher_dir}" + (" (resuming)" if resume else ""))
        squeeze(data_dir, teacher_dir, squeeze_cfg=recipe.squeeze, model_cfg=recipe.teacher, data_cfg=recipe.data,
                storage_path=_storage(teacher_dir, recipe), resume=resume, recipe_yaml=recipe_yaml)
    return teacher_dir, read_teacher_info(teacher_dir)


def stats_stage(recipe: Recipe, run: Path, data_dir: Path, info, teacher_dir: Path, tinfo,
                recipe_yaml: str | None = None):
    """The real statistics under the teacher (reused when intact, computed again when damaged); returns
    (directory, key)."""
    from unidd_ray.stages.stats import run_stats
    from unidd_ray.stats_io import load_stats

    key = stats_key(recipe, info, tinfo)
    stats_dir = run / f"stats-{key}"
    if _intact(stats_dir, lambda d: load_stats(d, teacher_sha256=tinfo.sha256, dataset_fingerprint=info.fingerprint)):
        _log(f"stats: reusing {stats_dir}")
    else:
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


def run_pipeline(recipe: Recipe, *, report: bool = True, wait: bool = False) -> dict:
    """Run every stage of ``recipe`` into its run directory, reusing what is there; returns the results.

    The run directory must be new, empty or a run directory (:func:`unidd_ray.artifacts.check_output`), and
    the pipeline holds its lock throughout (``wait``: queue behind another run instead of refusing)."""
    run = recipe.run_dir.resolve()
    check_output(run, "run", option="out (--set out=DIR)")
    with output_lock(run, wait=wait, notify=_log):
        return _run(recipe, run, report=report)


def _run(recipe: Recipe, run: Path, *, report: bool) -> dict:
    started = time.perf_counter()
    if recipe.ray_address or os.environ.get("RAY_ADDRESS"):
        _log(f"writing to {run}: on a cluster this must be storage that outlives the job (e.g. /mnt/shared)")
    run.mkdir(parents=True, exist_ok=True)
    if not (run / RUN_RECORD).is_file():  # marks the directory as a run directory before anything else is written
        atomic_write_json(run / RUN_RECORD, {"stages": {}, "config": str(run / "config.yaml")})
    recipe_yaml = recipe_to_yaml(recipe)
    atomic_write_text(run / "config.yaml", recipe_yaml)
    data_dir, info = prepare_stage(recipe, run)
    labels = check_with_data(recipe, data_dir, info)  # before the teacher: every check the data allows
    init_ray(recipe.ray_address)  # (a no-op when this process is connected already)
    teacher_dir, tinfo = teacher_stage(recipe, run, data_dir, info, recipe_yaml)
    _log(f"teacher val top-1 {tinfo.val_top1:.2f}%")
    stages: dict[str, str] = {"data": str(data_dir), "teacher": str(teacher_dir)}
    stats_dir = stats_id = None
    if any(get_method(m).spectral for m in recipe.methods if m not in BASELINES):
        stats_dir, stats_id = stats_stage(recipe, run, data_dir, info, teacher_dir, tinfo, recipe_yaml)
        stages["stats"] = str(stats_dir)
    inputs = _Inputs(run, data_dir, info, teacher_dir, tinfo, stats_dir, stats_id, labels, recipe_yaml)
    sets, recoveries = _plan_sets(recipe, inputs)
    seconds = {(s.method, s.ipc): 0.0 for s in sets}
    seconds.update(_write_real_subsets(recipe, inputs, sets))
    seconds.update(_recover_all(recipe, inputs, recoveries))
    planned = _plan_evaluations(recipe, inputs, sets)
    summaries, shares = _evaluate_all(recipe, inputs, planned)
    stages.update({f"{s.method}-ipc{s.ipc}": str(s.out) for s in sets})
    stages.update({f"eval-{e.method}-ipc{e.ipc}": str(e.out) for e in planned})
    rows = [{"method": "teacher (full data)", "ipc": None, "top1_mean": tinfo.val_top1, "top1_std": None,
             "seeds": None, "seconds": None}]
    for e in planned:
        summary = summaries[str(e.out)]
        rows.append({"method": e.method, "ipc": e.ipc, "top1_mean": summary["top1_mean"],
                     "top1_std": summary["top1_std"], "seeds": len(summary["seeds"]),
                     "seconds": round(seconds[e.method, e.ipc] + shares.get(str(e.out), 0.0), 1),
                     "labels": summary["labels"], "top1": summary["top1"]})
    results = {"recipe": recipe.name, "dataset": info.name, "teacher": {"arch": tinfo.arch, "val_top1": tinfo.val_top1},
               "rows": rows, "stages": stages, "seconds": time.perf_counter() - started}
    atomic_write_json(run / "results.json", results)
    table = results_markdown(results)
    atomic_write_text(run / "results.md", table)
    atomic_write_json(run / RUN_RECORD, {"stages": stages, "config": str(run / "config.yaml")})
    print(table, flush=True)
    if report:
        from unidd_ray.analysis.report import write_report

        path = write_report(run)
        _log(f"report -> {path}")
    _log(f"done in {results['seconds']:.0f}s -> {run}")
    return results


def check_with_data(recipe: Recipe, data_dir: Path, info):
    """Every check that needs the prepared data but no trained teacher, so that it fails before training:
    each IPC's sets fit the classes (a recovery plan for every method), the teacher and the student build
    for the data's classes, channels and side (with the teacher's starting weights), and each set's
    batches suit the evaluation's workers.  Returns the train labels."""
    from unidd_ray.data.loading import read_labels
    from unidd_ray.models import build_model, load_weights
    from unidd_ray.stages.evaluate import validate_evaluate
    from unidd_ray.stages.recover import make_plan

    labels = read_labels(str(data_dir), "train")
    for ipc in recipe.ipcs:
        for method in recipe.methods:
            make_plan(labels, info.num_classes, recipe.recover_for(ipc, **({} if method in BASELINES else
                                                                            {"method": method})))
        validate_evaluate(recipe.evaluate, images=ipc * info.num_classes)
    shape = {"num_classes": info.num_classes, "in_channels": info.channels,
             "resolution": recipe.data.resolution or info.resolution}
    for section, name, options in (("teacher", recipe.teacher.arch, recipe.teacher.options),
                                   ("evaluate", recipe.evaluate.student, recipe.evaluate.student_options)):
        try:
            model = build_model(name, **shape, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{section}: {name} with options {options} does not build: {exc}") from None
        if section == "teacher" and recipe.teacher.weights:
            load_weights(model, recipe.teacher.weights)
    return labels


@dataclass(frozen=True)
class _Inputs:
    """What every set of the run is made from."""

    run: Path
    data_dir: Path
    info: object
    teacher_dir: Path
    tinfo: object
    stats_dir: Path | None
    stats_id: str | None
    labels: object
    recipe_yaml: str


@dataclass(frozen=True)
class _Set:
    """One distilled set of the run: a method (or real-subset baseline) at one IPC, and its directory."""

    method: str
    ipc: int
    out: Path


def _plan_sets(recipe: Recipe, inputs: _Inputs) -> tuple[list[_Set], list[_Recovery]]:
    """Every set of the recipe and the recoveries still to run (an intact set is reused, a damaged one
    discarded)."""
    sets, recoveries = [], []
    for ipc in recipe.ipcs:
        if recipe.recover_by_ipc.get(ipc):
            entry = ", ".join(f"{k}={v}" for k, v in recipe.recover_by_ipc[ipc].items())
            _log(f"IPC {ipc}: recover_by_ipc sets {entry} over the recover section")
        for method in recipe.methods:
            if method in BASELINES:
                key = random_key(recipe, ipc, inputs.info, inputs.tinfo)
                sets.append(_Set(method, ipc, inputs.run / f"random-ipc{ipc}-{key}"))
                continue
            cfg = recipe.recover_for(ipc, method=method)
            spectral = get_method(method).spectral
            key = recover_key(cfg, inputs.info, inputs.tinfo, inputs.stats_id if spectral else None)
            out = inputs.run / f"{method}-ipc{ipc}-{key}"
            sets.append(_Set(method, ipc, out))
            if _intact(out, _verify_distilled):
                _log(f"recover {method} IPC {ipc}: reusing {out}")
            else:
                recoveries.append(_Recovery(method, ipc, cfg, out, inputs.stats_dir if spectral else None))
    return sets, recoveries


def _verify_distilled(path: Path) -> None:
    read_manifest(path, "distilled")  # every image's checksum


def _write_real_subsets(recipe: Recipe, inputs: _Inputs, sets: list[_Set]) -> dict[tuple[str, int], float]:
    """The random real subsets of the run (``random`` and ``random-hard`` share one per IPC); returns the
    time spent on each."""
    from unidd_ray.stages.evaluate import write_real_subset

    seconds = {}
    for s in sets:
        if s.method not in BASELINES:
            continue
        t0 = time.perf_counter()
        if not _intact(s.out, _verify_distilled):
            _log(f"random real subset, IPC {s.ipc} -> {s.out}")
            write_real_subset(inputs.data_dir, s.out, ipc=s.ipc, seed=recipe.recover_for(s.ipc).seed,
                              num_workers=recipe.data.num_workers, recipe_yaml=inputs.recipe_yaml,
                              resolution=inputs.tinfo.resolution)
        seconds[s.method, s.ipc] = time.perf_counter() - t0
    return seconds


def _recover_all(recipe: Recipe, inputs: _Inputs, recoveries: list[_Recovery]) -> dict[tuple[str, int], float]:
    """Run the recoveries, several at once when the cluster holds their worker groups side by side; every
    recovery's inputs are checked first, so bad input fails before any of them starts.  Returns the time each
    took."""
    from unidd_ray.stages.recover import run_recover, validate_inputs

    checked = [validate_inputs(inputs.data_dir, inputs.teacher_dir, job.stats_dir, job.cfg) for job in recoveries]
    at_once = min(len(recoveries), recovery_concurrency(recipe, [j.cfg for j in recoveries])) if recoveries else 0
    if at_once > 1:
        _log(f"{len(recoveries)} recoveries, {at_once} at a time")

    def recover(job: _Recovery, checks: tuple) -> float:
        t0 = time.perf_counter()
        resume = (job.out.parent / f"{job.out.name}.partial" / "plan.json").is_file()
        _log(f"recover {job.method} IPC {job.ipc} -> {job.out}" + (" (resuming)" if resume else ""))
        # the set's config.yaml: the recipe with this recovery's resolved recover section (method, IPC, its
        # recover_by_ipc entry)
        run_recover(inputs.data_dir, inputs.teacher_dir, job.stats_dir, job.out, job.cfg,
                    storage_path=_storage(job.out, recipe), resume=resume, num_workers=recipe.data.num_workers,
                    checked=checks, recipe_yaml=recipe_to_yaml(replace(recipe, recover=job.cfg)))
        spent = time.perf_counter() - t0
        _log(f"recover {job.method} IPC {job.ipc}: done in {spent:.0f}s")
        return spent

    tasks = [partial(recover, job, checks) for job, checks in zip(recoveries, checked)]
    return {(job.method, job.ipc): spent for job, spent in zip(recoveries, run_at_most(at_once, tasks))}


@dataclass
class _Evaluation:
    method: str
    ipc: int
    out: Path
    job: object  # stages.evaluate.EvalJob
    keys: set  # the keys of the stored per-seed results it takes


def _plan_evaluations(recipe: Recipe, inputs: _Inputs, sets: list[_Set]) -> list[_Evaluation]:
    """One evaluation per set, in a directory named by its settings and the set's images."""
    from unidd_ray.stages.evaluate import SEEDS, EvalJob, distilled_identity, reusable_keys

    planned = []
    for s in sets:
        eval_cfg = replace(recipe.evaluate, hard_labels=BASELINES.get(s.method, False) or recipe.evaluate.hard_labels)
        prefix = f"eval-{s.method}-ipc{s.ipc}"
        manifest = read_manifest(s.out, "distilled", verify=False)  # verified above
        identity = distilled_identity(s.out, manifest)
        eval_dir = inputs.run / f"{prefix}-{evaluate_key(eval_cfg, inputs.info, inputs.tinfo, identity)}"
        legacy = inputs.run / f"{prefix}-{legacy_evaluate_key(eval_cfg, inputs.info, inputs.tinfo, manifest['files'])}"
        if not _evaluated(eval_dir, eval_cfg.seeds) and (legacy / "summary.json").is_file():
            eval_dir = legacy
        elif (legacy / SEEDS).is_dir() and not eval_dir.exists():  # a run interrupted under the old key: its
            legacy.rename(eval_dir)  # finished seeds move to the new directory (their old keys are accepted)
        _intact(eval_dir, lambda d: check_output(d, "evaluation"))  # a damaged one is evaluated again
        job = EvalJob(s.out, eval_dir, eval_cfg, recipe_yaml=inputs.recipe_yaml, name=f"{s.method} IPC {s.ipc}")
        keys = reusable_keys(job, identity, manifest, inputs.tinfo.sha256, dataset_identity(inputs.info))
        planned.append(_Evaluation(s.method, s.ipc, eval_dir, job, keys))
    return planned


def _evaluate_all(recipe: Recipe, inputs: _Inputs, planned: list[_Evaluation]) -> tuple[dict, dict]:
    """Evaluate every set that lacks a summary of the seeds asked for, in one worker group.  Returns every
    set's summary and the share of the shared run's wall time of each set it evaluated (by its students' own
    time)."""
    from unidd_ray.stages.evaluate import finished_seeds, run_evaluations

    todo = [e for e in planned if not _evaluated(e.out, e.job.cfg.seeds)]
    pending = {id(e) for e in todo}
    for e in planned:
        if id(e) in pending:
            stored = [s for s in finished_seeds(e.out, e.keys) if s < e.job.cfg.seeds]
            _log(f"evaluate {e.method} IPC {e.ipc}: {e.job.cfg.seeds} seeds" + (f", {len(stored)} stored" if stored
                                                                                 else "")
                 + f", student {e.job.cfg.student}")
        else:
            _log(f"evaluate {e.method} IPC {e.ipc}: reusing {e.out}")
    wall = 0.0
    if todo:
        t0 = time.perf_counter()
        run_evaluations([e.job for e in todo], inputs.teacher_dir, inputs.data_dir,
                        storage_path=_storage(inputs.run / "evaluate", recipe), num_workers=recipe.data.num_workers)
        wall = time.perf_counter() - t0
    summaries = {str(e.out): json.loads((e.out / "summary.json").read_text()) for e in planned}
    trained = sum(summaries[str(e.out)]["trained_seconds"] for e in todo) or 1.0
    shares = {str(e.out): wall * summaries[str(e.out)]["trained_seconds"] / trained for e in todo}
    return summaries, shares


def results_markdown(results: dict) -> str:
    lines = [f"# {results['recipe']}: distillation results ({results['dataset']})", "",
             "| method | IPC | labels | top-1 (%) | seeds | wall time (s) |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        acc = f"{r['top1_mean']:.2f}" + (f" ± {r['top1_std']:.2f}" if r.get("top1_std") is not None else "")
        lines.append(f"| {r['method']} | {r['ipc'] if r['ipc'] is not None else '–'} | {r.get('labels', '–')} | "
                     f"{acc} | {r['seeds'] or '–'} | {r['seconds'] if r['seconds'] is not None else '–'} |")
    return "\n".join(lines) + "\n"
