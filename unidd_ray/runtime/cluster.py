"""Connecting to Ray: an embedded local instance by default, a cluster through ``RAY_ADDRESS``.

The embedded instance is a one-machine cluster on 127.0.0.1: every server of it
(GCS, raylet, object manager, workers, dashboard and runtime-env agents) listens
on the loopback interface only; Ray Train worker groups on one node (on any
cluster) form their torch process group through a file
(:mod:`unidd_ray.runtime.rendezvous`), not a TCP store.

Every worker process runs :func:`setup_worker` before user code
(``worker_process_setup_hook``): the torchvision import fix, so tasks and actors
may import torchvision directly, and on the embedded instance a quieter Ray Train
placement-group cleaner (see there).  An embedded start also tidies what ended
embedded instances left (:func:`sweep_sessions`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import ray

from unidd_ray import _torchvision_fix
from unidd_ray.runtime import console
from unidd_ray.runtime.private import CLUSTER_MODE_ENV, single_machine_mode

SETUP_HOOK = "unidd_ray.runtime.cluster.setup_worker"
EMBEDDED_ENV = "UNIDD_RAY_EMBEDDED"  # set in the workers of an embedded instance
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_EMBEDDED = False  # this process started its own local Ray, which cannot grow
LOOPBACK = "127.0.0.1"
# the environment another process of this machine needs to join an embedded instance (by the 127.0.0.1 address
# of ``ray.get_runtime_context().gcs_address``): it connects as a loopback node too
JOIN_EMBEDDED_ENV = {CLUSTER_MODE_ENV: "0"}

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             log_file: str | Path | None = None) -> None:
    """Start or join Ray once per process.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; without either an embedded local Ray is started
    with the machine's resources (or ``num_cpus``).  ``log_file``: where Ray's own output goes (its processes'
    lines, its warnings, its C++ logs; see :mod:`unidd_ray.runtime.console`) instead of the terminal.
    """
    if ray.is_initialized():
        return
    if log_file is not None:
        console.send_output_to(log_file)
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"runtime_env": {"worker_process_setup_hook": SETUP_HOOK}, "logging_level": logging.WARNING}
    if address is None:
        # "local" always starts a fresh embedded instance: a bare ray.init() would join whatever
        # cluster an earlier `ray start` on this machine recorded.
        address = "local"
        kwargs.update(include_dashboard=False, num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address=LOOPBACK)
        kwargs["runtime_env"]["env_vars"] = {EMBEDDED_ENV: "1"}
        with single_machine_mode():
            ray.init(address=address, **kwargs)
        _tidy_sessions()
    else:
        ray.init(address=address, **kwargs)
    global _EMBEDDED
    _EMBEDDED = address == "local"


def shutdown_ray() -> None:
    """Stop the Ray that :func:`init_ray` started in this process with its output going to a log file, while it
    still does: Ray's last lines (the raylet's warnings, workers exiting) then land in the log, not on the
    terminal after the command's own.  A Ray started otherwise (a test's, a notebook's) is left running."""
    if ray.is_initialized() and console.log_file() is not None:
        ray.shutdown()


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
    _torchvision_fix.apply()
    if os.environ.get(EMBEDDED_ENV) == "1":
        logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)


def _largest_node() -> dict[str, float]:
    """The most CPUs and the most GPUs any one live node of the cluster has."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU")}


def require_resources(what: str, *, workers: int, cpus: float, gpus: float = 0.0, fix: str | None = None) -> None:
    """Refuse (embedded Ray) or warn about (a cluster, which may scale up) a worker group larger than
    the cluster, or one worker larger than its largest node: Ray Train would otherwise wait for the
    resources forever without saying so."""
    if not ray.is_initialized():  # Ray Train will start a local instance sized to the machine
        return
    have = ray.cluster_resources()
    need_cpu, need_gpu = workers * cpus, workers * gpus
    fix = fix or f"lower {what}.workers or {what}.cpus_per_worker"
    if need_cpu > have.get("CPU", 0) + 1e-9 or need_gpu > have.get("GPU", 0) + 1e-9:
        msg = (f"{what} asks for {workers} worker(s) x {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
               + f" = {need_cpu:g} CPU" + (f", {need_gpu:g} GPU" if gpus else "")
               + f", but the Ray cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU; " + fix)
    else:
        node = _largest_node()
        if cpus <= node["CPU"] + 1e-9 and gpus <= node["GPU"] + 1e-9:
            return
        msg = (f"{what} asks for {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "") + " per worker, but the "
               f"largest node of the Ray cluster has {node['CPU']:g} CPU and {node['GPU']:g} GPU (a worker runs on "
               f"one node); {fix}")
    if _EMBEDDED:
        raise ValueError(msg + " (this local Ray instance cannot grow)")
    log.warning(msg + "; waiting for the cluster to scale up")


def cluster_resources() -> dict:
    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
