"""Recovery stage: class-partitioned synthesis of the distilled set on Ray Train.

Worker ``w`` of ``W`` owns a balanced, disjoint, contiguous range of classes,
cut into chunks of ``classes_per_batch``.  Work proceeds in *rounds*: round
``r`` is slot ``b = r // R`` and chunk ``j = r % R`` (``R`` = the largest number
of chunks of any worker); in a round every worker optimises its ``j``-th chunk
for slot ``b`` from the same EMU state.  After the round the workers' new EMU
sums are all-reduced (``sync: round``), so the state equals what one process
holds after the union of their batches.  With ``sync: step`` the batch moments
themselves are all-reduced at every iteration, so the W batches of a round are
one large batch.

After every round, each worker's images are written (PNG, atomically) to the
staging directory ``<out>.partial`` together with one JSON record per batch;
rank 0 checkpoints the EMU state and the number of finished rounds through
``ray.train.report``.  A restarted worker (``FailureConfig``) or a resumed
command (``resume=True``) continues from the last finished round; every batch is
a deterministic function of its inputs and the EMU state, so the final output
is byte-identical to an uninterrupted run.  ``plan.json`` records the plan and
the identity of everything else the images depend on (the settings that change
them, the teacher's and the statistics' sha256, the dataset); a resume with
anything else is refused, naming what differs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from unidd_ray.artifacts import replace_directory
from unidd_ray.config import RecoverConfig, to_dict
from unidd_ray.locks import holds_output_lock

RUN_NAME = "recover"
IMAGES = "images"
RECORDS = ".batches"
EXECUTIONS = "executions"  # per-worker append-only logs of finished batches, under RECORDS
BATCHES = "batches.json"  # the per-batch records of the finished run
FAULT_MARKER = ".fault-injected"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- planning
@dataclass
class RecoverPlan:
    num_classes: int
    ipc: int
    workers: int
    partitions: list[list[int]]  # classes of each worker
    chunks: list[list[list[int]]]  # chunks[w][j] = classes of worker w's j-th batch
    rounds_per_slot: int
    init_index: list[list[int]]  # init_index[class][slot] = index of the real train image
    seed: int
    classes: list[int]  # the classes distilled (all, or a subset for quick Tune trials)
    # what the images depend on besides the plan (run_identity); a resume must find the same
    identity: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return self.ipc * self.rounds_per_slot

    def batch_id(self, slot: int, worker: int, chunk: int) -> int:
        """A global id, unique per (slot, worker, chunk), increasing with the round."""
        return (slot * self.rounds_per_slot + chunk) * self.workers + worker

    def batches(self) -> int:
        return self.ipc * sum(len(c) for c in self.chunks)

    def batches_done(self, round_index: int) -> int:
        """Number of batches finished once rounds 0 … ``round_index`` are done."""
        slots, j = divmod(round_index, self.rounds_per_slot)
        per_slot = sum(len(c) for c in self.chunks)
        return slots * per_slot + sum(min(j + 1, len(c)) for c in self.chunks)


def make_plan(labels: np.ndarray, num_classes: int, cfg: RecoverConfig, classes: list[int] | None = None
              ) -> RecoverPlan:
    """Class partition, chunks and the seeded choice of real initial images (checked before any work).

    ``classes`` restricts the plan to a subset of the classes (default: all of them).
    """
    classes = list(range(num_classes)) if classes is None else sorted(int(k) for k in classes)
    if not classes or classes[0] < 0 or classes[-1] >= num_classes:
        raise ValueError(f"classes must be a non-empty subset of 0..{num_classes - 1}")
    if cfg.ipc < 1:
        raise ValueError(f"recover.ipc must be at least 1, got {cfg.ipc}")
    if cfg.workers < 1 or cfg.workers > len(classes):
        raise ValueError(f"recover.workers must be between 1 and the number of classes ({len(classes)}), "
                         f"got {cfg.workers}")
    counts = np.bincount(labels, minlength=num_classes)
    short = [k for k in classes if counts[k] < cfg.ipc]
    if short:
        k = short[0]
        raise ValueError(f"IPC {cfg.ipc} is larger than the {counts[k]} training images of class {k}; "
                         f"lower recover.ipc to at most {min(int(counts[c]) for c in classes)}")
    partitions = [p.tolist() for p in np.array_split(np.array(classes), cfg.workers)]
    per_batch = cfg.classes_per_batch
    if per_batch is not None and per_batch < 1:
        raise ValueError("recover.classes_per_batch must be positive (or null for all classes of a worker)")
    chunks = []
    for part in partitions:
        size = per_batch or len(part)
        chunks.append([part[i:i + size] for i in range(0, len(part), size)])
    rounds_per_slot = max(len(c) for c in chunks)
    init_index = []
    for k in range(num_classes):
        if k not in classes:
            init_index.append([])
            continue
        members = np.flatnonzero(labels == k)
        rng = np.random.default_rng([cfg.seed, k])
        init_index.append(members[rng.permutation(len(members))[:cfg.ipc]].tolist())
    return RecoverPlan(num_classes, cfg.ipc, cfg.workers, partitions, chunks, rounds_per_slot, init_index, cfg.seed,
                       classes)


# ----------------------------------------------------------------------------- images
def to_png_bytes(image: torch.Tensor, mean, std) -> bytes:
    """Lossless 8-bit PNG of one normalised (C, H, W) image."""
    from PIL import Image

    mean = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    pixels = ((image.cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    mode = "L" if array.shape[2] == 1 else "RGB"
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def image_path(cls: int, slot: int) -> str:
    return f"{IMAGES}/{cls:04d}/{slot:04d}.png"


def load_real_images(data_dir: str, indices: list[int], *, num_workers: int = 1, resolution: int | None = None,
                     batch_size: int = 256) -> torch.Tensor:
    """Normalised eval-pipeline images of the given train indices, in the given order.

    ``resolution``: output side (default: the stored one; the recovery asks for its teacher's);
    ``batch_size``: images per loader batch, which bounds the loader's buffers.
    """
    from unidd_ray.data.loading import make_loader

    unique = sorted(set(indices))
    loader = make_loader(data_dir, "train", batch_size=max(1, min(batch_size, len(unique))), num_workers=num_workers,
                         indices=unique, train=False, order="sequential", resolution=resolution)
    rows = {}
    for images, _, index in loader:
        for i, img in zip(index.tolist(), images):
            rows[i] = img
    return torch.stack([rows[i] for i in indices])


class InitImages:
    """The real initial images of one worker's rounds, read ahead through as few FFCV loaders as a
    memory budget allows.  Starting a loader costs about a second on a CPU and a recovery has
    IPC × chunks rounds, so small sets (Fashion-MNIST: all 100 images of IPC 10) are read at once,
    while ImageNet-sized ones are read a few rounds at a time."""

    def __init__(self, data_dir: str, plan: RecoverPlan, rank: int, *, image_bytes: int, num_workers: int = 1,
                 start_round: int = 0, budget_bytes: int = 256 << 20, resolution: int | None = None):
        self.data_dir, self.num_workers, self.resolution = data_dir, num_workers, resolution
        self.per_load = max(1, budget_bytes // max(1, image_bytes))
        chunks = plan.chunks[rank]
        self.rounds = []  # the index lists this worker will ask for, in order
        for r in range(start_round, plan.rounds):
            slot, j = divmod(r, plan.rounds_per_slot)
            if j < len(chunks):
                self.rounds.append([plan.init_index[k][slot] for k in chunks[j]])
        self.next = 0
        self.cache: dict[int, torch.Tensor] = {}
        self.remaining = Counter(i for r in self.rounds for i in r)  # uses of each index in rounds[next:]

    def __call__(self, indices: list[int]) -> torch.Tensor:
        if self.next < len(self.rounds) and self.rounds[self.next] == list(indices):
            self.remaining.subtract(self.rounds[self.next])
            self.next += 1
        if any(i not in self.cache for i in indices):
            wanted = list(indices)
            for ahead in self.rounds[self.next:]:  # read ahead while the budget allows
                if len(wanted) + len(ahead) > self.per_load:
                    break
                wanted += ahead
            wanted = list(dict.fromkeys(wanted))
            self.cache.update(zip(wanted, load_real_images(self.data_dir, wanted, num_workers=self.num_workers,
                                                           resolution=self.resolution)))
        images = torch.stack([self.cache[i] for i in indices])
        for i in indices:
            if self.remaining[i] <= 0:  # no later round asks for it
                self.cache.pop(i, None)
        return images


# ----------------------------------------------------------------------------- the worker
class TorchDistReducer:
    """Sums over the Ray Train worker group with torch.distributed (gloo on CPU, NCCL on GPU)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        self.dist.all_reduce(t)
        return t

    def sum_differentiable(self, t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t)


class _AllReduceSum(torch.autograd.Function):
    """All-reduce in the forward pass; identity in the backward pass (each worker evaluates the same
    loss of the summed statistics and back-propagates into its own contribution only)."""

    @staticmethod
    def forward(ctx, t):
        import torch.distributed as dist

        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


def _build_distiller(config: dict, device):
    from unidd_ray.config import from_dict
    from unidd_ray.data.prepare import read_dataset_info
    from unidd_ray.distill import Distiller, RecoverSettings
    from unidd_ray.stats_io import load_stats
    from unidd_ray.teacher import load_teacher

    cfg = from_dict(RecoverConfig, config["recover"])
    info = read_dataset_info(config["data_dir"])
    teacher, tinfo = load_teacher(config["teacher_dir"], device=device)
    real = None
    if config.get("stats_dir"):
        real = load_stats(config["stats_dir"], teacher_sha256=tinfo.sha256, dataset_fingerprint=info.fingerprint)
    settings = RecoverSettings(**{k: getattr(cfg, k) for k in RecoverSettings.__dataclass_fields__})
    mean = torch.tensor(info.mean, dtype=torch.float32)
    std = torch.tensor(info.std, dtype=torch.float32)
    distiller = Distiller(teacher, real, settings, num_classes=info.num_classes, resolution=tinfo.resolution,
                          pixel_min=(0 - mean) / std, pixel_max=(1 - mean) / std, device=device)
    return cfg, info, distiller


def run_round(distiller, plan: RecoverPlan, r: int, *, rank: int, emu, reducer, sync: str, data_dir: str,
              num_workers: int, device, init_images=None) -> tuple[list[int] | None, object]:
    """Round ``r`` of worker ``rank``: optimise its chunk (if any), then fold the round into the EMU.

    With ``sync == "step"`` and several workers, a worker without a chunk still takes part
    (with an empty batch) in every iteration's all-reduce.  ``init_images`` (indices → images, e.g.
    an :class:`InitImages`) supplies the real initial images; by default each round reads its own.
    Returns (classes, BatchResult or None).
    """
    slot, j = divmod(r, plan.rounds_per_slot)
    chunks = plan.chunks[rank]
    chunk = chunks[j] if j < len(chunks) else None
    step_sync = sync == "step" and reducer is not None
    result = None
    if chunk is not None or step_sync:
        classes = chunk or []
        if classes:
            indices = [plan.init_index[k][slot] for k in classes]
            init = (init_images(indices) if init_images is not None
                    else load_real_images(data_dir, indices, num_workers=num_workers,
                                          resolution=distiller.resolution))
        else:
            side = distiller.resolution
            init = torch.zeros(0, len(distiller.pixel_min.flatten()), side, side)
        global_count = int(reducer.sum(torch.tensor([float(len(classes))]))[0]) if step_sync else None
        aug_seed = int(np.random.SeedSequence([plan.seed, slot, j]).generate_state(1)[0])
        result = distiller.optimize(init.to(device), torch.tensor(classes, dtype=torch.long), slot=slot,
                                    ipc=plan.ipc, aug_seed=aug_seed, emu=emu,
                                    reducer=reducer if step_sync else None, global_count=global_count)
    if emu is not None:
        if result is not None:
            for name, stats in result.stats.items():
                emu.commit(name, stats.covariance, stats.signal, stats.columns)
        # sync: round sums every worker's new batches; sync: step already shared one large batch
        emu.synchronise(reducer.sum if (reducer is not None and sync == "round") else None)
    return chunk, result


def _image_bytes(distiller) -> int:
    return 4 * len(distiller.pixel_min.flatten()) * distiller.resolution ** 2


def recover_in_process(distiller, plan: RecoverPlan, *, data_dir: str, emu_enabled: bool = True,
                       num_workers: int = 1, device="cpu", on_round=None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Single-process recovery over all rounds of a one-worker plan (Ray Tune trials, notebooks, tests).

    Returns the images (normalised, ordered by class then slot), their labels and the per-batch loss parts.
    """
    from unidd_ray.spectral import EMU

    if plan.workers != 1:
        raise ValueError("recover_in_process runs a one-worker plan; use run_recover for several workers")
    emu = EMU(distiller.emu_layers(), enabled=emu_enabled, device=device) if distiller.layers else None
    init_images = InitImages(data_dir, plan, 0, image_bytes=_image_bytes(distiller), num_workers=num_workers,
                             resolution=distiller.resolution)
    found: dict[tuple[int, int], torch.Tensor] = {}
    parts = []
    for r in range(plan.rounds):
        slot = r // plan.rounds_per_slot
        chunk, result = run_round(distiller, plan, r, rank=0, emu=emu, reducer=None, sync="round",
                                  data_dir=data_dir, num_workers=num_workers, device=device, init_images=init_images)
        for cls, image in zip(chunk, result.images):
            found[(cls, slot)] = image.cpu()
        parts.append({"slot": slot, "classes": chunk, **result.parts})
        if on_round is not None:
            on_round(r, result)
    keys = sorted(found)
    return torch.stack([found[k] for k in keys]), torch.tensor([k[0] for k in keys]), parts


def _recover_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    import unidd_ray  # noqa: F401
    from unidd_ray.artifacts import atomic_file, atomic_write_bytes, atomic_write_json, sha256_bytes
    from unidd_ray.spectral import EMU

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config["threads"])))
    cfg, info, distiller = _build_distiller(config, device)
    plan = RecoverPlan(**config["plan"])
    staging = Path(config["staging"])
    emu = EMU(distiller.emu_layers(), enabled=cfg.emu, device=device) if distiller.layers else None
    reducer = TorchDistReducer() if world > 1 else None
    start_round = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            progress = json.loads((Path(d) / "progress.json").read_text())
            start_round = int(progress["rounds_done"])
            if emu is not None:
                emu.load_state_dict(torch.load(Path(d) / "emu.pt", map_location=device, weights_only=True))
    init_images = InitImages(config["data_dir"], plan, rank, image_bytes=_image_bytes(distiller),
                             num_workers=config["num_workers"], start_round=start_round,
                             resolution=distiller.resolution)
    for r in range(start_round, plan.rounds):
        slot, j = divmod(r, plan.rounds_per_slot)
        started = time.perf_counter()
        chunk, result = run_round(distiller, plan, r, rank=rank, emu=emu, reducer=reducer, sync=cfg.sync,
                                  data_dir=config["data_dir"], num_workers=config["num_workers"], device=device,
                                  init_images=init_images)
        if chunk:
            batch = plan.batch_id(slot, rank, j)
            beta = distiller.slot_filter(slot, plan.ipc)
            rows = []
            for cls, image in zip(chunk, result.images):
                data = to_png_bytes(image, info.mean, info.std)
                rel = image_path(cls, slot)
                atomic_write_bytes(staging / rel, data)
                rows.append({"class": cls, "class_name": info.class_names[cls], "slot": slot, "path": rel,
                             "sha256": sha256_bytes(data), "source_index": plan.init_index[cls][slot],
                             "beta": getattr(beta, "beta", None), "method": cfg.method, "seed": cfg.seed,
                             "batch": batch, "worker": rank, **{f"loss_{k}": v for k, v in result.parts.items()}})
            atomic_write_json(staging / RECORDS / f"{batch:08d}.json",
                              {"batch": batch, "slot": slot, "worker": rank, "chunk": j, "rows": rows,
                               "parts": result.parts, "seconds": time.perf_counter() - started})
            # append-only: a batch redone after a restart shows up here twice (its record above is replaced)
            with open(staging / RECORDS / f"{EXECUTIONS}-{rank:04d}.jsonl", "a") as f:
                f.write(json.dumps({"batch": batch, "round": r, "worker": rank}) + "\n")
        finished = plan.batches_done(r)
        if (cfg.fail_at_batch is not None and rank == world - 1 and finished >= cfg.fail_at_batch
                and not (staging / FAULT_MARKER).exists()):
            atomic_write_json(staging / FAULT_MARKER, {"round": r, "finished_batches": finished})
            raise RuntimeError(f"injected failure after {finished} finished batches (recover.fail_at_batch)")
        metrics = {"round": r, "slot": slot, "finished_batches": finished,
                   **({f"loss_{k}": v for k, v in result.parts.items()} if result is not None else {})}
        if rank == 0:
            # a log record, not print(): Ray Train V2 patches print() in its workers to write the line to
            # stdout *and* to the root logger's console handler, so every printed line reached the driver twice
            parts = "  ".join(f"{k} {v:.4g}" for k, v in (result.parts.items() if result else []))
            log.info(f"[recover {cfg.method}] round {r + 1}/{plan.rounds} (slot {slot + 1}/{plan.ipc}, chunk {j + 1}) "
                     f"{time.perf_counter() - started:.1f}s  {parts}")
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                (Path(d) / "progress.json").write_text(json.dumps({"rounds_done": r + 1}))
                if emu is not None:
                    torch.save(emu.state_dict(), Path(d) / "emu.pt")
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
    if rank == 0 and emu is not None:
        with atomic_file(staging / "emu_state.pt") as tmp:
            torch.save(emu.state_dict(), tmp)


# ----------------------------------------------------------------------------- the driver
def validate_inputs(data_dir, teacher_dir, stats_dir, cfg: RecoverConfig):
    """Every check of a recovery's inputs that can fail, before Ray or any worker starts (the settings were
    checked when ``cfg`` was built): the prepared data (verified), the teacher and its agreement with the
    data, the plan (an IPC the classes hold), and for a spectral method the statistics and the
    factorisation of (Ψ + βI) at every β of the schedule.  Returns (info, labels, plan)."""
    from unidd_ray.data.dataset_info import verify_dataset
    from unidd_ray.data.loading import read_labels
    from unidd_ray.methods import get_method, method_filter
    from unidd_ray.models import bn_layers, resolve_layers
    from unidd_ray.spectral import cholesky_factor
    from unidd_ray.stats_io import load_stats
    from unidd_ray.teacher import check_teacher_data, load_teacher

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
        filt = method_filter(cfg)
        # the resolvent filters' (Ψ + βI) must factorise at the smallest β of the schedule
        betas = {getattr(filt.at_slot(b, cfg.ipc), "beta", None) for b in range(cfg.ipc)} - {None} if filt else set()
        for name in layers if betas else ():
            cholesky_factor(real[name].covariance(cfg.covariance), min(betas))  # raises naming beta and λ_min
    if method.needs_batchnorm and not bn_layers(teacher):
        raise ValueError(f"{cfg.method} matches BatchNorm running statistics, but the teacher in "
                         f"{teacher_dir} ({tinfo.arch}) has no BatchNorm2d layer")
    return info, labels, plan


def run_identity(cfg: RecoverConfig, info, tinfo, stats_dir) -> dict:
    """Everything besides the plan that the recovered images depend on: the recover settings that change them
    (those of the recovery's key: the ones the method reads, less the performance settings), the teacher's
    sha256, the statistics' sha256 (spectral methods) and the dataset (fingerprint and lossy storage)."""
    from unidd_ray.artifacts import read_manifest
    from unidd_ray.methods import get_method
    from unidd_ray.pipeline import dataset_identity, key_settings, recover_settings
    from unidd_ray.stats_io import KIND, STATS_FILE

    stats = None
    if get_method(cfg.method).spectral:
        stats = read_manifest(stats_dir, KIND, verify=False)["files"][STATS_FILE]  # verified by validate_inputs
    return {"recover": key_settings("recover", recover_settings(cfg)), "teacher": tinfo.sha256,
            "statistics": stats, "dataset": dataset_identity(info)}


def check_resumable(staging: Path, plan_json: dict) -> None:
    """Refuse to resume ``staging`` unless its ``plan.json`` records this plan and identity."""
    from unidd_ray.artifacts import differences

    path = staging / "plan.json"
    fix = f"start over without --resume, give another --out, or remove {staging}"
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"cannot resume: {path} is not valid JSON ({exc}); {fix}") from None
    if not previous.get("identity"):
        raise ValueError(f"cannot resume: {path} does not record the settings and inputs it was started with "
                         f"(an earlier unidd_ray wrote it), so its images may belong to another run; {fix}")
    differ = differences(previous["identity"], plan_json["identity"])
    if not differ:  # the same settings and inputs give the same plan, unless the plan's rules changed
        differ = [f"plan.{k}" for k in plan_json if k != "identity" and previous.get(k) != plan_json[k]]
    if differ:
        raise ValueError(f"cannot resume: {staging} was started with other settings or inputs "
                         f"({'; '.join(differ)}); {fix}")


def check_staging(staging: Path) -> None:
    """``<out>.partial`` holds a recovery in progress (its ``plan.json`` is written first; a crash before that
    leaves at most the file's temporary name) or nothing: a folder of that name holding anything else is
    someone else's, and is neither resumed nor removed."""
    from unidd_ray.artifacts import OutputError

    if not staging.exists() and not staging.is_symlink():
        return
    if not staging.is_dir():
        raise OutputError(f"{staging} exists and is not a directory, but recover keeps its work in progress there; "
                          "move it, or give --out another name")
    if not (staging / "plan.json").is_file() and not all(p.name.startswith(".plan.json.") for p in staging.iterdir()):
        raise OutputError(f"{staging} holds files unidd-ray did not write, but recover keeps its work in progress "
                          f"there; move them out, or give --out another name")


@holds_output_lock()
def run_recover(data_dir, teacher_dir, stats_dir, out_dir, cfg: RecoverConfig, *, storage_path, resume=False,
                num_workers: int = 1, recipe_yaml: str | None = None, progress: bool = True,
                checked: tuple | None = None) -> Path:
    """Recover the distilled set into ``out_dir`` (written as a whole only when complete).

    ``checked``: what :func:`validate_inputs` returned for these same inputs, when the caller has
    already checked them (the pipeline checks every recovery before starting any); else they are
    checked here.  A worker fault is retried from the last finished round up to ``recover.max_failures``
    times; a worker that refuses its input ends the run at once, and a run started afresh then leaves no
    staging directory or checkpoints behind.
    """
    from unidd_ray.artifacts import atomic_write_json, check_output
    from unidd_ray.methods import get_method
    from unidd_ray.ray_utils import WorkerInputError, fit, require_resources, trainer_factory
    from unidd_ray.teacher import read_teacher_info

    out_dir = Path(out_dir).resolve()
    staging = out_dir.parent / f"{out_dir.name}.partial"
    check_output(out_dir, "distilled")
    check_staging(staging)
    info, _, plan = checked if checked is not None else validate_inputs(data_dir, teacher_dir, stats_dir, cfg)
    # the statistics go to the workers of a spectral method only (the others read none)
    stats_dir = Path(stats_dir).resolve() if stats_dir is not None and get_method(cfg.method).spectral else None
    storage_path = Path(storage_path).resolve()
    run_dir = storage_path / RUN_NAME
    require_resources("recover", workers=cfg.workers, cpus=cfg.cpus_per_worker, gpus=1 if cfg.use_gpu else 0)
    plan = replace(plan, identity=run_identity(cfg, info, read_teacher_info(teacher_dir), stats_dir))
    plan_json = asdict(plan)
    # plan.json is written right after the staging directory is made: without it no batch has started
    fresh = not (resume and (staging / "plan.json").is_file())
    if not fresh:
        check_resumable(staging, plan_json)
    else:
        if resume:
            log.info(f"recover: nothing to resume in {staging}; starting from the first round")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        staging.mkdir(parents=True)
        atomic_write_json(staging / "plan.json", plan_json)
    started = time.perf_counter()
    trainer = trainer_factory(
        _recover_loop, {"recover": to_dict(cfg), "data_dir": str(Path(data_dir).resolve()),
                        "teacher_dir": str(Path(teacher_dir).resolve()), "stats_dir": str(stats_dir) if stats_dir else None,
                        "staging": str(staging), "plan": plan_json, "num_workers": num_workers,
                        "threads": max(1, math.floor(cfg.cpus_per_worker))},
        name=RUN_NAME, storage_path=storage_path, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker,
        use_gpu=cfg.use_gpu)
    try:
        fit(trainer, what=f"recover {cfg.method}", max_failures=cfg.max_failures)
    except WorkerInputError:
        if fresh:  # nothing worth resuming: leave nothing behind
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                storage_path.rmdir()  # when nothing else is kept there
        raise
    return finalize(staging, out_dir, plan, info, cfg, seconds=time.perf_counter() - started,
                    recipe_yaml=recipe_yaml)


def finalize(staging: Path, out_dir: Path, plan: RecoverPlan, info, cfg: RecoverConfig, *, seconds: float,
             recipe_yaml: str | None = None) -> Path:
    """Check that every (class, slot) image exists exactly once, write the manifest and move into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from unidd_ray.artifacts import atomic_write_json, atomic_write_text, sha256_file, write_manifest

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
    keys = [(r["class"], r["slot"]) for r in rows]
    expected = {(k, b) for k in plan.classes for b in range(plan.ipc)}
    if len(keys) != len(set(keys)) or set(keys) != expected:
        missing = sorted(expected - set(keys))[:5]
        raise RuntimeError(f"recovery is incomplete or inconsistent: missing {missing}, "
                           f"{len(keys) - len(set(keys))} duplicates")
    for r in rows:
        if sha256_file(staging / r["path"]) != r["sha256"]:
            raise RuntimeError(f"{staging / r['path']} does not match its recorded checksum")
    rows.sort(key=lambda r: (r["class"], r["slot"]))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, staging / "manifest.parquet")
    per_slot = {}
    for r in rows:
        per_slot.setdefault(r["slot"], []).append(r)
    loss_keys = sorted(k for k in rows[0] if k.startswith("loss_"))
    summary = {
        "method": cfg.method, "ipc": plan.ipc, "num_classes": plan.num_classes, "images": len(rows),
        "workers": plan.workers, "batches": plan.batches(), "rounds": plan.rounds, "seconds": seconds,
        "dataset": info.name, "dataset_fingerprint": info.fingerprint,
        "per_slot": {int(b): {"beta": v[0]["beta"], **{k: float(np.mean([x[k] for x in v])) for k in loss_keys}}
                     for b, v in sorted(per_slot.items())},
        "config": to_dict(cfg),
    }
    summary["batches_executed"] = sum(b["executions"] for b in batches)
    summary["batches_redone"] = sorted(b["batch"] for b in batches if b["executions"] > 1)
    atomic_write_json(staging / BATCHES, batches)
    atomic_write_json(staging / "summary.json", summary)
    # the resolved configuration: the whole recipe from the CLI, else the recovery section
    atomic_write_text(staging / "config.yaml",
                      recipe_yaml if recipe_yaml is not None else yaml.safe_dump({"recover": to_dict(cfg)},
                                                                                 sort_keys=False))
    if cfg.save_beton:
        write_distilled_beton(staging, rows, channels=info.channels)
    (staging / FAULT_MARKER).unlink(missing_ok=True)
    # The per-batch records stay in the staging directory until it has replaced ``out_dir``: every step up to
    # that rename can be redone from them, so a crash anywhere in here leaves a run that ``--resume`` finishes
    # (the manifest lists the output files only; dot-names such as RECORDS are not part of it).
    write_manifest(staging, "distilled", method=cfg.method, ipc=plan.ipc,
                   dataset_fingerprint=info.fingerprint)
    replace_directory(staging, out_dir, "distilled")
    shutil.rmtree(out_dir / RECORDS, ignore_errors=True)
    return out_dir


BETON = "distilled.beton"


def write_distilled_beton(directory: Path, rows: list[dict], *, channels: int) -> Path:
    """``distilled.beton`` (FFCV; raw uint8 ``image``, ``label``, ``index`` = manifest row) from the PNGs."""
    from ffcv.fields import NDArrayField
    from PIL import Image

    from unidd_ray.artifacts import atomic_file
    from unidd_ray.data.prepare import _progress_bars, _write_beton

    arrays = []
    for r in rows:
        with Image.open(directory / r["path"]) as im:
            a = np.asarray(im)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    side = arrays[0].shape[0]
    field = NDArrayField(dtype=np.dtype("uint8"), shape=(side, arrays[0].shape[1], channels))
    samples = [(a, int(r["class"]), i) for i, (a, r) in enumerate(zip(arrays, rows))]
    with atomic_file(directory / BETON, suffix=".beton") as tmp, _progress_bars(False):
        _write_beton(tmp, samples, field, workers=1)
    return directory / BETON
