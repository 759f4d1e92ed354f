"""The ImageNet-1K rehearsal: the ``imagenet1k`` recipe through every stage on a three-node Ray cluster, with a
statistics actor and a recovery worker killed mid-run, gives the artifacts of an uninterrupted run.

ImageNet-shaped data (``unidd-ray rehearsal-data``: ``n0xxxxxxx`` class folders of 180–500 px JPEGs, some
grayscale and CMYK, a flat val folder with its label file) and a torchvision-format ResNet-18 state dict saved
from a seeded random init stand in for ImageNet and torchvision's weights.  The recipe is overridden only in its
counts (classes through the data, IPC 2, seeds, actors and workers, the CPUs each takes, the statistics batch and
block so that the images make several units), iterations and epochs; everything else (224 px, the ResNet-18
teacher with ImageNet's stem and normalisation, the authors' batch of 200 classes, EMU, their roll, the exact
distributed mode, the ``paper`` evaluation protocol with temperature 20) is the recipe's.

A head and two worker nodes (``ray.cluster_utils.Cluster``, 1 CPU each, bound to 127.0.0.1) run two pipelines:
the reference, uninterrupted, and one in which

- ``stats``: 4 actors; once the first unit is folded, one actor is killed (``ray.kill``): its unit is re-run on
  another actor;
- ``recover``: 4 workers in the exact mode; the last worker's process is killed (SIGKILL) once the first round is
  written: Ray Train restarts the group from the last checkpoint (``recover.max_failures``).

Every artifact directory has the same name (content key) in both runs and the same bytes, except the records of
wall time and of the faults themselves (compared with those fields removed) and the prepared data's ``.beton``
files: FFCV's writer processes (one per core) claim pages in the order they finish, so two preparations of one
source hold the same samples in different layouts (and checksums); their decoded samples are compared.

``UNIDD_REHEARSAL_CLASSES`` (default 100) sets the class count: 1000 is ImageNet's (about 50 min on 2 cores).
The cluster lives in a child process (this file run as a script): the other test modules share the session's
embedded Ray, and a process holds one Ray connection.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest

CLASSES = int(os.environ.get("UNIDD_REHEARSAL_CLASSES", "100"))
RUNS = ("reference", "interrupted")
# fields that record wall time or the faults (they differ between the runs by design); everything else is equal
TIMING = {"seconds", "trained_seconds", "wall_seconds", "images_per_s", "finished", "retried_units",
          "batches_executed", "batches_redone", "executions"}
# the tables of results.json and report.json, with wall times in them: those two are compared
RENDERED = {"results.md", "report.html"}
STRUCTURED = (".json", ".jsonl", ".yaml")  # compared parsed (JSON without TIMING) or with the run's path replaced


def overrides(data: Path, weights: Path, run: Path) -> list[str]:
    """The imagenet1k recipe's overrides: data and weights, counts, iterations, epochs and CPU resources."""
    return [f"out={run}", f"data.root={data}", f"data.options.val_labels={data / 'LOC_val_solution.csv'}",
            "data.num_workers=1", f"teacher.weights={weights}", "squeeze.use_gpu=false", "squeeze.cpus_per_worker=1",
            "stats.actors=4", "stats.gpus_per_actor=0", "stats.cpus_per_actor=0.5", "stats.batch_size=32",
            "stats.block_size=32",
            "recover.workers=4", "recover.use_gpu=false", "recover.cpus_per_worker=0.5", "recover.iterations=2",
            "ipcs=[2]", "methods=[cfm]",
            "evaluate.epochs=1", "evaluate.seeds=1", "evaluate.use_gpu=false", "evaluate.workers=1",
            "evaluate.cpus_per_worker=1"]


# ----------------------------------------------------------------------------- the child process
def _kill_one_actor(log: dict, unit, pool) -> None:
    """After the first folded unit: record the node of every actor, then kill one (the lowest key)."""
    import ray

    if log.get("killed") is not None:
        return
    log["actor_nodes"] = sorted(ray.get([actor.node_id.remote() for actor in pool.values()]))
    key = min(pool)
    log["killed"] = str(key)
    ray.kill(pool[key], no_restart=True)


def _child(data: str, weights: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import unidd_ray.pipeline as pipeline
    from unidd_ray.config import load_recipe
    from unidd_ray.runtime.cluster import SETUP_HOOK
    from unidd_ray.stages.recover import FaultPlan

    out_dir = Path(out)
    local = dict(node_ip_address="127.0.0.1", num_cpus=1, object_store_memory=200 * 1024 ** 2)
    cluster = Cluster(initialize_head=True, head_node_args=dict(local, include_dashboard=False))
    for _ in range(2):
        cluster.add_node(**local)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1",
             runtime_env={"worker_process_setup_hook": SETUP_HOOK}, logging_level="WARNING")
    report: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    run_stats, run_recover = pipeline.run_stats, pipeline.run_recover
    try:
        for name in RUNS:
            faults: dict = {}
            if name == "interrupted":
                pipeline.run_stats = partial(run_stats, on_result=partial(_kill_one_actor, faults))
                # the last of the 4 workers dies once the first round (4 batches, one per worker) is written
                pipeline.run_recover = partial(run_recover, faults=FaultPlan(after_batches=4, kill=True))
            recipe = load_recipe("imagenet1k", overrides=overrides(Path(data), Path(weights), out_dir / name))
            t0 = time.perf_counter()
            pipeline.run_pipeline(recipe, ray_log=False, command="rehearsal")
            report[name] = {"seconds": time.perf_counter() - t0, **faults}
            pipeline.run_stats, pipeline.run_recover = run_stats, run_recover
    finally:
        pipeline.run_stats, pipeline.run_recover = run_stats, run_recover
        ray.shutdown()
        cluster.shutdown()
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("rehearsal")
    data, weights = root / "inet", root / "resnet18.pth"
    subprocess.run([sys.executable, "-m", "unidd_ray.cli", "rehearsal-data", "--out", str(data), "--classes",
                    str(CLASSES), "--train-per-class", "3", "--val-per-class", "1", "--seed", "0"], check=True,
                   capture_output=True)
    code = ("import unidd_ray, torch, torchvision, sys; torch.manual_seed(0); "
            "torch.save(torchvision.models.resnet18(num_classes=int(sys.argv[2])).state_dict(), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(weights), str(CLASSES)], check=True)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the nodes and the driver on 127.0.0.1 (test_stats_multinode)
    with tempfile.TemporaryDirectory(prefix="rr", dir="/tmp") as ray_tmp:  # short: Unix socket paths
        env["RAY_TMPDIR"] = ray_tmp
        proc = subprocess.run([sys.executable, __file__, str(data), str(weights), str(root)], env=env,
                              capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return json.loads((root / "report.json").read_text()), root


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _files(run: Path) -> dict[str, Path]:
    """Every file of a run directory's artifacts and results, by path relative to it (Ray's log, Train's own
    storage, the locks and the rendered tables left out)."""
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in {"ray.log", *RENDERED} and not p.name.endswith(".lock")
            and not any(part.endswith(".ray") for part in p.relative_to(run).parts)}


def _samples(data_dir: Path, split: str) -> list[str]:
    """The decoded samples of a prepared split, in index order: sha256 of each (image, label, index)."""
    from unidd_ray.data.loading import make_loader

    loader = make_loader(data_dir, split, batch_size=64, num_workers=1, order="sequential", normalize=False)
    digests = {}
    for images, labels, index in loader:
        for x, y, i in zip(images, labels.tolist(), index.tolist()):
            digests[i] = hashlib.sha256(x.contiguous().numpy().tobytes() + str(y).encode()).hexdigest()
    return [digests[i] for i in sorted(digests)]


def _content(path: Path, run: Path):
    """What must be equal in a file: the bytes (as sha256); for JSON its value without the timing fields, with
    the run directory's path replaced (results.json and the configs record where the run is); for a manifest
    the checksums of its binary files (its structured files are compared themselves)."""
    text = path.read_text().replace(str(run), "RUN") if path.suffix in STRUCTURED else None
    if path.suffix == ".beton":
        return _samples(path.parent, path.stem)
    if path.name == "dataset.json":  # the .beton checksums aside (see the module's docstring)
        return {k: v for k, v in json.loads(text).items() if k not in ("files", "info_sha256")}
    if path.name == "report.json":
        return {k: v for k, v in _without_timing(json.loads(text)).items() if k != "run"}  # the run's name
    if path.name == "manifest.json":
        value = json.loads(text)
        value["files"] = {k: v for k, v in value.get("files", {}).items() if not k.endswith(STRUCTURED)}
        return value
    if path.suffix == ".json":
        return _without_timing(json.loads(text))
    if path.suffix == ".jsonl":
        return [_without_timing(json.loads(line)) for line in text.splitlines()]
    if text is not None:
        return text
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_interrupted_rehearsal_equals_the_uninterrupted_one(rehearsal):
    report, root = rehearsal
    assert report["nodes"] == 3
    faults = report["interrupted"]
    assert faults["killed"] is not None
    assert len(set(faults["actor_nodes"])) >= 2, faults  # the statistics actors were spread over nodes
    ref, got = root / "reference", root / "interrupted"
    stages = sorted(p.name for p in ref.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert stages == sorted(p.name for p in got.iterdir() if p.is_dir() and not p.name.startswith("."))
    kinds = {name.rsplit("-", 1)[0] for name in stages}
    assert {"data", "teacher", "stats", "cfm-ipc2", "eval-cfm-ipc2"} <= kinds, stages
    files_ref, files_got = _files(ref), _files(got)
    assert sorted(files_ref) == sorted(files_got)
    different = [rel for rel in files_ref if _content(files_ref[rel], ref) != _content(files_got[rel], got)]
    assert different == []
    # the faults happened and were recovered from
    stats = json.loads(next(got.glob("stats-*/summary.json")).read_text())
    assert stats["retried_units"] >= 1
    recovered = json.loads(next(got.glob("cfm-ipc2-*/summary.json")).read_text())
    assert recovered["batches_redone"], recovered
    assert json.loads(next(ref.glob("cfm-ipc2-*/summary.json")).read_text())["batches_redone"] == []
    # the rehearsal ran at ImageNet's shape: 224-px images of every class, the evaluation's figure recorded
    results = json.loads((got / "results.json").read_text())
    row = results["rows"][-1]
    assert (row["method"], row["ipc"], row["protocol"]) == ("cfm", 2, "paper")
    assert len(row["top1"]) == 1 and 0 <= row["top1"][0] <= 100
    manifest = json.loads(next(got.glob("cfm-ipc2-*/summary.json")).read_text())
    assert manifest["num_classes"] == CLASSES and manifest["images"] == 2 * CLASSES
    assert (got / "report.html").is_file()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import faulthandler

    faulthandler.dump_traceback_later(3500, exit=True)  # a hang shows where, before the test's timeout
    _child(*sys.argv[1:4])
