"""Loading user-supplied pickles (the CIFAR python batches) without running their code.

A pickle can name any importable callable and have it called while loading, so an untrusted file
could run arbitrary code under ``pickle.load``.  :func:`load_restricted_pickle` resolves only the
few globals that dicts of lists, bytes and numpy arrays need -- numpy's array reconstruction
helpers, ``numpy.ndarray``, ``numpy.dtype`` and a latin-1-only stand-in for ``_codecs.encode``
(protocol 2 stores Python 3 ``bytes`` through it) -- and refuses everything else.

Allowed globals are not enough on their own: the ``BUILD`` opcode hands an arbitrary state to an
object's ``__setstate__``, and a ``numpy.dtype`` state carries the dtype's internal ``flags``.  A
pickle could declare an object dtype whose flags say it holds no Python objects, after which numpy
reads raw file bytes as object pointers.  So the loader runs on the pure-Python unpickler, whose
opcode table can be extended, and checks every ``BUILD``: only numpy dtypes and arrays may receive
a state; a dtype's state must be exactly the one numpy writes for a boolean, numeric or string
dtype of that byte order, and an array's state must name such a dtype.  The dtype-taking helpers
(``numpy.dtype``, ``_reconstruct``, ``_frombuffer``, ``scalar``) refuse object, void, structured and
datetime dtypes as well.
"""

from __future__ import annotations

import io
import pickle
import reprlib
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np

from unidd_ray.data.source_types import SourceError

_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core to numpy._core
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_ALLOWED_KINDS = "biufcSU"  # booleans, integers, floats, complex numbers, byte and unicode strings
_BYTE_ORDERS = ("<", ">", "|")  # what numpy writes into a dtype's state ("=" is written as "<" or ">")


class Forbidden(pickle.UnpicklingError):
    """The pickle asks for something outside the allow-list (it could run code or forge pointers)."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What protocol-2 pickles call to rebuild ``bytes``; only the latin-1 round trip is allowed."""
    if encoding.replace("-", "").lower() != "latin1":
        raise Forbidden(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _check_dtype(dtype, what: str) -> np.dtype:
    """``dtype`` when it is a plain boolean, numeric or string dtype; :class:`Forbidden` otherwise."""
    if not isinstance(dtype, np.dtype):
        raise Forbidden(f"refusing {what} with a {type(dtype).__name__} where a numpy dtype belongs")
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise Forbidden(f"refusing {what} with dtype {dtype.str!r} (kind {dtype.kind!r}): only boolean, numeric and "
                        "string dtypes are allowed")
    return dtype


def _dtype(spec, align=False, copy=False) -> np.dtype:
    if not isinstance(spec, (str, bytes)):
        raise Forbidden(f"refusing numpy.dtype of a {type(spec).__name__}: only type strings such as 'u1' are allowed")
    return _check_dtype(np.dtype(spec, align, copy), "numpy.dtype")


def _reconstruct(subtype, shape, typecode):
    _check_dtype(np.dtype(typecode), "numpy array reconstruction")
    return _CORE.multiarray._reconstruct(subtype, shape, typecode)


def _frombuffer(buf, dtype, shape, order):
    _check_dtype(np.dtype(dtype), "numpy array from a buffer")
    return _CORE.numeric._frombuffer(buf, dtype, shape, order)


def _scalar(dtype, *args):
    _check_dtype(dtype, "numpy scalar")
    return _CORE.multiarray.scalar(dtype, *args)


def _allowed_global(module: str, name: str):
    if module in _NUMPY_MODULES and name == "_reconstruct":
        return _reconstruct
    if module in _NUMPY_MODULES and name == "scalar":
        return _scalar
    if module in _NUMERIC_MODULES and name == "_frombuffer":
        return _frombuffer
    if module == "numpy" and name == "ndarray":
        return np.ndarray
    if module == "numpy" and name == "dtype":
        return _dtype
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    return None


def _dtype_state(dtype: np.dtype, state) -> tuple:
    """The state numpy itself writes for ``dtype`` in the byte order of ``state``, when ``state`` is exactly it.

    Python 2 pickles carry the byte order as ``bytes`` (``encoding='bytes'``); it is compared as text.
    """
    _check_dtype(dtype, "a numpy dtype state")
    if not isinstance(state, tuple) or len(state) < 2:
        raise Forbidden(f"refusing the state {reprlib.repr(state)} of numpy dtype {dtype.str!r}: not a dtype state")
    order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
    if order not in _BYTE_ORDERS:
        raise Forbidden(f"refusing the state {reprlib.repr(state)} of numpy dtype {dtype.str!r}: byte order "
                        f"{order!r} is none of {list(_BYTE_ORDERS)}")
    canonical = dtype.newbyteorder(order).__reduce__()[2]
    given = (state[0], order, *state[2:])
    plain = all(value is None or type(value) in (int, str) for value in given)
    if not plain or given != canonical:
        raise Forbidden(f"refusing the state {reprlib.repr(state)} of numpy dtype {dtype.str!r}: numpy writes "
                        f"{canonical!r} for it (a forged state can turn file bytes into object pointers)")
    return canonical


def _check_array_state(state) -> None:
    """An array state is ``([version,] shape, dtype, is_fortran, data)``; its dtype must pass :func:`_check_dtype`."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise Forbidden(f"refusing the state {reprlib.repr(state)} of a numpy array: not an array state")
    _check_dtype(state[-3], "a numpy array state")


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with the allow-list of globals and a checked ``BUILD`` opcode."""

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        found = _allowed_global(module, name)
        if found is None:
            raise Forbidden(f"refusing to load {module}.{name}: only numpy arrays and plain data are allowed")
        return found

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.dtype):
            self.stack[-1] = _dtype_state(inst, state)
        elif isinstance(inst, np.ndarray):
            _check_array_state(state)
        else:
            raise Forbidden(f"refusing to set the state of a {type(inst).__name__}: only numpy dtypes and arrays are "
                            "rebuilt from a state")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def load_restricted_pickle(path: str | Path):
    """Unpickle ``path`` (Python 2 pickles included) allowing only data globals.

    Byte strings of Python 2 pickles stay ``bytes`` (``encoding='bytes'``), so dict keys may be
    ``bytes``.  Raises :class:`~unidd_ray.data.source_types.SourceError` (a ``ValueError``) naming
    the file when it is truncated, corrupt, names a global outside the allow-list, or gives a numpy
    dtype or array a state that numpy would not write for plain data.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Forbidden as exc:
        raise SourceError(f"{path} cannot be loaded safely ({exc}); only pickles of dicts, lists, bytes and numpy "
                          "arrays (the official CIFAR python format) are accepted") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, struct.error) as exc:  # the pure-Python unpickler reports short reads via struct
        raise SourceError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); download the "
                          "python version of the dataset again") from exc
