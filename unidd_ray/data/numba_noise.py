"""Silence one known, harmless message: numba dispatcher finalizers raising ``KeyError`` at exit.

FFCV compiles a fresh numba dispatcher for every loader; when the interpreter shuts down, numba's
weakref finalizers for those dispatchers may look up overloads that are already gone and report
``Exception ignored in: <finalize object ...> KeyError: (Array(uint8, ...), ...)``.  Nothing is
lost.  :func:`install` wraps ``sys.unraisablehook`` so that exactly this case (a ``KeyError`` raised
by ``numba/core/dispatcher.py``'s ``finalizer``) is dropped; everything else reaches the previous hook.
"""

from __future__ import annotations

import sys
import traceback

_installed = False


def _is_numba_finalizer_keyerror(unraisable) -> bool:
    if unraisable.exc_type is not KeyError or unraisable.exc_traceback is None:
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return bool(frames) and frames[-1].name == "finalizer" and \
        frames[-1].filename.replace("\\", "/").endswith("numba/core/dispatcher.py")


def install() -> None:
    """Install the filter once per process (idempotent)."""
    global _installed
    if _installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_numba_finalizer_keyerror(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    _installed = True
