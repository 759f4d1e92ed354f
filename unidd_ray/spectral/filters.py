"""Spectral filters on a symmetric feature–feature matrix, and the UniDD filter registry.

A filter ``f`` acts on the eigenvalues of a symmetric matrix:
``f(M) = U diag(f(λ)) Uᵀ``.  Every dataset-distillation objective of UniDD is a
pair of such functions: one for the filter-matching term (g = I) and one for the
signal-matching term (g = FLC), see SPEC §1.1:

=========  =========================  ==================================
family     g = I term                 g = FLC term
=========  =========================  ==================================
``dm``     absent                     1
``dc``     λ                          1
``lfm``    λ                          λ
``mtt``    (1 − ηλ)^p                 (1 − (1 − ηλ)^p) / λ
``krr``    1 / (λ + β)                1 / (λ + β)
``cfm``    1 / (λ + β_b)              1 / (λ + β_b), β_b scheduled per IPC slot
=========  =========================  ==================================

Each family also gives closed-form matrix versions (no eigendecomposition) so
that the losses stay cheap and stably differentiable.  A new family is one
class decorated with :func:`register_filter`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from unidd_ray.spectral.schedules import SCHEDULES, beta_schedule


def _check_square(matrix: Tensor, what: str = "matrix") -> None:
    if not isinstance(matrix, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{what} must be a square 2-D matrix, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{what} contains NaN or Inf values")


def symmetrize(matrix: Tensor) -> Tensor:
    """``(M + Mᵀ) / 2`` as a new tensor (one allocation: the halving is in place, same bits)."""
    return (matrix + matrix.transpose(-1, -2)).mul_(0.5)


def apply_filter(matrix: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``f(M) = U diag(fn(λ)) Uᵀ`` through a symmetric eigendecomposition of ``M``."""
    _check_square(matrix)
    eigvals, eigvecs = torch.linalg.eigh(symmetrize(matrix))
    response = torch.as_tensor(fn(eigvals), dtype=eigvals.dtype, device=eigvals.device)
    if response.shape != eigvals.shape:
        response = response.expand_as(eigvals)
    return (eigvecs * response) @ eigvecs.transpose(-1, -2)


def cholesky_factor(matrix: Tensor, beta: float) -> Tensor:
    """Lower Cholesky factor of ``M + βI``; ``ValueError`` naming β and λ_min when not SPD."""
    _check_square(matrix)
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    shifted = symmetrize(matrix)  # a new tensor: β goes onto its diagonal in place
    shifted.diagonal().add_(beta)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        lam_min = float(torch.linalg.eigvalsh(symmetrize(matrix.detach())).min())
        raise ValueError(
            f"(M + beta*I) is not positive definite for beta={beta:g}: the smallest eigenvalue of M is "
            f"{lam_min:.3e}, so beta must be greater than {max(-lam_min, 0.0):.3e} (use beta > 0 for a "
            "covariance matrix, which is only positive semi-definite)"
        )
    return factor


class _SPDInverse(torch.autograd.Function):
    """``(sym(M) + βI)⁻¹`` from the Cholesky factor of ``sym(M) + βI``, differentiable in ``M``.

    The value is computed in the factor's dtype.  The backward pass uses the
    saved inverse F directly: for L(F) with F = (sym(M) + βI)⁻¹,
    ∂L/∂M = −F sym(∂L/∂F) F (F symmetric) — two matrix products instead of
    differentiating through the factorisation, and no symmetrised copy of M in
    the graph.  The gradient is returned in the dtype of ``matrix``; its
    products run in the narrowest of that dtype, the factor's and
    ``product_dtype`` (float32 features, or a float32/mixed ``precision``, get
    float32 gradient products even when ``matrix`` is a float64 running average).
    """

    @staticmethod
    def forward(ctx, matrix: Tensor, factor: Tensor, product_dtype: torch.dtype | None) -> Tensor:
        inverse = torch.cholesky_inverse(factor)
        ctx.save_for_backward(inverse)
        ctx.grad_dtype = matrix.dtype
        candidates = [matrix.dtype, factor.dtype] + ([product_dtype] if product_dtype is not None else [])
        ctx.product_dtype = min(candidates, key=lambda d: d.itemsize)
        return inverse

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        inverse = inverse.to(ctx.product_dtype)
        return -(inverse @ symmetrize(grad.to(ctx.product_dtype)) @ inverse).to(ctx.grad_dtype), None, None


# precision -> (dtype of the resolvent's values and of the loss, dtype of its gradient products)
PRECISIONS = {
    "float64": (torch.float64, torch.float64),
    # float64 factorisation, values and loss; the two C x C gradient products in float32. The gradient
    # reaching float32 images is float32 anyway: measured 2.3e-7 relative to float64 at C = 512.
    "mixed": (torch.float64, torch.float32),
    "float32": (torch.float32, torch.float32),
}


def _precision(precision: str) -> tuple[torch.dtype, torch.dtype]:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    return PRECISIONS[precision]


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of a resolvent filter's values (and loss) under ``precision``."""
    return _precision(precision)[0]


def product_dtype(precision: str) -> torch.dtype:
    """The dtype of the resolvent's gradient products under ``precision``."""
    return _precision(precision)[1]


def resolvent_in(matrix: Tensor, beta: float, *, dtype: torch.dtype = torch.float64,
                 product_dtype: torch.dtype | None = None) -> Tensor:
    """``(M + βI)⁻¹`` through a Cholesky factorisation, differentiable in ``matrix``.

    The value is computed in ``dtype`` (float64 by default: Ψ + βI is
    ill-conditioned for small β); the gradient is taken with respect to the
    symmetric part of ``matrix`` and comes back in ``matrix``'s dtype, its two
    products in ``product_dtype`` where that is narrower.
    """
    factor = cholesky_factor(matrix.detach().to(dtype), beta)
    return _SPDInverse.apply(matrix, factor, product_dtype)


def resolvent(matrix: Tensor, beta: float) -> Tensor:
    """``(M + βI)⁻¹`` through a Cholesky factorisation (never a general inverse), in ``matrix``'s dtype."""
    return resolvent_in(matrix, beta).to(matrix.dtype)


# --------------------------------------------------------------------------- registry
FILTERS: dict[str, type["SpectralFilter"]] = {}


def register_filter(name: str):
    """Class decorator adding a :class:`SpectralFilter` subclass to the registry under ``name``."""

    def wrap(cls: type[SpectralFilter]) -> type[SpectralFilter]:
        if name in FILTERS:
            raise ValueError(f"a spectral filter named {name!r} is already registered")
        cls.name = name
        FILTERS[name] = cls
        return cls

    return wrap


def available_filters() -> list[str]:
    return sorted(FILTERS)


def make_filter(name: str, **params) -> "SpectralFilter":
    """Build a registered filter, e.g. ``make_filter("mtt", eta=0.1, steps=5)``."""
    if name not in FILTERS:
        raise ValueError(f"unknown spectral filter {name!r}; registered filters: {available_filters()}")
    cls = FILTERS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"filter {name!r} takes parameters {valid}, not {unknown}")
    return cls(**params)


@dataclass(frozen=True)
class SpectralFilter:
    """A UniDD filter: eigenvalue responses for the g = I and g = FLC terms.

    ``filter_response``/``signal_response`` give the scalar functions (used for
    analysis and as a reference); ``filter_matrix``/``signal_matrix`` give
    ``f(M)`` and ``f(M) Z`` directly, by default through :func:`apply_filter`.
    """

    name: ClassVar[str] = "abstract"
    has_filter_term: ClassVar[bool] = True

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the loss values (the resolvent filters have a ``precision`` setting)."""
        return torch.float64

    def filter_response(self, eigvals: Tensor) -> Tensor:
        raise NotImplementedError

    def signal_response(self, eigvals: Tensor) -> Tensor:
        raise NotImplementedError

    def filter_matrix(self, matrix: Tensor) -> Tensor:
        return apply_filter(matrix, self.filter_response)

    def signal_matrix(self, matrix: Tensor, signal: Tensor) -> Tensor:
        return apply_filter(matrix, self.signal_response) @ signal

    def filter_and_signal(self, matrix: Tensor, signal: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(f(M), h(M) Z)`` for the filter-matching and signal-matching terms."""
        filtered = self.filter_matrix(matrix) if self.has_filter_term else None
        return filtered, self.signal_matrix(matrix, signal)

    def at_slot(self, slot: int, ipc: int) -> "SpectralFilter":
        """The concrete filter for IPC slot ``slot`` of ``ipc`` (only curricula change per slot)."""
        return self

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})"


@register_filter("dm")
@dataclass(frozen=True)
class DistributionMatching(SpectralFilter):
    """DM: class-mean (signal) matching only, f = 1 on the signal term."""

    has_filter_term: ClassVar[bool] = False

    def filter_response(self, eigvals: Tensor) -> Tensor:
        raise ValueError("the dm filter has no filter-matching (g = I) term")

    def signal_response(self, eigvals: Tensor) -> Tensor:
        return torch.ones_like(eigvals)

    def signal_matrix(self, matrix: Tensor, signal: Tensor) -> Tensor:
        return signal


@register_filter("dc")
@dataclass(frozen=True)
class GradientMatching(SpectralFilter):
    """DC / CovM: low-pass f = λ on the filter term, f = 1 on the signal term."""

    def filter_response(self, eigvals: Tensor) -> Tensor:
        return eigvals

    def signal_response(self, eigvals: Tensor) -> Tensor:
        return torch.ones_like(eigvals)

    def filter_matrix(self, matrix: Tensor) -> Tensor:
        return symmetrize(matrix)

    def signal_matrix(self, matrix: Tensor, signal: Tensor) -> Tensor:
        return signal


@register_filter("lfm")
@dataclass(frozen=True)
class LowPassMatching(SpectralFilter):
    """LFM, the low-pass baseline of the paper's tables: F = Ψ on both terms, so the signal is filtered
    too (``‖Ψ_T − Ψ_S‖_F + ‖Ψ_T Φ_T − Ψ_S Φ_S‖_F``); ``dc`` leaves the signal unfiltered."""

    def filter_response(self, eigvals: Tensor) -> Tensor:
        return eigvals

    def signal_response(self, eigvals: Tensor) -> Tensor:
        return eigvals

    def filter_matrix(self, matrix: Tensor) -> Tensor:
        return symmetrize(matrix)

    def signal_matrix(self, matrix: Tensor, signal: Tensor) -> Tensor:
        return symmetrize(matrix) @ signal

    def filter_and_signal(self, matrix: Tensor, signal: Tensor) -> tuple[Tensor, Tensor]:
        filtered = symmetrize(matrix)
        return filtered, filtered @ signal.to(filtered.dtype)


@register_filter("mtt")
@dataclass(frozen=True)
class TrajectoryMatching(SpectralFilter):
    """MTT: ``p`` full-batch gradient steps of size ``eta`` on a linear head.

    f = (1 − ηλ)^p on the filter term and (1 − (1 − ηλ)^p)/λ = η Σ_{i<p} (1 − ηλ)^i
    on the signal term; the polynomial form is exact at λ = 0 and needs no division.
    """

    eta: float = 0.1
    steps: int = 10

    def __post_init__(self):
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise ValueError(f"mtt needs a positive learning rate eta, got {self.eta}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"mtt needs a positive integer number of steps, got {self.steps}")

    def filter_response(self, eigvals: Tensor) -> Tensor:
        return (1 - self.eta * eigvals) ** self.steps

    def signal_response(self, eigvals: Tensor) -> Tensor:
        step = 1 - self.eta * eigvals
        acc = torch.ones_like(eigvals)
        for _ in range(self.steps - 1):
            acc = 1 + step * acc
        return self.eta * acc

    def _step_matrix(self, matrix: Tensor) -> Tensor:
        eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return eye - self.eta * symmetrize(matrix)

    def filter_matrix(self, matrix: Tensor) -> Tensor:
        return torch.linalg.matrix_power(self._step_matrix(matrix), int(self.steps))

    def signal_matrix(self, matrix: Tensor, signal: Tensor) -> Tensor:
        step = self._step_matrix(matrix)
        acc = signal
        for _ in range(int(self.steps) - 1):  # Horner: Z + S(Z + S(Z + ...))
            acc = signal + step @ acc
        return self.eta * acc


@register_filter("krr")
@dataclass(frozen=True)
class KernelRidge(SpectralFilter):
    """KRR / FrePo with a linear kernel: the high-pass resolvent 1/(λ + β) on both terms."""

    beta: float = 0.1
    precision: str = "float64"  # float64 | mixed (float32 gradient products) | float32 (see PRECISIONS)

    def __post_init__(self):
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"krr needs beta > 0 (the covariance may be singular), got {self.beta}")
        precision_dtype(self.precision)

    @property
    def compute_dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    def filter_response(self, eigvals: Tensor) -> Tensor:
        return 1.0 / (eigvals + self.beta)

    def signal_response(self, eigvals: Tensor) -> Tensor:
        return 1.0 / (eigvals + self.beta)

    # Values in ``precision`` whatever the input dtype (float64 by default: Ψ + βI is
    # ill-conditioned for small β).
    def filter_matrix(self, matrix: Tensor) -> Tensor:
        return resolvent_in(matrix, self.beta, dtype=self.compute_dtype, product_dtype=product_dtype(self.precision))

    def signal_matrix(self, matrix: Tensor, signal: Tensor) -> Tensor:
        return self.filter_and_signal(matrix, signal)[1]

    def filter_and_signal(self, matrix: Tensor, signal: Tensor) -> tuple[Tensor, Tensor]:
        inverse = self.filter_matrix(matrix)
        return inverse, inverse @ signal.to(self.compute_dtype)


@register_filter("cfm")
@dataclass(frozen=True)
class CurriculumFrequencyMatching(SpectralFilter):
    """CFM: the KRR resolvent with β scheduled from β_max (low-pass) down over the IPC slots."""

    beta_max: float = 0.1
    schedule: str = "cosine"
    beta_min: float | None = None
    precision: str = "float64"

    def __post_init__(self):
        precision_dtype(self.precision)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        beta_schedule(self.schedule, self.beta_max, 1, beta_min=self.beta_min)  # validates the numbers

    def betas(self, ipc: int) -> list[float]:
        return beta_schedule(self.schedule, self.beta_max, ipc, beta_min=self.beta_min)

    def at_slot(self, slot: int, ipc: int) -> KernelRidge:
        betas = self.betas(ipc)
        if not 0 <= slot < ipc:
            raise ValueError(f"slot {slot} is outside 0..{ipc - 1}")
        return KernelRidge(beta=betas[slot], precision=self.precision)

    @property
    def compute_dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    # Without a slot, CFM behaves as its first (lowest-frequency) slot.
    def filter_response(self, eigvals: Tensor) -> Tensor:
        return self.at_slot(0, 1).filter_response(eigvals)

    def signal_response(self, eigvals: Tensor) -> Tensor:
        return self.at_slot(0, 1).signal_response(eigvals)

    def filter_matrix(self, matrix: Tensor) -> Tensor:
        return self.at_slot(0, 1).filter_matrix(matrix)

    def signal_matrix(self, matrix: Tensor, signal: Tensor) -> Tensor:
        return self.at_slot(0, 1).signal_matrix(matrix, signal)

    def filter_and_signal(self, matrix: Tensor, signal: Tensor) -> tuple[Tensor, Tensor]:
        return self.at_slot(0, 1).filter_and_signal(matrix, signal)
