"""Connecting to Ray: an embedded local instance by default, a cluster through ``RAY_ADDRESS``.

Every worker process runs :func:`setup_worker` before user code
(``worker_process_setup_hook``): the torchvision import fix, so tasks and actors
may import torchvision directly, and on the embedded instance a quieter Ray Train
placement-group cleaner (see there).
"""

from __future__ import annotations

import logging
import os

SETUP_HOOK = "unidd_ray.ray_utils.setup_worker"
EMBEDDED_ENV = "UNIDD_RAY_EMBEDDED"  # set in the workers of an embedded instance
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_EMBEDDED = False  # this process started its own local Ray, which cannot grow

log = logging.getLogger(__name__)


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
        kwargs["runtime_env"]["env_vars"] = {EMBEDDED_ENV: "1"}
    ray.init(address=address, **kwargs)
    global _EMBEDDED
    _EMBEDDED = address == "local"


def setup_worker() -> None:
    """Runs in every Ray worker process before any task or actor code.

    On the embedded instance (started without the dashboard, so without the
    State API) Ray Train's placement-group cleaner cannot query its controller
    and warns about it every few seconds for the whole run — hundreds of
    identical lines in a pipeline's log; there its logger shows errors only.
    """
    from unidd_ray import _torchvision_fix

    _torchvision_fix.apply()
    if os.environ.get(EMBEDDED_ENV) == "1":
        logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)


def require_resources(what: str, *, workers: int, cpus: float, gpus: float = 0.0, fix: str | None = None) -> None:
    """Refuse (embedded Ray) or warn about (a cluster, which may scale up) a worker group larger than
    the cluster: Ray Train would otherwise wait for the resources forever without saying so."""
    import ray

    if not ray.is_initialized():  # Ray Train will start a local instance sized to the machine
        return
    have = ray.cluster_resources()
    need_cpu, need_gpu = workers * cpus, workers * gpus
    if need_cpu <= have.get("CPU", 0) + 1e-9 and need_gpu <= have.get("GPU", 0) + 1e-9:
        return
    msg = (f"{what} asks for {workers} worker(s) x {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
           + f" = {need_cpu:g} CPU" + (f", {need_gpu:g} GPU" if gpus else "")
           + f", but the Ray cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU; "
           + (fix or f"lower {what}.workers or {what}.cpus_per_worker"))
    if _EMBEDDED:
        raise ValueError(msg + " (this local Ray instance cannot grow)")
    log.warning(msg + "; waiting for the cluster to scale up")


def cluster_resources() -> dict:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
