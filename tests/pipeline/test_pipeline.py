"""``unidd-ray pipeline`` end to end on digits, in subprocesses: results, content-addressed reuse, and
resumption after the process group is killed half-way through a stage.

Small settings keep it to a few minutes on two cores; each run starts its own
embedded Ray (the session's Ray fixture is not used).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SETTINGS = ["recover.iterations=5", "recover.batch_classes=2", "evaluate.epochs=50", "squeeze.epochs=3",
            "evaluate.seeds=1", "methods=[random, dm, cfm]", "parallel_recoveries=2"]
TIMEOUT = 900


def _command(out: Path, extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "unidd_ray.cli", "pipeline", "--recipe", "digits", "--set", f"out={out}"]
    for s in [*SETTINGS, *extra]:
        cmd += ["--set", s]
    return cmd


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each run gets its own embedded Ray
    return {**env, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session we started (the pipeline, its Ray head and workers)."""
    for _ in range(3):
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _run(out: Path, extra: list[str] = ()) -> tuple[str, float]:
    started = time.perf_counter()
    proc = subprocess.Popen(_command(out, extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        _kill_session(proc.pid)  # Ray processes left behind by a finished (or timed-out) driver
    assert proc.returncode == 0, log[-5000:]
    assert re.search(r"^\[pipeline \d\d:\d\d:\d\d\] done in", log, re.M), log[-2000:]  # clock-stamped lines
    return _unstamped(log), time.perf_counter() - started


def _unstamped(log: str) -> str:
    return re.sub(r"\[pipeline \d\d:\d\d:\d\d\]", "[pipeline]", log)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _row(results: dict, method: str) -> dict:
    (row,) = [r for r in results["rows"] if r["method"] == method]
    return row


def _distilled_files(path: str | Path) -> dict:
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    return {k: v for k, v in manifest["files"].items() if k.startswith("images/")}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    log, seconds = _run(run)
    return run, log, seconds, _results(run)


# ----------------------------------------------------------------------------- one run
def test_pipeline_results(first):
    run, log, seconds, results = first
    assert results["recipe"] == "digits"
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["teacher (full data)", "random", "dm", "cfm"]
    assert "[pipeline] 2 recoveries, 2 at a time" in log  # dm and cfm side by side
    teacher = results["rows"][0]
    assert 50 < teacher["top1_mean"] <= 100 and teacher["ipc"] is None
    for method in ("random", "dm", "cfm"):
        row = _row(results, method)
        assert row["ipc"] == 2 and row["seeds"] == 1 and row["labels"] == "soft"
        assert len(row["top1"]) == 1 and row["top1_mean"] == row["top1"][0] and row["top1_std"] == 0.0
        assert 10 < row["top1_mean"] <= 100  # 50 epochs on 20 images: well above chance
        assert row["seconds"] > 0
        assert results["stages"][f"{method}-ipc2"] and results["stages"][f"eval-{method}-ipc2"]
        summary = json.loads((Path(results["stages"][f"eval-{method}-ipc2"]) / "summary.json").read_text())
        assert summary["top1"] == row["top1"] and summary["config"]["epochs"] == 50
    assert len(_distilled_files(results["stages"]["cfm-ipc2"])) == 20
    assert results["seconds"] > 0

    md = (run / "results.md").read_text()
    assert "| method | IPC | labels | protocol | top-1 (%) | seeds | wall time (s) |" in md
    for method in ("random", "dm", "cfm"):
        assert re.search(rf"\| {method} \| 2 \| soft \| ours \| {_row(results, method)['top1_mean']:.2f} ± 0.00 \| 1 \|", md)

    html = (run / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)
    assert refs and all((run / r).is_file() and (run / r).stat().st_size > 0 for r in refs)
    report = json.loads((run / "report.json").read_text())
    assert set(report["methods"]) == {"random-ipc2", "dm-ipc2", "cfm-ipc2"}
    assert "[pipeline] done in" in log


# ----------------------------------------------------------------------------- content-addressed reuse
STAGE_LINES = ["prepare: reusing", "squeeze: reusing", "stats: reusing", "recover dm IPC 2: reusing",
               "recover cfm IPC 2: reusing", "evaluate random IPC 2: reusing", "evaluate dm IPC 2: reusing",
               "evaluate cfm IPC 2: reusing"]


def test_second_run_reuses_every_stage(first):
    run, _, _, results = first
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name in ("manifest.json",
                                                                                               "summary.json")}
    log, _ = _run(run)
    for line in STAGE_LINES:
        assert f"[pipeline] {line}" in log, line
    assert "random real subset" not in log and "training" not in log
    again = _results(run)
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(again["rows"]) == strip(results["rows"])
    assert again["stages"] == results["stages"]
    # nothing was recomputed: no stage's manifest or summary was rewritten
    assert len(stamps) >= len(results["stages"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_changing_one_method_setting_redoes_only_that_method(first):
    """beta_max is a cfm setting that dm does not read: cfm is recovered and evaluated again, dm and the
    baseline are reused."""
    run, _, _, results = first
    log, _ = _run(run, ["recover.beta_max=0.5"])
    for line in ["prepare: reusing", "squeeze: reusing", "stats: reusing", "recover dm IPC 2: reusing",
                 "evaluate random IPC 2: reusing", "evaluate dm IPC 2: reusing"]:
        assert f"[pipeline] {line}" in log, line
    assert "[pipeline] recover cfm IPC 2 -> " in log and "recover dm IPC 2 -> " not in log
    assert "recover cfm IPC 2: reusing" not in log and "evaluate cfm IPC 2: reusing" not in log
    changed = _results(run)
    for same in ("random-ipc2", "eval-random-ipc2", "dm-ipc2", "eval-dm-ipc2"):
        assert changed["stages"][same] == results["stages"][same], same
    assert _row(changed, "dm")["top1"] == _row(results, "dm")["top1"]
    assert changed["stages"]["cfm-ipc2"] != results["stages"]["cfm-ipc2"]
    assert changed["stages"]["eval-cfm-ipc2"] != results["stages"]["eval-cfm-ipc2"]
    # the first run's cfm set is still there (content-addressed), and differs from the new one
    assert _distilled_files(results["stages"]["cfm-ipc2"]) != _distilled_files(changed["stages"]["cfm-ipc2"])
    assert _row(changed, "random")["top1"] == _row(results, "random")["top1"]


def test_more_seeds_train_only_the_new_ones(first):
    """A re-run with two seeds evaluates in the first run's directories (the seed count is not in the key)
    and keeps seed 0's students: their accuracies are the first run's."""
    run, _, _, results = first
    log, _ = _run(run, ["evaluate.seeds=2"])
    for method in ("random", "dm", "cfm"):
        assert f"[pipeline] evaluate {method} IPC 2: 2 seeds, 1 stored" in log, method
        assert f"[pipeline] recover {method} IPC 2: reusing" in log or method == "random"
    more = _results(run)
    assert more["stages"] == results["stages"]
    for method in ("random", "dm", "cfm"):
        row = _row(more, method)
        assert row["seeds"] == 2 and row["top1"][0] == _row(results, method)["top1"][0], method
    ray_run = run / ".evaluate.ray" / "evaluate"  # Ray Train's folder of the last evaluation run
    before = ray_run.stat()
    # fewer: every summary is rewritten from the stored seeds, no student is trained
    log, _ = _run(run, ["evaluate.seeds=1"])
    assert "[pipeline] evaluate cfm IPC 2: 1 seeds, 1 stored" in log
    after = ray_run.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [r.get("top1") for r in _results(run)["rows"]] == [r.get("top1") for r in results["rows"]]


# ----------------------------------------------------------------------------- kill and resume
def test_resume_after_killed_stage_equals_uninterrupted_run(first, tmp_path):
    """Kill the pipeline (its whole process group) during cfm's recovery, re-run, compare with the first run."""
    run, _, _, results = first
    run2 = tmp_path / "run"
    # the same run directory without cfm's recovery and evaluation: prepare, squeeze, stats and the random
    # baseline are reused, cfm is recomputed from scratch
    shutil.copytree(run, run2, symlinks=True, ignore=shutil.ignore_patterns("*.ray"))
    cfm_dir = Path(results["stages"]["cfm-ipc2"])
    eval_dir = Path(results["stages"]["eval-cfm-ipc2"])
    for name in (cfm_dir.name, eval_dir.name):
        shutil.rmtree(run2 / name)
    for d in run2.iterdir():
        if d.name.startswith("cfm-ipc2-") or d.name.startswith("eval-cfm-ipc2-"):
            shutil.rmtree(d)
    staging = run2 / f"{cfm_dir.name}.partial"

    proc = subprocess.Popen(_command(run2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    killed_in = None
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((staging / ".batches").glob("*.json")) if staging.is_dir() else []
            if done and not (run2 / cfm_dir.name).exists():
                killed_in = f"recover ({len(done)} batches done)"
                break
            if any("evaluate cfm IPC 2:" in line for line in list(lines)):
                killed_in = "evaluate"
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the pipeline finished before it could be killed:\n" + "".join(lines)[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        _kill_session(proc.pid)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert killed_in is not None, "".join(lines)[-3000:]
    print(f"killed the pipeline during {killed_in}")
    assert not (run2 / eval_dir.name / "summary.json").exists()

    log, _ = _run(run2)
    if killed_in.startswith("recover"):
        assert "[pipeline] recover cfm IPC 2 -> " in log and "(resuming)" in log, log[-3000:]
    resumed = _results(run2)
    assert Path(resumed["stages"]["cfm-ipc2"]).name == cfm_dir.name
    assert not staging.exists()
    # the interrupted-and-resumed run equals the uninterrupted one: byte-identical images, same accuracy
    assert _distilled_files(resumed["stages"]["cfm-ipc2"]) == _distilled_files(cfm_dir)
    assert _row(resumed, "cfm")["top1"] == _row(results, "cfm")["top1"], killed_in
    assert _row(resumed, "random")["top1"] == _row(results, "random")["top1"]


# ----------------------------------------------------------------------------- healing
def test_a_damaged_stage_is_verified_and_computed_again(first, tmp_path):
    """Flipped bytes in the prepared data and in one recovered image: the re-run names both, prepares the data
    again and recovers the set again, bit for bit, so every other stage and the evaluation are reused."""
    run, _, _, results = first
    run3 = tmp_path / "run"
    shutil.copytree(run, run3, symlinks=True, ignore=shutil.ignore_patterns("*.ray"))
    data_dir = run3 / Path(results["stages"]["data"]).name
    cfm_dir = run3 / Path(results["stages"]["cfm-ipc2"]).name
    image = sorted((cfm_dir / "images").rglob("*.png"))[3]
    for path, offset in ((data_dir / "train.beton", 70000), (image, 40)):
        data = bytearray(path.read_bytes())
        data[offset:offset + 16] = bytes(b ^ 0x5A for b in data[offset:offset + 16])
        path.write_bytes(bytes(data))
    log, _ = _run(run3)
    assert f"[pipeline] {data_dir.name} is damaged ({data_dir / 'train.beton'} does not match" in log, log[-3000:]
    assert f"[pipeline] {cfm_dir.name} is damaged ({image} does not match its recorded sha256" in log, log[-3000:]
    assert f"[pipeline] recover cfm IPC 2 -> {cfm_dir}" in log
    for line in ("squeeze: reusing", "stats: reusing", "recover dm IPC 2: reusing", "evaluate cfm IPC 2: reusing"):
        assert f"[pipeline] {line}" in log, line
    healed = _results(run3)
    assert _distilled_files(healed["stages"]["cfm-ipc2"]) == _distilled_files(results["stages"]["cfm-ipc2"])
    assert [r.get("top1") for r in healed["rows"]] == [r.get("top1") for r in results["rows"]]
