"""The paper recipes hold the values docs/AUTHORS.md gives for them (the authors' settings, file by line)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from unidd_ray.config import Recipe, load_recipe

DOC = Path(__file__).resolve().parents[2] / "docs" / "AUTHORS.md"
RECIPES = ["cifar10", "cifar100", "tiny-imagenet", "imagenet1k"]


def table_rows() -> list[tuple[str, dict[str, str], str]]:
    """(setting, {recipe: cell}, default cell) for every row whose first cell is a setting in backticks."""
    lines = DOC.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| setting |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == len(columns):
            values = dict(zip(columns, cells))
            rows.append((cells[0].strip("`"), {r: values[r] for r in RECIPES}, values["our default"]))
    return rows


def resolved(recipe: Recipe, setting: str):
    section, *path = setting.split(".")
    value = recipe.recover_for(recipe.recover.ipc) if section == "recover" else getattr(recipe, section)
    for key in path:
        value = value[key] if isinstance(value, dict) else getattr(value, key)
    return value


def literal(cell: str):
    return yaml.safe_load(cell.split(" (")[0])


def normalise(value):
    return list(value) if isinstance(value, tuple) else value


ROWS = table_rows()


def test_the_table_covers_the_settings_the_issue_names():
    names = {setting for setting, _, _ in ROWS}
    assert {"teacher.normalization", "recover.batch_classes", "recover.lr", "recover.iterations", "recover.roll",
            "recover.max_roll", "recover.beta_max", "recover.alpha", "recover.emu", "recover.covariance",
            "recover.signal", "teacher.options.stem"} <= names


@pytest.mark.parametrize("name", RECIPES)
def test_each_paper_recipe_matches_the_table(name):
    recipe = load_recipe(name)
    for setting, cells, _ in ROWS:
        assert normalise(resolved(recipe, setting)) == literal(cells[name]), (name, setting)


def test_the_defaults_column_is_the_library_default():
    recipe = Recipe()
    for setting, _, default in ROWS:
        section, *path = setting.split(".")
        if (section, path[0]) in (("teacher", "options"), ("evaluate", "student_options")):
            continue  # the options of the default architecture are its own
        value = resolved(dataclasses.replace(recipe), setting)
        assert normalise(value) == literal(default), setting
