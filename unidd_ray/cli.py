"""The ``unidd-ray`` command: prepare | squeeze | stats | recover | evaluate | relabel | pipeline | tune | report.

Every stage command takes ``--recipe NAME`` (built-in) or ``--config FILE``
plus repeatable ``--set section.key=value`` overrides; explicit flags such as
``--ipc`` are shorthands for the matching ``--set``.  Ray is the embedded local
instance unless ``--address`` or ``RAY_ADDRESS`` names a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from unidd_ray.config import ConfigError, Recipe, available_recipes, load_recipe, recipe_to_yaml


def _recipe(args, extra: list[str] | None = None) -> Recipe:
    overrides = list(args.set or []) + list(extra or [])
    return load_recipe(args.recipe, config=args.config, overrides=overrides)  # refuses --recipe with --config


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help=f"built-in recipe ({', '.join(available_recipes())}); "
                                                  "default fashion-mnist")
    p.add_argument("--config", default=None, help="a recipe YAML file instead of a built-in recipe")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key, e.g. recover.ipc=50")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def _storage(args, recipe: Recipe, out: Path) -> Path:
    from unidd_ray.artifacts import stage_storage

    return stage_storage(out, getattr(args, "storage_path", None) or recipe.storage_path)


def _ray(args, recipe: Recipe) -> None:
    from unidd_ray.ray_utils import init_ray

    init_ray(args.address or recipe.ray_address)


def _table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table for summaries at the end of a command."""
    cells = [[("" if r.get(c) is None else (f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r[c])))
              for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


# ----------------------------------------------------------------------------- commands
def cmd_prepare(args) -> int:
    from unidd_ray.data.prepare import prepare_dataset
    from unidd_ray.data.sources import load_source

    options = {}
    for kv in args.option or []:
        if "=" not in kv:
            raise ConfigError(f"--option {kv!r}: write it as KEY=VALUE, e.g. --option val_fraction=0.1")
        key, value = kv.split("=", 1)
        options[key] = value
    source = load_source(args.dataset, args.root, **options)
    info = prepare_dataset(source, args.out, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                           num_workers=args.workers)
    rows = [{"split": s, "images": info.splits[s]["count"]} for s in ("train", "val")]
    print(_table(rows, ["split", "images"]))
    print(f"{info.name}: {info.num_classes} classes, {info.resolution} px, {info.channels} channel(s) -> {args.out}")
    return 0


def cmd_squeeze(args) -> int:
    from unidd_ray.stages.squeeze import squeeze

    recipe = _recipe(args)
    out = Path(args.out)
    _ray(args, recipe)
    squeeze(args.data, out, squeeze_cfg=recipe.squeeze, model_cfg=recipe.teacher, data_cfg=recipe.data,
            storage_path=_storage(args, recipe, out), resume=args.resume, recipe_yaml=recipe_to_yaml(recipe))
    info = json.loads((out / "teacher.json").read_text())
    print(_table([{"arch": info["arch"], "dataset": info["dataset"], "val_top1": info["val_top1"],
                   "sha256": info["sha256"][:12]}], ["arch", "dataset", "val_top1", "sha256"]))
    return 0


def cmd_stats(args) -> int:
    from unidd_ray.stats_io import covariance_report, load_stats

    extra = []
    if args.actors is not None:
        extra.append(f"stats.actors={args.actors}")
    if args.batch_size is not None:
        extra.append(f"stats.batch_size={args.batch_size}")
    recipe = _recipe(args, extra)
    if args.inspect:
        from unidd_ray.spectral import beta_schedule

        r = recipe.recover_for(recipe.recover.ipc)
        betas = beta_schedule(r.schedule, r.beta_max, r.ipc, beta_min=r.beta_min)
        stats = load_stats(args.inspect)
        rows = []
        for name, m in stats.items():
            rep = covariance_report(m, [betas[0], betas[-1]])
            t, w = rep["total"], rep["within_class"]
            rows.append({"layer": name, "C": m.channels, "count": m.count, "trace": t["trace"],
                         "eig_min": t["eig_min"], "eig_max": t["eig_max"], "wc_eig_min": w["eig_min"],
                         "wc_eig_max": w["eig_max"], f"cond(b={betas[0]:.3g})": t["condition"][f"{betas[0]:.6g}"],
                         f"cond(b={betas[-1]:.3g})": t["condition"][f"{betas[-1]:.6g}"]})
        print(_table(rows, list(rows[0])))
        return 0
    if not (args.data and args.teacher and args.out):
        raise ConfigError("stats needs --data, --teacher and --out (or --inspect DIR)")
    from unidd_ray.stages.stats import run_stats

    _ray(args, recipe)
    out = run_stats(args.data, args.teacher, args.out, recipe.stats, num_workers=recipe.data.num_workers,
                    recipe_yaml=recipe_to_yaml(recipe))
    summary = json.loads((Path(out) / "summary.json").read_text())
    print(_table([{"layer": k, "C": v["channels"], "trace": v["total"]["trace"], "eig_min": v["total"]["eig_min"],
                   "eig_max": v["total"]["eig_max"]} for k, v in summary["layers"].items()],
                 ["layer", "C", "trace", "eig_min", "eig_max"]))
    print(f"{summary['images']} images in {summary['seconds']:.1f}s ({summary['images_per_s']:.0f} img/s) "
          f"with {summary['actors']} actors -> {out}")
    return 0


def cmd_recover(args) -> int:
    from unidd_ray.stages.recover import run_recover

    extra = [f"recover.{k}={v}" for k, v in (("ipc", args.ipc), ("method", args.method), ("workers", args.workers))
             if v is not None]
    recipe = _recipe(args, extra)
    cfg = recipe.recover_for(recipe.recover.ipc)  # with the recipe's recover_by_ipc entry for this IPC
    out = Path(args.out)
    _ray(args, recipe)
    run_recover(args.data, args.teacher, args.stats, out, cfg, storage_path=_storage(args, recipe, out),
                resume=args.resume, num_workers=recipe.data.num_workers,
                recipe_yaml=recipe_to_yaml(dataclasses.replace(recipe, recover=cfg)))
    summary = json.loads((out / "summary.json").read_text())
    rows = [{"slot": b, **v} for b, v in summary["per_slot"].items()]
    print(_table(rows, list(rows[0])))
    print(f"{summary['images']} images ({summary['method']}, IPC {summary['ipc']}) in {summary['seconds']:.1f}s "
          f"-> {out}")
    return 0


def evaluate_recipe(args) -> Recipe:
    """The recipe of ``evaluate``: the flags on top of the recipe and its ``--set``.  The recipe's
    ``student_options`` are its own student's, so a ``--student`` other than the recipe's starts from that
    model's defaults, with only the options that ``--set evaluate.student_options...`` gives."""
    extra = [f"evaluate.{k}={v}" for k, v in (("student", args.student), ("seeds", args.seeds)) if v is not None]
    if args.hard_labels:
        extra.append("evaluate.hard_labels=true")
    if args.student is not None and args.student != _recipe(args).evaluate.student:
        return load_recipe(args.recipe, config=args.config,
                           overrides=["evaluate.student_options={}", *(args.set or []), *extra])
    return _recipe(args, extra)


def cmd_evaluate(args) -> int:
    from unidd_ray.stages.evaluate import check_student, run_evaluate, validate_evaluate
    from unidd_ray.teacher import read_teacher_info

    recipe = evaluate_recipe(args)
    out = Path(args.out or Path(args.distilled) / "eval")
    # the settings and the student, before Ray starts (the distilled set's own checks follow before any worker)
    validate_evaluate(recipe.evaluate)
    check_student(recipe.evaluate, read_teacher_info(args.teacher))
    _ray(args, recipe)
    summary = run_evaluate(args.distilled, args.teacher, args.data, out, recipe.evaluate,
                           storage_path=_storage(args, recipe, out), soft_labels=args.soft_labels,
                           num_workers=recipe.data.num_workers, recipe_yaml=recipe_to_yaml(recipe))
    print(_table([{"method": summary["method"], "ipc": summary["ipc"], "student": summary["student"],
                   "labels": summary["labels"], "top1_mean": summary["top1_mean"], "top1_std": summary["top1_std"],
                   "seeds": len(summary["seeds"])}],
                 ["method", "ipc", "student", "labels", "top1_mean", "top1_std", "seeds"]))
    return 0


def cmd_relabel(args) -> int:
    from unidd_ray.stages.relabel import relabel

    recipe = _recipe(args)
    out = relabel(args.distilled, args.teacher, args.out, recipe.evaluate, recipe_yaml=recipe_to_yaml(recipe))
    print(f"soft labels for {recipe.evaluate.epochs} epochs -> {out}")
    return 0


def cmd_pipeline(args) -> int:
    from unidd_ray.pipeline import run_pipeline

    recipe = _recipe(args)
    _ray(args, recipe)
    run_pipeline(recipe)
    return 0


def cmd_tune(args) -> int:
    from unidd_ray.tune import run_tune

    recipe = _recipe(args)
    _ray(args, recipe)
    run_tune(recipe, args.space, samples=args.samples, concurrent=args.concurrent, resume=args.resume,
             out=args.out)
    return 0


def cmd_report(args) -> int:
    from unidd_ray.analysis.report import write_report

    path = write_report(args.run)
    print(f"report -> {path}")
    return 0


def cmd_spectra(args) -> int:
    from unidd_ray.demo import spectral_demo

    spectral_demo(images=args.images, beta_max=args.beta_max, ipc=args.ipc)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unidd-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="write a real dataset as FFCV .beton files")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--max-resolution", type=int, default=256)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="source option, e.g. val_labels=FILE")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("squeeze", help="train the teacher on Ray Train")
    _add_recipe_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--storage-path", default=None)
    p.set_defaults(fn=cmd_squeeze)

    p = sub.add_parser("stats", help="real-feature statistics over a pool of Ray actors")
    _add_recipe_args(p)
    p.add_argument("--data")
    p.add_argument("--teacher")
    p.add_argument("--out")
    p.add_argument("--actors", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--inspect", metavar="DIR", help="print per-layer spectra of an existing statistics artifact")
    p.set_defaults(fn=cmd_stats)

    p = sub.add_parser("recover", help="recover the synthetic images on Ray Train")
    _add_recipe_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--stats", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--ipc", type=int, default=None)
    p.add_argument("--method", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--storage-path", default=None)
    p.set_defaults(fn=cmd_recover)

    p = sub.add_parser("evaluate", help="train students on a distilled set, test on the real val split")
    _add_recipe_args(p)
    p.add_argument("--distilled", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--student", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--hard-labels", action="store_true")
    p.add_argument("--soft-labels", default=None, help="a relabel artifact to use instead of the online teacher")
    p.add_argument("--out", default=None)
    p.add_argument("--storage-path", default=None)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("relabel", help="store the teacher's soft labels for the evaluation stream")
    _add_recipe_args(p)
    p.add_argument("--distilled", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_relabel)

    p = sub.add_parser("pipeline", help="prepare -> squeeze -> stats -> recover -> evaluate -> report")
    _add_recipe_args(p)
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("tune", help="Ray Tune sweep over filters and their parameters")
    _add_recipe_args(p)
    p.add_argument("--space", required=True)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("report", help="spectral analysis and visual report of a pipeline run")
    p.add_argument("--run", required=True)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("spectra", help="spectral demo: covariance spectra and CFM filter responses")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--beta-max", type=float, default=0.1)
    p.add_argument("--ipc", type=int, default=10)
    p.set_defaults(fn=cmd_spectra)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"unidd-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
