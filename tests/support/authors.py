"""A tiny CIFAR-10 dataset made of the 20 real test images in tests/fixtures/unidd_authors, and the UniDD authors'
checkpoint and statistics imported beside it (`unidd-ray import unidd`).  Only 8 of the 10 classes have an image
there; a prepared dataset needs every class, so bird and deer get one mid-grey placeholder each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from unidd_ray.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "unidd_authors"
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def prepare_cifar20(root: Path) -> tuple[Path, Path, list[int]]:
    """(prepared data, the imported artifacts' directory with teacher/ and stats/, the classes with real images)."""
    files = sorted((FIXTURES / "cifar10-test-20").glob("*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8) for f in files])
    y = np.array([int(f.stem.rsplit("_", 1)[1]) for f in files])
    missing = sorted(set(range(10)) - set(y.tolist()))
    x = np.concatenate([x, np.full((len(missing), 32, 32, 3), 128, dtype=np.uint8)])
    real, y = sorted(set(y.tolist())), np.concatenate([y, missing])
    np.savez(root / "cifar20.npz", x=x, y=y, x_val=x, y_val=y, class_names=np.array(NAMES))
    assert main(["prepare", "--dataset", "npz", "--root", str(root / "cifar20.npz"), "--out", str(root / "data"),
                 "--workers", "1"]) == 0
    assert main(["import", "unidd", "--statistics", str(FIXTURES / "statistic"), "--model", "ConvNetW128D3",
                 "--checkpoint", str(FIXTURES / "ckpt" / "CIFAR-10" / "ConvNetW128D3.pth"), "--arch", "convnet",
                 "--dataset", "cifar10", "--out", str(root / "authors")]) == 0
    return root / "data", root / "authors", real
