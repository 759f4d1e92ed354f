"""Numbers behind the report, in pure torch: no files, no plotting."""

from __future__ import annotations

import torch
from torch import Tensor


def radial_power_spectrum(images: Tensor) -> tuple[Tensor, Tensor]:
    """Radially averaged power spectral density of ``images`` (N, C, H, W) in [0, 1].

    Each channel is mean-subtracted, transformed with a 2-D FFT, and its power
    |F|² / (H·W) averaged over rings of integer radius around the zero frequency;
    the result is averaged over channels and images.  Returns (radii, psd) with
    radius in cycles per image, from 0 to min(H, W) // 2.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    x = images.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    power = torch.fft.fftshift(torch.fft.fft2(x).abs() ** 2 / (h * w), dim=(-2, -1)).mean(dim=(0, 1))
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = torch.sqrt(yy.double() ** 2 + xx.double() ** 2).round().long()
    r_max = min(h, w) // 2
    keep = radius <= r_max
    sums = torch.zeros(r_max + 1, dtype=torch.float64).index_add_(0, radius[keep], power[keep])
    counts = torch.zeros(r_max + 1, dtype=torch.float64).index_add_(0, radius[keep],
                                                                   torch.ones_like(power[keep]))
    return torch.arange(r_max + 1), sums / counts


def high_frequency_fraction(psd: Tensor, cutoff: float = 0.5) -> float:
    """Share of the spectral power (excluding the DC ring) at radii above ``cutoff`` × the Nyquist radius."""
    r_max = len(psd) - 1
    radii = torch.arange(len(psd))
    body = psd[1:]
    high = psd[radii > cutoff * r_max]
    return float(high.sum() / body.sum()) if body.sum() > 0 else 0.0


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


def covariance_spectrum(cov: Tensor) -> Tensor:
    """Eigenvalues of a covariance matrix, largest first (clipped at zero)."""
    return torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp(min=0)
