"""The random real subset: IPC real train images per class, written as a distilled set.

The images are those the recoveries start from (the plan's seeded choice, :mod:`unidd_ray.core.plan`), so the
baseline is exactly the starting point the recovery methods improve on; they are written at the teacher's side,
like the recovered sets.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from unidd_ray.artifacts import distilled
from unidd_ray.artifacts.dataset import read_labels, verify_dataset
from unidd_ray.artifacts.files import atomic_directory, sha256_bytes
from unidd_ray.artifacts.locks import holds_output_lock
from unidd_ray.config import RecoverConfig
from unidd_ray.core.plan import make_plan
from unidd_ray.data.loading import load_real_images


def _groups(num_classes: int, ipc: int, group_images: int) -> list[list[int]]:
    """Consecutive classes, as many per group as ``group_images`` images hold (a class larger than that alone)."""
    groups, group = [], []
    for k in range(num_classes):
        if group and (len(group) + 1) * ipc > group_images:
            groups.append(group)
            group = []
        group.append(k)
    groups.append(group)
    return groups


@holds_output_lock()
def write_real_subset(data_dir: str | Path, out_dir: str | Path, *, ipc: int, seed: int,
                      num_workers: int = 1, recipe_yaml: str | None = None, resolution: int | None = None,
                      group_images: int = 4096, normalize=True) -> Path:
    """The random-real-subset baseline: IPC seeded real images per class, in the distilled format.

    ``resolution``: side of the written images (default: the stored one; the pipeline passes its teacher's, the
    side of the recovered sets); ``group_images``: how many images are read and held at once at most (whole
    classes: ImageNet at IPC 50 is 50,000 images, ~30 GB as float32 at 224 px); ``normalize``: the teacher's
    ``(mean, std)``, with which the images are read and encoded, as the recoveries read their starting images
    (True: ``dataset.json``'s).
    """
    info = verify_dataset(data_dir)
    mean, std = (info.mean, info.std) if normalize is True else normalize
    plan = make_plan(read_labels(str(data_dir), "train"), info.num_classes, RecoverConfig(ipc=ipc, seed=seed))
    with atomic_directory(out_dir, distilled.KIND) as staging:
        rows = []
        for classes in _groups(info.num_classes, ipc, group_images):
            every = [i for k in classes for i in plan.init_index[k]]
            loaded = iter(load_real_images(str(data_dir), every, num_workers=num_workers, resolution=resolution,
                                           normalize=(mean, std)))
            for k in classes:
                for slot, index in enumerate(plan.init_index[k]):
                    data = distilled.to_png_bytes(next(loaded), mean, std)
                    rows.append({"class": k, "class_name": info.class_names[k], "slot": slot,
                                 "path": distilled.write_image(staging, k, slot, data), "sha256": sha256_bytes(data),
                                 "source_index": index, "method": "random", "seed": seed})
        summary = {"method": "random", "ipc": ipc, "seed": seed, "images": len(rows),
                   "dataset_fingerprint": info.fingerprint}
        config_text = recipe_yaml if recipe_yaml is not None else yaml.safe_dump({"subset": {"ipc": ipc, "seed": seed}})
        distilled.publish(staging, rows, summary=summary, config_text=config_text, method="random", ipc=ipc,
                          dataset_fingerprint=info.fingerprint)
    return Path(out_dir)
