"""Loading user-supplied pickles (the CIFAR python batches) without running their code.

A pickle can name any importable callable and have it called while loading, so an untrusted file
could run arbitrary code under ``pickle.load``.  :func:`load_restricted_pickle` parses the file on the
pure-Python unpickler, whose opcode table can be replaced, and lets a pickle build nothing but plain
data (dicts, lists, tuples, numbers, strings, bytes) and numpy arrays, dtypes and scalars of boolean,
numeric and string dtypes:

- Globals.  Only numpy's array reconstruction helpers (``_reconstruct``, ``_frombuffer``,
  ``scalar``), ``numpy.dtype`` and a latin-1-only stand-in for ``_codecs.encode`` (protocol 2 stores
  Python 3 ``bytes`` through it) resolve, each to a checking wrapper of this module.  The name
  ``numpy.ndarray`` resolves to a marker that only ``_reconstruct`` accepts, never to the class
  itself: ``ndarray(shape, dtype, buffer)`` would build an array over the file's bytes, an object
  array among them, whose "pointers" numpy would then follow.
- Calls.  ``REDUCE`` may call those wrappers and nothing else; the opcodes that instantiate classes
  (``NEWOBJ``, ``NEWOBJ_EX``, ``INST``, ``OBJ``) are refused outright, as are persistent ids.
- Arguments.  Every dtype a wrapper receives must be a plain boolean, numeric or string dtype
  (object, void, structured and datetime dtypes are refused); ``_reconstruct`` takes exactly the
  empty placeholder numpy writes, ``(ndarray, (0,), b'b')``; buffers must be ``bytes`` of exactly the
  size the shape and dtype need.
- States.  ``BUILD`` hands an arbitrary state to an object's ``__setstate__``, and a dtype's state
  carries numpy's internal ``flags``: a forged one could declare an object dtype as holding no
  objects.  So only numpy dtypes and arrays may receive a state; a dtype's state must be exactly the
  one numpy writes for that dtype and byte order, and an array's state must name a plain dtype,
  a shape of non-negative integers and a ``bytes`` payload of the matching size.

Anything else -- a forbidden global, a truncated or bit-flipped file -- is refused with a
:class:`~unidd_ray.data.source_types.SourceError` naming the file; no input makes the loader crash.
"""

from __future__ import annotations

import io
import math
import pickle
import reprlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from unidd_ray.data.source_types import SourceError

_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core to numpy._core
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_ALLOWED_KINDS = "biufcSU"  # booleans, integers, floats, complex numbers, byte and unicode strings
_BYTE_ORDERS = ("<", ">", "|")  # what numpy writes into a dtype's state ("=" is written as "<" or ">")
_MAX_ELEMENTS = 1 << 34  # no array of a CIFAR-like file comes near this; a flipped shape may


class Forbidden(pickle.UnpicklingError):
    """The pickle asks for something outside the allow-list (it could run code or forge pointers)."""


class _ArrayClass:
    """What the global ``numpy.ndarray`` resolves to: a name ``_reconstruct`` accepts, nothing to call."""

    def __repr__(self) -> str:
        return "numpy.ndarray (as a name only)"


_NDARRAY = _ArrayClass()


def _latin1_encode(text, encoding: str = "utf-8") -> bytes:
    """What protocol-2 pickles call to rebuild ``bytes``; only the latin-1 round trip of a str is allowed."""
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise Forbidden("refusing _codecs.encode of anything but a str and an encoding name")
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


def _dtype_of(spec, what: str) -> np.dtype:
    """A dtype from a type string (``'u1'``, ``b'<f8'``) or a dtype, checked with :func:`_check_dtype`."""
    if isinstance(spec, np.dtype):
        return _check_dtype(spec, what)
    if not isinstance(spec, (str, bytes)):
        raise Forbidden(f"refusing {what} with a {type(spec).__name__} as its dtype: only type strings such as "
                        "'u1' and plain dtypes are allowed")
    try:
        dtype = np.dtype(spec.decode("latin1") if isinstance(spec, bytes) else spec)
    except TypeError as exc:
        raise Forbidden(f"refusing {what} with dtype {spec!r}: {exc}") from None
    return _check_dtype(dtype, what)


def _check_shape(shape, what: str) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise Forbidden(f"refusing {what} with shape {reprlib.repr(shape)}: not a tuple of non-negative integers")
    if math.prod(shape) > _MAX_ELEMENTS:
        raise Forbidden(f"refusing {what} with shape {shape}: more than {_MAX_ELEMENTS} elements")
    return shape


def _check_payload(data, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    """``data`` must be the raw bytes of exactly ``shape`` elements of ``dtype``."""
    if type(data) not in (bytes, bytearray):
        raise Forbidden(f"refusing {what} whose data is a {type(data).__name__}, not bytes")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise Forbidden(f"refusing {what}: {len(data)} bytes of data for shape {shape} of {dtype.str!r} "
                        f"({expected} bytes)")


def _flag(value) -> bool:
    """A boolean as pickles write it: ``True``/``False``, or ``1``/``0`` from Python 2."""
    return type(value) in (bool, int) and value in (0, 1)


def _dtype(spec, align=False, copy=False) -> np.dtype:
    """A fresh copy of a plain dtype (numpy pickles write ``copy=True``: the ``BUILD`` that follows sets the
    byte order of this copy, where it would change numpy's shared instance of the dtype)."""
    if not isinstance(spec, (str, bytes)) or not _flag(align) or not _flag(copy) or not copy:
        raise Forbidden(f"refusing numpy.dtype{reprlib.repr((spec, align, copy))}: numpy writes a type string such "
                        "as 'u1' with copy=True")
    plain = _dtype_of(spec, "numpy.dtype")
    return np.dtype(plain, bool(align), True)


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise Forbidden(f"refusing numpy array reconstruction from {reprlib.repr((subtype, shape, typecode))}: "
                        "numpy writes (numpy.ndarray, (0,), b'b')")
    return _CORE.multiarray._reconstruct(np.ndarray, (0,), b"b")


def _frombuffer(buf, dtype, shape, order):
    dtype = _dtype_of(dtype, "numpy array from a buffer")
    shape = _check_shape(shape, "numpy array from a buffer")
    if order not in ("C", "F"):
        raise Forbidden(f"refusing numpy array from a buffer in order {order!r}")
    _check_payload(buf, shape, dtype, "numpy array from a buffer")
    return _CORE.numeric._frombuffer(bytes(buf), dtype, shape, order)


def _scalar(dtype, *args):
    dtype = _check_dtype(dtype, "numpy scalar")
    if len(args) != 1:
        raise Forbidden(f"refusing numpy scalar with {len(args)} arguments after its dtype")
    _check_payload(args[0], (), dtype, "numpy scalar")
    return _CORE.multiarray.scalar(dtype, bytes(args[0]))


_CALLABLES = frozenset({_reconstruct, _scalar, _frombuffer, _dtype, _latin1_encode})


def _allowed_global(module: str, name: str):
    if module in _NUMPY_MODULES and name == "_reconstruct":
        return _reconstruct
    if module in _NUMPY_MODULES and name == "scalar":
        return _scalar
    if module in _NUMERIC_MODULES and name == "_frombuffer":
        return _frombuffer
    if module == "numpy" and name == "ndarray":
        return _NDARRAY
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


def _check_array_state(array: np.ndarray, state) -> None:
    """An array state is ``([version,] shape, dtype, is_fortran, data)``: a placeholder from
    :func:`_reconstruct`, a plain dtype, a shape of non-negative integers and exactly its bytes."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise Forbidden(f"refusing the state {reprlib.repr(state)} of a numpy array: not an array state")
    if array.shape != (0,) or array.dtype != np.dtype("b"):
        raise Forbidden("refusing a second state for a numpy array that already holds data")
    if len(state) == 5 and state[0] != 1:
        raise Forbidden(f"refusing a numpy array state of version {reprlib.repr(state[0])}")
    shape, dtype, fortran, data = state[-4:]
    dtype = _check_dtype(dtype, "a numpy array state")
    shape = _check_shape(shape, "a numpy array state")
    if not _flag(fortran):
        raise Forbidden(f"refusing a numpy array state whose is_fortran is {reprlib.repr(fortran)}")
    _check_payload(data, shape, dtype, "a numpy array state")


def _refuse(opcode: str):
    def load(self):
        raise Forbidden(f"refusing the {opcode} opcode: it makes instances of classes")

    return load


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with the allow-list of globals, calls and states."""

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        found = _allowed_global(module, name)
        if found is None:
            raise Forbidden(f"refusing to load {module}.{name}: only numpy arrays and plain data are allowed")
        return found

    def persistent_load(self, pid):
        raise Forbidden("refusing a persistent id: the file refers to objects outside itself")

    def load_reduce(self):
        func = self.stack[-2]
        if not any(func is allowed for allowed in _CALLABLES):
            raise Forbidden(f"refusing to call {reprlib.repr(func)}: only numpy's array helpers may be called")
        if not isinstance(self.stack[-1], tuple):
            raise Forbidden("refusing a call whose arguments are not a tuple")
        super().load_reduce()

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.dtype):
            self.stack[-1] = _dtype_state(inst, state)
        elif isinstance(inst, np.ndarray):
            _check_array_state(inst, state)
        else:
            raise Forbidden(f"refusing to set the state of a {type(inst).__name__}: only numpy dtypes and arrays are "
                            "rebuilt from a state")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    for _name in ("NEWOBJ", "NEWOBJ_EX", "INST", "OBJ"):
        dispatch[getattr(pickle, _name)[0]] = _refuse(_name)
    del _name


def load_restricted_pickle(path: str | Path):
    """Unpickle ``path`` (Python 2 pickles included) allowing only plain data and numpy arrays.

    Byte strings of Python 2 pickles stay ``bytes`` (``encoding='bytes'``), so dict keys may be
    ``bytes``.  Raises :class:`~unidd_ray.data.source_types.SourceError` (a ``ValueError``) naming
    the file when it is truncated, corrupt, names a global outside the allow-list, calls anything
    but numpy's array helpers, or gives a numpy dtype or array a state that numpy would not write for
    plain data.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Forbidden as exc:
        raise SourceError(f"{path} cannot be loaded safely ({exc}); only pickles of dicts, lists, bytes and numpy "
                          "arrays (the official CIFAR python format) are accepted") from exc
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes is a corrupt file, not a bug
        raise SourceError(f"{path} is truncated or corrupt ({type(exc).__name__}: {reprlib.repr(str(exc))}); "
                          "download the python version of the dataset again") from exc
