"""Shared fixtures: one embedded Ray per test session, small prepared datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from support.training import TrainingStarted

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the test folders mirror the package; pytest imports each test module by its (unique) file name from its folder
FOLDERS = sorted(str(p) for p in HERE.iterdir() if p.is_dir() and any(p.glob("test_*.py")))

# Tests run Ray without token authentication (the job-submission test turns it on for its own cluster),
# and Ray workers must be able to import the helpers (tests/support) and the test modules that define their code.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), *FOLDERS, str(ROOT),
                                            os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray with 4 logical CPUs, started once per test session."""
    import ray

    from unidd_ray.runtime.cluster import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if a command starts or joins Ray (the CLI's start, the pipeline's, any other)."""
    from unidd_ray import cli, pipeline
    from unidd_ray.runtime import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "start_ray", refuse)
    monkeypatch.setattr(pipeline, "init_ray", refuse)
    monkeypatch.setattr(cluster, "init_ray", refuse)


@pytest.fixture
def no_training():
    """For checks that come before any training: the exception a stage given ``trainer_class=StubTrainer``
    raises where its workers would start (``no_training.configs`` lists what each start was given)."""
    TrainingStarted.configs.clear()
    return TrainingStarted


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> Path:
    """scikit-learn's digits prepared as FFCV files (1438 train / 359 val, 8 px, 10 classes)."""
    from unidd_ray.data.prepare import prepare_dataset
    from unidd_ray.data.sources import load_source

    out = tmp_path_factory.mktemp("digits") / "data"
    prepare_dataset(load_source("digits"), out)
    return out


@pytest.fixture(scope="session")
def digits_teacher(digits_data, tmp_path_factory) -> Path:
    """A small ConvNet teacher trained in-process on ``digits_data`` (no Ray): ~95 % val top-1."""
    import torch
    import torch.nn.functional as F

    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.data.loading import make_loader
    from unidd_ray.artifacts.teacher import TeacherInfo, save_teacher

    info = read_dataset_info(digits_data)
    tinfo = TeacherInfo(arch="convnet", options={"width": 32, "depth": 2, "norm": "batch"},
                        num_classes=info.num_classes, in_channels=info.channels, resolution=info.resolution,
                        dataset=info.name, dataset_fingerprint=info.fingerprint, mean=list(info.mean),
                        std=list(info.std))
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = tinfo.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(str(digits_data), "train", batch_size=64, train=False, num_workers=1,
                         order="random", seed=0)
    for _ in range(8):
        model.train()
        for x, y, _ in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)  # FFCV loaders change torch's thread count
    out = tmp_path_factory.mktemp("digits") / "teacher"
    save_teacher(model.eval(), tinfo, out)
    return out


@pytest.fixture(scope="session")
def digits_stats(ray_session, digits_data, digits_teacher, tmp_path_factory) -> Path:
    """Statistics of ``digits_teacher`` over ``digits_data`` from two Ray actors."""
    from unidd_ray.config import StatsConfig
    from unidd_ray.stages.stats import run_stats

    out = tmp_path_factory.mktemp("digits") / "stats"
    run_stats(digits_data, digits_teacher, out, StatsConfig(actors=2, batch_size=128, block_size=256),
              progress=False)
    return out
