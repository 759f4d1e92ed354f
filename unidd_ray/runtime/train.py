"""Ray Train runs of the stages: the trainer, and the retries a run gets.

Ray Train's own retries (``FailureConfig``) retry every failure the same way; here they are off, and
:func:`fit` retries from the driver instead, so that it can tell a worker fault (a process that died, a peer
that went away: worth a restart from the last checkpoint) from a worker refusing its input (a configuration
or data error: the same input fails the same way).  A retry is a new run with the same name and storage, which
Ray Train starts from the run's latest checkpoint, as ``--resume`` does.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from unidd_ray.runtime.rendezvous import FileRendezvousTorchConfig

log = logging.getLogger(__name__)


def torch_config(use_gpu: bool):
    """The ``TorchConfig`` of this project's Ray Train runs: gloo on CPUs, NCCL on GPUs, and a worker group
    on one node forms its process group through a file (:mod:`unidd_ray.runtime.rendezvous`): Ray's default
    rendezvous starts a TCP store on worker 0 that listens on every interface of the machine."""
    return FileRendezvousTorchConfig(backend="nccl" if use_gpu else "gloo")


# Exceptions a worker raises when its configuration or data is wrong (our checks raise ValueError and its
# subclasses; a bad argument to torch raises ValueError or TypeError): running the same inputs again cannot
# succeed, so they are not retried.  Anything else -- a worker process that died, a collective whose peer
# went away (RuntimeError), an I/O error -- is a fault that a restart from the last checkpoint may get past.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError)


class WorkerInputError(ValueError):
    """A Ray Train worker refused its configuration or data; retrying would fail the same way."""


def deterministic_failure(error: BaseException) -> tuple[int, BaseException] | None:
    """The (rank, exception) of the first worker of a failed Ray Train run that raised one of
    ``DETERMINISTIC_ERRORS``, or None when every failure was a fault worth retrying."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], DETERMINISTIC_ERRORS):
            return rank, failures[rank]
    return None


def _fit_once(trainer):
    """``trainer.fit()``, with Ctrl-C told as the interrupt it is.  Ray Train's ``fit`` in the main thread installs
    a SIGINT handler that aborts the run and then exits the process (``SystemExit``) and is never taken back: here
    the exit becomes a ``KeyboardInterrupt`` and the handler before ``fit`` is put back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit as exc:
        raise KeyboardInterrupt("the run was aborted by Ctrl-C") from exc
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def fit(make_trainer, *, what: str, max_failures: int, on_retry=None):
    """``make_trainer().fit()``, retried after a worker fault up to ``max_failures`` times; returns its Result.

    Each retry is a new run with the same name and storage, which Ray Train starts from the run's latest
    checkpoint: what a ``--resume`` does, done by the driver so that it can tell faults from mistakes (Ray
    Train's own ``FailureConfig`` retries every failure; the trainers here are built with
    ``max_failures=0``).  A worker that raised one of ``DETERMINISTIC_ERRORS`` ends the run at once: a
    :class:`WorkerInputError` naming the worker and the error.  ``on_retry(attempt, error)`` is called before
    each retry.
    """
    attempt = 0
    while True:
        try:
            return _fit_once(make_trainer())
        except TrainingFailedError as exc:
            found = deterministic_failure(exc)
            if found is not None:
                rank, error = found
                raise WorkerInputError(f"{what}: worker {rank} refused its input ({type(error).__name__}: "
                                       f"{error})") from exc
            attempt += 1
            if attempt > max_failures:
                raise
            log.warning(f"{what}: a worker failed; restarting from the last checkpoint (retry {attempt} of "
                        f"{max_failures}): {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
            if on_retry is not None:
                on_retry(attempt, exc)


def trainer_factory(loop, config: dict, *, name: str, storage_path: Path, workers: int, cpus_per_worker: float,
                    use_gpu: bool, keep_checkpoints: int | None = 2, trainer_class=TorchTrainer):
    """A zero-argument function making this project's ``TorchTrainer`` for ``loop`` (what :func:`fit` calls per
    attempt): ``workers`` processes of ``cpus_per_worker`` CPUs (and a GPU each with ``use_gpu``), the file
    rendezvous of :func:`torch_config`, the run ``name`` under ``storage_path``, Ray Train's own retries off
    (:func:`fit` retries), the newest ``keep_checkpoints`` checkpoints kept (None: no checkpoints).
    ``trainer_class``: what makes the trainer (tests give a stand-in that records what it was given)."""
    def make():
        checkpoints = {} if keep_checkpoints is None else {
            "checkpoint_config": CheckpointConfig(num_to_keep=keep_checkpoints)}
        return trainer_class(loop, train_loop_config=config, torch_config=torch_config(use_gpu),
                            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                         resources_per_worker={"CPU": cpus_per_worker}),
                            run_config=RunConfig(name=name, storage_path=str(storage_path),
                                                 failure_config=FailureConfig(max_failures=0), **checkpoints))

    return make
