"""The GPU suite: what an ImageNet-1k run costs per part on one GPU, in one command (≤ 8 minutes on one H100).

Parts, each on the project's ``build_model("resnet18", num_classes=1000, resolution=224)`` with random weights
(the ImageNet stem; in eval mode for the teacher) and the taps a recovery uses (``resolve_layers(model, None)``):

1. ``recovery``: seconds per iteration and peak GPU memory (``torch.cuda.max_memory_allocated``, reset before
   each configuration; null on a CPU) of one :class:`~unidd_ray.core.recovery.Distiller` iteration (augment,
   teacher forward with the taps, loss, backward, Adam step, clamp) for the methods ``cfm`` (EMU on), ``sre2l``
   and ``ce`` of the :mod:`unidd_ray.methods` registry, on 100, 200 and 500 images, with ``recover.amp`` none and
   bf16.  The real statistics CFM matches are the moments of 2 batches of random images (their values do not
   change the cost).  The median of the timed iterations after the warm-up ones.
2. ``stats``: throughput in images/s of the statistics pass (the teacher's forward with the taps, a float64
   softmax and ``Moments.update`` of every tap, as the stats stage's workers do per batch), reading a prepared
   dataset's ``train`` .beton through FFCV when ``--data`` names one, else synthetic tensors already on the
   device (``source`` in the JSON says which).
3. ``evaluation``: one epoch of a ResNet-18 student on 500 distilled images with the teacher's soft labels
   (:func:`unidd_ray.core.evaluation.train_student`, ``EvaluateConfig(epochs=1, batch_size=100)``).
4. ``allreduce``: the per-iteration communication of ``recover.distribution: exact``: 2 processes on this
   machine (one GPU: both on it) all-reduce the float64 moments of ResNet-18's 17 taps -- 9.13 MB for the
   ``mean`` signal, 36.4 MB for the class signals with K = 1,000 (docs/PERFORMANCE.md, "Distributed
   recovery") -- as one buffer and as the 85 per-layer calls the recovery makes.  NCCL on a GPU (it may refuse
   two ranks on one device: then the error is recorded and gloo on the same CUDA tensors is timed too), gloo on
   a CPU.

``--dry-run`` runs every part at toy size on the CPU (32 px, 10 classes, 4 images, 1 iteration) in well under a
minute and writes the same JSON shape with ``"dry_run": true`` (its numbers measure nothing).

    python benchmarks/gpu_suite.py                       # benchmarks/results/gpu_suite-<device>.json
    python benchmarks/gpu_suite.py --data /data/imagenet # statistics read through FFCV
    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS, machine  # noqa: E402

METHODS = ("cfm", "sre2l", "ce")
AMPS = ("none", "bf16")
FULL = {"resolution": 224, "num_classes": 1000, "images": [100, 200, 500], "warmup": 2, "iterations": 5,
        "stats_batch": 256, "stats_batches": 20, "eval_images": 500, "eval_batch": 100, "allreduce_repeats": 20}
DRY = {"resolution": 32, "num_classes": 10, "images": [4], "warmup": 0, "iterations": 1,
       "stats_batch": 4, "stats_batches": 2, "eval_images": 4, "eval_batch": 2, "allreduce_repeats": 2}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _teacher(size: dict, device):
    from unidd_ray.models import build_model, layer_channels, resolve_layers

    model = build_model("resnet18", num_classes=size["num_classes"], resolution=size["resolution"]).to(device).eval()
    layers = resolve_layers(model, None)
    return model, layers, layer_channels(model, layers)


def _random_images(n: int, size: dict, device, generator):
    """``n`` random images in [0, 1], normalised with the ImageNet mean/std (as a recovery's images are)."""
    import torch

    x = torch.rand(n, 3, size["resolution"], size["resolution"], generator=generator)
    return ((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).to(device)


# ----------------------------------------------------------------------------- 1. recovery
def real_moments(teacher, layers, channels, size: dict, device, generator) -> dict:
    import torch

    from unidd_ray.models import tapped
    from unidd_ray.spectral import Moments

    k = size["num_classes"]
    moments = {name: Moments(c, k, device=device) for name, c in channels.items()}
    captured = {}
    with torch.no_grad(), tapped(teacher, layers, lambda name, x: captured.__setitem__(name, x)):
        for _ in range(2):
            n = max(size["images"])
            labels = torch.arange(n, device=device) % k
            teacher(_random_images(n, size, device, generator))
            for name in layers:
                moments[name].update(captured[name], labels)
    return moments


def bench_recovery(size: dict, device, teacher, layers, real) -> list[dict]:
    import torch

    from unidd_ray.config import RecoverConfig
    from unidd_ray.core.recovery import Distiller
    from unidd_ray.spectral import EMU

    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    rows = []
    steps = size["warmup"] + size["iterations"]
    for amp in AMPS:
        for method in METHODS:
            cfg = RecoverConfig(method=method, amp=amp, iterations=steps, ipc=1)
            distiller = Distiller(teacher, real if method == "cfm" else None, cfg, num_classes=size["num_classes"],
                                  resolution=size["resolution"], pixel_min=(0 - mean) / std,
                                  pixel_max=(1 - mean) / std, layers=layers if method == "cfm" else None,
                                  device=device, normalize=(list(MEAN), list(STD)))
            for n in size["images"]:
                generator = torch.Generator().manual_seed(n)
                init = _random_images(n, size, device, generator)
                labels = torch.arange(n, device=device) % size["num_classes"]
                emu = EMU(distiller.emu_layers(), device=distiller.device) if distiller.layers else None
                _sync(device)
                _reset_peak(device)
                stamps = [time.perf_counter()]

                def progress(it, parts):
                    _sync(device)
                    stamps.append(time.perf_counter())

                result = distiller.optimize(init, labels, slot=0, ipc=1, aug_seed=0, emu=emu, progress=progress)
                times = [b - a for a, b in zip(stamps, stamps[1:])][size["warmup"]:]
                row = {"method": method, "amp": amp, "images": n, "iterations_timed": len(times),
                       "s_per_iteration": statistics.median(times), "s_per_iteration_runs": times,
                       "peak_memory_bytes": _peak(device), "final_loss": result.parts["total"]}
                rows.append(row)
                print(f"recovery {method:5s} amp={amp:4s} {n:4d} images: {row['s_per_iteration'] * 1e3:9.1f} ms/it"
                      + (f", peak {row['peak_memory_bytes'] / 2 ** 30:.2f} GiB" if row["peak_memory_bytes"] else ""),
                      flush=True)
                del result, init, emu
    return rows


# ----------------------------------------------------------------------------- 2. statistics
def bench_stats(size: dict, device, teacher, layers, channels, data: str | None) -> dict:
    import torch

    from unidd_ray.models import tapped
    from unidd_ray.spectral import Moments

    k = size["num_classes"]
    batch = size["stats_batch"]
    if data:
        from unidd_ray.data.loading import make_loader

        loader = make_loader(data, "train", batch_size=batch, num_workers=max(1, (os.cpu_count() or 2) - 2),
                             device=str(device), resolution=size["resolution"], normalize=(MEAN, STD),
                             indices=list(range(batch * (size["stats_batches"] + 1))))
        source = f"ffcv:{data}"

        def batches():
            for images, labels, _ in loader:
                yield images, labels.to(device)
    else:
        generator = torch.Generator().manual_seed(1)
        fixed = [(_random_images(batch, size, device, generator), torch.arange(batch, device=device) % k)
                 for _ in range(2)]
        source = "synthetic"

        def batches():
            for i in range(size["stats_batches"] + 1):
                yield fixed[i % 2]

    moments = {name: Moments(c, k, device=device) for name, c in channels.items()}
    captured = {}
    seen = 0
    start = None
    _reset_peak(device)
    with torch.no_grad(), tapped(teacher, layers, lambda name, x: captured.__setitem__(name, x)):
        for i, (images, labels) in enumerate(batches()):
            logits = teacher(images)
            probs = torch.softmax(logits.double(), 1)
            for name in layers:
                moments[name].update(captured[name], labels, probs)
            _sync(device)
            if i == 0:  # the first batch warms up (cuDNN, the loader's first decode): untimed
                start = time.perf_counter()
            else:
                seen += len(images)
    seconds = time.perf_counter() - start
    out = {"source": source, "batch_size": batch, "images_timed": seen, "seconds": seconds,
           "images_per_s": seen / seconds, "peak_memory_bytes": _peak(device)}
    print(f"stats ({source}): {out['images_per_s']:.0f} images/s", flush=True)
    return out


# ----------------------------------------------------------------------------- 3. evaluation
def bench_evaluation(size: dict, device, teacher) -> dict:
    import torch

    from unidd_ray.config import EvaluateConfig
    from unidd_ray.core.evaluation import TeacherLabels, train_student
    from unidd_ray.models import build_model

    n = size["eval_images"]
    generator = torch.Generator().manual_seed(2)
    images = _random_images(n, size, device, generator)
    labels = torch.arange(n, device=device) % size["num_classes"]
    settings = EvaluateConfig(student="resnet18", epochs=1, batch_size=size["eval_batch"], seeds=1)
    student = build_model("resnet18", num_classes=size["num_classes"], resolution=size["resolution"])
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    train_student(student, images, labels, settings, seed=0, soft_labels=TeacherLabels(teacher),
                  num_classes=size["num_classes"], device=device)
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {"images": n, "batch_size": size["eval_batch"], "epochs": 1, "seconds_per_epoch": seconds,
           "images_per_s": n / seconds, "peak_memory_bytes": _peak(device)}
    print(f"evaluation: {seconds:.2f} s per epoch of {n} images", flush=True)
    return out


# ----------------------------------------------------------------------------- 4. all-reduce
def payload_pieces(channels: list[int], columns: int) -> list[int]:
    """Float64 numbers of each all-reduce of one exact-distribution iteration: per tap n (1), Σx (C), Σxxᵀ (C²),
    the signal sums (C × columns) and weights (columns), in the order ``Distiller._batch_stats`` sends them."""
    return [p for c in channels for p in (1, c, c * c, c * columns, columns)]


def _allreduce_worker(rank: int, world: int, backend: str, init: str, device_type: str, pieces: dict,
                      repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    result = {"rank": rank}
    try:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        for signal, sizes in pieces.items():
            tensors = [torch.ones(s, dtype=torch.float64, device=device) for s in sizes]
            flat = torch.ones(sum(sizes), dtype=torch.float64, device=device)
            for mode, calls in (("one_buffer", [flat]), ("per_layer_calls", tensors)):
                times = []
                for i in range(repeats + 2):  # 2 untimed (the communicator's set-up)
                    dist.barrier()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for t in calls:
                        dist.all_reduce(t)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                result[f"{signal}/{mode}"] = times
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON (NCCL refusing two ranks on one GPU)
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    Path(out).write_text(json.dumps(result))


def _allreduce_run(backend: str, device_type: str, pieces: dict, repeats: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        outs = [str(Path(tmp) / f"rank{r}.json") for r in range(2)]
        procs = [ctx.Process(target=_allreduce_worker, args=(r, 2, backend, init, device_type, pieces, repeats,
                                                              outs[r])) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        ranks = [json.loads(Path(o).read_text()) if Path(o).exists() else {"error": "no result (killed or crashed)"}
                 for o in outs]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        return {"backend": backend, "device": device_type, "ok": False, "error": errors[0]}
    out = {"backend": backend, "device": device_type, "ok": True}
    for signal, sizes in pieces.items():
        numbers = sum(sizes)
        entry = {"float64_numbers": numbers, "megabytes": numbers * 8 / 1e6, "calls_per_iteration": len(sizes)}
        for mode in ("one_buffer", "per_layer_calls"):
            # per repeat the slower rank's time (an all-reduce ends when both have it)
            times = [max(a, b) for a, b in zip(ranks[0][f"{signal}/{mode}"], ranks[1][f"{signal}/{mode}"])]
            entry[f"{mode}_ms"] = statistics.median(times) * 1e3
        out[signal] = entry
    return out


def bench_allreduce(size: dict, device, channels: dict) -> dict:
    c = list(channels.values())
    pieces = {"mean": payload_pieces(c, 1), "class": payload_pieces(c, size["num_classes"])}
    backends = ["nccl", "gloo"] if device.type == "cuda" else ["gloo"]
    runs = []
    for backend in backends:
        run = _allreduce_run(backend, device.type, pieces, size["allreduce_repeats"])
        runs.append(run)
        print(f"allreduce {backend}: " + (", ".join(f"{s} {run[s]['megabytes']:.2f} MB {run[s]['one_buffer_ms']:.2f} "
                                                      f"ms" for s in pieces) if run["ok"] else run["error"]),
              flush=True)
        if run["ok"]:
            break
    ok = [r for r in runs if r["ok"]]
    return {"processes": 2, "taps": len(c), "result": ok[0] if ok else None, "attempts": runs}


# ----------------------------------------------------------------------------- the suite
def device_slug(device) -> str:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_suite(*, dry_run: bool, data: str | None, device_name: str | None) -> dict:
    import torch

    import unidd_ray  # noqa: F401  (before torchvision: applies the import fix)

    size = DRY if dry_run else FULL
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() and not dry_run else "cpu"))
    started = time.perf_counter()
    facts = machine()
    facts.update(device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                  else facts["cpu"]),
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                 cpu_count=os.cpu_count(), date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    generator = torch.Generator().manual_seed(0)
    teacher, layers, channels = _teacher(size, device)
    timings = {}
    t = time.perf_counter()
    real = real_moments(teacher, layers, channels, size, device, generator)
    recovery = bench_recovery(size, device, teacher, layers, real)
    timings["recovery"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = bench_stats(size, device, teacher, layers, channels, data)
    timings["stats"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluation = bench_evaluation(size, device, teacher)
    timings["evaluation"] = time.perf_counter() - t
    t = time.perf_counter()
    allreduce = bench_allreduce(size, device, channels)
    timings["allreduce"] = time.perf_counter() - t
    return {"benchmark": "gpu_suite", "dry_run": dry_run, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": facts,
            "model": {"arch": "resnet18", "weights": "random", "resolution": size["resolution"],
                      "num_classes": size["num_classes"], "taps": layers, "tap_channels": list(channels.values())},
            "sizes": size, "recovery": recovery, "stats": stats, "evaluation": evaluation, "allreduce": allreduce,
            "part_seconds": timings, "total_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at toy size on the CPU (< 1 minute)")
    parser.add_argument("--data", help="a prepared dataset (unidd-ray prepare) whose train .beton the statistics "
                                       "part reads through FFCV; default: synthetic tensors")
    parser.add_argument("--device", help="torch device (default: cuda when available, cpu with --dry-run)")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: benchmarks/results/gpu_suite-<device>"
                                                 ".json)")
    args = parser.parse_args(argv)
    payload = run_suite(dry_run=args.dry_run, data=args.data, device_name=args.device)
    import torch

    out = args.out or RESULTS / f"gpu_suite-{device_slug(torch.device(payload['machine']['device']))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    print(f"wrote {out} in {payload['total_seconds']:.1f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
