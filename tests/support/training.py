"""A stand-in for Ray Train's trainer, for checks that must come before any training starts."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class TrainingStarted(Exception):
    """Raised by :class:`StubTrainer` where Ray Train would start the workers."""

    configs: ClassVar[list] = []  # the train_loop_config of every start


class StubTrainer:
    """A ``trainer_class`` for the stages (``trainer_class=...``): it records its ``train_loop_config``, makes the
    run directory (as Ray Train does for its checkpoints) and raises :class:`TrainingStarted` instead of
    training."""

    def __init__(self, *args, run_config, train_loop_config=None, **kwargs):
        self.run_dir = Path(run_config.storage_path) / run_config.name
        TrainingStarted.configs.append(train_loop_config)

    def fit(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        raise TrainingStarted("training would start here")
