"""A worker that refuses its input ends the run at once (no retries, one clear error, nothing left behind); a
worker fault is retried from the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.train import WorkerGroupError

from unidd_ray.runtime.train import WorkerInputError, deterministic_failure, fit


class _Trainer:
    """Stands in for a TorchTrainer whose workers fail as ``failures`` says (one entry per attempt)."""

    def __init__(self, failures: list[dict], attempts: list[int]):
        self.failures, self.attempts = failures, attempts

    def fit(self):
        self.attempts.append(len(self.attempts))
        failure = self.failures[len(self.attempts) - 1]
        if failure:
            raise WorkerGroupError("workers failed", failure)
        return "result"


def test_a_worker_refusing_its_input_is_not_retried():
    attempts = []
    failures = [{0: RuntimeError("Connection closed by peer"), 1: ValueError("Invalid beta parameter at index 0: 2.0")}]
    with pytest.raises(WorkerInputError, match=r"recover cfm: worker 1 refused its input \(ValueError: Invalid beta"):
        fit(lambda: _Trainer(failures, attempts), what="recover cfm", max_failures=5)
    assert attempts == [0]


def test_a_worker_fault_is_retried_up_to_max_failures():
    attempts, retried = [], []
    fault = {0: RuntimeError("worker died")}
    assert fit(lambda: _Trainer([fault, fault, {}], attempts), what="x", max_failures=2,
               on_retry=lambda n, e: retried.append(n)) == "result"
    assert attempts == [0, 1, 2] and retried == [1, 2]
    attempts.clear()
    with pytest.raises(WorkerGroupError):
        fit(lambda: _Trainer([fault, fault, fault], attempts), what="x", max_failures=1)
    assert attempts == [0, 1]
    assert deterministic_failure(WorkerGroupError("", {0: KeyError("k")})) is not None
    assert deterministic_failure(WorkerGroupError("", {0: OSError("disk")})) is None


def refusing_loop(config: dict) -> None:
    """A Ray Train loop (importable by the workers) that records each attempt, then fails as asked."""
    with open(config["attempts"], "a") as f:
        f.write("attempt\n")
    if config["kind"] == "input":
        raise ValueError("recover.adam_betas: Invalid beta parameter at index 0: 2.0")
    raise RuntimeError("a worker fault")


def _trainer(tmp_path: Path, kind: str):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from unidd_ray.runtime.train import torch_config

    return lambda: TorchTrainer(refusing_loop, train_loop_config={"attempts": str(tmp_path / "attempts"), "kind": kind},
                                torch_config=torch_config(False),
                                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                                run_config=RunConfig(name="run", storage_path=str(tmp_path / "ray"),
                                                     failure_config=FailureConfig(max_failures=0)))


def test_a_real_worker_refusing_its_input_runs_once(ray_session, tmp_path):
    with pytest.raises(WorkerInputError, match="worker 0 refused its input .*Invalid beta parameter"):
        fit(_trainer(tmp_path, "input"), what="test", max_failures=3)
    assert (tmp_path / "attempts").read_text().count("attempt") == 1


@pytest.mark.slow
def test_a_real_worker_fault_is_retried(ray_session, tmp_path):
    with pytest.raises(WorkerGroupError, match="a worker fault"):
        fit(_trainer(tmp_path, "fault"), what="test", max_failures=1)
    assert (tmp_path / "attempts").read_text().count("attempt") == 2


def test_a_refused_recovery_leaves_no_staging_or_checkpoints(digits_data, digits_teacher, digits_stats, tmp_path,
                                                            monkeypatch):
    from unidd_ray.config import RecoverConfig
    from unidd_ray.stages import recover

    def refuse(make_trainer, **kwargs):
        assert (tmp_path / "out.partial" / "plan.json").is_file()  # the run had started
        (tmp_path / "ray" / "recover").mkdir(parents=True)  # as Ray Train makes it
        raise WorkerInputError("recover cfm: worker 0 refused its input (ValueError: bad)")

    monkeypatch.setattr(recover, "fit", refuse)
    with pytest.raises(WorkerInputError):
        recover.run_recover(digits_data, digits_teacher, digits_stats, tmp_path / "out", RecoverConfig(ipc=1),
                            storage_path=tmp_path / "ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_refused_teacher_training_leaves_no_checkpoints(digits_data, tmp_path, monkeypatch):
    from unidd_ray.config import DataConfig, ModelConfig, SqueezeConfig
    from unidd_ray.stages import squeeze

    def refuse(make_trainer, **kwargs):
        (tmp_path / "ray" / "squeeze").mkdir(parents=True)
        raise WorkerInputError("squeeze: worker 0 refused its input (ValueError: bad)")

    monkeypatch.setattr(squeeze, "fit", refuse)
    with pytest.raises(WorkerInputError):
        squeeze.squeeze(digits_data, tmp_path / "teacher", squeeze_cfg=SqueezeConfig(epochs=1, batch_size=64),
                        model_cfg=ModelConfig(options={"width": 8, "depth": 1}), data_cfg=DataConfig("digits"),
                        storage_path=tmp_path / "ray")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
