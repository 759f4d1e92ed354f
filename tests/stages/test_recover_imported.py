"""`unidd-ray recover` on the UniDD authors' imported teacher and statistics, on a tiny CIFAR-10 dataset made
of the 20 real test images in tests/fixtures/unidd_authors (tests/support/authors.py); the recovery distils the 8
classes that have real images (`recover.classes`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from support.authors import prepare_cifar20
from unidd_ray.cli import main


@pytest.fixture(scope="module")
def cifar20(tmp_path_factory) -> tuple[Path, Path, list[int]]:
    return prepare_cifar20(tmp_path_factory.mktemp("cifar20"))


def test_recover_runs_on_the_imported_artifacts(ray_session, cifar20, tmp_path):
    signal, covariance = "class_share", "per_batch"  # the authors' signal and covariance target
    data, authors, classes = cifar20
    out = tmp_path / "distilled"
    threads = torch.get_num_threads()
    argv = ["recover", "--recipe", "cifar10", "--data", str(data), "--teacher", str(authors / "teacher"),
            "--stats", str(authors / "stats"), "--ipc", "1", "--method", "cfm", "--workers", "1", "--out", str(out),
            "--storage-path", str(tmp_path / "ray")]
    for setting in (f"recover.classes=[{','.join(map(str, classes))}]", "recover.iterations=3", "recover.use_gpu=false",
                    "recover.cpus_per_worker=1", "data.num_workers=1", f"recover.signal={signal}",
                    f"recover.covariance={covariance}"):
        argv += ["--set", setting]
    assert main(argv) == 0
    torch.set_num_threads(threads)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["class"] for r in rows) == classes
    assert all(np.isfinite(r["loss_total"]) and r["loss_filter"] > 0 for r in rows)
    with Image.open(out / rows[0]["path"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"


def test_recover_refuses_what_imported_statistics_cannot_serve(cifar20, tmp_path, capsys):
    data, authors, classes = cifar20
    argv = ["recover", "--recipe", "cifar10", "--data", str(data), "--teacher", str(authors / "teacher"),
            "--stats", str(authors / "stats"), "--ipc", "1", "--out", str(tmp_path / "out"),
            "--set", f"recover.classes=[{','.join(map(str, classes))}]", "--set", "recover.covariance=within_class"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot serve the 'within_class' covariance" in err
    assert not (tmp_path / "out").exists()
