"""One writer per output: an exclusive lock beside each output directory a command writes.

:func:`output_lock` holds ``.<name>.lock`` next to ``<name>`` (not inside it: stage outputs are
replaced as a whole by a rename, and the lock must outlive that).  The lock is an ``flock`` on the
file, so it is released by the kernel when its holder exits, however it exits (``SIGKILL``
included): a crashed run never leaves a stale lock behind.  The file records who holds it (pid,
host, command, start time), which is what a second command reports before it exits -- or, with
``wait=True``, waits for the lock instead.  The holder removes the file when it lets go.

``flock`` is honoured across the processes of one machine, and on NFSv4 and most cluster file
systems across machines too (Linux emulates it with POSIX record locks there).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class LockHeld(RuntimeError):
    """Another process holds the output's lock."""


def lock_path(output: str | Path) -> Path:
    """The lock file of ``output``: ``.<name>.lock`` beside it."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.lock"


def holder(path: str | Path) -> dict:
    """What the holder of the lock file ``path`` recorded (empty when nothing is recorded)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(record: dict) -> str:
    if not record:
        return "another process (it has not said which yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"`{record.get('command', '?')}` (pid {record.get('pid', '?')} on {record.get('host', '?')}, since {since})"


def _acquire(path: Path, block: bool) -> int | None:
    """An open descriptor of ``path`` holding its lock, or None when another process holds it (``block``
    False).  The file may be removed by its previous holder between our open and our lock: then the lock
    is on a file no longer at ``path``, and we try again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(output: str | Path, *, wait: bool = False, command: str | None = None,
                poll: float = 1.0, notify=None) -> Iterator[Path]:
    """Hold the lock of ``output`` for the block.

    Raises :class:`LockHeld` naming the holder and the fix when another process holds it, unless ``wait``:
    then polls every ``poll`` seconds until it is free (``notify(message)`` is called once, when the wait
    begins).  ``command``: what the record names as the holder (default: this process's command line).
    """
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, block=False)
    if fd is None:
        message = f"{output} is in use by {_describe(holder(path))}"
        if not wait:
            raise LockHeld(f"{message}; wait for it to finish, or pass --wait to start when it does")
        if notify is not None:
            notify(f"{message}; waiting for it to finish")
        while fd is None:
            time.sleep(poll)
            fd = _acquire(path, block=False)
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still ours: nobody else can hold it, and a waiter re-checks the inode
        os.close(fd)


def holds_output_lock(parameter: str = "out_dir"):
    """Decorate a stage function so that it holds the lock of the output its ``parameter`` names while it
    runs.  The decorated function takes one more keyword, ``wait`` (see :func:`output_lock`)."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, wait: bool = False, **kwargs):
            output = signature.bind_partial(*args, **kwargs).arguments[parameter]
            with output_lock(output, wait=wait):
                return fn(*args, **kwargs)

        return locked

    return decorate
