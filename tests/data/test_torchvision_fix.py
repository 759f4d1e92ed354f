"""The torchvision import fix of SPEC §2.3 works in a fresh interpreter and inside Ray workers."""

import subprocess
import sys


def test_torchvision_imports_in_a_fresh_subprocess_after_unidd_ray():
    code = ("import unidd_ray, torchvision; m = torchvision.models.resnet18(); "
            "print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) == 11_689_512  # ResNet-18 with 1000 classes


def _build_resnet18_in_worker():
    import torchvision  # no unidd_ray import here: the worker setup hook applies the fix

    return sum(p.numel() for p in torchvision.models.resnet18().parameters())


def test_torchvision_imports_inside_a_ray_task(ray_session):
    ray = ray_session
    task = ray.remote(_build_resnet18_in_worker)
    assert ray.get(task.remote(), timeout=120) == 11_689_512


def _cleaner_log_level():
    import logging

    from unidd_ray.runtime.cluster import _CLEANER_LOGGER

    return logging.getLogger(_CLEANER_LOGGER).getEffectiveLevel()


def test_embedded_workers_silence_the_placement_group_cleaner_warning(ray_session):
    """The embedded instance runs without the dashboard, so Ray Train's placement-group cleaner cannot
    reach the State API and would warn every second of a run; its workers show that logger's errors only."""
    import logging

    ray = ray_session
    assert ray.get(ray.remote(_cleaner_log_level).remote(), timeout=120) == logging.ERROR
    assert _cleaner_log_level() < logging.ERROR  # the driver's own logging is left alone
