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
