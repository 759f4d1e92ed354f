"""β schedules of Curriculum Frequency Matching over the IPC slots b = 0 … IPC−1.

β is scheduled over the *slot* of the synthetic image, not over iterations:
early slots use a large β (low-pass, consistency), late slots a small β
(high-pass, diversity).

- ``cosine``   β_b = β_max · (1 + cos(π b / IPC)) / 2   (default)
- ``linear``   β_b = β_max · (1 − b / IPC)
- ``constant`` β_b = β_max
- ``geometric`` log-spaced from β_max (b = 0) down to β_min (b = IPC − 1);
  β_min defaults to β_max / 100.

``beta_min`` also floors ``cosine`` and ``linear``: with it set, they run from
β_max down towards β_min instead of towards 0, i.e. β_b = β_min + (β_max − β_min) ·
shape(b).  Left unset (the default) both are exactly the formulas above.  At
large IPC the unfloored cosine's last slots get β ≈ β_max · π² / (4 IPC²)
(3e-5 at IPC 50, β_max 0.03), where (Ψ + βI)⁻¹ ~ 1/β swamps the CE term; see
docs/notes/2026-12-06-fashion-mnist-investigations.md for what that costs and what the floor recovers.
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
    if kind in ("cosine", "linear"):
        floor = 0.0 if beta_min is None else float(beta_min)
        if not (0 <= floor < beta_max):
            raise ValueError(f"{kind} schedule needs 0 <= beta_min < beta_max, got beta_min={floor}, "
                             f"beta_max={beta_max}; leave beta_min unset for the unfloored schedule")
        if beta_min is None:  # exactly the formulas in the module docstring
            if kind == "cosine":
                return [beta_max * (1 + math.cos(math.pi * b / ipc)) / 2 for b in range(ipc)]
            return [beta_max * (1 - b / ipc) for b in range(ipc)]
        if kind == "cosine":
            shape = [(1 + math.cos(math.pi * b / ipc)) / 2 for b in range(ipc)]
        else:
            shape = [1 - b / ipc for b in range(ipc)]
        return [floor + (beta_max - floor) * w for w in shape]
    if kind == "constant":
        if beta_min is not None:
            raise ValueError(f"the constant schedule has no floor, but beta_min={beta_min} was given; leave "
                             "beta_min unset, or choose a cosine, linear or geometric schedule")
        return [beta_max] * ipc
    low = beta_max / 100 if beta_min is None else float(beta_min)
    if not (0 < low <= beta_max):
        raise ValueError(f"geometric schedule needs 0 < beta_min <= beta_max, got beta_min={low}, beta_max={beta_max}")
    if ipc == 1:
        return [beta_max]
    ratio = math.log(low / beta_max)
    return [beta_max * math.exp(ratio * b / (ipc - 1)) for b in range(ipc)]
