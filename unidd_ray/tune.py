"""``unidd-ray tune``: Ray Tune sweeps over spectral filters and their parameters.

A search space file (``tune_spaces/*.yaml``) names recipe keys and their
domains::

    metric: top1            # val top-1, reported by every trial after each evaluation epoch
    mode: max
    base: {recover.method: cfm}          # fixed overrides for every trial
    space:
      recover.beta_max: {loguniform: [0.01, 2]}
      recover.alpha: {loguniform: [0.01, 1]}
      family:                            # a conditional space: one branch per choice
        choice:
          - {recover.method: dm}
          - {recover.method: mtt, recover.mtt_eta: {loguniform: [0.01, 1]}}
    trial: {ipc: 2, classes: 5, iterations: 100, eval_epochs: 60, eval_every: 10, seeds: 1}
    scheduler: {asha: {grace_period: 2, reduction_factor: 2}}

Domains: ``uniform``, ``loguniform``, ``randint`` ([low, high)), ``choice`` and
``grid`` (lists), or a literal value.  The teacher, the dataset and the real
statistics are computed once (the pipeline's content-addressed stages) and
shared by all trials; each trial recovers a (reduced) distilled set in process
and trains a short evaluation, reporting val top-1 after every ``eval_every``
epochs so that ASHA can stop poor trials early.  With several ``trial.seeds``
the seeds train one after another; each report carries the seed's own top-1
(``top1``), those of every seed so far at that epoch (``top1_seeds``) and their
mean (``top1_mean``), which ASHA and the ranking use: a trial ranks by the mean
final accuracy of all its seeds.  ``--resume`` continues an
interrupted sweep (``Tuner.restore``).  Outputs: ``ranking.md``,
``ranking.json`` and ``best_recipe.yaml`` (a ready-to-use recipe file).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from unidd_ray.artifacts.dataset import read_labels
from unidd_ray.artifacts.files import atomic_write_json, atomic_write_text, check_output
from unidd_ray.artifacts.locks import output_lock
from unidd_ray.artifacts.teacher import read_teacher_info
from unidd_ray.config import ConfigError, Recipe, apply_overrides, from_dict, to_dict
from unidd_ray.core.evaluation import evaluate_in_process
from unidd_ray.core.plan import make_plan
from unidd_ray.core.recovery import build_distiller, recover_in_process
from unidd_ray.methods import BASELINES, get_method
from unidd_ray.pipeline import check_run_format, shared_stages
from unidd_ray.runtime import console

DOMAINS = ("uniform", "loguniform", "randint", "choice", "grid")
METRICS = ("top1",)  # what every trial reports, per seed; ASHA and the ranking use its mean over the seeds
ASHA_OPTIONS = ("grace_period", "reduction_factor", "brackets", "stop_last_trials")
# recipe keys that the trial section controls (trial_recipe sets them for every trial)
TRIAL_KEYS = {"recover.ipc": "trial.ipc", "recover.iterations": "trial.iterations", "recover.workers": "1",
              "evaluate.epochs": "trial.eval_epochs", "evaluate.eval_every": "trial.eval_every",
              "evaluate.seeds": "trial.seeds"}


@dataclass
class TrialSettings:
    ipc: int = 1
    classes: int | list[int] | None = None  # a count (the first N classes), a list, or all
    iterations: int = 100
    eval_epochs: int = 60
    eval_every: int = 10
    seeds: int = 1
    cpus: float = 1
    gpus: float = 0


@dataclass
class SearchSpace:
    path: str
    space: dict
    base: dict = field(default_factory=dict)
    metric: str = "top1"
    mode: str = "max"
    trial: TrialSettings = field(default_factory=TrialSettings)
    scheduler: dict = field(default_factory=lambda: {"asha": {}})
    description: str = ""


def _sections() -> dict:
    return {f.name: getattr(Recipe(), f.name) for f in dataclasses.fields(Recipe)}


def _check_key(key: str, where: str) -> None:
    sections = _sections()
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections or not dataclasses.is_dataclass(sections[parts[0]]):
        raise ConfigError(f"{where}: {key!r} is not a recipe key of the form section.key "
                          f"(sections: {[k for k, v in sections.items() if dataclasses.is_dataclass(v)]})")
    valid = [f.name for f in dataclasses.fields(sections[parts[0]])]
    if parts[1] not in valid:
        raise ConfigError(f"{where}: unknown key {key!r}; valid keys of {parts[0]}: {valid}")
    if key in TRIAL_KEYS:
        raise ConfigError(f"{where}: {key!r} is set by the 'trial' section ({TRIAL_KEYS[key]}) and cannot be tuned")


def _check_value(key: str, value, where: str) -> None:
    """``value`` must be a valid setting of recipe key ``key`` (type-checked like a ``--set``)."""
    section, name = key.split(".")
    data = to_dict(_sections()[section])
    data[name] = value
    try:
        from_dict(type(_sections()[section]), data, section)  # the section's own checks: types, ranges, choices
    except ConfigError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None


def _is_branch(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and "." in k for k in value)


def _check_domain(key: str, spec, where: str) -> None:
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) not in DOMAINS:
        field_type = typing.get_type_hints(type(_sections()[key.split(".")[0]])).get(key.split(".")[-1])
        if field_type is not dict and "." in key:
            raise ConfigError(f"{where}: {key}: unknown domain {next(iter(spec))!r}; valid domains: {list(DOMAINS)} "
                              "(or a literal value)")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        _check_value(key, spec, where)  # a literal value
        return
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {key}: {kind} needs a non-empty list, got {args!r}")
        for branch in args:
            if _is_branch(branch):
                _check_branch(branch, f"{where}: {key}")
            elif "." not in key:
                raise ConfigError(f"{where}: {key}: each choice of a group must be a mapping of recipe keys "
                                  f"(section.key) to domains, got {branch!r}")
            else:
                _check_value(key, branch, where)
        return
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"{where}: {key}: {kind} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: {key}: {kind} needs low < high, got {args}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: {key}: loguniform needs low > 0 (a log scale), got {low}")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: {key}: randint needs integer bounds [low, high), got {args}")
        _check_value(key, low, where)
    else:  # a non-integer sample must be a valid value (refuses uniform over an integer key)
        _check_value(key, low + (high - low) / math.pi, where)


def _check_branch(branch: dict, where: str) -> None:
    for key, spec in branch.items():
        _check_key(key, where)
        _check_domain(key, spec, where)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "space" not in data or not isinstance(data["space"], dict):
        raise ConfigError(f"{path}: a search space needs a 'space' mapping of recipe keys to domains")
    where = str(path)
    known = {f.name for f in dataclasses.fields(SearchSpace)} - {"path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {unknown}; valid: {sorted(known)}")
    if not data["space"]:
        raise ConfigError(f"{where}: 'space' is empty; name at least one recipe key to tune")
    for key, spec in data["space"].items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: space key {key!r} must be a string")
        if "." in key:
            _check_key(key, where)
            _check_domain(key, spec, where)
        elif isinstance(spec, dict) and set(spec) == {"choice"}:  # a named conditional group
            _check_domain(key, spec, where)
        else:
            raise ConfigError(f"{where}: {key!r} must be a recipe key (section.key) or a group with a choice")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: base must be a mapping of recipe keys to fixed values")
    for key, value in base.items():
        _check_key(key, f"{where}: base")
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAINS:
            raise ConfigError(f"{where}: base: {key} must be a fixed value; put domains under 'space'")
        _check_value(key, value, f"{where}: base")
    if data.get("mode", "max") not in ("max", "min"):
        raise ConfigError(f"{where}: mode must be max or min, got {data.get('mode')!r}")
    if data.get("metric", "top1") not in METRICS:
        raise ConfigError(f"{where}: metric must be one of {list(METRICS)} (what trials report), "
                          f"got {data.get('metric')!r}")
    scheduler = data.get("scheduler") or {"asha": {}}
    if not isinstance(scheduler, dict) or len(scheduler) != 1 or set(scheduler) - {"asha", "fifo"}:
        raise ConfigError(f"{where}: scheduler must be one of asha or fifo, got {scheduler!r}")
    asha = scheduler.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - set(ASHA_OPTIONS):
        raise ConfigError(f"{where}: scheduler.asha options must be among {list(ASHA_OPTIONS)}, got {asha!r}")
    if asha.get("reduction_factor", 2) <= 1 or asha.get("grace_period", 1) < 1:
        raise ConfigError(f"{where}: scheduler.asha needs reduction_factor > 1 and grace_period >= 1")
    if not isinstance(data.get("trial") or {}, dict):
        raise ConfigError(f"{where}: trial must be a mapping of {[f.name for f in dataclasses.fields(TrialSettings)]}")
    try:
        trial = from_dict(TrialSettings, data.get("trial") or {}, "trial")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if trial.ipc < 1 or trial.iterations < 1 or trial.eval_epochs < 1 or trial.seeds < 1 or trial.eval_every < 0:
        raise ConfigError(f"{where}: trial needs ipc, iterations, eval_epochs, seeds >= 1 and eval_every >= 0")
    if isinstance(trial.classes, int) and trial.classes < 1:
        raise ConfigError(f"{where}: trial.classes must be a positive count, a list of classes or null")
    max_t = reports_per_trial(trial)
    if asha.get("grace_period", 1) > max_t:
        raise ConfigError(f"{where}: scheduler.asha.grace_period {asha['grace_period']} exceeds the {max_t} "
                          "evaluations of a trial (eval_epochs / eval_every x seeds)")
    return SearchSpace(path=str(path), space=data["space"], base=base,
                       metric=data.get("metric", "top1"), mode=data.get("mode", "max"), trial=trial,
                       scheduler=scheduler, description=data.get("description", ""))


def reports_per_trial(trial: TrialSettings) -> int:
    """How many results a full (not stopped) trial reports: one per ``eval_every`` epochs and one at the end
    of each seed's training (the ASHA time axis is ``training_iteration``)."""
    per_seed = math.ceil(trial.eval_epochs / trial.eval_every) if trial.eval_every else 1
    return per_seed * trial.seeds


def to_tune_domain(spec):
    """A YAML domain as a Ray Tune search domain (recursively, for conditional branches)."""
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS:
        kind, args = next(iter(spec.items()))
        if kind == "uniform":
            return tune.uniform(*args)
        if kind == "loguniform":
            return tune.loguniform(*args)
        if kind == "randint":
            return tune.randint(*args)
        values = [to_tune_domain(a) for a in args]
        return tune.choice(values) if kind == "choice" else tune.grid_search(values)
    if isinstance(spec, dict):
        return {k: to_tune_domain(v) for k, v in spec.items()}
    return spec


def flatten_sample(config: dict) -> dict:
    """A sampled trial config → ``{"section.key": value}`` overrides (conditional groups merged in)."""
    out = {}
    for key, value in config.items():
        if "." in key:
            out[key] = value
        elif isinstance(value, dict):
            out.update(flatten_sample(value))
    return out


def _override_texts(overrides: dict) -> list[str]:
    """``{"section.key": value}`` as ``section.key=value`` override texts (values in YAML flow style)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides.items()]


def trial_recipe(recipe: Recipe, overrides: dict, trial: TrialSettings) -> Recipe:
    """A trial's recipe: the recipe's settings for the trial's IPC (its ``recover_by_ipc`` entry folded into
    ``recover``), the sampled ``overrides`` over them, then the trial section's keys."""
    data = to_dict(recipe)
    data["recover"] = to_dict(recipe.recover_for(trial.ipc))
    data["recover_by_ipc"] = {}
    data = apply_overrides(data, _override_texts(overrides))
    data["recover"].update(ipc=trial.ipc, iterations=trial.iterations, workers=1)
    data["evaluate"].update(epochs=trial.eval_epochs, eval_every=trial.eval_every, seeds=trial.seeds)
    return from_dict(Recipe, data)


def tuned_recipe(recipe: Recipe, overrides: dict) -> dict:
    """The recipe a sweep recommends: ``recipe`` with a trial's ``overrides``, as a mapping to write.  A tuned
    recover key holds at every IPC (``apply_overrides`` drops it from the ``recover_by_ipc`` entries); the
    pipeline runs the recipe's baselines and the tuned method."""
    data = apply_overrides(to_dict(recipe), _override_texts(overrides))
    data["name"] = f"{recipe.name}-tuned"
    data["out"] = None
    data["methods"] = [m for m in recipe.methods if m in BASELINES] + [data["recover"]["method"]]
    from_dict(Recipe, data)  # the written file must load
    return data


def _trial_classes(trial: TrialSettings, num_classes: int) -> list[int]:
    if trial.classes is None:
        return list(range(num_classes))
    if isinstance(trial.classes, int):
        return list(range(min(trial.classes, num_classes)))
    return sorted(trial.classes)


def run_trial(config: dict, *, recipe: Recipe, base: dict, trial: TrialSettings, data_dir: str, teacher_dir: str,
               stats_dir: str | None) -> None:
    """One trial: a (reduced) recovery in this process and a short evaluation, reporting val top-1 to Tune."""
    torch.set_num_threads(max(1, math.floor(trial.cpus)))
    device = "cuda" if trial.gpus > 0 and torch.cuda.is_available() else "cpu"
    r = trial_recipe(recipe, {**base, **flatten_sample(config)}, trial)
    tinfo = read_teacher_info(teacher_dir)
    info, distiller = build_distiller(r.recover, data_dir, teacher_dir,
                                      stats_dir if get_method(r.recover.method).spectral else None, device)
    classes = _trial_classes(trial, info.num_classes)
    plan = make_plan(read_labels(data_dir, "train"), info.num_classes, r.recover, classes=classes)
    images, labels, _ = recover_in_process(distiller, plan, data_dir=data_dir, emu_enabled=r.recover.emu,
                                           num_workers=r.data.num_workers, device=device)
    evaluate_in_process(images, labels, distiller.teacher, data_dir, r.evaluate.for_ipc(r.recover.ipc),
                        num_classes=tinfo.num_classes, in_channels=tinfo.in_channels, resolution=tinfo.resolution,
                        seeds=list(range(r.evaluate.seeds)),
                        device=device, num_workers=r.data.num_workers, report=SeedReports(tune.report),
                        val_classes=classes, normalize=(tinfo.mean, tinfo.std))


class SeedReports:
    """The reports of a trial whose seeds train one after another: each names the seed's own top-1 and the
    mean over every seed so far at the same epoch, so that at the end ``top1_mean`` is the mean final
    accuracy of all the trial's seeds (and at a rung, trials compare the same seeds at the same epoch)."""

    def __init__(self, send):
        self.send = send
        self.at: dict[int, dict[int, float]] = {}  # epoch -> seed -> top-1

    def __call__(self, seed: int, epoch: int, acc: float) -> None:
        seen = self.at.setdefault(epoch, {})
        seen[seed] = float(acc)
        values = [seen[s] for s in sorted(seen)]
        self.send({"top1": float(acc), "top1_mean": sum(values) / len(values), "top1_seeds": values,
                   "epoch": epoch + 1, "seed": seed})


def rank_trials(results, space: SearchSpace, max_t: int) -> tuple[list[dict], list[dict]]:
    """Ranking rows and errors of a sweep's trial results, best first.

    A row's ``space.metric`` is the trial's last mean over its seeds (``<metric>_mean``: at the end, the
    mean final accuracy of every seed), ``seeds`` the per-seed values behind it and ``curve`` the means
    at each evaluation.  Complete trials rank first: a trial ASHA stopped reports an intermediate, not a
    final, accuracy.
    """
    ranked = f"{space.metric}_mean"
    rows, errors = [], []
    for result in results:
        if result.error is not None:
            errors.append({"trial": Path(result.path).name, "config": flatten_sample(result.config),
                           "error": str(result.error).strip().splitlines()[-1] if str(result.error).strip() else
                           type(result.error).__name__})
        if result.metrics is None or ranked not in result.metrics:
            continue
        history = result.metrics_dataframe
        evaluations = int(result.metrics.get("training_iteration", 0))
        rows.append({"trial": Path(result.path).name, "overrides": {**space.base, **flatten_sample(result.config)},
                     space.metric: float(result.metrics[ranked]),
                     "seeds": [float(v) for v in result.metrics[f"{space.metric}_seeds"]],
                     "evaluations": evaluations,
                     "stopped_early": evaluations < max_t and result.error is None,
                     "error": result.error is not None,
                     "curve": [float(v) for v in history[ranked]] if history is not None and ranked in history else []})
    sign = -1 if space.mode == "max" else 1
    rows.sort(key=lambda r: (r["error"] or r["stopped_early"], sign * r[space.metric]))
    return rows, errors


def run_tune(recipe: Recipe, space_file: str | Path, *, samples: int = 8, concurrent: int = 2,
             resume: bool = False, out: str | Path | None = None, wait: bool = False, ray_log: bool = True) -> dict:
    """Sweep ``space_file`` over ``recipe``: the shared stages in the recipe's run directory (holding its lock),
    then the trials, writing the ranking and the best recipe to ``out`` (holding its lock).  ``ray_log``: see
    :func:`unidd_ray.pipeline.run_pipeline`."""
    space = load_space(space_file)
    check_sweep(samples, concurrent)
    trial_recipe(recipe, space.base, space.trial)  # its settings are checked before the shared stages
    run = recipe.run_dir.resolve()
    out = Path(out).resolve() if out else run / f"tune-{Path(space_file).stem}"
    check_output(run, "run", option="out (--set out=DIR)")
    check_output(out, "tune")
    with output_lock(run, wait=wait, notify=console.say):  # the shared stages: one writer per run directory
        check_run_format(run)
        inputs = shared_stages(recipe, run, stats=True, ray_log=ray_log)
    with output_lock(out, wait=wait, notify=console.say):
        return _sweep(recipe, space, space_file, out, inputs.data_dir, inputs.teacher_dir, inputs.stats_dir,
                      samples=samples, concurrent=concurrent, resume=resume)


def check_sweep(samples: int, concurrent: int) -> None:
    """The sweep's own settings: at least one trial, and at least one at a time."""
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1 (the number of trials), got {samples}")
    if concurrent < 1:
        raise ConfigError(f"--concurrent must be at least 1 (trials at a time), got {concurrent}")


def _sweep(recipe: Recipe, space: SearchSpace, space_file, out: Path, data_dir: Path, teacher_dir: Path,
           stats_dir: Path, *, samples: int, concurrent: int, resume: bool) -> dict:
    ranked = f"{space.metric}_mean"  # what ASHA and the ranking compare: the mean over the trial's seeds
    out.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, recipe=recipe, base=space.base, trial=space.trial,
                             data_dir=str(data_dir.resolve()), teacher_dir=str(teacher_dir.resolve()),
                             stats_dir=str(stats_dir.resolve())),
        {"cpu": space.trial.cpus, "gpu": space.trial.gpus})
    max_t = reports_per_trial(space.trial)
    if "asha" in space.scheduler:
        opts = {"grace_period": 1, "reduction_factor": 2, **(space.scheduler["asha"] or {})}
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, **opts)
    else:
        scheduler = FIFOScheduler()
    name = "sweep"
    # Tune's experiment state: the recipe's shared storage on a cluster (a mounted path or a URI), else <out>/ray
    if recipe.storage_path:
        storage = (f"{recipe.storage_path.rstrip('/')}/tune-{Path(space_file).stem}" if "://" in recipe.storage_path
                   else str(Path(recipe.storage_path).resolve() / f"tune-{Path(space_file).stem}"))
    else:
        storage = str((out / "ray").resolve())
    experiment = f"{storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(experiment):
        console.say(f"[tune] resuming {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        if resume:
            console.say(f"[tune] nothing to resume at {experiment}; starting a new sweep")
        tuner = tune.Tuner(
            trainable, param_space={k: to_tune_domain(v) for k, v in space.space.items()},
            tune_config=tune.TuneConfig(metric=ranked, mode=space.mode, scheduler=scheduler,
                                        num_samples=samples, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
        )
    grid = tuner.fit()
    rows, errors = rank_trials(grid, space, max_t)
    if not rows:
        raise RuntimeError(f"no trial reported {ranked!r}; see the trial logs under {experiment}"
                           + (f" (first error: {errors[0]['error']})" if errors else ""))
    best = rows[0]
    best_recipe = tuned_recipe(recipe, best["overrides"])
    atomic_write_text(out / "best_recipe.yaml",
                      f"# best of {len(rows)} trials of {space_file} ({space.metric} {best[space.metric]:.2f}, the mean "
                      f"of {len(best['seeds'])} seeds)\n"
                      + yaml.safe_dump(best_recipe, sort_keys=False))
    ranking = {"space": str(space_file), "recipe": recipe.name, "metric": space.metric, "mode": space.mode,
               "trial": to_dict(space.trial), "scheduler": space.scheduler, "max_evaluations": max_t,
               "samples": samples, "experiment": experiment, "best": best, "rows": rows, "errors": errors,
               "best_recipe": str(out / "best_recipe.yaml")}
    atomic_write_json(out / "ranking.json", ranking)
    header = (f"| rank | {space.metric} (mean of {space.trial.seeds} seeds) | per seed | evaluations "
              "| stopped early | overrides |")
    lines = [f"# Tune ranking: {Path(space_file).name} on {recipe.name}", "", header, "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        overrides = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["overrides"].items())
        per_seed = ", ".join(f"{v:.2f}" for v in r["seeds"])
        lines.append(f"| {i} | {r[space.metric]:.2f} | {per_seed} | {r['evaluations']} "
                     f"| {'yes' if r['stopped_early'] else 'no'} | {overrides} |")
    atomic_write_text(out / "ranking.md", "\n".join(lines) + "\n")
    console.show("\n".join(lines))
    console.say(f"best recipe -> {out / 'best_recipe.yaml'}")
    return ranking
