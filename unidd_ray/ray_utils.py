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
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

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
        _tidy_sessions()
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


# ----------------------------------------------------------------------------- what embedded instances leave
SESSION_MARK = "unidd_ray-driver.json"  # in the session folder of every embedded instance this project starts
KEEP_SESSIONS = 3  # folders of ended embedded instances kept for their logs (the newest); older ones are removed


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (None when there is no such process): with
    the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _tidy_sessions() -> None:
    """Mark this process's embedded instance as its own, then tidy what ended ones left (see
    :func:`sweep_sessions`).  Uses Ray's public runtime context for the folders."""
    import ray

    context = ray.get_runtime_context()
    temp = Path(context.get_temp_dir())
    session = temp / context.get_session_name()
    with contextlib.suppress(OSError):
        (session / SESSION_MARK).write_text(json.dumps({"pid": os.getpid(), "start": _process_start(os.getpid())}))
    sweep_sessions(temp, keep=KEEP_SESSIONS, current=session)


def _ended(session: Path) -> bool:
    """Whether ``session`` is the folder of an embedded instance this project started whose driver is gone."""
    try:
        mark = json.loads((session / SESSION_MARK).read_text())
    except (OSError, ValueError):
        return False  # not ours (another program's Ray, or a cluster's): left alone
    return _process_start(int(mark.get("pid", -1))) != mark.get("start")


def _holders(folder: Path) -> list[int]:
    """Ray's processes of this user with a file open under ``folder`` (its agents log there); a program that
    merely reads a log there (a ``tail -f``) is not one of them."""
    pids, prefix = [], str(folder) + os.sep
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if not (command.startswith(b"ray::") or b"/site-packages/ray/" in command):
                continue
            if any(os.readlink(fd).startswith(prefix) for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return pids


def sweep_sessions(temp: Path, *, keep: int = KEEP_SESSIONS, current: Path | None = None) -> list[Path]:
    """Tidy what ended embedded instances of this project left under Ray's temporary folder ``temp``: stop
    their processes that outlived the driver (a driver killed with SIGKILL leaves Ray's dashboard and
    runtime-env agents running for a minute or two), and remove their session folders but the newest
    ``keep``.  Folders of live drivers, of ``current`` and of any Ray this project did not start are left
    alone.  Returns the folders removed."""
    ended = sorted((p for p in temp.glob("session_*") if p.is_dir() and not p.is_symlink() and p != current
                    and _ended(p)), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for i, session in enumerate(ended):
        for pid in _holders(session):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if i >= keep:
            shutil.rmtree(session, ignore_errors=True)
            removed.append(session)
    return removed


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


# Exceptions a worker raises when its configuration or data is wrong (our checks raise ValueError and its
# subclasses; a bad argument to torch raises ValueError or TypeError): running the same inputs again cannot
# succeed, so they are not retried.  Anything else -- a worker process that died, a collective whose peer
# went away (RuntimeError), an I/O error -- is a fault that a restart from the last checkpoint may get past.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError)


class WorkerInputError(ValueError):
    """A Ray Train worker refused its configuration or data; retrying would fail the same way."""


def deterministic_failure(error: BaseException) -> tuple[int, BaseException] | None:
    """The (rank, exception) of the first worker of a failed Ray Train run that raised one of
    ``DETERMINISTIC_ERRORS``, or None when every failure was a fault worth retrying."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], DETERMINISTIC_ERRORS):
            return rank, failures[rank]
    return None


def _fit_once(trainer):
    """``trainer.fit()``, with Ctrl-C told as the interrupt it is.  Ray Train's ``fit`` in the main thread installs
    a SIGINT handler that aborts the run and then exits the process (``SystemExit``) and is never taken back: here
    the exit becomes a ``KeyboardInterrupt`` and the handler before ``fit`` is put back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit as exc:
        raise KeyboardInterrupt("the run was aborted by Ctrl-C") from exc
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def fit(make_trainer, *, what: str, max_failures: int, on_retry=None):
    """``make_trainer().fit()``, retried after a worker fault up to ``max_failures`` times; returns its Result.

    Each retry is a new run with the same name and storage, which Ray Train starts from the run's latest
    checkpoint: what a ``--resume`` does, done by the driver so that it can tell faults from mistakes (Ray
    Train's own ``FailureConfig`` retries every failure; the trainers here are built with
    ``max_failures=0``).  A worker that raised one of ``DETERMINISTIC_ERRORS`` ends the run at once: a
    :class:`WorkerInputError` naming the worker and the error.  ``on_retry(attempt, error)`` is called before
    each retry.
    """
    from ray.train import TrainingFailedError

    attempt = 0
    while True:
        try:
            return _fit_once(make_trainer())
        except TrainingFailedError as exc:
            found = deterministic_failure(exc)
            if found is not None:
                rank, error = found
                raise WorkerInputError(f"{what}: worker {rank} refused its input ({type(error).__name__}: "
                                       f"{error})") from exc
            attempt += 1
            if attempt > max_failures:
                raise
            log.warning(f"{what}: a worker failed; restarting from the last checkpoint (retry {attempt} of "
                        f"{max_failures}): {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
            if on_retry is not None:
                on_retry(attempt, exc)


def trainer_factory(loop, config: dict, *, name: str, storage_path: Path, workers: int, cpus_per_worker: float,
                    use_gpu: bool, keep_checkpoints: int | None = 2):
    """A zero-argument function making this project's ``TorchTrainer`` for ``loop`` (what :func:`fit` calls per
    attempt): ``workers`` processes of ``cpus_per_worker`` CPUs (and a GPU each with ``use_gpu``), the file
    rendezvous of :func:`torch_config`, the run ``name`` under ``storage_path``, Ray Train's own retries off
    (:func:`fit` retries), the newest ``keep_checkpoints`` checkpoints kept (None: no checkpoints)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def make():
        checkpoints = {} if keep_checkpoints is None else {
            "checkpoint_config": CheckpointConfig(num_to_keep=keep_checkpoints)}
        return TorchTrainer(loop, train_loop_config=config, torch_config=torch_config(use_gpu),
                            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                         resources_per_worker={"CPU": cpus_per_worker}),
                            run_config=RunConfig(name=name, storage_path=str(storage_path),
                                                 failure_config=FailureConfig(max_failures=0), **checkpoints))

    return make
