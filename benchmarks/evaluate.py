"""Evaluation cost: seconds per student epoch with and without the evaluation speed settings.

One relabel-and-train student (SPEC §1.3: full batch, RandomResizedCrop + flip + CutMix, KD from
the teacher) on a Fashion-MNIST-shaped set (``--ipc`` images per class, 10 classes, 1 × 28 × 28),
ConvNet-W64-D3 student and teacher with random weights (time does not depend on the weights),
one torch thread — what each worker of the demo's evaluation gets.  Four variants:

- ``nchw``           the plain loop (online teacher labels, NCHW);
- ``nchw+memo``      a second seed of the same set reading the teacher logits kept by the first
                     (``TeacherLabels(memo_bytes=...)``: the augmentation stream is seed-independent);
- ``nhwc``           ``channels_last`` student, teacher and batches;
- ``nhwc+memo``      both, i.e. the second seed of a set in the demo.

    python benchmarks/evaluate.py [--ipc 10] [--epochs 20] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch

import unidd_ray  # noqa: F401
from unidd_ray.config import EvaluateConfig
from unidd_ray.core.evaluation import TeacherLabels, train_student
from unidd_ray.models import build_model, memory_format

from _common import timeit, write_result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = 10 * args.ipc
    images = torch.randn(n, 1, 28, 28, generator=g)
    labels = torch.arange(n) % 10

    def model():
        return build_model("convnet", num_classes=10, in_channels=1, resolution=28, width=64, depth=3, norm="batch")

    teacher = model().eval()
    rows = {}
    for layout in ("nchw", "nhwc"):
        channels_last = layout == "nhwc"
        teacher.to(memory_format=memory_format(channels_last))
        settings = EvaluateConfig(epochs=args.epochs, temperature=4.0, channels_last=channels_last)
        memo = TeacherLabels(teacher, memo_bytes=1 << 30)
        train_student(model(), images, labels, settings, seed=0, soft_labels=memo, num_classes=10)  # fills it
        fresh = timeit(lambda: train_student(model(), images, labels, settings, seed=1,
                                             soft_labels=TeacherLabels(teacher), num_classes=10),
                       repeats=args.repeats)
        reused = timeit(lambda: train_student(model(), images, labels, settings, seed=1, soft_labels=memo,
                                              num_classes=10), repeats=args.repeats)
        rows[layout] = fresh["median_s"] / args.epochs
        rows[f"{layout}+memo"] = reused["median_s"] / args.epochs
        print(f"{layout:5s} {1e3 * rows[layout]:7.1f} ms/epoch   with memo {1e3 * rows[layout + '+memo']:7.1f} ms/epoch")
    speedups = {k: rows["nchw"] / v for k, v in rows.items()}
    path = write_result("evaluate", {"ipc": args.ipc, "images": n, "epochs": args.epochs, "repeats": args.repeats,
                                     "threads": args.threads, "s_per_epoch": rows, "speedup_vs_nchw": speedups,
                                     "two_seed_speedup": 2 * rows["nchw"] / (rows["nhwc"] + rows["nhwc+memo"])})
    print("speed-ups over nchw: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
