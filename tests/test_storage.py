"""Where stages keep their Ray Train checkpoints."""

from __future__ import annotations

import pytest

from unidd_ray.artifacts import stage_storage


def test_default_is_beside_the_output(tmp_path):
    assert stage_storage(tmp_path / "syn") == tmp_path / ".syn.ray"


def test_shared_storage_gives_each_output_its_own_directory(tmp_path):
    shared = tmp_path / "shared"
    a = stage_storage(tmp_path / "a" / "out", str(shared))
    b = stage_storage(tmp_path / "b" / "out", str(shared))
    assert a.parent == b.parent == shared and a != b
    assert stage_storage(tmp_path / "a" / "out", str(shared)) == a  # stable across calls (resume)


def test_uri_storage_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="mount"):
        stage_storage(tmp_path / "x", "s3://bucket/prefix")
