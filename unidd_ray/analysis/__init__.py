"""Spectral analysis of distilled sets (power spectra, feature similarity, covariance spectra) and the report."""

from unidd_ray.analysis.metrics import (
    covariance_spectrum,
    high_frequency_fraction,
    intra_class_cosine,
    radial_power_spectrum,
)

__all__ = ["covariance_spectrum", "high_frequency_fraction", "intra_class_cosine", "radial_power_spectrum"]
