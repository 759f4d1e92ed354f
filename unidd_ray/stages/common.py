"""Helpers shared by the stage programs."""

from __future__ import annotations

import torch


def evaluate_top1(model, data_dir: str, *, batch_size: int, num_workers: int, device, indices=None,
                  resolution: int | None = None) -> tuple[int, int]:
    """(correct, total) of ``model`` on the val split (or a shard of it given by ``indices``)."""
    from unidd_ray.data.loading import make_loader

    loader = make_loader(data_dir, "val", batch_size=batch_size, num_workers=num_workers, indices=indices,
                         train=False, device=str(device), resolution=resolution)
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels, _ in loader:
            pred = model(images.to(device)).argmax(1)
            correct += int((pred == labels.to(device)).sum())
            total += len(labels)
    model.train(was_training)
    return correct, total
