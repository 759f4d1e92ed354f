"""β schedules of Curriculum Frequency Matching over the IPC slots b = 0 … IPC−1.

β is scheduled over the *slot* of the synthetic image, not over iterations:
early slots use a large β (low-pass, consistency), late slots a small β
(high-pass, diversity).

- ``cosine``   β_b = β_max · (1 + cos(π b / IPC)) / 2   (default)
- ``linear``   β_b = β_max · (1 − b / IPC)
- ``constant`` β_b = β_max
- ``geometric`` log-spaced from β_max (b = 0) down to β_min (b = IPC − 1);
  β_min defaults to β_max / 100.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "geometric")


def beta_schedule(kind: str, beta_max: float, ipc: int, *, beta_min: float | None = None) -> list[float]:
    """The β of every IPC slot as a list of ``ipc`` positive floats."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; choose one of {list(SCHEDULES)}")
    beta_max = float(beta_max)
    if not (beta_max > 0 and math.isfinite(beta_max)):
        raise ValueError(f"beta_max must be a positive finite number, got {beta_max}")
    if int(ipc) != ipc or ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    ipc = int(ipc)
    if kind == "cosine":
        return [beta_max * (1 + math.cos(math.pi * b / ipc)) / 2 for b in range(ipc)]
    if kind == "linear":
        return [beta_max * (1 - b / ipc) for b in range(ipc)]
    if kind == "constant":
        return [beta_max] * ipc
    low = beta_max / 100 if beta_min is None else float(beta_min)
    if not (0 < low <= beta_max):
        raise ValueError(f"geometric schedule needs 0 < beta_min <= beta_max, got beta_min={low}, beta_max={beta_max}")
    if ipc == 1:
        return [beta_max]
    ratio = math.log(low / beta_max)
    return [beta_max * math.exp(ratio * b / (ipc - 1)) for b in range(ipc)]
