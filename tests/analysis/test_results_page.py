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


# ----------------------------------------------------------------------------- the two protocols side by side
def _row(method, ipc, protocol, top1, selected=None, student="convnet"):
    import statistics

    row = {"method": method, "ipc": ipc, "labels": "soft", "student": student, "protocol": protocol,
           "top1": top1, "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1),
           "seeds": len(top1), "seconds": 10.0}
    if selected is not None:
        row.update(top1_selected=selected, top1_selected_mean=statistics.fmean(selected),
                   top1_selected_std=statistics.stdev(selected), top1_selected_note="test-selected")
    return row


def _protocol_runs(tmp_path):
    teacher = RESULTS["rows"][0]
    stages = {"cfm-ipc10": "/runs/x/cfm-ipc10-aaaa", "dm-ipc10": "/runs/x/dm-ipc10-bbbb",
              "random-ipc1": "/runs/x/random-ipc1-cccc"}
    ours = {**RESULTS, "stages": stages, "rows": [
        teacher, _row("random", 1, "ours", [40.0, 42.0, 41.0]), _row("cfm", 10, "ours", [80.0, 81.0, 82.5]),
        _row("dm", 10, "ours", [79.0, 78.0, 80.0])]}
    # the paper run: dm was recovered again under other settings (another directory: not the same set)
    paper = {**RESULTS, "stages": {**stages, "dm-ipc10": "/runs/y/dm-ipc10-dddd"}, "rows": [
        teacher, _row("cfm", 10, "paper", [79.0, 80.5, 83.0], [80.0, 81.5, 83.5]),
        _row("dm", 10, "paper", [70.0, 70.0, 70.0], [71.0, 71.0, 71.0]),
        _row("random", 1, "paper", [38.0, 43.0, 40.0], [41.0, 43.5, 41.0])]}
    return _run(tmp_path, "ours", ours), _run(tmp_path, "paper", paper)


def test_the_protocols_of_the_same_sets_are_compared_per_seed(tmp_path):
    import numpy as np

    page = results_page(list(_protocol_runs(tmp_path)))
    assert page.index("## Evaluation protocols compared") < page.index("## fashion-mnist")
    table = [line for line in page.splitlines() if line.startswith("| fashion-mnist |")]
    assert [line.split(" | ")[1:3] for line in table] == [["random", "1"], ["cfm", "10"]]  # dm: not the same set
    final = np.array([79.0, 80.5, 83.0]) - np.array([80.0, 81.0, 82.5])
    selected = np.array([80.0, 81.5, 83.5]) - np.array([80.0, 81.0, 82.5])
    cells = table[1].strip("| ").split(" | ")
    assert cells[5:] == ["3", "81.17 ± 1.26", "80.83 ± 2.02", "81.67 ± 1.76",
                         f"{final.mean():+.2f} ± {final.std(ddof=1):.2f}",
                         f"{selected.mean():+.2f} ± {selected.std(ddof=1):.2f}"]
    assert cells[-2:] == ["-0.33 ± 0.76", "+0.50 ± 0.50"]
    # over the two rows: random (final -0.67, selected +0.83) and cfm (-0.33, +0.50)
    assert "- final − ours over the 2 rows: -0.50 on average, from -0.67 to -0.33 percentage points." in page
    assert "- test-selected − ours over the 2 rows: +0.67 on average, from +0.50 to +0.83 percentage points." in page


def test_no_comparison_without_both_protocols(tmp_path):
    ours, _ = _protocol_runs(tmp_path)
    assert "protocols compared" not in results_page([ours])
    assert "protocols compared" not in results_page([_run(tmp_path, "old", RESULTS)])  # no stages recorded
