"""Ray Train's torch process group formed through a file and loopback sockets when its workers share a machine.

Ray's torch backend has worker 0 host a ``TCPStore`` for the rendezvous, and torch binds that store to
every interface of the machine (``::``), whatever address the node has; gloo then binds its own sockets
to the address the host name resolves to.  A one-machine run (the embedded instance, a single-node
cluster, ``ray job submit`` to a workstation) would listen on the network for its whole length.  A
worker group whose workers are all on one machine meets through torch's ``FileStore`` in a fresh private
folder made by worker 0 instead, and its gloo and NCCL sockets are bound to the loopback interface
(``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, unless already set).  "One machine" is one host name and
boot id, whichever Ray nodes of it the workers are on (several raylets may share a machine:
``ray.cluster_utils.Cluster``, one node per GPU), and every worker must see worker 0's folder; a group spread
over several machines keeps Ray's TCP rendezvous and the interfaces the libraries choose.

This module subclasses Ray Train's torch backend and calls its process-group helpers (private names, taken
from :mod:`unidd_ray.runtime.private`); ``tests/runtime/test_rendezvous.py`` checks the listeners of a
two-worker run.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train.torch import TorchConfig

from unidd_ray.runtime.private import (TorchBackend, V1WorkerGroup, set_torch_distributed_env_vars,
                                       setup_torch_process_group)

PREFIX = "unidd-ray-rendezvous-"
REMOVE_TIMEOUT_S = 30  # Ray may give up on a hung process-group shutdown; the folder's removal queues behind it
ABANDONED_AFTER_S = 3600  # an empty rendezvous folder this old belongs to no live group (see _sweep_abandoned)


def _host() -> tuple[str, str]:
    """The machine this worker runs on: its host name and the kernel's boot id.  Several Ray nodes may share
    one machine (``ray.cluster_utils.Cluster``, a node per GPU); a worker group on one machine can meet
    through a file whichever of its nodes each worker is on."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return socket.gethostname(), boot


def _sees(folder: str) -> bool:
    return os.path.isdir(folder)


def _bind_to_loopback() -> str | None:
    """Have gloo and NCCL bind this worker's sockets to the loopback interface (its peers are on this machine);
    returns the interface gloo will use."""
    names = {name for _, name in socket.if_nameindex()}
    loopback = next((name for name in ("lo", "lo0") if name in names), None)
    if loopback is not None:
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, loopback)
    return os.environ.get("GLOO_SOCKET_IFNAME")


def _owner_gone(name: str) -> bool:
    """Whether the process that made the rendezvous folder ``name`` (its pid follows the prefix) has exited.
    A pid taken again by another process only keeps a dead folder; it never gets a live one removed."""
    pid = name[len(PREFIX):].split("-", 1)[0]
    if not pid.isdigit():
        return False  # made before the pid was part of the name: judged by emptiness and age alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive under another user, or not ours to probe
        return False
    return False


def _sweep_abandoned(parent: str, now: float) -> None:
    """Remove the rendezvous folders in ``parent`` that a run stopped before its shutdown (Ctrl-C, a killed
    driver or worker) left behind: those whose maker, the group's worker 0, has exited, and empty ones not
    touched for ``ABANDONED_AFTER_S``.  Worker 0 lives as long as its group, and a live group's folder holds
    torch's store file from the moment the group forms, seconds after the folder is made."""
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(PREFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if _owner_gone(entry.name):
                shutil.rmtree(entry.path)
            elif now - entry.stat(follow_symlinks=False).st_mtime > ABANDONED_AFTER_S:
                os.rmdir(entry.path)  # removes nothing that is not empty
        except OSError:  # not empty, not ours, or removed by another worker meanwhile
            continue


def _make_folder() -> str:
    parent = tempfile.gettempdir()
    _sweep_abandoned(parent, time.time())
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)


def _remove_folder(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class FileRendezvousBackend(TorchBackend):
    """Ray's torch backend, with the rendezvous store in a file when the workers share a machine: one fresh
    folder per worker-group start (a restarted group must not read the last group's keys), removed at
    shutdown; one a stopped run left behind is removed by a later start on that node."""

    def __init__(self):
        self._folders: list[str] = []

    def on_start(self, worker_group, backend_config: TorchConfig):
        if len(set(worker_group.execute(_host))) > 1:
            return super().on_start(worker_group, backend_config)  # several machines: Ray's TCP store
        folder = worker_group.execute_single(0, _make_folder)
        if not all(worker_group.execute(_sees, folder)):  # one machine, but not one temporary folder (containers)
            worker_group.execute_single(0, _remove_folder, folder)
            return super().on_start(worker_group, backend_config)
        self._folders.append(folder)
        worker_group.execute(_bind_to_loopback)
        if not isinstance(worker_group, V1WorkerGroup):  # Ray Train v2 sets these before the group forms
            worker_group.execute(set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(
            rank, setup_torch_process_group, backend=backend_config.backend, world_rank=rank, world_size=n,
            init_method=f"file://{folder}/store", timeout_s=backend_config.timeout_s) for rank in range(n)])

    def on_shutdown(self, worker_group, backend_config: TorchConfig):
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            kept = []
            for folder in self._folders:
                try:  # on the node of the group's worker 0; a dead or hung worker keeps it for the next shutdown
                    ray.get(worker_group.execute_single_async(0, _remove_folder, folder), timeout=REMOVE_TIMEOUT_S)
                except Exception:  # noqa: BLE001 - an empty folder (or a store file) left in a temp directory
                    kept.append(folder)
            self._folders = kept


@dataclass
class FileRendezvousTorchConfig(TorchConfig):
    """``TorchConfig`` whose worker groups on one machine rendezvous through a file; ``backend``: gloo or nccl."""

    def __post_init__(self):
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"FileRendezvousTorchConfig needs backend 'gloo' or 'nccl', got {self.backend!r}")

    @property
    def backend_cls(self):
        return FileRendezvousBackend
