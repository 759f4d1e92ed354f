"""The spectral core of UniDD and CFM: pure torch, no Ray, no files.

>>> import torch
>>> from unidd_ray.spectral import Moments, batch_statistics, cfm_layer_loss
>>> real = Moments(channels=8, num_classes=3).update(torch.randn(16, 8, 5, 5), torch.randint(0, 3, (16,)))
>>> syn = torch.randn(4, 8, 5, 5, requires_grad=True)
>>> stats = batch_statistics(syn)
>>> f_loss, s_loss = cfm_layer_loss(real.covariance(), real.signal("mean"), stats.covariance, stats.signal, beta=0.1)
"""

from unidd_ray.spectral.emu import EMU, RunningAverage
from unidd_ray.spectral.filters import (
    FILTERS,
    CurriculumFrequencyMatching,
    DistributionMatching,
    GradientMatching,
    KernelRidge,
    LowPassMatching,
    SpectralFilter,
    TrajectoryMatching,
    apply_filter,
    available_filters,
    cholesky_factor,
    make_filter,
    register_filter,
    resolvent,
)
from unidd_ray.spectral.losses import RealSideCache, cfm_layer_loss, default_cache, unidd_layer_loss
from unidd_ray.spectral.moments import (
    COVARIANCE_MODES,
    SIGNAL_KINDS,
    BatchStatistics,
    Moments,
    Targets,
    batch_statistics,
)
from unidd_ray.spectral.schedules import SCHEDULES, beta_schedule

__all__ = [
    "COVARIANCE_MODES",
    "EMU",
    "FILTERS",
    "SCHEDULES",
    "SIGNAL_KINDS",
    "BatchStatistics",
    "CurriculumFrequencyMatching",
    "DistributionMatching",
    "GradientMatching",
    "KernelRidge",
    "LowPassMatching",
    "Moments",
    "RealSideCache",
    "RunningAverage",
    "SpectralFilter",
    "Targets",
    "TrajectoryMatching",
    "apply_filter",
    "available_filters",
    "batch_statistics",
    "beta_schedule",
    "cfm_layer_loss",
    "cholesky_factor",
    "default_cache",
    "make_filter",
    "register_filter",
    "resolvent",
    "unidd_layer_loss",
]
