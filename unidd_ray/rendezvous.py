"""Ray Train's torch process group formed through a file when its workers share a node.

Ray's torch backend has worker 0 host a ``TCPStore`` for the rendezvous, and torch binds that store to
every interface of the machine (``::``), whatever address the node has: a one-machine run (the embedded
instance, a single-node cluster, ``ray job submit`` to a workstation) would listen on the network for
its whole length.  A worker group whose workers are all on one node meets through torch's ``FileStore``
in a fresh private folder made by worker 0 instead (gloo's own sockets bind to the node's address, NCCL
uses its own transport); a group spread over several nodes keeps Ray's TCP rendezvous.

This module subclasses Ray Train's torch backend (``ray.train.torch.config._TorchBackend``) and calls
its process-group helpers; ``tests/test_storage.py`` checks the listeners of a two-worker run.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass

import ray
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

PREFIX = "unidd-ray-rendezvous-"


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _make_folder() -> str:
    return tempfile.mkdtemp(prefix=PREFIX)


def _remove_folder(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class FileRendezvousBackend(_TorchBackend):
    """Ray's torch backend, with the rendezvous store in a file when the workers share a node: one fresh
    folder per worker-group start (a restarted group must not read the last group's keys), removed at
    shutdown."""

    def __init__(self):
        self._folders: list[str] = []

    def on_start(self, worker_group, backend_config: TorchConfig):
        if len(set(worker_group.execute(_node_id))) > 1:
            return super().on_start(worker_group, backend_config)  # several machines: Ray's TCP store
        folder = worker_group.execute_single(0, _make_folder)
        self._folders.append(folder)
        if not isinstance(worker_group, V1WorkerGroup):  # Ray Train v2 sets these before the group forms
            worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(
            rank, _setup_torch_process_group, backend=backend_config.backend, world_rank=rank, world_size=n,
            init_method=f"file://{folder}/store", timeout_s=backend_config.timeout_s) for rank in range(n)])

    def on_shutdown(self, worker_group, backend_config: TorchConfig):
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            for folder in self._folders:
                try:  # on the node of the group's worker 0 (a restarted group may have moved: best effort)
                    worker_group.execute_single(0, _remove_folder, folder)
                except Exception:  # noqa: BLE001 - a dead worker leaves an empty folder in its node's temp dir
                    pass
            self._folders.clear()


@dataclass
class FileRendezvousTorchConfig(TorchConfig):
    """``TorchConfig`` whose worker groups on one node rendezvous through a file; ``backend``: gloo or nccl."""

    def __post_init__(self):
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"FileRendezvousTorchConfig needs backend 'gloo' or 'nccl', got {self.backend!r}")

    @property
    def backend_cls(self):
        return FileRendezvousBackend
