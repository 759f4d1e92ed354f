"""The model zoo: any torchvision or timm classifier by name, ``torchvision:<name>`` or ``timm:<name>``.

``build_zoo_model("torchvision:regnet_y_8gf", num_classes=10, in_channels=1, resolution=32)`` builds the
architecture with freshly initialised weights (``pretrained`` weights are never downloaded: a user's weights
file comes through ``teacher.weights``, in the library's own state_dict format), ``num_classes`` outputs and
``in_channels`` input channels (timm: its ``in_chans``; torchvision: the first ``Conv2d`` is replaced by one of
the same shape but for its input channels).

The stem rule (option ``stem``: ``auto`` (default) | ``cifar`` | ``imagenet``, as for the registered ResNets):
with ``cifar``, or ``auto`` and inputs of at most 32 px, these families get a CIFAR-style stem (a 224-px
stem would shrink a 32-px image to 8 px or less before the first block):

=========================================  ===============================================================
family                                     CIFAR stem
=========================================  ===============================================================
ResNet / ResNeXt / Wide ResNet (both)      ``conv1`` → 3×3 stride 1, ``maxpool`` removed (timm's deep
                                           ``resnet*d`` stems: their first conv gets stride 1)
DenseNet (both)                            ``conv0`` → 3×3 stride 1, ``pool0`` removed
RegNet (both)                              the stem's 3×3 stride-2 conv → stride 1 (it has no max-pool)
MobileNet V2 / V3 (torchvision),           the first 3×3 stride-2 conv → stride 1
EfficientNet / MobileNet (timm ``conv_stem``)
ConvNeXt (both)                            the 4×4 stride-4 patchify conv → 3×3 stride 1
=========================================  ===============================================================

Every other family (ViT, Swin, VGG, Inception, ...) is built as it is at any side: some of them (torchvision's
ViT and Swin) need their native side (224 px).  Every option but ``stem`` is passed to the model's constructor
(torchvision's ``get_model``, timm's ``create_model``); a wrong one surfaces when the model is built.

The model's own input normalisation (:func:`zoo_normalization`): torchvision's weight enum's transforms (its
default weights: ImageNet's mean and std), timm's pretrained config (``get_pretrained_cfg``); neither
downloads anything.
"""

from __future__ import annotations

import difflib
from functools import lru_cache

import unidd_ray  # noqa: F401,I001  (first: applies the torchvision import fix; timm imports torchvision)
import timm
import torchvision.models
from torch import nn
from torchvision.models import get_model, get_model_weights

PREFIXES = ("torchvision:", "timm:")
STEMS = ("auto", "cifar", "imagenet")
# options that would fetch weights or override what the data sets: refused with where to go instead
REFUSED = {"pretrained": "weights are never downloaded here: give a weights file as teacher.weights",
           "weights": "weights are never downloaded here: give a weights file as teacher.weights",
           "weights_backbone": "weights are never downloaded here: give a weights file as teacher.weights",
           "pretrained_cfg_overlay": "weights are never downloaded here: give a weights file as teacher.weights",
           "checkpoint_path": "give a weights file as teacher.weights",
           "num_classes": "the number of classes is the data's", "in_chans": "the channel count is the data's",
           "in_channels": "the channel count is the data's"}


def is_zoo_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


@lru_cache(maxsize=None)
def _torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))  # the classifiers


@lru_cache(maxsize=None)
def _timm_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def _split(name: str) -> tuple[str, str]:
    library, _, arch = name.partition(":")
    return library, arch


def check_zoo_name(name: str) -> None:
    """Refuse a ``torchvision:``/``timm:`` name that the library does not have (``ValueError``, one line naming the
    nearest names)."""
    library, arch = _split(name)
    if library == "torchvision":
        names = _torchvision_names()
        known = arch in names
    else:
        names = _timm_names()
        known = bool(arch) and timm.is_model(arch)  # also a name with a pretrained tag, e.g. convnext_tiny.fb_in1k
    if not known:
        near = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(f'{library}:{n}' for n in near)}?" if near
                else f"see {'torchvision.models.list_models()' if library == 'torchvision' else 'timm.list_models()'}")
        raise ValueError(f"{library} has no classifier named {arch!r}; {hint}")


def check_zoo_options(name: str, options: dict) -> None:
    """The name (:func:`check_zoo_name`), ``stem`` and the options that are refused outright."""
    check_zoo_name(name)
    for key in sorted(set(options) & set(REFUSED)):
        raise ValueError(f"model {name!r} does not take option {key!r}: {REFUSED[key]}")
    if options.get("stem", "auto") not in STEMS:
        raise ValueError(f"model {name!r} takes stem {list(STEMS)}, not {options['stem']!r}")


def _small_input(resolution: int, stem: str) -> bool:
    return stem == "cifar" or (stem == "auto" and resolution <= 32)


def _conv_like(conv: nn.Conv2d, *, in_channels: int | None = None, kernel_size=None, stride=None,
               padding=None) -> nn.Conv2d:
    """A fresh ``Conv2d`` like ``conv`` but for the given settings."""
    return nn.Conv2d(conv.in_channels if in_channels is None else in_channels, conv.out_channels,
                     conv.kernel_size if kernel_size is None else kernel_size,
                     conv.stride if stride is None else stride, conv.padding if padding is None else padding,
                     dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, module)


def _first_conv(model: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _cifar_stem(model: nn.Module) -> str | None:
    """Give ``model`` a CIFAR-style stem where its family has one (see the module's table); returns the family
    adapted, or None where it is kept as it is."""
    kind = type(model).__name__
    three = {"kernel_size": 3, "stride": 1, "padding": 1}
    if kind == "ResNet" and hasattr(model, "maxpool"):
        if isinstance(model.conv1, nn.Conv2d):  # 7x7 stride 2 -> 3x3 stride 1
            model.conv1 = _conv_like(model.conv1, **three)
        else:  # timm's deep stem (three 3x3 convs): its first one gets stride 1
            first = f"conv1.{_first_conv(model.conv1)}"
            _set(model, first, _conv_like(model.get_submodule(first), stride=1))
        model.maxpool = nn.Identity()
        return "resnet"
    if kind == "DenseNet" and hasattr(model.features, "conv0"):
        model.features.conv0 = _conv_like(model.features.conv0, **three)
        if hasattr(model.features, "pool0"):
            model.features.pool0 = nn.Identity()
        return "densenet"
    if kind == "RegNet":
        stem = "stem.0" if isinstance(getattr(model.stem, "0", None), nn.Conv2d) else f"stem.{_first_conv(model.stem)}"
        _set(model, stem, _conv_like(model.get_submodule(stem), stride=1))
        return "regnet"
    if kind in ("MobileNetV2", "MobileNetV3") and hasattr(model, "features"):
        _set(model, "features.0.0", _conv_like(model.features[0][0], stride=1))
        return "mobilenet"
    if kind in ("EfficientNet", "MobileNetV3") and isinstance(getattr(model, "conv_stem", None), nn.Conv2d):
        model.conv_stem = _conv_like(model.conv_stem, stride=1)
        return "mobilenet"
    if kind == "ConvNeXt":
        first = "features.0.0" if hasattr(model, "features") else "stem.0"
        _set(model, first, _conv_like(model.get_submodule(first), **three))
        return "convnext"
    return None


def build_zoo_model(name: str, *, num_classes: int, in_channels: int, resolution: int, **options) -> nn.Module:
    """Build ``torchvision:<name>`` or ``timm:<name>`` (see the module's docstring) with fresh weights."""
    check_zoo_options(name, options)
    library, arch = _split(name)
    stem = options.pop("stem", "auto")
    if library == "timm":
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
    else:
        model = get_model(arch, weights=None, num_classes=num_classes, **options)
        if in_channels != 3:
            first = _first_conv(model)
            _set(model, first, _conv_like(model.get_submodule(first), in_channels=in_channels))
    if _small_input(resolution, stem):
        _cifar_stem(model)
    return model


def zoo_normalization(name: str) -> tuple[list[float], list[float], str]:
    """The model's own input normalisation ``(mean, std, source)``: torchvision's default weights' transforms or
    timm's pretrained config (no download); ``source`` says where the constants come from."""
    check_zoo_name(name)
    library, arch = _split(name)
    if library == "timm":
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None or cfg.mean is None or cfg.std is None:
            raise ValueError(f"timm has no pretrained config with a mean and std for {arch!r}")
        tag = f".{cfg.tag}" if getattr(cfg, "tag", None) else ""
        return [float(v) for v in cfg.mean], [float(v) for v in cfg.std], \
            f"timm pretrained_cfg of {arch.partition('.')[0]}{tag}"
    try:
        weights = get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError, KeyError) as exc:
        raise ValueError(f"torchvision records no weights (so no normalisation) for {arch!r}: {exc}") from None
    transforms = weights.transforms()
    return [float(v) for v in transforms.mean], [float(v) for v in transforms.std], \
        f"torchvision {type(weights).__name__}.{weights.name} transforms"
