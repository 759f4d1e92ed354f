"""Recipe loading and ``--set`` overrides."""

import pytest

from unidd_ray.config import ConfigError, load_recipe


def test_overrides_reach_typed_fields():
    recipe = load_recipe("fashion-mnist", overrides=["recover.beta_min=1e-3", "recover.ipc=50",
                                                     "methods=[cfm, dm]", "evaluate.seeds=3"])
    assert recipe.recover.beta_min == 1e-3 and isinstance(recipe.recover.beta_min, float)
    assert recipe.recover.ipc == 50
    assert recipe.methods == ["cfm", "dm"]
    assert recipe.evaluate.seeds == 3


@pytest.mark.parametrize("override, message", [
    ("recover.beta_min=small", "recover.beta_min must be a number"),
    ("recover.ipc=2.5", "recover.ipc must be an integer"),
    ("recover.no_such_key=1", "no_such_key"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("fashion-mnist", overrides=[override])


def test_stage_keys_follow_what_changes_the_result():
    """A setting that changes the arithmetic moves the stage to another directory; a performance setting does
    not."""
    from unidd_ray.config import RecoverConfig, to_dict
    from unidd_ray.keys import stage_key

    settings = to_dict(RecoverConfig())
    for other in ("float32", "float64"):  # other arithmetic, another directory (mixed is the default)
        assert stage_key("recover", {**settings, "precision": other}, teacher="t") != \
            stage_key("recover", settings, teacher="t")
    assert stage_key("recover", {**settings, "cpus_per_worker": 7}, teacher="t") == \
        stage_key("recover", settings, teacher="t")
    assert RecoverConfig().precision == "mixed"


def test_cli_refuses_a_recipe_name_together_with_a_config_file(tmp_path, capsys):
    from unidd_ray.cli import main

    config = tmp_path / "mine.yaml"
    config.write_text("name: mine\nrecover: {ipc: 3}\n")
    assert main(["stats", "--recipe", "digits", "--config", str(config), "--inspect", str(tmp_path)]) == 2
    assert "either a recipe name or a config file, not both" in capsys.readouterr().err


def test_cli_refuses_a_source_option_without_a_value(tmp_path, capsys):
    from unidd_ray.cli import main

    assert main(["prepare", "--dataset", "digits", "--out", str(tmp_path / "d"), "--option", "val_fraction"]) == 2
    assert "--option 'val_fraction': write it as KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_stage_keys_follow_lossy_storage_only():
    """A JPEG copy's size cap and quality change its pixels, so they are part of every key made from it;
    raw storage adds nothing (its keys are the ones computed before this input existed)."""
    from types import SimpleNamespace

    from unidd_ray.keys import lossy_storage, stage_key

    raw = SimpleNamespace(storage="raw", max_resolution=256, jpeg_quality=90, write_mode="raw")
    assert lossy_storage(raw) == {}
    jpeg = SimpleNamespace(storage="jpeg", max_resolution=256, jpeg_quality=90, write_mode="proportion")
    keys = {stage_key("stats", {}, teacher="t", dataset="d", **lossy_storage(info))
            for info in (raw, jpeg, SimpleNamespace(**{**vars(jpeg), "jpeg_quality": 95}),
                         SimpleNamespace(**{**vars(jpeg), "max_resolution": 512}))}
    assert len(keys) == 4
    assert stage_key("stats", {}, teacher="t", dataset="d", **lossy_storage(raw)) == \
        stage_key("stats", {}, teacher="t", dataset="d")


@pytest.mark.parametrize("override, message", [
    ("methods=[random, cfm, dm, cfm]", r"methods lists \['cfm'\] more than once.*methods=\['random', 'cfm', 'dm'\]"),
    ("ipcs=[1, 10, 1]", r"ipcs lists \[1\] more than once"),
])
def test_repeated_methods_or_ipcs_are_refused(override, message):
    """A repeated entry names the same stage directories twice: refused when the recipe is read."""
    from unidd_ray.config import Recipe

    with pytest.raises(ConfigError, match=message):
        load_recipe("fashion-mnist", overrides=[override])
    with pytest.raises(ConfigError, match="more than once"):
        Recipe(methods=["dm", "dm"])
    assert load_recipe("fashion-mnist", overrides=["methods=[random, cfm, dm]", "ipcs=[1, 10]"]).ipcs == [1, 10]


# ----------------------------------------------------------------------------- evaluate --student
def _evaluate_args(*extra: str):
    from unidd_ray.cli import build_parser

    return build_parser().parse_args(["evaluate", "--recipe", "fashion-mnist", "--distilled", "d", "--teacher", "t",
                                      "--data", "x", *extra])


def test_evaluate_student_flag_starts_from_that_students_options():
    """The recipe's student_options are its ConvNet's (width, depth, norm); another --student starts from
    its own defaults, and takes options given with --set; the recipe's own student keeps its options."""
    from unidd_ray.cli import evaluate_recipe
    from unidd_ray.models import build_model

    recipe = load_recipe("fashion-mnist")
    assert recipe.evaluate.student == "convnet" and set(recipe.evaluate.student_options) == {"width", "depth", "norm"}
    other = evaluate_recipe(_evaluate_args("--student", "resnet18")).evaluate
    assert (other.student, other.student_options) == ("resnet18", {})
    build_model(other.student, num_classes=10, in_channels=1, resolution=28, **other.student_options)
    stem = evaluate_recipe(_evaluate_args("--student", "resnet18", "--set", "evaluate.student_options.stem=cifar"))
    assert stem.evaluate.student_options == {"stem": "cifar"}
    whole = evaluate_recipe(_evaluate_args("--student", "resnet18", "--set", "evaluate.student_options={stem: imagenet}",
                                           "--set", "evaluate.epochs=7"))
    assert whole.evaluate.student_options == {"stem": "imagenet"} and whole.evaluate.epochs == 7
    same = evaluate_recipe(_evaluate_args("--student", "convnet", "--seeds", "2")).evaluate
    assert same.student_options == recipe.evaluate.student_options and same.seeds == 2


def test_evaluate_refuses_a_bad_student_before_ray_starts(tmp_path, monkeypatch, capsys):
    import torch

    from unidd_ray import cli
    from unidd_ray.artifacts.teacher import TeacherInfo, save_teacher

    torch.set_num_threads(1)
    tinfo = TeacherInfo(arch="convnet", options={"width": 8, "depth": 1}, num_classes=10, in_channels=1,
                        resolution=28, dataset="fashion-mnist", dataset_fingerprint="f" * 64, mean=[0.5], std=[0.25])
    save_teacher(tinfo.build(), tinfo, tmp_path / "teacher")

    def no_ray(*args):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "start_ray", no_ray)
    common = ["evaluate", "--recipe", "fashion-mnist", "--distilled", str(tmp_path / "set"), "--teacher",
              str(tmp_path / "teacher"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "eval")]
    assert cli.main([*common, "--student", "resnet18", "--set", "evaluate.student_options={width: 64}"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.student_options do not suit 'resnet18'" in err and "takes options ['stem'], not ['width']" in err
    assert cli.main([*common, "--student", "vgg11"]) == 2
    assert "evaluate.student must be one of" in capsys.readouterr().err
    assert cli.main([*common, "--set", "evaluate.batch_size=0"]) == 2
    assert "evaluate.batch_size must be an integer >= 1 (or null), got 0" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------- recover_by_ipc
def test_recover_by_ipc_sets_one_ipcs_settings_over_the_recover_section():
    recipe = load_recipe("fashion-mnist", overrides=["recover.lr=0.05", "recover_by_ipc={1: {lr: 0.1, alpha: 0.3}}"])
    one, ten = recipe.recover_for(1), recipe.recover_for(10, method="dm")
    assert (one.ipc, one.lr, one.alpha, one.method) == (1, 0.1, 0.3, "cfm")
    assert (ten.ipc, ten.lr, ten.alpha, ten.method) == (10, 0.05, recipe.recover.alpha, "dm")
    assert recipe.recover.lr == 0.05  # the section itself is not changed
    assert recipe.recover_for(1, lr=0.2).lr == 0.2  # an explicit override wins over the entry


def test_a_set_recover_key_holds_at_every_ipc_unless_an_ipc_is_set_after_it():
    """``--set recover.lr=...`` means that lr everywhere, also for an IPC the recipe gives its own; a later
    ``--set recover_by_ipc.1.lr=...`` sets IPC 1's again."""
    assert load_recipe("fashion-mnist").recover_by_ipc == {1: {"lr": 0.1, "iterations": 2000}}  # the recipe's entry
    recipe = load_recipe("fashion-mnist", overrides=["recover.lr=0.0125"])
    assert [recipe.recover_for(ipc).lr for ipc in (1, 10)] == [0.0125, 0.0125]
    assert recipe.recover_by_ipc == {1: {"iterations": 2000}}
    both = load_recipe("fashion-mnist", overrides=["recover.lr=0.0125", "recover.iterations=500"])
    assert both.recover_by_ipc == {} and both.recover_for(1).iterations == 500  # the emptied entry goes
    later = load_recipe("fashion-mnist", overrides=["recover.lr=0.0125", "recover_by_ipc.1.lr=0.2"])
    assert [later.recover_for(ipc).lr for ipc in (1, 10)] == [0.2, 0.0125]
    other = load_recipe("fashion-mnist", overrides=["recover.alpha=0.3"])  # another key leaves the entry alone
    assert (other.recover_for(1).lr, other.recover_for(1).alpha, other.recover_for(10).lr) == (0.1, 0.3, 0.05)


def test_a_dotted_override_reaches_an_ipc_entry_of_a_recipe_file(tmp_path):
    """``--set recover_by_ipc.1.lr=...`` names the entry ``1:`` of a YAML file (an integer key), not a second one."""
    config = tmp_path / "mine.yaml"
    config.write_text("recover: {lr: 0.05}\nrecover_by_ipc:\n  1: {lr: 0.1}\n")
    recipe = load_recipe(config=config, overrides=["recover_by_ipc.1.lr=0.2", "recover_by_ipc.50.iterations=250",
                                                   "recover_by_ipc.50.lr=1e-2"])
    assert recipe.recover_by_ipc == {1: {"lr": 0.2}, 50: {"iterations": 250, "lr": 0.01}}
    assert isinstance(recipe.recover_by_ipc[50]["lr"], float)  # type-checked like the section's own keys
    assert load_recipe(config=config, overrides=["recover_by_ipc={}"]).recover_for(1).lr == 0.05


@pytest.mark.parametrize("value, message", [
    ("{one: {lr: 0.1}}", r"recover_by_ipc: 'one' is not an IPC \(a positive integer\)"),
    ("{0: {lr: 0.1}}", r"recover_by_ipc: 0 is not an IPC"),
    ("{1: 0.1}", r"recover_by_ipc.1 must be a mapping of recover keys"),
    ("{1: {lrr: 0.1}}", r"unknown config key\(s\) \['recover_by_ipc.1.lrr'\]"),
    ("{1: {lr: fast}}", r"recover_by_ipc.1.lr must be a number"),
    ("{1: {method: dm}}", r"recover_by_ipc.1 cannot set \['method'\]"),
    ("{1: {ipc: 2}}", r"recover_by_ipc.1 cannot set \['ipc'\]"),
    ("{1: {lr: 0.1}, '1': {alpha: 0.3}}", "recover_by_ipc gives IPC 1 twice"),
])
def test_bad_recover_by_ipc_entries_are_refused_when_the_recipe_is_read(value, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("fashion-mnist", overrides=[f"recover_by_ipc={value}"])


def test_recover_command_reads_the_ipcs_entry(tmp_path, monkeypatch):
    """``unidd-ray recover --ipc 1`` recovers with the recipe's IPC-1 settings and writes them as the set's
    config.yaml; ``--ipc 10`` keeps the section's."""
    import json

    import yaml

    from unidd_ray import cli
    from unidd_ray.stages import recover

    calls = []

    def run_recover(data, teacher, stats, out, cfg, **kwargs):
        calls.append((cfg, yaml.safe_load(kwargs["recipe_yaml"])))
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"per_slot": {"0": {"loss": 1.0}}, "images": 10,
                                                      "method": cfg.method, "ipc": cfg.ipc, "seconds": 0.0}))

    monkeypatch.setattr(recover, "run_recover", run_recover)
    monkeypatch.setattr(recover, "validate_inputs", lambda *args: None)
    monkeypatch.setattr(cli, "start_ray", lambda *args: None)
    for ipc in (1, 10):
        assert cli.main(["recover", "--recipe", "fashion-mnist", "--data", "d", "--teacher", "t", "--stats", "s",
                         "--ipc", str(ipc), "--method", "krr", "--out", str(tmp_path / f"ipc{ipc}")]) == 0
    assert [(c.ipc, c.method, c.lr) for c, _ in calls] == [(1, "krr", 0.1), (10, "krr", 0.05)]
    assert [written["recover"]["lr"] for _, written in calls] == [0.1, 0.05]


def test_a_recover_section_in_its_former_names_reads_as_today():
    """A run's stored config.yaml from before ``batch_classes`` and ``distribution``: ``classes_per_batch`` is
    ``batch_classes``, ``sync: round`` (each worker its own batch) is ``distribution: independent``; an old name
    given beside its new one is refused."""
    import yaml

    from unidd_ray.config import RecoverConfig, from_dict, recipe_to_yaml

    old = from_dict(RecoverConfig, {"classes_per_batch": 5, "sync": "round", "workers": 2}, "recover")
    assert (old.batch_classes, old.distribution) == (5, "independent")
    assert from_dict(RecoverConfig, {"sync": "step"}).distribution == "exact"
    with pytest.raises(ConfigError, match=r"^recover.sync is the former name of recover.distribution; give only "):
        from_dict(RecoverConfig, {"sync": "round", "distribution": "exact"}, "recover")
    recipe = load_recipe(overrides=["recover.classes_per_batch=3"])
    assert recipe.recover.batch_classes == 3
    assert "classes_per_batch" not in yaml.safe_load(recipe_to_yaml(recipe))["recover"]  # written in today's names
