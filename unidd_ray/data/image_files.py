"""Image files on disk: listing them and decoding them with PIL into RGB uint8 arrays.

PIL is used throughout (``torchvision.io`` decoders do not work with this project's torch build).
JPEGs that will be shrunk are decoded at a reduced scale (``Image.draft``), which libjpeg does
for a fraction of the cost of a full decode.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
import math
from pathlib import Path

import numpy as np
from PIL import Image

from unidd_ray.data.source_types import SourceError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"})


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if is_image_file(p))


def _scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_rgb(path: str | Path, *, max_side: int | None = None, square: int | None = None) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array.

    ``max_side``: shrink (never enlarge) so that the longer side is at most ``max_side``, keeping
    the aspect ratio.  ``square``: scale the shorter side to ``square`` and take the central
    ``square x square`` crop.  Errors of PIL (truncated or corrupt files) propagate as ``OSError``
    or ``ValueError``; callers add the file name.
    """
    with Image.open(path) as image:
        width, height = image.size
        if square is not None:
            scale = square / min(width, height)
        elif max_side is not None and max(width, height) > max_side:
            scale = max_side / max(width, height)
        else:
            scale = 1.0
        if scale < 1.0:
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        rgb = image.convert("RGB")
    if scale != 1.0:
        rgb = rgb.resize(_scaled_size(width, height, scale), Image.BILINEAR)
    if square is not None:
        left = (rgb.width - square) // 2
        top = (rgb.height - square) // 2
        rgb = rgb.crop((left, top, left + square, top + square))
    return np.array(rgb, dtype=np.uint8)


def decode_fixed_size(paths: list[Path], side: int, *, threads: int | None = None) -> np.ndarray:
    """Decode files that must all be ``side x side`` into one ``(N, side, side, 3)`` uint8 array.

    Runs on a thread pool (PIL releases the GIL while decoding).  Raises
    :class:`~unidd_ray.data.source_types.SourceError` naming the first file that is corrupt,
    truncated or of another size.
    """
    out = np.empty((len(paths), side, side, 3), dtype=np.uint8)

    def work(i: int) -> None:
        path = paths[i]
        try:
            array = decode_rgb(path)
        except (OSError, ValueError, SyntaxError) as exc:
            raise SourceError(f"{path} is truncated or corrupt ({exc}); replace or delete the file") from exc
        if array.shape != (side, side, 3):
            raise SourceError(f"{path} is {array.shape[1]} x {array.shape[0]} px but this dataset's images are "
                              f"{side} x {side}; the file does not belong here")
        out[i] = array

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for _ in pool.map(work, range(len(paths)), chunksize=256):
            pass
    return out
