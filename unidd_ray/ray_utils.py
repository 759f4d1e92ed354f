"""Connecting to Ray: an embedded local instance by default, a cluster through ``RAY_ADDRESS``.

Every worker process runs the torchvision import fix before user code
(``worker_process_setup_hook``), so tasks and actors may import torchvision
directly.
"""

from __future__ import annotations

import logging
import os

SETUP_HOOK = "unidd_ray._torchvision_fix.apply"


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             quiet: bool = True) -> None:
    """Start or join Ray once per process.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; without either an
    embedded local Ray is started with the machine's resources (or ``num_cpus``).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {
        "runtime_env": {"worker_process_setup_hook": SETUP_HOOK},
        "logging_level": logging.WARNING if quiet else logging.INFO,
        "configure_logging": True,
    }
    if address is None:
        # "local" always starts a fresh embedded instance: a bare ray.init() would join whatever
        # cluster an earlier `ray start` on this machine recorded.
        address = "local"
        kwargs.update(include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus)
    ray.init(address=address, **kwargs)


def cluster_resources() -> dict:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
