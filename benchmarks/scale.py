"""The imagenet1k recipe at 100 and at 1,000 classes: wall time and peak memory of each stage, per process role.

For each class count K it writes an ImageNet-shaped folder (``unidd-ray rehearsal-data``: K classes of
``--train-per-class`` JPEGs of 180–500 px, ``--val-per-class`` flat val JPEGs per class), a seeded random-init
torchvision-format ResNet-18 with K outputs, and runs ``unidd-ray pipeline --recipe imagenet1k`` on them with only
counts, iterations, epochs and the CPU resources overridden (``squeeze.epochs`` 0 as the recipe has it, 4 stats
actors, 4 recovery workers in the exact mode at IPC ``--ipc``, ``--iterations`` iterations, one evaluation epoch of
one seed).  While it runs, every process is sampled every ``--interval`` seconds (resident set size, psutil):

- ``driver``: the pipeline process (it also folds the statistics: the reducer of the stats stage);
- ``stats_actor``: the largest ``ray::StatsWorker`` process;
- ``train_worker``: the largest ``ray::RayTrainWorker`` process (squeeze, recover, evaluate).

A stage runs from its ``[pipeline]`` line to the next stage's (``report`` from the results table to ``done``); its
wall time is the difference of those lines' arrival times here.  A role's peak in a stage is over the processes of
that role alive during it: Ray keeps a finished stage's worker processes for a while, so the first seconds of a
stage may still see the previous stage's.  The growth from the smallest to the largest K of
each figure is written beside them: a stage whose work is linear in the classes grows by K_max / K_min.

    python benchmarks/scale.py                       # 100 and 1,000 classes: ~30 min on 2 cores; writes
                                                     # benchmarks/results/scale.json
    python benchmarks/scale.py --classes 10,100 --workdir /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import write_result  # noqa: E402

STAGES = [("prepare", re.compile(r"\] prepare:")), ("squeeze", re.compile(r"\] squeeze:")),
          ("stats", re.compile(r"\] stats:")), ("recover", re.compile(r"\] (\d+ recoveries|recover \w+ IPC)")),
          ("evaluate", re.compile(r"\] evaluate \w+ IPC")), ("report", re.compile(r"^# .*distillation results")),
          ("done", re.compile(r"\] done in"))]
ROLES = {"stats_actor": "ray::StatsWorker", "train_worker": "ray::RayTrainWorker"}


class Sampler:
    """Peak resident memory (MB) per role and stage, from a thread polling every process."""

    def __init__(self, driver: int, interval: float):
        self.driver, self.interval = driver, interval
        self.stage = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _record(self, role: str, rss: int) -> None:
        stage = self.peaks.setdefault(self.stage, {})
        stage[role] = max(stage.get(role, 0.0), rss / 2**20)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                info = proc.info
                if info["memory_info"] is None:
                    continue
                if info["pid"] == self.driver:
                    self._record("driver", info["memory_info"].rss)
                    continue
                title = " ".join(info["cmdline"] or [])
                for role, prefix in ROLES.items():
                    if title.startswith(prefix):
                        self._record(role, info["memory_info"].rss)
            self._stop.wait(self.interval)


def prepare_inputs(workdir: Path, classes: int, args) -> tuple[Path, Path]:
    """The rehearsal folder and the random-init weights for ``classes`` classes (reused when present)."""
    data = workdir / f"inet-{classes}"
    if not (data / "rehearsal.json").is_file():
        subprocess.run([sys.executable, "-m", "unidd_ray.cli", "rehearsal-data", "--out", str(data), "--classes",
                        str(classes), "--train-per-class", str(args.train_per_class), "--val-per-class",
                        str(args.val_per_class), "--seed", "0"], check=True)
    weights = workdir / f"resnet18-{classes}.pth"
    if not weights.is_file():
        code = ("import unidd_ray, torch, torchvision, sys; torch.manual_seed(0); "
                "torch.save(torchvision.models.resnet18(num_classes=int(sys.argv[2])).state_dict(), sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(weights), str(classes)], check=True)
    return data, weights


def run_once(workdir: Path, classes: int, args) -> dict:
    data, weights = prepare_inputs(workdir, classes, args)
    run = workdir / f"run-{classes}"
    if run.exists():
        subprocess.run(["rm", "-rf", str(run)], check=True)  # this script's own run directory
    settings = [f"out={run}", f"data.root={data}", f"data.options.val_labels={data / 'LOC_val_solution.csv'}",
                "data.num_workers=1", f"teacher.weights={weights}", "squeeze.use_gpu=false", "stats.actors=4",
                "stats.gpus_per_actor=0", "stats.cpus_per_actor=0.5", "recover.workers=4", "recover.use_gpu=false",
                "recover.cpus_per_worker=0.5", f"recover.iterations={args.iterations}", f"ipcs=[{args.ipc}]",
                "methods=[cfm]", "evaluate.epochs=1", "evaluate.seeds=1", "evaluate.use_gpu=false",
                "evaluate.workers=1", "evaluate.cpus_per_worker=1"]
    cmd = [sys.executable, "-m", "unidd_ray.cli", "pipeline", "--recipe", "imagenet1k"]
    for s in settings:
        cmd += ["--set", s]
    marks: list[tuple[str, float]] = []
    log = []
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    with Sampler(proc.pid, args.interval) as sampler:
        for line in proc.stdout:
            log.append(line)
            for stage, pattern in STAGES:
                if pattern.search(line) and (not marks or marks[-1][0] != stage):
                    marks.append((stage, time.perf_counter() - started))
                    sampler.stage = stage
        proc.wait()
    if proc.returncode:
        raise SystemExit(f"the pipeline at {classes} classes failed (rc {proc.returncode}):\n" + "".join(log[-40:]))
    stages = {}
    for (stage, t0), (_, t1) in zip(marks, marks[1:]):
        entry = stages.setdefault(stage, {"seconds": 0.0})
        entry["seconds"] = round(entry["seconds"] + t1 - t0, 1)
        entry.update({f"{role}_peak_mb": round(mb, 1) for role, mb in sampler.peaks.get(stage, {}).items()})
    sizes = {p.name.split("-")[0]: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
             for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return {"classes": classes, "total_seconds": round(time.perf_counter() - started, 1), "stages": stages,
            "artifact_mb": {k: round(v, 1) for k, v in sizes.items()}}


def growth(runs: list[dict]) -> dict:
    """Each stage's figures at the largest class count over the smallest."""
    small, large = runs[0], runs[-1]
    out = {"classes": large["classes"] / small["classes"]}
    for stage, figures in large["stages"].items():
        base = small["stages"].get(stage, {})
        out[stage] = {k: round(v / base[k], 2) for k, v in figures.items() if base.get(k)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="100,1000", help="comma-separated class counts, smallest first")
    parser.add_argument("--train-per-class", type=int, default=3)
    parser.add_argument("--val-per-class", type=int, default=1)
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--workdir", default="/tmp/unidd-scale")
    parser.add_argument("--out", default="scale", help="the result's name: benchmarks/results/<out>.json")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.classes.split(","))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for classes in counts:
        runs.append(run_once(workdir, classes, args))
        print(json.dumps(runs[-1], indent=1), flush=True)
    result = {"settings": {k: getattr(args, k) for k in ("train_per_class", "val_per_class", "ipc", "iterations")},
              "runs": runs, "growth": growth(runs) if len(runs) > 1 else None}
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
