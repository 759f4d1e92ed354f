"""One writer per output: the lock beside an output, who holds it, waiting for it, and the commands that take it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from unidd_ray.artifacts.locks import LockHeld, holder, lock_path, output_lock

ROOT = Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
from unidd_ray.artifacts.locks import output_lock
with output_lock(sys.argv[1], command="unidd-ray pipeline --recipe digits"):
    print("HELD", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder_process(output: Path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "HELD"
    return proc


def test_a_second_writer_is_told_who_holds_the_output(tmp_path):
    out = tmp_path / "run"
    proc = _holder_process(out, 30)
    try:
        with pytest.raises(LockHeld, match=rf"{out} is in use by `unidd-ray pipeline --recipe digits` "
                                           rf"\(pid {proc.pid} on .*, since .*\); wait for it to finish, or pass "
                                           r"--wait"):
            with output_lock(out):
                pass
        assert holder(lock_path(out))["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    proc = _holder_process(out, 30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with output_lock(out, command="next"):  # the kernel released the lock with the process
        assert holder(lock_path(out))["command"] == "next"
    assert not lock_path(out).exists()  # the holder removes the file when it lets go


def test_wait_queues_behind_the_holder(tmp_path):
    out = tmp_path / "run"
    proc = _holder_process(out, 1.5)
    told = []
    started = time.monotonic()
    with output_lock(out, wait=True, poll=0.1, notify=told.append):
        waited = time.monotonic() - started
    proc.wait()
    assert waited > 0.5 and len(told) == 1 and "is in use by" in told[0] and "waiting" in told[0]


def test_threads_of_one_process_exclude_each_other_too(tmp_path):
    out = tmp_path / "set"
    inside, errors = threading.Event(), []

    def second():
        inside.wait(5)
        try:
            with output_lock(out):
                pass
        except LockHeld as exc:
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    with output_lock(out):
        inside.set()
        thread.join(5)
    assert len(errors) == 1


def test_a_stage_holds_its_outputs_lock(tmp_path, digits_data, digits_teacher):
    """``run_stats`` (any stage function) refuses an output another process is writing, before any work."""
    from unidd_ray.config import StatsConfig
    from unidd_ray.stages.stats import run_stats

    out = tmp_path / "stats"
    proc = _holder_process(out, 30)
    try:
        with pytest.raises(LockHeld, match="is in use by"):
            run_stats(digits_data, digits_teacher, out, StatsConfig(actors=1, batch_size=128, block_size=256))
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()


def test_a_second_pipeline_on_the_same_run_exits_at_once(tmp_path, capsys, monkeypatch):
    """Two pipelines on one run directory: the second names the first and exits, writing nothing."""
    from unidd_ray import cli, pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the second pipeline started working")

    monkeypatch.setattr(pipeline, "prepare_stage", no_work)
    run = tmp_path / "run"
    proc = _holder_process(run, 30)
    try:
        started = time.monotonic()
        assert cli.main(["pipeline", "--recipe", "digits", "--set", f"out={run}"]) == 2
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run} is in use by `unidd-ray pipeline --recipe digits` (pid {proc.pid}" in err[0]
    assert not run.exists()
