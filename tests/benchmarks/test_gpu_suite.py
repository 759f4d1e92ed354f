"""``benchmarks/gpu_suite.py --dry-run``: every part of the GPU suite runs at toy size on the CPU and writes the
JSON shape a GPU run writes (finite numbers everywhere, peak GPU memory null on a CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _finite(value, where: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), where


def test_dry_run_writes_every_part_with_finite_numbers(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite = json.loads(out.read_text())
    assert suite["dry_run"] is True and suite["benchmark"] == "gpu_suite"
    facts = suite["machine"]
    assert {"device", "device_name", "torch", "cuda", "cpu_count", "date", "git_commit"} <= set(facts)
    assert facts["device"] == "cpu" and facts["cpu_count"] >= 1
    assert suite["model"]["arch"] == "resnet18" and len(suite["model"]["taps"]) == 17

    rows = suite["recovery"]
    assert {(r["method"], r["amp"]) for r in rows} == {(m, a) for m in ("cfm", "sre2l", "ce") for a in ("none", "bf16")}
    for r in rows:
        where = f"recovery {r['method']}/{r['amp']}"
        assert r["images"] == 4 and r["iterations_timed"] == 1, where
        _finite(r["s_per_iteration"], where)
        _finite(r["final_loss"], where)
        assert r["peak_memory_bytes"] is None, where  # no GPU

    stats = suite["stats"]
    assert stats["source"] == "synthetic" and stats["images_timed"] > 0
    _finite(stats["images_per_s"], "stats")

    evaluation = suite["evaluation"]
    assert evaluation["epochs"] == 1 and evaluation["images"] == 4
    _finite(evaluation["seconds_per_epoch"], "evaluation")

    allreduce = suite["allreduce"]["result"]
    assert allreduce is not None and allreduce["backend"] == "gloo" and allreduce["ok"], suite["allreduce"]
    # the mean signal's payload is docs/PERFORMANCE.md's 9.13 MB: the taps' channels are those of ResNet-18
    assert allreduce["mean"]["float64_numbers"] == 1_141_425 and round(allreduce["mean"]["megabytes"], 2) == 9.13
    assert allreduce["mean"]["calls_per_iteration"] == 85
    for signal in ("mean", "class"):
        for mode in ("one_buffer_ms", "per_layer_calls_ms"):
            _finite(allreduce[signal][mode], f"allreduce {signal} {mode}")
    for part in ("recovery", "stats", "evaluation", "allreduce"):
        _finite(suite["part_seconds"][part], part)
