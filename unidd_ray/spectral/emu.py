"""EMU: the running equal-weight average of synthetic statistics over batches (SPEC §1.2).

For the t-th batch (1-based), the synthetic statistics entering the loss are

    Ψ_S = (1 − 1/t) · Ψ̄ + (1/t) · Ψ̂(current),     Φ_S likewise,

where Ψ̄ averages the batches finished so far.  Gradients flow only through the
current batch; once a batch is finished its statistics are added without
gradient.

The state is kept as *sums* (Σ Ψ̂ over finished batches, their number, and per
signal column Σ Φ̂ with its count).  Sums are additive, so states built by
several workers merge by addition — an all-reduce of one flat float64 vector —
and the result equals what one process would hold after the union of their
batches, whatever their order.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

_F64 = torch.float64


class RunningAverage:
    """EMU sums of one layer: covariance sum and batch count; per-column signal sums and counts."""

    def __init__(self, channels: int, columns: int, *, device: torch.device | str | None = None):
        self.channels = int(channels)
        self.columns = int(columns)
        self.cov_sum = torch.zeros(channels, channels, dtype=_F64, device=device)
        self.batches = torch.zeros((), dtype=_F64, device=device)
        self.signal_sum = torch.zeros(channels, columns, dtype=_F64, device=device)
        self.signal_count = torch.zeros(columns, dtype=_F64, device=device)

    _FIELDS = ("cov_sum", "batches", "signal_sum", "signal_count")

    def mix(self, cov_hat: Tensor, signal_hat: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        """Running averages including the current batch; differentiable in the current batch only."""
        return _mix(self, cov_hat, signal_hat, columns)

    @torch.no_grad()
    def commit(self, cov_hat: Tensor, signal_hat: Tensor, columns: Tensor) -> None:
        """Add a finished batch (without gradient)."""
        cols = torch.as_tensor(columns, device=self.signal_sum.device)
        self.cov_sum += cov_hat.detach().to(_F64)
        self.batches += 1
        self.signal_sum[:, cols] += signal_hat.detach().to(_F64)
        self.signal_count[cols] += 1

    @property
    def average(self) -> tuple[Tensor, Tensor]:
        """(Ψ̄, Φ̄) over the finished batches; NaN columns where a column was never seen."""
        if self.batches.item() == 0:
            raise ValueError("no synthetic batch has been committed to this running average yet")
        return self.cov_sum / self.batches, self.signal_sum / self.signal_count

    def flat(self) -> Tensor:
        return torch.cat([getattr(self, f).reshape(-1) for f in self._FIELDS])

    def load_flat(self, flat: Tensor) -> None:
        offset = 0
        for f in self._FIELDS:
            ref = getattr(self, f)
            size = ref.numel()
            # on this state's device, whatever the flat vector's (a state loaded without map_location)
            setattr(self, f, flat[offset: offset + size].reshape(ref.shape).to(device=ref.device, dtype=_F64).clone())
            offset += size
        if offset != flat.numel():
            raise ValueError(f"flat EMU state has {flat.numel()} values, expected {offset}")

    def __add__(self, other: "RunningAverage") -> "RunningAverage":
        if (other.channels, other.columns) != (self.channels, self.columns):
            raise ValueError("cannot merge running averages of different layers")
        out = RunningAverage(self.channels, self.columns, device=self.cov_sum.device)
        out.load_flat(self.flat() + other.flat())
        return out


def _mix(finished: RunningAverage, cov_hat: Tensor, signal_hat: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """Equal-weight average of the batches summed in ``finished`` and the current batch."""
    cols = torch.as_tensor(columns, device=finished.signal_sum.device)
    # float64 sums + the current batch: the add promotes the batch's float32 values exactly
    cov = (finished.cov_sum + cov_hat) / (finished.batches + 1)
    signal = (finished.signal_sum[:, cols] + signal_hat) / (finished.signal_count[cols] + 1)
    return cov, signal


class EMU:
    """Running averages of all hooked layers, split into a synchronised part and this worker's
    pending batches since the last synchronisation."""

    def __init__(self, layers: dict[str, tuple[int, int]], *, enabled: bool = True, device=None):
        self.enabled = enabled
        self.layers = dict(layers)
        self.synced = {k: RunningAverage(c, m, device=device) for k, (c, m) in self.layers.items()}
        self.pending = {k: RunningAverage(c, m, device=device) for k, (c, m) in self.layers.items()}
        # synced + pending per layer, formed once per batch rather than at every iteration
        self._finished: dict[str, RunningAverage] = {}

    def mix(self, layer: str, cov_hat: Tensor, signal_hat: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
        if not self.enabled:
            return cov_hat, signal_hat
        finished = self._finished.get(layer)
        if finished is None:
            finished = self._finished[layer] = self.synced[layer] + self.pending[layer]
        return _mix(finished, cov_hat, signal_hat, columns)

    def batch_number(self) -> int:
        """t for the batch being optimised: the finished batches (this worker's and the synchronised
        ones) plus one; 1 when the EMU is off (the current batch is then the whole average)."""
        if not self.enabled or not self.layers:
            return 1
        layer = next(iter(self.layers))
        return int(self.synced[layer].batches.item() + self.pending[layer].batches.item()) + 1

    def commit(self, layer: str, cov_hat: Tensor, signal_hat: Tensor, columns: Tensor) -> None:
        if self.enabled:
            self.pending[layer].commit(cov_hat, signal_hat, columns)
            self._finished.pop(layer, None)

    def synchronise(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        """Fold every worker's pending batches into the synchronised state.

        ``all_reduce_sum`` sums a flat float64 tensor over workers (identity for one process).
        """
        names = sorted(self.layers)
        flat = torch.cat([self.pending[k].flat() for k in names])
        if all_reduce_sum is not None:  # a reducer may hand back its result on another device
            flat = all_reduce_sum(flat).to(flat.device)
        offset = 0
        for k in names:
            size = self.pending[k].flat().numel()
            increment = RunningAverage(*self.layers[k], device=flat.device)
            increment.load_flat(flat[offset: offset + size])
            self.synced[k] = self.synced[k] + increment
            self.pending[k] = RunningAverage(*self.layers[k], device=flat.device)
            offset += size
        self._finished.clear()

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for k in sorted(self.layers):
            out[f"synced/{k}"] = self.synced[k].flat()
            out[f"pending/{k}"] = self.pending[k].flat()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.layers:
            self.synced[k].load_flat(torch.as_tensor(state[f"synced/{k}"]))
            self.pending[k].load_flat(torch.as_tensor(state[f"pending/{k}"]))
        self._finished.clear()
