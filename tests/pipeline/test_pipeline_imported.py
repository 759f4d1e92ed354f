"""A pipeline run on the UniDD authors' imported teacher and statistics (``teacher.artifact``, ``stats.artifact``)
and its report: no squeeze or stats stage runs, the recovery matches the imported per-batch covariance with the
authors' class signal, and the report's real spectra are the eigenvalues of the authors' own ``running_cov``
(numpy float64 on their npz files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from support.authors import FIXTURES, prepare_cifar20
from unidd_ray.cli import main

# their ConvNet's conv layers and ours (unidd_ray/artifacts/authors.py maps the names)
LAYERS = {f"layers.conv.{i}": f"features.{4 * i}" for i in range(3)}


@pytest.fixture(scope="module")
def cifar20(tmp_path_factory):
    return prepare_cifar20(tmp_path_factory.mktemp("cifar20"))


def _pipeline(run: Path, authors: Path, *extra: str) -> list[str]:
    argv = ["pipeline", "--recipe", "cifar10"]
    for setting in (f"out={run}", "data.dataset=npz", f"data.root={run.parent / 'cifar20.npz'}",
                    "data.num_workers=1", f"teacher.artifact={authors / 'teacher'}",
                    f"stats.artifact={authors / 'stats'}", "methods=[cfm]", "ipcs=[1]", "recover.iterations=2",
                    "recover.signal=class_share", "recover.covariance=per_batch", "recover.use_gpu=false",
                    "recover.cpus_per_worker=1", "evaluate.student=convnet", "evaluate.student_options={}",
                    "evaluate.epochs=1", "evaluate.seeds=1", "evaluate.use_gpu=false", "evaluate.batch_size=10",
                    *extra):
        argv += ["--set", setting]
    return argv


@pytest.mark.slow
def test_pipeline_and_report_on_imported_artifacts(ray_session, cifar20, capsys):
    data, authors, _ = cifar20
    run = data.parent / "run"
    threads = torch.get_num_threads()
    assert main(_pipeline(run, authors)) == 0
    torch.set_num_threads(threads)
    log = capsys.readouterr().out
    assert f"squeeze: using the teacher artifact {authors / 'teacher'}" in log
    assert f"stats: using the statistics artifact {authors / 'stats'}" in log
    assert not list(run.glob("teacher-*")) and not list(run.glob("stats-*"))  # the artifacts are used in place
    results = json.loads((run / "results.json").read_text())
    assert results["stages"]["stats"] == str(authors / "stats")
    assert [r["method"] for r in results["rows"]][-1] == "cfm"

    assert main(["report", "--run", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["real"]["covariance"] == "per_batch"
    assert set(report["real"]["eigenvalues"]) == set(LAYERS.values())
    for theirs, ours in LAYERS.items():
        cov = np.load(FIXTURES / "statistic" / "CIFAR-10" / "input" / "ConvFeatureHook" /
                      f"ConvNetW128D3.pth={theirs}" / "running.npz")["running_cov"].astype(np.float64)
        expected = np.clip(np.linalg.eigvalsh((cov + cov.T) / 2)[::-1], 0, None)
        np.testing.assert_allclose(report["real"]["eigenvalues"][ours], expected, rtol=1e-9,
                                   atol=1e-12 * expected[0])
    assert (run / "report.html").is_file()


def test_pipeline_refuses_statistics_of_another_teacher_before_ray_starts(cifar20, digits_stats, capsys):
    data, authors, _ = cifar20
    run = data.parent / "refused"
    assert main(_pipeline(run, authors, f"stats.artifact={digits_stats}")) == 2
    err = capsys.readouterr().err
    assert f"stats.artifact {digits_stats}: the statistics in" in err and "not with this teacher" in err
    assert not list(run.glob("cfm-*"))


def test_stats_artifact_needs_the_teacher_artifact(capsys):
    assert main(["pipeline", "--recipe", "cifar10", "--set", "stats.artifact=somewhere"]) == 2
    err = capsys.readouterr().err
    assert "stats.artifact" in err and "set teacher.artifact" in err
