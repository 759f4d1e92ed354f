"""An ImageNet-shaped folder for rehearsing the ImageNet-1K recipe where ImageNet is not at hand.

``write_imagenet_like(out)`` writes the official layout the ``imagefolder`` source reads:

- ``train/<wnid>/<wnid>_<i>.JPEG``: one folder per class named like a WordNet id (``n0`` and seven digits,
  distinct, sorted as ImageNet's are), ``train_per_class`` JPEGs in each;
- ``val/ILSVRC2012_val_<8 digits>.JPEG``: a flat folder of ``val_per_class`` images per class, in a shuffled
  class order, and ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the class's WordNet id first, as
  Kaggle's file has it) for the ``val_labels`` option;
- ``rehearsal.json``: the settings, so that the folder is known as this tool's output.

Images vary as the real set's do: each side drawn from ``[min_side, max_side]`` independently (portrait,
landscape, square), some grayscale (JPEG mode ``L``) and some CMYK, the rest RGB; the content is a smooth
class-coloured pattern plus noise, so a network can tell classes apart.  Everything follows from ``seed``;
the folder is written under a temporary name beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from unidd_ray.artifacts.files import atomic_write_json, check_output
from unidd_ray.artifacts.locks import output_lock

KIND = "rehearsal"
LABEL_FILE = "LOC_val_solution.csv"
RECORD = "rehearsal.json"


def wordnet_ids(classes: int, rng: np.random.Generator) -> list[str]:
    """``classes`` distinct ids ``n0xxxxxxx``, sorted."""
    numbers = rng.choice(10_000_000, size=classes, replace=False)
    return sorted(f"n0{n:07d}" for n in numbers)


def _image(rng: np.random.Generator, colour: np.ndarray, mode: str, min_side: int, max_side: int) -> Image.Image:
    """A class-coloured smooth pattern with noise, of a random size, in ``mode`` (RGB, L or CMYK)."""
    h, w = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    fy, fx, phase = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(fy * y + fx * x + phase)
    pixels = 255 * (0.6 * colour[None, None, :] * wave[..., None] + 0.4 * rng.random((h, w, 3), dtype=np.float32))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def _modes(count: int, rng: np.random.Generator, grayscale: float, cmyk: float) -> list[str]:
    draws = rng.random(count)
    return ["L" if u < grayscale else "CMYK" if u < grayscale + cmyk else "RGB" for u in draws]


def write_imagenet_like(out: str | Path, *, classes: int = 1000, train_per_class: int = 3, val_per_class: int = 1,
                        min_side: int = 180, max_side: int = 500, grayscale: float = 0.1, cmyk: float = 0.05,
                        quality: int = 85, seed: int = 0, wait: bool = False) -> Path:
    """Write the folder (see the module docstring) to ``out``: a new or empty directory, or an earlier one of
    this kind, which is replaced once the new one is complete; ``out``'s lock is held throughout (``wait``:
    queue behind another writer instead of refusing).  Returns ``out``."""
    if classes < 1 or train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"classes, train_per_class and val_per_class must be at least 1, got {classes}, "
                         f"{train_per_class}, {val_per_class}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side}, {max_side}")
    if not (0 <= grayscale and 0 <= cmyk and grayscale + cmyk <= 1):
        raise ValueError(f"grayscale and cmyk are fractions that sum to at most 1, got {grayscale}, {cmyk}")
    out = Path(out)
    check_output(out, KIND)
    with output_lock(out, wait=wait):
        check_output(out, KIND)  # again, now that no other writer can change it
        _write(out, classes, train_per_class, val_per_class, min_side, max_side, grayscale, cmyk, quality, seed)
    return out


def _write(out: Path, classes: int, train_per_class: int, val_per_class: int, min_side: int, max_side: int,
           grayscale: float, cmyk: float, quality: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    wnids = wordnet_ids(classes, rng)
    colours = rng.random((classes, 3), dtype=np.float32)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "val").mkdir(parents=True)
    for k, wnid in enumerate(wnids):
        folder = partial / "train" / wnid
        folder.mkdir(parents=True)
        for i, mode in enumerate(_modes(train_per_class, rng, grayscale, cmyk)):
            _image(rng, colours[k], mode, min_side, max_side).save(folder / f"{wnid}_{i}.JPEG", quality=quality)
    val_classes = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    rows = ["ImageId,PredictionString"]
    for i, (k, mode) in enumerate(zip(val_classes, _modes(len(val_classes), rng, grayscale, cmyk)), 1):
        name = f"ILSVRC2012_val_{i:08d}"
        _image(rng, colours[k], mode, min_side, max_side).save(partial / "val" / f"{name}.JPEG", quality=quality)
        rows.append(f"{name},{wnids[k]} 0 0 {min_side - 1} {min_side - 1}")
    (partial / LABEL_FILE).write_text("\n".join(rows) + "\n")
    atomic_write_json(partial / RECORD, {"classes": classes, "train_per_class": train_per_class,
                                         "val_per_class": val_per_class, "min_side": min_side, "max_side": max_side,
                                         "grayscale": grayscale, "cmyk": cmyk, "quality": quality, "seed": seed})
    _replace(partial, out)


def _replace(partial: Path, out: Path) -> None:
    """Move the finished ``partial`` folder to ``out``; an earlier output there (checked to be this tool's) is
    moved aside first and removed only after the new one is in place."""
    aside = None
    if out.exists() and any(out.iterdir()):
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, aside)
    elif out.exists():
        out.rmdir()
    os.replace(partial, out)
    if aside is not None:
        shutil.rmtree(aside)
