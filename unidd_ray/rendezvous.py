"""Ray Train's torch process group for workers on one machine, formed through a file instead of a TCP store.

Ray's torch backend has worker 0 host a ``TCPStore`` for the rendezvous, and torch binds that store to
every interface of the machine (``::``), whatever address the node has.  The embedded instance keeps
every listener on 127.0.0.1, so its runs rendezvous through torch's ``FileStore`` in a fresh private
folder; gloo's own sockets bind to the node's loopback address.  Only for workers that share a file
system: :func:`unidd_ray.ray_utils.torch_config` picks it on the embedded instance only.

This module subclasses Ray Train's torch backend (``ray.train.torch.config._TorchBackend``) and calls
its process-group helpers; ``tests/test_storage.py`` checks the listeners of a two-worker run.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend


class FileRendezvousBackend(_TorchBackend):
    """Ray's torch backend with the rendezvous store in a file: one fresh folder per worker-group start
    (a restarted group must not read the last group's keys), all removed at shutdown."""

    def __init__(self):
        self._folders: list[Path] = []

    def on_start(self, worker_group, backend_config: TorchConfig):
        folder = Path(tempfile.mkdtemp(prefix="unidd-ray-rendezvous-"))
        self._folders.append(folder)
        if not isinstance(worker_group, V1WorkerGroup):  # Ray Train v2 sets these before the group forms
            worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(
            rank, _setup_torch_process_group, backend=backend_config.backend, world_rank=rank, world_size=n,
            init_method=(folder / "store").as_uri(), timeout_s=backend_config.timeout_s) for rank in range(n)])

    def on_shutdown(self, worker_group, backend_config: TorchConfig):
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            for folder in self._folders:
                shutil.rmtree(folder, ignore_errors=True)
            self._folders.clear()


@dataclass
class SingleHostTorchConfig(TorchConfig):
    """``TorchConfig`` for worker groups that run on this machine; ``backend`` must be given (gloo or nccl)."""

    def __post_init__(self):
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"SingleHostTorchConfig needs backend 'gloo' or 'nccl', got {self.backend!r}")

    @property
    def backend_cls(self):
        return FileRendezvousBackend
