"""How the recovery's gradient on the images splits between the cross-entropy and the matching terms, slot by slot.

For slot b of a finished recovery (its stored ``plan.json``, ``config.yaml`` and final ``emu_state.pt``),
the script takes slot b's real initial images (what the optimisation starts from), draws
``--repeats`` augmentations like the recovery loop does, and measures at that point

    |g_ce|    = ‖∂ CE / ∂X‖                 (the cross-entropy's gradient on the images)
    |g_match| = ‖∂ α_b (Σ L_filter + Σ L_signal) / ∂X‖

with the EMU holding b finished batches.  Their average statistics are taken from the final EMU
state (the mean over all slots stands in for the mean over the first b; the weight 1/(b + 1) of the
current batch, which is what this measures, is exact).  α_b is the recovery's α, times b + 1 with
``recover.alpha_scale: emu`` (``--alpha-scale`` overrides the stored setting).

    python benchmarks/gradient_balance.py --run runs/fm-results --recovery runs/fm-results/cfm-ipc50-<key> \
        [--slots 0,1,4,9,24,49] [--repeats 4] [--alpha-scale constant|emu]

``--run`` is the pipeline's run directory: its one ``data-*``, ``teacher-*`` and ``stats-*``
directories are used unless ``--teacher``/``--stats`` name others (the statistics must be the
teacher's: they are checked against its sha256).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import unidd_ray  # noqa: F401
from unidd_ray.config import RecoverConfig, from_dict
from unidd_ray.core.plan import RecoverPlan
from unidd_ray.core.recovery import Reducer, apply_augment, build_distiller, sample_augment
from unidd_ray.data.loading import load_real_images
from unidd_ray.methods import ALPHA_SCALES
from unidd_ray.models import tapped
from unidd_ray.spectral import EMU

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import stage_dir, write_result


def emu_after(distiller, final: dict, batches: int) -> EMU | None:
    """An EMU with ``batches`` finished batches whose average is the final state's average."""
    if batches == 0:
        return None
    full = EMU(distiller.emu_layers())
    full.load_state_dict(final)
    emu = EMU(distiller.emu_layers())
    for name in distiller.layers:
        finished = full.synced[name] + full.pending[name]
        state = emu.synced[name]
        state.cov_sum = finished.cov_sum / finished.batches * batches
        state.batches = torch.full_like(finished.batches, batches)
        state.signal_sum = finished.signal_sum / finished.signal_count * batches
        state.signal_count = torch.full_like(finished.signal_count, batches)
    return emu


def gradient_norms(distiller, images: torch.Tensor, labels: torch.Tensor, slot: int, ipc: int, emu: EMU | None,
                   generator: torch.Generator) -> dict:
    s = distiller.s
    aug = sample_augment(generator, distiller.resolution, scale=tuple(s.crop_scale), flip=s.flip,
                         max_roll=distiller.max_roll)
    x = images.clone().requires_grad_(True)
    captured = {}
    with tapped(distiller.teacher, distiller.layers, lambda name, feats: captured.__setitem__(name, feats)):
        logits = distiller.teacher(apply_augment(x, aug))
    ce = F.cross_entropy(logits, labels)
    (g_ce,) = torch.autograd.grad(ce, x, retain_graph=True)
    probs = torch.softmax(logits, 1) if s.signal == "soft" else None
    f_total, s_total, _ = distiller.matching_terms(captured, labels, probs, distiller.slot_filter(slot, ipc), emu,
                                              Reducer())
    alpha = distiller.matching_weight(emu)
    (g_match,) = torch.autograd.grad(alpha * (f_total + s_total), x)
    return {"ce": float(ce.detach()), "matching": float((f_total + s_total).detach()), "alpha": alpha,
            "grad_ce": float(g_ce.norm()), "grad_matching": float(g_match.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--recovery", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, default=None, help="default: the run's one teacher-* directory")
    parser.add_argument("--stats", type=Path, default=None, help="default: the run's one stats-* directory")
    parser.add_argument("--slots", default=None, help="comma-separated slots (default: 0, 1, 4, 9, ... , IPC-1)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--alpha-scale", choices=ALPHA_SCALES, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recover = yaml.safe_load((args.recovery / "config.yaml").read_text())["recover"]
    if args.alpha_scale:
        recover["alpha_scale"] = args.alpha_scale
    teacher = args.teacher or stage_dir(args.run, "teacher")
    stats = args.stats or stage_dir(args.run, "stats")
    data_dir = str(stage_dir(args.run, "data"))
    _, distiller = build_distiller(from_dict(RecoverConfig, recover, "recover"), data_dir, teacher, stats, "cpu")
    plan = RecoverPlan(**json.loads((args.recovery / "plan.json").read_text()))
    if plan.workers != 1 or len(plan.chunks[0]) != 1:
        raise SystemExit("the script follows one-worker recoveries with one batch per slot")
    final = torch.load(args.recovery / "emu_state.pt", weights_only=True)
    slots = ([int(b) for b in args.slots.split(",")] if args.slots
             else sorted({0, 1, 4, *range(9, plan.ipc, 10), 24, plan.ipc - 1} & set(range(plan.ipc))))
    classes = plan.chunks[0][0]
    labels = torch.tensor(classes)
    rows = []
    for slot in slots:
        images = load_real_images(data_dir, [plan.init_index[k][slot] for k in classes], normalize=distiller.normalize)
        images = images.contiguous(memory_format=distiller.layout)
        emu = emu_after(distiller, final, slot)
        generator = torch.Generator().manual_seed(slot)
        draws = [gradient_norms(distiller, images, labels, slot, plan.ipc, emu, generator)
                 for _ in range(args.repeats)]
        row = {"slot": slot, "beta": getattr(distiller.slot_filter(slot, plan.ipc), "beta", float("nan")),
               **{k: float(np.mean([d[k] for d in draws])) for k in draws[0]}}
        row["ratio"] = row["grad_matching"] / row["grad_ce"]
        rows.append(row)
        print(f"slot {slot:3d}  beta {row['beta']:.2e}  alpha {row['alpha']:.3g}  CE {row['ce']:.3f}  "
              f"|g_ce| {row['grad_ce']:.4f}  matching {row['matching']:.1f}  |g_match| {row['grad_matching']:.4f}  "
              f"ratio {row['ratio']:.2f}", flush=True)
    path = write_result("gradient_balance", {"recovery": str(args.recovery),
                                             "recover": recover, "repeats": args.repeats, "slots": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
