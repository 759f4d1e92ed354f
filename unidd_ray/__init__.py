"""unidd_ray: Ray-distributed dataset distillation by spectral filtering (UniDD + CFM).

Importing the package first makes ``import torchvision`` work beside the CPU
build of torch (see :mod:`unidd_ray._torchvision_fix`).  The spectral math lives
in :mod:`unidd_ray.spectral` and imports neither Ray nor any file I/O.
"""

from __future__ import annotations

from unidd_ray import _torchvision_fix

_torchvision_fix.apply()

__version__ = "0.1.0"

__all__ = ["__version__"]
