"""Numbers behind the report, in pure torch: no files, no plotting."""

from __future__ import annotations

import torch
from torch import Tensor


def power_sum(images: Tensor, chunk: int = 64) -> tuple[Tensor, int]:
    """|F|² / (H·W) of each mean-subtracted channel of ``images`` (N, C, H, W), summed over channels and
    images: an (H, W) float64 array in FFT order (zero frequency at [0, 0]), and the number of channels summed
    (N·C).  Sums over parts of a set add up to the set's; their total over their count is the mean power map
    that :func:`radial_average` and :func:`high_frequency_share` take.  ``chunk`` images are transformed at a
    time, so the memory it takes is that of a chunk's complex spectra, not the set's (2,000 images at 224 px
    were 4.8 GB of complex128 at once)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    total = torch.zeros(h, w, dtype=torch.float64)
    for start in range(0, n, chunk):
        x = images[start:start + chunk].double()
        x = x - x.mean(dim=(-2, -1), keepdim=True)
        total += (torch.fft.fft2(x).abs() ** 2).sum(dim=(0, 1))
    return total / (h * w), n * c


def _mean_power(images: Tensor, chunk: int = 64) -> Tensor:
    """The mean power map of ``images`` (N, C, H, W): :func:`power_sum`'s sum over its count."""
    total, count = power_sum(images, chunk)
    return total / count


def _check_power(power: Tensor) -> None:
    if power.dim() != 2:
        raise ValueError(f"power must be an (H, W) map, got {tuple(power.shape)}")


def radial_average(power: Tensor) -> tuple[Tensor, Tensor]:
    """A mean power map (H, W) in FFT order (:func:`power_sum`) averaged over rings of integer radius around
    the zero frequency: (radii, psd) with radius in cycles per image, from 0 to min(H, W) // 2."""
    _check_power(power)
    power = torch.fft.fftshift(power.double(), dim=(-2, -1))
    h, w = power.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = torch.sqrt(yy.double() ** 2 + xx.double() ** 2).round().long()
    r_max = min(h, w) // 2
    keep = radius <= r_max
    sums = torch.zeros(r_max + 1, dtype=torch.float64).index_add_(0, radius[keep], power[keep])
    counts = torch.zeros(r_max + 1, dtype=torch.float64).index_add_(0, radius[keep],
                                                                   torch.ones_like(power[keep]))
    return torch.arange(r_max + 1), sums / counts


def high_frequency_share(power: Tensor, cutoff: float = 0.5) -> float:
    """Share of a mean power map (H, W) in FFT order (:func:`power_sum`) above ``cutoff`` × the Nyquist
    frequency of the shorter side: P[r > cutoff · min(H, W) / 2].sum() / P[r > 0].sum() with r the radius in
    cycles per image (0.0 when all the power is at the zero frequency)."""
    if cutoff < 0:
        raise ValueError(f"cutoff must be a non-negative multiple of the Nyquist frequency, got {cutoff}")
    _check_power(power)
    power = power.double()
    h, w = power.shape
    fy = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, d=1.0 / w, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    body = power[radius > 0].sum()
    high = power[radius > cutoff * min(h, w) / 2].sum()
    return float(high / body) if body > 0 else 0.0


def radial_power_spectrum(images: Tensor) -> tuple[Tensor, Tensor]:
    """Radially averaged power spectral density of ``images`` (N, C, H, W) in [0, 1].

    Each channel is mean-subtracted, transformed with a 2-D FFT, and its power
    |F|² / (H·W) averaged over rings of integer radius around the zero frequency;
    the result is averaged over channels and images.  Returns (radii, psd) with
    radius in cycles per image, from 0 to min(H, W) // 2 (the corners of the
    spectrum beyond that radius are left out of this plot-oriented curve; they are
    counted by :func:`high_frequency_fraction`).  :func:`radial_average` of the
    mean power map computes the same from sums over parts of a set.
    """
    return radial_average(_mean_power(images))


def high_frequency_fraction(images: Tensor, cutoff: float = 0.5) -> float:
    """Share of the spectral power of ``images`` (N, C, H, W) above ``cutoff`` × the Nyquist frequency.

    Computed on the full 2-D power spectrum (the one :func:`radial_power_spectrum` averages over rings,
    corners included), every frequency bin weighted by its own power.  With f = (f_y, f_x) in cycles per
    image and r = |f|, the reference is the Nyquist frequency of the shorter side, r_ref = min(H, W) / 2,
    and the fraction is P[r > cutoff · r_ref].sum() / P[r > 0].sum(): the zero frequency (each channel's
    mean) is left out.  White noise scores the share of non-zero frequency bins above the cutoff, a
    checkerboard (all power at the corner frequency (H/2, W/2)) scores 1, and constant images 0.0.
    :func:`high_frequency_share` of the mean power map computes the same from sums over parts of a set.
    """
    if cutoff < 0:
        raise ValueError(f"cutoff must be a non-negative multiple of the Nyquist frequency, got {cutoff}")
    return high_frequency_share(_mean_power(images), cutoff)


def intra_class_cosine(features: Tensor, labels: Tensor) -> tuple[float | None, dict[int, float]]:
    """Mean pairwise cosine similarity of the features within each class (pairs i ≠ j), and its mean
    over the classes that have at least two samples (``None`` when no class has two, e.g. IPC 1)."""
    f = torch.nn.functional.normalize(features.double().flatten(1), dim=1)
    per_class = {}
    for k in labels.unique().tolist():
        fk = f[labels == k]
        n = len(fk)
        if n < 2:
            continue
        sim = fk @ fk.T
        per_class[int(k)] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
    mean = sum(per_class.values()) / len(per_class) if per_class else None
    return mean, per_class


def top1_text(mean: float | None, std: float | None = None) -> str:
    """A top-1 figure as the tables print it: ``mean ± std``, ``mean`` without a spread, and "not recorded"
    without a figure (an imported teacher's accuracy on its own data)."""
    if mean is None:
        return "not recorded"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def protocol_cell(row: dict) -> str:
    """A results row's protocol (a row written before ``evaluate.protocol`` existed is ``ours``; the teacher's row,
    which has no IPC, none)."""
    return row.get("protocol", "ours") if row["ipc"] is not None else "–"


def top1_cell(row: dict) -> str:
    """A results row's top-1 cell: the final figure (:func:`top1_text`) and, for a ``paper``-protocol row, its
    test-selected figure beside it (the best of the late tests, chosen on the test set as the paper reports)."""
    text = top1_text(row["top1_mean"], row.get("top1_std"))
    if row.get("top1_selected_mean") is not None:
        text += f" (final); {top1_text(row['top1_selected_mean'], row.get('top1_selected_std'))} (test-selected)"
    return text


def covariance_spectrum(cov: Tensor) -> Tensor:
    """Eigenvalues of a covariance matrix, largest first (clipped at zero)."""
    return torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp(min=0)
