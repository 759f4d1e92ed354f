"""What a user sees when something is wrong: one line naming the thing and the fix, before any work (Ray is not
started to refuse a bad setting), exit status 2; the traceback only with ``-v``; Ctrl-C and a full disk told as
such."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unidd_ray import cli

ROOT = Path(__file__).resolve().parents[2]


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("setting, message", [
    ("recover.beta_max=0", "recover.beta_max must be a finite number > 0, got 0.0"),
    ("recover.lr=-1", "recover.lr must be a finite number > 0, got -1.0"),
    ("recover.iterations=0", "recover.iterations must be an integer >= 1, got 0"),
    ("recover.adam_betas=[2,3]", r"recover.adam_betas must be two numbers in [0, 1) (Adam's decay rates)"),
    ("recover.cpus_per_worker=0", "recover.cpus_per_worker must be a finite number > 0"),
    ("recover.seed=-1", "recover.seed must be an integer >= 0, got -1"),
    ("recover_by_ipc.1.alpha=-2", "recover_by_ipc.1.alpha must be a finite number >= 0, got -2.0"),
    ("recover.beta_min=0.5", "recover.beta_min does not suit method 'cfm': cosine schedule needs 0 <= beta_min"),
    ("evaluate.temperature=.nan", "evaluate.temperature must be a finite number > 0"),
    ("squeeze.momentum=1.5", "squeeze.momentum must be a finite number >= 0 and < 1"),
    ("stats.actors=0", "stats.actors must be an integer >= 1"),
    ("methods=[cfm, nope]", "methods must hold methods among"),
    ("parallel_recoveries=0", "parallel_recoveries must be an integer >= 1 (or null)"),
    ("teacher.arch=vgg", "teacher.arch must be one of"),
])
def test_a_bad_setting_is_refused_when_the_recipe_is_read(setting, message, tmp_path, no_ray, capsys):
    started = time.monotonic()
    assert cli.main(["pipeline", "--recipe", "digits", "--set", f"out={tmp_path / 'run'}", "--set", setting]) == 2
    assert time.monotonic() - started < 5
    assert message in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_ipc_larger_than_a_class_is_refused_before_the_teacher(tmp_path, no_ray, capsys):
    """It needs the class sizes: the data is prepared (digits: seconds), and nothing after it runs."""
    run = tmp_path / "run"
    assert cli.main(["pipeline", "--recipe", "digits", "--set", f"out={run}", "--set", "ipcs=[1000]"]) == 2
    assert "IPC 1000 is larger than the" in _error(capsys)
    assert not [p for p in run.iterdir() if not p.name.startswith(("data-", ".", "config.yaml", "pipeline.json"))]


@pytest.mark.parametrize("args, message", [
    (["recover", "--workers", "0"], "recover.workers must be an integer >= 1"),
    (["recover", "--set", "recover.adam_betas=[2,3]"], "recover.adam_betas must be two numbers"),
    (["recover", "--method", "sgd"], "recover.method must be one of"),
    (["stats", "--actors", "0"], "stats.actors must be an integer >= 1"),
    (["squeeze", "--set", "squeeze.epochs=-1"], "squeeze.epochs must be an integer >= 0"),
    (["evaluate", "--seeds", "0"], "evaluate.seeds must be an integer >= 1"),
])
def test_stage_commands_refuse_bad_flags_without_starting_ray(args, message, tmp_path, no_ray, capsys):
    paths = {"recover": ["--data", "d", "--teacher", "t", "--out", "o"],
             "stats": ["--data", "d", "--teacher", "t", "--out", "o"],
             "squeeze": ["--data", "d", "--out", "o"],
             "evaluate": ["--distilled", "s", "--teacher", "t", "--data", "d"]}
    assert cli.main([*args, *paths[args[0]]]) == 2
    assert message in _error(capsys)


def test_tune_and_spectra_refuse_counts_below_one_before_any_work(tmp_path, no_ray, capsys):
    run = tmp_path / "run"
    space = str(ROOT / "tune_spaces" / "cfm_beta_alpha.yaml")
    for flag, value, message in (("--samples", "0", "--samples must be at least 1"),
                                 ("--concurrent", "0", "--concurrent must be at least 1")):
        assert cli.main(["tune", "--recipe", "digits", "--set", f"out={run}", "--space", space, flag, value]) == 2
        assert message in _error(capsys)
    assert not run.exists()
    assert cli.main(["spectra", "--images", "0"]) == 2
    assert "--images must be at least 2" in _error(capsys)


def test_config_files_are_named_in_their_errors(tmp_path, capsys):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("recover:\n  lr: 0.1  # café\n".encode("latin-1"))
    assert cli.main(["pipeline", "--config", str(latin)]) == 2
    assert f"{latin} is not UTF-8 text (byte 25 is b'\\xe9'); save the recipe as UTF-8" in _error(capsys)
    assert cli.main(["pipeline", "--config", str(tmp_path)]) == 2
    assert f"--config {tmp_path} is a directory; give a recipe YAML file" in _error(capsys)


def test_a_corrupt_results_file_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"rows": [')
    assert cli.main(["report", "--run", str(run)]) == 2
    assert f"{run / 'results.json'} is corrupt" in _error(capsys)


def test_verbose_shows_the_traceback_too(tmp_path, no_ray, capsys):
    assert cli.main(["-v", "pipeline", "--set", "recover.lr=-1", "--set", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("got -1.0")
    assert cli.main(["pipeline", "-v", "--set", "recover.lr=-1", "--set", f"out={tmp_path}"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_full_disk_is_told_as_such(tmp_path, monkeypatch, capsys):
    from unidd_ray.data import prepare

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "train.beton"))

    monkeypatch.setattr(prepare, "prepare_dataset", full)
    assert cli.main(["prepare", "--dataset", "digits", "--out", str(tmp_path / "out")]) == 2
    assert _error(capsys) == (f"unidd-ray prepare: error: no space left on the device writing "
                              f"{tmp_path / 'out' / 'train.beton'}: free some space or choose another output; "
                              "finished work is kept and the same command continues from it")


def test_a_bug_keeps_its_traceback(monkeypatch):
    from unidd_ray.data import prepare

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(prepare, "prepare_dataset", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["prepare", "--dataset", "digits", "--out", "/nonexistent/out"])


@pytest.mark.slow
def test_ctrl_c_in_a_pipeline_is_one_line_and_keeps_the_work(tmp_path):
    """SIGINT while the pipeline trains the teacher: exit status 130, one line, no traceback; the prepared data
    stays, and the same command continues from it."""
    run = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unidd_ray.cli", "pipeline", "--recipe", "digits", "--set",
                             f"out={run}", "--set", "squeeze.epochs=50"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        for line in proc.stdout:
            if "squeeze: training" in line:
                break
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        with_group = proc.pid
        try:
            os.killpg(with_group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 130, err[-3000:]
    # no traceback of the driver's (Ray's own processes may print theirs, prefixed with their name and pid)
    assert not [line for line in err.splitlines() if line.startswith(("Traceback", "KeyboardInterrupt"))], err[-3000:]
    assert err.strip().splitlines()[-1] == ("unidd-ray pipeline: interrupted; finished work is kept: run the same "
                                            "command again to continue")
    assert [p for p in run.iterdir() if p.name.startswith("data-") and (p / "dataset.json").is_file()]
    assert json.loads((run / "pipeline.json").read_text())["stages"] == {}
