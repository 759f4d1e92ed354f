"""Mergeable float64 moments of one feature layer, and per-batch statistics.

Every spatial position of a feature map ``(N, C, H, W)`` is one sample
``x ∈ R^C``.  :class:`Moments` keeps sums (count, Σx, Σxxᵀ and per-class sums)
in float64; combining two shards is addition, so the result does not depend on
how the data was split, batched or ordered.  Covariances, means and class means
are derived from the sums on demand.

:func:`batch_statistics` is the differentiable counterpart used on synthetic
images: the covariance and the signal of the current batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_weight

from unidd_ray.spectral.filters import symmetrize

# total: the covariance of all positions | within_class: around each class's mean | per_batch: the
# batch-size-weighted mean of per-batch covariances over fixed batches in file order (the paper authors'
# ``running_cov``; served by statistics imported from their code, see :class:`Targets`)
COVARIANCE_MODES = ("total", "within_class", "per_batch")
# mean: μ | class: the class means μ_k over the classes present | soft: the teacher-softmax-weighted class means
# | class_share / mix_share: the paper authors' ``class`` / ``mix`` signals, Σ_{x∈k} pooled(x) / N = (n_k/N)·μ_k
# and Σ_x p_k(x)·pooled(x) / N over all K columns (a class's mean weighted by its share of the data; on the
# synthetic side the batch's sums over its B images / B, with the teacher's softmax detached)
SIGNAL_KINDS = ("mean", "class", "soft", "class_share", "mix_share")
SHARE_SIGNALS = ("class_share", "mix_share")

_F64 = torch.float64


def _check_features(features: Tensor, channels: int | None, what: str = "features", *, finite: bool = True
                    ) -> Tensor:
    if not isinstance(features, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() == 2:
        features = features[:, :, None, None]
    if features.dim() != 4:
        raise ValueError(f"{what} must have shape (N, C, H, W) or (N, C); got {tuple(features.shape)}")
    if channels is not None and features.shape[1] != channels:
        raise ValueError(
            f"{what} have {features.shape[1]} channels but these moments were built for {channels}; "
            "pass the feature map of the layer the moments belong to"
        )
    if finite and not torch.isfinite(features).all():
        raise _non_finite(what)
    return features


def _non_finite(what: str) -> ValueError:
    return ValueError(f"{what} contain NaN or Inf values; check the model input and its normalisation")


def _check_labels(labels: Tensor, n: int, num_classes: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the features; got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise ValueError(f"label {bad} is out of range for {num_classes} classes (valid: 0..{num_classes - 1})")
    return labels.long()


def _flatten_channels_first(features: Tensor) -> Tensor:
    """Return a float64 ``(C, N·H·W)`` copy of an ``(N, C, H, W)`` map in one pass."""
    n, c, h, w = features.shape
    out = torch.empty((c, n, h * w), dtype=_F64, device=features.device)
    out.copy_(features.detach().reshape(n, c, h * w).transpose(0, 1))
    return out.view(c, n * h * w)


class Moments:
    """Float64 sufficient statistics of one layer's features, mergeable by addition.

    Sums kept (SPEC §1.4): the position count ``n``, ``Σx``, ``Σxxᵀ``; per class
    ``k`` the position count and position sum; per class the image count and the
    sum of spatially pooled features (the ``class`` signal); and the
    teacher-softmax-weighted pooled sums (the ``soft`` signal).
    """

    _FIELDS = ("n", "sum", "sumsq", "class_n", "class_sum", "image_n", "pooled_sum", "soft_weight", "soft_sum")

    def __init__(self, channels: int, num_classes: int, *, device: torch.device | str | None = None):
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        c, k = self.channels, self.num_classes
        z = dict(dtype=_F64, device=device)
        self.n = torch.zeros((), **z)
        self.sum = torch.zeros(c, **z)
        self.sumsq = torch.zeros(c, c, **z)
        self.class_n = torch.zeros(k, **z)
        self.class_sum = torch.zeros(k, c, **z)
        self.image_n = torch.zeros(k, **z)
        self.pooled_sum = torch.zeros(k, c, **z)
        self.soft_weight = torch.zeros(k, **z)
        self.soft_sum = torch.zeros(k, c, **z)

    # ------------------------------------------------------------------ building
    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, probs: Tensor | None = None) -> "Moments":
        """Add a batch: ``features`` (N, C, H, W) or (N, C), integer ``labels`` (N,),
        optional teacher class probabilities ``probs`` (N, K) for the ``soft`` signal."""
        features = _check_features(features, self.channels)
        n, _, h, w = features.shape
        labels = _check_labels(labels, n, self.num_classes).to(self.n.device)
        if probs is not None:
            probs = torch.as_tensor(probs)
            if probs.shape != (n, self.num_classes):
                raise ValueError(f"probs must have shape ({n}, {self.num_classes}); got {tuple(probs.shape)}")
            probs = probs.detach().to(device=self.n.device, dtype=_F64)
            if not torch.isfinite(probs).all() or (probs < 0).any():
                raise ValueError("probs must be finite and non-negative (teacher softmax outputs)")
        positions = h * w
        x = _flatten_channels_first(features.to(self.n.device))  # (C, N·P) float64
        self.n += n * positions
        self.sum += x.sum(1)
        self.sumsq.addmm_(x, x.T)
        per_image = x.view(self.channels, n, positions).sum(2).T  # (N, C) position sums
        self.class_n.index_add_(0, labels, torch.full((n,), float(positions), dtype=_F64, device=x.device))
        self.class_sum.index_add_(0, labels, per_image)
        pooled = per_image / positions
        self.image_n.index_add_(0, labels, torch.ones(n, dtype=_F64, device=x.device))
        self.pooled_sum.index_add_(0, labels, pooled)
        if probs is not None:
            self.soft_weight += probs.sum(0)
            self.soft_sum.addmm_(probs.T, pooled)
        return self

    def merge(self, other: "Moments") -> "Moments":
        """Return the moments of the union of both shards (addition of the sums)."""
        if not isinstance(other, Moments):
            return NotImplemented
        if (other.channels, other.num_classes) != (self.channels, self.num_classes):
            raise ValueError(
                f"cannot merge moments of {other.channels} channels/{other.num_classes} classes into "
                f"{self.channels} channels/{self.num_classes} classes: they come from different layers or datasets"
            )
        out = Moments(self.channels, self.num_classes, device=self.n.device)
        for f in self._FIELDS:
            setattr(out, f, getattr(self, f) + getattr(other, f).to(self.n.device))
        return out

    __add__ = merge

    def copy(self) -> "Moments":
        out = Moments(self.channels, self.num_classes, device=self.n.device)
        for f in self._FIELDS:
            setattr(out, f, getattr(self, f).clone())
        return out

    # -------------------------------------------------------------- serialising
    def state_dict(self) -> dict[str, Tensor]:
        return {f: getattr(self, f).clone() for f in self._FIELDS}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "Moments":
        missing = [f for f in cls._FIELDS if f not in state]
        if missing:
            raise ValueError(f"moments state is missing fields {missing}")
        sumsq = torch.as_tensor(state["sumsq"])
        class_sum = torch.as_tensor(state["class_sum"])
        out = cls(sumsq.shape[0], class_sum.shape[0])
        for f in cls._FIELDS:
            value = torch.as_tensor(state[f], dtype=_F64)
            expected = getattr(out, f).shape
            if value.shape != expected:
                raise ValueError(f"moments field {f!r} has shape {tuple(value.shape)}, expected {tuple(expected)}")
            setattr(out, f, value.clone())
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Moments):
            return NotImplemented
        return (other.channels, other.num_classes) == (self.channels, self.num_classes) and all(
            torch.equal(getattr(self, f), getattr(other, f)) for f in self._FIELDS
        )

    def __repr__(self) -> str:
        return f"Moments(channels={self.channels}, num_classes={self.num_classes}, count={self.count})"

    # ---------------------------------------------------------------- derived
    @property
    def count(self) -> int:
        """Number of samples (spatial positions) accumulated."""
        return int(self.n.item())

    @property
    def images(self) -> int:
        return int(self.image_n.sum().item())

    def _require_samples(self) -> None:
        if self.count == 0:
            raise ValueError("these moments hold no samples yet; call update() with features first")

    @property
    def mean(self) -> Tensor:
        self._require_samples()
        return self.sum / self.n

    def covariance(self, mode: str = "total") -> Tensor:
        """Population covariance of the positions: ``total`` (Σxxᵀ/n − μμᵀ) or
        ``within_class`` ((Σxxᵀ − Σ_k n_k μ_k μ_kᵀ)/n)."""
        self._require_samples()
        if mode == "total":
            mu = self.mean
            cov = self.sumsq / self.n - torch.outer(mu, mu)
        elif mode == "within_class":
            seen = self.class_n > 0
            s = self.class_sum[seen]
            between = (s.T / self.class_n[seen]) @ s
            cov = (self.sumsq - between) / self.n
        elif mode == "per_batch":
            raise ValueError("the per_batch covariance (the mean of per-batch covariances, the paper authors' "
                             "running_cov) is served by statistics imported with `unidd-ray import unidd`; use "
                             "covariance total or within_class with statistics computed by `unidd-ray stats`")
        else:
            raise ValueError(f"unknown covariance mode {mode!r}; choose one of {COVARIANCE_MODES}")
        return symmetrize(cov)

    @property
    def class_counts(self) -> Tensor:
        """Images per class."""
        return self.image_n.clone()

    @property
    def class_means(self) -> Tensor:
        """Per-class mean of the spatially pooled features, shape (K, C); NaN rows for empty classes."""
        self._require_samples()
        return self.pooled_sum / self.image_n[:, None]

    @property
    def soft_means(self) -> Tensor:
        """Teacher-softmax-weighted class means of the pooled features, shape (K, C)."""
        self._require_samples()
        if not (self.soft_weight > 0).any():
            raise ValueError("no teacher probabilities were accumulated; pass probs= to update() for the soft signal")
        return self.soft_sum / self.soft_weight[:, None]

    def signal(self, kind: str = "mean") -> Tensor:
        """The FLC stand-in Φ as a (C, columns) matrix: ``mean`` → μ (C, 1),
        ``class`` → class means (C, K), ``soft`` → soft class means (C, K), ``class_share`` → (n_k/N)·μ_k
        (C, K), ``mix_share`` → Σ_x p_k(x)·pooled(x) / N (C, K)."""
        if kind == "mean":
            return self.mean[:, None]
        if kind == "class":
            return self.class_means.T
        if kind == "soft":
            return self.soft_means.T
        if kind == "class_share":
            self._require_samples()
            return self.pooled_sum.T / self.image_n.sum()
        if kind == "mix_share":
            self._require_samples()
            if not (self.soft_weight > 0).any():
                raise ValueError("no teacher probabilities were accumulated; pass probs= to update() for mix_share")
            return self.soft_sum.T / self.image_n.sum()
        raise ValueError(f"unknown signal {kind!r}; choose one of {SIGNAL_KINDS}")


class Targets:
    """Real-side targets given as finished matrices rather than sums: statistics imported from the paper
    authors' code, which stores per layer ``running_cov`` (the per_batch covariance), ``running_corr``
    (E[x xᵀ] over positions), ``running_mean`` (μ), ``running_class_mean`` (class_share) and
    ``running_mix_mean`` (mix_share).  Such targets cannot be merged or split; they serve the covariances and
    signals listed by :meth:`serves` and refuse the others by name.
    """

    def __init__(self, *, per_batch: Tensor | None, second_moment: Tensor | None, mean: Tensor,
                 class_share: Tensor | None = None, mix_share: Tensor | None = None):
        self.mean_vector = torch.as_tensor(mean, dtype=_F64).reshape(-1)
        c = self.mean_vector.numel()
        self.per_batch = None if per_batch is None else torch.as_tensor(per_batch, dtype=_F64)
        self.second_moment = None if second_moment is None else torch.as_tensor(second_moment, dtype=_F64)
        self.class_share = None if class_share is None else torch.as_tensor(class_share, dtype=_F64)
        self.mix_share = None if mix_share is None else torch.as_tensor(mix_share, dtype=_F64)
        for name in ("per_batch", "second_moment"):
            value = getattr(self, name)
            if value is not None and value.shape != (c, c):
                raise ValueError(f"{name} must be {c} x {c} like the mean has {c} channels, got {tuple(value.shape)}")
        widths = {v.shape[1] for v in (self.class_share, self.mix_share) if v is not None}
        for name in ("class_share", "mix_share"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 2 or value.shape[0] != c):
                raise ValueError(f"{name} must be {c} x K, got {tuple(value.shape)}")
        if len(widths) > 1:
            raise ValueError(f"class_share and mix_share have different class counts {sorted(widths)}")
        if self.per_batch is None and self.second_moment is None:
            raise ValueError("targets need a covariance: per_batch or the second moment")
        for name in ("mean_vector", "per_batch", "second_moment", "class_share", "mix_share"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"{name} contains NaN or Inf values")
        self.channels = c
        self.num_classes = widths.pop() if widths else None
        self.count = None  # the number of positions behind them is not known

    def serves(self) -> dict[str, list[str]]:
        """The covariance modes and signals these targets can give."""
        covs = [m for m, ok in (("total", self.second_moment is not None), ("per_batch", self.per_batch is not None))
                if ok]
        signals = ["mean"] + [k for k in SHARE_SIGNALS if getattr(self, k) is not None]
        return {"covariance": covs, "signal": signals}

    def _check_served(self, what: str, value: str, known: tuple[str, ...]) -> None:
        """Refuse a ``what`` (covariance or signal) that is unknown, or known but not among those served."""
        if value not in known:
            raise ValueError(f"unknown {what} {value!r}; choose one of {known}")
        served = self.serves()[what]
        if value not in served:
            raise ValueError(f"these imported statistics cannot serve the {value!r} {what} (they serve {served}): "
                             f"set recover.{what} to one of those")

    def covariance(self, mode: str = "total") -> Tensor:
        self._check_served("covariance", mode, COVARIANCE_MODES)
        if mode == "per_batch":
            return symmetrize(self.per_batch)
        return symmetrize(self.second_moment - torch.outer(self.mean_vector, self.mean_vector))

    def signal(self, kind: str = "mean") -> Tensor:
        self._check_served("signal", kind, SIGNAL_KINDS)
        return self.mean_vector[:, None] if kind == "mean" else getattr(self, kind)

    def __repr__(self) -> str:
        return f"Targets(channels={self.channels}, num_classes={self.num_classes}, serves={self.serves()})"


@dataclass
class BatchStatistics:
    """Differentiable statistics of one synthetic batch at one layer.

    ``n``, ``sum`` and ``sumsq`` are the batch's moments (so batches of several
    workers can be summed into one large batch); ``signal`` holds one column per
    entry of ``columns`` (the class ids for ``class``/``soft``, ``[0]`` for ``mean``).
    """

    n: Tensor
    sum: Tensor
    sumsq: Tensor
    signal_sum: Tensor  # (C, columns) weighted sums of pooled features
    signal_weight: Tensor  # (columns,) weights
    columns: Tensor

    @property
    def covariance(self) -> Tensor:
        mu = self.sum / self.n
        cov = self.sumsq / self.n - torch.outer(mu, mu)
        return symmetrize(cov)

    @property
    def signal(self) -> Tensor:
        return self.signal_sum / self.signal_weight


def _rows_by_convolution(x: Tensor) -> bool:
    """Whether the Gram products of a channels-last float32 CPU map go through oneDNN.

    ``Σ_p x_p x_pᵀ`` is the weight gradient of a 1 × 1 convolution whose input
    and output gradient are both the map, and ``X S`` is that convolution with
    weight ``S``.  On the CPU oneDNN runs these tall, narrow shapes faster than
    the BLAS ``mm``: ResNet-18's 17 taps, forward + backward, 398 → 267 ms
    (docs/PERFORMANCE.md).
    """
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class _GramAndSums(torch.autograd.Function):
    """``(Σ_p x_p x_pᵀ, Σ_p x_p)`` of an ``(N, C, H, W)`` map, with a single-product backward.

    The sums are per image, ``(N, C)``, with ``per_image=True`` and over the whole
    batch, ``(C,)``, otherwise (all the ``mean`` signal needs).
    Autograd through ``x @ xᵀ`` treats the two operands separately (two products
    and a sum of two map-sized gradients), and the sums add a third
    map-sized gradient.  The Gram matrix is symmetric in its operand, so the
    whole gradient is one product with the sums' gradient broadcast onto its
    result: ``dX_n = (dG + dGᵀ) X_n + dP_n 1ᵀ``, in place, or, for batch sums on
    the convolution route, as the convolution's bias (no extra pass over the
    map).  The gradient is a
    fresh tensor in the input's layout, never a view: the tapped map has other
    consumers (the layer itself, a residual), and autograd adds their gradients
    into a buffer it owns in place, where a view would cost a new map-sized
    tensor per tap.

    Routes: a channels-last map is one ``(N·H·W, C)`` matrix without a copy, so the
    Gram is one product forward and one backward (on the CPU in float32 both are
    run as 1 × 1 convolutions, see :func:`_rows_by_convolution`).  Otherwise a batched matmul on
    the ``(N, C, L)`` view when ``L ≥ C`` (no copy of the map; an ``(N, C, C)``
    intermediate), and one matmul on a ``(C, N·L)`` copy when ``L < C`` (deep,
    small maps, where ``(N, C, C)`` would outgrow the map).
    """

    @staticmethod
    def forward(ctx, x: Tensor, per_image: bool) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        length = h * w
        if x.is_contiguous(memory_format=torch.channels_last):
            if _rows_by_convolution(x):
                ctx.route = "rows-conv"
                gram = conv2d_weight(x, (c, c, 1, 1), x).view(c, c)
                ctx.save_for_backward(x)
            else:
                ctx.route = "rows"  # one (N·L, C) matrix, a view: every position a row
                rows = x.permute(0, 2, 3, 1).reshape(n * length, c)
                gram = rows.T @ rows
                ctx.save_for_backward(rows)
        elif length >= c:
            ctx.route = "batched"
            x3 = x.reshape(n, c, length)
            gram = torch.bmm(x3, x3.transpose(1, 2)).sum(0)
            ctx.save_for_backward(x3)
        else:
            ctx.route = "columns"
            cols = x.transpose(0, 1).reshape(c, n * length)
            gram = cols @ cols.T
            ctx.save_for_backward(cols)
        ctx.shape = (n, c, h, w)
        ctx.per_image = per_image
        return gram, x.sum((2, 3) if per_image else (0, 2, 3))

    @staticmethod
    def backward(ctx, d_gram: Tensor, d_sums: Tensor) -> tuple[Tensor, None]:
        (saved,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        sym = (d_gram + d_gram.T).to(saved.dtype)
        d_sums = d_sums.to(saved.dtype)
        shift = d_sums.view(n if ctx.per_image else 1, c, 1, 1)  # broadcast over the positions
        if ctx.route == "rows-conv":  # (X S) of a channels-last map = a 1 x 1 convolution with weight S = Sᵀ
            if ctx.per_image:
                return F.conv2d(saved, sym.view(c, c, 1, 1)).add_(shift), None
            return F.conv2d(saved, sym.view(c, c, 1, 1), d_sums), None
        if ctx.route == "rows":
            grad = torch.empty((n, c, h, w), dtype=saved.dtype, device=saved.device, memory_format=torch.channels_last)
            torch.mm(saved, sym, out=grad.permute(0, 2, 3, 1).view(n * h * w, c))
            return grad.add_(shift), None
        grad = saved.new_empty((n, c, h, w))
        if ctx.route == "batched":
            torch.baddbmm(shift.view(-1, c, 1).expand(n, c, h * w), sym.expand(n, c, c), saved,
                          out=grad.view(n, c, h * w))
            return grad, None
        by_column = (sym @ saved).view(c, n, h, w).transpose(0, 1)
        return torch.add(by_column, shift, out=grad), None


def batch_statistics(
    features: Tensor,
    labels: Tensor | None = None,
    *,
    signal: str = "mean",
    probs: Tensor | None = None,
    num_classes: int | None = None,
) -> BatchStatistics:
    """Moments and signal of one batch, differentiable in ``features``.

    The Gram matrix and the sums (per image for the ``class`` and ``soft``
    signals) come from :class:`_GramAndSums`: one product forward and one
    backward over the map (see there).
    """
    features = _check_features(features, None, finite=False)  # checked on the Gram diagonal below
    n_img, c, h, w = features.shape
    if signal not in SIGNAL_KINDS:
        raise ValueError(f"unknown signal {signal!r}; choose one of {SIGNAL_KINDS}")
    per_image = signal != "mean"  # the mean signal needs only the batch's sums
    if features.dtype == torch.float32 and n_img * h * w < c:
        # Fewer positions than channels: Ψ_S is singular, and rounding a float32 Gram of uncentred
        # features leaves "zero" eigenvalues of order 1e-4 -- as large as a late slot's β, enough to
        # make Ψ_S + βI indefinite.  Such maps are small, so their moments are taken in float64.
        features = features.double()
    sumsq, sums = _GramAndSums.apply(features, per_image)
    if not torch.isfinite(sumsq.diagonal()).all():  # Σ x_c² is NaN/Inf iff channel c has a NaN/Inf (or overflows)
        raise _non_finite("features")
    n = torch.tensor(float(n_img * h * w), dtype=features.dtype, device=features.device)
    if signal == "mean":
        total = sums
        columns = torch.zeros(1, dtype=torch.long, device=features.device)
        signal_sum = (sums / (h * w))[:, None]  # Σ over images of the pooled features
        weight = torch.full((1,), float(n_img), dtype=features.dtype, device=features.device)
    else:
        total = sums.sum(0)
        pooled = sums / (h * w)  # (N, C)
        if labels is None:
            raise ValueError(f"the {signal!r} signal needs the labels of the synthetic batch")
        k = num_classes if num_classes is not None else int(labels.max()) + 1
        labels = _check_labels(labels, n_img, k).to(features.device)
        share = signal in SHARE_SIGNALS
        columns = torch.arange(k, device=features.device) if share else torch.unique(labels)
        if signal in ("class", "class_share"):
            onehot = (labels[:, None] == columns[None, :]).to(features.dtype)  # (N, K')
        else:
            if probs is None or probs.shape != (n_img, k):
                raise ValueError(f"the {signal!r} signal needs teacher probabilities of shape ({n_img}, {k})")
            onehot = probs[:, columns].to(features.dtype)
        signal_sum = pooled.T @ onehot
        # a share signal divides every column by the batch's image count B, the others by the column's weight
        weight = (torch.full((k,), float(n_img), dtype=features.dtype, device=features.device) if share
                  else onehot.sum(0))
    return BatchStatistics(n=n, sum=total, sumsq=sumsq, signal_sum=signal_sum, signal_weight=weight, columns=columns)
