"""Statistics stage: actor-pool throughput, cost of the taps, exactness of the first layer.

Data: Fashion-MNIST (Debian files) prepared with ``prepare_dataset`` under
``benchmarks/work/stats/`` (reused on later runs); the first ``--images`` train images.
Teacher: ConvNet-W64-D3 (batch norm) with random initialisation, eval mode; taps = its three
conv inputs (1, 64 and 64 channels at 28, 14 and 7 px).

(a) ``pool``: images/s of the statistics actor pool with 1 and 2 actors (``cpus_per_actor=1``,
    one torch thread each).  ``steady``: warm actors (constructed and one unit run untimed),
    then the same work units handed out dynamically, timed -- the scaling of the computation
    itself.  ``end_to_end``: ``compute_stats`` as the CLI runs it, including actor start-up
    (process spawn, imports, teacher load).  The median of ``--repeats`` runs each.
(b) ``taps``: one process, ``torch.set_num_threads(1)``, model in eval mode, one batch of
    ``--batch-size`` real images: the forward pass with the taps and ``Moments.update`` of every
    tapped layer (plus the float64 softmax, exactly what a statistics worker does per batch)
    against the plain forward pass; median of ``--repeats`` x 5 calls, interleaved.
(c) ``exactness``: the first tapped layer's input is the normalised image, so its moments
    (from the 2-actor run) are compared with numpy float64 over the same images read from the
    ``.beton``: max relative difference of count, mean and covariance.

``os.getloadavg()`` is recorded before and after: other work on the machine slows (a) most.

    python benchmarks/stats.py [--images 20000] [--repeats 2] [--actors 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

import unidd_ray  # noqa: F401  (before torchvision: applies the import fix)
from unidd_ray.config import StatsConfig
from unidd_ray.spectral import Moments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timeit, write_result

HERE = Path(__file__).resolve().parent
TARGET_TAPS = 1.35
TARGET_SPEEDUP = 1.6


def prepare(work: Path, width: int, depth: int) -> tuple[Path, Path]:
    """The prepared Fashion-MNIST and a randomly initialised ConvNet teacher (cached under ``work``)."""
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.data.prepare import prepare_dataset
    from unidd_ray.data.sources import load_source
    from unidd_ray.artifacts.teacher import TeacherInfo, save_teacher

    data = work / "fashion-mnist"
    if not (data / "dataset.json").is_file():
        t0 = time.perf_counter()
        prepare_dataset(load_source("fashion-mnist"), data, progress=False)
        print(f"prepared Fashion-MNIST in {time.perf_counter() - t0:.1f}s -> {data}")
    info = read_dataset_info(data)
    teacher = work / f"convnet-w{width}-d{depth}-random"
    if not (teacher / "teacher.json").is_file():
        tinfo = TeacherInfo(arch="convnet", options={"width": width, "depth": depth, "norm": "batch"},
                            num_classes=info.num_classes, in_channels=info.channels, resolution=info.resolution,
                            dataset=info.name, dataset_fingerprint=info.fingerprint, mean=list(info.mean),
                            std=list(info.std))
        torch.manual_seed(0)
        save_teacher(tinfo.build().eval(), tinfo, teacher)
    return data, teacher


def pool_steady(ray, data: Path, teacher: Path, cfg: StatsConfig, plan, actors: int) -> float:
    """Seconds for warm actors to run every unit of ``plan`` (dynamic hand-out, as in compute_stats)."""
    from unidd_ray.stages.stats import StatsWorker

    worker = ray.remote(StatsWorker)
    pool = [worker.options(num_cpus=cfg.cpus_per_actor).remote(str(teacher), str(data), None, cfg.batch_size,
                                                               cfg.block_size, 1, 1) for _ in range(actors)]
    try:
        ray.get([a.ready.remote() for a in pool])
        first = [(0, *plan.blocks[0])]
        ray.get([a.compute.remote(first) for a in pool])  # warm-up: numba compilation, page cache
        queue = deque(plan.units)
        in_flight = {}
        t0 = time.perf_counter()
        for a in pool:
            if queue:
                in_flight[a.compute.remote([(b, *plan.blocks[b]) for b in queue.popleft()])] = a
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            a = in_flight.pop(ref)
            ray.get(ref)
            if queue:
                in_flight[a.compute.remote([(b, *plan.blocks[b]) for b in queue.popleft()])] = a
        return time.perf_counter() - t0
    finally:
        for a in pool:
            ray.kill(a, no_restart=True)


def bench_pool(data: Path, teacher: Path, args) -> tuple[dict, dict]:
    import ray

    from unidd_ray.runtime.cluster import init_ray
    from unidd_ray.stages.stats import compute_stats, make_plan

    init_ray(num_cpus=max(args.actors))
    rows, moments = {}, {}
    try:
        for actors in args.actors:
            cfg = StatsConfig(actors=actors, cpus_per_actor=1, batch_size=args.batch_size,
                              block_size=args.block_size, blocks_per_unit=1)
            plan = make_plan(args.images, cfg)
            steady, e2e = [], []
            for _ in range(args.repeats):
                steady.append(pool_steady(ray, data, teacher, cfg, plan, actors))
                res = compute_stats(teacher, data, cfg, progress=False, images=args.images)
                e2e.append(res.seconds)
                moments[actors] = res.moments
            rows[actors] = {
                "actors": actors, "units": len(plan.units), "block_size": args.block_size,
                "steady_s": steady, "steady_images_per_s": args.images / statistics.median(steady),
                "end_to_end_s": e2e, "end_to_end_images_per_s": args.images / statistics.median(e2e),
            }
            print(f"{actors} actor(s): steady {rows[actors]['steady_images_per_s']:,.0f} img/s, end-to-end "
                  f"{rows[actors]['end_to_end_images_per_s']:,.0f} img/s")
    finally:
        ray.shutdown()
    return rows, moments


def bench_taps(data: Path, teacher: Path, args) -> dict:
    from unidd_ray.data.loading import make_loader
    from unidd_ray.models import layer_channels, resolve_layers, tapped
    from unidd_ray.artifacts.teacher import load_teacher

    images, labels, _ = next(iter(make_loader(str(data), "train", batch_size=args.batch_size, num_workers=1)))
    torch.set_num_threads(1)  # after the loader, which changes it
    model, info = load_teacher(teacher)
    layers = resolve_layers(model, None)
    channels = layer_channels(model, layers)
    captured: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def plain():
        return model(images)

    @torch.no_grad()
    def with_taps():
        moments = {name: Moments(c, info.num_classes) for name, c in channels.items()}
        with tapped(model, layers, lambda name, x: captured.__setitem__(name, x)):
            logits = model(images)
        probs = torch.softmax(logits.double(), 1)
        for name in layers:
            moments[name].update(captured[name], labels, probs)
        return moments

    # per-layer cost of Moments.update alone (where the time goes)
    with_taps()
    per_layer = {name: timeit(lambda n=name: Moments(channels[n], info.num_classes).update(
        captured[n], labels, torch.softmax(torch.zeros(len(labels), info.num_classes, dtype=torch.float64), 1)),
        repeats=5 * args.repeats)["median_s"] for name in layers}
    plain_t, taps_t = [], []
    for _ in range(args.repeats):  # interleaved so that load drift hits both alike
        plain_t.append(timeit(plain, repeats=5)["median_s"])
        taps_t.append(timeit(with_taps, repeats=5)["median_s"])
    ratio = statistics.median(taps_t) / statistics.median(plain_t)
    print(f"taps: forward {statistics.median(plain_t) * 1e3:.1f} ms, with taps + Moments.update "
          f"{statistics.median(taps_t) * 1e3:.1f} ms ({ratio:.3f}x)")
    return {"batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "layers": {name: {"channels": c, "shape": list(captured[name].shape)} for name, c in channels.items()},
            "plain_forward_s": statistics.median(plain_t), "taps_and_update_s": statistics.median(taps_t),
            "plain_runs": plain_t, "taps_runs": taps_t, "ratio": ratio, "target": TARGET_TAPS,
            "met": ratio <= TARGET_TAPS, "moments_update_s_per_layer": per_layer}


def bench_exactness(data: Path, moments: dict[str, Moments], images: int) -> dict:
    from unidd_ray.data.loading import make_loader

    xs = [x.numpy().astype(np.float64) for x, _, _ in make_loader(str(data), "train", batch_size=1000, num_workers=1,
                                                                indices=np.arange(images))]
    x = np.concatenate(xs)
    n_img, c, h, w = x.shape
    flat = x.transpose(1, 0, 2, 3).reshape(c, -1)
    n = flat.shape[1]
    mean = flat.mean(1)
    cov = flat @ flat.T / n - np.outer(mean, mean)
    name = next(iter(moments))
    m = moments[name]

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    out = {"layer": name, "images": n_img, "count": m.count, "count_expected": n,
           "mean_max_rel_diff": rel(m.mean.numpy(), mean),
           "covariance_max_rel_diff": rel(m.covariance("total").numpy(), cov)}
    out["max_rel_diff"] = max(out["mean_max_rel_diff"], out["covariance_max_rel_diff"])
    print(f"exactness ({name}): count {m.count} vs {n}, max rel diff {out['max_rel_diff']:.2e}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="first N train images (Fashion-MNIST has 60,000)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "stats")
    parser.add_argument("--skip-pool", action="store_true", help="only (b) and (c) (c then uses a 1-process run)")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    load_before = os.getloadavg()
    started = time.perf_counter()
    data, teacher = prepare(args.work, args.width, args.depth)
    threads = torch.get_num_threads()
    taps = bench_taps(data, teacher, args)
    torch.set_num_threads(threads)
    if args.skip_pool:
        from unidd_ray.stages.stats import StatsWorker, fold, make_plan

        plan = make_plan(args.images, StatsConfig(batch_size=args.batch_size, block_size=args.block_size))
        worker = StatsWorker(str(teacher), str(data), None, args.batch_size, args.block_size, threads=1)
        out = worker.compute([(b, *plan.blocks[b]) for b in range(len(plan.blocks))])
        total = None
        for b in sorted(out):
            total = fold(total, out[b])
        pool, moments = {}, {1: total}
    else:
        pool, moments = bench_pool(data, teacher, args)
    exact = bench_exactness(data, moments[max(moments)], args.images)
    identical = all(torch.equal(getattr(moments[a][n], f), getattr(moments[min(moments)][n], f))
                    for a in moments for n in moments[a] for f in Moments._FIELDS)
    result = {"images": args.images, "dataset": "fashion-mnist", "teacher": f"convnet-w{args.width}-d{args.depth} "
              "(random init, eval)", "batch_size": args.batch_size, "taps": taps, "exactness": exact,
              "pool": {str(k): v for k, v in pool.items()}, "actor_counts_bit_identical": identical}
    if len(pool) >= 2:
        lo, hi = min(pool), max(pool)
        for kind in ("steady", "end_to_end"):
            result[f"{kind}_speedup_{hi}_vs_{lo}"] = pool[hi][f"{kind}_images_per_s"] / pool[lo][f"{kind}_images_per_s"]
        result["speedup_target"] = TARGET_SPEEDUP
        print(f"speed-up {hi} vs {lo} actors: steady {result[f'steady_speedup_{hi}_vs_{lo}']:.2f}x, end-to-end "
              f"{result[f'end_to_end_speedup_{hi}_vs_{lo}']:.2f}x (target {TARGET_SPEEDUP}x)")
    torch.set_num_threads(threads)  # FFCV loaders changed it; record the process default
    result["loadavg_before"] = list(load_before)
    result["loadavg_after"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - started
    path = write_result("stats", result)
    print(f"load average before {load_before[0]:.2f}, after {result['loadavg_after'][0]:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
