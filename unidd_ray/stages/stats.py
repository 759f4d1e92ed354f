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

The driver loads the teacher (checking its sha256) and resolves the taps before
any actor starts, so that a bad ``stats.layers`` or teacher is named at once
rather than as actors failing to start.  The artifact is assembled in a
temporary sibling of the output directory and moved into place whole.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from unidd_ray.config import StatsConfig, to_dict
from unidd_ray.locks import holds_output_lock
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
        import unidd_ray  # noqa: F401  (torchvision fix in this process)
        from unidd_ray.models import layer_channels, resolve_layers
        from unidd_ray.teacher import load_teacher

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
            import ray

            return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except Exception:  # noqa: BLE001 - diagnostics only
            return None

    @torch.no_grad()
    def compute(self, blocks: list[tuple[int, int, int]]) -> dict[int, dict[str, dict]]:
        """Moments per block: ``{block_id: {layer: Moments.state_dict()}}`` for ``(block_id, start, stop)``."""
        from unidd_ray.data.loading import make_loader
        from unidd_ray.models import tapped

        indices = [i for _, start, stop in blocks for i in range(start, stop)]
        loader = make_loader(self.data_dir, "train", batch_size=self.batch_size, num_workers=self.num_workers,
                             indices=indices, train=False, order="sequential", device=str(self.device),
                             resolution=self.info.resolution)  # the teacher's side
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


def _fold(total: dict[str, Moments] | None, block: dict[str, dict]) -> dict[str, Moments]:
    block_m = {name: Moments.from_state_dict(state) for name, state in block.items()}
    if total is None:
        return block_m
    return {name: total[name] + block_m[name] for name in total}


def check_taps(teacher_dir: str | Path, layers: list[str] | None) -> list[str]:
    """What every actor's constructor does first, in the driver: load the teacher (its weights' sha256 is
    checked) and resolve the tapped layers and their channels; raises naming the teacher or ``stats.layers``."""
    from unidd_ray.models import layer_channels, resolve_layers
    from unidd_ray.teacher import load_teacher

    model, _ = load_teacher(teacher_dir)
    try:
        names = resolve_layers(model, layers)
        layer_channels(model, names)
    except ValueError as exc:
        raise ValueError(f"cannot tap the teacher in {teacher_dir}: {exc}; set stats.layers to names of its "
                         "Conv2d/BatchNorm2d modules (null: every Conv2d input)") from None
    return names


def compute_stats(teacher_dir: str | Path, data_dir: str | Path, cfg: StatsConfig, *, num_workers: int = 1,
                  progress: bool = True, on_result: Callable[[int, dict], None] | None = None,
                  images: int | None = None) -> StatsResult:
    """Run the actor pool over the train split and fold the per-block moments in block order.

    ``on_result(unit_id, pool)`` is called after each finished unit (tests use it to
    kill an actor or remove a node mid-run); ``pool`` maps actor ids to handles.
    ``images``: only the first ``images`` rows of the split (benchmarks, smoke runs).
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from tqdm.auto import tqdm

    from unidd_ray.data.loading import read_labels

    # actors may start in another working directory (or on another node): hand them absolute paths
    teacher_dir, data_dir = Path(teacher_dir).resolve(), Path(data_dir).resolve()
    labels = read_labels(str(data_dir), "train")
    if images is not None and not 1 <= images <= len(labels):
        raise ValueError(f"images must lie in 1..{len(labels)} (the train split's size), got {images}")
    plan = make_plan(len(labels) if images is None else int(images), cfg)
    check_taps(teacher_dir, cfg.layers)
    from unidd_ray.ray_utils import require_resources

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

    started = time.perf_counter()
    # actors join the pool once their constructor has run (a replacement that can never be
    # scheduled, e.g. after a node was removed, simply never joins)
    joining = {}
    for _ in range(cfg.actors):
        a = new_actor()
        joining[a.ready.remote()] = a
    pool: dict[int, object] = {}
    in_flight: dict = {}  # ref -> (unit_id, actor_key)
    queue = deque(range(len(plan.units)))
    attempts = {u: 0 for u in queue}
    done_blocks: dict[int, dict] = {}
    next_block = 0
    total = None
    retried = 0
    failed_starts = 0
    next_key = 0
    bar = tqdm(total=plan.images, unit="img", desc="stats", disable=not progress)

    def dispatch():
        busy = {key for _, key in in_flight.values()}
        for key, actor in pool.items():
            if key in busy or not queue:
                continue
            unit = queue.popleft()
            blocks = [(b, *plan.blocks[b]) for b in plan.units[unit]]
            in_flight[actor.compute.remote(blocks)] = (unit, key)

    def replace_dead(key):
        nonlocal retried
        actor = pool.pop(key, None)
        for ref, (unit, k) in list(in_flight.items()):
            if k == key:
                in_flight.pop(ref)
                attempts[unit] += 1
                if attempts[unit] > cfg.max_retries:
                    raise RuntimeError(f"work unit {unit} failed {attempts[unit]} times; giving up")
                queue.appendleft(unit)
                retried += 1
        if actor is not None:
            ray.kill(actor, no_restart=True)
        replacement = new_actor()
        joining[replacement.ready.remote()] = replacement

    try:
        while queue or in_flight:
            dispatch()
            waiting = list(in_flight) + list(joining)
            if not waiting:
                raise RuntimeError("no statistics actor could be started; check stats.cpus_per_actor/gpus_per_actor "
                                   "against the cluster's resources")
            ready, _ = ray.wait(waiting, num_returns=1, timeout=None)
            ref = ready[0]
            if ref in joining:
                actor = joining.pop(ref)
                try:
                    ray.get(ref)
                except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                    failed_starts += 1
                    if failed_starts > cfg.max_retries + cfg.actors:
                        raise RuntimeError(f"statistics actors keep failing to start: {exc}") from exc
                    replacement = new_actor()
                    joining[replacement.ready.remote()] = replacement
                    continue
                pool[next_key] = actor
                next_key += 1
                continue
            unit, key = in_flight[ref]
            try:
                blocks = ray.get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                replace_dead(key)
                continue
            in_flight.pop(ref)
            done_blocks.update(blocks)
            while next_block in done_blocks:
                total = _fold(total, done_blocks.pop(next_block))
                start, stop = plan.blocks[next_block]
                bar.update(stop - start)
                next_block += 1
            if on_result is not None:
                on_result(unit, dict(pool))
    finally:
        bar.close()
        for actor in list(pool.values()) + list(joining.values()):
            ray.kill(actor, no_restart=True)
    if next_block != len(plan.blocks):
        raise RuntimeError(f"only {next_block} of {len(plan.blocks)} blocks were merged")
    return StatsResult(total, plan, time.perf_counter() - started, retried, cfg.actors)


def check_stats(data_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: StatsConfig):
    """Every check of a statistics pass that can fail, before Ray or any actor starts: the output path, the
    prepared data (verified), the teacher (its weights' checksum) and its agreement with the data, and the
    tapped layers.  Returns (dataset info, teacher info)."""
    from unidd_ray.artifacts import check_output
    from unidd_ray.data.dataset_info import verify_dataset
    from unidd_ray.teacher import check_teacher_data, read_teacher_info

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
    from unidd_ray.artifacts import atomic_directory, atomic_write_json, atomic_write_text
    from unidd_ray.stats_io import covariance_report, write_stats

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
