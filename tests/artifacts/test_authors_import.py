"""`unidd-ray import unidd`: the UniDD authors' checkpoint and statistics as this project's artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unidd_ray.artifacts.statistics import load_stats
from unidd_ray.artifacts.teacher import load_teacher
from unidd_ray.cli import main
from unidd_ray.spectral import Targets

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "unidd_authors"
CHECKPOINT = FIXTURES / "ckpt" / "CIFAR-10" / "ConvNetW128D3.pth"
STATS = FIXTURES / "statistic" / "CIFAR-10" / "input" / "ConvFeatureHook"


def run_import(out: Path, *, statistics: Path = FIXTURES / "statistic", checkpoint: Path = CHECKPOINT,
               model: str = "ConvNetW128D3", arch: str = "convnet") -> int:
    return main(["import", "unidd", "--statistics", str(statistics), "--model", model, "--checkpoint",
                 str(checkpoint), "--arch", arch, "--dataset", "cifar10", "--out", str(out)])


def test_import_writes_a_teacher_and_statistics_with_their_provenance(tmp_path):
    assert run_import(tmp_path / "imp") == 0
    teacher, tinfo = load_teacher(tmp_path / "imp" / "teacher")
    # the weights are theirs, under our names: layers.conv.i -> features.{4i}, layers.norm.i -> features.{4i+1}
    theirs = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    ours = teacher.state_dict()
    for i in range(3):
        assert torch.equal(ours[f"features.{4 * i}.weight"], theirs[f"layers.conv.{i}.weight"])
        assert torch.equal(ours[f"features.{4 * i + 1}.running_var"], theirs[f"layers.norm.{i}.running_var"])
    assert torch.equal(ours["classifier.weight"], theirs["classifier.weight"])
    assert (tinfo.arch, tinfo.options, tinfo.num_classes, tinfo.resolution) == (
        "convnet", {"width": 128, "depth": 3, "norm": "batch"}, 10, 32)
    assert tinfo.mean == [0.4914, 0.4822, 0.4465] and tinfo.std == [0.2023, 0.1994, 0.2010]
    assert tinfo.dataset_fingerprint == ""  # trained elsewhere, on data this project never prepared
    provenance = tinfo.extra["provenance"]
    assert provenance["checkpoint"]["sha256"]
    assert provenance["layers"]["features.4"] == "ConvNetW128D3.pth=layers.conv.1"
    # the statistics: their arrays, float64, under our layer names, refusing what they cannot serve
    real = load_stats(tmp_path / "imp" / "stats", teacher_sha256=tinfo.sha256, dataset_fingerprint="anything")
    assert list(real) == ["features.0", "features.4", "features.8"]
    with np.load(STATS / "ConvNetW128D3.pth=layers.conv.1" / "running.npz") as npz:
        cov, corr, mean = (npz[k].astype(np.float64) for k in ("running_cov", "running_corr", "running_mean"))
        class_mean = npz["running_class_mean"].astype(np.float64)
    t = real["features.4"]
    assert isinstance(t, Targets)
    np.testing.assert_array_equal(t.covariance("per_batch").numpy(), (cov + cov.T) / 2)
    np.testing.assert_allclose(t.covariance("total").numpy(), corr - np.outer(mean, mean), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(t.signal("class_share").numpy(), class_mean)
    np.testing.assert_array_equal(t.signal("mean").numpy()[:, 0], mean)
    assert t.serves() == {"covariance": ["total", "per_batch"], "signal": ["mean", "class_share", "mix_share"]}
    with pytest.raises(ValueError, match="cannot serve the 'within_class' covariance"):
        t.covariance("within_class")
    with pytest.raises(ValueError, match="cannot serve the 'class' signal"):
        t.signal("class")
    record = json.loads((tmp_path / "imp" / "import.json").read_text())
    assert record["source"] == "github bdy9527/UniDD" and len(record["statistics"]["files"]) == 3


def test_stats_inspect_reads_imported_statistics(tmp_path, capsys):
    assert run_import(tmp_path / "imp") == 0
    capsys.readouterr()
    assert main(["stats", "--inspect", str(tmp_path / "imp" / "stats")]) == 0
    out = capsys.readouterr().out
    assert "imported statistics" in out and "features.8" in out and "pb_eig_min" in out


def _tree_without(tmp_path: Path, layer: str | None = None, key: str | None = None) -> Path:
    root = tmp_path / "stats"
    shutil.copytree(STATS, root)
    if layer is not None:
        shutil.rmtree(root / f"ConvNetW128D3.pth={layer}")
    if key is not None:
        path = root / "ConvNetW128D3.pth=layers.conv.2" / "running.npz"
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files if k != key}
        np.savez(path, **arrays)
    return root


def test_a_missing_layer_is_refused_by_name_and_nothing_is_written(tmp_path, capsys):
    root = _tree_without(tmp_path, layer="layers.conv.1")
    assert run_import(tmp_path / "imp", statistics=root) == 2
    err = capsys.readouterr().err
    assert "features.4" in err and "ConvNetW128D3.pth=<layer>" in err
    assert not (tmp_path / "imp").exists()


def test_a_missing_key_is_refused_by_name(tmp_path, capsys):
    root = _tree_without(tmp_path, key="running_mix_mean")
    assert run_import(tmp_path / "imp", statistics=root) == 2
    err = capsys.readouterr().err
    assert "running_mix_mean" in err and "layers.conv.2" in err


def test_inconsistent_statistics_are_refused(tmp_path, capsys):
    root = _tree_without(tmp_path)
    path = root / "ConvNetW128D3.pth=layers.conv.2" / "running.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["running_cov"] = arrays["running_cov"][:64, :64]  # another layer's width
    np.savez(path, **arrays)
    assert run_import(tmp_path / "imp", statistics=root) == 2
    assert "inconsistent" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    assert run_import(tmp_path / "imp", model="ConvNetW64D3") == 2  # their name says width 64: the tensors disagree
    assert "needs (64, 3, 3, 3)" in capsys.readouterr().err
    assert run_import(tmp_path / "imp2", model="ResNet18", arch="convnet") == 2
    assert "not one of the authors' models" in capsys.readouterr().err


def test_import_never_writes_over_a_users_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run_import(out) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert run_import(tmp_path / "imp") == 0 and run_import(tmp_path / "imp") == 0  # its own output: replaced


def test_tampered_imported_statistics_are_refused(tmp_path):
    assert run_import(tmp_path / "imp") == 0
    path = tmp_path / "imp" / "stats" / "stats.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        load_stats(tmp_path / "imp" / "stats")
