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
