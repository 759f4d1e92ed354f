"""The results page (``unidd-ray results``): generated from runs' ``results.json``, written only over its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unidd_ray.analysis.results_page import MARKER, results_page, write_results_page
from unidd_ray.cli import main

RESULTS = {
    "recipe": "fashion-mnist", "dataset": "fashion-mnist", "teacher": {"arch": "convnet", "val_top1": 90.78},
    "rows": [{"method": "teacher (full data)", "ipc": None, "top1_mean": 90.78, "top1_std": None, "seeds": None,
              "seconds": None},
             {"method": "cfm", "ipc": 10, "top1_mean": 81.9451, "top1_std": 0.0636, "seeds": 2, "seconds": 754.2,
              "labels": "soft", "top1": [81.99, 81.9]}],
    "stages": {}, "seconds": 1312.4, "fresh": True, "command": "unidd-ray pipeline",
    "machine": {"cpu": "AMD EPYC 7B13", "cores": 2, "gpus": [], "python": "3.11.7", "torch": "2.13.0+cpu",
                "ray": "2.60.0", "unidd_ray": "0.1.0"},
    "finished": "2026-12-06 22:10:00 UTC"}


def _run(tmp_path: Path, name: str, results: dict) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_the_page_holds_each_runs_table_command_and_machine(tmp_path):
    runs = [_run(tmp_path, "a", RESULTS), _run(tmp_path, "b", {**RESULTS, "recipe": "digits", "fresh": False})]
    page = results_page(runs)
    assert page.splitlines()[0] == MARKER
    assert page.index("## fashion-mnist") < page.index("## digits")  # the order given
    assert "`unidd-ray pipeline`" in page and "AMD EPYC 7B13 (2 cores), no GPU" in page
    assert "torch 2.13.0+cpu, Ray 2.60.0" in page
    assert "wall time 21 min 52 s (from an empty run directory)" in page
    assert "(reusing stages of earlier runs)" in page
    assert "| cfm | 10 | soft | – | ours | 81.95 ± 0.06 | 2 | 81.99, 81.90 | 12 min 34 s |" in page
    assert "| teacher (full data) | – | – | – | – | 90.78 | – | – | – |" in page


def test_the_command_writes_over_its_own_page_only(tmp_path, capsys):
    run = _run(tmp_path, "run", RESULTS)
    page = tmp_path / "RESULTS.md"
    assert main(["results", str(run), "--out", str(page)]) == 0
    first = page.read_text()
    assert first == results_page([run], page)
    assert f"`unidd-ray results {run} --out {page}`" in first  # the command that regenerates it
    (run / "results.json").write_text(json.dumps({**RESULTS, "seconds": 60.0}))
    write_results_page([run], page)  # its own page: regenerated
    assert "wall time 1 min 00 s" in page.read_text()
    mine = tmp_path / "NOTES.md"
    mine.write_text("# my notes\n")
    assert main(["results", str(run), "--out", str(mine)]) == 2
    assert "was not written by `unidd-ray results`" in capsys.readouterr().err
    assert mine.read_text() == "# my notes\n"


def test_a_directory_without_results_is_named(tmp_path, capsys):
    assert main(["results", str(tmp_path)]) == 2
    assert "is not a finished `unidd-ray pipeline` run" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{")
    with pytest.raises(ValueError, match="is corrupt"):
        results_page([tmp_path])
