"""Shared fixtures: one embedded Ray per test session, small prepared datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Tests run Ray without token authentication (the job-submission test turns it on for its own cluster),
# and Ray workers must be able to import helpers defined in this folder.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray with 4 logical CPUs, started once per test session."""
    import ray

    from unidd_ray.ray_utils import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
