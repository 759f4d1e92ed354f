"""Architecture registry: ``build_model(name, num_classes, in_channels, resolution, **options)``.

- ``convnet``: the ConvNet of the distillation literature (width, depth, norm);
  ConvNet-W128-D3 is the default for ≤ 32 px.
- ``resnet18`` / ``resnet50``: torchvision's ResNets; for ≤ 32 px (``stem="auto"``)
  the CIFAR stem (3×3 stride-1 conv1, no max-pool), else the ImageNet stem.
- ``mobilenet_v2``, ``densenet121``: torchvision models for cross-architecture evaluation.
- ``torchvision:<name>`` / ``timm:<name>``: any classifier of either library (:mod:`unidd_ray.models.zoo`:
  the CIFAR stem per family at ≤ 32 px, no pretrained download).

Any number of input channels and classes.  ImageNet weights in torchvision's
format load from a user-supplied file with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import unidd_ray  # noqa: F401  (applies the torchvision import fix)
from unidd_ray.models.convnet import ConvNet
from unidd_ray.models.zoo import build_zoo_model, check_zoo_options, is_zoo_name, zoo_normalization


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout a ``channels_last`` setting asks for (NHWC: faster convolutions on CPUs with oneDNN)."""
    return torch.channels_last if channels_last else torch.contiguous_format


MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(fn):
        if name in MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(MODELS)


def check_model_options(name: str, options: dict) -> None:
    """Refuse an unknown model or option names it does not take (``ValueError`` listing the valid ones), without
    building it.  A zoo name (``torchvision:``/``timm:``) is checked against its library's names, and its options
    for those refused outright (its constructor's own are checked when it is built)."""
    if is_zoo_name(name):
        check_zoo_options(name, options)
        return
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {available_models()}")
    valid = [p for p in inspect.signature(MODELS[name]).parameters if p not in ("num_classes", "in_channels",
                                                                                 "resolution")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"model {name!r} takes options {valid}, not {unknown}")


def build_model(name: str, *, num_classes: int, in_channels: int = 3, resolution: int = 32, **options) -> nn.Module:
    """Build a registered architecture; unknown names or options raise ``ValueError`` listing the valid ones."""
    check_model_options(name, options)
    if num_classes < 1 or in_channels < 1 or resolution < 1:
        raise ValueError(f"num_classes, in_channels and resolution must be positive; got "
                         f"{num_classes}, {in_channels}, {resolution}")
    if is_zoo_name(name):
        return build_zoo_model(name, num_classes=num_classes, in_channels=in_channels, resolution=resolution,
                               **options)
    fn = MODELS[name]
    return fn(num_classes=num_classes, in_channels=in_channels, resolution=resolution, **options)


def check_model_name(name: str) -> None:
    """Refuse a name that is neither registered nor a zoo model of its library (``ValueError``, one line)."""
    if is_zoo_name(name):
        check_zoo_options(name, {})
    elif name not in MODELS:
        zoo = [f"{library}:{name}" for library in ("torchvision", "timm") if _zoo_has(library, name)]
        raise ValueError(f"must be one of {available_models()} or a zoo name, torchvision:<name> or timm:<name>"
                         + (f" (e.g. {' or '.join(zoo)})" if zoo else ""))


def _zoo_has(library: str, name: str) -> bool:
    try:
        check_zoo_options(f"{library}:{name}", {})
    except ValueError:
        return False
    return True


# the registered models that are torchvision's architectures: their own normalisation is torchvision's
_TORCHVISION_REGISTERED = ("resnet18", "resnet50", "mobilenet_v2", "densenet121")


def model_normalization(name: str) -> tuple[list[float], list[float], str]:
    """The model's own input normalisation ``(mean, std, source)`` (``teacher.normalization: model``): a zoo
    model's (:func:`unidd_ray.models.zoo.zoo_normalization`), torchvision's for the registered torchvision
    architectures; ``ValueError`` for a model without one (``convnet``)."""
    if name in _TORCHVISION_REGISTERED:
        return zoo_normalization(f"torchvision:{name}")
    if not is_zoo_name(name):
        raise ValueError(f"{name!r} has no normalisation of its own (only torchvision: and timm: models and "
                         f"{list(_TORCHVISION_REGISTERED)} do); use dataset or give {{mean, std}}")
    return zoo_normalization(name)


@register_model("convnet")
def _convnet(num_classes, in_channels, resolution, width: int = 128, depth: int = 3, norm: str = "batch"):
    return ConvNet(num_classes=num_classes, in_channels=in_channels, resolution=resolution, width=width,
                   depth=depth, norm=norm)


def _small_input(resolution: int, stem: str) -> bool:
    if stem not in ("auto", "cifar", "imagenet"):
        raise ValueError(f"stem must be 'auto', 'cifar' or 'imagenet', got {stem!r}")
    return stem == "cifar" or (stem == "auto" and resolution <= 32)


def _resnet(factory, num_classes, in_channels, resolution, stem):
    model = factory(num_classes=num_classes)
    if _small_input(resolution, stem):
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


@register_model("resnet18")
def _resnet18(num_classes, in_channels, resolution, stem: str = "auto"):
    from torchvision.models import resnet18  # lazy: torchvision loads only for the models that need it

    return _resnet(resnet18, num_classes, in_channels, resolution, stem)


@register_model("resnet50")
def _resnet50(num_classes, in_channels, resolution, stem: str = "auto"):
    from torchvision.models import resnet50  # lazy: torchvision loads only for the models that need it

    return _resnet(resnet50, num_classes, in_channels, resolution, stem)


@register_model("mobilenet_v2")
def _mobilenet_v2(num_classes, in_channels, resolution, width_mult: float = 1.0):
    from torchvision.models import mobilenet_v2  # lazy: torchvision loads only for the models that need it

    model = mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    first = model.features[0][0]
    stride = 1 if resolution <= 32 else 2
    model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride, 1, bias=False)
    return model


@register_model("densenet121")
def _densenet121(num_classes, in_channels, resolution):
    from torchvision.models import densenet121  # lazy: torchvision loads only for the models that need it

    model = densenet121(num_classes=num_classes)
    if resolution <= 32:
        model.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    elif in_channels != 3:
        model.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a state_dict saved in torchvision's format (``weights_only=True``: no pickle of code).

    A checkpoint holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped, and a
    ``module.`` prefix left by DistributedDataParallel is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report the file, whatever the reason
        raise ValueError(f"cannot read weights from {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # shapes first: load_state_dict raises a RuntimeError on a shape mismatch even with strict=False
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and hasattr(v, "shape") and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"weights in {path} have other shapes than the model (file vs model): {mismatched[:5]}; "
                         "check the architecture and its options (width, depth, stem, number of classes)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"weights in {path} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
