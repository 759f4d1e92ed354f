"""Training-pipeline throughput: FFCV (``make_loader(train=True)``) vs a plain PIL + torchvision DataLoader.

Both sides apply the same augmentation -- random resized crop (area 8-100 %), horizontal flip,
normalisation -- with the same number of workers (2) and batch size, and yield float32 NCHW
batches.  Images/s is the number of training images of one epoch divided by its wall time.  Each
loader runs one untimed warm-up epoch (which also compiles FFCV's numba pipeline and starts the
DataLoader's persistent workers); then ``--repeats`` rounds time one epoch of every loader in turn
(interleaved, so drifting load on a shared machine affects all alike), and the median is reported.

(a) Fashion-MNIST, 60,000 images of 28 px.  FFCV reads the prepared ``train.beton`` (raw uint8
    arrays) and crops every batch at once with ``RandomResizedCropFlip`` (torch, bilinear).  The
    torchvision side is what ``torchvision.datasets.FashionMNIST`` does: the same images held as a
    uint8 array in memory, one ``PIL.Image`` per sample, ``RandomResizedCrop`` +
    ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` per image.
(b) 2,000 synthetic JPEGs (smooth random noise, 256-350 px per side, quality 90) in an
    ImageFolder, 224 px crops.  ``ffcv`` reads the ``.beton`` written by ``prepare_dataset`` with
    its defaults (every image re-encoded as JPEG, quality 90, longer side capped at 256 px) and
    decodes + crops in numba threads; ``ffcv_proportion`` is the same with FFCV's ImageNet-recipe
    storage (``write_mode="proportion"``: half the images JPEG, half raw pixels -- a larger file,
    less decoding).  The torchvision side is ``torchvision.datasets.ImageFolder`` decoding the
    original files with PIL.  Preparing a ``.beton`` is a one-off cost, reported separately.

    python benchmarks/loading.py [--repeats 3] [--workers 2] [--skip-fmnist]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import unidd_ray  # noqa: F401  (before torchvision: applies the import fix)
from unidd_ray.data.loading import make_loader
from unidd_ray.data.prepare import prepare_dataset
from unidd_ray.data.sources import load_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result

TARGET_SPEEDUP = 3.0


@dataclass
class Section:
    """One comparison: its loaders (the PIL one named ``pil_torchvision``), epoch size and facts."""

    name: str
    loaders: dict
    images: int
    facts: dict = field(default_factory=dict)


def one_epoch(loader) -> int:
    seen = 0
    for batch in loader:
        seen += int(batch[0].shape[0])
    return seen


def timed_rounds(section: Section, repeats: int) -> dict[str, list[float]]:
    """Images/s of each loader over ``repeats`` rounds of one timed epoch per loader, interleaved so
    that drifting load on a shared machine affects all of them alike (warm-up epochs ran before)."""
    rates: dict[str, list[float]] = {name: [] for name in section.loaders}
    for _ in range(repeats):
        for name, loader in section.loaders.items():
            start = time.perf_counter()
            seen = one_epoch(loader)
            rates[name].append(seen / (time.perf_counter() - start))
            if seen != section.images:
                raise RuntimeError(f"{section.name} {name}: an epoch yielded {seen} images, "
                                   f"expected {section.images}")
    return rates


class ArrayImages(torch.utils.data.Dataset):
    """uint8 images in memory, returned as PIL images through ``transform`` (like torchvision's MNIST sets)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        array = self.images[i]
        image = Image.fromarray(array[..., 0], mode="L") if array.shape[-1] == 1 else Image.fromarray(array)
        return self.transform(image), int(self.labels[i])


def torchvision_transform(size: int, mean, std):
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def torch_loader(dataset, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=False, persistent_workers=True)


def summary(rates: list[float]) -> dict:
    return {"images_per_s_median": statistics.median(rates), "images_per_s_runs": rates}


def setup_fashion_mnist(work: Path, args) -> Section:
    source = load_source("fashion-mnist")
    start = time.perf_counter()
    info = prepare_dataset(source, work / "fmnist", num_workers=args.workers, progress=False)
    prepare_s = time.perf_counter() - start
    dataset = ArrayImages(source.train.images, source.train.labels, torchvision_transform(28, info.mean, info.std))
    loaders = {
        "ffcv": make_loader(work / "fmnist", "train", batch_size=args.batch_size, num_workers=args.workers,
                            train=True, order="random", seed=0),
        "pil_torchvision": torch_loader(dataset, args.batch_size, args.workers),
    }
    return Section("fashion_mnist", loaders, len(source.train),
                   {"resolution": 28, "storage": "raw uint8", "prepare_s": prepare_s})


def write_synthetic_jpegs(root: Path, classes: int, per_class: int, val_per_class: int, seed: int = 0) -> None:
    """Smooth random-noise JPEGs of 256-350 px per side (quality 90) in ``train/<class>`` and ``val/<class>``."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = root / split / f"class_{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (int(v) for v in rng.integers(256, 351, 2))
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
                grain = rng.normal(0, 6, (height, width, 3))
                pixels = np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).filter(ImageFilter.SMOOTH).save(folder / f"{i:04d}.JPEG", quality=90)


STORAGES = {"ffcv": {"write_mode": "auto"},  # prepare_dataset's default: every image JPEG
            "ffcv_proportion": {"write_mode": "proportion", "compress_probability": 0.5}}


def setup_jpeg_folder(work: Path, args) -> Section:
    from torchvision.datasets import ImageFolder

    root = work / "jpegs"
    start = time.perf_counter()
    write_synthetic_jpegs(root, 10, args.jpeg_images // 10, val_per_class=2)
    facts = {"source_sides_px": [256, 350], "stored_max_side_px": 256, "crop_px": 224, "jpeg_quality": 90,
             "generate_s": time.perf_counter() - start,
             "source_mb": sum(p.stat().st_size for p in (root / "train").rglob("*.JPEG")) / 2 ** 20}
    source = load_source("imagefolder", str(root), fingerprint="listing")
    loaders = {}
    for name, options in STORAGES.items():
        start = time.perf_counter()
        info = prepare_dataset(source, work / name, max_resolution=256, jpeg_quality=90, num_workers=args.workers,
                               progress=False, **options)
        facts[name] = {"write_options": options, "prepare_s": time.perf_counter() - start,
                       "train_beton_mb": (work / name / "train.beton").stat().st_size / 2 ** 20}
        loaders[name] = make_loader(work / name, "train", batch_size=args.jpeg_batch_size, num_workers=args.workers,
                                    train=True, order="random", seed=0, resolution=224)
    dataset = ImageFolder(str(root / "train"), transform=torchvision_transform(224, info.mean, info.std))
    loaders["pil_torchvision"] = torch_loader(dataset, args.jpeg_batch_size, args.workers)
    return Section("jpeg_imagefolder", loaders, len(source.train), facts)


def report(section: Section, rates: dict[str, list[float]]) -> dict:
    pil = statistics.median(rates["pil_torchvision"])
    result = {"images": section.images, **{k: v for k, v in section.facts.items() if k not in rates}}
    for name, runs in rates.items():
        result[name] = {**summary(runs), **section.facts.get(name, {})}
        if name != "pil_torchvision":
            result[name]["speedup"] = statistics.median(runs) / pil
    result["speedup"] = result["ffcv"]["speedup"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--jpeg-batch-size", type=int, default=64)
    parser.add_argument("--jpeg-images", type=int, default=2000)
    parser.add_argument("--skip-fmnist", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="unidd_loading_bench_"))
    try:
        # every fork (FFCV's writer processes, the DataLoader workers) happens before numba starts its
        # threads: preparation first, then the PIL loaders' warm-up epochs, then FFCV's
        sections = ([] if args.skip_fmnist else [setup_fashion_mnist(work, args)]) + [setup_jpeg_folder(work, args)]
        for section in sections:
            one_epoch(section.loaders["pil_torchvision"])
        for section in sections:
            for name, loader in section.loaders.items():
                if name != "pil_torchvision":
                    one_epoch(loader)
        results = {}
        for section in sections:
            results[section.name] = report(section, timed_rounds(section, args.repeats))
            line = ", ".join(f"{name} {results[section.name][name]['images_per_s_median']:.0f} img/s"
                             for name in section.loaders)
            print(f"{section.name}: {line}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    jpeg = results["jpeg_imagefolder"]
    jpeg["target"] = f"ffcv (default JPEG storage) >= {TARGET_SPEEDUP:g}x pil_torchvision"
    jpeg["target_met"] = jpeg["speedup"] >= TARGET_SPEEDUP
    path = write_result("loading", {
        "workers": args.workers, "repeats": args.repeats, "batch_size": args.batch_size,
        "jpeg_batch_size": args.jpeg_batch_size, "ffcv_distribution": importlib.metadata.version("ffcv"),
        "torchvision": importlib.metadata.version("torchvision"), **results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
