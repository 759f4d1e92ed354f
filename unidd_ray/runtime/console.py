"""The terminal: the commands' own lines and progress bars there, Ray's own output in a log file.

Ray writes to the driver's standard output and error from several places: the lines of its processes (workers,
the Ray Train controller) forwarded to the driver, its Python warnings, and the C++ logs of the driver's own
Ray core.  :func:`send_output_to` points the process's file descriptors 1 and 2 (and so all of these) at a log
file, and keeps a copy of the terminal for :func:`say`, :func:`show` and :func:`progress`, which every command
uses for what it has to say.  :func:`restore` points them back (the CLI calls it before it reports an error, so
that a traceback reaches the terminal).  Without :func:`send_output_to` (``-v``, or library use) everything goes
to the terminal as usual.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

_saved: dict | None = None  # the terminal's descriptors and Python streams while output goes to a log file
_lock = threading.Lock()


def _terminal(name: str):
    """The stream the terminal is on: the saved copy while output goes to a log file, else sys.<name>."""
    saved = _saved
    return saved[name] if saved is not None else getattr(sys, name)


def say(message: str) -> None:
    """One line of the command's own on the terminal."""
    stream = _terminal("stdout")
    with _lock:
        stream.write(message + "\n")
        stream.flush()


def show(text: str) -> None:
    """A block of text (a table) on the terminal."""
    say(text.rstrip("\n"))


def warn(message: str) -> None:
    """A line on the terminal's error stream (an error, a warning the user must see)."""
    stream = _terminal("stderr")
    with _lock:
        stream.write(message + "\n")
        stream.flush()


def log_file() -> Path | None:
    """Where Ray's own output goes now (None: to the terminal)."""
    return _saved["path"] if _saved is not None else None


def send_output_to(path: str | Path) -> Path:
    """Point file descriptors 1 and 2 of this process, and the ``ray`` loggers, at ``path`` (appended to); the
    terminal stays reachable through this module.  A second call keeps the first file."""
    global _saved
    if _saved is not None:
        return _saved["path"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_fds = {1: os.dup(1), 2: os.dup(2)}
    terminal = {"stdout": io.TextIOWrapper(os.fdopen(os.dup(saved_fds[1]), "wb", buffering=0), line_buffering=True,
                                           write_through=True),
                "stderr": io.TextIOWrapper(os.fdopen(os.dup(saved_fds[2]), "wb", buffering=0), line_buffering=True,
                                           write_through=True)}
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger = logging.getLogger("ray")
    _saved = {"path": path, "fds": saved_fds, "handler": handler, **terminal,
              "ray_handlers": list(ray_logger.handlers), "ray_propagate": ray_logger.propagate}
    ray_logger.handlers = [handler]
    ray_logger.propagate = False
    return path


def restore() -> None:
    """Point file descriptors 1 and 2 and the ``ray`` loggers back at the terminal (a no-op when they are)."""
    global _saved
    saved = _saved
    if saved is None:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.dup2(saved["fds"][1], 1)
    os.dup2(saved["fds"][2], 2)
    for fd in saved["fds"].values():
        os.close(fd)
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers = saved["ray_handlers"]
    ray_logger.propagate = saved["ray_propagate"]
    saved["handler"].close()
    _saved = None


def progress(total: int, description: str, *, unit: str = "it", position: int | None = None) -> tqdm:
    """A progress bar with an ETA on the terminal (``TQDM_DISABLE=1`` turns bars off)."""
    return tqdm(total=total, desc=description, unit=unit, file=_terminal("stderr"), position=position,
                dynamic_ncols=True, leave=True, mininterval=1.0)


@contextlib.contextmanager
def watch(count: Callable[[], int], total: int, description: str, *, unit: str = "it", every: float = 1.0,
          enabled: bool = True) -> Iterator[None]:
    """A progress bar for work done elsewhere (Ray workers) that leaves a trace the driver can count: a thread
    calls ``count()`` every ``every`` seconds while the block runs, and once more at its end (no bar, and no
    thread, when not ``enabled``)."""
    if not enabled:
        yield
        return
    bar = progress(total, description, unit=unit)
    stop = threading.Event()

    def update() -> None:
        with contextlib.suppress(Exception):  # a count read while files are being written: the next read catches up
            done = min(total, count())
            if done > bar.n:
                bar.update(done - bar.n)

    def poll() -> None:
        while not stop.wait(every):
            update()

    thread = threading.Thread(target=poll, daemon=True, name=f"progress {description}")
    thread.start()
    started = time.monotonic()
    try:
        yield
        update()
    finally:
        stop.set()
        thread.join(timeout=every + 1)
        bar.set_postfix_str(f"{time.monotonic() - started:.0f}s")
        bar.close()
