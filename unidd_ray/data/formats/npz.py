"""A labelled image array in a NumPy ``.npz`` file.

Keys: ``x`` -- uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` with ``H == W`` and ``C`` in {1, 3};
``y`` -- integer labels ``(N,)``.  The val split is ``x_val``/``y_val`` when the file has them,
otherwise a seeded stratified ``val_fraction`` of ``x``/``y``.  ``class_names`` (a string array) is
optional; without it the classes are named ``"0"``, ``"1"``, ... up to the largest label.  The file
is read with ``allow_pickle=False``.  Fingerprint: the file's bytes and the split options.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from unidd_ray.data.hashing import Fingerprint
from unidd_ray.data.source_types import SourceDataset, SourceError, Split, check_label_range, validate_source
from unidd_ray.data.splitting import stratified_split


def _images(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    if array.dtype != np.uint8:
        raise SourceError(f"{path}: {key!r} must be uint8 images, got {array.dtype}; convert with "
                          "np.clip(x, 0, 255).astype(np.uint8) (or scale [0, 1] floats by 255 first)")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[3] not in (1, 3) or array.shape[1] != array.shape[2]:
        raise SourceError(f"{path}: {key!r} must have shape (N, H, W) or (N, H, W, C) with H == W and C in "
                          "(1, 3), "
                          f"got {array.shape}")
    return np.ascontiguousarray(array)


def _labels(array: np.ndarray, key: str, path: Path, count: int) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer) or array.shape != (count,):
        raise SourceError(f"{path}: {key!r} must be {count} integer labels (one per image), got "
                          f"{array.dtype} {array.shape}")
    return array.astype(np.int64)


def load(root: str | None = None, *, val_fraction: float | None = None, seed: int | None = None) -> SourceDataset:
    """Read the ``.npz`` file at ``root``.

    Without ``x_val``/``y_val`` arrays, a seeded stratified split takes ``val_fraction`` (default 0.2,
    ``seed`` default 0) of every class into val; with them, the two options do not apply and are refused.
    """
    if root is None:
        raise FileNotFoundError("npz: no file given; pass --root FILE.npz holding arrays 'x' and 'y'")
    path = Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"npz: {path} does not exist; pass --root FILE.npz holding arrays 'x' and 'y'")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise SourceError(f"{path} is truncated or corrupt (not a valid .npz file: {exc}); write it with "
                          "np.savez(path, x=..., y=...)") from exc
    for key in ("x", "y"):
        if key not in arrays:
            raise SourceError(f"{path}: array {key!r} is missing (found {sorted(arrays)}); the file needs 'x' "
                              "and 'y'")
    x = _images(arrays["x"], "x", path)
    y = _labels(arrays["y"], "y", path, len(x))
    options: dict = {}
    if "x_val" in arrays or "y_val" in arrays:
        if "x_val" not in arrays or "y_val" not in arrays:
            raise SourceError(f"{path}: has only one of 'x_val' and 'y_val'; store both or neither")
        x_val = _images(arrays["x_val"], "x_val", path)
        y_val = _labels(arrays["y_val"], "y_val", path, len(x_val))
        if x_val.shape[1:] != x.shape[1:]:
            raise SourceError(f"{path}: 'x_val' images {x_val.shape[1:]} differ from 'x' images {x.shape[1:]}")
        given = [name for name, value in (("val_fraction", val_fraction), ("seed", seed)) if value is not None]
        if given:
            raise SourceError(f"{path} has its own val split ('x_val', 'y_val'), so {given} would be ignored; "
                              "remove the option(s), or the val arrays to split 'x' instead")
    else:
        val_fraction = 0.2 if val_fraction is None else val_fraction
        seed = 0 if seed is None else seed
        options = {"val_fraction": val_fraction, "seed": seed}
        train_ix, val_ix = stratified_split(y, val_fraction, seed)
        x, y, x_val, y_val = x[train_ix], y[train_ix], x[val_ix], y[val_ix]
    if "class_names" in arrays:
        class_names = [str(n) for n in np.asarray(arrays["class_names"]).reshape(-1)]
    else:
        class_names = [str(k) for k in range(max(int(y.max(initial=-1)), int(y_val.max(initial=-1))) + 1)]
    val_key = "y_val" if "y_val" in arrays else "y"
    check_label_range(y, len(class_names), "train", f"{path} (array 'y')")
    check_label_range(y_val, len(class_names), "val", f"{path} (array {val_key!r})")
    train, val = Split(labels=y, images=x), Split(labels=y_val, images=x_val)
    fingerprint = Fingerprint("npz")
    fingerprint.add_file(path.name, path)
    fingerprint.add_options(options)
    return validate_source(SourceDataset(name=path.stem, class_names=class_names, channels=int(x.shape[3]),
                                         resolution=int(x.shape[1]), train=train, val=val,
                                         fingerprint=fingerprint.hexdigest(), origin=str(path), options=options))
