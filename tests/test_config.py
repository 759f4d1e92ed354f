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


def test_stage_keys_ignore_a_new_setting_at_its_neutral_default():
    """Adding a setting must not orphan stage directories made before it existed."""
    from unidd_ray.config import RecoverConfig, to_dict
    from unidd_ray.pipeline import NEUTRAL_DEFAULTS, stage_key

    settings = {**to_dict(RecoverConfig()), **NEUTRAL_DEFAULTS["recover"]}  # what the code computed before
    old = {k: v for k, v in settings.items() if k not in NEUTRAL_DEFAULTS["recover"]}
    assert stage_key("recover", settings, teacher="t") == stage_key("recover", old, teacher="t")
    for other in ("float32", "mixed"):  # other arithmetic, another directory (mixed is today's default)
        assert stage_key("recover", {**settings, "precision": other}, teacher="t") != \
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

    from unidd_ray.pipeline import lossy_storage, stage_key

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
    from unidd_ray.teacher import TeacherInfo, save_teacher

    torch.set_num_threads(1)
    tinfo = TeacherInfo(arch="convnet", options={"width": 8, "depth": 1}, num_classes=10, in_channels=1,
                        resolution=28, dataset="fashion-mnist", dataset_fingerprint="f" * 64, mean=[0.5], std=[0.25])
    save_teacher(tinfo.build(), tinfo, tmp_path / "teacher")

    def no_ray(args, recipe):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cli, "_ray", no_ray)
    common = ["evaluate", "--recipe", "fashion-mnist", "--distilled", str(tmp_path / "set"), "--teacher",
              str(tmp_path / "teacher"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "eval")]
    assert cli.main([*common, "--student", "resnet18", "--set", "evaluate.student_options={width: 64}"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.student 'resnet18'" in err and "takes options ['stem'], not ['width']" in err
    assert cli.main([*common, "--student", "vgg11"]) == 2
    assert "unknown model 'vgg11'" in capsys.readouterr().err
    assert cli.main([*common, "--set", "evaluate.batch_size=0"]) == 2
    assert "evaluate.batch_size must be at least 1, or null" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
