"""A worker group of torch.distributed (gloo) processes on this machine, without Ray: the all-reduces a Ray Train
recovery makes, at a fraction of a Ray Train run's start-up."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, fn, world: int, rendezvous: str, out: str, args: tuple) -> None:
    torch.set_num_threads(1)  # as a Ray Train worker with cpus_per_worker=1
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        torch.save(fn(rank, *args), Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """``fn(rank, *args)`` in ``world`` spawned processes joined in one gloo group (``fn`` importable, its
    result picklable); their results in rank order.  A failing rank raises here with its traceback."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(fn, world, f"file://{d}/rendezvous", d, args), nprocs=world, join=True)
        return [torch.load(Path(d) / f"{rank}.pt", weights_only=False) for rank in range(world)]


def recover_rank(rank: int, cfg, data_dir: str, teacher_dir: str, stats_dir: str | None,
                 real: dict[int, torch.Tensor]) -> dict:
    """Every round of a recovery's plan on worker ``rank`` of the gloo group (what a Ray Train worker does,
    without its files): its images by (class, slot), the loss parts of each round and its final EMU state.
    ``real``: the initial images by train index (read once by the caller: an FFCV loader's first start in a
    process costs seconds)."""
    from unidd_ray.artifacts.dataset import read_labels
    from unidd_ray.core.plan import make_plan
    from unidd_ray.core.recovery import TorchDistReducer, build_distiller, run_round
    from unidd_ray.spectral import EMU

    info, distiller = build_distiller(cfg, data_dir, teacher_dir, stats_dir, "cpu")
    plan = make_plan(read_labels(data_dir, "train"), info.num_classes, cfg)
    emu = EMU(distiller.emu_layers()) if distiller.layers else None
    images, parts = {}, []
    for r in range(plan.rounds):
        piece, result = run_round(distiller, plan, r, rank=rank, emu=emu, reducer=TorchDistReducer(),
                                  data_dir=data_dir, num_workers=1, device="cpu",
                                  init_images=lambda indices: torch.stack([real[i] for i in indices]))
        for cls, image in zip(piece, result.images):
            images[(cls, r // plan.rounds_per_slot)] = image
        parts.append(result.parts)
    return {"images": images, "parts": parts, "emu": emu.state_dict() if emu is not None else None}
