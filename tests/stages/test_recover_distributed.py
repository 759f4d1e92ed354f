"""Recovery fault tolerance (SPEC §2.2), slow: a worker failing mid-run (FailureConfig restart) and a
killed ``recover`` command continued with ``--resume`` both give output byte-identical to an
uninterrupted run, with every batch present once and only the interrupted rounds redone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from unidd_ray.config import RecoverConfig, to_dict
from unidd_ray.runtime.cluster import JOIN_EMBEDDED_ENV
from unidd_ray.stages.recover import BATCHES, FaultPlan, run_recover

pytestmark = pytest.mark.slow

# 2 workers × 4 slots = 4 rounds of 2 batches; tiny and deterministic (one thread per worker)
CFG = {"ipc": 4, "workers": 2, "iterations": 3, "lr": 0.05, "max_roll": 1, "cpus_per_worker": 1}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _digests(out: Path) -> dict[tuple[int, int], str]:
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    return {(r["class"], r["slot"]): r["sha256"] for r in rows}


def _batches(out: Path) -> dict[int, dict]:
    return {b["batch"]: b for b in json.loads((out / BATCHES).read_text())}


def _round_of(batch: int, workers: int = 2) -> int:
    return batch // workers  # one chunk per worker: batch id = round * workers + worker


def _assert_same_output(out: Path, ref: Path):
    assert _digests(out) == _digests(ref)  # PNG sha256 of every (class, slot)
    a = torch.load(out / "emu_state.pt", weights_only=True)
    b = torch.load(ref / "emu_state.pt", weights_only=True)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("plan.json",):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    # every batch exactly once in the result, with the same classes and loss parts
    got, want = _batches(out), _batches(ref)
    assert sorted(got) == sorted(want) == list(range(8))
    for k in got:
        assert got[k]["classes"] == want[k]["classes"] and got[k]["parts"] == want[k]["parts"]


@pytest.fixture(scope="module")
def reference(ray_session, digits_data, digits_teacher, digits_stats, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recover-reference")
    out = run_recover(digits_data, digits_teacher, digits_stats, root / "out", RecoverConfig(**CFG),
                      storage_path=root / "ray", progress=False)
    assert all(b["executions"] == 1 for b in _batches(out).values())
    return out


def test_injected_failure_restarts_and_matches_uninterrupted(reference, digits_data, digits_teacher, digits_stats,
                                                             tmp_path):
    cfg = RecoverConfig(**CFG, max_failures=1)
    out = run_recover(digits_data, digits_teacher, digits_stats, tmp_path / "out", cfg, storage_path=tmp_path / "ray",
                      progress=False, faults=FaultPlan(after_batches=4))  # the last worker dies after round 2 of 4
    _assert_same_output(out, reference)
    batches = _batches(out)
    # rounds before the failure ran once (restart from the checkpoint, not from scratch); the failed round
    # ran at most twice; the rounds after it once
    for b, rec in batches.items():
        if _round_of(b) != 1:
            assert rec["executions"] == 1, (b, rec)
    assert batches[3]["executions"] == 2  # the failing worker's batch of round 2 was redone after the restart
    assert batches[2]["executions"] in (1, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batches_redone"] and all(_round_of(b) == 1 for b in summary["batches_redone"])
    assert summary["batches_executed"] == 8 + len(summary["batches_redone"])
    assert not list(out.glob(".fault*"))


def test_injected_failure_without_restarts_fails_cleanly(ray_session, digits_data, digits_teacher, digits_stats,
                                                         tmp_path):
    cfg = RecoverConfig(**CFG, max_failures=0)
    with pytest.raises(Exception, match="injected failure"):
        run_recover(digits_data, digits_teacher, digits_stats, tmp_path / "out", cfg,
                    storage_path=tmp_path / "ray", progress=False, faults=FaultPlan(after_batches=2))
    assert not (tmp_path / "out").exists()  # only the staging directory, never a half-written output


DRIVER = """
import sys
from unidd_ray.config import RecoverConfig, from_dict
from unidd_ray.runtime.cluster import init_ray
from unidd_ray.stages.recover import run_recover
import json
import shutil
init_ray(sys.argv[1])
cfg = from_dict(RecoverConfig, json.loads(sys.argv[2]))
run_recover(sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], cfg, storage_path=sys.argv[7])
print("FINISHED", flush=True)
"""


def _registered_rounds(storage: Path) -> int:
    snapshot = storage / "recover" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return 0
    return 0 if not latest else int(latest["metrics"]["round"]) + 1


def test_killed_command_resumes_to_the_same_output(reference, ray_session, digits_data, digits_teacher,
                                                   digits_stats, tmp_path):
    """Start ``run_recover`` in a separate driver, SIGKILL it once a checkpoint is registered, then resume."""
    import ray

    out, storage = tmp_path / "out", tmp_path / "ray"
    cfg = RecoverConfig(**CFG)
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, ray.get_runtime_context().gcs_address,
                             json.dumps(to_dict(cfg)), str(digits_data), str(digits_teacher), str(digits_stats),
                             str(out), str(storage)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **JOIN_EMBEDDED_ENV})  # the session's Ray listens on 127.0.0.1
    deadline = time.monotonic() + 240
    try:
        while _registered_rounds(storage) < 1:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies: Ray ends its Train controller and workers
        proc.wait()
        log.close()
    killed_at = _registered_rounds(storage)
    assert not out.exists(), "the killed run finished before it could be killed"
    assert 1 <= killed_at < cfg.ipc  # one round per slot here
    # Ray ends the dead driver's Train controller and workers; wait until their CPUs are free again
    total = ray.cluster_resources()["CPU"]
    while ray.available_resources().get("CPU", 0) < total:
        assert time.monotonic() < deadline + 60, ray.available_resources()
        time.sleep(0.5)
    resumed = run_recover(digits_data, digits_teacher, digits_stats, out, cfg, storage_path=storage, resume=True,
                          progress=False)
    _assert_same_output(resumed, reference)
    batches = _batches(resumed)
    for b, rec in batches.items():
        if _round_of(b) < killed_at:
            assert rec["executions"] == 1, (b, rec)  # registered rounds are not redone
        else:
            assert rec["executions"] in (1, 2), (b, rec)


def test_crash_while_finalizing_resumes_to_the_same_output(reference, ray_session, digits_data, digits_teacher,
                                                           digits_stats, tmp_path, monkeypatch):
    """Every batch finished, the driver dies in ``finalize`` after writing the manifest and before moving the
    staging directory into place (and a crash cut a line of an executions log): ``--resume`` completes the
    same output without redoing any batch, and an older output at ``out`` is replaced only then."""
    import unidd_ray.stages.recover as recover
    from unidd_ray.artifacts.files import read_manifest

    out, storage = tmp_path / "out", tmp_path / "ray"
    shutil.copytree(reference, out)  # an earlier output of the same kind, marked
    (out / "summary.json").write_text('{"earlier": true}')
    cfg = RecoverConfig(**CFG)

    class Crash(Exception):
        pass

    def crash(src, dst, kind):
        raise Crash("simulated crash before the rename")

    monkeypatch.setattr(recover, "replace_directory", crash)
    with pytest.raises(Crash):
        run_recover(digits_data, digits_teacher, digits_stats, out, cfg, storage_path=storage, progress=False)
    monkeypatch.undo()
    staging = tmp_path / "out.partial"
    assert "earlier" in (out / "summary.json").read_text()  # untouched until the new output replaces it
    assert (staging / "manifest.json").exists() and (staging / recover.RECORDS).is_dir()
    assert not any(name.startswith(".") for name in read_manifest(staging)["files"])
    log = next((staging / recover.RECORDS).glob(f"{recover.EXECUTIONS}-*.jsonl"))
    with open(log, "a") as f:
        f.write('{"batch": 3, "ro')  # an append cut short

    resumed = run_recover(digits_data, digits_teacher, digits_stats, out, cfg, storage_path=storage, resume=True,
                          progress=False)
    _assert_same_output(resumed, reference)
    assert all(b["executions"] == 1 for b in _batches(resumed).values())
    assert "earlier" not in (out / "summary.json").read_text() and not staging.exists()
    assert not (out / recover.RECORDS).exists() and not list(tmp_path.glob(".out.*"))
    read_manifest(out)  # every recorded checksum verifies
