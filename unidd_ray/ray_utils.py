"""Connecting to Ray: an embedded local instance by default, a cluster through ``RAY_ADDRESS``.

The embedded instance is a one-machine cluster on 127.0.0.1: every server of it
(GCS, raylet, object manager, workers, dashboard and runtime-env agents) listens
on the loopback interface only; Ray Train worker groups on one node (on any
cluster) form their torch process group through a file (:func:`torch_config`),
not a TCP store.

Every worker process runs :func:`setup_worker` before user code
(``worker_process_setup_hook``): the torchvision import fix, so tasks and actors
may import torchvision directly, and on the embedded instance a quieter Ray Train
placement-group cleaner (see there).
"""

from __future__ import annotations

import contextlib
import logging
import os

SETUP_HOOK = "unidd_ray.ray_utils.setup_worker"
EMBEDDED_ENV = "UNIDD_RAY_EMBEDDED"  # set in the workers of an embedded instance
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_EMBEDDED = False  # this process started its own local Ray, which cannot grow
LOOPBACK = "127.0.0.1"
# Ray turns a loopback node address into the machine's network address so that other nodes could join,
# unless its multi-node mode is off; each Ray process reads this variable when it imports Ray
_CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# the environment another process of this machine needs to join an embedded instance (by the 127.0.0.1 address
# of ``ray.get_runtime_context().gcs_address``): it connects as a loopback node too
JOIN_EMBEDDED_ENV = {_CLUSTER_MODE_ENV: "0"}

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
        kwargs.update(include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address=LOOPBACK)
        kwargs["runtime_env"]["env_vars"] = {EMBEDDED_ENV: "1"}
        with _single_machine():
            ray.init(address=address, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    global _EMBEDDED
    _EMBEDDED = address == "local"


@contextlib.contextmanager
def _single_machine():
    """Within the block, Ray keeps a loopback node address (multi-node mode off) in this process and in the
    processes it starts (GCS, raylet; the raylet's agents and workers inherit its environment); both
    settings are restored afterwards, so a later connection to a cluster from this process is unaffected."""
    from ray._private import ray_constants

    saved_env, saved_mode = os.environ.get(_CLUSTER_MODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_MODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: this process may have imported Ray already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_mode
        if saved_env is None:
            os.environ.pop(_CLUSTER_MODE_ENV, None)
        else:
            os.environ[_CLUSTER_MODE_ENV] = saved_env


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


def torch_config(use_gpu: bool):
    """The ``TorchConfig`` of this project's Ray Train runs: gloo on CPUs, NCCL on GPUs, and a worker group
    on one node forms its process group through a file (:mod:`unidd_ray.rendezvous`): Ray's default
    rendezvous starts a TCP store on worker 0 that listens on every interface of the machine."""
    from unidd_ray.rendezvous import FileRendezvousTorchConfig

    return FileRendezvousTorchConfig(backend="nccl" if use_gpu else "gloo")
