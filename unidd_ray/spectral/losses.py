"""UniDD layer losses: ‖f(Ψ_T) − f(Ψ_S)‖_F and ‖h(Ψ_T) Φ_T − h(Ψ_S) Φ_S‖_F (not squared).

The real side depends only on the filter (for CFM: only on β), so it is computed
once in float64 and kept in a small cache keyed by the filter and the identity
of the real tensors.  On the synthetic side the resolvent's value is computed in
the filter's ``compute_dtype`` — float64 by default (Ψ_S + βI is ill-conditioned
for small β; the matrices are only C × C), float32 with ``precision="float32"``
— while its gradient products run in the narrower of the synthetic statistics'
dtype and the precision's product dtype (float32 for ``precision="mixed"``).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
from torch import Tensor

from unidd_ray.spectral.filters import KernelRidge, SpectralFilter

_COMPUTE = torch.float64


class RealSideCache:
    """LRU cache of ``(f(Ψ_T), h(Ψ_T) Φ_T)`` per (filter, real tensors).

    Entries hold references to the real tensors, so a key can never be reused by
    a different tensor that happens to get the same ``id``; an in-place change of
    a real tensor bumps its version counter and therefore misses the cache.
    """

    def __init__(self, maxsize: int = 2048):
        self.maxsize = maxsize
        self._entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @torch.no_grad()
    def get(self, filt: SpectralFilter, real_cov: Tensor, real_signal: Tensor) -> tuple[Tensor | None, Tensor]:
        key = (filt, id(real_cov), real_cov._version, id(real_signal), real_signal._version, real_cov.device)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is real_cov and entry[1] is real_signal:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[2]
        self.misses += 1
        value = _real_side(filt, real_cov, real_signal)
        self._entries[key] = (real_cov, real_signal, value)
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value


default_cache = RealSideCache()


def _real_side(filt: SpectralFilter, real_cov: Tensor, real_signal: Tensor):
    """``(f(Ψ_T), h(Ψ_T) Φ_T)`` in float64 whatever the filter's precision (computed once per filter)."""
    exact = dataclasses.replace(filt, precision="float64") if hasattr(filt, "precision") else filt
    with torch.no_grad():
        return exact.filter_and_signal(real_cov.to(_COMPUTE), real_signal.to(_COMPUTE))


def _check_pair(real_cov: Tensor, real_signal: Tensor, syn_cov: Tensor, syn_signal: Tensor, columns) -> None:
    c = real_cov.shape[0]
    if real_cov.shape != (c, c) or syn_cov.shape != (c, c):
        raise ValueError(
            f"covariances must both be C x C with the same C; got real {tuple(real_cov.shape)}, "
            f"synthetic {tuple(syn_cov.shape)}"
        )
    if real_signal.dim() != 2 or syn_signal.dim() != 2 or real_signal.shape[0] != c or syn_signal.shape[0] != c:
        raise ValueError(
            f"signals must be (C, columns) matrices with C = {c}; got real {tuple(real_signal.shape)}, "
            f"synthetic {tuple(syn_signal.shape)}"
        )
    wanted = real_signal.shape[1] if columns is None else len(columns)
    if syn_signal.shape[1] != wanted:
        raise ValueError(
            f"the synthetic signal has {syn_signal.shape[1]} columns but {wanted} real columns are matched; "
            "pass columns= with the class ids of the synthetic signal"
        )


def unidd_layer_loss(
    filt: SpectralFilter,
    real_cov: Tensor,
    real_signal: Tensor,
    syn_cov: Tensor,
    syn_signal: Tensor,
    *,
    columns: Tensor | None = None,
    cache: RealSideCache | None = default_cache,
) -> tuple[Tensor, Tensor]:
    """``(filter_loss, signal_loss)`` of one layer for any registered filter.

    ``columns`` selects the real signal's columns (class ids) that the synthetic
    signal's columns correspond to; ``None`` matches all of them.  Both losses are
    scalars in the filter's ``compute_dtype`` (float64 unless a resolvent filter
    was built with ``precision="float32"``), differentiable in ``syn_cov`` and
    ``syn_signal``.
    """
    _check_pair(real_cov, real_signal, syn_cov, syn_signal, columns)
    compute = filt.compute_dtype
    if cache is None:
        real_filtered, real_signal_f = _real_side(filt, real_cov, real_signal)
    else:
        real_filtered, real_signal_f = cache.get(filt, real_cov, real_signal)
    real_filtered = None if real_filtered is None else real_filtered.to(syn_cov.device, compute)
    real_signal_f = real_signal_f.to(syn_cov.device, compute)
    if columns is not None:
        real_signal_f = real_signal_f[:, torch.as_tensor(columns, device=real_signal_f.device)]
    bad = ~torch.isfinite(real_signal_f).all(0)
    if bad.any():  # the class means of classes the statistics saw no image of are NaN
        ids = bad.nonzero().flatten().tolist() if columns is None else torch.as_tensor(columns).cpu()[bad.cpu()].tolist()
        raise ValueError(f"the real signal of column(s) {ids} is not finite: the real statistics hold no images of "
                         "those classes; compute the statistics over data that has them, or leave them out")
    syn_filtered, syn_signal_f = filt.filter_and_signal(syn_cov, syn_signal)
    signal_loss = torch.linalg.matrix_norm(real_signal_f - syn_signal_f.to(compute))
    if real_filtered is None:
        filter_loss = torch.zeros((), dtype=compute, device=syn_cov.device)
    else:
        filter_loss = torch.linalg.matrix_norm(real_filtered - syn_filtered.to(compute))
    return filter_loss, signal_loss


def cfm_layer_loss(
    real_cov: Tensor,
    real_signal: Tensor,
    syn_cov: Tensor,
    syn_signal: Tensor,
    beta: float,
    *,
    columns: Tensor | None = None,
    cache: RealSideCache | None = default_cache,
    precision: str = "float64",
) -> tuple[Tensor, Tensor]:
    """CFM layer loss (SPEC §1.2) with F = (Ψ + βI)⁻¹ on both sides:
    ``(‖F_T − F_S‖_F, ‖F_T Φ_T − F_S Φ_S‖_F)``; ``precision="float32"`` computes the
    synthetic side's resolvent in float32 (the real side stays float64, cast),
    ``"mixed"`` only its gradient products."""
    return unidd_layer_loss(
        KernelRidge(beta=float(beta), precision=precision), real_cov, real_signal, syn_cov, syn_signal,
        columns=columns, cache=cache,
    )
