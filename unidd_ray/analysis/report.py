"""``unidd-ray report --run DIR``: figures and numbers for a pipeline run.

Writes ``report.html`` (PNG figures next to it, under ``report/``) and
``report.json`` with every number the figures show:

- the accuracy table of the run;
- the radially averaged power spectral density of each set's images, with the
  share of the full 2-D spectrum's power (corners included) at frequencies above
  half the Nyquist frequency of the shorter side;
- the intra-class cosine similarity of the teacher's penultimate features;
- per-layer eigenvalue spectra of the real and synthetic covariances, and below
  them the CFM filter responses 1/(λ + β_b) of the recipe's schedule on the real
  eigenvalues;
- the per-slot loss parts of every recovery;
- every set's images (rows: classes, by name; columns: IPC slots).

Everything is read from the run's artifacts (:mod:`unidd_ray.artifacts`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import matplotlib
import numpy as np
import torch

from unidd_ray.analysis.metrics import (covariance_spectrum, high_frequency_share, intra_class_cosine, power_sum,
                                        protocol_cell, radial_average, top1_cell)
from unidd_ray.artifacts.distilled import iter_distilled, read_arrays, read_rows, verify
from unidd_ray.artifacts.files import atomic_file, atomic_write_json, atomic_write_text
from unidd_ray.artifacts.statistics import load_stats
from unidd_ray.artifacts.teacher import load_teacher
from unidd_ray.config import load_recipe
from unidd_ray.models import layer_channels, resolve_layers, tapped
from unidd_ray.spectral import Moments, beta_schedule

matplotlib.use("Agg")  # files only, no display: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

FIG_DIR = "report"


def _save_figure(fig, path: Path, *, dpi: int) -> None:
    """Write a figure under a temporary name and rename it: a crash leaves no half-written PNG."""
    with atomic_file(path, suffix=".png") as tmp:  # the extension tells matplotlib the format
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _denormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def _batches(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
             batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``chunks`` of (images, labels) regrouped into consecutive batches of ``batch`` images (the last one
    shorter): the batches, and so every number computed from them, do not depend on how the chunks were cut.
    Each batch is a tensor of its own in the standard (N, C, H, W) memory layout, whatever the chunks' strides:
    the CPU convolution kernels, and the last bits of their results, depend on the layout."""
    images, labels, held = [], [], 0
    for x, y in chunks:
        images.append(x)
        labels.append(y)
        held += len(x)
        if held >= batch:
            x, y = torch.cat(images), torch.cat(labels)
            cut = held - held % batch
            for i in range(0, cut, batch):
                yield x[i:i + batch].clone(memory_format=torch.contiguous_format), y[i:i + batch]
            images, labels, held = [x[cut:]], [y[cut:]], held - cut
    if held:
        yield torch.cat(images).clone(memory_format=torch.contiguous_format), torch.cat(labels)


@torch.no_grad()
def teacher_pass(model: torch.nn.Module, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], layers: list[str],
                 num_classes: int, batch: int = 256) -> tuple[torch.Tensor, dict[str, Moments]]:
    """One pass of the teacher over the (images, labels) ``chunks`` of a set, in batches of ``batch`` images
    whatever the chunks' sizes: the input of its last ``nn.Linear`` (its penultimate features, in the chunks'
    order) and the moments of the tapped ``layers``' inputs.  Beside the chunk being read, it holds at most one
    batch of images."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    moments = {name: Moments(c, num_classes) for name, c in layer_channels(model, layers).items()}
    features, captured = [], {}
    handle = last.register_forward_pre_hook(lambda _m, args: features.append(args[0].flatten(1).detach()))
    try:
        with tapped(model, layers, lambda name, x: captured.__setitem__(name, x)):
            for images, labels in _batches(chunks, batch):
                captured.clear()
                model(images)
                for name in layers:
                    moments[name].update(captured[name], labels)
    finally:
        handle.remove()
    return torch.cat(features), moments


def read_results(run_dir: Path) -> dict:
    """A finished run's ``results.json``; errors name the file and the fix."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a finished `unidd-ray pipeline` run")
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt ({exc}); run the pipeline again to rewrite it") from None
    if not isinstance(results, dict) or not isinstance(results.get("stages"), dict) or "rows" not in results:
        raise ValueError(f"{path} is not a pipeline's results (no stages or rows); run the pipeline again to "
                         "rewrite it")
    return results


def _set_entry(key: str, path: str, teacher, tinfo, layers: list[str], *, chunk: int = 256) -> dict:
    """The numbers of one set: its images' spectrum and diversity, and its covariance spectra per layer.

    One pass over the set, ``chunk`` images read at a time, accumulates the power map, the teacher's moments
    and its penultimate features: the memory it takes beyond a chunk is the features (N × D) and the labels."""
    method, ipc = key.rsplit("-ipc", 1)
    stream = iter_distilled(path, mean=tinfo.mean, std=tinfo.std, chunk=chunk)
    power, channels, labels = None, 0, []

    def chunks():
        nonlocal power, channels
        for images, y, _ in stream:
            part, count = power_sum(_denormalise(images, tinfo.mean, tinfo.std))
            power = part if power is None else power + part
            channels += count
            labels.append(y)
            yield images, y

    features, syn = teacher_pass(teacher, chunks(), layers, tinfo.num_classes)
    labels = torch.cat(labels)
    power = power / channels
    radii, psd = radial_average(power)
    sim, per_class = intra_class_cosine(features, labels)
    entry = {"method": method, "ipc": int(ipc), "path": str(path), "images": len(labels),
             "psd": psd.tolist(), "radii": radii.tolist(), "high_frequency_fraction": high_frequency_share(power),
             "intra_class_cosine": sim, "intra_class_cosine_per_class": per_class,
             "eigenvalues": {name: covariance_spectrum(m.covariance()).tolist() for name, m in syn.items()}}
    summary_file = Path(path) / "summary.json"
    if summary_file.is_file():
        entry["per_slot"] = json.loads(summary_file.read_text()).get("per_slot")
    return entry


def analyse_run(run_dir: str | Path) -> dict:
    """Every number of the report (no plotting)."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    stages = results["stages"]
    recipe = load_recipe(config=run_dir / "config.yaml")
    teacher, tinfo = load_teacher(stages["teacher"])
    layers = resolve_layers(teacher, None)
    recover = recipe.recover_for(max(recipe.ipcs))
    betas = beta_schedule(recover.schedule, recover.beta_max, recover.ipc, beta_min=recover.beta_min)
    report = {"run": run_dir.name, "recipe": results.get("recipe"), "dataset": results.get("dataset"),
              "path": str(run_dir), "accuracy": results["rows"], "methods": {}, "real": {},
              "filter": {"schedule": recover.schedule, "beta_max": recover.beta_max, "betas": betas},
              "layers": layers}
    for key, path in stages.items():
        if key not in ("data", "teacher", "stats") and not key.startswith("eval-"):
            report["methods"][key] = _set_entry(key, path, teacher, tinfo, layers)
    if "stats" in stages:
        real = load_stats(stages["stats"])
        # the covariance the recoveries matched (imported statistics may serve per_batch only)
        report["real"]["covariance"] = recover.covariance
        report["real"]["eigenvalues"] = {name: covariance_spectrum(real[name].covariance(recover.covariance)).tolist()
                                         for name in layers if name in real}
    random_keys = [k for k in report["methods"] if k.startswith("random-ipc")]
    if random_keys:
        report["real"]["psd_from"] = random_keys[0]
    return report


# ----------------------------------------------------------------------------- figures
GRID_CLASSES = 20  # the most classes (rows) and IPC slots (columns) a grid draws: evenly spaced beyond that, so
GRID_SLOTS = 10  # an ImageNet set (1,000 classes × 50 slots) is a readable picture, not 50,000 subplots


def spread(items: list, most: int) -> list:
    """``items`` when there are at most ``most``, else ``most`` of them evenly spaced (the first and last kept)."""
    if len(items) <= most:
        return list(items)
    return [items[round(i * (len(items) - 1) / (most - 1))] for i in range(most)] if most > 1 else [items[0]]


def _grid(key: str, entry: dict, out: Path) -> str:
    """One set's images: a row per class, labelled with its name; a column per IPC slot (at most
    :data:`GRID_CLASSES` rows and :data:`GRID_SLOTS` columns, evenly spaced, the title says how many).

    The set's checksums are verified first; then only the images drawn are read."""
    directory = Path(entry["path"])
    verify(directory)
    rows = read_rows(directory)
    present = sorted({r["class"] for r in rows})
    classes = spread(present, GRID_CLASSES)
    names = {r["class"]: r.get("class_name") or str(r["class"]) for r in rows}
    ipc = entry["ipc"]
    shown = spread(list(range(ipc)), GRID_SLOTS)
    cells = {(k, b) for k in classes for b in shown}
    drawn = [r for r in rows if (r["class"], r["slot"]) in cells]
    pixels = {(r["class"], r["slot"]): a for r, a in zip(drawn, read_arrays(directory, drawn))}
    fig, axes = plt.subplots(len(classes), len(shown), figsize=(0.7 * len(shown) + 1.6, 0.7 * len(classes) + 0.6),
                             squeeze=False)
    for a, k in enumerate(classes):
        for col, b in enumerate(shown):
            ax = axes[a][col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if (k, b) in pixels:
                img = pixels[(k, b)].astype(np.float32) / 255
                ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                          vmin=0, vmax=1)
        axes[a][0].set_ylabel(names[k], rotation=0, ha="right", va="center", fontsize=8)
    for col, b in enumerate(shown):
        axes[0][col].set_title(f"slot {b}", fontsize=7)
    subset = [f"{len(classes)} of {len(present)} classes"] * (len(classes) < len(present)) + \
        [f"{len(shown)} of {ipc} slots"] * (len(shown) < ipc)
    fig.suptitle(f"{entry['method']}, IPC {ipc}" + (f" ({', '.join(subset)}, evenly spaced)" if subset else ""))
    name = f"grid_{key}.png"
    _save_figure(fig, out / name, dpi=80)
    return f"{FIG_DIR}/{name}"


def _psd(report: dict, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, entry in report["methods"].items():
        ax.semilogy(entry["radii"][1:], entry["psd"][1:], label=f"{key} (HF {entry['high_frequency_fraction']:.3f})")
    ax.set_xlabel("spatial frequency (cycles / image)")
    ax.set_ylabel("power")
    ax.set_title("radially averaged power spectral density")
    ax.legend(fontsize=7)
    _save_figure(fig, out / "psd.png", dpi=90)
    return f"{FIG_DIR}/psd.png"


def _similarity(report: dict, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 3))
    keys = [k for k, e in report["methods"].items() if e["intra_class_cosine"] is not None]  # IPC 1: no pairs
    ax.bar(range(len(keys)), [report["methods"][k]["intra_class_cosine"] for k in keys])
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("intra-class cosine similarity")
    _save_figure(fig, out / "similarity.png", dpi=90)
    return f"{FIG_DIR}/similarity.png"


def _shown_layers(report: dict) -> list[str]:
    """Up to three tapped layers with more than one channel (a one-channel layer has one eigenvalue)."""
    wide = [name for name in report["layers"]
            if len(next(iter(report["methods"].values()), {}).get("eigenvalues", {}).get(name, [0, 0])) > 1]
    return sorted({wide[0], wide[len(wide) // 2], wide[-1]}, key=wide.index) if wide else []


def _spectra(report: dict, out: Path) -> str:
    """Per layer: the eigenvalue spectra (top) and the filter responses on the real eigenvalues (bottom)."""
    shown = _shown_layers(report)
    fig, axes = plt.subplots(2, max(1, len(shown)), figsize=(5 * max(1, len(shown)), 7), squeeze=False,
                             sharex="col")
    betas = report["filter"]["betas"]
    for column, layer in enumerate(shown):
        top, bottom = axes[0][column], axes[1][column]
        real = report["real"].get("eigenvalues", {}).get(layer)
        if real:
            top.semilogy(range(1, len(real) + 1), [max(v, 1e-12) for v in real], "k-", lw=2,
                         label=f"real ({report['real'].get('covariance', 'total')})")
        for key, entry in report["methods"].items():
            ev = entry["eigenvalues"][layer]
            top.semilogy(range(1, len(ev) + 1), [max(v, 1e-12) for v in ev], lw=1, label=key)
        top.set_title(f"{layer}: covariance eigenvalues")
        top.legend(fontsize=6)
        if real:
            lam = torch.tensor(real).clamp(min=0)
            for b in sorted({0, len(betas) // 2, len(betas) - 1}):
                bottom.semilogy(range(1, len(real) + 1), (1 / (lam + betas[b])).tolist(), lw=1,
                                label=f"slot {b}: β = {betas[b]:.3g}")
            bottom.legend(fontsize=6)
        bottom.set_title("CFM filter response 1/(λ + β) on the real eigenvalues", fontsize=9)
        bottom.set_xlabel("eigenvalue index")
    _save_figure(fig, out / "spectra.png", dpi=90)
    return f"{FIG_DIR}/spectra.png"


def _losses(report: dict, out: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, entry in report["methods"].items():
        per_slot = entry.get("per_slot") or {}
        slots = sorted(per_slot, key=int)
        for part in ("loss_filter", "loss_signal", "loss_bn", "loss_ce"):
            values = [per_slot[s].get(part) for s in slots]
            if slots and all(v is not None for v in values) and any(v > 0 for v in values):  # log axis
                ax.plot([int(s) for s in slots], values, marker=".", label=f"{key} {part[5:]}")
    ax.set_xlabel("IPC slot")
    ax.set_ylabel("final loss part")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    else:  # a run without recovered sets (random subsets only)
        ax.text(0.5, 0.5, "no recovery losses in this run", ha="center", va="center", transform=ax.transAxes)
    _save_figure(fig, out / "losses.png", dpi=90)
    return f"{FIG_DIR}/losses.png"


def _figures(report: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    figs = {f"grid:{key}": _grid(key, entry, out) for key, entry in report["methods"].items()}
    figs.update(psd=_psd(report, out), similarity=_similarity(report, out), spectra=_spectra(report, out),
                losses=_losses(report, out))
    return figs


# ----------------------------------------------------------------------------- the page
def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _html(report: dict, figs: dict[str, str]) -> str:
    esc = html.escape

    rows = "".join(
        f"<tr><td>{esc(str(r['method']))}</td><td>{r['ipc'] if r['ipc'] is not None else '–'}</td>"
        f"<td>{esc(str(r.get('labels', '–')))}</td><td>{esc(str(r.get('student') or '–'))}</td>"
        f"<td>{esc(protocol_cell(r))}</td><td>{esc(top1_cell(r))}</td><td>{r.get('seeds') or '–'}</td></tr>"
        for r in report["accuracy"])
    stats = "".join(
        f"<tr><td>{esc(k)}</td><td>{e['high_frequency_fraction']:.4f}</td><td>{_fmt(e['intra_class_cosine'])}</td></tr>"
        for k, e in report["methods"].items())
    grids = "".join(f"<img src='{esc(v)}' alt='{esc(k)}'>" for k, v in figs.items() if k.startswith("grid:"))
    title = report["run"]
    about = f"recipe {report.get('recipe') or '?'} on {report.get('dataset') or '?'} · {report['path']}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}} td,th{{padding:2px 8px;text-align:left}}
img{{max-width:100%;display:block;margin:0.5em 0}} .grids img{{display:inline-block;vertical-align:top;margin-right:1em}}
</style></head><body><h1>{esc(title)}</h1><p>{esc(about)}</p>
<h2>Accuracy</h2><table><tr><th>method</th><th>IPC</th><th>labels</th><th>student</th><th>protocol</th><th>top-1 (%)</th><th>seeds</th></tr>{rows}
</table>
<h2>Frequency content and diversity</h2>
<table><tr><th>set</th><th>power above ½ Nyquist</th><th>intra-class cosine</th></tr>{stats}</table>
<img src='{esc(figs['psd'])}' alt='power spectral density'><img src='{esc(figs['similarity'])}' alt='similarity'>
<h2>Covariance spectra and filter responses</h2><img src='{esc(figs['spectra'])}' alt='spectra'>
<h2>Loss parts per slot</h2><img src='{esc(figs['losses'])}' alt='losses'>
<h2>Images</h2><div class='grids'>{grids}</div>
</body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    report = analyse_run(run_dir)
    figs = _figures(report, run_dir / FIG_DIR)
    report["figures"] = figs
    atomic_write_json(run_dir / "report.json", report)
    path = run_dir / "report.html"
    atomic_write_text(path, _html(report, figs))
    return path
