"""Input normalisations: the per-channel ``mean`` and ``std`` (in [0, 1] pixel units) a teacher's inputs are
normalised with, ``(x - mean) / std``.

The normalisation belongs to the teacher (``teacher.normalization`` in a recipe, recorded in ``teacher.json``
as ``mean``/``std``): the statistics, the recovery, the random subset, relabel, evaluate and the report all
normalise with the teacher's constants, so a pretrained teacher sees the inputs it was trained on.

=================  =========================================================================================
value              constants
=================  =========================================================================================
``dataset``        the prepared training split's own mean and std (``dataset.json``; the default)
``cifar10``        (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010)
``cifar100``       (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761)
``tiny-imagenet``  (0.4802, 0.4481, 0.3975) / (0.2302, 0.2265, 0.2262)
``imagenet``       (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) (torchvision's ImageNet models)
``model``          the teacher architecture's own: a ``torchvision:`` model's weight enum transforms (ImageNet's),
                   a ``timm:`` model's pretrained config (``unidd_ray.models.model_normalization``); the
                   teacher artifact records where they came from (``extra["normalization_source"]``)
``{mean, std}``    explicit lists, one number per channel
=================  =========================================================================================

The named constants are those of the UniDD authors' code (github.com/bdy9527/UniDD, ``utils.py`` and the
synthesis scripts; file:line below).
"""

from __future__ import annotations

import math

from unidd_ray.models import model_normalization

DATASET = "dataset"
MODEL = "model"

CONSTANTS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # utils.py:59-60 (get_dataset, CIFAR-10), utils.py:680-681 (denormalize), synthesis_small.py:59-60,
    # generate_soft_label_online.py:139-140
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # utils.py:83-84 (the CIFAR-100 train transform), utils.py:683-684, synthesis_small.py:69-70,
    # generate_soft_label_online.py:117-118 (their CIFAR-100 *val* transform, utils.py:93-94, uses the ImageNet ones)
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    # utils.py:102-103 (Tiny), utils.py:674-675, synthesis_large.py:65-66, generate_soft_label_online.py:75-76
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    # utils.py:126-127 (ImageNet), utils.py:677-678, synthesis_large.py:77-78, baseline.py:74-75
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NAMES = (DATASET, *CONSTANTS, MODEL)


def check_normalization(value) -> None:
    """Refuse a normalisation that is neither one of :data:`NAMES` nor ``{mean: [...], std: [...]}`` with as
    many finite means as positive finite stds (``ValueError`` saying what it must be)."""
    if isinstance(value, str):
        if value not in NAMES:
            raise ValueError(f"must be one of {list(NAMES)} or {{mean: [...], std: [...]}}, got {value!r}")
        return
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise ValueError(f"must be one of {list(NAMES)} or a mapping with exactly the keys mean and std, "
                         f"got {value!r}")
    mean, std = value["mean"], value["std"]
    numbers = all(isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    and math.isfinite(x) for x in v) for v in (mean, std))
    if not numbers or len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"must give mean and std as lists of finite numbers, one per channel, every std > 0, "
                         f"got {value!r}")


def normalization_source(value, arch: str | None = None) -> str | None:
    """Where the constants of ``model`` come from for ``arch`` (e.g. ``torchvision ResNet18_Weights.IMAGENET1K_V1
    transforms``); None for any other value."""
    return model_normalization(arch)[2] if value == MODEL else None


def resolve_normalization(value, info, arch: str | None = None) -> tuple[list[float], list[float]]:
    """The ``(mean, std)`` lists of ``value`` (see :func:`check_normalization`) for the prepared dataset ``info``
    (``dataset``: its card's; ``model``: the architecture ``arch``'s own); ``ValueError`` when their channel count
    is not the dataset's."""
    check_normalization(value)
    if value == DATASET:
        mean, std = list(info.mean), list(info.std)
    elif value == MODEL:
        if arch is None:
            raise ValueError("model needs the teacher's architecture (teacher.arch)")
        mean, std, _ = model_normalization(arch)
    elif isinstance(value, str):
        mean, std = (list(v) for v in CONSTANTS[value])
    else:
        mean, std = [float(x) for x in value["mean"]], [float(x) for x in value["std"]]
    if len(mean) != info.channels:
        raise ValueError(f"gives {len(mean)} channel(s) but the images of {info.name!r} have {info.channels}")
    return mean, std
