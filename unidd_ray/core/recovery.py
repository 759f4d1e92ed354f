"""Recovery of synthetic images on a frozen teacher (SPEC §1.2), in pure torch.

:class:`Distiller` optimises one batch of synthetic images: Adam on the pixels,
cosine learning-rate decay to zero, one random augmentation per iteration for
the whole batch, clamping to the valid pixel range after every step, and the
loss ``CE + α Σ_l (L_filter + L_signal)`` of the chosen UniDD filter (or the
SRe2L BatchNorm loss, or CE alone).  The EMU state and an optional cross-worker
reducer are passed in, so the Ray Train program composes this class without
the class knowing about Ray.

:func:`run_round` is one round of a recovery plan (:mod:`unidd_ray.core.plan`) on one worker: its piece of the
round optimised (its share of one global batch, moments all-reduced with a :class:`TorchDistReducer` at every
iteration; or its own batch), then folded into the EMU;
:func:`recover_in_process` runs every round of a one-worker plan in this process (Ray Tune trials, notebooks).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from unidd_ray.artifacts.dataset import read_dataset_info
from unidd_ray.artifacts.statistics import load_stats
from unidd_ray.artifacts.teacher import load_teacher
from unidd_ray.config import RecoverConfig
from unidd_ray.core.plan import RecoverPlan
from unidd_ray.data.loading import load_real_images
from unidd_ray.methods import get_method, method_filter
from unidd_ray.models import bn_layers, layer_channels, memory_format, resolve_layers, tapped
from unidd_ray.spectral import EMU, RealSideCache, batch_statistics, unidd_layer_loss
from unidd_ray.spectral.moments import BatchStatistics, Moments


# ----------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class AugmentParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool
    shift_y: int
    shift_x: int


def default_max_roll(resolution: int) -> int:
    """Up to 4 px at 32 px, scaled with the resolution (28 px → 4, 224 px → 28)."""
    return max(1, round(4 * resolution / 32))


def sample_augment(generator: torch.Generator, resolution: int, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                   flip: bool = True, max_roll: int = 4, nonnegative_roll: bool = False) -> AugmentParams:
    """One RandomResizedCrop box, flip and roll for a whole batch, drawn from ``generator``; the roll's shifts
    lie in -max_roll..max_roll, or in 0..max_roll with ``nonnegative_roll`` (the authors' ``randint(0, jitter)``)."""
    area = resolution * resolution
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= resolution and 0 < h <= resolution:
            top = int(u[2] * (resolution - h + 1))
            left = int(u[3] * (resolution - w + 1))
            break
    else:
        top, left, h, w = 0, 0, resolution, resolution
    rest = torch.rand(1, generator=generator).item()
    low = 0 if nonnegative_roll else -max_roll
    shifts = torch.randint(low, max_roll + 1, (2,), generator=generator).tolist() if max_roll > 0 else [0, 0]
    return AugmentParams(top, left, h, w, flip and rest < 0.5, shifts[0], shifts[1])


def apply_augment(x: Tensor, p: AugmentParams) -> Tensor:
    size = x.shape[-2:]
    out = x[..., p.top:p.top + p.height, p.left:p.left + p.width]
    if out.shape[-2:] != size:
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    if p.flip:
        out = torch.flip(out, dims=(-1,))
    if p.shift_y or p.shift_x:
        out = torch.roll(out, shifts=(p.shift_y, p.shift_x), dims=(-2, -1))
    return out


# ----------------------------------------------------------------------------- the distiller
@dataclass
class BatchResult:
    images: Tensor  # optimised images in normalised space (detached)
    parts: dict[str, float]  # final loss parts
    stats: dict[str, BatchStatistics] = field(default_factory=dict)  # last iteration's batch statistics


class Reducer:
    """Sums tensors over the workers of a recovery group; the identity for one process."""

    def sum(self, t: Tensor) -> Tensor:  # pragma: no cover - trivial
        return t

    def sum_differentiable(self, t: Tensor) -> Tensor:
        """Forward: sum over workers; backward: the gradient of this worker's copy (identity).

        Every worker evaluates the same loss of the summed statistics, so each one
        back-propagates only into its own contribution.
        """
        return t


class Distiller:
    """The frozen teacher, its taps, the real targets and the method: optimises synthetic batches."""

    def __init__(self, teacher: nn.Module, real: dict[str, Moments] | None, settings: RecoverConfig, *,
                 num_classes: int, resolution: int, pixel_min: Tensor, pixel_max: Tensor,
                 layers: list[str] | None = None, device: str | torch.device = "cpu", normalize=True):
        """``normalize``: how the images are normalised, as :func:`~unidd_ray.data.loading.make_loader`'s
        argument: the teacher's ``(mean, std)`` (:func:`build_distiller`) or True (``dataset.json``'s); the real
        images a batch starts from are read with it, ``pixel_min``/``pixel_max`` are [0, 1] under it."""
        method = get_method(settings.method)  # (its settings were checked when ``settings`` was built)
        self.device = torch.device(device)
        self.layout = memory_format(settings.channels_last)
        self.teacher = teacher.to(self.device, memory_format=self.layout).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.s = settings
        self.num_classes = num_classes
        self.resolution = resolution
        self.pixel_min = pixel_min.to(self.device).view(1, -1, 1, 1)
        self.pixel_max = pixel_max.to(self.device).view(1, -1, 1, 1)
        self.normalize = normalize
        self.max_roll = settings.max_roll if settings.max_roll is not None else default_max_roll(resolution)
        self.filter = method_filter(settings)
        # amp: bf16 runs the teacher's forward (and so its backward) under autocast; the taps' inputs are cast
        # back to the dtype of the filter's values (float64 unless precision: float32) before the moments, the
        # BatchNorm inputs of SRe2L to float32, and the CE is taken from float32 logits
        self.amp = settings.amp == "bf16"
        self.tap_dtype = self.filter.compute_dtype if self.filter is not None else torch.float32
        self.layers: list[str] = []
        self.real_cov: dict[str, Tensor] = {}
        self.real_signal: dict[str, Tensor] = {}
        if self.filter is not None:
            if real is None:
                raise ValueError(f"method {settings.method!r} needs the real statistics (run `unidd-ray stats`)")
            self.layers = resolve_layers(self.teacher, layers)
            missing = [name for name in self.layers if name not in real]
            if missing:
                raise ValueError(f"the statistics have no moments for the teacher's layers {missing}; they were "
                                 "computed with another teacher or other layers")
            channels = layer_channels(self.teacher, self.layers)
            for name in self.layers:
                m = real[name]
                if m.channels != channels[name] or m.num_classes != num_classes:
                    raise ValueError(f"layer {name}: statistics have {m.channels} channels/{m.num_classes} classes, "
                                     f"the teacher has {channels[name]}/{num_classes}")
                self.real_cov[name] = m.covariance(settings.covariance).to(self.device)
                self.real_signal[name] = m.signal(settings.signal).to(self.device)
        # one slot uses one filter per layer: older slots' real sides are never read again
        self.cache = RealSideCache(maxsize=max(1, len(self.layers)))
        self.bn_layers = bn_layers(self.teacher) if method.needs_batchnorm else []
        if method.needs_batchnorm and not self.bn_layers:
            raise ValueError(f"{method.name} matches BatchNorm running statistics, but the teacher has no BatchNorm2d "
                             "layer")

    def emu_layers(self) -> dict[str, tuple[int, int]]:
        columns = self.num_classes if self.s.signal != "mean" else 1
        return {name: (self.real_cov[name].shape[0], columns) for name in self.layers}

    def slot_filter(self, slot: int, ipc: int):
        return None if self.filter is None else self.filter.at_slot(slot, ipc)

    def matching_weight(self, emu: EMU | None) -> float:
        """The weight of the matching terms for the batch about to be optimised.

        The EMU mix gives the t-th batch's statistics the weight 1/t, so with a constant α the
        matching gradient on the current images shrinks like 1/t while the cross-entropy's does not;
        ``alpha_scale: emu`` multiplies α by t to keep every batch's balance that of the first.
        """
        if self.s.alpha_scale == "emu" and emu is not None:
            return self.s.alpha * emu.batch_number()
        return self.s.alpha

    def clamp_(self, x: Tensor) -> None:
        with torch.no_grad():
            torch.maximum(torch.minimum(x, self.pixel_max, out=x), self.pixel_min, out=x)

    def optimize(self, init: Tensor, labels: Tensor, *, slot: int, ipc: int, aug_seed: int, emu: EMU | None,
                 reducer: Reducer | None = None, global_count: int | None = None,
                 progress: Callable[[int, dict], None] | None = None) -> BatchResult:
        """Optimise one batch starting from ``init`` (normalised images) with class ``labels``.

        ``reducer`` sums statistics over workers at every iteration (``distribution: exact``),
        making the workers' batches one large batch of ``global_count`` images.
        """
        s = self.s
        reducer = reducer or Reducer()
        x = init.detach().to(self.device).clone(memory_format=self.layout).requires_grad_(True)
        labels = labels.to(self.device)
        count = global_count or len(labels)
        optimizer = torch.optim.Adam([x], lr=s.lr, betas=tuple(s.adam_betas))
        generator = torch.Generator().manual_seed(int(aug_seed))
        filt = self.slot_filter(slot, ipc)
        alpha = self.matching_weight(emu)
        parts: dict[str, float] = {}
        last_stats: dict[str, BatchStatistics] = {}
        for it in range(s.iterations):
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate(it)
            images = x
            if s.augment:
                aug = sample_augment(generator, self.resolution, scale=tuple(s.crop_scale), flip=s.flip,
                                     max_roll=self.max_roll, nonnegative_roll=s.roll == "nonnegative")
                images = apply_augment(x, aug)
            loss, parts, last_stats = self.batch_loss(images, labels, filt=filt, alpha=alpha, emu=emu,
                                                      reducer=reducer, count=count)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.clamp_(x)
            if progress is not None:
                progress(it, parts)
        return BatchResult(x.detach(), parts, {k: _detach_stats(v) for k, v in last_stats.items()})

    def learning_rate(self, it: int) -> float:
        """The pixels' learning rate at iteration ``it``: cosine decay to 0 over the iterations, or constant."""
        if self.s.lr_schedule == "constant":
            return self.s.lr
        return 0.5 * self.s.lr * (1 + math.cos(math.pi * it / self.s.iterations))

    # ------------------------------------------------------------------------- losses
    def batch_loss(self, images: Tensor, labels: Tensor, *, filt, alpha: float, emu: EMU | None,
                   reducer: Reducer | None = None, count: int | None = None, per_layer: dict | None = None):
        """``(loss, parts, stats)`` of one forward pass of the (augmented) ``images``: CE summed over the batch
        and divided by the global ``count``, plus ``alpha`` times the matching terms of ``filt`` (or the
        BatchNorm term of SRe2L).  ``parts`` holds plain floats (the global CE and total); ``stats`` each tap's
        batch statistics; ``per_layer`` (a dict), when given, receives each tap's (filter, signal) losses."""
        s = self.s
        reducer = reducer or Reducer()
        count = count or len(labels)
        captured: dict[str, Tensor] = {}
        stats: dict[str, BatchStatistics] = {}
        with tapped(self.teacher, self.layers + self.bn_layers, lambda name, feats: captured.__setitem__(name, feats)):
            with self.autocast():
                logits = self.teacher(images)
        if self.amp:
            logits = logits.float()
            captured = {name: feats.to(self.tap_dtype if name in self.layers else torch.float32)
                        for name, feats in captured.items()}
        ce = F.cross_entropy(logits, labels, reduction="sum") / count if len(labels) else logits.sum() * 0
        loss = ce
        parts = {"ce": float(reducer.sum(ce.detach().reshape(1)))}
        if filt is not None:
            f_total, s_total, stats = self.matching_terms(captured, labels, self._probs(logits), filt, emu, reducer,
                                                          per_layer=per_layer)
            loss = loss + alpha * (f_total + s_total)
            parts.update(filter=_value(f_total), signal=_value(s_total))
            spectral = alpha * (parts["filter"] + parts["signal"])
        elif self.bn_layers:
            bn = self._bn_loss(captured, reducer)
            loss = loss + s.bn_weight * bn
            parts["bn"] = _value(bn)
            spectral = s.bn_weight * parts["bn"]
        else:
            spectral = 0.0
        # the global total (CE summed over workers + the shared matching term), not this worker's share
        parts["total"] = parts["ce"] + spectral
        return loss, parts, stats

    def autocast(self):
        """The teacher's forward under ``amp``: bfloat16 autocast on this device's type (CPU or CUDA alike), or a
        disabled autocast (float32) with ``amp: none``."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _probs(self, logits: Tensor) -> Tensor | None:
        """The teacher's class probabilities a signal weights by: ``soft`` differentiates through them;
        ``mix_share`` takes them as fixed weights, as the authors do (a detached copy of the teacher)."""
        if self.s.signal == "soft":
            return torch.softmax(logits, 1)
        if self.s.signal == "mix_share":
            return torch.softmax(logits.detach(), 1)
        return None

    def _batch_stats(self, feats: Tensor, labels: Tensor, probs: Tensor | None, reducer: Reducer
                     ) -> BatchStatistics:
        s = self.s
        stats = batch_statistics(feats, labels, signal=s.signal, probs=probs, num_classes=self.num_classes)
        if type(reducer) is Reducer:
            return stats
        # distribution: exact — sum the moments over workers; class columns are scattered to all K first.  They
        # are summed in float64: a worker with a small batch holds float64 moments (see
        # batch_statistics), and every worker must send the same dtype.
        k = self.num_classes if s.signal != "mean" else 1
        f64 = torch.float64
        sig_sum = feats.new_zeros(feats.shape[1], k, dtype=f64).index_copy(1, stats.columns, stats.signal_sum.to(f64))
        sig_w = feats.new_zeros(k, dtype=f64).index_copy(0, stats.columns, stats.signal_weight.to(f64))
        n = reducer.sum_differentiable(stats.n.reshape(1).to(f64)).reshape(())
        total = reducer.sum_differentiable(stats.sum.to(f64))
        sumsq = reducer.sum_differentiable(stats.sumsq.to(f64))
        sig_sum = reducer.sum_differentiable(sig_sum)
        sig_w = reducer.sum_differentiable(sig_w)
        present = torch.nonzero(sig_w.detach() > 0).flatten()
        return BatchStatistics(n=n, sum=total, sumsq=sumsq, signal_sum=sig_sum[:, present],
                               signal_weight=sig_w[present], columns=present)

    def matching_terms(self, captured, labels, probs, filt, emu: EMU | None, reducer: Reducer, *,
                       per_layer: dict | None = None):
        """The filter and signal losses summed over the taps (each batch mixed with the EMU when given) and
        each tap's batch statistics, from the features ``captured`` of one forward pass; ``per_layer`` (a dict),
        when given, receives each tap's (filter, signal) losses."""
        f_total = s_total = 0.0
        stats_out = {}
        for name in self.layers:
            stats = self._batch_stats(captured[name], labels, probs, reducer)
            stats_out[name] = stats
            cov, sig = stats.covariance, stats.signal
            if emu is not None:
                cov, sig = emu.mix(name, cov, sig, stats.columns)
            f_loss, s_loss = unidd_layer_loss(filt, self.real_cov[name], self.real_signal[name], cov, sig,
                                              columns=stats.columns, cache=self.cache)
            f_total = f_total + f_loss
            s_total = s_total + s_loss
            if per_layer is not None:
                per_layer[name] = (f_loss, s_loss)
        return f_total, s_total, stats_out

    def _bn_loss(self, captured, reducer: Reducer):
        modules = dict(self.teacher.named_modules())
        total = 0.0
        for name in self.bn_layers:
            x = captured[name]
            bn = modules[name]
            n = x.new_tensor(float(x.shape[0] * x.shape[2] * x.shape[3]))
            s1 = x.sum((0, 2, 3))
            s2 = (x * x).sum((0, 2, 3))
            if type(reducer) is not Reducer:
                n = reducer.sum_differentiable(n.reshape(1)).reshape(())
                s1, s2 = reducer.sum_differentiable(s1), reducer.sum_differentiable(s2)
            mean = s1 / n
            var = s2 / n - mean * mean
            total = total + torch.linalg.vector_norm(mean - bn.running_mean) + torch.linalg.vector_norm(
                var - bn.running_var)
        return total


def _value(t) -> float:
    """A loss part as a plain float (detached first: no autograd warning)."""
    return float(t.detach()) if isinstance(t, Tensor) else float(t)


def _detach_stats(stats: BatchStatistics) -> BatchStatistics:
    return BatchStatistics(*(t.detach() for t in (stats.n, stats.sum, stats.sumsq, stats.signal_sum,
                                                   stats.signal_weight)), columns=stats.columns)


# ----------------------------------------------------------------------------- the rounds of a recovery
class InitImages:
    """The real initial images of one worker's rounds, read ahead through as few FFCV loaders as a
    memory budget allows.  Starting a loader costs about a second on a CPU and a recovery has
    IPC × chunks rounds, so small sets (Fashion-MNIST: all 100 images of IPC 10) are read at once,
    while ImageNet-sized ones are read a few rounds at a time."""

    def __init__(self, data_dir: str, plan: RecoverPlan, rank: int, *, image_bytes: int, num_workers: int = 1,
                 start_round: int = 0, budget_bytes: int = 256 << 20, resolution: int | None = None,
                 normalize=True):
        self.data_dir, self.num_workers, self.resolution = data_dir, num_workers, resolution
        self.normalize = normalize  # the distiller's (Distiller.normalize): the teacher's (mean, std)
        self.per_load = max(1, budget_bytes // max(1, image_bytes))
        self.rounds = []  # the index lists this worker will ask for, in order (none for an empty piece)
        for r in range(start_round, plan.rounds):
            piece = plan.piece(rank, r)
            if piece:
                self.rounds.append([plan.init_index[k][r // plan.rounds_per_slot] for k in piece])
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
                                                           resolution=self.resolution, normalize=self.normalize)))
        images = torch.stack([self.cache[i] for i in indices])
        for i in indices:
            if self.remaining[i] <= 0:  # no later round asks for it
                self.cache.pop(i, None)
        return images


# ----------------------------------------------------------------------------- the worker
class TorchDistReducer:
    """Sums over the worker group's torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def sum_differentiable(self, t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t)


class _AllReduceSum(torch.autograd.Function):
    """All-reduce in the forward pass; identity in the backward pass (each worker evaluates the same
    loss of the summed statistics and back-propagates into its own contribution only)."""

    @staticmethod
    def forward(ctx, t):
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


def run_round(distiller, plan: RecoverPlan, r: int, *, rank: int, emu, reducer, data_dir: str, num_workers: int,
              device, init_images=None) -> tuple[list[int], object]:
    """Round ``r`` of worker ``rank``: optimise its piece of the round (if any), then fold the round into the EMU.

    Exact distribution over several workers (``plan.global_batches``): the round's pieces are one global batch —
    the moments are summed with ``reducer`` at every iteration, the cross-entropy is normalised by the global
    batch size, every worker draws the same augmentation (seeded by (seed, slot, batch)), a worker with an empty
    piece still takes part (with an empty batch) in every all-reduce, and every worker folds the same global
    statistics into its EMU, which so counts the round once.  Independent: each worker optimises its own batch
    alone and the EMU sums the round's batches with ``reducer`` (None: one process).  ``init_images`` (indices
    → images, e.g. an :class:`InitImages`) supplies the real initial images; by default each round reads its
    own.  Returns (classes, BatchResult or None).
    """
    slot, j = divmod(r, plan.rounds_per_slot)
    piece = plan.piece(rank, r)
    shared = plan.global_batches
    if shared and reducer is None:
        raise ValueError("an exact recovery over several workers needs a reducer: its moments are all-reduced "
                         "at every iteration")
    result = None
    if piece or shared:
        if piece:
            indices = [plan.init_index[k][slot] for k in piece]
            init = (init_images(indices) if init_images is not None
                    else load_real_images(data_dir, indices, num_workers=num_workers,
                                          resolution=distiller.resolution, normalize=distiller.normalize))
        else:
            side = distiller.resolution
            init = torch.zeros(0, len(distiller.pixel_min.flatten()), side, side, device=distiller.device)
        aug_seed = int(np.random.SeedSequence([plan.seed, slot, j]).generate_state(1)[0])
        labels = torch.tensor(piece, dtype=torch.long, device=distiller.device)
        result = distiller.optimize(init.to(device), labels, slot=slot,
                                    ipc=plan.ipc, aug_seed=aug_seed, emu=emu, reducer=reducer if shared else None,
                                    global_count=plan.batch_size(r) if shared else None)
    if emu is not None:
        if result is not None:
            for name, stats in result.stats.items():
                emu.commit(name, stats.covariance, stats.signal, stats.columns)
        # independent: sum every worker's new batch; exact: the workers already shared one batch
        emu.synchronise(None if shared or reducer is None else reducer.sum)
    return piece, result


def image_bytes(distiller: "Distiller") -> int:
    """The float32 bytes of one of the distiller's images (what :class:`InitImages` budgets by)."""
    return 4 * len(distiller.pixel_min.flatten()) * distiller.resolution ** 2


def recover_in_process(distiller, plan: RecoverPlan, *, data_dir: str, emu_enabled: bool = True,
                       num_workers: int = 1, device="cpu", on_round=None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Single-process recovery over all rounds of a one-worker plan (Ray Tune trials, notebooks, tests).

    Returns the images (normalised, ordered by class then slot), their labels and the per-batch loss parts.
    """
    if plan.workers != 1:
        raise ValueError("recover_in_process runs a one-worker plan; use run_recover for several workers")
    # the EMU's float64 sums mix with the distiller's statistics: on the distiller's device
    emu = EMU(distiller.emu_layers(), enabled=emu_enabled, device=distiller.device) if distiller.layers else None
    init_images = InitImages(data_dir, plan, 0, image_bytes=image_bytes(distiller), num_workers=num_workers,
                             resolution=distiller.resolution, normalize=distiller.normalize)
    found: dict[tuple[int, int], torch.Tensor] = {}
    parts = []
    for r in range(plan.rounds):
        slot = r // plan.rounds_per_slot
        chunk, result = run_round(distiller, plan, r, rank=0, emu=emu, reducer=None, data_dir=data_dir,
                                  num_workers=num_workers, device=device, init_images=init_images)
        for cls, image in zip(chunk, result.images):
            found[(cls, slot)] = image.cpu()
        parts.append({"slot": slot, "classes": chunk, **result.parts})
        if on_round is not None:
            on_round(r, result)
    keys = sorted(found)
    return torch.stack([found[k] for k in keys]), torch.tensor([k[0] for k in keys]), parts




def build_distiller(cfg: RecoverConfig, data_dir: str | Path, teacher_dir: str | Path, stats_dir: str | Path | None,
                    device) -> tuple[object, Distiller]:
    """The dataset's info and a :class:`Distiller` for ``cfg`` on the teacher in ``teacher_dir`` (its weights'
    checksum verified), matching the statistics in ``stats_dir`` (a spectral method's; None for the others)
    and keeping its images in the valid pixel range under the teacher's normalisation (``TeacherInfo.mean``/``std``,
    with which it also reads its real initial images)."""
    info = read_dataset_info(data_dir)
    teacher, tinfo = load_teacher(teacher_dir, device=device)
    real = None
    if stats_dir is not None:
        real = load_stats(stats_dir, teacher_sha256=tinfo.sha256, dataset_fingerprint=info.fingerprint)
    mean = torch.tensor(tinfo.mean, dtype=torch.float32)
    std = torch.tensor(tinfo.std, dtype=torch.float32)
    return info, Distiller(teacher, real, cfg, num_classes=info.num_classes, resolution=tinfo.resolution,
                           pixel_min=(0 - mean) / std, pixel_max=(1 - mean) / std, device=device,
                           normalize=(list(tinfo.mean), list(tinfo.std)))
