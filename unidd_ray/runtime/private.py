"""Every use of a private Ray API in this project, each wrapped once, with the reason it is needed.

Ray 2.60 is pinned (pyproject.toml); a Ray upgrade checks this module first.
"""

from __future__ import annotations

import contextlib
import os

from ray._private import ray_constants
# Ray Train's torch backend and the helpers it forms a process group with: the file rendezvous
# (unidd_ray.runtime.rendezvous) is that backend with one step replaced, and there is no public way to replace it.
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import _set_torch_distributed_env_vars as set_torch_distributed_env_vars
from ray.train.torch.config import _setup_torch_process_group as setup_torch_process_group
from ray.train.torch.config import _TorchBackend as TorchBackend

__all__ = ["TorchBackend", "V1WorkerGroup", "set_torch_distributed_env_vars", "setup_torch_process_group",
           "single_machine_mode"]

# Ray turns a loopback node address into the machine's network address so that other nodes could join, unless
# its multi-node mode is off; each Ray process reads this variable when it imports Ray.
CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def single_machine_mode():
    """Within the block, Ray keeps a loopback node address (multi-node mode off) in this process and in the
    processes it starts (GCS, raylet; the raylet's agents and workers inherit its environment); both settings
    are restored afterwards, so a later connection to a cluster from this process is unaffected.

    Private: ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` is read when Ray is imported, and this process
    may have imported Ray already, so the environment variable alone would come too late for it.
    """
    saved_env, saved_mode = os.environ.get(CLUSTER_MODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_MODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_mode
        if saved_env is None:
            os.environ.pop(CLUSTER_MODE_ENV, None)
        else:
            os.environ[CLUSTER_MODE_ENV] = saved_env
