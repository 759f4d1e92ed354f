"""A prepared dataset is verified before a stage reads it: its files against their checksums (in pieces, the
damaged bytes named), ``dataset.json`` against its own checksum, and the teacher against the dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from unidd_ray.artifacts.dataset import (DamagedDataset, file_record, read_dataset_info, verify_dataset,
                                         verify_file)


@pytest.fixture
def data(tmp_path, digits_data) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(digits_data, copy)
    return copy


def _flip(path: Path, offset: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def test_prepare_records_every_piece_of_every_file(data):
    info = read_dataset_info(data)
    for name, record in info.files.items():
        assert record == file_record(data / name), name
        assert len(record["chunks"]) == -(-record["bytes"] // record["chunk_bytes"])
    assert verify_dataset(data) == info


@pytest.mark.parametrize("where, offset", [("data region", 1 << 16), ("header", 8)])
def test_stats_refuses_a_beton_with_flipped_bytes_naming_file_and_fix(data, digits_teacher, tmp_path, where, offset,
                                                                     no_ray, capsys):
    from unidd_ray.cli import main

    _flip(data / "train.beton", offset)
    assert main(["stats", "--recipe", "digits", "--data", str(data), "--teacher", str(digits_teacher), "--out",
                 str(tmp_path / "stats")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{data / 'train.beton'} does not match the sha256 recorded in dataset.json: bytes 0-" in err[0]
    assert "prepare it again: `unidd-ray prepare --dataset digits --option val_fraction=0.2 --option seed=0 " \
           f"--out {data}`" in err[0]
    assert not (tmp_path / "stats").exists()


def test_every_stage_verifies_the_data_before_reading_it(data, digits_teacher, digits_stats, tmp_path):
    from unidd_ray.config import DataConfig, EvaluateConfig, ModelConfig, RecoverConfig, SqueezeConfig, StatsConfig
    from unidd_ray.stages.evaluate import EvalJob, check_evaluations
    from unidd_ray.stages.subset import write_real_subset
    from unidd_ray.stages.recover import validate_inputs
    from unidd_ray.stages.squeeze import check_squeeze
    from unidd_ray.stages.stats import check_stats

    _flip(data / "val.beton", 4096)
    damaged = r"val.beton does not match the sha256 recorded in dataset.json"
    with pytest.raises(DamagedDataset, match=damaged):
        check_squeeze(data, tmp_path / "t", squeeze_cfg=SqueezeConfig(batch_size=64), data_cfg=DataConfig("digits"),
                      model_cfg=ModelConfig(options={"width": 8, "depth": 1}))
    with pytest.raises(DamagedDataset, match=damaged):
        check_stats(data, digits_teacher, tmp_path / "s", StatsConfig(batch_size=128, block_size=256))
    with pytest.raises(DamagedDataset, match=damaged):
        validate_inputs(data, digits_teacher, digits_stats, RecoverConfig(ipc=1))
    with pytest.raises(DamagedDataset, match=damaged):
        check_evaluations([EvalJob(tmp_path / "set", tmp_path / "e", EvaluateConfig())], digits_teacher, data)
    with pytest.raises(DamagedDataset, match=damaged):
        write_real_subset(data, tmp_path / "r", ipc=1, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_damaged_bytes_are_located_to_their_piece(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB: four pieces of 4 KiB
    record = file_record(path, chunk_bytes=4096)
    verify_file(path, record)
    _flip(path, 9000, 4)
    with pytest.raises(DamagedDataset, match=r"file.bin does not match .*: bytes 8192-12287 were modified"):
        verify_file(path, record)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DamagedDataset, match="has 100 bytes but dataset.json records 16384"):
        verify_file(path, record)


def test_a_file_is_read_once_per_process_while_untouched(tmp_path, monkeypatch):
    from unidd_ray.artifacts import dataset as dataset_info

    path = tmp_path / "file.bin"
    path.write_bytes(b"x" * 10000)
    record = file_record(path, chunk_bytes=4096)
    reads = []
    real = dataset_info._piece_sha256
    monkeypatch.setattr(dataset_info, "_piece_sha256", lambda *a: reads.append(a) or real(*a))
    verify_file(path, record)
    verify_file(path, record)
    assert len(reads) == 3  # three pieces, read the first time only
    _flip(path, 5000, 1)  # a write changes the file's times: it is read again, and refused
    with pytest.raises(DamagedDataset):
        verify_file(path, record)


def test_a_dataset_prepared_before_the_pieces_is_checked_whole(data):
    info = json.loads((data / "dataset.json").read_text())
    for record in info["files"].values():
        del record["chunk_bytes"], record["chunks"]
    del info["info_sha256"]
    (data / "dataset.json").write_text(json.dumps(info))
    verify_dataset(data)
    _flip(data / "labels.npz", 200)
    with pytest.raises(DamagedDataset, match="labels.npz does not match its sha256"):
        verify_dataset(data)


@pytest.mark.parametrize("key, value", [("mean", [0.9]), ("num_classes", 11), ("class_names", ["a"] * 10)])
def test_an_edited_dataset_json_is_refused(data, key, value):
    info = json.loads((data / "dataset.json").read_text())
    info[key] = value
    (data / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DamagedDataset, match="dataset.json was edited after it was written"):
        read_dataset_info(data)


def test_the_teacher_must_agree_with_the_dataset(data, digits_teacher, tmp_path):
    """A dataset.json edited together with its checksum (or one from before the checksum) still has to agree
    with what the teacher recorded of it: its classes and channels (the normalisation is the teacher's own, so
    another mean in dataset.json is no disagreement)."""
    from unidd_ray.artifacts.files import ArtifactError
    from unidd_ray.artifacts.dataset import content_sha256
    from unidd_ray.stages.stats import check_stats
    from unidd_ray.config import StatsConfig

    info = json.loads((data / "dataset.json").read_text())
    info["mean"] = [info["mean"][0] + 0.01]
    info["info_sha256"] = content_sha256(info)
    (data / "dataset.json").write_text(json.dumps(info))
    check_stats(data, digits_teacher, tmp_path / "s", StatsConfig(batch_size=128, block_size=256))
    info["channels"] = 3
    info["info_sha256"] = content_sha256(info)
    (data / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match=r"teacher.json and .*dataset.json disagree \(channels 1 \(teacher\) vs 3"):
        check_stats(data, digits_teacher, tmp_path / "s", StatsConfig(batch_size=128, block_size=256))


def test_an_edited_teacher_json_is_refused(digits_teacher, tmp_path):
    from unidd_ray.artifacts.files import ArtifactError
    from unidd_ray.artifacts.teacher import read_teacher_info

    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher, teacher)
    info = json.loads((teacher / "teacher.json").read_text())
    info["std"] = [1.0]
    (teacher / "teacher.json").write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="teacher.json was edited after it was written"):
        read_teacher_info(teacher)


def test_unloadable_weights_with_their_recorded_checksum_are_named(digits_teacher, tmp_path):
    """A teacher.pt that is not a state dict of the recorded model (its checksum recorded with it) is refused
    with the file named, not a traceback from torch."""
    from unidd_ray.artifacts.files import ArtifactError, sha256_file
    from unidd_ray.artifacts.dataset import content_sha256
    from unidd_ray.artifacts.teacher import load_teacher

    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher, teacher)
    (teacher / "teacher.pt").write_bytes(b"not a torch file")
    info = json.loads((teacher / "teacher.json").read_text())
    info["sha256"] = sha256_file(teacher / "teacher.pt")
    del info["info_sha256"]
    info["info_sha256"] = content_sha256(info)
    (teacher / "teacher.json").write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match=r"teacher.pt cannot be loaded as the weights of a convnet"):
        load_teacher(teacher)
