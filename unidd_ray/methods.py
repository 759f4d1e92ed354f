"""The recovery methods, one registry entry each.

An entry says what a method is: the UniDD filter it matches through (``None`` for SRe2L and plain
cross-entropy, which need no real statistics), the recover settings it does not read (left out of
its recovery's content key, so changing one method's setting redoes only that method), whether it
needs BatchNorm layers in the teacher, and its own checks of the settings it reads.  The command
line's choices, the configuration checks, the stage keys, Ray Tune and the ``Distiller`` all read
this registry; adding a method is one entry.

The pipeline's real-subset baselines (``random``, ``random-hard``) are named here too: they are
evaluated like distilled sets but recover nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from unidd_ray.spectral import make_filter

# The parameters of the spectral filters and of the matching terms: what the non-spectral methods never read.
FILTER_SETTINGS = ("beta_max", "schedule", "beta_min", "precision", "mtt_eta", "mtt_steps")
MATCHING_SETTINGS = ("alpha", "alpha_scale", "signal", "covariance", "emu")
ALPHA_SCALES = ("constant", "emu")  # constant: α for every batch | emu: α·t for the t-th batch of the EMU mix
# real subsets of IPC images per class, evaluated with soft (False) or hard (True) labels
BASELINES = {"random": False, "random-hard": True}


@dataclass(frozen=True)
class Method:
    """A recovery method.  ``filter(settings)`` builds its UniDD filter from recover settings (any object with
    the ``recover`` section's attributes); ``unread``: the recover settings it does not read."""

    name: str
    description: str
    filter: Callable[[Any], Any] | None = None
    unread: tuple[str, ...] = ()
    needs_batchnorm: bool = False

    @property
    def spectral(self) -> bool:
        """Matches a filtered covariance and signal: needs the real statistics of the teacher's layers."""
        return self.filter is not None


def _cfm(s):
    return make_filter("cfm", beta_max=s.beta_max, schedule=s.schedule, beta_min=s.beta_min, precision=s.precision)


def _krr(s):
    if s.beta_min is not None:
        raise ValueError(f"krr uses one fixed beta (beta_max), but beta_min={s.beta_min} was given; leave beta_min "
                         "unset, or use the cfm method for a schedule")
    return make_filter("krr", beta=s.beta_max, precision=s.precision)


REGISTRY: dict[str, Method] = {m.name: m for m in (
    # cfm keeps every setting in its key, read or not: the key its stored recoveries were made under
    Method("cfm", "high-pass (Ψ + βI)⁻¹ with β scheduled from beta_max down over the IPC slots", _cfm),
    Method("krr", "high-pass (Ψ + βI)⁻¹ with one fixed β = beta_max (KRR / FrePo)", _krr,
           unread=("schedule", "beta_min", "mtt_eta", "mtt_steps", "bn_weight")),
    Method("dc", "low-pass f = λ (gradient matching)", lambda s: make_filter("dc"),
           unread=FILTER_SETTINGS + ("bn_weight",)),
    Method("lfm", "low-pass F = Ψ on both terms, the signal filtered too (the paper's LFM rows)",
           lambda s: make_filter("lfm"), unread=FILTER_SETTINGS + ("bn_weight",)),
    Method("dm", "signal only, f = 1 (distribution matching)", lambda s: make_filter("dm"),
           unread=FILTER_SETTINGS + ("bn_weight",)),
    Method("mtt", "f = (1 − ηλ)^p (trajectory matching)",
           lambda s: make_filter("mtt", eta=s.mtt_eta, steps=s.mtt_steps),
           unread=("beta_max", "schedule", "beta_min", "precision", "bn_weight")),
    Method("sre2l", "BatchNorm running-statistics matching + cross-entropy", None,
           unread=FILTER_SETTINGS + MATCHING_SETTINGS, needs_batchnorm=True),
    Method("ce", "cross-entropy only", None, unread=FILTER_SETTINGS + MATCHING_SETTINGS + ("bn_weight",)),
)}
METHODS = tuple(REGISTRY)
SPECTRAL_METHODS = tuple(name for name, m in REGISTRY.items() if m.spectral)


def get_method(name: str) -> Method:
    """The registry entry of ``name``; ``ValueError`` listing the methods when there is none."""
    if name not in REGISTRY:
        raise ValueError(f"unknown recovery method {name!r}; choose one of {list(METHODS)}")
    return REGISTRY[name]


def method_filter(settings):
    """The UniDD filter of ``settings.method`` built from ``settings`` (None for sre2l / ce); raises
    ``ValueError`` naming a setting the method cannot use."""
    method = get_method(settings.method)
    return None if method.filter is None else method.filter(settings)
