"""Feature taps: forward pre-hooks that hand the *input* of chosen layers to a callback.

The default taps (SPEC §1.2) are the inputs of every ``Conv2d`` except the 1×1
down-sampling convolutions of residual shortcuts; ResNet-18 has 17 of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor, nn


def _is_shortcut(name: str, module: nn.Conv2d) -> bool:
    return module.kernel_size == (1, 1) and ("downsample" in name or "shortcut" in name)


def default_tap_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose inputs are tapped by default, in forward-definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and not _is_shortcut(name, m)]


def bn_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm2d modules (the SRe2L baseline matches their running statistics)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def resolve_layers(model: nn.Module, layers: list[str] | None) -> list[str]:
    """Validate requested tap names against the model; ``None`` means the default taps."""
    if layers is None:
        found = default_tap_layers(model)
        if not found:
            raise ValueError(f"{type(model).__name__} has no Conv2d layer to tap; pass the layers explicitly")
        return found
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(
            f"the model has no layers named {missing}; its default taps are {default_tap_layers(model)}"
        )
    return list(layers)


@contextmanager
def tapped(model: nn.Module, layers: list[str], callback: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Within the block, every forward pass calls ``callback(name, input)`` for each tapped layer."""
    modules = dict(model.named_modules())
    handles = []
    for name in layers:
        handles.append(modules[name].register_forward_pre_hook(lambda _m, args, _n=name: callback(_n, args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_channels(model: nn.Module, layers: list[str]) -> dict[str, int]:
    """Input channel count of each tapped layer (``in_channels``/``num_features`` of the module)."""
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        m = modules[name]
        channels = getattr(m, "in_channels", None) or getattr(m, "num_features", None)
        if channels is None:
            raise ValueError(f"cannot tell the input channels of layer {name!r} ({type(m).__name__})")
        out[name] = int(channels)
    return out
