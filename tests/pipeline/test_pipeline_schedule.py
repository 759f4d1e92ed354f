"""The pipeline's recovery scheduling: ``run_at_most`` (tasks side by side, in order, stopping after a
failure), ``recovery_concurrency`` (how many worker groups the cluster holds) and the
``parallel_recoveries`` check.  No Ray cluster is started."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from unidd_ray.config import Recipe, RecoverConfig
from unidd_ray.pipeline import recovery_concurrency, run_at_most, run_pipeline


class _Meter:
    """Counts the tasks running at the same moment."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.started: list[int] = []
        self.threads: set[str] = set()

    def task(self, i: int, seconds: float = 0.05, fail: bool = False, barrier: threading.Barrier | None = None,
             wait_for: threading.Event | None = None, done: threading.Event | None = None):
        """A task that records itself; ``barrier``: wait there for the other tasks sharing it (so they
        are running at the same moment); ``wait_for``: start its sleep once that event is set;
        ``done``: set just before it returns or raises."""

        def run():
            with self.lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
                self.started.append(i)
                self.threads.add(threading.current_thread().name)
            if barrier is not None:
                barrier.wait(timeout=30)  # BrokenBarrierError if the tasks do not run side by side
            if wait_for is not None:
                assert wait_for.wait(timeout=30)
            time.sleep(seconds)
            if done is not None:
                done.set()
            with self.lock:
                self.now -= 1
            if fail:
                raise RuntimeError(f"task {i} failed")
            return i * i

        return run


@pytest.mark.parametrize("at_once", [2, 3])
def test_run_at_most_keeps_order_and_limit(at_once):
    meter = _Meter()
    first = threading.Barrier(at_once)  # the first ``at_once`` tasks must run side by side to get past it
    results = run_at_most(at_once, [meter.task(i, seconds=0.02 * (7 - i), barrier=first if i < at_once else None)
                                    for i in range(7)])
    assert results == [i * i for i in range(7)]  # in task order, although later tasks finish first
    assert meter.peak == at_once
    assert sorted(meter.started) == list(range(7))


def test_run_at_most_one_runs_in_the_calling_thread():
    meter = _Meter()
    assert run_at_most(1, [meter.task(i, seconds=0.0) for i in range(3)]) == [0, 1, 4]
    assert meter.peak == 1 and meter.started == [0, 1, 2]
    assert meter.threads == {threading.current_thread().name}


def test_run_at_most_starts_nothing_after_a_failure_and_raises_it():
    meter = _Meter()
    failed = threading.Event()
    # task 0 is still running when task 1 fails: it ends 0.2 s after task 1 has raised
    tasks = [meter.task(0, seconds=0.2, wait_for=failed), meter.task(1, seconds=0.0, fail=True, done=failed)]
    tasks += [meter.task(i, seconds=0.0) for i in range(2, 6)]
    with pytest.raises(RuntimeError, match="task 1 failed"):
        run_at_most(2, tasks)
    # task 0 was running when task 1 failed: it finished; nothing after the failure started
    assert sorted(meter.started) == [0, 1] and meter.now == 0


def test_recovery_concurrency(monkeypatch):
    import ray

    recipe = Recipe(recover=RecoverConfig(workers=1, cpus_per_worker=1))
    assert recovery_concurrency(replace(recipe, parallel_recoveries=3)) == 3  # the setting wins
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert recovery_concurrency(recipe) == 1  # no cluster yet: one at a time
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert recovery_concurrency(recipe) == 8
    assert recovery_concurrency(replace(recipe, recover=RecoverConfig(workers=2, cpus_per_worker=1.5))) == 2
    assert recovery_concurrency(replace(recipe, recover=RecoverConfig(workers=1, cpus_per_worker=2,
                                                                      use_gpu=True))) == 2  # the GPUs bind
    assert recovery_concurrency(replace(recipe, recover=RecoverConfig(workers=3, cpus_per_worker=4))) == 1


def test_parallel_recoveries_below_one_is_refused_when_the_recipe_is_built(tmp_path):
    from unidd_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"parallel_recoveries must be an integer >= 1 \(or null\), got 0"):
        Recipe(out=str(tmp_path / "run"), parallel_recoveries=0)


def _fake_stages(monkeypatch) -> list[str]:
    """Fake prepare, squeeze and statistics stages (a 10-class, 1-channel, 28 px dataset of 50 images per class
    and its teacher); returns the names of the stages called, in order."""
    from types import SimpleNamespace

    import numpy as np

    from unidd_ray import pipeline

    info = SimpleNamespace(fingerprint="f" * 64, name="fake", storage="raw", resolution=28, num_classes=10, channels=1)
    tinfo = SimpleNamespace(sha256="t" * 64, val_top1=90.0, arch="convnet", resolution=28, num_classes=10,
                            in_channels=1)
    called = []

    def stage(name, result):
        def run(recipe, run, *a, **k):
            called.append(name)
            return run / name, result
        return run

    monkeypatch.setattr(pipeline, "prepare_stage", stage("data", info))
    monkeypatch.setattr(pipeline, "teacher_stage", stage("teacher", tinfo))
    monkeypatch.setattr(pipeline, "stats_stage", lambda recipe, run, *a, **k: (called.append("stats"),
                                                                               (run / "stats", "s" * 12))[1])
    monkeypatch.setattr(pipeline, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "read_labels", lambda data_dir, split: np.repeat(np.arange(10), 50))
    return called


def test_bad_input_of_any_recovery_fails_before_the_first_starts(tmp_path, monkeypatch):
    """The pipeline checks every pending recovery's inputs before starting any (they may run side by side)."""
    from unidd_ray import pipeline

    _fake_stages(monkeypatch)
    checked, started = [], []

    def validate(data_dir, teacher_dir, stats_dir, cfg):
        checked.append(cfg.method)
        if cfg.method == "sre2l":
            raise ValueError("sre2l matches BatchNorm running statistics, but the teacher has no BatchNorm2d layer")

    monkeypatch.setattr(pipeline, "validate_inputs", validate)
    monkeypatch.setattr(pipeline, "run_recover", lambda *a, **k: started.append(a))
    recipe = Recipe(out=str(tmp_path / "run"), methods=["dm", "cfm", "sre2l"], parallel_recoveries=1)
    with pytest.raises(ValueError, match="no BatchNorm2d layer"):
        run_pipeline(recipe, report=False)
    assert checked == ["dm", "cfm", "sre2l"] and started == []


def _recorded_recoveries(monkeypatch) -> tuple[list, list]:
    from unidd_ray import pipeline

    checked, started = [], []
    monkeypatch.setattr(pipeline, "validate_inputs", lambda *a: checked.append(a))
    monkeypatch.setattr(pipeline, "run_recover", lambda *a, **k: started.append(a))
    return checked, started


@pytest.mark.parametrize("recipe, message", [
    ({"ipcs": [1, 60]}, "IPC 60 is larger than the 50 training images of class 0"),
    ({"teacher": {"arch": "convnet", "options": {"width": 8, "depth": 6}}},
     "teacher: convnet with options .* does not build: resolution 28 is too small for 6 pooling stages"),
    ({"evaluate": {"student_options": {"width": 16, "norm": "layer"}}},
     "evaluate: convnet with options .* does not build: unknown norm 'layer'"),
    # 10 classes at IPC 1: a batch of 6 leaves the last batch 4 images, fewer than the 5 workers
    ({"evaluate": {"split": "data", "workers": 5, "batch_size": 6}}, "the last one too.*at least 5"),
])
def test_what_needs_the_data_is_checked_before_the_teacher(tmp_path, monkeypatch, recipe, message):
    """The sets' sizes against the classes, the teacher's and the student's build for the data's shape, and the
    evaluation's batches are checked once the data is prepared, before the teacher is trained."""
    from unidd_ray.config import from_dict

    called = _fake_stages(monkeypatch)
    checked, started = _recorded_recoveries(monkeypatch)
    recipe = from_dict(Recipe, {"out": str(tmp_path / "run"), "methods": ["random", "dm", "cfm"], "ipcs": [1, 10],
                                **recipe})
    with pytest.raises(ValueError, match=message):
        run_pipeline(recipe, report=False)
    assert called == ["data"] and checked == [] and started == []


def test_recover_keys_hold_the_settings_each_method_reads():
    """A cfm-only setting leaves dm's and sre2l's recoveries where they are and moves cfm's; a setting every
    method reads moves them all; cfm reads every setting, so its key is the whole section's."""
    from types import SimpleNamespace

    from unidd_ray.config import ConfigError, to_dict
    from unidd_ray.keys import recover_key, stage_key

    info = SimpleNamespace(fingerprint="f" * 64, storage="raw")
    tinfo = SimpleNamespace(sha256="t" * 64)

    def key(method, **changes):
        try:
            cfg = RecoverConfig(method=method, **changes)
        except ConfigError:
            return None  # a setting the method refuses (krr's one beta has no floor)
        return recover_key(cfg, info, tinfo, "s" * 12 if method not in ("sre2l", "ce") else None)

    methods = ["cfm", "krr", "lfm", "dc", "dm", "mtt", "sre2l", "ce"]
    base = {m: key(m) for m in methods}
    assert len(set(base.values())) == len(methods)

    def moved(**changes):
        return sorted(m for m in methods if key(m, **changes) not in (base[m], None))

    assert moved(beta_max=0.05) == ["cfm", "krr"]
    for cfm_only in ({"schedule": "linear"}, {"beta_min": 1e-3}):
        assert moved(**cfm_only) == ["cfm"]
    assert key("krr", beta_min=1e-3) is None
    assert moved(precision="float32") == ["cfm", "krr"]
    assert moved(mtt_eta=0.2) == ["cfm", "mtt"]  # cfm keeps every setting
    assert moved(bn_weight=0.05) == ["cfm", "sre2l"]
    for matching in ({"alpha": 0.3}, {"alpha_scale": "emu"}, {"signal": "class"}, {"covariance": "within_class"},
                     {"emu": False}):
        assert moved(**matching) == ["cfm", "dc", "dm", "krr", "lfm", "mtt"], matching
    for shared in ({"lr": 0.04}, {"iterations": 7}, {"seed": 3}, {"crop_scale": (0.5, 1.0)}, {"workers": 2},
                   {"batch_classes": 2}, {"flip": False}, {"init": "first"},
                   {"workers": 2, "distribution": "independent"}, {"lr_schedule": "constant"},
                   {"roll": "nonnegative"}, {"augment": False}, {"classes": (0, 2)}):
        assert moved(**shared) == sorted(methods), shared
    assert moved(distribution="independent") == []  # one worker: the same images either way
    for performance in ({"cpus_per_worker": 4}, {"channels_last": False}, {"max_failures": 0}):
        assert moved(**performance) == []

    cfm = RecoverConfig(method="cfm", beta_max=0.03, precision="mixed")
    # every setting but the performance ones, under the names and defaults of the keys stored recoveries have
    former = {k: v for k, v in to_dict(cfm).items()
              if k not in ("batch_classes", "distribution", "init", "lr_schedule", "roll", "augment", "classes")}
    former |= {"classes_per_batch": cfm.batch_classes, "sync": "round"}
    assert recover_key(cfm, info, tinfo, "s" * 12) == stage_key("recover", former, teacher="t" * 64,
                                                               dataset={"fingerprint": "f" * 64}, stats="s" * 12)


def test_unread_settings_name_recover_settings_and_methods():
    import dataclasses

    from unidd_ray.methods import REGISTRY

    fields = {f.name for f in dataclasses.fields(RecoverConfig)}
    for name, method in REGISTRY.items():
        assert method.name == name and set(method.unread) <= fields - {"method", "ipc"}, name


def test_evaluate_key_leaves_out_the_seed_count_and_holds_the_dataset():
    """An evaluation's directory is the same for any seed count (seed k's student does not depend on it) and
    moves with the dataset, the teacher, the images and a setting of the students."""
    from types import SimpleNamespace

    from unidd_ray.config import EvaluateConfig
    from unidd_ray.keys import evaluate_key

    info = SimpleNamespace(fingerprint="f" * 64, storage="raw")
    tinfo = SimpleNamespace(sha256="t" * 64)
    base = evaluate_key(EvaluateConfig(seeds=3), info, tinfo, "images")
    assert evaluate_key(EvaluateConfig(seeds=1), info, tinfo, "images") == base
    assert evaluate_key(EvaluateConfig(seeds=3, cpus_per_worker=4), info, tinfo, "images") == base
    moved = [evaluate_key(EvaluateConfig(seeds=3), SimpleNamespace(fingerprint="g" * 64, storage="raw"), tinfo,
                          "images"),
             evaluate_key(EvaluateConfig(seeds=3), info, SimpleNamespace(sha256="u" * 64), "images"),
             evaluate_key(EvaluateConfig(seeds=3), info, tinfo, "other images"),
             evaluate_key(EvaluateConfig(seeds=3, epochs=7), info, tinfo, "images")]
    assert base not in moved and len(set(moved)) == len(moved)


def test_data_key_leaves_out_the_training_resolution():
    """prepare does not read ``data.resolution``: the prepared dataset's key is the same for any."""
    from unidd_ray.config import DataConfig
    from unidd_ray.keys import data_key

    at16 = Recipe(data=DataConfig(dataset="digits", resolution=16))
    assert data_key(at16) == data_key(replace(at16, data=replace(at16.data, resolution=32))) == \
        data_key(replace(at16, data=replace(at16.data, resolution=None)))
    for stored in ({"max_resolution": 128}, {"jpeg_quality": 80}, {"dataset": "fashion-mnist"}, {"root": "/d"}):
        assert data_key(replace(at16, data=replace(at16.data, **stored))) != data_key(at16), stored


def test_a_run_directory_of_another_cache_format_is_refused(tmp_path):
    """Its stages were named under other keys: reusing none of them silently would recompute everything beside
    them, so the run is refused with the fix before any stage starts; a new or current-format directory
    passes."""

    from unidd_ray.artifacts.files import RUN_RECORD
    from unidd_ray.config import ConfigError
    from unidd_ray.keys import CACHE_FORMAT
    from unidd_ray.pipeline import check_run_format

    run = tmp_path / "run"
    check_run_format(run)  # not there yet
    run.mkdir()
    check_run_format(run)  # empty
    (run / "data-0123456789ab").mkdir()
    with pytest.raises(ConfigError, match=r"cache format 1; this one names them under format 2.*--set out=DIR"):
        check_run_format(run)  # stages and no record: the first format wrote none
    (run / RUN_RECORD).write_text(json.dumps({"format": 1}))
    with pytest.raises(ConfigError, match="cache format 1"):
        check_run_format(run)
    (run / RUN_RECORD).write_text(json.dumps({"format": CACHE_FORMAT}))
    check_run_format(run)
    assert sorted(p.name for p in run.iterdir()) == ["data-0123456789ab", RUN_RECORD]  # nothing was touched


def test_each_ipc_recovers_with_its_recover_by_ipc_entry(tmp_path, monkeypatch):
    """The pipeline gives every method the recover settings of its IPC: the ``recover_by_ipc`` entry over the
    section; an IPC without one keeps the section's settings, and so its stage key.  Each set's config.yaml holds
    its resolved settings, and the random subset of an IPC is drawn with that IPC's seed, like the recoveries'
    real starts."""
    import yaml

    from unidd_ray.config import from_dict
    from unidd_ray import pipeline
    from unidd_ray.keys import random_key, recover_key

    _fake_stages(monkeypatch)
    started = []

    def run(data_dir, teacher_dir, stats_dir, out, cfg, **kwargs):
        started.append((cfg, yaml.safe_load(kwargs["recipe_yaml"])))
        if len(started) == 4:
            raise RuntimeError("recorded")  # the plan is what is tested: stop before the evaluations

    monkeypatch.setattr(pipeline, "validate_inputs", lambda *a: None)
    monkeypatch.setattr(pipeline, "run_recover", run)
    base = Recipe(out=str(tmp_path / "run"), methods=["dm", "cfm"], ipcs=[1, 10], recover=RecoverConfig(lr=0.05),
                  parallel_recoveries=1)
    recipe = replace(base, recover_by_ipc={1: {"lr": 0.1, "seed": 3}})
    with pytest.raises(RuntimeError, match="recorded"):
        run_pipeline(recipe, report=False)
    cfgs = [cfg for cfg, _ in started]
    assert [(c.method, c.ipc, c.lr, c.seed) for c in cfgs] == [("dm", 1, 0.1, 3), ("cfm", 1, 0.1, 3),
                                                               ("dm", 10, 0.05, 0), ("cfm", 10, 0.05, 0)]
    for cfg, written in started:  # a recipe whose recover section is the set's own
        assert from_dict(Recipe, written).recover == cfg
    info = SimpleNamespace(fingerprint="f" * 64, storage="raw", resolution=28)
    tinfo = SimpleNamespace(sha256="t" * 64, resolution=28)
    assert recover_key(cfgs[3], info, tinfo, "s") == recover_key(base.recover_for(10, method="cfm"), info, tinfo, "s")
    assert random_key(recipe, 1, info, tinfo) == random_key(replace(base, recover=RecoverConfig(seed=3)), 1, info,
                                                           tinfo)
    assert random_key(recipe, 10, info, tinfo) == random_key(base, 10, info, tinfo)


def test_recovery_concurrency_fits_the_largest_worker_group(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    recipe = Recipe(recover=RecoverConfig(workers=1, cpus_per_worker=1))
    assert recovery_concurrency(recipe, [RecoverConfig(workers=1, cpus_per_worker=1)] * 2) == 8
    assert recovery_concurrency(recipe, [RecoverConfig(workers=1, cpus_per_worker=1),
                                         RecoverConfig(workers=2, cpus_per_worker=2)]) == 2


def test_a_damaged_set_is_recovered_again_and_an_intact_one_reused(tmp_path, monkeypatch, capsys):
    """A stored set is verified before it is reused (every image's checksum): a damaged one is discarded and
    recovered again, an intact one is reused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unidd_ray.artifacts.files import atomic_write_json, write_manifest
    from unidd_ray import pipeline
    from unidd_ray.keys import CACHE_FORMAT, recover_key

    _fake_stages(monkeypatch)
    started = []

    def run(data_dir, teacher_dir, stats_dir, out, cfg, **kwargs):
        started.append(cfg.method)
        raise RuntimeError("recorded")  # the plan is what is tested: stop before the evaluations

    monkeypatch.setattr(pipeline, "validate_inputs", lambda *a: None)
    monkeypatch.setattr(pipeline, "run_recover", run)
    recipe = Recipe(out=str(tmp_path / "run"), methods=["dm", "cfm"], ipcs=[1], parallel_recoveries=1)
    run_dir = recipe.run_dir.resolve()
    atomic_write_json(run_dir / "pipeline.json", {"format": CACHE_FORMAT, "stages": {}})  # an earlier run's
    info = SimpleNamespace(fingerprint="f" * 64, storage="raw")
    tinfo = SimpleNamespace(sha256="t" * 64)
    sets = {}
    for method in ("dm", "cfm"):
        key = recover_key(recipe.recover_for(1, method=method), info, tinfo, "s" * 12)
        sets[method] = run_dir / f"{method}-ipc1-{key}"
        (sets[method] / "images").mkdir(parents=True)
        (sets[method] / "images" / "0.png").write_bytes(b"png")
        pq.write_table(pa.Table.from_pylist([{"path": "images/0.png", "class": 0}]), sets[method] / "manifest.parquet")
        write_manifest(sets[method], "distilled", dataset_fingerprint="f" * 64)
    (sets["cfm"] / "images" / "0.png").write_bytes(b"pnh")
    with pytest.raises(RuntimeError, match="recorded"):
        run_pipeline(recipe, report=False)
    assert started == ["cfm"]
    log = capsys.readouterr().out
    damaged = sets["cfm"] / "images" / "0.png"
    assert f"{sets['cfm'].name} is damaged ({damaged} does not match its recorded sha256" in log
    assert f"recover dm IPC 1: reusing {sets['dm']}" in log
    assert not sets["cfm"].exists() and (sets["dm"] / "images" / "0.png").read_bytes() == b"png"
