"""The ``unidd-ray`` command: prepare | squeeze | stats | recover | evaluate | relabel | pipeline | tune | report |
results | spectra | import.

Every stage command takes ``--recipe NAME`` (built-in) or ``--config FILE``
plus repeatable ``--set section.key=value`` overrides; explicit flags such as
``--ipc`` are shorthands for the matching ``--set``.  Ray is the embedded local
instance unless ``--address`` or ``RAY_ADDRESS`` names a cluster.

Every setting is checked when the recipe is read, and every check of a stage's
inputs runs before Ray starts.  A mistake (a bad value, a missing or damaged
input, an output path holding someone else's files, an output another command
is writing) ends the command with one line naming it and the fix, and exit
status 2; ``-v`` shows the traceback too.  Ctrl-C keeps all finished work
(exit status 130): run the same command again to continue.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
import time
import traceback
from pathlib import Path

from unidd_ray.artifacts.files import check_output, stage_storage
from unidd_ray.artifacts.locks import LockHeld
from unidd_ray.config import ConfigError, Recipe, available_recipes, load_recipe, recipe_to_yaml
from unidd_ray.methods import METHODS
from unidd_ray.runtime import console

# Each command imports what it runs when it runs (below, in the command's function): a refused flag, `--help`
# and the light commands answer without loading Ray Train, FFCV and the stage programs.


def _recipe(args, extra: list[str] | None = None, *, first: list[str] | None = None) -> Recipe:
    """The recipe of ``--recipe``/``--config`` with ``first``, ``--set`` and ``extra`` applied in that order (every
    value checked); ``--address`` over its ``ray_address``."""
    overrides = [*(first or []), *(args.set or []), *(extra or [])]
    recipe = load_recipe(args.recipe, config=args.config, overrides=overrides)  # refuses --recipe with --config
    return dataclasses.replace(recipe, ray_address=args.address) if getattr(args, "address", None) else recipe


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help=f"built-in recipe ({', '.join(available_recipes())}); "
                                                  "default fashion-mnist")
    p.add_argument("--config", default=None, help="a recipe YAML file instead of a built-in recipe")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key, e.g. recover.ipc=50")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def _add_wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="when another command is writing the same output, wait for it instead of stopping")


def _storage(args, recipe: Recipe, out: Path) -> Path:
    return stage_storage(out, getattr(args, "storage_path", None) or recipe.storage_path)


def start_ray(args, recipe: Recipe, storage: Path) -> None:
    """Start or join Ray for a stage command; Ray's own output goes to ``ray.log`` beside the stage's checkpoints
    (``storage``) unless ``-v``.  (Tests replace it to run a command's checks without Ray.)"""
    from unidd_ray.runtime.cluster import init_ray  # (see the note on imports at the top)

    init_ray(recipe.ray_address, log_file=None if args.verbose else storage / "ray.log")
    if console.log_file() is not None:
        console.say(f"Ray's own output -> {console.log_file()}")


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
    from unidd_ray.data.prepare import check_target, prepare_dataset  # lazy: see the note at the top
    from unidd_ray.data.sources import load_source

    options = {}
    for kv in args.option or []:
        if "=" not in kv:
            raise ConfigError(f"--option {kv!r}: write it as KEY=VALUE, e.g. --option val_fraction=0.1")
        key, value = kv.split("=", 1)
        options[key] = value
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (writer processes), got {args.workers}")
    check_target(Path(args.out).absolute())  # before the source is read, which may take long
    source = load_source(args.dataset, args.root, **options)
    info = prepare_dataset(source, args.out, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                           num_workers=args.workers, wait=args.wait)
    rows = [{"split": s, "images": info.splits[s]["count"]} for s in ("train", "val")]
    console.show(_table(rows, ["split", "images"]))
    console.say(f"{info.name}: {info.num_classes} classes, {info.resolution} px, {info.channels} channel(s) -> "
                f"{args.out}")
    return 0


def cmd_squeeze(args) -> int:
    from unidd_ray.stages.squeeze import check_squeeze, squeeze  # lazy: see the note at the top

    recipe = _recipe(args)
    out = Path(args.out)
    check_squeeze(args.data, out, squeeze_cfg=recipe.squeeze, model_cfg=recipe.teacher, data_cfg=recipe.data)
    start_ray(args, recipe, _storage(args, recipe, out))
    squeeze(args.data, out, squeeze_cfg=recipe.squeeze, model_cfg=recipe.teacher, data_cfg=recipe.data,
            storage_path=_storage(args, recipe, out), resume=args.resume, recipe_yaml=recipe_to_yaml(recipe),
            wait=args.wait)
    info = json.loads((out / "teacher.json").read_text())
    console.show(_table([{"arch": info["arch"], "dataset": info["dataset"], "val_top1": info["val_top1"],
                   "sha256": info["sha256"][:12]}], ["arch", "dataset", "val_top1", "sha256"]))
    return 0


def cmd_stats(args) -> int:
    from unidd_ray.artifacts.statistics import covariance_report, load_stats  # lazy: see the note at the top

    extra = []
    if args.actors is not None:
        extra.append(f"stats.actors={args.actors}")
    if args.batch_size is not None:
        extra.append(f"stats.batch_size={args.batch_size}")
    recipe = _recipe(args, extra)
    if args.inspect:
        from unidd_ray.spectral import beta_schedule  # lazy: see the note at the top

        r = recipe.recover_for(recipe.recover.ipc)
        betas = beta_schedule(r.schedule, r.beta_max, r.ipc, beta_min=r.beta_min)
        stats = load_stats(args.inspect)
        rows = []
        for name, m in stats.items():
            rep = covariance_report(m, [betas[0], betas[-1]])
            t = rep["total"] if "total" in rep else rep["per_batch"]
            w = rep.get("within_class") or rep.get("per_batch") or {}
            rows.append({"layer": name, "C": m.channels, "count": m.count, "trace": t["trace"],
                         "eig_min": t["eig_min"], "eig_max": t["eig_max"], "wc_eig_min": w.get("eig_min"),
                         "wc_eig_max": w.get("eig_max"),
                         f"cond(b={betas[0]:.3g})": t["condition"][f"{betas[0]:.6g}"],
                         f"cond(b={betas[-1]:.3g})": t["condition"][f"{betas[-1]:.6g}"]})
        if rows and rows[0]["count"] is None:  # imported: per_batch where the columns say within-class
            rows = [{("pb" + k[2:] if k.startswith("wc_") else k): v for k, v in r.items() if k != "count"}
                    for r in rows]
            console.say(f"imported statistics; they serve {stats[next(iter(stats))].serves()}")
        console.show(_table(rows, list(rows[0])))
        return 0
    if not (args.data and args.teacher and args.out):
        raise ConfigError("stats needs --data, --teacher and --out (or --inspect DIR)")
    from unidd_ray.stages.stats import check_stats, run_stats  # lazy: see the note at the top

    check_stats(args.data, args.teacher, args.out, recipe.stats)
    start_ray(args, recipe, _storage(args, recipe, Path(args.out)))
    out = run_stats(args.data, args.teacher, args.out, recipe.stats, num_workers=recipe.data.num_workers,
                    recipe_yaml=recipe_to_yaml(recipe), wait=args.wait)
    summary = json.loads((Path(out) / "summary.json").read_text())
    console.show(_table([{"layer": k, "C": v["channels"], "trace": v["total"]["trace"], "eig_min": v["total"]["eig_min"],
                   "eig_max": v["total"]["eig_max"]} for k, v in summary["layers"].items()],
                 ["layer", "C", "trace", "eig_min", "eig_max"]))
    console.say(f"{summary['images']} images in {summary['seconds']:.1f}s ({summary['images_per_s']:.0f} img/s) "
                f"with {summary['actors']} actors -> {out}")
    return 0


def cmd_recover(args) -> int:
    from unidd_ray.stages.recover import check_staging, run_recover, validate_inputs  # lazy: see the note at the top

    extra = [f"recover.{k}={v}" for k, v in (("ipc", args.ipc), ("method", args.method), ("workers", args.workers))
             if v is not None]
    recipe = _recipe(args, extra)
    cfg = recipe.recover_for(recipe.recover.ipc)  # with the recipe's recover_by_ipc entry for this IPC
    out = Path(args.out).resolve()
    check_output(out, "distilled")
    check_staging(out.parent / f"{out.name}.partial")
    checked = validate_inputs(args.data, args.teacher, args.stats, cfg)
    start_ray(args, recipe, _storage(args, recipe, out))
    run_recover(args.data, args.teacher, args.stats, out, cfg, storage_path=_storage(args, recipe, out),
                resume=args.resume, num_workers=recipe.data.num_workers, checked=checked,
                recipe_yaml=recipe_to_yaml(dataclasses.replace(recipe, recover=cfg)), wait=args.wait)
    summary = json.loads((out / "summary.json").read_text())
    rows = [{"slot": b, **v} for b, v in summary["per_slot"].items()]
    console.show(_table(rows, list(rows[0])))
    console.say(f"{summary['images']} images ({summary['method']}, IPC {summary['ipc']}) in {summary['seconds']:.1f}s "
                f"-> {out}")
    return 0


def evaluate_recipe(args) -> Recipe:
    """The recipe of ``evaluate``: the flags on top of the recipe and its ``--set``; ``--student`` evaluates that
    student alone (the recipe's ``evaluate.students`` dropped).  The recipe's ``student_options`` are its own
    student's, so a ``--student`` other than the recipe's starts from that
    model's defaults, with only the options that ``--set evaluate.student_options...`` gives."""
    extra = [f"evaluate.{k}={v}" for k, v in (("student", args.student), ("seeds", args.seeds)) if v is not None]
    if args.hard_labels:
        extra.append("evaluate.hard_labels=true")
    if args.student is not None:
        extra.append("evaluate.students=[]")  # --student: that one student, not the recipe's list
        # the recipe's student, without the --set student options meant for --student
        own = load_recipe(args.recipe, config=args.config,
                          overrides=[s for s in args.set or [] if not s.startswith("evaluate.student_options")])
        if args.student != own.evaluate.student:
            return _recipe(args, extra, first=["evaluate.student_options={}"])
    return _recipe(args, extra)


def evaluation_jobs(args, recipe: Recipe, out: Path) -> list:
    """One evaluation of the set per student: ``evaluate.student`` into ``out``, each other ``evaluate.students``
    entry (with its default options) into ``<out>-<student>``, as the pipeline does."""
    from unidd_ray.pipeline import evaluated_students  # lazy: see the note at the top
    from unidd_ray.stages.evaluate import EvalJob  # lazy: see the note at the top

    return [EvalJob(args.distilled, out.with_name(f"{out.name}-{tag}") if tag else out,
                    dataclasses.replace(recipe.evaluate, student=student, student_options=options, students=[]),
                    soft_labels=args.soft_labels, recipe_yaml=recipe_to_yaml(recipe))
            for student, options, tag in evaluated_students(recipe.evaluate)]


def cmd_evaluate(args) -> int:
    from unidd_ray.stages.evaluate import check_evaluations, run_evaluations  # lazy: see the note at the top

    recipe = evaluate_recipe(args)
    out = Path(args.out or Path(args.distilled) / "eval")
    jobs = evaluation_jobs(args, recipe, out)
    # the settings, the data, the teacher, the distilled set and every student, before Ray starts
    check_evaluations(jobs, args.teacher, args.data)
    start_ray(args, recipe, _storage(args, recipe, out))
    summaries = run_evaluations(jobs, args.teacher, args.data, storage_path=_storage(args, recipe, out),
                                num_workers=recipe.data.num_workers, wait=args.wait)
    columns = ["method", "ipc", "student", "labels", "top1_mean", "top1_std", "seeds"]
    console.show(_table([{**{k: s[k] for k in columns[:-1]}, "seeds": len(s["seeds"])} for s in summaries], columns))
    for job in jobs:
        console.say(f"{job.cfg.student} -> {job.out_dir}")
    return 0


def cmd_relabel(args) -> int:
    from unidd_ray.stages.relabel import relabel  # lazy: see the note at the top

    recipe = _recipe(args)
    out = relabel(args.distilled, args.teacher, args.out, recipe.evaluate, recipe_yaml=recipe_to_yaml(recipe),
                  wait=args.wait)
    console.say(f"soft labels for {recipe.evaluate.epochs} epochs -> {out}")
    return 0


def cmd_pipeline(args) -> int:
    from unidd_ray.pipeline import run_pipeline  # lazy: see the note at the top

    recipe = _recipe(args)
    check_output(recipe.run_dir, "run", option="out (--set out=DIR)")
    # Ray starts once the checks that need only the data have passed
    run_pipeline(recipe, wait=args.wait, ray_log=not args.verbose, command=_command())
    return 0


def cmd_tune(args) -> int:
    from unidd_ray.tune import check_sweep, load_space, run_tune  # lazy: see the note at the top

    recipe = _recipe(args)
    check_sweep(args.samples, args.concurrent)
    load_space(args.space)
    run_tune(recipe, args.space, samples=args.samples, concurrent=args.concurrent, resume=args.resume,
             out=args.out, wait=args.wait, ray_log=not args.verbose)
    return 0


def cmd_report(args) -> int:
    from unidd_ray.analysis.report import write_report  # lazy: see the note at the top

    path = write_report(args.run)
    console.say(f"report -> {path}")
    return 0


def cmd_results(args) -> int:
    from unidd_ray.analysis.results_page import results_page, write_results_page  # lazy: see the note at the top

    if args.out is None:
        console.show(results_page(args.runs))
    else:
        console.say(f"results -> {write_results_page(args.runs, args.out)}")
    return 0


# the datasets the authors released artifacts for: classes, side and the normalisation their teachers use
AUTHORS_DATASETS = {"cifar10": (10, 32, "cifar10"), "cifar100": (100, 32, "cifar100"),
                    "tiny-imagenet": (200, 64, "tiny-imagenet"), "imagenet1k": (1000, 224, "imagenet")}


def cmd_import(args) -> int:
    from unidd_ray.artifacts.authors import import_unidd  # lazy: see the note at the top
    from unidd_ray.data.normalization import CONSTANTS  # lazy: see the note at the top

    if args.dataset not in AUTHORS_DATASETS:
        raise ConfigError(f"--dataset {args.dataset!r} is not one of {list(AUTHORS_DATASETS)}")
    num_classes, resolution, normalization = AUTHORS_DATASETS[args.dataset]
    check_output(args.out, "import")
    mean, std = CONSTANTS[normalization]
    out = import_unidd(statistics=args.statistics, checkpoint=args.checkpoint, model_name=args.model, arch=args.arch,
                       dataset=args.dataset, num_classes=num_classes, resolution=args.resolution or resolution,
                       mean=list(mean), std=list(std), out=args.out)
    record = json.loads((Path(out) / "import.json").read_text())
    console.show(_table([{"teacher": str(Path(out) / "teacher"), "stats": str(Path(out) / "stats"),
                          "layers": len(record["layers"]), "normalization": normalization,
                          "sha256": record["teacher_sha256"][:12]}],
                        ["teacher", "stats", "layers", "normalization", "sha256"]))
    return 0


def cmd_rehearsal_data(args) -> int:
    from unidd_ray.data.rehearsal import LABEL_FILE, write_imagenet_like  # lazy: see the note at the top

    started = time.perf_counter()
    try:
        out = write_imagenet_like(args.out, classes=args.classes, train_per_class=args.train_per_class,
                                  val_per_class=args.val_per_class, seed=args.seed, wait=args.wait)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    console.say(f"{args.classes} classes, {args.classes * args.train_per_class} train and "
                f"{args.classes * args.val_per_class} val JPEGs -> {out} ({time.perf_counter() - started:.0f} s); "
                f"use it with --set data.root={out} --set data.options.val_labels={Path(out).resolve() / LABEL_FILE}")
    return 0


def cmd_spectra(args) -> int:
    from unidd_ray.analysis.spectra import spectral_demo  # lazy: see the note at the top

    if args.images < 2:
        raise ConfigError(f"--images must be at least 2 (a covariance needs two images), got {args.images}")
    if not args.beta_max > 0:
        raise ConfigError(f"--beta-max must be positive, got {args.beta_max}")
    if args.ipc < 1:
        raise ConfigError(f"--ipc must be at least 1, got {args.ipc}")
    spectral_demo(images=args.images, beta_max=args.beta_max, ipc=args.ipc)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unidd-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)  # -v after the command too (without resetting one before it)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, fn, *, recipe: bool = True, writes: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, parents=[common])
        if recipe:
            _add_recipe_args(p)
        if writes:
            _add_wait_arg(p)
        p.set_defaults(fn=fn)
        return p

    p = command("prepare", "write a real dataset as FFCV .beton files", cmd_prepare, recipe=False)
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--max-resolution", type=int, default=256)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="source option, e.g. val_labels=FILE")

    p = command("squeeze", "train the teacher on Ray Train", cmd_squeeze)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    p.add_argument("--storage-path", default=None)

    p = command("stats", "real-feature statistics over a pool of Ray actors", cmd_stats)
    p.add_argument("--data")
    p.add_argument("--teacher")
    p.add_argument("--out")
    p.add_argument("--actors", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--inspect", metavar="DIR", help="print per-layer spectra of an existing statistics artifact")

    p = command("recover", "recover the synthetic images on Ray Train", cmd_recover)
    p.add_argument("--data", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--stats", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--ipc", type=int, default=None)
    p.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--storage-path", default=None)

    p = command("evaluate", "train students on a distilled set, test on the real val split", cmd_evaluate)
    p.add_argument("--distilled", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--student", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--hard-labels", action="store_true")
    p.add_argument("--soft-labels", default=None, help="a relabel artifact to use instead of the online teacher")
    p.add_argument("--out", default=None)
    p.add_argument("--storage-path", default=None)

    p = command("relabel", "store the teacher's soft labels for the evaluation stream", cmd_relabel)
    p.add_argument("--distilled", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True)

    command("pipeline", "prepare -> squeeze -> stats -> recover -> evaluate -> report", cmd_pipeline)

    p = command("tune", "Ray Tune sweep over filters and their parameters", cmd_tune)
    p.add_argument("--space", required=True)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=None)

    p = command("report", "spectral analysis and visual report of a pipeline run", cmd_report, recipe=False,
                writes=False)
    p.add_argument("--run", required=True)

    p = command("results", "the results page (docs/RESULTS.md) from pipeline runs' results.json", cmd_results,
                recipe=False, writes=False)
    p.add_argument("runs", nargs="+", metavar="RUN", help="pipeline run directories, in the page's order")
    p.add_argument("--out", default=None, help="the page to write (default: print it)")

    p = command("import", "import the UniDD authors' teacher checkpoint and statistics as artifacts", cmd_import,
                recipe=False)
    p.add_argument("source", choices=["unidd"], help="whose artifacts (unidd: github bdy9527/UniDD)")
    p.add_argument("--statistics", required=True, metavar="DIR",
                   help="their statistics folder (statistic/<dataset>/input/ConvFeatureHook, or a folder above it)")
    p.add_argument("--model", required=True, help="their model name, e.g. ConvNetW128D3 or ResNet18")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="their checkpoint, e.g. ckpt/CIFAR-10/ConvNetW128D3.pth")
    p.add_argument("--arch", required=True, choices=["convnet", "resnet18"])
    p.add_argument("--dataset", required=True, choices=sorted(AUTHORS_DATASETS))
    p.add_argument("--resolution", type=int, default=None, help="input side (default: the dataset's)")
    p.add_argument("--out", required=True)

    p = command("rehearsal-data", "write an ImageNet-shaped folder (official layout, JPEGs) for rehearsals",
                cmd_rehearsal_data, recipe=False)
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train-per-class", type=int, default=3)
    p.add_argument("--val-per-class", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)

    p = command("spectra", "spectral demo: covariance spectra and CFM filter responses", cmd_spectra, recipe=False,
                writes=False)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--beta-max", type=float, default=0.1)
    p.add_argument("--ipc", type=int, default=10)
    return parser


# A mistake of the user's or a condition of the machine, told in one line; anything else is a bug and shows its
# traceback.  (ValueError covers this project's own checks: ConfigError, ArtifactError, SourceError, ...)
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, LockHeld)


def _no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a full disk."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _command() -> str:
    """The command line of this run, as a user would type it."""
    return " ".join(["unidd-ray", *sys.argv[1:]])


def _leave_ray() -> None:
    """Stop a Ray this command started (its last lines go to its log file), then give the terminal back."""
    cluster = sys.modules.get("unidd_ray.runtime.cluster")  # imported only by the commands that start Ray
    if cluster is not None:
        cluster.shutdown_ray()
    console.restore()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = f"unidd-ray {args.command}"
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        _leave_ray()  # Ray's output went to its log file: what follows is for the terminal
        if args.verbose:
            traceback.print_exc()
        console.warn(f"{name}: interrupted; finished work is kept: run the same command again to continue"
                     + (" (with --resume)" if args.command in ("squeeze", "recover") else ""))
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into the user's mistakes and bugs below
        _leave_ray()
        if _no_space(exc):
            where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
            message = (f"no space left on the device{where}: free some space or choose another output; finished "
                       "work is kept and the same command continues from it")
        elif isinstance(exc, USER_ERRORS):
            message = _one_line(exc)
        else:
            raise  # a bug: the traceback is what helps
        if args.verbose:
            traceback.print_exc()
        console.warn(f"{name}: error: {message}")
        return 2
    finally:
        _leave_ray()


if __name__ == "__main__":
    sys.exit(main())
