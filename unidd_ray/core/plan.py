"""The plan of a recovery: which classes each worker optimises in which round, and the real images it starts from.

Work proceeds in *rounds*: round ``r`` is slot ``b = r // R`` and batch ``j = r % R`` (``R`` = rounds per
slot); ``chunks[w][j]`` are the classes worker ``w`` optimises in it.  ``recover.distribution`` decides how the
classes become batches:

- ``exact`` (the default): the classes, in order, are cut into global batches of ``batch_classes`` (None: one
  batch of every class) — the authors' batches (``--batch 200`` on Tiny-ImageNet and ImageNet) — and batch
  ``j`` is split across the W workers with ``np.array_split`` (contiguous pieces, uneven when W does not divide
  it, empty for the last workers when W exceeds it).  The pieces of a round are one batch: the moments are
  all-reduced at every iteration and the EMU counts the round once, so any W gives the images of one process.
- ``independent``: worker ``w`` owns a balanced, disjoint, contiguous range of the classes cut into its own
  batches of ``batch_classes`` (None: all of its classes); in round ``j`` every worker with a ``j``-th batch
  optimises it alone and the EMU absorbs the round's W batches.

Each (class, slot) image starts from a real train image of its class (``recover.init``): ``random`` draws it
with a generator seeded by (seed, class) — the same draw for every worker count, and the images of the
random-subset baseline; ``first`` takes the class's first IPC images in file order (the authors' choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unidd_ray.config import RecoverConfig


@dataclass
class RecoverPlan:
    num_classes: int
    ipc: int
    workers: int
    partitions: list[list[int]]  # classes of each worker
    chunks: list[list[list[int]]]  # chunks[w][j] = classes worker w optimises in round j of a slot (exact: may be [])
    rounds_per_slot: int
    init_index: list[list[int]]  # init_index[class][slot] = index of the real train image
    seed: int
    classes: list[int]  # the classes distilled (all, or a subset for quick Tune trials)
    # the pieces of a round are one global batch (moments all-reduced every iteration): exact over several workers
    global_batches: bool = False
    # what the images depend on besides the plan (keys.recovery_identity); a resume must find the same
    identity: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return self.ipc * self.rounds_per_slot

    def piece(self, worker: int, round_index: int) -> list[int]:
        """The classes ``worker`` optimises in round ``round_index`` ([] when it has none)."""
        chunks = self.chunks[worker]
        j = round_index % self.rounds_per_slot
        return chunks[j] if j < len(chunks) else []

    def batch_size(self, round_index: int) -> int:
        """The number of images of round ``round_index`` over all workers (exact: its global batch's)."""
        return sum(len(self.piece(w, round_index)) for w in range(self.workers))

    def batch_id(self, slot: int, worker: int, chunk: int) -> int:
        """A global id, unique per (slot, worker, chunk), increasing with the round."""
        return (slot * self.rounds_per_slot + chunk) * self.workers + worker

    def batches(self) -> int:
        """The batch records of the whole recovery: one per worker and non-empty piece of a round."""
        return self.ipc * sum(1 for c in self.chunks for piece in c if piece)

    def batches_done(self, round_index: int) -> int:
        """Number of batch records finished once rounds 0 … ``round_index`` are done."""
        slots, j = divmod(round_index, self.rounds_per_slot)
        per_slot = sum(1 for c in self.chunks for piece in c if piece)
        return slots * per_slot + sum(1 for c in self.chunks for piece in c[:j + 1] if piece)


def make_plan(labels: np.ndarray, num_classes: int, cfg: RecoverConfig, classes: list[int] | None = None
              ) -> RecoverPlan:
    """Batches, their pieces per worker and the choice of real initial images (checked before any work).

    ``classes`` restricts the plan to a subset of the classes (default: all of them).
    """
    if classes is None:
        classes = cfg.classes  # recover.classes: None (every class) or the classes to distil
    classes = list(range(num_classes)) if classes is None else sorted(int(k) for k in classes)
    if not classes or classes[0] < 0 or classes[-1] >= num_classes:
        raise ValueError(f"classes must be a non-empty subset of 0..{num_classes - 1}")
    if cfg.workers > len(classes):
        raise ValueError(f"recover.workers must be between 1 and the number of classes ({len(classes)}), "
                         f"got {cfg.workers}")
    counts = np.bincount(labels, minlength=num_classes)
    short = [k for k in classes if counts[k] < cfg.ipc]
    if short:
        k = short[0]
        raise ValueError(f"IPC {cfg.ipc} is larger than the {counts[k]} training images of class {k}; "
                         f"lower recover.ipc to at most {min(int(counts[c]) for c in classes)}")
    size = cfg.batch_classes
    if cfg.distribution == "exact":
        size = size or len(classes)
        batches = [classes[i:i + size] for i in range(0, len(classes), size)]
        chunks = [[] for _ in range(cfg.workers)]
        for batch in batches:
            for w, piece in enumerate(np.array_split(np.array(batch, dtype=np.int64), cfg.workers)):
                chunks[w].append(piece.tolist())
        partitions = [[k for piece in c for k in piece] for c in chunks]
    else:
        partitions = [p.tolist() for p in np.array_split(np.array(classes), cfg.workers)]
        chunks = [[part[i:i + (size or len(part))] for i in range(0, len(part), size or len(part))]
                  for part in partitions]
    rounds_per_slot = max(len(c) for c in chunks)
    init_index = []
    for k in range(num_classes):
        if k not in classes:
            init_index.append([])
            continue
        members = np.flatnonzero(labels == k)
        if cfg.init == "first":  # file order
            init_index.append(members[:cfg.ipc].tolist())
        else:
            rng = np.random.default_rng([cfg.seed, k])
            init_index.append(members[rng.permutation(len(members))[:cfg.ipc]].tolist())
    return RecoverPlan(num_classes, cfg.ipc, cfg.workers, partitions, chunks, rounds_per_slot, init_index, cfg.seed,
                       classes, cfg.distribution == "exact" and cfg.workers > 1)
