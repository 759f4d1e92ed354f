"""The plan of a recovery: which classes each worker optimises in which round, and the real images it starts from.

Worker ``w`` of ``W`` owns a balanced, disjoint, contiguous range of classes, cut into chunks of
``classes_per_batch``.  Work proceeds in *rounds*: round ``r`` is slot ``b = r // R`` and chunk ``j = r % R``
(``R`` = the largest number of chunks of any worker); in a round every worker optimises its ``j``-th chunk
for slot ``b``.  Each (class, slot) image starts from a real train image of its class, drawn with a generator
seeded by (seed, class): the same draw for every worker count, and the images of the random-subset baseline.
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
    chunks: list[list[list[int]]]  # chunks[w][j] = classes of worker w's j-th batch
    rounds_per_slot: int
    init_index: list[list[int]]  # init_index[class][slot] = index of the real train image
    seed: int
    classes: list[int]  # the classes distilled (all, or a subset for quick Tune trials)
    # what the images depend on besides the plan (keys.recovery_identity); a resume must find the same
    identity: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return self.ipc * self.rounds_per_slot

    def batch_id(self, slot: int, worker: int, chunk: int) -> int:
        """A global id, unique per (slot, worker, chunk), increasing with the round."""
        return (slot * self.rounds_per_slot + chunk) * self.workers + worker

    def batches(self) -> int:
        return self.ipc * sum(len(c) for c in self.chunks)

    def batches_done(self, round_index: int) -> int:
        """Number of batches finished once rounds 0 … ``round_index`` are done."""
        slots, j = divmod(round_index, self.rounds_per_slot)
        per_slot = sum(len(c) for c in self.chunks)
        return slots * per_slot + sum(min(j + 1, len(c)) for c in self.chunks)


def make_plan(labels: np.ndarray, num_classes: int, cfg: RecoverConfig, classes: list[int] | None = None
              ) -> RecoverPlan:
    """Class partition, chunks and the seeded choice of real initial images (checked before any work).

    ``classes`` restricts the plan to a subset of the classes (default: all of them).
    """
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
    partitions = [p.tolist() for p in np.array_split(np.array(classes), cfg.workers)]
    per_batch = cfg.classes_per_batch
    chunks = []
    for part in partitions:
        size = per_batch or len(part)
        chunks.append([part[i:i + size] for i in range(0, len(part), size)])
    rounds_per_slot = max(len(c) for c in chunks)
    init_index = []
    for k in range(num_classes):
        if k not in classes:
            init_index.append([])
            continue
        members = np.flatnonzero(labels == k)
        rng = np.random.default_rng([cfg.seed, k])
        init_index.append(members[rng.permutation(len(members))[:cfg.ipc]].tolist())
    return RecoverPlan(num_classes, cfg.ipc, cfg.workers, partitions, chunks, rounds_per_slot, init_index, cfg.seed,
                       classes)
