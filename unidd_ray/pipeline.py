"""``unidd-ray pipeline``: prepare → squeeze → stats → recover → evaluate → results (+ report).

Every stage writes into a directory of the run named by a content key (:mod:`unidd_ray.keys`): the settings
that change its result and the identities of its inputs.  A stage whose directory is complete is verified
(checksums of every file it holds) and reused; a damaged one is computed again; a stage killed half-way
resumes (squeeze and recover continue from their checkpoints, an evaluation keeps every finished student,
and its key leaves out the seed count, so more seeds train only the new students).

Everything that can be checked before work is: the recipe when it is read, then what needs the prepared data
(:func:`check_with_data`) before the teacher trains, then every recovery's inputs before the first starts.
All recoveries run first, side by side when the cluster holds several of their worker groups at once
(``parallel_recoveries``: on a small CPU machine one-thread recoveries side by side get 1.3–1.4× the
throughput of two-thread ones in turn, benchmarks/parallel_recoveries.py); then every set still lacking a
summary of the seeds asked for is evaluated in a single Ray Train run, so the worker group (process start,
imports, teacher load) is set up once.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import ray
import torch

from unidd_ray import __version__
from unidd_ray.analysis.metrics import protocol_cell, top1_cell
from unidd_ray.analysis.report import write_report
from unidd_ray.artifacts import distilled, evaluation
from unidd_ray.artifacts.dataset import (read_dataset_info, read_labels, record_source_stat, recorded_source_stat,
                                         verify_dataset)
from unidd_ray.artifacts.files import (RUN_RECORD, atomic_write_json, atomic_write_text, check_output, sha256_file,
                                       stage_storage)
from unidd_ray.artifacts.locks import output_lock
from unidd_ray.artifacts.statistics import load_stats, stats_sha256
from unidd_ray.artifacts.teacher import check_teacher_data, load_teacher, read_teacher_info
from unidd_ray.config import ConfigError, EvaluateConfig, Recipe, RecoverConfig, recipe_to_yaml
from unidd_ray.core.evaluation import check_batches
from unidd_ray.core.plan import make_plan
from unidd_ray.data.hashing import source_stat
from unidd_ray.data.prepare import prepare_dataset
from unidd_ray.data.sources import load_source
from unidd_ray.keys import (CACHE_FORMAT, data_key, distilled_identity, evaluate_key, random_key, recover_key,
                            stats_artifact_key, stats_key, teacher_key)
from unidd_ray.methods import BASELINES, get_method
from unidd_ray.models import build_model, load_weights
from unidd_ray.runtime import console
from unidd_ray.runtime.cluster import init_ray
from unidd_ray.stages.evaluate import EvalJob, job_key, run_evaluations
from unidd_ray.stages.recover import run_recover, validate_inputs
from unidd_ray.stages.squeeze import squeeze
from unidd_ray.stages.stats import run_stats
from unidd_ray.stages.subset import write_real_subset

RAY_LOG = "ray.log"  # Ray's own output, in the run directory


def _log(msg: str) -> None:
    console.say(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}")


def _storage(stage_dir: Path, recipe: Recipe) -> Path:
    """Ray Train checkpoints of a stage: beside it, or under the recipe's shared ``storage_path``."""
    return stage_storage(stage_dir, recipe.storage_path)


# ----------------------------------------------------------------------------- reuse, verified
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


def check_run_format(run: Path) -> None:
    """Refuse a run directory whose stages were named under other keys (:data:`unidd_ray.keys.CACHE_FORMAT`):
    they could not be found again, and computing new ones beside them would hide that."""
    try:
        record = json.loads((run / RUN_RECORD).read_text())
    except (OSError, ValueError):
        record = None
    stages = [p.name for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")] if run.is_dir() else []
    found = record.get("format", 1) if isinstance(record, dict) else (1 if stages else CACHE_FORMAT)
    if found != CACHE_FORMAT and stages:
        raise ConfigError(f"{run} holds the stages of a run made by an earlier unidd_ray (cache format {found}; this "
                          f"one names them under format {CACHE_FORMAT}), which it cannot reuse; give `out` a new "
                          f"directory (--set out=DIR), or remove {run} to start over there")


def prepare_stage(recipe: Recipe, run: Path):
    """The prepared dataset of the recipe: reused when complete and made from the source as it is now.

    A prepared directory is named by the recipe's data settings and records a stat signature of its source's
    files (:func:`unidd_ray.data.hashing.source_stat`: paths, sizes, modification times).  While that matches,
    the directory is reused without reading the source.  When it does not, the source is read and
    fingerprinted: a directory prepared from those bytes is reused and its record refreshed; otherwise the
    source changed in place and is prepared again into ``data-<key>-<source fingerprint>``, beside the
    directory of the old bytes, so the stages made on those keep theirs.  A prepared directory whose files fail
    their checksums is discarded and prepared again.
    """
    key = data_key(recipe)
    candidates = [run / f"data-{key}", *sorted(run.glob(f"data-{key}-*"))]
    complete = {d: verify_dataset(d) for d in candidates if _intact(d, verify_dataset)}
    # one walk per origin (the candidates share theirs), taken before the source is read: a file changed
    # while it is read then fails the next run's check instead of passing it
    stats = {origin: source_stat(origin) for origin in {info.source.get("origin", "") for info in complete.values()}}
    for data_dir, info in complete.items():
        stat = stats[info.source.get("origin", "")]
        if stat is None or stat == recorded_source_stat(data_dir):
            _log(f"prepare: reusing {data_dir}")
            return data_dir, info
    source = load_source(recipe.data.dataset, recipe.data.root, **recipe.data.options)
    stat = stats[source.origin] if source.origin in stats else source_stat(source.origin)
    for data_dir, info in complete.items():
        if info.source.get("fingerprint") == source.fingerprint:
            _log(f"prepare: reusing {data_dir} (its source {source.origin} was read again: same bytes)")
            record_source_stat(data_dir, source.origin, stat)
            return data_dir, info
    data_dir = run / f"data-{key}"
    if data_dir in complete:
        previous = complete[data_dir].source.get("fingerprint", "?")
        data_dir = run / f"data-{key}-{source.fingerprint[:12]}"
        _log(f"prepare: the source {source.origin} changed since it was prepared (fingerprint {previous[:12]} -> "
             f"{source.fingerprint[:12]}): preparing it again -> {data_dir}")
    else:
        _log(f"prepare: {recipe.data.dataset} -> {data_dir}")
    prepare_dataset(source, data_dir, max_resolution=recipe.data.max_resolution,
                    jpeg_quality=recipe.data.jpeg_quality)
    if source_stat(source.origin) == stat:  # not touched while it was written: the record stands for these bytes
        record_source_stat(data_dir, source.origin, stat)
    return data_dir, read_dataset_info(data_dir)


def teacher_stage(recipe: Recipe, run: Path, data_dir: Path, info, recipe_yaml: str | None = None):
    """The trained teacher (reused when intact, resumed when a previous run was killed, trained again when
    damaged), or the recipe's ``teacher.artifact`` as it is (checked by :func:`check_with_data`)."""
    if recipe.teacher.artifact is not None:
        teacher_dir = Path(recipe.teacher.artifact).resolve()
        _log(f"squeeze: using the teacher artifact {teacher_dir}")
        return teacher_dir, read_teacher_info(teacher_dir)
    weights = sha256_file(recipe.teacher.weights) if recipe.teacher.weights else None
    teacher_dir = run / f"teacher-{teacher_key(recipe, info, weights)}"
    if _intact(teacher_dir, lambda d: check_teacher_data(load_teacher(d)[1], info, d, data_dir)):
        _log(f"squeeze: reusing {teacher_dir}")
    else:
        resume = (_storage(teacher_dir, recipe) / "squeeze").exists()
        _log(f"squeeze: training {recipe.teacher.arch} -> {teacher_dir}" + (" (resuming)" if resume else ""))
        squeeze(data_dir, teacher_dir, squeeze_cfg=recipe.squeeze, model_cfg=recipe.teacher, data_cfg=recipe.data,
                storage_path=_storage(teacher_dir, recipe), resume=resume, recipe_yaml=recipe_yaml)
    return teacher_dir, read_teacher_info(teacher_dir)


def stats_stage(recipe: Recipe, run: Path, data_dir: Path, info, teacher_dir: Path, tinfo,
                recipe_yaml: str | None = None):
    """The real statistics under the teacher (reused when intact, computed again when damaged), or the recipe's
    ``stats.artifact`` as it is (checked by :func:`check_with_data`); returns (directory, key)."""
    if recipe.stats.artifact is not None:
        stats_dir = Path(recipe.stats.artifact).resolve()
        _log(f"stats: using the statistics artifact {stats_dir}")
        return stats_dir, stats_artifact_key(stats_sha256(stats_dir))
    key = stats_key(recipe, info, tinfo)
    stats_dir = run / f"stats-{key}"
    if _intact(stats_dir, lambda d: load_stats(d, teacher_sha256=tinfo.sha256, dataset_fingerprint=info.fingerprint)):
        _log(f"stats: reusing {stats_dir}")
    else:
        _log(f"stats: {recipe.stats.actors} actors -> {stats_dir}")
        run_stats(data_dir, teacher_dir, stats_dir, recipe.stats, num_workers=recipe.data.num_workers,
                  recipe_yaml=recipe_yaml)
    return stats_dir, key


def check_with_data(recipe: Recipe, data_dir: Path, info):
    """Every check that needs the prepared data but no trained teacher, so that it fails before training:
    each IPC's sets fit the classes (a recovery plan for every method), the teacher and the student build
    for the data's classes, channels and side (with the teacher's starting weights), and each set's
    batches suit the evaluation's workers.  Returns the train labels."""
    labels = read_labels(str(data_dir), "train")
    for ipc in recipe.ipcs:
        for method in recipe.methods:
            make_plan(labels, info.num_classes, recipe.recover_for(ipc, **({} if method in BASELINES else
                                                                            {"method": method})))
        check_batches(recipe.evaluate.for_ipc(ipc), images=ipc * info.num_classes)
    shape = {"num_classes": info.num_classes, "in_channels": info.channels,
             "resolution": recipe.data.resolution or info.resolution}
    models = [("evaluate.students" if tag else "evaluate", name, options)
              for name, options, tag in evaluated_students(recipe.evaluate)]
    if recipe.teacher.artifact is None:
        models.insert(0, ("teacher", recipe.teacher.arch, recipe.teacher.options))
    else:
        check_artifacts(recipe, data_dir, info)
    for section, name, options in models:
        try:
            model = build_model(name, **shape, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{section}: {name} with options {options} does not build: {exc}") from None
        if section == "teacher" and recipe.teacher.weights:
            load_weights(model, recipe.teacher.weights)
    return labels


def check_artifacts(recipe: Recipe, data_dir: Path, info) -> None:
    """The recipe's ``teacher.artifact`` (and ``stats.artifact``), before any work: complete (every checksum),
    suited to the prepared data, and the statistics computed with that teacher."""
    where = recipe.teacher.artifact
    try:
        teacher_dir = Path(where).resolve()
        _, tinfo = load_teacher(teacher_dir)
        check_teacher_data(tinfo, info, teacher_dir, data_dir)
        if recipe.stats.artifact is not None:
            where = recipe.stats.artifact
            load_stats(Path(where).resolve(), teacher_sha256=tinfo.sha256, dataset_fingerprint=info.fingerprint)
    except (ValueError, OSError) as exc:
        section = "teacher" if where == recipe.teacher.artifact else "stats"
        raise ConfigError(f"{section}.artifact {where}: {exc}") from None


# ----------------------------------------------------------------------------- the sets of a run
@dataclass(frozen=True)
class RunInputs:
    """What every set of a run is made from: the prepared data, the teacher, the statistics (None when no
    method reads them)."""

    run: Path
    data_dir: Path
    info: object
    teacher_dir: Path
    tinfo: object
    stats_dir: Path | None
    stats_id: str | None
    recipe_yaml: str


def shared_stages(recipe: Recipe, run: Path, *, stats: bool, ray_log: bool) -> RunInputs:
    """The stages every set of the run shares, each reused when intact: the data, every check it allows, then
    (Ray started, its output to the run's ``ray.log`` with ``ray_log``) the teacher and, with ``stats``, the
    real statistics.  The caller holds the run directory's lock."""
    run.mkdir(parents=True, exist_ok=True)
    if not (run / RUN_RECORD).is_file():  # marks the directory as a run directory before anything else is written
        atomic_write_json(run / RUN_RECORD, {"format": CACHE_FORMAT, "stages": {}})
    recipe_yaml = recipe_to_yaml(recipe)
    atomic_write_text(run / "config.yaml", recipe_yaml)
    data_dir, info = prepare_stage(recipe, run)
    check_with_data(recipe, data_dir, info)  # before the teacher: every check the data allows
    if not ray.is_initialized():
        init_ray(recipe.ray_address, log_file=run / RAY_LOG if ray_log else None)
        if ray_log:
            _log(f"Ray's own output -> {run / RAY_LOG}")
    teacher_dir, tinfo = teacher_stage(recipe, run, data_dir, info, recipe_yaml)
    _log(f"teacher val top-1 {tinfo.val_top1:.2f}%" if tinfo.val_top1 is not None else
         "teacher val top-1 not recorded (an imported teacher: its accuracy on its own data is not known here)")
    stats_dir = stats_id = None
    if stats:
        stats_dir, stats_id = stats_stage(recipe, run, data_dir, info, teacher_dir, tinfo, recipe_yaml)
    return RunInputs(run, data_dir, info, teacher_dir, tinfo, stats_dir, stats_id, recipe_yaml)


@dataclass(frozen=True)
class _Set:
    """One distilled set of the run: a method (or real-subset baseline) at one IPC, and its directory."""

    method: str
    ipc: int
    out: Path


@dataclass(frozen=True)
class _Recovery:
    method: str
    ipc: int
    cfg: RecoverConfig
    out: Path
    stats_dir: Path | None


def _plan_sets(recipe: Recipe, inputs: RunInputs) -> tuple[list[_Set], list[_Recovery]]:
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
            if _intact(out, distilled.verify):
                _log(f"recover {method} IPC {ipc}: reusing {out}")
            else:
                recoveries.append(_Recovery(method, ipc, cfg, out, inputs.stats_dir if spectral else None))
    return sets, recoveries


def _write_real_subsets(recipe: Recipe, inputs: RunInputs, sets: list[_Set]) -> dict[tuple[str, int], float]:
    """The random real subsets of the run (``random`` and ``random-hard`` share one per IPC); returns the
    time spent on each."""
    seconds = {}
    for s in sets:
        if s.method not in BASELINES:
            continue
        t0 = time.perf_counter()
        if not _intact(s.out, distilled.verify):
            _log(f"random real subset, IPC {s.ipc} -> {s.out}")
            write_real_subset(inputs.data_dir, s.out, ipc=s.ipc, seed=recipe.recover_for(s.ipc).seed,
                              num_workers=recipe.data.num_workers, recipe_yaml=inputs.recipe_yaml,
                              resolution=inputs.tinfo.resolution, normalize=(inputs.tinfo.mean, inputs.tinfo.std))
        seconds[s.method, s.ipc] = time.perf_counter() - t0
    return seconds


def recovery_concurrency(recipe: Recipe, cfgs: list[RecoverConfig] | None = None) -> int:
    """How many recoveries run at once: ``recipe.parallel_recoveries``, or as many of the largest worker group
    among ``cfgs`` (``workers`` × ``cpus_per_worker`` CPUs, one GPU per worker with ``use_gpu``; default: the
    ``recover`` section's) as the Ray cluster holds side by side now; at least one."""
    if recipe.parallel_recoveries is not None:
        return recipe.parallel_recoveries
    if not ray.is_initialized():
        return 1
    have = ray.cluster_resources()

    def fits(cfg: RecoverConfig) -> int:
        n = int(have.get("CPU", 0) // (cfg.workers * cfg.cpus_per_worker))
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


def _recover_all(recipe: Recipe, inputs: RunInputs, recoveries: list[_Recovery]) -> dict[tuple[str, int], float]:
    """Run the recoveries, several at once when the cluster holds their worker groups side by side; every
    recovery's inputs are checked first, so bad input fails before any of them starts.  Returns the time each
    took."""
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
    job: EvalJob
    key: str  # what its stored students must match to count (:func:`unidd_ray.stages.evaluate.job_key`)
    tag: str = ""  # "" for evaluate.student; an evaluate.students entry's name in paths (student_tag)


def student_tag(name: str) -> str:
    """An ``evaluate.students`` entry as it appears in directory and stage names (``timm:convnext_tiny`` →
    ``timm-convnext_tiny``)."""
    return name.replace(":", "-").replace("/", "-")


def evaluated_students(cfg: EvaluateConfig) -> list[tuple[str, dict, str]]:
    """(name, options, tag) of every student a set is evaluated with: ``evaluate.student`` (tag ""), then each
    ``evaluate.students`` entry with its default options and its :func:`student_tag`; an entry that is
    ``evaluate.student`` (e.g. `unidd-ray evaluate --student` one of them) is that one evaluation."""
    return [(cfg.student, cfg.student_options, ""),
            *((name, {}, student_tag(name)) for name in cfg.students if name != cfg.student)]


def _plan_evaluations(recipe: Recipe, inputs: RunInputs, sets: list[_Set]) -> list[_Evaluation]:
    """One evaluation per set and student (``evaluate.student``, then each of ``evaluate.students`` with its
    default options; an entry that is ``evaluate.student`` is that one evaluation), in a directory named by its
    settings and the set's images.  Each evaluation's settings name
    its one student and an empty ``students``: the ``evaluate.student`` evaluations keep the keys they had before
    ``students`` existed, and each other student's has its own."""
    planned = []
    students = evaluated_students(recipe.evaluate)
    for s in sets:
        eval_cfg = replace(recipe.evaluate.for_ipc(s.ipc),  # the IPC's batch size (evaluate.batch_size_by_ipc)
                           hard_labels=BASELINES.get(s.method, False) or recipe.evaluate.hard_labels)
        identity = distilled_identity(*distilled.identity_inputs(s.out))  # (the set was verified above)
        for student, options, tag in students:
            cfg = replace(eval_cfg, student=student, student_options=options, students=[])
            key = evaluate_key(cfg, inputs.info, inputs.tinfo, identity)
            out = inputs.run / f"eval-{s.method}-ipc{s.ipc}-{tag + '-' if tag else ''}{key}"
            _intact(out, lambda d: check_output(d, "evaluation"))  # a damaged one is evaluated again
            job = EvalJob(s.out, out, cfg, recipe_yaml=inputs.recipe_yaml,
                          name=f"{s.method} IPC {s.ipc}" + (f" {student}" if tag else ""))
            planned.append(_Evaluation(s.method, s.ipc, out, job, job_key(job, identity, inputs.tinfo, inputs.info),
                                       tag))
    return planned


def _evaluate_all(recipe: Recipe, inputs: RunInputs, planned: list[_Evaluation]) -> tuple[dict, dict]:
    """Evaluate every set that lacks a summary of the seeds asked for, in one worker group.  Returns every
    set's summary and the share of the shared run's wall time of each set it evaluated (by its students' own
    time)."""
    todo = [e for e in planned if not evaluation.evaluated(e.out, e.job.cfg.seeds)]
    pending = {id(e) for e in todo}
    for e in planned:
        if id(e) in pending:
            stored = len([s for s in evaluation.finished_seeds(e.out, e.key) if s < e.job.cfg.seeds])
            _log(f"evaluate {e.method} IPC {e.ipc}: {e.job.cfg.seeds} seeds" + (f", {stored} stored" if stored else "")
                 + f", student {e.job.cfg.student}")
        else:
            _log(f"evaluate {e.method} IPC {e.ipc}: reusing {e.out}")
    wall = 0.0
    if todo:
        t0 = time.perf_counter()
        run_evaluations([e.job for e in todo], inputs.teacher_dir, inputs.data_dir,
                        storage_path=_storage(inputs.run / "evaluate", recipe), num_workers=recipe.data.num_workers)
        wall = time.perf_counter() - t0
    summaries = {str(e.out): evaluation.read_summary(e.out) for e in planned}
    trained = sum(summaries[str(e.out)]["trained_seconds"] for e in todo) or 1.0
    shares = {str(e.out): wall * summaries[str(e.out)]["trained_seconds"] / trained for e in todo}
    return summaries, shares


# ----------------------------------------------------------------------------- the run
def machine() -> dict:
    """Where a run ran: the CPU, its cores, the GPUs, and the versions that decide its numbers."""
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "unidd_ray": __version__}


def run_pipeline(recipe: Recipe, *, report: bool = True, wait: bool = False, ray_log: bool = True,
                 command: str | None = None) -> dict:
    """Run every stage of ``recipe`` into its run directory, reusing what is there; returns the results.

    The run directory must be new, empty or a run directory of this cache format, and the pipeline holds its
    lock throughout (``wait``: queue behind another run instead of refusing).  ``ray_log``: Ray's own output
    goes to ``ray.log`` in the run directory (when this call starts Ray), not to the terminal.  ``command``:
    the command line that ran it, recorded in ``results.json``."""
    run = recipe.run_dir.resolve()
    check_output(run, "run", option="out (--set out=DIR)")
    with output_lock(run, wait=wait, notify=_log):
        check_run_format(run)
        return _run(recipe, run, report=report, ray_log=ray_log, command=command)


def _has_stages(run: Path) -> bool:
    return run.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in run.iterdir())


def _run(recipe: Recipe, run: Path, *, report: bool, ray_log: bool, command: str | None) -> dict:
    started = time.perf_counter()
    fresh = not _has_stages(run)
    if recipe.ray_address or os.environ.get("RAY_ADDRESS"):
        _log(f"writing to {run}: on a cluster this must be storage that outlives the job (e.g. /mnt/shared)")
    spectral = any(get_method(m).spectral for m in recipe.methods if m not in BASELINES)
    inputs = shared_stages(recipe, run, stats=spectral, ray_log=ray_log)
    info, tinfo = inputs.info, inputs.tinfo
    stages: dict[str, str] = {"data": str(inputs.data_dir), "teacher": str(inputs.teacher_dir),
                              **({"stats": str(inputs.stats_dir)} if spectral else {})}
    sets, recoveries = _plan_sets(recipe, inputs)
    seconds = {(s.method, s.ipc): 0.0 for s in sets}
    seconds.update(_write_real_subsets(recipe, inputs, sets))
    seconds.update(_recover_all(recipe, inputs, recoveries))
    planned = _plan_evaluations(recipe, inputs, sets)
    summaries, shares = _evaluate_all(recipe, inputs, planned)
    stages.update({f"{s.method}-ipc{s.ipc}": str(s.out) for s in sets})
    stages.update({f"eval-{e.method}-ipc{e.ipc}" + (f"-{e.tag}" if e.tag else ""): str(e.out) for e in planned})
    rows = [{"method": "teacher (full data)", "ipc": None, "top1_mean": tinfo.val_top1, "top1_std": None,
             "seeds": None, "seconds": None}]
    for e in planned:
        summary = summaries[str(e.out)]
        rows.append({"method": e.method, "ipc": e.ipc, "top1_mean": summary["top1_mean"],
                     "top1_std": summary["top1_std"], "seeds": len(summary["seeds"]),
                     "seconds": round(seconds[e.method, e.ipc] + shares.get(str(e.out), 0.0), 1),
                     "labels": summary["labels"], "top1": summary["top1"], **protocol_fields(summary),
                     "student": e.job.cfg.student})
    results = {"recipe": recipe.name, "dataset": info.name, "teacher": {"arch": tinfo.arch, "val_top1": tinfo.val_top1},
               "rows": rows, "stages": stages, "seconds": time.perf_counter() - started,
               "fresh": fresh, "command": command, "machine": machine(),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    atomic_write_json(run / "results.json", results)
    table = results_markdown(results)
    atomic_write_text(run / "results.md", table)
    atomic_write_json(run / RUN_RECORD, {"format": CACHE_FORMAT, "stages": stages})
    console.show(table)
    if report:
        _log(f"report -> {write_report(run)}")
    _log(f"done in {results['seconds']:.0f}s -> {run}")
    return results


def protocol_fields(summary: dict) -> dict:
    """A results row's protocol (``evaluate.protocol``; a summary written before it existed is ``ours``) and, for
    ``paper``, the test-selected figure beside the final one."""
    fields = {"protocol": summary.get("protocol", "ours")}
    if "top1_selected" in summary:
        fields.update({k: summary[k] for k in ("top1_selected", "top1_selected_mean", "top1_selected_std",
                                               "top1_selected_note")})
    return fields


def results_markdown(results: dict) -> str:
    lines = [f"# {results['recipe']}: distillation results ({results['dataset']})", "",
             "| method | IPC | labels | protocol | top-1 (%) | seeds | wall time (s) | student |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        acc, protocol = top1_cell(r), protocol_cell(r)
        lines.append(f"| {r['method']} | {r['ipc'] if r['ipc'] is not None else '–'} | {r.get('labels', '–')} | "
                     f"{protocol} | {acc} | {r['seeds'] or '–'} | "
                     f"{r['seconds'] if r['seconds'] is not None else '–'} | {r.get('student') or '–'} |")
    return "\n".join(lines) + "\n"
