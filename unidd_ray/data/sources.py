"""The registry of dataset sources: ``load_source(name, root, **options)``.

=================  ==========================================================  ==================
name               data                                                        options
=================  ==========================================================  ==================
``fashion-mnist``  Debian ``dataset-fashion-mnist`` IDX files (default root)    --
``digits``         scikit-learn's bundled 8 x 8 digits                          val_fraction, seed
``cifar10``        official python pickle batches                               --
``cifar100``       official python pickle batches (fine labels)                 --
``imagefolder``    ``train/<class>/`` + ``val/<class>/`` or flat ``val/``       val_labels, resolution,
                                                                                fingerprint
``tiny-imagenet``  official tiny-imagenet-200 layout                            --
``npz``            a ``.npz`` file with ``x``, ``y`` (+ ``x_val``, ``y_val``)   val_fraction, seed
=================  ==========================================================  ==================

Options given as strings (as the command line passes them) are converted to the option's type.
Each reader is documented in its module under :mod:`unidd_ray.data.formats`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from unidd_ray.data.formats import cifar, digits, fashion_mnist, imagefolder, npz, tiny_imagenet
from unidd_ray.data.source_types import SourceDataset, SourceError, Split, validate_source

__all__ = ["SourceDataset", "SourceError", "SourceSpec", "Split", "available_sources", "check_source_options",
           "load_source", "register_source"]


@dataclass(frozen=True)
class SourceSpec:
    """A registered source: its reader and the types of the options it accepts."""

    name: str
    reader: Callable[..., SourceDataset]
    options: dict[str, type] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, SourceSpec] = {}


def register_source(name: str, reader: Callable[..., SourceDataset], *, options: dict[str, type] | None = None,
                    description: str = "") -> None:
    """Register ``reader(root, **options) -> SourceDataset`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"a dataset source named {name!r} is already registered")
    _REGISTRY[name] = SourceSpec(name, reader, dict(options or {}), description)


def available_sources() -> list[str]:
    """Names accepted by :func:`load_source`, sorted."""
    return sorted(_REGISTRY)


def _coerce(source: str, option: str, value, kind: type):
    if not isinstance(value, str) or kind is str:
        return value
    if value.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError as exc:
        raise ValueError(f"source {source!r}: option {option}={value!r} is not a valid {kind.__name__}") from exc


def load_source(name: str, root: str | None = None, **options) -> SourceDataset:
    """Read the dataset source ``name`` from ``root`` (``None``: the source's default location).

    Raises ``ValueError`` for an unknown source or option (listing the valid ones),
    ``FileNotFoundError`` for missing data and :class:`SourceError` (a ``ValueError``) for data that
    is truncated, corrupt or inconsistent.
    """
    typed = check_source_options(name, options)
    return validate_source(_REGISTRY[name].reader(root, **typed))


def check_source_options(name: str, options: dict) -> dict:
    """``options`` of source ``name`` converted to their types, without reading any data; ``ValueError``
    naming an unknown source, an unknown option or a value of the wrong type."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset source {name!r}; available sources: {available_sources()}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = sorted(spec.options) or "none"
        raise ValueError(f"source {name!r} does not take option(s) {unknown}; its options: {valid}")
    return {key: _coerce(name, key, value, spec.options[key]) for key, value in options.items()}


register_source("fashion-mnist", fashion_mnist.load, description="Fashion-MNIST IDX files (Debian package)")
register_source("digits", digits.load, options={"val_fraction": float, "seed": int},
                description="scikit-learn 8x8 digits")
register_source("cifar10", cifar.load_cifar10, description="CIFAR-10 python pickle batches")
register_source("cifar100", cifar.load_cifar100, description="CIFAR-100 python pickle batches (fine labels)")
register_source("imagefolder", imagefolder.load, options={"val_labels": str, "resolution": int, "fingerprint": str},
                description="ImageNet/Imagenette-style image folders")
register_source("tiny-imagenet", tiny_imagenet.load, description="Tiny ImageNet (tiny-imagenet-200 layout)")
register_source("npz", npz.load, options={"val_fraction": float, "seed": int},
                description="uint8 image arrays in a .npz file")
