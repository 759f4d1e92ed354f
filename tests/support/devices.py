"""Device explicitness checks: the tensor factories called without ``device=`` and the devices of the tensors
made, recorded while a stage's device logic runs with the device passed explicitly (on the CPU here; on CUDA
a factory without ``device=`` would silently make a CPU tensor)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.eye, torch.tensor,
              torch.linspace, torch.rand, torch.randn, torch.randint, torch.zeros_like, torch.ones_like}


class Factories(TorchFunctionMode):
    """Records the tensor factories called without ``device=`` (they would land on the CPU under CUDA).
    ``ours_only``: only the calls made by this package's code (``file:line`` of the call), not torch's own (its
    optimisers keep their step counts on the CPU by design)."""

    def __init__(self, ours_only: bool = False):
        super().__init__()
        self.missing = []
        self.ours_only = ours_only

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
            frame = frame.f_back
        if frame is None or f"{os.sep}unidd_ray{os.sep}" not in frame.f_code.co_filename:
            return None
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"

    def _missing(self, name: str) -> None:
        if not self.ours_only:
            self.missing.append(name)
        elif (where := self._caller()) is not None:
            self.missing.append(f"{name} at {where}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs and not func.__name__.endswith("_like"):
            self._missing(func.__name__)
        if func is torch.as_tensor and "device" not in kwargs and not isinstance(args[0], torch.Tensor):
            self._missing("as_tensor")
        return func(*args, **kwargs)


class Devices(TorchDispatchMode):
    """Records the device of every tensor every aten op returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device)
        return out
