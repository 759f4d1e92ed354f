"""scikit-learn's bundled 8 x 8 handwritten digits (1,797 images), for fast tests.

Pixel values 0..16 are scaled to 0..255.  The data has no official split: a seeded stratified
split takes ``val_fraction`` of every class into val.  Fingerprint: the arrays and the split options.
"""

from __future__ import annotations

import numpy as np

from unidd_ray.data.hashing import Fingerprint
from unidd_ray.data.source_types import SourceDataset, SourceError, Split, validate_source
from unidd_ray.data.splitting import stratified_split


def load(root: str | None = None, *, val_fraction: float = 0.2, seed: int = 0) -> SourceDataset:
    """Read the digits (they ship with scikit-learn, so there is no ``root``)."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn takes a second to import, and only digits needs it

    if root is not None:
        raise SourceError(f"digits: got root {root!r}, but the digits ship with scikit-learn; remove data.root "
                          "(--root)")

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    train_ix, val_ix = stratified_split(labels, val_fraction, seed)
    fingerprint = Fingerprint("digits")
    fingerprint.add_array("images", images)
    fingerprint.add_array("labels", labels)
    options = {"val_fraction": val_fraction, "seed": seed}
    fingerprint.add_options(options)
    return validate_source(SourceDataset(
        name="digits", class_names=[str(d) for d in range(10)], channels=1, resolution=8,
        train=Split(labels=labels[train_ix], images=images[train_ix]),
        val=Split(labels=labels[val_ix], images=images[val_ix]),
        fingerprint=fingerprint.hexdigest(), origin="sklearn.datasets.load_digits", options=options))
