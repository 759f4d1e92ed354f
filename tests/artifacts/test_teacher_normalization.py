"""The input normalisation belongs to the teacher: ``teacher.normalization`` is resolved by squeeze, recorded in
``teacher.json`` and used by every stage after it instead of the prepared dataset's own mean and std; and
``check_teacher_data`` accepts teachers with other constants and imported teachers (no dataset fingerprint)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch


def _raw_images(data_dir, split: str, indices=None) -> np.ndarray:
    """The stored pixels in [0, 1] (float64), in the order of ``indices`` (default: every row)."""
    from unidd_ray.data.loading import make_loader

    rows = {}
    for x, _, index in make_loader(str(data_dir), split, batch_size=256, num_workers=1, indices=indices,
                                   normalize=False):
        rows.update(zip(index.tolist(), x.numpy().astype(np.float64)))
    order = sorted(rows) if indices is None else list(indices)
    return np.stack([rows[i] for i in order])


def _normalised(raw: np.ndarray, mean, std) -> np.ndarray:
    return (raw - np.asarray(mean, dtype=np.float64)[:, None, None]) / np.asarray(std, dtype=np.float64)[:, None, None]


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory) -> Path:
    """A tiny 3-channel dataset of dark images (its own mean, about 0.15, is far from any named constants):
    240 train / 60 val, 8 px, 4 classes, each class brighter in another corner."""
    from unidd_ray.data.prepare import prepare_dataset
    from unidd_ray.data.sources import load_source

    rng = np.random.default_rng(0)

    def images(n):
        y = np.arange(n) % 4
        x = rng.integers(0, 40, (n, 8, 8, 3))
        for k in range(4):
            r, c = divmod(k, 2)
            x[y == k, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 40
        return x.astype(np.uint8), y

    root = tmp_path_factory.mktemp("rgb")
    x, y = images(240)
    x_val, y_val = images(60)
    np.savez(root / "rgb.npz", x=x, y=y, x_val=x_val, y_val=y_val)
    out = root / "data"
    prepare_dataset(load_source("npz", root / "rgb.npz"), out)
    return out


def _teacher(data_dir, out: Path, *, mean=None, std=None, **changes) -> Path:
    """A seeded, untrained ConvNet teacher of ``data_dir`` with the given normalisation (default: the card's)."""
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.teacher import TeacherInfo, save_teacher

    info = read_dataset_info(data_dir)
    tinfo = TeacherInfo(arch="convnet", options={"width": 8, "depth": 2, "norm": "batch"},
                        num_classes=info.num_classes, in_channels=info.channels, resolution=info.resolution,
                        dataset=info.name, dataset_fingerprint=info.fingerprint,
                        mean=list(info.mean) if mean is None else list(mean),
                        std=list(info.std) if std is None else list(std))
    tinfo = dataclasses.replace(tinfo, **changes)
    torch.manual_seed(0)
    save_teacher(tinfo.build().eval(), tinfo, out)
    return out


# ----------------------------------------------------------------------------- the setting
def test_the_named_normalisations_resolve_against_the_data(rgb_data, digits_data):
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.data.normalization import CONSTANTS, NAMES, resolve_normalization

    rgb, digits = read_dataset_info(rgb_data), read_dataset_info(digits_data)
    assert NAMES[0] == "dataset" and set(NAMES[1:]) == {"cifar10", "cifar100", "tiny-imagenet", "imagenet", "model"}
    assert resolve_normalization("dataset", rgb) == (list(rgb.mean), list(rgb.std))
    assert resolve_normalization("dataset", digits) == (list(digits.mean), list(digits.std))
    for name, (mean, std) in CONSTANTS.items():
        assert resolve_normalization(name, rgb) == (list(mean), list(std))
        with pytest.raises(ValueError, match=r"gives 3 channel\(s\) but the images of 'digits' have 1"):
            resolve_normalization(name, digits)
    assert resolve_normalization({"mean": [0.25], "std": [0.5]}, digits) == ([0.25], [0.5])


@pytest.mark.parametrize("value, message", [
    ("cifar", r"teacher.normalization must be one of \['dataset', 'cifar10', .*\] or \{mean: \[...\], std: "
              r"\[...\]\}, got 'cifar'"),
    ({"mean": [0.5, 0.5], "std": [0.2]}, r"teacher.normalization must give mean and std as lists .* one per channel"),
    ({"mean": [0.5], "std": [0.0]}, r"teacher.normalization must give .* every std > 0"),
    ({"mean": [0.5]}, r"teacher.normalization must be .* a mapping with exactly the keys mean and std"),
])
def test_a_bad_normalization_is_refused_when_the_recipe_is_read(value, message):
    from unidd_ray.config import ConfigError, Recipe, from_dict

    with pytest.raises(ConfigError, match=message) as caught:
        from_dict(Recipe, {"teacher": {"normalization": value}})
    assert "\n" not in str(caught.value)
    assert from_dict(Recipe, {"teacher": {"normalization": "imagenet"}}).teacher.normalization == "imagenet"


def test_squeeze_refuses_a_normalization_of_other_channels_before_training(digits_data, tmp_path, no_training):
    from unidd_ray.config import DataConfig, ModelConfig, SqueezeConfig
    from unidd_ray.stages.squeeze import check_squeeze

    model = ModelConfig(arch="convnet", options={"width": 8, "depth": 2}, normalization="cifar10")
    with pytest.raises(ValueError, match=r"teacher.normalization 'cifar10' gives 3 channel\(s\) but the images of "
                                         r"'digits' have 1; choose a normalisation with 1 channel"):
        check_squeeze(digits_data, tmp_path / "t", squeeze_cfg=SqueezeConfig(batch_size=64), model_cfg=model,
                      data_cfg=DataConfig(dataset="digits"))


# ----------------------------------------------------------------------------- squeeze
def test_a_teacher_trained_with_cifar10_records_and_uses_its_constants(ray_session, rgb_data, tmp_path):
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.teacher import load_teacher
    from unidd_ray.config import DataConfig, ModelConfig, SqueezeConfig
    from unidd_ray.core.evaluation import top1_on_split
    from unidd_ray.data.normalization import CONSTANTS
    from unidd_ray.stages.squeeze import squeeze

    info = read_dataset_info(rgb_data)
    mean, std = (list(v) for v in CONSTANTS["cifar10"])
    assert max(abs(a - b) for a, b in zip(info.mean, mean)) > 0.2  # the card's constants are other ones
    model_cfg = ModelConfig(arch="convnet", options={"width": 8, "depth": 2, "norm": "batch"},
                            normalization="cifar10")
    squeeze(rgb_data, tmp_path / "teacher", squeeze_cfg=SqueezeConfig(epochs=2, batch_size=32, workers=1,
                                                                      cpus_per_worker=1),
            model_cfg=model_cfg, data_cfg=DataConfig(dataset="npz"), storage_path=tmp_path / "ray", progress=False)
    model, tinfo = load_teacher(tmp_path / "teacher")
    assert (tinfo.mean, tinfo.std) == (mean, std)
    # the val top-1 squeeze recorded is the teacher's on val images normalised with cifar10's constants
    correct, total = top1_on_split(model, str(rgb_data), batch_size=64, num_workers=1, device="cpu",
                                   normalize=(mean, std))
    assert total == 60 and abs(tinfo.val_top1 - 100 * correct / total) <= 100 / total


# ----------------------------------------------------------------------------- the stages after it
def test_stats_normalise_with_the_teachers_constants_not_the_cards(rgb_data, tmp_path):
    """The first tapped layer's input is the image itself: its mean and covariance are those of
    (x - mean) / std with the teacher's constants."""
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.data.normalization import CONSTANTS
    from unidd_ray.spectral.moments import Moments
    from unidd_ray.stages.stats import StatsWorker

    mean, std = CONSTANTS["imagenet"]
    teacher = _teacher(rgb_data, tmp_path / "teacher", mean=mean, std=std)
    worker = StatsWorker(str(teacher), str(rgb_data), None, batch_size=64, block_size=128)
    first = worker.layers[0]
    moments = Moments.from_state_dict(worker.compute([(0, 0, 128)])[0][first])
    x = _normalised(_raw_images(rgb_data, "train", np.arange(128)), mean, std)
    x = x.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(moments.mean.numpy(), x.mean(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(moments.covariance("total").numpy(), np.cov(x, bias=True), rtol=1e-5, atol=1e-6)
    card = read_dataset_info(rgb_data)
    assert not np.allclose(moments.mean.numpy(), _normalised(_raw_images(rgb_data, "train", np.arange(128)),
                                                             card.mean, card.std).mean((0, 2, 3)), atol=0.1)


def test_the_recovery_reads_clamps_and_writes_with_the_teachers_constants(rgb_data, tmp_path):
    from unidd_ray.config import RecoverConfig
    from unidd_ray.core.plan import make_plan
    from unidd_ray.core.recovery import InitImages, build_distiller, image_bytes
    from unidd_ray.artifacts.dataset import read_labels
    from unidd_ray.data.normalization import CONSTANTS

    mean, std = CONSTANTS["cifar10"]
    teacher = _teacher(rgb_data, tmp_path / "teacher", mean=mean, std=std)
    cfg = RecoverConfig(method="ce", ipc=2, iterations=1)
    _, distiller = build_distiller(cfg, rgb_data, teacher, None, "cpu")
    assert distiller.normalize == (list(mean), list(std))
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(distiller.pixel_min, (0 - m) / s)
    torch.testing.assert_close(distiller.pixel_max, (1 - m) / s)
    plan = make_plan(read_labels(str(rgb_data), "train"), 4, cfg)
    init = InitImages(str(rgb_data), plan, 0, image_bytes=image_bytes(distiller), normalize=distiller.normalize)
    indices = [plan.init_index[k][0] for k in range(4)]
    np.testing.assert_allclose(init(indices).numpy(), _normalised(_raw_images(rgb_data, "train", indices), mean, std),
                               rtol=1e-5, atol=1e-5)


def test_the_random_subset_keeps_the_pixels_under_the_teachers_constants(rgb_data, tmp_path):
    """Read and encoded with the teacher's constants, the PNGs hold exactly the stored pixels; encoded with
    other constants than it was read with, they would not."""
    from unidd_ray.artifacts import distilled
    from unidd_ray.data.normalization import CONSTANTS
    from unidd_ray.stages.subset import write_real_subset

    mean, std = CONSTANTS["tiny-imagenet"]
    out = write_real_subset(rgb_data, tmp_path / "random", ipc=2, seed=0, normalize=(mean, std))
    rows = distilled.read_rows(out)
    pixels = np.stack(distilled.read_arrays(out, rows)).transpose(0, 3, 1, 2)
    raw = _raw_images(rgb_data, "train", [r["source_index"] for r in rows])
    np.testing.assert_array_equal(pixels, np.round(raw * 255).astype(np.uint8))
    images, _, _ = distilled.load_distilled(out, mean=mean, std=std)  # what relabel/evaluate read
    np.testing.assert_allclose(images.numpy(), _normalised(raw, mean, std), rtol=1e-5, atol=1e-5)


def test_the_evaluation_validates_on_images_normalised_with_the_teachers_constants(rgb_data):
    from unidd_ray.data.loading import make_loader
    from unidd_ray.data.normalization import CONSTANTS

    mean, std = CONSTANTS["cifar100"]
    x, _, index = next(iter(make_loader(str(rgb_data), "val", batch_size=60, num_workers=1, normalize=(mean, std))))
    np.testing.assert_allclose(x.numpy(), _normalised(_raw_images(rgb_data, "val", index.tolist()), mean, std),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"normalize gives 1 channel\(s\) of mean but the images have 3"):
        make_loader(str(rgb_data), "val", batch_size=60, num_workers=1, normalize=([0.5], [0.2]))


# ----------------------------------------------------------------------------- check_teacher_data
def test_a_teacher_with_its_own_constants_suits_its_data(rgb_data, tmp_path):
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.teacher import check_teacher_data, read_teacher_info
    from unidd_ray.data.normalization import CONSTANTS

    info = read_dataset_info(rgb_data)
    teacher = _teacher(rgb_data, tmp_path / "teacher", mean=CONSTANTS["cifar10"][0], std=CONSTANTS["cifar10"][1])
    check_teacher_data(read_teacher_info(teacher), info, teacher, rgb_data)


def test_an_imported_teacher_is_checked_for_classes_channels_and_side(rgb_data, tmp_path):
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.files import ArtifactError
    from unidd_ray.artifacts.teacher import check_teacher_data, read_teacher_info
    from unidd_ray.data.normalization import CONSTANTS

    info = read_dataset_info(rgb_data)
    mean, std = CONSTANTS["cifar10"]
    imported = {"dataset": "cifar10", "dataset_fingerprint": "", "extra": {"provenance": {"source": "elsewhere"}}}
    good = _teacher(rgb_data, tmp_path / "good", mean=mean, std=std, **imported)
    check_teacher_data(read_teacher_info(good), info, good, rgb_data)

    for name, change, theirs, ours in [("num_classes", {"num_classes": 10}, 10, 4),
                                       ("channels", {"in_channels": 1}, 1, 3),
                                       ("resolution", {"resolution": 32}, 32, 8)]:
        bad = _teacher(rgb_data, tmp_path / name, mean=mean if name != "channels" else [0.5],
                       std=std if name != "channels" else [0.2], **imported, **change)
        with pytest.raises(ArtifactError, match=rf"the imported teacher in .*{name} does not suit .*\({name} {theirs} "
                                                rf"\(teacher\) vs {ours} \(dataset\)\): it was trained on cifar10"):
            check_teacher_data(read_teacher_info(bad), info, bad, rgb_data)

    # a teacher trained here is still tied to its data by the fingerprint
    other = _teacher(rgb_data, tmp_path / "other", dataset_fingerprint="f" * 64)
    with pytest.raises(ArtifactError, match="was trained on dataset ffffffffffff…"):
        check_teacher_data(read_teacher_info(other), info, other, rgb_data)


# ----------------------------------------------------------------------------- content keys
def test_the_default_keeps_its_keys_and_another_normalisation_moves_them(rgb_data):
    from types import SimpleNamespace

    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.config import Recipe, from_dict, to_dict
    from unidd_ray.keys import dataset_identity, stage_key, stats_key, teacher_key

    info = read_dataset_info(rgb_data)
    recipe = from_dict(Recipe, {"name": "t"})
    # the teacher key as it was computed before the setting existed
    before = stage_key("squeeze", {**to_dict(recipe.squeeze), "resolution": recipe.data.resolution,
                                   "model": {"arch": recipe.teacher.arch, "options": recipe.teacher.options,
                                             "weights": None}},
                       dataset=dataset_identity(info))
    assert recipe.teacher.normalization == "dataset" and teacher_key(recipe, info, None) == before
    cifar = from_dict(Recipe, {"name": "t", "teacher": {"normalization": "cifar10"}})
    assert teacher_key(cifar, info, None) != before

    # the same weights (a pretrained teacher, squeeze.epochs 0) under other constants: other statistics
    card = SimpleNamespace(sha256="w" * 64, mean=list(info.mean), std=list(info.std))
    other = SimpleNamespace(sha256="w" * 64, mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.2010])
    assert stats_key(recipe, info, card) == stage_key("stats", to_dict(recipe.stats), teacher="w" * 64,
                                                      dataset=dataset_identity(info))
    assert stats_key(recipe, info, other) != stats_key(recipe, info, card)
