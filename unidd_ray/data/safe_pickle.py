"""Loading user-supplied pickles (the CIFAR python batches) without running their code.

A pickle can name any importable callable and have it called while loading, so an untrusted file
could run arbitrary code under ``pickle.load``.  :func:`load_restricted_pickle` resolves only the
few globals that dicts of lists, bytes and numpy arrays need -- numpy's array reconstruction
helpers, ``numpy.ndarray``, ``numpy.dtype`` and a latin-1-only stand-in for ``_codecs.encode``
(protocol 2 stores Python 3 ``bytes`` through it) -- and refuses everything else.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from unidd_ray.data.source_types import SourceError

_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core to numpy._core
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (it could run code)."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What protocol-2 pickles call to rebuild ``bytes``; only the latin-1 round trip is allowed."""
    if encoding.replace("-", "").lower() != "latin1":
        raise ForbiddenGlobal(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_global(module: str, name: str):
    if module in _NUMPY_MODULES and name in ("_reconstruct", "scalar"):
        return getattr(_CORE.multiarray, name)
    if module in _NUMERIC_MODULES and name == "_frombuffer":
        return _CORE.numeric._frombuffer
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _allowed_global(module, name)
        if found is None:
            raise ForbiddenGlobal(f"refusing to load {module}.{name}: only numpy arrays and plain data are allowed")
        return found


def load_restricted_pickle(path: str | Path):
    """Unpickle ``path`` (Python 2 pickles included) allowing only data globals.

    Byte strings of Python 2 pickles stay ``bytes`` (``encoding='bytes'``), so dict keys may be
    ``bytes``.  Raises :class:`~unidd_ray.data.source_types.SourceError` (a ``ValueError``) naming
    the file when it is truncated, corrupt, or names a global outside the allow-list.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except ForbiddenGlobal as exc:
        raise SourceError(f"{path} cannot be loaded safely ({exc}); only pickles of dicts, lists, bytes and numpy "
                          "arrays (the official CIFAR python format) are accepted") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError) as exc:
        raise SourceError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); download the "
                          "python version of the dataset again") from exc
