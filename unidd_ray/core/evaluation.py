"""Relabel-and-train evaluation of a distilled set (SPEC §1.3), in pure torch (no Ray).

A fresh student learns from the distilled images with the teacher's soft labels:
loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, RandomResizedCrop + flip +
CutMix, AdamW and a per-step cosine schedule; or, in hard-label mode, the
cross-entropy of the CutMix-mixed one-hot labels.

The augmentation stream is keyed by *(stream seed, epoch, image id)*, never by
the training seed or the batch: every image's crop, flip, CutMix partner and
box for an epoch are drawn for the whole set at once.  The teacher's output on
an augmented image is therefore a function of (image id, epoch) alone, which is
what makes stored soft labels (:mod:`unidd_ray.artifacts.soft_labels`) reusable at any
batch size or training seed.

That is ``evaluate.protocol: ours``.  ``paper`` trains as the UniDD authors' ``generate_soft_label_online.py``
does: lr factor ``0.5·(1 + cos(π·e/(2E)))`` stepped per epoch, KL without T², and one CutMix λ, box and
in-batch partner permutation per batch (:func:`paper_batch_mix`, seeded by (aug_seed, epoch, batch index));
crops and flips stay per image.  Its mixing depends on the batch, so it takes online labels only.  Its students
also record the best of the late tests (:func:`paper_checks`), chosen on the test set as the paper reports.

:func:`evaluate_in_process` trains one student per seed and tests it on the real val split;
the evaluate stage runs it on Ray Train workers, Ray Tune trials in their own process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unidd_ray.artifacts.dataset import read_labels
from unidd_ray.config import EvaluateConfig
from unidd_ray.data.augment import crop_resize, sample_crops
from unidd_ray.data.loading import make_loader
from unidd_ray.models import build_model, memory_format


@dataclass
class EpochAugment:
    """Augmentation parameters of every image for one epoch (rows indexed by image id)."""

    crop: Tensor  # (N, 4) top, left, height, width as fractions of the side
    flip: Tensor  # (N,) bool
    partner: Tensor  # (N,) CutMix partner image id
    box: Tensor  # (N, 4) CutMix box top, left, height, width as fractions; zero size = no mixing

    def rows(self, ids: Tensor) -> "EpochAugment":
        return EpochAugment(self.crop[ids], self.flip[ids], self.partner[ids], self.box[ids])


def epoch_augment(n: int, epoch: int, settings: EvaluateConfig) -> EpochAugment:
    """Draw the epoch's parameters for all ``n`` images from a generator seeded by (aug_seed, epoch)."""
    g = torch.Generator().manual_seed(hash_seed(settings.aug_seed, epoch))
    crop = sample_crops(n, settings.crop_scale, generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    partner = torch.randperm(n, generator=g)
    if settings.cutmix > 0:
        u = torch.rand(n, generator=g, dtype=torch.float64)
        lam = _beta_icdf(u, settings.cutmix)  # inverse-CDF sampling keeps the draw on the seeded generator
        cut = torch.sqrt(1 - lam)
        cy, cx = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
        y0, y1 = (cy - cut / 2).clamp(0, 1), (cy + cut / 2).clamp(0, 1)
        x0, x1 = (cx - cut / 2).clamp(0, 1), (cx + cut / 2).clamp(0, 1)
        box = torch.stack([y0, x0, y1 - y0, x1 - x0], 1)
    else:
        box = torch.zeros(n, 4, dtype=torch.float64)
    return EpochAugment(crop, flip, partner, box)


def _beta_icdf(u: Tensor, a: float) -> Tensor:
    """Quantile of the symmetric Beta(a, a) by interpolating its tabulated CDF (Beta(1, 1) is uniform)."""
    if a == 1.0:
        return u
    x = torch.linspace(0, 1, 2049, dtype=torch.float64)[1:-1]
    pdf = (x * (1 - x)) ** (a - 1)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(pdf, 0)])
    cdf = cdf / cdf[-1]
    grid = torch.linspace(0, 1, len(cdf), dtype=torch.float64)
    idx = torch.searchsorted(cdf, u).clamp(1, len(cdf) - 1)
    c0, c1 = cdf[idx - 1], cdf[idx]
    t = ((u - c0) / (c1 - c0).clamp(min=1e-300)).clamp(0, 1)
    return grid[idx - 1] + t * (grid[idx] - grid[idx - 1])


def hash_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def augment_batch(images_all: Tensor, ids: Tensor, aug: EpochAugment) -> tuple[Tensor, Tensor, Tensor]:
    """The augmented images of ``ids`` (a function of image id and epoch only), their CutMix partners
    and the kept-area fractions λ."""
    size = images_all.shape[-1]
    rows = aug.rows(ids.cpu())
    own = crop_resize(images_all[ids], rows.crop, rows.flip, size)
    partner_ids = rows.partner.to(images_all.device)
    partner_rows = aug.rows(rows.partner)
    other = crop_resize(images_all[partner_ids], partner_rows.crop, partner_rows.flip, size)
    y0 = (rows.box[:, 0] * size).round().long()
    x0 = (rows.box[:, 1] * size).round().long()
    y1 = ((rows.box[:, 0] + rows.box[:, 2]) * size).round().long()
    x1 = ((rows.box[:, 1] + rows.box[:, 3]) * size).round().long()
    grid = torch.arange(size)
    inside_y = (grid[None, :] >= y0[:, None]) & (grid[None, :] < y1[:, None])
    inside_x = (grid[None, :] >= x0[:, None]) & (grid[None, :] < x1[:, None])
    mask = (inside_y[:, :, None] & inside_x[:, None, :]).to(images_all.device)[:, None]
    mixed = torch.where(mask, other, own)
    lam = 1 - mask.flatten(1).float().mean(1)
    return mixed, partner_ids, lam


class SoftLabelSource(Protocol):
    def __call__(self, epoch: int, ids: Tensor, mixed: Tensor) -> Tensor: ...


class TeacherLabels:
    """Online soft labels: the teacher's logits on the augmented images.

    The teacher sees each batch in image-id order, so the logits of (epoch, image id) do not
    depend on the training seed's batch order.  With ``memo_bytes`` > 0 the logits of each
    (epoch, set of ids) are kept up to that many bytes and handed to later students of the same
    set and augmentation stream (one worker training several seeds of a set computes them once).
    """

    def __init__(self, teacher: nn.Module, *, memo_bytes: int = 0):
        self.teacher = teacher.eval()
        self.memo_bytes = memo_bytes
        self.memo: dict[tuple[int, bytes], Tensor] = {}
        self.memo_used = 0
        self.hits = 0

    @torch.no_grad()
    def __call__(self, epoch: int, ids: Tensor, mixed: Tensor) -> Tensor:
        order = torch.argsort(ids.cpu())
        key = (epoch, ids.cpu()[order].numpy().tobytes())
        logits = self.memo.get(key)
        if logits is None:
            logits = self.teacher(mixed[order.to(mixed.device)])
            size = logits.numel() * logits.element_size()
            if self.memo_used + size <= self.memo_bytes:
                self.memo[key] = logits
                self.memo_used += size
        else:
            self.hits += 1
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return logits[inverse.to(logits.device)]


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """``evaluate.amp``: bfloat16 autocast on the device's type (CPU or CUDA alike) for ``bf16``; a disabled one
    (float32) for ``none``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


# ----------------------------------------------------------------------------- evaluate.protocol "paper"
# The UniDD authors' student training (generate_soft_label_online.py; docs/CONFIGURATION.md, evaluate.protocol).
PAPER = "paper"
SELECTED_NOTE = "test-selected, as the paper reports"


def paper_lr_factor(epoch: int, epochs: int) -> float:
    """The authors' ``LambdaLR`` factor, stepped once per epoch: ``0.5·(1 + cos(π·epoch / (2·epochs)))``, a quarter
    cosine from 1 at epoch 0 to 0.5 at ``epochs`` (0 beyond, as their lambda says)."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs / 2)) if epoch <= epochs else 0.0


def distill_loss(logits: Tensor, target: Tensor, temperature: float, protocol: str = "ours") -> Tensor:
    """``KL(softmax(target/T) ‖ softmax(logits/T))`` over the batch (``batchmean``): times T² for ``ours``, as it
    is for ``paper`` (the authors' ``KLDivLoss(batchmean)`` without the T² factor)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(target / t, 1), reduction="batchmean",
                  log_target=True)
    return kl if protocol == PAPER else kl * t * t


def paper_checks(epochs: int) -> list[int]:
    """The epochs (counted from 1: after that many epochs) at which the ``paper`` protocol tests the student: the
    authors test after 0-based epoch ``e`` when ``e % 10 == 9`` and ``e > 0.8·epochs``, i.e. every 10 epochs in the
    last 20 % of training; the final epoch is always one (theirs too when it passes that bar)."""
    checks = [e + 1 for e in range(epochs) if e % 10 == 9 and e > 0.8 * epochs]
    return checks if checks and checks[-1] == epochs else checks + [epochs]


def select_best(accuracies: dict[int, float], epochs: int) -> tuple[float, int]:
    """(best top-1, its epoch) among the ``paper_checks(epochs)`` epochs of ``accuracies`` (epoch → top-1), the
    earliest on a tie (the authors keep a best only when a later test beats it)."""
    best, at = -math.inf, -1
    for epoch in paper_checks(epochs):
        if accuracies[epoch] > best:
            best, at = accuracies[epoch], epoch
    return best, at


def paper_batch_mix(aug: EpochAugment, batch_ids: Tensor, *, epoch: int, batch_index: int, size: int,
                    settings: EvaluateConfig) -> None:
    """Give the images of one batch (``batch_ids``: all of its ids, before any sharding) the authors' CutMix, in
    place in ``aug``: one λ ~ Beta(cutmix, cutmix), one box (their ``rand_bbox``, in pixels of the ``size``-pixel
    side) and a random permutation of the batch as partners, drawn from a generator seeded by (aug_seed, epoch,
    batch index).  The permutation runs over the batch's ids in sorted order, so the mixing is the same whatever
    order the training seed gave them.  Every image of the epoch is in one batch, so each row is set once."""
    ids = torch.sort(batch_ids.cpu()).values
    g = torch.Generator().manual_seed(hash_seed(settings.aug_seed, epoch, batch_index))
    perm = torch.randperm(len(ids), generator=g)
    aug.partner[ids] = ids[perm]
    if settings.cutmix <= 0:
        aug.box[ids] = 0
        return
    lam = float(_beta_icdf(torch.rand(1, generator=g, dtype=torch.float64), settings.cutmix)[0])
    cut = int(size * math.sqrt(1.0 - lam))
    cy, cx = (int(v) for v in torch.randint(size, (2,), generator=g))
    y0, y1 = min(max(cy - cut // 2, 0), size), min(max(cy + cut // 2, 0), size)
    x0, x1 = min(max(cx - cut // 2, 0), size), min(max(cx + cut // 2, 0), size)
    aug.box[ids] = torch.tensor([y0 / size, x0 / size, (y1 - y0) / size, (x1 - x0) / size], dtype=aug.box.dtype)


def train_student(student: nn.Module, images: Tensor, labels: Tensor, settings: EvaluateConfig, *, seed: int,
                  soft_labels: SoftLabelSource | None, num_classes: int, device: str | torch.device = "cpu",
                  on_epoch: Callable[[int, nn.Module], None] | None = None, shard: tuple[int, int] = (0, 1),
                  wrap_model: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """Train ``student`` on the distilled ``images`` (normalised) and return it (in eval mode).

    With ``shard=(rank, world)`` this process takes every ``world``-th image of each batch and
    ``wrap_model`` (e.g. DDP) averages the gradients over the processes.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    layout = memory_format(settings.channels_last)
    student.to(device, memory_format=layout).train()
    model = wrap_model(student) if wrap_model is not None else student
    images, labels = images.to(device), labels.to(device)
    n = len(images)
    batch = n if settings.batch_size is None else settings.batch_size
    steps_per_epoch = math.ceil(n / batch)
    total = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    order_gen = torch.Generator().manual_seed(hash_seed(seed, 1))
    stored = soft_labels if hasattr(soft_labels, "verify_epoch") else None  # labels read from a relabel artifact
    if stored is not None and not settings.hard_labels:
        stored.check_stream(settings, n)
    t = settings.temperature
    paper = settings.protocol == PAPER
    if paper and getattr(soft_labels, "memo_bytes", 0) and batch < n:
        raise ValueError("evaluate.protocol 'paper' mixes by batch position: teacher logits cannot be kept across "
                         "students (TeacherLabels memo_bytes) unless each batch is the whole set")
    step = 0
    for epoch in range(settings.epochs):
        aug = epoch_augment(n, epoch, settings)
        if stored is not None and not settings.hard_labels:
            stored.verify_epoch(epoch, aug)
        order = torch.randperm(n, generator=order_gen)
        for start in range(0, n, batch):
            if paper:  # one box, λ and in-batch partner permutation per batch (all of its ids, every shard alike)
                paper_batch_mix(aug, order[start:start + batch], epoch=epoch, batch_index=start // batch,
                                size=images.shape[-1], settings=settings)
            ids = order[start:start + batch][shard[0]::shard[1]]
            mixed, partner, lam = augment_batch(images, ids.to(device), aug)
            mixed = mixed.contiguous(memory_format=layout)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * (paper_lr_factor(epoch, settings.epochs) if paper else _cosine(step, total))
            with autocast(device, settings.amp):
                logits = model(mixed)
                target = None if settings.hard_labels or soft_labels is None else soft_labels(epoch, ids, mixed)
            logits = logits.float()  # the loss in float32, whatever the forward ran in
            if target is None:
                own = F.cross_entropy(logits, labels[ids.to(device)], reduction="none")
                other = F.cross_entropy(logits, labels[partner], reduction="none")
                loss = (lam * own + (1 - lam) * other).mean()
            else:
                loss = distill_loss(logits, target.to(device).float(), t, settings.protocol)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, student)
    return student.eval()


# ----------------------------------------------------------------------------- testing students
def check_batches(cfg: EvaluateConfig, *, images: int) -> None:
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


def check_student(cfg: EvaluateConfig, *, num_classes: int, in_channels: int, resolution: int) -> None:
    """Build the student once for the teacher's classes, channels and side: an option value the student
    refuses is named here instead of inside every worker."""
    try:
        build_model(cfg.student, num_classes=num_classes, in_channels=in_channels, resolution=resolution,
                    **cfg.student_options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"evaluate.student {cfg.student!r} with evaluate.student_options {cfg.student_options}: "
                         f"{exc}") from None


def top1_on_split(model: nn.Module, data_dir: str, *, batch_size: int, num_workers: int, device, indices=None,
                  resolution: int | None = None, split: str = "val", normalize=True) -> tuple[int, int]:
    """(correct, total) of ``model`` on ``split`` of the prepared data (or the rows ``indices`` of it), its images
    normalised with ``normalize`` (the teacher's ``(mean, std)``; see :func:`~unidd_ray.data.loading.make_loader`)."""
    loader = make_loader(data_dir, split, batch_size=batch_size, num_workers=num_workers, indices=indices,
                         train=False, device=str(device), resolution=resolution, normalize=normalize)
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels, _ in loader:
            pred = model(images.to(device)).argmax(1)
            correct += int((pred == labels.to(device)).sum())
            total += len(labels)
    model.train(was_training)
    return correct, total


def evaluate_in_process(images, labels, teacher, data_dir: str, cfg: EvaluateConfig, **kwargs) -> list[float]:
    """The final top-1 (%) of one student per seed: :func:`evaluate_students` (which see) without the rest of
    each student's record."""
    return [r["top1"] for r in evaluate_students(images, labels, teacher, data_dir, cfg, **kwargs)]


def evaluate_students(images, labels, teacher, data_dir: str, cfg: EvaluateConfig, *, num_classes: int,
                      in_channels: int, resolution: int, seeds: list[int], device="cpu", num_workers: int = 1,
                      soft_labels=None, report=None, shard: tuple[int, int] = (0, 1), wrap=None,
                      val_classes: list[int] | None = None, epoch_done=None, normalize=True) -> list[dict]:
    """One record per seed: ``seed``, ``protocol`` and ``top1``, the final top-1 (%); with ``cfg.protocol`` "paper"
    also ``checks`` (top-1 after each epoch of :func:`paper_checks`, the final one included), ``top1_selected``
    and ``selected_epoch``, the best of them (:func:`select_best`: chosen on the test set, as the paper reports).

    Each student is tested on val images normalised with ``normalize`` (the teacher's
    ``(mean, std)``, which ``images`` are normalised with too; see :func:`~unidd_ray.data.loading.make_loader`).
    ``report(seed, epoch, top1)`` receives intermediate accuracies when ``cfg.eval_every`` > 0 (Ray Tune uses
    it for early stopping); ``epoch_done(seed, epoch)`` is called after every epoch (progress).  ``val_classes`` restricts the validation images to those classes (for sets
    distilled from a class subset).  With ``shard=(rank, world)`` this process trains on its share of every
    batch and tests its share of the val split; ``wrap`` (``sum(tensor)`` and ``wrap_model(model)``, e.g. DDP)
    combines the processes."""
    source = None if cfg.hard_labels else (soft_labels or TeacherLabels(teacher))
    val_labels = read_labels(data_dir, "val")
    val_indices = np.arange(len(val_labels))
    if val_classes is not None:
        val_indices = val_indices[np.isin(val_labels, val_classes)]
    val_indices = val_indices[shard[0]::shard[1]]

    def top1(model) -> float:
        correct, total = top1_on_split(model, data_dir, batch_size=cfg.eval_batch_size, num_workers=num_workers,
                                       device=device, indices=val_indices, resolution=resolution,
                                       normalize=normalize)
        counts = torch.tensor([correct, total], dtype=torch.float64)
        if wrap is not None:
            counts = wrap.sum(counts)
        return float(100 * counts[0] / counts[1])

    paper = cfg.protocol == PAPER
    windows = set(paper_checks(cfg.epochs)) if paper else set()
    results = []
    for seed in seeds:
        torch.manual_seed(seed)
        student = build_model(cfg.student, num_classes=num_classes, in_channels=in_channels,
                              resolution=resolution, **cfg.student_options)
        checks: dict[int, float] = {}

        def on_epoch(epoch, model, _seed=seed, _checks=checks):
            if epoch_done is not None:
                epoch_done(_seed, epoch)
            if epoch + 1 >= cfg.epochs:
                return  # the final epoch is tested below
            every = bool(cfg.eval_every) and (epoch + 1) % cfg.eval_every == 0
            if every or epoch + 1 in windows:
                acc = top1(model)
                if epoch + 1 in windows:
                    _checks[epoch + 1] = acc
                if every and report is not None:
                    report(_seed, epoch, acc)

        trained = train_student(student, images, labels, cfg, seed=seed, soft_labels=source,
                                num_classes=num_classes, device=device, on_epoch=on_epoch, shard=shard,
                                wrap_model=wrap.wrap_model if wrap is not None else None)
        acc = top1(trained)
        if report is not None:
            report(seed, cfg.epochs - 1, acc)
        record = {"seed": seed, "protocol": cfg.protocol, "top1": acc}
        if paper:
            checks[cfg.epochs] = acc
            best, at = select_best(checks, cfg.epochs)
            record.update(checks={str(e): a for e, a in sorted(checks.items())}, top1_selected=best,
                          selected_epoch=at)
        results.append(record)
    return results
