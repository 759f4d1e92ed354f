"""Make ``import torchvision`` work beside the CPU build of torch.

The torchvision 0.28.0 wheel pinned next to torch 2.13.0 is a CUDA build whose
compiled ops (``torchvision/_C.so``) cannot load on the CPU torch.  torchvision
then registers fake kernels for ``torchvision::nms``/``qnms`` and fails because
the operator schemas were never defined.  Defining the two schemas first is
enough for models, transforms and datasets to import; the compiled detection
ops and ``torchvision.io`` decoders stay unavailable (the project uses PIL).

This module must not import torchvision itself.  It is applied by
``unidd_ray/__init__.py`` and, for Ray workers, by the worker setup hook.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library fragment alive for the process


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # torchvision absent: nothing to fix
    folder = os.path.dirname(spec.origin)
    candidates = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def _schema_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def apply() -> bool:
    """Define the missing operator schemas if needed; return True when a fix was applied."""
    global _library
    if _library is not None:
        return True
    if _compiled_ops_load():
        return False
    missing = [name for name in _SCHEMAS if not _schema_exists(name)]
    if not missing:
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])
    return True
