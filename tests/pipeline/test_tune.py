"""Ray Tune driver: search-space validation (fast) and a real ASHA sweep on digits (slow)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from unidd_ray.config import ConfigError, load_recipe
from unidd_ray.tune import (TrialSettings, flatten_sample, load_space, reports_per_trial, to_tune_domain,
                            trial_recipe, tuned_recipe)

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))


def _space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
    metric: top1
    mode: max
    base: {recover.method: cfm}
    space:
      recover.beta_max: {loguniform: [0.01, 2.0]}
    trial: {ipc: 1, iterations: 5, eval_epochs: 10, eval_every: 5}
    scheduler: {asha: {grace_period: 1, reduction_factor: 2}}
"""


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_shipped_spaces_load(path):
    space = load_space(path)
    assert space.space and space.metric == "top1" and space.mode in ("max", "min")
    assert "asha" in space.scheduler
    assert reports_per_trial(space.trial) >= 2  # ASHA needs intermediate results to stop a trial early


def test_good_space_loads(tmp_path):
    space = load_space(_space(tmp_path, GOOD))
    assert space.base == {"recover.method": "cfm"}
    assert space.trial.ipc == 1 and space.trial.eval_every == 5
    assert reports_per_trial(space.trial) == 2


@pytest.mark.parametrize("body, message", [
    ("space: {recover.nope: {uniform: [0, 1]}}", "unknown key 'recover.nope'"),
    ("space: {nosection.alpha: {uniform: [0, 1]}}", "not a recipe key"),
    ("space: {beta_max: {uniform: [0, 1]}}", "must be a recipe key"),
    ("space: {recover.alpha: {loguniform: [0, 1]}}", "loguniform needs low > 0"),
    ("space: {recover.alpha: {loguniform: [-1, 1]}}", "loguniform needs low > 0"),
    ("space: {recover.alpha: {uniform: [1, 0.5]}}", "low < high"),
    ("space: {recover.alpha: {uniform: [0.1]}}", "needs [low, high]"),
    ("space: {recover.alpha: {uniform: [a, b]}}", "needs [low, high]"),
    ("space: {recover.alpha: {logunifrm: [0.1, 1]}}", "unknown domain 'logunifrm'"),
    ("space: {recover.alpha: {choice: []}}", "non-empty list"),
    ("space: {recover.alpha: {choice: 0.1}}", "non-empty list"),
    ("space: {recover.alpha: {choice: [0.1, fast]}}", "must be a number"),
    ("space: {recover.alpha: high}", "must be a number"),
    ("space: {recover.mtt_steps: {uniform: [1, 20]}}", "must be an integer"),
    ("space: {recover.mtt_steps: {randint: [1.5, 20]}}", "integer bounds"),
    ("space: {recover.schedule: {choice: [cosine, wobbly]}}", "recover.schedule must be one of ['cosine', 'linear', "
                                                             "'constant', 'geometric'], got 'wobbly'"),
    ("space: {recover.method: {choice: [cfm, magic]}}", "recover.method must be one of ['cfm', 'krr'"),
    ("space: {recover.ipc: {choice: [1, 2]}}", "set by the 'trial' section"),
    ("space: {evaluate.epochs: {randint: [1, 5]}}", "set by the 'trial' section"),
    ("space: {family: {choice: [{recover.method: dm}, {recover.bogus: 1}]}}", "unknown key 'recover.bogus'"),
    ("space: {family: {choice: [dm, cfm]}}", "each choice of a group"),
    ("space: {family: {uniform: [0, 1]}}", "must be a recipe key"),
    ("space: {}", "'space' is empty"),
    ("spaces: {recover.alpha: {uniform: [0, 1]}}", "needs a 'space' mapping"),
    ("space: {recover.alpha: 0.1}\nsearch_alg: bohb", "unknown top-level keys ['search_alg']"),
    ("space: {recover.alpha: 0.1}\nmode: maximise", "mode must be max or min"),
    ("space: {recover.alpha: 0.1}\nmetric: loss", "metric must be one of"),
    ("space: {recover.alpha: 0.1}\nscheduler: {hyperband: {}}", "scheduler must be one of asha or fifo"),
    ("space: {recover.alpha: 0.1}\nscheduler: {asha: {grace: 2}}", "scheduler.asha options"),
    ("space: {recover.alpha: 0.1}\nscheduler: {asha: {reduction_factor: 1}}", "reduction_factor > 1"),
    ("space: {recover.alpha: 0.1}\ntrial: {ipcs: 2}", "trial.ipcs"),
    ("space: {recover.alpha: 0.1}\ntrial: {ipc: 0}", "ipc, iterations"),
    ("space: {recover.alpha: 0.1}\ntrial: {eval_epochs: 10, eval_every: 5}\n"
     "scheduler: {asha: {grace_period: 3}}", "exceeds the 2 evaluations"),
    ("space: {recover.alpha: 0.1}\nbase: {recover.methd: cfm}", "unknown key 'recover.methd'"),
    ("space: {recover.alpha: 0.1}\nbase: {recover.beta_max: {uniform: [0, 1]}}", "fixed value"),
    ("space: [recover.alpha]", "needs a 'space' mapping"),
    ("space: {recover.alpha: [0.1, 0.2}", "not valid YAML"),
])
def test_bad_spaces_are_refused(tmp_path, body, message):
    with pytest.raises(ConfigError) as err:
        load_space(_space(tmp_path, body))
    assert message in str(err.value)
    assert "space.yaml" in str(err.value)  # the message names the file


def test_cli_tune_reports_bad_space(tmp_path, monkeypatch, capsys):
    from unidd_ray import cli

    monkeypatch.setattr(cli, "start_ray", lambda *args: None)  # the space is checked before any Ray work
    args = cli.build_parser().parse_args(["tune", "--space", "s.yaml", "--recipe", "digits", "--samples", "4",
                                          "--concurrent", "2"])
    assert (args.samples, args.concurrent, args.resume) == (4, 2, False)
    bad = _space(tmp_path, "space: {recover.alpha: {loguniform: [0, 1]}}")
    assert cli.main(["tune", "--space", str(bad), "--recipe", "digits", "--set", f"out={tmp_path / 'run'}"]) == 2
    assert "loguniform needs low > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_to_tune_domain_and_flatten():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer
    from ray.tune.search.variant_generator import generate_variants

    assert isinstance(to_tune_domain({"uniform": [0, 1]}), Float)
    log = to_tune_domain({"loguniform": [0.01, 1.0]})
    assert isinstance(log, Float) and isinstance(log.get_sampler(), Float._LogUniform)
    assert isinstance(to_tune_domain({"randint": [1, 5]}), Integer)
    assert isinstance(to_tune_domain({"choice": ["a", "b"]}), Categorical)
    assert to_tune_domain({"grid": [1, 2]}) == tune.grid_search([1, 2])
    assert to_tune_domain(0.5) == 0.5 and to_tune_domain("cosine") == "cosine"

    space = load_space(ROOT / "tune_spaces" / "filters.yaml")
    domains = {k: to_tune_domain(v) for k, v in space.space.items()}
    seen = set()
    for _ in range(40):
        for _, cfg in generate_variants(domains):
            flat = flatten_sample(cfg)
            assert all("." in k for k in flat)
            assert 0.01 <= flat["recover.alpha"] <= 1.0
            method = flat["recover.method"]
            seen.add(method)
            # conditional: only the chosen family's own parameters are sampled
            if method == "mtt":
                assert 0.01 <= flat["recover.mtt_eta"] <= 1.0 and 1 <= flat["recover.mtt_steps"] < 20
            else:
                assert "recover.mtt_eta" not in flat
            if method == "cfm":
                assert flat["recover.schedule"] in ("cosine", "linear", "geometric")
    assert seen == {"dm", "dc", "mtt", "krr", "cfm"}
    assert flatten_sample({"a.b": 1, "group": {"c.d": 2, "e.f": {"x": 1}}}) == {"a.b": 1, "c.d": 2, "e.f": {"x": 1}}


def test_trial_recipe_applies_overrides_and_trial_settings():
    recipe = load_recipe("digits")
    trial = TrialSettings(ipc=1, classes=3, iterations=7, eval_epochs=12, eval_every=4, seeds=1)
    r = trial_recipe(recipe, {"recover.method": "mtt", "recover.mtt_eta": 0.3, "recover.mtt_steps": 4,
                              "evaluate.lr": 0.002}, trial)
    assert (r.recover.method, r.recover.mtt_eta, r.recover.mtt_steps) == ("mtt", 0.3, 4)
    assert (r.recover.ipc, r.recover.iterations, r.recover.workers) == (1, 7, 1)
    assert (r.evaluate.epochs, r.evaluate.eval_every, r.evaluate.seeds, r.evaluate.lr) == (12, 4, 1, 0.002)
    assert r.recover.max_roll == recipe.recover.max_roll  # the rest of the recipe is kept
    assert recipe.recover.method == "cfm"  # the base recipe is not modified
    with pytest.raises(ConfigError):
        trial_recipe(recipe, {"recover.alpha": "high"}, trial)
    assert reports_per_trial(trial) == 3
    assert reports_per_trial(TrialSettings(eval_epochs=25, eval_every=10, seeds=2)) == 6
    assert reports_per_trial(TrialSettings(eval_epochs=25, eval_every=0, seeds=2)) == 2


def test_a_trial_reads_its_ipcs_entry_and_a_sampled_value_beats_it():
    """A trial at IPC 1 recovers with the recipe's recover_by_ipc entry for IPC 1, except where the sweep samples
    the same key: a swept value must never be overridden by the recipe."""
    recipe = load_recipe("digits", overrides=["recover.lr=0.05", "recover_by_ipc={1: {lr: 0.1, alpha: 0.3}}"])
    trial = TrialSettings(ipc=1, iterations=7)
    r = trial_recipe(recipe, {"recover.alpha": 0.7}, trial)
    assert (r.recover.lr, r.recover.alpha) == (0.1, 0.7)
    assert r.recover_for(1) == r.recover  # the entry is folded into the section
    r = trial_recipe(recipe, {"recover.alpha": 0.7}, TrialSettings(ipc=2, iterations=7))
    assert (r.recover.lr, r.recover.alpha) == (0.05, 0.7)


def test_the_tuned_recipe_holds_the_tuned_value_at_every_ipc(tmp_path):
    recipe = load_recipe("digits", overrides=["recover_by_ipc={1: {lr: 0.1, alpha: 0.3}, 50: {lr: 0.02}}",
                                              "methods=[random, dm, cfm]"])
    data = tuned_recipe(recipe, {"recover.method": "krr", "recover.lr": 0.2})
    assert data["recover_by_ipc"] == {1: {"alpha": 0.3}}  # lr tuned: gone from every entry, the empty one dropped
    written = tmp_path / "best_recipe.yaml"
    written.write_text(yaml.safe_dump(data, sort_keys=False))
    tuned = load_recipe(config=written)
    assert [tuned.recover_for(ipc).lr for ipc in (1, 10, 50)] == [0.2, 0.2, 0.2]
    assert tuned.recover_for(1).alpha == 0.3 and tuned.methods == ["random", "krr"]
    assert tuned.name == f"{recipe.name}-tuned" and tuned.out is None


# ----------------------------------------------------------------------------- several seeds per trial
def test_a_trial_with_two_seeds_reports_their_mean(monkeypatch):
    """A trial's seeds train one after another; every report carries the mean over the seeds so far at that
    epoch, so the last one (what ASHA and the ranking read) is the mean final accuracy of both seeds."""
    from types import SimpleNamespace

    from ray import tune

    import unidd_ray.tune as trials

    accuracy = {(0, 4): 40.0, (0, 9): 80.0, (1, 4): 50.0, (1, 9): 60.0}  # (seed, epoch) -> top-1
    evaluated = []

    def fake_evaluate(images, labels, model, data_dir, cfg, *, seeds, report, **kw):
        evaluated.append((cfg.seeds, seeds))
        assert kw["normalize"] == ([0.5], [0.25])  # the students are validated with the teacher's constants
        for seed in seeds:
            for epoch in (4, 9):
                report(seed, epoch, accuracy[seed, epoch])
        return [accuracy[s, 9] for s in seeds]

    info = SimpleNamespace(num_classes=10)
    monkeypatch.setattr(trials, "build_distiller", lambda *a: (info, SimpleNamespace(teacher=None)))
    monkeypatch.setattr(trials, "make_plan", lambda *a, **k: None)
    monkeypatch.setattr(trials, "recover_in_process", lambda *a, **k: (None, None, []))
    monkeypatch.setattr(trials, "read_labels", lambda *a: None)
    monkeypatch.setattr(trials, "read_teacher_info",
                        lambda d: SimpleNamespace(num_classes=10, in_channels=1, resolution=8, mean=[0.5], std=[0.25]))
    monkeypatch.setattr(trials, "evaluate_in_process", fake_evaluate)
    reports = []
    monkeypatch.setattr(tune, "report", reports.append)
    recipe = load_recipe("digits")
    trial = TrialSettings(ipc=1, iterations=1, eval_epochs=10, eval_every=5, seeds=2)
    trials.run_trial({"recover.beta_max": 0.2}, recipe=recipe, base={}, trial=trial, data_dir="d",
                      teacher_dir="t", stats_dir="s")
    assert evaluated == [(2, [0, 1])]
    assert [(r["seed"], r["epoch"], r["top1"]) for r in reports] == [(0, 5, 40.0), (0, 10, 80.0), (1, 5, 50.0),
                                                                      (1, 10, 60.0)]
    assert [r["top1_mean"] for r in reports] == [40.0, 80.0, 45.0, 70.0]
    assert reports[-1]["top1_seeds"] == [80.0, 60.0]
    assert len(reports) == reports_per_trial(trial)


def test_trials_rank_by_the_mean_of_their_seeds(tmp_path):
    """Trial a's seeds end at 80 and 60 (mean 70), trial b's at 60 and 75 (mean 67.5): a ranks first, though
    b's last seed is better; the rows keep each seed's accuracy."""
    from types import SimpleNamespace

    import pandas as pd

    from unidd_ray.tune import rank_trials

    space = load_space(_space(tmp_path, GOOD.replace("eval_every: 5}", "eval_every: 5, seeds: 2}")))
    max_t = reports_per_trial(space.trial)

    def result(name, means, seeds):
        history = pd.DataFrame({"top1": [0.0] * len(means), "top1_mean": means})
        return SimpleNamespace(path=f"/x/{name}", error=None, config={"recover.beta_max": 0.1},
                               metrics={"top1": seeds[-1], "top1_mean": means[-1], "top1_seeds": seeds,
                                        "training_iteration": len(means)}, metrics_dataframe=history)

    rows, errors = rank_trials([result("b", [50.0, 60.0, 55.0, 67.5], [60.0, 75.0]),
                                result("a", [40.0, 80.0, 45.0, 70.0], [80.0, 60.0]),
                                result("stopped", [90.0, 90.0], [90.0])], space, max_t)
    assert errors == []
    assert [(r["trial"], r["top1"], r["seeds"]) for r in rows] == [("a", 70.0, [80.0, 60.0]),
                                                                   ("b", 67.5, [60.0, 75.0]),
                                                                   ("stopped", 90.0, [90.0])]
    assert rows[0]["curve"] == [40.0, 80.0, 45.0, 70.0] and not rows[0]["stopped_early"]
    assert rows[2]["stopped_early"]


# ----------------------------------------------------------------------------- a real sweep
SWEEP = """
    description: test sweep; the evaluation learning-rate grid makes one half of the trials clearly poor
    metric: top1
    mode: max
    base: {recover.method: cfm}
    space:
      recover.beta_max: {loguniform: [0.01, 1.0]}
      evaluate.lr: {grid: [0.01, 1.0e-7]}
    trial: {ipc: 2, classes: 5, iterations: 8, eval_epochs: 40, eval_every: 8, seeds: 1, cpus: 1}
    scheduler: {asha: {grace_period: 1, reduction_factor: 2}}
"""
SMALL = ["squeeze.epochs=4", "stats.actors=1", "evaluate.seeds=1", "evaluate.epochs=30", "recover.iterations=8"]


@pytest.mark.slow
def test_tune_sweep_asha_and_best_recipe(ray_session, tmp_path):
    from unidd_ray.pipeline import run_pipeline
    from unidd_ray.tune import run_tune

    space_file = tmp_path / "sweep.yaml"
    space_file.write_text(textwrap.dedent(SWEEP))
    run = tmp_path / "run"
    recipe = load_recipe("digits", overrides=SMALL + [f"out={run}"])
    ranking = run_tune(recipe, space_file, samples=2, concurrent=2)  # 2 samples x 2 grid values = 4 trials

    out = run / "tune-sweep"
    assert json.loads((out / "ranking.json").read_text()) == json.loads(json.dumps(ranking))
    rows = ranking["rows"]
    assert len(rows) == 4 and not ranking["errors"]
    assert ranking["max_evaluations"] == 5
    summary = [(r["overrides"]["evaluate.lr"], r["top1"], r["evaluations"]) for r in rows]
    stopped = [r for r in rows if r["stopped_early"]]
    assert stopped, f"ASHA stopped no trial: {summary}"
    assert all(r["evaluations"] < 5 for r in stopped)
    # the untrained students (lr 1e-7) are stopped at a rung once a trained one has recorded there; the
    # second one starts after a trained trial has passed every rung
    assert sum(r["stopped_early"] for r in rows if r["overrides"]["evaluate.lr"] == 1e-7) >= 1, summary
    assert all(len(r["curve"]) == r["evaluations"] for r in rows)
    best = ranking["best"]
    assert best == rows[0] and not best["stopped_early"] and best["evaluations"] == 5
    assert best["seeds"] == [best["top1"]]  # one seed: the mean is that seed's accuracy
    assert best["overrides"]["evaluate.lr"] == 0.01 and best["top1"] > 30, summary  # 5 classes: chance 20 %
    md = (out / "ranking.md").read_text()
    assert md.count("\n| ") == 1 + 4 and "stopped early" in md

    # the best configuration is a ready-to-use recipe
    best_file = out / "best_recipe.yaml"
    assert best_file.read_text().startswith("# best of 4 trials")
    tuned = load_recipe(config=best_file, overrides=[f"out={run}", "methods=[cfm]", "evaluate.epochs=20",
                                                     "recover.ipc=1"])
    assert tuned.name == "digits-tuned" and tuned.recover.method == "cfm"
    assert tuned.recover.beta_max == pytest.approx(best["overrides"]["recover.beta_max"])
    assert tuned.evaluate.lr == 0.01
    assert yaml.safe_load(best_file.read_text())["methods"] == ["random", "cfm"]
    results = run_pipeline(tuned, report=False)  # reuses the sweep's dataset, teacher and statistics
    row = next(r for r in results["rows"] if r["method"] == "cfm")
    assert row["ipc"] == 2 and row["top1_mean"] > 15, row  # ipcs comes from the recipe ([2]); 10 classes

    # resumable: restoring the finished experiment re-ranks it without re-running the trials
    again = run_tune(recipe, space_file, samples=2, concurrent=2, resume=True)
    assert sorted(r["trial"] for r in again["rows"]) == sorted(r["trial"] for r in rows)
