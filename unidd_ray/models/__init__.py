"""Teacher/student architectures and the feature taps."""

from unidd_ray.models.convnet import ConvNet
from unidd_ray.models.registry import (
    MODELS,
    available_models,
    build_model,
    check_model_name,
    check_model_options,
    load_weights,
    memory_format,
    model_normalization,
    register_model,
)
from unidd_ray.models.taps import bn_layers, default_tap_layers, layer_channels, resolve_layers, tapped

__all__ = [
    "MODELS",
    "ConvNet",
    "available_models",
    "bn_layers",
    "build_model",
    "check_model_name",
    "check_model_options",
    "default_tap_layers",
    "layer_channels",
    "load_weights",
    "memory_format",
    "model_normalization",
    "register_model",
    "resolve_layers",
    "tapped",
]
