"""The pipeline's prepare stage finds a source changed in place: the stat signature of the source's files
(``source_stat``) decides whether the source is read again, its fingerprint whether it is prepared again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import unidd_ray.pipeline
from unidd_ray.config import DataConfig, Recipe
from unidd_ray.artifacts.dataset import SOURCE_STAT_FILE
from unidd_ray.data.hashing import source_stat
from unidd_ray.keys import data_key
from unidd_ray.pipeline import prepare_stage


def _write_npz(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    np.savez(path, x=x, y=y, x_val=x[::5], y_val=y[::5])


class _Reads:
    """Counts the pipeline's reads of the source."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = unidd_ray.pipeline.load_source

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(unidd_ray.pipeline, "load_source", counted)


@pytest.fixture()
def npz_recipe(tmp_path):
    source = tmp_path / "src" / "images.npz"
    source.parent.mkdir()
    _write_npz(source, seed=0)
    return Recipe(data=DataConfig(dataset="npz", root=str(source))), source


def _touch_later(path: Path) -> None:
    """Move the file's modification time on by a second (same bytes)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_source_stat_follows_paths_sizes_and_times(tmp_path):
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.bin").write_bytes(b"123")
    first = source_stat(root)
    assert first == source_stat(root) and len(first) == 64
    _touch_later(root / "a" / "x.bin")
    touched = source_stat(root)
    assert touched != first
    (root / "a" / "y.bin").write_bytes(b"")
    assert source_stat(root) != touched
    assert source_stat(root / "a" / "x.bin") is not None  # a file origin
    assert source_stat(tmp_path / "nowhere") is None
    assert source_stat("sklearn.datasets.load_digits") is None and source_stat("") is None


def test_an_unchanged_source_is_not_read_again(tmp_path, npz_recipe, monkeypatch):
    recipe, source = npz_recipe
    reads = _Reads(monkeypatch)
    first, info = prepare_stage(recipe, tmp_path / "run")
    assert first == tmp_path / "run" / f"data-{data_key(recipe)}" and reads.count == 1
    record = json.loads((first / SOURCE_STAT_FILE).read_text())
    assert record == {"origin": str(source), "stat": source_stat(source)}
    again, info2 = prepare_stage(recipe, tmp_path / "run")
    assert again == first and info2.fingerprint == info.fingerprint and reads.count == 1


def test_a_touched_source_is_read_again_and_reused(tmp_path, npz_recipe, monkeypatch):
    recipe, source = npz_recipe
    first, info = prepare_stage(recipe, tmp_path / "run")
    reads = _Reads(monkeypatch)
    _touch_later(source)
    again, info2 = prepare_stage(recipe, tmp_path / "run")
    assert again == first and info2.fingerprint == info.fingerprint and reads.count == 1  # fingerprinted once
    assert json.loads((first / SOURCE_STAT_FILE).read_text())["stat"] == source_stat(source)
    prepare_stage(recipe, tmp_path / "run")
    assert reads.count == 1  # the refreshed record spares the next run the read
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [first.name]


def test_a_source_changed_in_place_is_prepared_again_beside_the_old_one(tmp_path, npz_recipe):
    recipe, source = npz_recipe
    run = tmp_path / "run"
    first, info = prepare_stage(recipe, run)
    old_files = {p.name: p.read_bytes() for p in first.iterdir()}
    _write_npz(source, seed=1)
    _touch_later(source)  # a rewrite within the file system's time resolution would keep the time
    changed, new_info = prepare_stage(recipe, run)
    assert new_info.fingerprint != info.fingerprint
    assert changed == run / f"data-{data_key(recipe)}-{new_info.source['fingerprint'][:12]}"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == old_files  # the old data, for its stages
    assert json.loads((changed / SOURCE_STAT_FILE).read_text())["stat"] == source_stat(source)
    assert prepare_stage(recipe, run)[0] == changed  # found again by its record
    _write_npz(source, seed=0)  # back to the first bytes: the first directory, after one read
    _touch_later(source)
    assert prepare_stage(recipe, run)[0] == first


def test_a_directory_from_before_the_record_is_checked_once(tmp_path, npz_recipe, monkeypatch):
    """A complete directory without ``source-stat.json`` (its record lost, or prepared by ``unidd-ray prepare``
    and moved into the run) is reused when the source's fingerprint matches, and gets the record."""
    recipe, source = npz_recipe
    first, info = prepare_stage(recipe, tmp_path / "made")
    unrecorded = tmp_path / "run" / f"data-{data_key(recipe)}"
    shutil.copytree(first, unrecorded)
    (unrecorded / SOURCE_STAT_FILE).unlink()
    reads = _Reads(monkeypatch)
    assert prepare_stage(recipe, tmp_path / "run")[0] == unrecorded and reads.count == 1
    assert (unrecorded / SOURCE_STAT_FILE).is_file()
    assert prepare_stage(recipe, tmp_path / "run")[0] == unrecorded and reads.count == 1


def test_preparing_over_a_directory_drops_its_stale_record(tmp_path, npz_recipe):
    from unidd_ray.data.prepare import prepare_dataset
    from unidd_ray.data.sources import load_source

    recipe, source = npz_recipe
    data_dir, _ = prepare_stage(recipe, tmp_path / "run")
    _write_npz(source, seed=2)
    prepare_dataset(load_source("npz", str(source)), data_dir, progress=False)
    assert not (data_dir / SOURCE_STAT_FILE).exists()
