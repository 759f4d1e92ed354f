"""What embedded Ray instances leave: the next embedded start stops the processes of instances whose driver is gone
and removes their session folders but the newest few; other folders are left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unidd_ray.runtime.cluster import SESSION_MARK, _process_start, sweep_sessions

ROOT = Path(__file__).resolve().parents[2]


def _session(temp: Path, name: str, *, pid: int | None, start: str | None = None, age: float = 0) -> Path:
    folder = temp / f"session_{name}"
    (folder / "logs").mkdir(parents=True)
    if pid is not None:
        (folder / SESSION_MARK).write_text(json.dumps({"pid": pid, "start": start or _process_start(pid)}))
    stamp = time.time() - age
    os.utime(folder, (stamp, stamp))
    return folder


def _agent(folder: Path) -> subprocess.Popen:
    """A process named like Ray's agents (``ray::DashboardAgent``) with a log open in ``folder``."""
    log = folder / "logs" / "dashboard_agent.log"
    return subprocess.Popen(["bash", "-c", f'exec -a ray::DashboardAgent {sys.executable} -c "import time; '
                                           f'f = open(\'{log}\', \'a\'); time.sleep(120)"'])


def test_ended_sessions_are_tidied_and_others_left_alone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a driver that has exited
    ended = [_session(tmp_path, f"ended{i}", pid=gone.pid, start="1", age=100 * i) for i in range(3)]
    live = _session(tmp_path, "live", pid=os.getpid(), age=500)
    reused = _session(tmp_path, "reused", pid=os.getpid(), start="0", age=600)  # the pid now names another process
    foreign = _session(tmp_path, "foreign", pid=None, age=700)  # a Ray this project did not start
    agent = _agent(ended[2])
    time.sleep(1)
    bystander = subprocess.Popen(["tail", "-f", str(ended[2] / "logs" / "dashboard_agent.log")])
    try:
        removed = sweep_sessions(tmp_path, keep=1)
        assert agent.wait(timeout=10) == -9  # the agent of an ended instance is stopped
        assert bystander.poll() is None  # a program reading a log there is not one of Ray's
    finally:
        for proc in (agent, bystander):
            proc.kill()
    assert sorted(removed) == sorted([ended[1], ended[2], reused])  # all ended ones but the newest
    assert ended[0].is_dir() and live.is_dir() and foreign.is_dir()


@pytest.mark.slow
def test_a_killed_drivers_agents_are_stopped_by_the_next_start(tmp_path):
    """SIGKILL a driver of an embedded instance: its dashboard and runtime-env agents outlive it; the next
    embedded start in another process stops them."""
    driver = ("import sys, time\nfrom unidd_ray.runtime.cluster import init_ray\ninit_ray(num_cpus=1)\n"
              "import ray\nc = ray.get_runtime_context()\nprint(c.get_temp_dir() + '/' + c.get_session_name(), "
              "flush=True)\ntime.sleep(600)")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "disabled"}
    first = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True, env=env)
    session = Path(first.stdout.readline().strip())
    time.sleep(5)  # the agents are up
    first.kill()
    first.wait()
    time.sleep(2)
    from unidd_ray.runtime.cluster import _holders

    assert _holders(session), "no agent outlived the driver: nothing to test"
    second = subprocess.run([sys.executable, "-c", "from unidd_ray.runtime.cluster import init_ray\n"
                                                  "init_ray(num_cpus=1)"],
                            env=env, timeout=120, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    deadline = time.monotonic() + 10
    while _holders(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _holders(session)
