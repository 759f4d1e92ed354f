"""Reader of the IDX format used by MNIST and Fashion-MNIST (optionally gzip-compressed).

Layout: two zero bytes, a type byte (``0x08`` = unsigned byte, the only type these datasets use),
the number of dimensions ``d``, then ``d`` big-endian uint32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from unidd_ray.data.source_types import SourceError

_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` is decompressed) into a uint8 array.

    Raises :class:`~unidd_ray.data.source_types.SourceError` (a ``ValueError``) naming the file
    when it is truncated, not gzip, or not IDX.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise SourceError(f"{path} is truncated or corrupt ({exc}); download or reinstall the file") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SourceError(f"{path} is not an IDX file (bad magic number); check that it is the right file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _UBYTE:
        raise SourceError(f"{path}: IDX element type 0x{dtype_code:02x} is not supported (only unsigned bytes, "
                          "0x08)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceError(f"{path} is truncated: its IDX header is incomplete")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise SourceError(f"{path} is truncated or corrupt: the header announces shape {shape} "
                          f"({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
