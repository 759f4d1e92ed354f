"""Recoveries side by side on a small CPU: iteration times of P recovery processes × T threads each.

The pipeline runs recoveries as separate Ray Train runs, as many at once as the cluster's CPUs
hold (``parallel_recoveries``; ``recover.cpus_per_worker`` sets each one's share and its thread
count).  Whether that pays depends on how well one recovery uses a second thread: this script
measures it on the recipe's own recovery (its teacher, statistics and real initial images, read
from a pipeline run directory) without Ray, so only the arithmetic is compared.

For every configuration ``PxT`` it starts P processes at once, each with T torch threads, each
recovering ``--slots`` slots of ``--iterations`` iterations of one method (methods dealt out in
the order of ``--methods``; with P = 1 every method runs in turn, alone).  It reports each
process's milliseconds per iteration over the slots after the first (the first also pays the
FFCV loader's compilation and first-call warm-ups), and the configuration's throughput: the
iterations per second of all its processes together.

    python benchmarks/parallel_recoveries.py --run runs/fashion-mnist        # ~2 min; writes
        benchmarks/results/parallel_recoveries.json
    python benchmarks/parallel_recoveries.py --run RUN --configs 1x2,2x1 --iterations 100

``--run`` is a pipeline run directory holding one ``data-*``, ``teacher-*`` and ``stats-*`` each
(the Fashion-MNIST demo's, ``runs/fashion-mnist``, by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import stage_dir, write_result  # noqa: E402


def child(args) -> None:
    """One recovery process: print a JSON line with the seconds of each slot."""
    import torch

    import unidd_ray  # noqa: F401
    from unidd_ray.artifacts.dataset import read_labels
    from unidd_ray.config import load_recipe, section_from
    from unidd_ray.core.plan import make_plan
    from unidd_ray.core.recovery import InitImages, build_distiller, image_bytes, run_round
    from unidd_ray.spectral import EMU

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    data, teacher, stats = (str(stage_dir(run, p)) for p in ("data", "teacher", "stats"))
    recipe = load_recipe(args.recipe)
    cfg = section_from(recipe, "recover", {"method": args.method, "iterations": args.iterations, "ipc": args.slots})
    info, distiller = build_distiller(cfg, data, teacher, None if args.method == "sre2l" else stats, "cpu")
    plan = make_plan(read_labels(data, "train"), info.num_classes, cfg)
    emu = EMU(distiller.emu_layers(), enabled=cfg.emu, device="cpu") if distiller.layers else None
    init = InitImages(data, plan, 0, image_bytes=image_bytes(distiller), normalize=distiller.normalize)
    seconds = []
    for r in range(plan.rounds):
        t0 = time.perf_counter()
        run_round(distiller, plan, r, rank=0, emu=emu, reducer=None, data_dir=data, num_workers=1, device="cpu",
                  init_images=init)
        seconds.append(time.perf_counter() - t0)
    print(json.dumps({"method": args.method, "threads": args.threads, "slot_seconds": seconds,
                      "batch": len(plan.chunks[0][0])}), flush=True)


def run_group(args, methods: list[str], threads: int) -> list[dict]:
    """Start one child per method at once and collect their results."""
    procs = []
    for method in methods:
        cmd = [sys.executable, __file__, "--child", "--run", args.run, "--recipe", args.recipe, "--method", method,
               "--threads", str(threads), "--iterations", str(args.iterations), "--slots", str(args.slots)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    out = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a recovery process failed (exit {proc.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    for r in out:
        steady = r["slot_seconds"][1:]
        r["ms_per_iteration"] = 1000 * statistics.median(steady) / args.iterations
        r["first_slot_s"] = r["slot_seconds"][0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/fashion-mnist")
    p.add_argument("--recipe", default="fashion-mnist")
    p.add_argument("--configs", default="1x2,1x1,2x1,3x1", help="PxT: P processes at once, T threads each")
    p.add_argument("--methods", default="cfm,dm,sre2l")
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--slots", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.slots < 2:
        raise SystemExit("--slots must be at least 2 (the first slot is warm-up)")
    for prefix in ("data", "teacher", "stats"):  # fail here, not in every child
        stage_dir(Path(args.run), prefix)
    methods = args.methods.split(",")
    results = []
    for spec in args.configs.split(","):
        procs, threads = (int(x) for x in spec.lower().split("x"))
        if procs == 1:
            runs = [r for m in methods for r in run_group(args, [m], threads)]  # each method alone, in turn
        else:
            runs = run_group(args, [methods[i % len(methods)] for i in range(procs)], threads)
        per_method = {}
        for r in runs:
            per_method.setdefault(r["method"], []).append(round(r["ms_per_iteration"], 2))
        # iterations per second of the whole machine: P processes at once, each at its own pace
        rate = procs * 1000 / statistics.mean(r["ms_per_iteration"] for r in runs)
        results.append({"config": spec, "processes": procs, "threads": threads, "ms_per_iteration": per_method,
                        "iterations_per_second": round(rate, 1), "runs": runs})
        print(f"{spec:>4}: {per_method}  -> {rate:.1f} iterations/s in all", flush=True)
    base = results[0]["iterations_per_second"]
    for r in results:
        r["throughput_vs_first"] = round(r["iterations_per_second"] / base, 2)
    path = write_result("parallel_recoveries", {"recipe": args.recipe, "iterations": args.iterations,
                                                "slots": args.slots, "configs": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
