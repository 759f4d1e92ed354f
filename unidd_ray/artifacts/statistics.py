"""The statistics artifact: per-layer float64 moments in one Parquet file.

Layout of ``DIR/stats.parquet`` (one row per tapped layer, in forward order):
``layer`` (string), ``channels``, ``num_classes`` and one ``list<double>``
column per :class:`~unidd_ray.spectral.Moments` field (flattened row-major).
The schema metadata (key ``unidd_ray``) holds the format version, the teacher's
sha256, the dataset fingerprint, the layer list, the image count and the
reduction plan (batch and block sizes).  ``DIR/manifest.json`` records the
file's sha256; :func:`load_stats` verifies it before reading.

Statistics imported from the UniDD authors' files (:mod:`unidd_ray.artifacts.authors`) are finished
matrices, not sums: the same file, with metadata ``form: targets``, holds per layer the list<double> columns
``per_batch``, ``second_moment``, ``mean``, ``class_share`` and ``mix_share`` (null where absent), read back as
:class:`~unidd_ray.spectral.Targets`; the metadata records their provenance and which covariances and signals
they serve (the others are refused by name when a recovery asks for them).  Their dataset fingerprint is
empty: they were computed elsewhere, on data this project never prepared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from unidd_ray.artifacts.files import ArtifactError, atomic_file, read_manifest, write_manifest
from unidd_ray.spectral import Moments, Targets

STATS_FILE = "stats.parquet"
FORMAT_VERSION = 1
KIND = "stats"
TARGET_FIELDS = ("per_batch", "second_moment", "mean", "class_share", "mix_share")


def write_stats(out_dir: str | Path, moments: dict[str, Moments], *, teacher_sha256: str,
                dataset_fingerprint: str, extra: dict | None = None) -> Path:
    """Write ``stats.parquet`` atomically, then ``manifest.json`` with its sha256."""
    out_dir = Path(out_dir)
    layers = list(moments)
    columns: dict[str, list] = {"layer": layers, "channels": [], "num_classes": []}
    for f in Moments._FIELDS:
        columns[f] = []
    for name in layers:
        m = moments[name]
        columns["channels"].append(m.channels)
        columns["num_classes"].append(m.num_classes)
        for f in Moments._FIELDS:
            columns[f].append(getattr(m, f).detach().cpu().numpy().astype(np.float64).reshape(-1))
    images = moments[layers[0]].images if layers else 0
    meta = {
        "format_version": FORMAT_VERSION,
        "teacher_sha256": teacher_sha256,
        "dataset_fingerprint": dataset_fingerprint,
        "layers": layers,
        "images": images,
        **(extra or {}),
    }
    fields = [pa.field("layer", pa.string()), pa.field("channels", pa.int32()), pa.field("num_classes", pa.int32())]
    fields += [pa.field(f, pa.list_(pa.float64())) for f in Moments._FIELDS]
    schema = pa.schema(fields, metadata={"unidd_ray": json.dumps(meta)})
    table = pa.table({k: columns[k] for k in schema.names}, schema=schema)
    with atomic_file(out_dir / STATS_FILE) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    write_manifest(out_dir, KIND, files=[STATS_FILE], teacher_sha256=teacher_sha256,
                   dataset_fingerprint=dataset_fingerprint, images=images, layers=layers)
    return out_dir / STATS_FILE


def write_targets(out_dir: str | Path, targets: dict[str, Targets], *, teacher_sha256: str, provenance: dict
                  ) -> Path:
    """Write imported :class:`Targets` as ``stats.parquet`` (``form: targets``) and its ``manifest.json``."""
    out_dir = Path(out_dir)
    layers = list(targets)
    first = targets[layers[0]]
    meta = {"format_version": FORMAT_VERSION, "form": "targets", "teacher_sha256": teacher_sha256,
            "dataset_fingerprint": "", "layers": layers, "images": None, "serves": first.serves(),
            "provenance": provenance}
    fields = [pa.field("layer", pa.string()), pa.field("channels", pa.int32()), pa.field("num_classes", pa.int32())]
    fields += [pa.field(f, pa.list_(pa.float64())) for f in TARGET_FIELDS]
    columns: dict[str, list] = {"layer": layers, "channels": [], "num_classes": [], **{f: [] for f in TARGET_FIELDS}}
    for name in layers:
        t = targets[name]
        columns["channels"].append(t.channels)
        columns["num_classes"].append(t.num_classes)
        for f in TARGET_FIELDS:
            value = t.mean_vector if f == "mean" else getattr(t, f)
            columns[f].append(None if value is None else value.numpy().astype(np.float64).reshape(-1))
    schema = pa.schema(fields, metadata={"unidd_ray": json.dumps(meta)})
    table = pa.table({k: columns[k] for k in schema.names}, schema=schema)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / STATS_FILE) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    write_manifest(out_dir, KIND, files=[STATS_FILE], teacher_sha256=teacher_sha256, dataset_fingerprint="",
                   images=None, layers=layers, form="targets")
    return out_dir / STATS_FILE


def _read_targets(table, directory: Path) -> dict[str, Targets]:
    out = {}
    for row in table.to_pylist():
        c, k = row["channels"], row["num_classes"]
        shapes = {"per_batch": (c, c), "second_moment": (c, c), "mean": (c,), "class_share": (c, k),
                  "mix_share": (c, k)}
        values = {}
        for f, shape in shapes.items():
            raw = row[f]
            if raw is None:
                values[f] = None
                continue
            if len(raw) != int(np.prod(shape)):
                raise ArtifactError(f"layer {row['layer']!r} of {directory / STATS_FILE}: {f} has {len(raw)} values, "
                                    f"expected {shape}; import the statistics again")
            values[f] = torch.from_numpy(np.asarray(raw, dtype=np.float64).reshape(shape))
        try:
            targets = Targets(**values)
            covariance_report(targets)
        except (ValueError, ArtifactError) as exc:
            raise ArtifactError(f"layer {row['layer']!r} of {directory / STATS_FILE}: {exc}; import the statistics "
                                "again") from None
        out[row["layer"]] = targets
    return out


def stats_sha256(directory: str | Path) -> str:
    """The sha256 its manifest records for a statistics artifact's file (the artifact's identity; not
    re-hashed: :func:`load_stats` verifies it when it reads the file)."""
    return read_manifest(directory, KIND, verify=False)["files"][STATS_FILE]


def read_stats_metadata(path: str | Path) -> dict:
    directory = _directory(path)
    schema = pq.read_schema(directory / STATS_FILE)
    raw = (schema.metadata or {}).get(b"unidd_ray")
    if raw is None:
        raise ArtifactError(f"{directory / STATS_FILE} has no unidd_ray metadata: not a statistics artifact")
    return json.loads(raw)


def _directory(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == STATS_FILE else path


def load_stats(path: str | Path, *, teacher_sha256: str | None = None, dataset_fingerprint: str | None = None,
               verify: bool = True) -> dict[str, Moments | Targets]:
    """``{layer_name: Moments}`` from a statistics directory (or its ``stats.parquet``); imported statistics give
    ``{layer_name: Targets}``.

    The file's sha256 is checked against the manifest (a half-written or
    tampered file is refused); when ``teacher_sha256``/``dataset_fingerprint``
    are given, statistics of another teacher or dataset are refused.
    """
    directory = _directory(path)
    if not (directory / STATS_FILE).is_file():
        raise ArtifactError(f"{directory} holds no {STATS_FILE}; run `unidd-ray stats` first")
    read_manifest(directory, KIND, verify=verify)
    meta = read_stats_metadata(directory)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory / STATS_FILE} has format version {meta.get('format_version')}, "
                            f"expected {FORMAT_VERSION}")
    if teacher_sha256 is not None and meta["teacher_sha256"] != teacher_sha256:
        raise ArtifactError(
            f"the statistics in {directory} were computed with teacher {meta['teacher_sha256'][:12]}…, not with "
            f"this teacher ({teacher_sha256[:12]}…); recompute them with `unidd-ray stats --teacher ...`"
        )
    imported = meta.get("form") == "targets"
    # imported statistics were computed on data this project never prepared: they name no fingerprint
    if dataset_fingerprint is not None and not imported and meta["dataset_fingerprint"] != dataset_fingerprint:
        raise ArtifactError(
            f"the statistics in {directory} were computed on dataset {meta['dataset_fingerprint'][:12]}…, not on "
            f"this one ({dataset_fingerprint[:12]}…); recompute them with `unidd-ray stats --data ...`"
        )
    table = pq.read_table(directory / STATS_FILE)
    if imported:
        return _read_targets(table, directory)
    out: dict[str, Moments] = {}
    rows = table.to_pylist()
    for row in rows:
        c, k = row["channels"], row["num_classes"]
        shapes = {"n": (), "sum": (c,), "sumsq": (c, c), "class_n": (k,), "class_sum": (k, c), "image_n": (k,),
                  "pooled_sum": (k, c), "soft_weight": (k,), "soft_sum": (k, c)}
        state = {f: torch.from_numpy(np.asarray(row[f], dtype=np.float64).reshape(shapes[f])) for f in shapes}
        moments = Moments.from_state_dict(state)
        try:
            covariance_report(moments)  # SPEC §1.4: symmetric second moments, PSD covariances
        except ArtifactError as exc:
            raise ArtifactError(f"layer {row['layer']!r} of {directory / STATS_FILE}: {exc}; recompute them with "
                                "`unidd-ray stats`") from None
        out[row["layer"]] = moments
    return out


ASYMMETRY_TOLERANCE = 1e-9  # relative to the largest |Σxxᵀ| entry; float64 sums of symmetric products are exact


TARGETS_TOLERANCE = 1e-6  # imported matrices were accumulated in float32: their rounding, relative to λ_max


def covariance_report(moments: Moments | Targets, betas: list[float] | None = None) -> dict:
    """Symmetry/PSD check and eigenvalue ranges of one layer's covariances (SPEC §1.4).

    ``asymmetry``: the largest |Σxxᵀ − (Σxxᵀ)ᵀ| of the accumulated second moments relative to their
    largest entry (the covariances are symmetrised when formed, so they are checked before that).
    """
    if isinstance(moments, Targets):
        return _targets_report(moments, betas)
    scale = float(moments.sumsq.abs().max()) or 1.0
    asym = float((moments.sumsq - moments.sumsq.T).abs().max()) / scale
    if asym > ASYMMETRY_TOLERANCE:
        raise ArtifactError(f"the accumulated second moments are not symmetric (relative asymmetry {asym:.3e}); "
                            "the statistics are corrupt")
    report = {"channels": moments.channels, "count": moments.count, "asymmetry": asym}
    for mode in ("total", "within_class"):
        cov = moments.covariance(mode)
        eig = torch.linalg.eigvalsh(cov)
        lam_min, lam_max = float(eig[0]), float(eig[-1])
        tol = 1e-9 * max(abs(lam_max), 1e-300)
        if lam_min < -tol:
            raise ArtifactError(f"the {mode} covariance is not positive semi-definite (smallest eigenvalue "
                                f"{lam_min:.3e}); the statistics are corrupt")
        report[mode] = {"trace": float(torch.trace(cov)), "eig_min": lam_min, "eig_max": lam_max}
        if betas:
            report[mode]["condition"] = {f"{b:.6g}": (lam_max + b) / (max(lam_min, 0.0) + b) for b in betas}
    return report


def _targets_report(targets: Targets, betas: list[float] | None) -> dict:
    """The symmetry/PSD check and eigenvalue ranges of imported targets' covariances (float32 tolerances)."""
    report = {"channels": targets.channels, "count": None, "serves": targets.serves()}
    worst = 0.0
    for name in ("per_batch", "second_moment"):
        matrix = getattr(targets, name)
        if matrix is not None:
            worst = max(worst, float((matrix - matrix.T).abs().max()) / (float(matrix.abs().max()) or 1.0))
    if worst > TARGETS_TOLERANCE:
        raise ArtifactError(f"the covariance is not symmetric (relative asymmetry {worst:.3e})")
    report["asymmetry"] = worst
    for mode in targets.serves()["covariance"]:
        eig = torch.linalg.eigvalsh(targets.covariance(mode))
        lam_min, lam_max = float(eig[0]), float(eig[-1])
        if lam_min < -TARGETS_TOLERANCE * max(abs(lam_max), 1e-300):
            raise ArtifactError(f"the {mode} covariance is not positive semi-definite (smallest eigenvalue "
                                f"{lam_min:.3e})")
        report[mode] = {"trace": float(eig.sum()), "eig_min": lam_min, "eig_max": lam_max}
        if betas:
            report[mode]["condition"] = {f"{b:.6g}": (lam_max + b) / (max(lam_min, 0.0) + b) for b in betas}
    return report
