"""Statistics stage: real-feature moments of the frozen teacher, sharded over Ray actors.

The train split is cut into canonical *blocks* of ``block_size`` images (a
multiple of the forward ``batch_size``, so forward batches never straddle a
block).  A *work unit* is ``blocks_per_unit`` consecutive blocks.  Actors pull
units dynamically, read them through an FFCV loader (``drop_last=False``) and
return one float64 :class:`~unidd_ray.spectral.Moments` per layer and block.
The driver folds the blocks in block order as soon as the prefix is complete.

Because the fold order and every block's content are fixed by the plan, the
result is bit-for-bit the same whatever the number of actors, the unit size,
the arrival order, or which units had to be re-run after an actor died.
Every actor uses the same number of torch threads so that per-block forward
passes are themselves reproducible.

The actors form an elastic pool (:class:`unidd_ray.runtime.pool.ElasticPool`):
a unit whose actor died is run again by another.  The driver loads the teacher
(checking its sha256) and resolves the taps before any actor starts, so that a
bad ``stats.layers`` or teacher is named at once rather than as actors failing
to start.  The artifact is assembled in a temporary sibling of the output
directory and moved into place whole.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import torch

from unidd_ray.artifacts.dataset import read_labels, verify_dataset
from unidd_ray.artifacts.files import atomic_directory, atomic_write_json, atomic_write_text, check_output
from unidd_ray.artifacts.locks import holds_output_lock
from unidd_ray.artifacts.statistics import covariance_report, write_stats
from unidd_ray.artifacts.teacher import check_teacher_data, load_teacher, read_teacher_info
from unidd_ray.config import StatsConfig, to_dict
from unidd_ray.data.loading import make_loader
from unidd_ray.models import layer_channels, resolve_layers, tapped
from unidd_ray.runtime import console
from unidd_ray.runtime.cluster import require_resources
from unidd_ray.runtime.pool import ElasticPool
from unidd_ray.spectral import Moments

UnitPlan = list[tuple[int, int]]  # (start, stop) per block


@dataclass
class Plan:
    images: int
    batch_size: int
    block_size: int
    blocks: list[tuple[int, int]]
    units: list[list[int]]  # block ids per unit

    def describe(self) -> dict:
        return {"images": self.images, "batch_size": self.batch_size, "block_size": self.block_size,
                "blocks": len(self.blocks), "units": len(self.units)}


def make_plan(images: int, cfg: StatsConfig) -> Plan:
    if images < 1:  # the sizes were checked when cfg was built (stats.block_size a multiple of batch_size)
        raise ValueError("the train split is empty")
    blocks = [(s, min(s + cfg.block_size, images)) for s in range(0, images, cfg.block_size)]
    ids = list(range(len(blocks)))
    units = [ids[i:i + cfg.blocks_per_unit] for i in range(0, len(ids), cfg.blocks_per_unit)]
    return Plan(images, cfg.batch_size, cfg.block_size, blocks, units)


class StatsWorker:
    """Holds the frozen teacher and the taps; computes the per-block moments of a unit.

    Used as a Ray actor by :func:`compute_stats` and directly (in process) by tests
    and benchmarks.
    """

    def __init__(self, teacher_dir: str, data_dir: str, layers: list[str] | None, batch_size: int,
                 block_size: int, threads: int = 1, num_workers: int = 1, device: str = "cpu"):
        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device)
        self.model, self.info = load_teacher(teacher_dir, device=self.device)
        self.layers = resolve_layers(self.model, layers)
        self.channels = layer_channels(self.model, self.layers)
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.block_size = block_size
        self.num_workers = num_workers

    def ready(self) -> bool:
        return True

    def layer_channels(self) -> dict[str, int]:
        return dict(self.channels)

    def node_id(self) -> str | None:
        """The Ray node this worker runs on (``None`` outside Ray)."""
        try:
            return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except Exception:  # noqa: BLE001 - diagnostics only
            return None

    @torch.no_grad()
    def compute(self, blocks: list[tuple[int, int, int]]) -> dict[int, dict[str, dict]]:
        """Moments per block: ``{block_id: {layer: Moments.state_dict()}}`` for ``(block_id, start, stop)``."""
        indices = [i for _, start, stop in blocks for i in range(start, stop)]
        loader = make_loader(self.data_dir, "train", batch_size=self.batch_size, num_workers=self.num_workers,
                             indices=indices, train=False, order="sequential", device=str(self.device),
                             resolution=self.info.resolution,  # the teacher's side
                             normalize=(self.info.mean, self.info.std))  # and the teacher's normalisation
        k = self.info.num_classes
        starts = {bid: start for bid, start, _ in blocks}
        result = {bid: {name: Moments(c, k, device=self.device) for name, c in self.channels.items()}
                  for bid, _, _ in blocks}
        captured: dict[str, torch.Tensor] = {}
        with tapped(self.model, self.layers, lambda name, x: captured.__setitem__(name, x)):
            for images, labels, index in loader:
                bid = int(index[0]) // self.block_size
                if bid not in starts or not bool((index // self.block_size == bid).all()):
                    raise RuntimeError(f"batch with indices {index[:3].tolist()}… does not lie in one block of the "
                                       "unit; the loader returned rows out of plan order")
                captured.clear()
                logits = self.model(images.to(self.device, non_blocking=True))
                probs = torch.softmax(logits.double(), 1)
                labels = labels.to(self.device)
                for name in self.layers:
                    result[bid][name].update(captured[name], labels, probs)
        return {bid: {name: m.state_dict() for name, m in layers.items()} for bid, layers in result.items()}


@dataclass
class StatsResult:
    moments: dict[str, Moments]
    plan: Plan
    seconds: float
    retried_units: int
    actors: int


def fold(total: dict[str, Moments] | None, block: dict[str, dict]) -> dict[str, Moments]:
    """``total`` with one block's moments (``Moments.state_dict()`` per layer) added: the driver's merge step."""
    block_m = {name: Moments.from_state_dict(state) for name, state in block.items()}
    if total is None:
        return block_m
    return {name: total[name] + block_m[name] for name in total}


def check_taps(teacher_dir: str | Path, layers: list[str] | None) -> list[str]:
    """What every actor's constructor does first, in the driver: load the teacher (its weights' sha256 is
    checked) and resolve the tapped layers and their channels; raises naming the teacher or ``stats.layers``."""
    model, _ = load_teacher(teacher_dir)
    try:
        names = resolve_layers(model, layers)
        layer_channels(model, names)
    except ValueError as exc:
        raise ValueError(f"cannot tap the teacher in {teacher_dir}: {exc}; set stats.layers to names of its "
                         "Conv2d/BatchNorm2d modules (null: every Conv2d input)") from None
    return names


class _BlockFolder:
    """Folds the blocks of finished units in block order, as soon as the prefix up to a block is complete."""

    def __init__(self, plan: Plan, bar):
        self.plan, self.bar = plan, bar
        self.done: dict[int, dict] = {}
        self.next = 0
        self.total: dict[str, Moments] | None = None

    def add(self, unit: int, blocks: dict[int, dict]) -> None:
        self.done.update(blocks)
        while self.next in self.done:
            self.total = fold(self.total, self.done.pop(self.next))
            start, stop = self.plan.blocks[self.next]
            self.bar.update(stop - start)
            self.next += 1


def compute_stats(teacher_dir: str | Path, data_dir: str | Path, cfg: StatsConfig, *, num_workers: int = 1,
                  progress: bool = True, on_result: Callable[[int, dict], None] | None = None,
                  images: int | None = None) -> StatsResult:
    """Run the actor pool over the train split and fold the per-block moments in block order.

    ``on_result(unit_id, actors)`` is called after each finished unit (tests use it to kill an actor or remove
    a node mid-run); ``actors`` maps actor keys to handles.  ``images``: only the first ``images`` rows of the
    split (benchmarks, smoke runs).
    """
    # actors may start in another working directory (or on another node): hand them absolute paths
    teacher_dir, data_dir = Path(teacher_dir).resolve(), Path(data_dir).resolve()
    labels = read_labels(str(data_dir), "train")
    if images is not None and not 1 <= images <= len(labels):
        raise ValueError(f"images must lie in 1..{len(labels)} (the train split's size), got {images}")
    plan = make_plan(len(labels) if images is None else int(images), cfg)
    check_taps(teacher_dir, cfg.layers)
    # actors beyond the cluster's size only queue (the pool works with those that start),
    # but one actor that can never be placed would leave the pool waiting forever
    require_resources("a stats actor", workers=1, cpus=cfg.cpus_per_actor, gpus=cfg.gpus_per_actor,
                      fix="lower stats.cpus_per_actor / stats.gpus_per_actor")
    worker_cls = ray.remote(StatsWorker)
    device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
    threads = max(1, math.floor(cfg.cpus_per_actor))

    def new_actor():
        return worker_cls.options(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
                                  scheduling_strategy="SPREAD", max_restarts=0).remote(
            str(teacher_dir), str(data_dir), cfg.layers, plan.batch_size, plan.block_size, threads, num_workers,
            device)

    def submit(actor, unit: int):
        return actor.compute.remote([(b, *plan.blocks[b]) for b in plan.units[unit]])

    started = time.perf_counter()
    pool = ElasticPool(new_actor, cfg.actors, submit, max_retries=cfg.max_retries,
                       max_failed_starts=cfg.max_retries + cfg.actors)
    bar = console.progress(plan.images, "statistics", unit="img") if progress else _NoBar()
    folder = _BlockFolder(plan, bar)
    try:
        pool.run(list(range(len(plan.units))), folder.add, after_unit=on_result)
    finally:
        bar.close()
    if folder.next != len(plan.blocks):
        raise RuntimeError(f"only {folder.next} of {len(plan.blocks)} blocks were merged")
    return StatsResult(folder.total, plan, time.perf_counter() - started, pool.retried, cfg.actors)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def check_stats(data_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: StatsConfig):
    """Every check of a statistics pass that can fail, before Ray or any actor starts: the output path, the
    prepared data (verified), the teacher (its weights' checksum) and its agreement with the data, and the
    tapped layers.  Returns (dataset info, teacher info)."""
    check_output(out_dir, "stats")
    info = verify_dataset(data_dir)
    teacher = read_teacher_info(teacher_dir)
    check_teacher_data(teacher, info, teacher_dir, data_dir)
    check_taps(teacher_dir, cfg.layers)
    return info, teacher


@holds_output_lock()
def run_stats(data_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: StatsConfig, *,
              num_workers: int = 1, progress: bool = True, recipe_yaml: str | None = None,
              on_result=None) -> Path:
    """Compute and write the statistics artifact (``stats.parquet`` + manifest + config + summary).

    The files are written to a temporary sibling of ``out_dir`` that replaces it only when all are there, so
    the summary and config in ``out_dir`` always describe its statistics.
    """
    info, teacher = check_stats(data_dir, teacher_dir, out_dir, cfg)
    result = compute_stats(teacher_dir, data_dir, cfg, num_workers=num_workers, progress=progress,
                           on_result=on_result)
    out_dir = Path(out_dir)
    summary = {
        "images": result.plan.images, "seconds": result.seconds, "images_per_s": result.plan.images / result.seconds,
        "actors": result.actors, "retried_units": result.retried_units, "plan": result.plan.describe(),
        "layers": {name: covariance_report(m) for name, m in result.moments.items()},
        "config": to_dict(cfg),
    }
    with atomic_directory(out_dir, "stats") as staging:
        write_stats(staging, result.moments, teacher_sha256=teacher.sha256, dataset_fingerprint=info.fingerprint,
                    extra={"plan": result.plan.describe()})
        atomic_write_json(staging / "summary.json", summary)
        if recipe_yaml is not None:
            atomic_write_text(staging / "config.yaml", recipe_yaml)
    return out_dir
