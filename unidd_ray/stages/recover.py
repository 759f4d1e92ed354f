"""Recovery stage: class-partitioned synthesis of the distilled set on Ray Train.

The plan (:mod:`unidd_ray.core.plan`) gives each worker its piece of every round; in a round every worker
optimises its piece for one slot from the same EMU state (:func:`unidd_ray.core.recovery.run_round`).  With
``distribution: exact`` (the default) a round is one global batch of the authors' classes: the batch moments
are all-reduced at every iteration and the EMU counts the round once, so any worker count gives the images
of one process (up to float rounding).  With ``distribution: independent`` each worker optimises a batch of
its own classes and the workers' new EMU sums are all-reduced after the round, so the state equals what one
process holds after the union of their batches.

After every round, each worker's images are written (PNG, atomically) to the staging directory
``<out>.partial`` together with one JSON record per batch; rank 0 checkpoints the EMU state and the number of
finished rounds through ``ray.train.report``.  A worker fault is retried from the last checkpoint
(:func:`unidd_ray.runtime.train.fit`) and a killed command continues with ``resume=True``; every batch is a
deterministic function of its inputs and the EMU state, so the final output is byte-identical to an
uninterrupted run.  ``plan.json`` records the plan and the identity of everything else the images depend on
(:func:`unidd_ray.keys.recovery_identity`); a resume with anything else is refused, naming what differs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import yaml

from unidd_ray.artifacts import distilled
from unidd_ray.artifacts.dataset import read_labels, verify_dataset
from unidd_ray.artifacts.files import (OutputError, atomic_file, atomic_write_bytes, atomic_write_json, check_output,
                                       replace_directory, sha256_bytes, sha256_file)
from unidd_ray.artifacts.locks import holds_output_lock
from unidd_ray.artifacts.statistics import load_stats, stats_sha256
from unidd_ray.artifacts.teacher import check_teacher_data, load_teacher, read_teacher_info
from unidd_ray.config import RecoverConfig, to_dict
from unidd_ray.core.plan import RecoverPlan, make_plan
from unidd_ray.core.recovery import InitImages, TorchDistReducer, build_distiller, image_bytes, run_round
from unidd_ray.data.beton import write_image_beton
from unidd_ray.keys import check_resumable, recovery_identity
from unidd_ray.methods import get_method, method_filter
from unidd_ray.models import bn_layers, resolve_layers
from unidd_ray.runtime import console
from unidd_ray.runtime.cluster import require_resources
from unidd_ray.runtime.train import WorkerInputError, fit, trainer_factory
from unidd_ray.spectral import EMU, cholesky_factor

RUN_NAME = "recover"
RECORDS = ".batches"
EXECUTIONS = "executions"  # per-worker append-only logs of finished batches, under RECORDS
BATCHES = "batches.json"  # the per-batch records of the finished run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultPlan:
    """A fault to inject into a recovery (tests): the last worker fails once, after ``after_batches`` batches of
    the run are done; a marker in the staging directory keeps the restarted run from failing again.  ``kill``:
    the worker's process is killed (SIGKILL, as a lost machine or the kernel's OOM killer would end it) instead
    of raising an error."""

    after_batches: int
    marker: str = ".fault-injected"
    kill: bool = False

    def maybe_fail(self, staging: Path, *, finished: int, rank: int, world: int, round_index: int) -> None:
        if rank == world - 1 and finished >= self.after_batches and not (staging / self.marker).exists():
            atomic_write_json(staging / self.marker, {"round": round_index, "finished_batches": finished,
                                                      "rank": rank, "pid": os.getpid(), "killed": self.kill})
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure after {finished} finished batches")


@dataclass(frozen=True)
class RecoverJob:
    """What every worker of a recovery is given."""

    recover: RecoverConfig
    data_dir: str
    teacher_dir: str
    stats_dir: str | None
    staging: str
    plan: dict
    num_workers: int
    threads: int
    faults: FaultPlan | None = None


# ----------------------------------------------------------------------------- the worker
class _Worker:
    """One worker of a recovery: its distiller, EMU, place in the plan and the rounds it has done."""

    def __init__(self, job: RecoverJob):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, job.threads))
        self.job, self.cfg = job, job.recover
        self.info, self.distiller = build_distiller(self.cfg, job.data_dir, job.teacher_dir, job.stats_dir,
                                                    self.device)
        self.plan = RecoverPlan(**job.plan)
        self.staging = Path(job.staging)
        self.emu = (EMU(self.distiller.emu_layers(), enabled=self.cfg.emu, device=self.device)
                    if self.distiller.layers else None)
        self.reducer = TorchDistReducer() if self.world > 1 else None
        self.start_round = self._restore()
        self.init_images = InitImages(job.data_dir, self.plan, self.rank, image_bytes=image_bytes(self.distiller),
                                      num_workers=job.num_workers, start_round=self.start_round,
                                      resolution=self.distiller.resolution, normalize=self.distiller.normalize)

    def _restore(self) -> int:
        """The first round to run: after the latest checkpoint's, whose EMU state is loaded."""
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return 0
        with checkpoint.as_directory() as d:
            progress = json.loads((Path(d) / "progress.json").read_text())
            if self.emu is not None:
                self.emu.load_state_dict(torch.load(Path(d) / "emu.pt", map_location=self.device, weights_only=True))
        return int(progress["rounds_done"])

    def run(self, r: int) -> None:
        started = time.perf_counter()
        chunk, result = run_round(self.distiller, self.plan, r, rank=self.rank, emu=self.emu, reducer=self.reducer,
                                  data_dir=self.job.data_dir, num_workers=self.job.num_workers, device=self.device,
                                  init_images=self.init_images)
        slot, j = divmod(r, self.plan.rounds_per_slot)
        if chunk:
            self._write(r, slot, j, chunk, result, time.perf_counter() - started)
        finished = self.plan.batches_done(r)
        if self.job.faults is not None:
            self.job.faults.maybe_fail(self.staging, finished=finished, rank=self.rank, world=self.world,
                                       round_index=r)
        parts = result.parts if result is not None else {}
        if self.rank == 0:
            # a log record, not print(): Ray Train V2 patches print() in its workers to write the line to
            # stdout *and* to the root logger's console handler, so every printed line reached the driver twice
            log.info(f"[recover {self.cfg.method}] round {r + 1}/{self.plan.rounds} (slot {slot + 1}/"
                     f"{self.plan.ipc}, batch {j + 1}) {time.perf_counter() - started:.1f}s  "
                     + "  ".join(f"{k} {v:.4g}" for k, v in parts.items()))
        self._checkpoint(r, {"round": r, "slot": slot, "finished_batches": finished,
                             **{f"loss_{k}": v for k, v in parts.items()}})

    def _write(self, r: int, slot: int, j: int, chunk: list[int], result, seconds: float) -> None:
        """The round's images and the batch's record (atomically; a batch redone after a restart replaces its
        record and appears twice in the executions log)."""
        batch = self.plan.batch_id(slot, self.rank, j)
        beta = self.distiller.slot_filter(slot, self.plan.ipc)
        rows = []
        for cls, image in zip(chunk, result.images):
            data = distilled.to_png_bytes(image, *self.distiller.normalize)  # the teacher's (mean, std)
            rel = distilled.write_image(self.staging, cls, slot, data)
            rows.append({"class": cls, "class_name": self.info.class_names[cls], "slot": slot, "path": rel,
                         "sha256": sha256_bytes(data), "source_index": self.plan.init_index[cls][slot],
                         "beta": getattr(beta, "beta", None), "method": self.cfg.method, "seed": self.cfg.seed,
                         "batch": batch, "worker": self.rank, **{f"loss_{k}": v for k, v in result.parts.items()}})
        atomic_write_json(self.staging / RECORDS / f"{batch:08d}.json",
                          {"batch": batch, "slot": slot, "worker": self.rank, "chunk": j, "rows": rows,
                           "parts": result.parts, "seconds": seconds})
        with open(self.staging / RECORDS / f"{EXECUTIONS}-{self.rank:04d}.jsonl", "a") as f:
            f.write(json.dumps({"batch": batch, "round": r, "worker": self.rank}) + "\n")

    def _checkpoint(self, r: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0:
                (Path(d) / "progress.json").write_text(json.dumps({"rounds_done": r + 1}))
                if self.emu is not None:
                    torch.save(self.emu.state_dict(), Path(d) / "emu.pt")
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    def finish(self) -> None:
        if self.rank == 0 and self.emu is not None:
            # saved through memory: torch.save names its archive after the file it writes to, and the atomic
            # write's temporary name is random, so equal states would give different bytes
            buffer = io.BytesIO()
            torch.save(self.emu.state_dict(), buffer)
            atomic_write_bytes(self.staging / "emu_state.pt", buffer.getvalue())


def _recover_loop(config: dict) -> None:
    worker = _Worker(config["job"])
    for r in range(worker.start_round, worker.plan.rounds):
        worker.run(r)
    worker.finish()


# ----------------------------------------------------------------------------- the driver
def validate_inputs(data_dir, teacher_dir, stats_dir, cfg: RecoverConfig):
    """Every check of a recovery's inputs that can fail, before Ray or any worker starts (the settings were
    checked when ``cfg`` was built): the prepared data (verified), the teacher and its agreement with the
    data, the plan (an IPC the classes hold), and for a spectral method the statistics and the
    factorisation of (Ψ + βI) at every β of the schedule.  Returns (info, labels, plan)."""
    method = get_method(cfg.method)
    info = verify_dataset(data_dir)
    teacher, tinfo = load_teacher(teacher_dir)
    check_teacher_data(tinfo, info, teacher_dir, data_dir)
    labels = read_labels(str(data_dir), "train")
    plan = make_plan(labels, info.num_classes, cfg)
    if method.spectral and stats_dir is None:
        raise ValueError(f"method {cfg.method!r} needs --stats (the output of `unidd-ray stats`)")
    if stats_dir is not None:  # checked whenever given: statistics of another teacher are a mistake to name
        real = load_stats(stats_dir, teacher_sha256=tinfo.sha256, dataset_fingerprint=info.fingerprint)
        layers = resolve_layers(teacher, None)  # raises for a teacher without Conv2d layers to tap
        missing = [name for name in layers if name not in real]
        if missing:
            raise ValueError(f"the teacher's layers {missing} have no statistics in {stats_dir}")
        if method.spectral:  # the covariance and signal asked for (imported statistics serve only some)
            for name in layers:
                real[name].covariance(cfg.covariance)
                real[name].signal(cfg.signal)
        filt = method_filter(cfg)
        # the resolvent filters' (Ψ + βI) must factorise at the smallest β of the schedule
        betas = {getattr(filt.at_slot(b, cfg.ipc), "beta", None) for b in range(cfg.ipc)} - {None} if filt else set()
        for name in layers if betas else ():
            cholesky_factor(real[name].covariance(cfg.covariance), min(betas))  # raises naming beta and λ_min
    if method.needs_batchnorm and not bn_layers(teacher):
        raise ValueError(f"{cfg.method} matches BatchNorm running statistics, but the teacher in "
                         f"{teacher_dir} ({tinfo.arch}) has no BatchNorm2d layer")
    return info, labels, plan


def check_staging(staging: Path) -> None:
    """``<out>.partial`` holds a recovery in progress (its ``plan.json`` is written first; a crash before that
    leaves at most the file's temporary name) or nothing: a folder of that name holding anything else is
    someone else's, and is neither resumed nor removed."""
    if not staging.exists() and not staging.is_symlink():
        return
    if not staging.is_dir():
        raise OutputError(f"{staging} exists and is not a directory, but recover keeps its work in progress there; "
                          "move it, or give --out another name")
    if not (staging / "plan.json").is_file() and not all(p.name.startswith(".plan.json.") for p in staging.iterdir()):
        raise OutputError(f"{staging} holds files unidd-ray did not write, but recover keeps its work in progress "
                          f"there; move them out, or give --out another name")


def _staging(staging: Path, run_dir: Path, plan_json: dict, *, resume: bool) -> bool:
    """Make the staging directory ready: a resumed one must record this plan and identity; a fresh run starts
    with an empty one holding ``plan.json`` (and no checkpoints).  Returns whether the run is fresh."""
    if resume and (staging / "plan.json").is_file():  # plan.json is written first: without it no batch has started
        try:
            previous = json.loads((staging / "plan.json").read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot resume: {staging / 'plan.json'} is not valid JSON ({exc})") from None
        fix = f"start over without --resume, give another --out, or remove {staging}"
        check_resumable(previous.get("identity"), plan_json["identity"], what=str(staging), fix=fix)
        differ = [f"plan.{k}" for k in plan_json if k != "identity" and previous.get(k) != plan_json[k]]
        if differ:  # the same settings and inputs give the same plan, unless the plan's rules changed
            raise ValueError(f"cannot resume {staging}: its plan differs ({'; '.join(differ)}); {fix}")
        return False
    if resume:
        log.info(f"recover: nothing to resume in {staging}; starting from the first round")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    staging.mkdir(parents=True)
    atomic_write_json(staging / "plan.json", plan_json)
    return True


@holds_output_lock()
def run_recover(data_dir, teacher_dir, stats_dir, out_dir, cfg: RecoverConfig, *, storage_path, resume=False,
                num_workers: int = 1, recipe_yaml: str | None = None, checked: tuple | None = None,
                faults: FaultPlan | None = None, trainer_class=None, progress: bool = True) -> Path:
    """Recover the distilled set into ``out_dir`` (written as a whole only when complete).

    ``checked``: what :func:`validate_inputs` returned for these same inputs, when the caller has already
    checked them (the pipeline checks every recovery before starting any); else they are checked here.  A
    worker fault is retried from the last finished round up to ``recover.max_failures`` times; a worker that
    refuses its input ends the run at once, and a run started afresh then leaves no staging directory or
    checkpoints behind.  ``faults``: a fault to inject (tests); ``trainer_class``: see
    :func:`unidd_ray.runtime.train.trainer_factory`; ``progress``: a progress bar on the terminal.
    """
    out_dir = Path(out_dir).resolve()
    staging = out_dir.parent / f"{out_dir.name}.partial"
    check_output(out_dir, distilled.KIND)
    check_staging(staging)
    info, _, plan = checked if checked is not None else validate_inputs(data_dir, teacher_dir, stats_dir, cfg)
    spectral = get_method(cfg.method).spectral
    # the statistics go to the workers of a spectral method only (the others read none)
    stats_dir = Path(stats_dir).resolve() if stats_dir is not None and spectral else None
    storage_path = Path(storage_path).resolve()
    run_dir = storage_path / RUN_NAME
    require_resources("recover", workers=cfg.workers, cpus=cfg.cpus_per_worker, gpus=1 if cfg.use_gpu else 0)
    stats_sha = stats_sha256(stats_dir) if stats_dir else None
    plan = replace(plan, identity=recovery_identity(cfg, info, read_teacher_info(teacher_dir), stats_sha))
    plan_json = asdict(plan)
    fresh = _staging(staging, run_dir, plan_json, resume=resume)
    job = RecoverJob(cfg, str(Path(data_dir).resolve()), str(Path(teacher_dir).resolve()),
                     str(stats_dir) if stats_dir else None, str(staging), plan_json, num_workers,
                     max(1, math.floor(cfg.cpus_per_worker)), faults)
    extra = {} if trainer_class is None else {"trainer_class": trainer_class}
    trainer = trainer_factory(_recover_loop, {"job": job}, name=RUN_NAME, storage_path=storage_path,
                              workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=cfg.use_gpu, **extra)
    started = time.perf_counter()
    try:
        with console.watch(lambda: len(list((staging / RECORDS).glob("*.json"))), plan.batches(),
                           f"recover {cfg.method} IPC {cfg.ipc}", unit="batch", enabled=progress):
            fit(trainer, what=f"recover {cfg.method}", max_failures=cfg.max_failures)
    except WorkerInputError:
        if fresh:  # nothing worth resuming: leave nothing behind
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                storage_path.rmdir()  # when nothing else is kept there
        raise
    return finalize(staging, out_dir, plan, info, cfg, seconds=time.perf_counter() - started,
                    recipe_yaml=recipe_yaml, faults=faults)


# ----------------------------------------------------------------------------- finishing
def _batch_records(staging: Path) -> tuple[list[dict], list[dict]]:
    """The rows (one per image) and the batches the workers recorded, each batch with its execution count."""
    rows, batches = [], []
    for path in sorted((staging / RECORDS).glob("*.json")):
        record = json.loads(path.read_text())
        rows.extend(record["rows"])
        batches.append({k: v for k, v in record.items() if k != "rows"} | {"classes": [r["class"] for r in record["rows"]]})
    executions: dict[int, int] = {}
    for path in sorted((staging / RECORDS).glob(f"{EXECUTIONS}-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                b = int(json.loads(line)["batch"])
            except (ValueError, KeyError, TypeError):
                # blank, or cut short by a crash mid-append (the next append then shares its line): the log
                # only counts executions, and every finished batch also has its own atomically written record
                continue
            executions[b] = executions.get(b, 0) + 1
    for b in batches:
        b["executions"] = executions.get(b["batch"], 1)
    return rows, batches


def _check_complete(staging: Path, rows: list[dict], plan: RecoverPlan) -> None:
    """Every (class, slot) image exactly once, each matching its recorded checksum."""
    keys = [(r["class"], r["slot"]) for r in rows]
    expected = {(k, b) for k in plan.classes for b in range(plan.ipc)}
    if len(keys) != len(set(keys)) or set(keys) != expected:
        missing = sorted(expected - set(keys))[:5]
        raise RuntimeError(f"recovery is incomplete or inconsistent: missing {missing}, "
                           f"{len(keys) - len(set(keys))} duplicates")
    for r in rows:
        if sha256_file(staging / r["path"]) != r["sha256"]:
            raise RuntimeError(f"{staging / r['path']} does not match its recorded checksum")


def _summary(rows: list[dict], batches: list[dict], plan: RecoverPlan, info, cfg: RecoverConfig,
             seconds: float) -> dict:
    per_slot: dict[int, list[dict]] = {}
    for r in rows:
        per_slot.setdefault(r["slot"], []).append(r)
    loss_keys = sorted(k for k in rows[0] if k.startswith("loss_"))
    return {
        "method": cfg.method, "ipc": plan.ipc, "num_classes": plan.num_classes, "images": len(rows),
        "workers": plan.workers, "batches": plan.batches(), "rounds": plan.rounds, "seconds": seconds,
        "dataset": info.name, "dataset_fingerprint": info.fingerprint,
        "per_slot": {int(b): {"beta": v[0]["beta"], **{k: float(np.mean([x[k] for x in v])) for k in loss_keys}}
                     for b, v in sorted(per_slot.items())},
        "config": to_dict(cfg),
        "batches_executed": sum(b["executions"] for b in batches),
        "batches_redone": sorted(b["batch"] for b in batches if b["executions"] > 1),
    }


def finalize(staging: Path, out_dir: Path, plan: RecoverPlan, info, cfg: RecoverConfig, *, seconds: float,
             recipe_yaml: str | None = None, faults: FaultPlan | None = None) -> Path:
    """Check that every (class, slot) image exists exactly once, write the manifest and move into place.

    The per-batch records stay in the staging directory until it has replaced ``out_dir``: every step up to that
    rename can be redone from them, so a crash anywhere in here leaves a run that ``--resume`` finishes (the
    manifest lists the output files only; dot-names such as the records are not part of it)."""
    rows, batches = _batch_records(staging)
    _check_complete(staging, rows, plan)
    rows.sort(key=lambda r: (r["class"], r["slot"]))
    atomic_write_json(staging / BATCHES, batches)
    if cfg.save_beton:
        arrays = distilled.read_arrays(staging, rows)
        with atomic_file(staging / distilled.BETON, suffix=".beton") as tmp:
            write_image_beton(tmp, arrays, [r["class"] for r in rows])
    if faults is not None:
        (staging / faults.marker).unlink(missing_ok=True)
    config_text = recipe_yaml if recipe_yaml is not None else yaml.safe_dump({"recover": to_dict(cfg)},
                                                                             sort_keys=False)
    distilled.publish(staging, rows, summary=_summary(rows, batches, plan, info, cfg, seconds),
                      config_text=config_text, method=cfg.method, ipc=plan.ipc,
                      dataset_fingerprint=info.fingerprint)
    replace_directory(staging, out_dir, distilled.KIND)
    shutil.rmtree(out_dir / RECORDS, ignore_errors=True)
    return out_dir
