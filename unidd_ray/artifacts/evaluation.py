"""An evaluation's records: one file per finished student, and the summary of the seeds asked for.

Layout of an evaluation directory::

    .seeds/seed-<seed>-<key>.json   summary.json   config.yaml

A finished student's record (``top1``, ``protocol``, ``seconds``, ``key``; with ``evaluate.protocol: paper`` also
``checks``, ``top1_selected`` and ``selected_epoch``) is written as soon as it is tested, so a crash of
the rest of the run loses none; ``key`` (:func:`unidd_ray.keys.seed_key`) names what the result depends on, so
an evaluation with other settings written to the same folder keeps its own records, and a re-run (after a
crash, or with more seeds) trains only the seeds missing.  ``summary.json`` holds the seeds 0 … n − 1 asked
for, their top-1 accuracies, mean and standard deviation.
"""

from __future__ import annotations

import json
from pathlib import Path

from unidd_ray.artifacts.files import atomic_write_json, atomic_write_text

SEEDS = ".seeds"
SUMMARY = "summary.json"


def seed_record_path(out_dir: str | Path, seed: int, key: str) -> Path:
    """Where a finished student's record is kept: named by its seed and key."""
    return Path(out_dir) / SEEDS / f"seed-{seed}-{key[:16]}.json"


def write_seed_record(out_dir: str | Path, record: dict) -> Path:
    """Keep one finished student's record (``seed``, ``key``, ``top1``, ``seconds``), atomically."""
    return atomic_write_json(seed_record_path(out_dir, int(record["seed"]), record["key"]), record)


def finished_seeds(out_dir: str | Path, key: str) -> dict[int, dict]:
    """The records of the students an earlier run of the same evaluation (``key``) finished, by seed."""
    found = {}
    for path in sorted((Path(out_dir) / SEEDS).glob("seed-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a record cut short by a crash is a student to train again
        if isinstance(record, dict) and record.get("key") == key:
            found[int(record["seed"])] = record
    return found


def write_summary(out_dir: str | Path, summary: dict, config_text: str | None = None) -> None:
    """Write the evaluation's ``summary.json`` (and its ``config.yaml``)."""
    atomic_write_json(Path(out_dir) / SUMMARY, summary)
    if config_text is not None:
        atomic_write_text(Path(out_dir) / "config.yaml", config_text)


def read_summary(out_dir: str | Path) -> dict | None:
    """The evaluation's summary, or None when it has none (or an unreadable one)."""
    try:
        summary = json.loads((Path(out_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def evaluated(out_dir: str | Path, seeds: int) -> bool:
    """Whether ``out_dir`` holds a summary of seeds 0 … ``seeds`` − 1."""
    summary = read_summary(out_dir)
    return summary is not None and summary.get("seeds") == list(range(seeds))
