"""``unidd-ray report --run DIR``: figures and numbers for a pipeline run.

Writes ``report.html`` (PNG figures next to it, under ``report/``) and
``report.json`` with every number the figures show:

- image grids per method (rows: classes, columns: IPC slots);
- the radially averaged power spectral density of each method's images and of
  real images, with the share of the full 2-D spectrum's power (corners included)
  at frequencies above half the Nyquist frequency of the shorter side;
- the intra-class cosine similarity of the teacher's penultimate features;
- per-layer eigenvalue spectra of the real and synthetic covariances, with the
  CFM filter responses 1/(λ + β_b) of the recipe's schedule;
- the accuracy table and the per-slot loss parts of every recovery.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from unidd_ray.analysis.metrics import covariance_spectrum, high_frequency_fraction, intra_class_cosine, \
    radial_power_spectrum
from unidd_ray.artifacts import atomic_file, atomic_write_json, atomic_write_text

FIG_DIR = "report"


def _save_figure(fig, path: Path, *, dpi: int) -> None:
    """Write a figure under a temporary name and rename it: a crash leaves no half-written PNG."""
    with atomic_file(path, suffix=".png") as tmp:  # the extension tells matplotlib the format
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")


def _denormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The input of the model's last ``nn.Linear`` (its penultimate features)."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    out = []
    handle = last.register_forward_pre_hook(lambda _m, args: out.append(args[0].flatten(1).detach()))
    try:
        for i in range(0, len(images), batch):
            model(images[i:i + batch])
    finally:
        handle.remove()
    return torch.cat(out)


@torch.no_grad()
def synthetic_moments(model, images, labels, layers, num_classes):
    from unidd_ray.models import layer_channels, tapped
    from unidd_ray.spectral import Moments

    channels = layer_channels(model, layers)
    moments = {name: Moments(c, num_classes) for name, c in channels.items()}
    captured = {}
    with tapped(model, layers, lambda name, x: captured.__setitem__(name, x)):
        for i in range(0, len(images), 256):
            captured.clear()
            model(images[i:i + 256])
            for name in layers:
                moments[name].update(captured[name], labels[i:i + 256])
    return moments


def read_results(run_dir: Path) -> dict:
    """A finished run's ``results.json``; errors name the file and the fix."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: `report --run` needs a finished `unidd-ray pipeline` run")
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt ({exc}); run the pipeline again to rewrite it") from None
    if not isinstance(results, dict) or not isinstance(results.get("stages"), dict) or "rows" not in results:
        raise ValueError(f"{path} is not a pipeline's results (no stages or rows); run the pipeline again to "
                         "rewrite it")
    return results


def analyse_run(run_dir: str | Path) -> dict:
    """Every number of the report (no plotting)."""
    from unidd_ray.config import load_recipe
    from unidd_ray.models import resolve_layers
    from unidd_ray.spectral import beta_schedule
    from unidd_ray.stages.evaluate import load_distilled
    from unidd_ray.stats_io import load_stats
    from unidd_ray.teacher import load_teacher

    run_dir = Path(run_dir)
    results = read_results(run_dir)
    stages = results["stages"]
    recipe = load_recipe(config=run_dir / "config.yaml")
    teacher, tinfo = load_teacher(stages["teacher"])
    layers = resolve_layers(teacher, None)
    real_moments = load_stats(stages["stats"]) if "stats" in stages else None
    recover = recipe.recover_for(max(recipe.ipcs))
    betas = beta_schedule(recover.schedule, recover.beta_max, recover.ipc, beta_min=recover.beta_min)
    report = {"run": str(run_dir), "accuracy": results["rows"], "methods": {}, "real": {},
              "filter": {"schedule": recover.schedule, "beta_max": recover.beta_max, "betas": betas},
              "layers": layers}
    for key, path in stages.items():
        if key in ("data", "teacher", "stats") or key.startswith("eval-"):
            continue
        method, ipc = key.rsplit("-ipc", 1)
        images, labels, rows = load_distilled(path, mean=tinfo.mean, std=tinfo.std)
        pixels = _denormalise(images, tinfo.mean, tinfo.std)
        radii, psd = radial_power_spectrum(pixels)
        feats = penultimate_features(teacher, images)
        sim, per_class = intra_class_cosine(feats, labels)
        entry = {"method": method, "ipc": int(ipc), "path": str(path), "images": len(images),
                 "psd": psd.tolist(), "radii": radii.tolist(),
                 "high_frequency_fraction": high_frequency_fraction(pixels),
                 "intra_class_cosine": sim, "intra_class_cosine_per_class": per_class}
        syn = synthetic_moments(teacher, images, labels, layers, tinfo.num_classes)
        entry["eigenvalues"] = {name: covariance_spectrum(m.covariance()).tolist() for name, m in syn.items()}
        summary_file = Path(path) / "summary.json"
        if summary_file.is_file():
            entry["per_slot"] = json.loads(summary_file.read_text()).get("per_slot")
        report["methods"][key] = entry
    if real_moments is not None:
        report["real"]["eigenvalues"] = {name: covariance_spectrum(real_moments[name].covariance()).tolist()
                                         for name in layers if name in real_moments}
    random_keys = [k for k in report["methods"] if k.startswith("random-ipc")]
    if random_keys:
        report["real"]["psd_from"] = random_keys[0]
    return report


def _figures(report: dict, out: Path, run_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unidd_ray.stages.evaluate import load_distilled
    from unidd_ray.teacher import read_teacher_info

    out.mkdir(parents=True, exist_ok=True)
    figs = {}
    tinfo = read_teacher_info(read_results(run_dir)["stages"]["teacher"])
    for key, entry in report["methods"].items():
        images, labels, rows = load_distilled(entry["path"], mean=tinfo.mean, std=tinfo.std)
        pixels = _denormalise(images, tinfo.mean, tinfo.std)
        classes = sorted(set(labels.tolist()))
        ipc = entry["ipc"]
        fig, axes = plt.subplots(len(classes), ipc, figsize=(0.6 * ipc + 1, 0.6 * len(classes) + 0.5),
                                 squeeze=False)
        slots = {(r["class"], r["slot"]): i for i, r in enumerate(rows)}
        for a, k in enumerate(classes):
            for b in range(ipc):
                ax = axes[a][b]
                ax.axis("off")
                if (k, b) in slots:
                    img = pixels[slots[(k, b)]].permute(1, 2, 0).numpy()
                    ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                              vmin=0, vmax=1)
        fig.suptitle(f"{key}: classes × slots")
        name = f"grid_{key}.png"
        _save_figure(fig, out / name, dpi=80)
        plt.close(fig)
        figs[f"grid:{key}"] = f"{FIG_DIR}/{name}"

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, entry in report["methods"].items():
        ax.semilogy(entry["radii"][1:], entry["psd"][1:], label=f"{key} (HF {entry['high_frequency_fraction']:.3f})")
    ax.set_xlabel("spatial frequency (cycles / image)")
    ax.set_ylabel("power")
    ax.set_title("radially averaged power spectral density")
    ax.legend(fontsize=7)
    _save_figure(fig, out / "psd.png", dpi=90)
    plt.close(fig)
    figs["psd"] = f"{FIG_DIR}/psd.png"

    fig, ax = plt.subplots(figsize=(6, 3))
    keys = [k for k, e in report["methods"].items() if e["intra_class_cosine"] is not None]  # IPC 1: no pairs
    ax.bar(range(len(keys)), [report["methods"][k]["intra_class_cosine"] for k in keys])
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("intra-class cosine similarity")
    _save_figure(fig, out / "similarity.png", dpi=90)
    plt.close(fig)
    figs["similarity"] = f"{FIG_DIR}/similarity.png"

    layers = report["layers"]
    shown = sorted({layers[0], layers[len(layers) // 2], layers[-1]}, key=layers.index)
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    betas = report["filter"]["betas"]
    for ax, layer in zip(axes[0], shown):
        real = report["real"].get("eigenvalues", {}).get(layer)
        if real:
            ax.semilogy(range(1, len(real) + 1), [max(v, 1e-12) for v in real], "k-", lw=2, label="real")
        for key, entry in report["methods"].items():
            ev = entry["eigenvalues"][layer]
            ax.semilogy(range(1, len(ev) + 1), [max(v, 1e-12) for v in ev], lw=1, label=key)
        ax.set_title(layer)
        ax.set_xlabel("eigenvalue index")
        twin = ax.twinx()
        if real:
            lam = torch.tensor(real).clamp(min=0)
            for b in sorted({0, len(betas) // 2, len(betas) - 1}):
                twin.plot(range(1, len(real) + 1), (1 / (lam + betas[b])).tolist(), "--", lw=0.8,
                          label=f"1/(λ+β_{b}), β={betas[b]:.3g}")
            twin.set_yscale("log")
            twin.set_ylabel("filter response")
            twin.legend(fontsize=6, loc="lower right")
        ax.legend(fontsize=6, loc="upper right")
    _save_figure(fig, out / "spectra.png", dpi=90)
    plt.close(fig)
    figs["spectra"] = f"{FIG_DIR}/spectra.png"

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, entry in report["methods"].items():
        per_slot = entry.get("per_slot") or {}
        if not per_slot:
            continue
        slots = sorted(per_slot, key=int)
        for part in ("loss_filter", "loss_signal", "loss_bn", "loss_ce"):
            values = [per_slot[s].get(part) for s in slots]
            if all(v is not None for v in values):
                ax.plot([int(s) for s in slots], values, marker=".", label=f"{key} {part[5:]}")
    ax.set_xlabel("IPC slot")
    ax.set_ylabel("final loss part")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    else:  # a run without recovered sets (random subsets only)
        ax.text(0.5, 0.5, "no recovery losses in this run", ha="center", va="center", transform=ax.transAxes)
    _save_figure(fig, out / "losses.png", dpi=90)
    plt.close(fig)
    figs["losses"] = f"{FIG_DIR}/losses.png"
    return figs


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _html(report: dict, figs: dict[str, str]) -> str:
    esc = html.escape
    def accuracy(r: dict) -> str:
        text = f"{r['top1_mean']:.2f}"
        return text if r.get("top1_std") is None else f"{text} ± {r['top1_std']:.2f}"

    rows = "".join(
        f"<tr><td>{esc(str(r['method']))}</td><td>{r['ipc'] if r['ipc'] is not None else '–'}</td>"
        f"<td>{esc(str(r.get('labels', '–')))}</td><td>{accuracy(r)}</td></tr>" for r in report["accuracy"])
    stats = "".join(
        f"<tr><td>{esc(k)}</td><td>{e['high_frequency_fraction']:.4f}</td><td>{_fmt(e['intra_class_cosine'])}</td></tr>"
        for k, e in report["methods"].items())
    grids = "".join(f"<h3>{esc(k.split(':', 1)[1])}</h3><img src='{esc(v)}'>" for k, v in figs.items()
                    if k.startswith("grid:"))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>unidd_ray report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{padding:2px 8px}} img{{max-width:100%}}</style>
</head><body><h1>Distillation report: {esc(report['run'])}</h1>
<h2>Accuracy</h2><table><tr><th>method</th><th>IPC</th><th>labels</th><th>top-1 (%)</th></tr>{rows}</table>
<h2>Frequency content and diversity</h2>
<table><tr><th>set</th><th>power above ½ Nyquist</th><th>intra-class cosine</th></tr>{stats}</table>
<img src='{esc(figs['psd'])}'><img src='{esc(figs['similarity'])}'>
<h2>Covariance spectra and filter responses</h2><img src='{esc(figs['spectra'])}'>
<h2>Loss parts per slot</h2><img src='{esc(figs['losses'])}'>
<h2>Images</h2>{grids}
</body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    report = analyse_run(run_dir)
    figs = _figures(report, run_dir / FIG_DIR, run_dir)
    report["figures"] = figs
    atomic_write_json(run_dir / "report.json", report)
    path = run_dir / "report.html"
    atomic_write_text(path, _html(report, figs))
    return path
