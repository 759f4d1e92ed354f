"""Recovery cost: seconds per iteration and peak memory of CE-only, SRe2L and CFM; 1 vs 2 Ray workers.

Part 1 (SPEC §3): one :class:`~unidd_ray.core.recovery.Distiller` iteration (augment, teacher forward,
loss, backward, Adam step, clamp) on a batch of 100 synthetic 3-channel 32 px images, for

- ``ce``    cross-entropy only,
- ``sre2l`` CE + BatchNorm running-statistics matching (the SRe2L baseline),
- ``cfm``   CE + α Σ_l CFM filter/signal losses on every tapped conv input, EMU on,

with ConvNet-W128-D3 and ResNet-18 (CIFAR stem) in both memory layouts (``nchw``, and ``nhwc`` =
``recover.channels_last``: teacher and images channels-last, where each tap's Gram matrix is one
matmul on an ``(N·H·W, C)`` view), random teacher weights (random "real" statistics
for CFM, from 200 random images), ``torch.set_num_threads(2)``.  Every (model, method) runs in a
fresh subprocess: the median of the per-iteration times after warm-up, and the peak resident set
size (``getrusage`` ``ru_maxrss``) of that process, also minus its value just before the loop.
The real statistics are computed once per model in a process of their own and read from a file by
the CFM child, as a recovery worker reads them from the stats stage (computing them inside the
timed process would add the statistics pass's own memory peak to CFM's figure).
The subprocesses of one repeat run in an interleaved order so that load from other work on the
machine hits all methods alike.

Part 2: wall time of a small distributed recovery (Fashion-MNIST subset at 28 px, or sklearn digits
when the Debian package is missing; ConvNet-W64-D3 with random weights) with 1 worker × 2 threads
vs 2 workers × 1 thread on an embedded Ray.

    python benchmarks/recover.py                  # writes benchmarks/results/recover.json (~5 min)
    python benchmarks/recover.py --quick          # a smoke run (few iterations, no part 2)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import write_result  # noqa: E402

MODELS = {
    "convnet-w128-d3": ("convnet", {"width": 128, "depth": 3, "norm": "batch"}),
    "resnet18-cifar": ("resnet18", {"stem": "cifar"}),
}
METHODS = ("ce", "sre2l", "cfm")
LAYOUTS = ("nchw", "nhwc")
NUM_CLASSES, SIDE = 100, 32


# ----------------------------------------------------------------------------- part 1: one configuration
def _teacher(model_key: str):
    import torch

    from unidd_ray.models import build_model

    torch.manual_seed(0)  # the same random weights in every process
    arch, options = MODELS[model_key]
    return build_model(arch, num_classes=NUM_CLASSES, in_channels=3, resolution=SIDE, **options).eval()


def make_real_stats(model_key: str, path: str, threads: int) -> None:
    """Runs in a process of its own: moments of the taps over 200 random images, saved to ``path``."""
    import torch

    import unidd_ray  # noqa: F401
    from unidd_ray.models import resolve_layers, tapped
    from unidd_ray.spectral import Moments

    torch.set_num_threads(threads)
    teacher = _teacher(model_key)
    layers = resolve_layers(teacher, None)
    real, feats = {}, {}
    with torch.no_grad(), tapped(teacher, layers, lambda n, f: feats.__setitem__(n, f)):
        for chunk in range(4):
            g = torch.Generator().manual_seed(100 + chunk)
            x = torch.randn(50, 3, SIDE, SIDE, generator=g)
            y = torch.randint(0, NUM_CLASSES, (50,), generator=g)
            teacher(x)
            for name in layers:
                m = real.setdefault(name, Moments(feats[name].shape[1], NUM_CLASSES))
                m.update(feats[name].double(), y)
    torch.save({name: m.state_dict() for name, m in real.items()}, path)


def child(model_key: str, method: str, layout: str, *, images: int, warmup: int, repeats: int, threads: int,
          stats: str | None) -> dict:
    """Runs in a fresh process: times ``warmup + repeats`` Distiller iterations, reads the peak RSS."""
    import torch

    import unidd_ray  # noqa: F401
    from unidd_ray.config import RecoverConfig
    from unidd_ray.core.recovery import Distiller
    from unidd_ray.spectral import EMU, Moments

    torch.set_num_threads(threads)
    num_classes, side = NUM_CLASSES, SIDE
    teacher = _teacher(model_key)
    real = None
    if method == "cfm":
        real = {name: Moments.from_state_dict(state)
                for name, state in torch.load(stats, weights_only=True).items()}
    settings = RecoverConfig(method=method, iterations=warmup + repeats + 1, lr=0.25, beta_max=0.1,
                               max_roll=4, channels_last=layout == "nhwc")
    mean = torch.zeros(3)
    std = torch.ones(3)
    distiller = Distiller(teacher, real, settings, num_classes=num_classes, resolution=side,
                          pixel_min=(0 - mean) / std - 2, pixel_max=(1 - mean) / std + 2)
    emu = EMU(distiller.emu_layers()) if distiller.layers else None
    g = torch.Generator().manual_seed(1)
    init = torch.randn(images, 3, side, side, generator=g)
    labels = torch.arange(images) % num_classes
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stamps = [time.perf_counter()]
    distiller.optimize(init, labels, slot=0, ipc=10, aug_seed=0, emu=emu,
                       progress=lambda it, parts: stamps.append(time.perf_counter()))
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_iter = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = per_iter[1 + warmup:]  # iteration 0 also builds the real side (once per β)
    return {"model": model_key, "method": method, "layout": layout, "median_s": statistics.median(timed),
            "min_s": min(timed), "max_s": max(timed), "iterations_s": per_iter, "warmup": 1 + warmup,
            "taps": len(distiller.layers), "bn_layers": len(distiller.bn_layers),
            "peak_rss_mb": rss_peak / 1024, "peak_rss_delta_mb": (rss_peak - rss_before) / 1024,
            "rss_before_loop_mb": rss_before / 1024, "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()}


def _run(args_list: list[str], what: str) -> str:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args_list], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def run_child(model_key: str, method: str, layout: str, args, stats: Path) -> dict:
    out = _run(["--child", model_key, method, layout, "--images", str(args.images), "--warmup", str(args.warmup),
                "--repeats", str(args.repeats), "--threads", str(args.threads), "--stats", str(stats)],
               f"{model_key}/{layout}/{method}")
    return json.loads(out.strip().splitlines()[-1])


def part1(args) -> dict:
    runs: dict[tuple[str, str], list[dict]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-recover-stats-"))
    stats = {}
    for model_key in MODELS:
        stats[model_key] = scratch / f"{model_key}.pt"
        _run(["--make-stats", model_key, str(stats[model_key]), "--threads", str(args.threads)],
             f"statistics for {model_key}")
    for rep in range(args.rounds):
        for model_key in MODELS:
            for layout in args.layouts:
                order = METHODS if rep % 2 == 0 else tuple(reversed(METHODS))
                for method in order:
                    r = run_child(model_key, method, layout, args, stats[model_key])
                    runs.setdefault((model_key, layout, method), []).append(r)
                    print(f"  {model_key:16s} {layout} {method:6s} {r['median_s']:7.3f} s/it  peak RSS "
                          f"{r['peak_rss_mb']:7.0f} MB (+{r['peak_rss_delta_mb']:.0f} MB in the loop)  "
                          f"load {r['loadavg'][0]:.1f}", flush=True)
    rows = []
    for (model_key, layout, method), rs in runs.items():
        rows.append({"model": model_key, "layout": layout, "method": method,
                     "s_per_iteration": statistics.median(r["median_s"] for r in rs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "peak_rss_delta_mb": statistics.median(r["peak_rss_delta_mb"] for r in rs),
                     "taps": rs[0]["taps"], "bn_layers": rs[0]["bn_layers"], "runs": rs})
    ratios = {}
    for model_key in MODELS:
        for layout in args.layouts:
            by = {r["method"]: r for r in rows if r["model"] == model_key and r["layout"] == layout}
            ratio = {
                "cfm_over_sre2l_time": by["cfm"]["s_per_iteration"] / by["sre2l"]["s_per_iteration"],
                "sre2l_over_ce_time": by["sre2l"]["s_per_iteration"] / by["ce"]["s_per_iteration"],
                "cfm_over_ce_time": by["cfm"]["s_per_iteration"] / by["ce"]["s_per_iteration"],
                "cfm_minus_sre2l_peak_rss_mb": by["cfm"]["peak_rss_mb"] - by["sre2l"]["peak_rss_mb"],
                "cfm_minus_sre2l_loop_rss_mb": by["cfm"]["peak_rss_delta_mb"] - by["sre2l"]["peak_rss_delta_mb"],
            }
            ratio["time_target_met"] = ratio["cfm_over_sre2l_time"] <= 1.10
            ratio["memory_target_met"] = ratio["cfm_minus_sre2l_peak_rss_mb"] <= 0
            ratios[f"{model_key}/{layout}"] = ratio
    return {"rows": rows, "ratios": ratios}


# ----------------------------------------------------------------------------- part 2: 1 vs 2 workers
def _small_dataset(root: Path, train: int) -> tuple[Path, str]:
    import numpy as np

    from unidd_ray.data.prepare import prepare_dataset
    from unidd_ray.data.sources import load_source

    fmnist = Path("/usr/share/datasets/fashion-mnist")
    out = root / "data"
    if (fmnist / "train-images-idx3-ubyte.gz").is_file():
        from unidd_ray.data.idx import read_idx

        x = read_idx(fmnist / "train-images-idx3-ubyte.gz")
        y = read_idx(fmnist / "train-labels-idx1-ubyte.gz").astype(np.int64)
        rng = np.random.default_rng(0)
        pick = np.sort(rng.permutation(len(y))[:train + 500])
        npz = root / "fmnist-subset.npz"
        np.savez(npz, x=x[pick[:train]], y=y[pick[:train]], x_val=x[pick[train:]], y_val=y[pick[train:]])
        prepare_dataset(load_source("npz", str(npz)), out, num_workers=1, progress=False)
        return out, f"fashion-mnist subset ({train} train images, 28 px)"
    prepare_dataset(load_source("digits"), out, num_workers=1, progress=False)
    return out, "sklearn digits (1438 train images, 8 px)"


def part2(args) -> dict:
    import torch

    import unidd_ray  # noqa: F401
    from unidd_ray.config import RecoverConfig, StatsConfig
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.runtime.cluster import init_ray
    from unidd_ray.stages.recover import run_recover
    from unidd_ray.stages.stats import run_stats
    from unidd_ray.artifacts.teacher import TeacherInfo, save_teacher

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(tempfile.mkdtemp(prefix="bench-recover-"))
    data, what = _small_dataset(root, args.train_images)
    info = read_dataset_info(data)
    tinfo = TeacherInfo(arch="convnet", options={"width": 64, "depth": 3, "norm": "batch"},
                        num_classes=info.num_classes, in_channels=info.channels, resolution=info.resolution,
                        dataset=info.name, dataset_fingerprint=info.fingerprint, mean=list(info.mean),
                        std=list(info.std))
    torch.manual_seed(0)
    teacher = root / "teacher"
    save_teacher(tinfo.build().eval(), tinfo, teacher)
    init_ray(num_cpus=os.cpu_count())
    stats = root / "stats"
    run_stats(data, teacher, stats, StatsConfig(actors=1, batch_size=256), progress=False)
    rows = []
    for workers in args.workers:
        cpus = max(1, (os.cpu_count() or 2) // workers)
        cfg = RecoverConfig(ipc=args.ipc, iterations=args.iterations, lr=0.05, workers=workers,
                            cpus_per_worker=cpus, max_roll=2)
        load = os.getloadavg()
        t0 = time.perf_counter()
        out = run_recover(data, teacher, stats, root / f"out-w{workers}", cfg, storage_path=root / f"ray-w{workers}",
                          progress=False)
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
        batches = json.loads((out / "batches.json").read_text())
        row = {"workers": workers, "threads_per_worker": cpus, "wall_s": wall, "trainer_s": summary["seconds"],
               "batches": summary["batches"], "images": summary["images"],
               "batch_seconds_sum": sum(b["seconds"] for b in batches), "loadavg_before": load,
               "loadavg_after": os.getloadavg()}
        rows.append(row)
        print(f"  W={workers} × {cpus} thread(s): {wall:6.1f} s wall ({summary['seconds']:.1f} s in the trainer), "
              f"{summary['batches']} batches", flush=True)
    import ray

    ray.shutdown()
    return {"dataset": what, "teacher": "convnet-w64-d3 (random weights)", "ipc": args.ipc,
            "iterations": args.iterations, "rows": rows,
            "speedup_w2_over_w1": rows[0]["wall_s"] / rows[-1]["wall_s"] if len(rows) > 1 else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "METHOD", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--make-stats", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of the whole part-1 grid (interleaved)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=50, help="part 2: iterations per batch")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-part2", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 warm-up, 2 timed, no part 2")
    args = parser.parse_args()
    if args.make_stats:
        make_real_stats(*args.make_stats, threads=args.threads)
        return
    if args.child:
        print(json.dumps(child(*args.child, images=args.images, warmup=args.warmup, repeats=args.repeats,
                               threads=args.threads, stats=args.stats)))
        return
    if args.quick:
        args.rounds, args.warmup, args.repeats, args.skip_part2 = 1, 1, 2, True
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    print(f"part 1: s/iteration and peak RSS, {args.images} images 32 px, {args.threads} threads "
          f"(load {load_start[0]:.1f})", flush=True)
    p1 = part1(args)
    for model_key, r in p1["ratios"].items():
        print(f"  {model_key}: cfm/sre2l {r['cfm_over_sre2l_time']:.3f}x  sre2l/ce {r['sre2l_over_ce_time']:.3f}x  "
              f"cfm - sre2l peak RSS {r['cfm_minus_sre2l_peak_rss_mb']:+.0f} MB", flush=True)
    def save(p2):
        return write_result("recover", {
            "settings": {k: getattr(args, k) for k in ("images", "warmup", "repeats", "rounds", "threads", "layouts",
                                                        "ipc", "iterations", "train_images", "workers", "quick")},
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "total_s": time.perf_counter() - t0,
            "per_iteration": p1, "workers": p2,
            "targets": {"cfm_over_sre2l_time": "<= 1.10", "cfm_peak_memory": "<= sre2l"},
        })

    path = save(None)  # part 1 is kept even if part 2 is interrupted
    if not args.skip_part2:
        print("part 2: small distributed recovery, 1 vs 2 workers", flush=True)
        path = save(part2(args))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
