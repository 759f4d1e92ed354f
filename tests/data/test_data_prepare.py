"""Writing and reading prepared datasets: round trips, dataset.json, atomicity, loaders, augmentations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support.fakes import write_imagefolder

import unidd_ray  # noqa: F401  (applies the torchvision import fix first)
from unidd_ray.data import prepare as prepare_module
from unidd_ray.data.augment import Normalize, RandomResizedCropFlip, center_crop_resize
from unidd_ray.data.beton import plan_storage, writer_geometry
from unidd_ray.artifacts.dataset import read_dataset_info, verify_dataset
from unidd_ray.data.hashing import stored_fingerprint
from unidd_ray.data.image_files import decode_rgb
from unidd_ray.artifacts.dataset import read_labels
from unidd_ray.data.loading import make_loader
from unidd_ray.data.prepare import prepare_dataset
from unidd_ray.data.sources import load_source


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """FFCV loaders set torch's thread count to their ``num_workers``; keep other tests unaffected."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _collect(loader):
    images, labels, index = [], [], []
    for x, y, i in loader:
        images.append(x.clone())
        labels.append(y)
        index.append(i)
    return torch.cat(images), torch.cat(labels), torch.cat(index)


def _as_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    source = load_source("digits")
    out = tmp_path_factory.mktemp("prepared") / "digits"
    info = prepare_dataset(source, out, num_workers=2, progress=False)
    return source, out, info


@pytest.fixture(scope="module")
def rgb_npz(tmp_path_factory):
    base = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(5)
    path = base / "rgb.npz"
    np.savez(path, x=rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8), y=np.arange(30) % 3)
    source = load_source("npz", str(path))
    return source, prepare_dataset(source, base / "out", num_workers=1, progress=False), base / "out"


# ----------------------------------------------------------------------------- dataset.json
def test_dataset_json_content(digits):
    source, out, info = digits
    data = json.loads((out / "dataset.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "labels.npz", "train.beton", "val.beton"]
    assert data["name"] == "digits" and data["num_classes"] == 10 and data["class_names"] == [str(d) for d in range(10)]
    assert data["storage"] == "raw" and data["channels"] == 1 and data["resolution"] == 8
    assert data["format_version"] == 1 and data["fingerprint"] == source.fingerprint
    for split in ("train", "val"):
        labels = source.split(split).labels
        assert data["splits"][split]["count"] == len(labels)
        assert data["splits"][split]["per_class"] == np.bincount(labels, minlength=10).tolist()
        np.testing.assert_array_equal(read_labels(out, split), labels)
    pixels = source.train.images.astype(np.float64) / 255
    np.testing.assert_allclose(data["mean"], pixels.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(data["std"], pixels.std(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    assert set(data["files"]) == {"train.beton", "val.beton", "labels.npz"}
    assert all(len(r["sha256"]) == 64 for r in data["files"].values())
    assert read_dataset_info(out) == info and verify_dataset(out) == info


def test_rgb_mean_std_per_channel(rgb_npz):
    source, info, _ = rgb_npz
    pixels = source.train.images.astype(np.float64) / 255
    assert info.channels == 3 and info.storage == "raw"
    np.testing.assert_allclose(info.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-12)
    np.testing.assert_allclose(info.std, pixels.std(axis=(0, 1, 2)), atol=1e-12)


def test_verify_and_read_errors(digits, tmp_path):
    _, out, _ = digits
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    verify_dataset(copy)
    data = bytearray((copy / "val.beton").read_bytes())
    data[-10] ^= 0xFF
    (copy / "val.beton").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="val.beton does not match the sha256 recorded in dataset.json"):
        verify_dataset(copy)
    (copy / "train.beton").write_bytes(b"short")
    with pytest.raises(ValueError, match="train.beton has 5 bytes but dataset.json records"):
        make_loader(copy, "train", batch_size=4, num_workers=1)
    (copy / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json is corrupt"):
        read_dataset_info(copy)
    with pytest.raises(FileNotFoundError, match="run `unidd-ray prepare`"):
        read_dataset_info(tmp_path / "nothing")


# ----------------------------------------------------------------------------- round trips
def test_raw_round_trip_with_index_shards_and_partial_batches(digits):
    source, out, _ = digits
    n = len(source.train)
    shards = np.array_split(np.random.default_rng(0).permutation(n), 3)
    seen = []
    for shard in shards:
        loader = make_loader(out, "train", batch_size=64, num_workers=2, indices=shard, normalize=False)
        assert len(loader) == -(-len(shard) // 64)  # the last partial batch is kept
        images, labels, index = _collect(loader)
        # FFCV returns the rows in the order of the given indices (not sorted)
        np.testing.assert_array_equal(index.numpy(), shard)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64 and index.dtype == torch.int64
        assert torch.equal(images, _as_nchw(source.train.images[shard]))
        np.testing.assert_array_equal(labels.numpy(), source.train.labels[shard])
        seen.append(index.numpy())
    assert sorted(np.concatenate(seen).tolist()) == list(range(n))


def test_raw_val_normalised_and_random_order(digits):
    source, out, info = digits
    images, _, index = _collect(make_loader(out, "val", batch_size=100, num_workers=1))
    np.testing.assert_array_equal(index.numpy(), np.arange(len(source.val)))
    expected = (_as_nchw(source.val.images) - info.mean[0]) / info.std[0]
    torch.testing.assert_close(images, expected)
    shard = np.arange(10, 200, 3)
    first = _collect(make_loader(out, "val", batch_size=16, num_workers=1, indices=shard, order="random", seed=4))
    again = _collect(make_loader(out, "val", batch_size=16, num_workers=1, indices=shard, order="random", seed=4))
    assert not np.array_equal(first[2].numpy(), shard) and sorted(first[2].tolist()) == shard.tolist()
    assert torch.equal(first[2], again[2])
    np.testing.assert_array_equal(first[1].numpy(), source.val.labels[first[2].numpy()])
    with pytest.raises(ValueError, match=r"indices must lie in 0..358"):
        make_loader(out, "val", batch_size=4, num_workers=1, indices=[0, 359])


def test_kept_batches_are_not_overwritten_and_quasi_random_covers_the_shard(digits):
    source, out, _ = digits
    kept = list(make_loader(out, "train", batch_size=20, num_workers=1, indices=np.arange(200), normalize=False))
    assert len(kept) == 10  # more batches than FFCV keeps buffers for
    for images, labels, index in kept:
        assert torch.equal(images, _as_nchw(source.train.images[index.numpy()]))
        np.testing.assert_array_equal(labels.numpy(), source.train.labels[index.numpy()])
    shard = np.arange(0, len(source.train), 2)
    _, _, index = _collect(make_loader(out, "train", batch_size=50, num_workers=1, indices=shard,
                                       order="quasi_random", seed=1))
    assert sorted(index.tolist()) == shard.tolist()


def test_raw_train_pipeline_augments_per_image_reproducibly(digits):
    source, out, _ = digits
    rows = np.zeros(32, dtype=np.int64)  # the same image 32 times
    kwargs = {"batch_size": 32, "num_workers": 1, "indices": rows, "train": True, "seed": 7, "resolution": 6,
              "normalize": False}
    a, _, _ = _collect(make_loader(out, "train", **kwargs))
    b, _, _ = _collect(make_loader(out, "train", **kwargs))
    assert a.shape == (32, 1, 6, 6) and torch.equal(a, b)
    assert len({tuple(img.flatten().tolist()) for img in a}) > 16
    dropped = make_loader(out, "train", batch_size=100, num_workers=1, train=True, drop_last=True)
    assert len(dropped) == len(source.train) // 100


def test_rgb_raw_round_trip(rgb_npz):
    source, _, out = rgb_npz
    images, labels, index = _collect(make_loader(out, "train", batch_size=7, num_workers=2, normalize=False,
                                                 indices=[5, 0, 17, 3]))
    assert index.tolist() == [5, 0, 17, 3] and images.shape == (4, 3, 12, 12)
    np.testing.assert_array_equal(labels.numpy(), source.train.labels[[5, 0, 17, 3]])
    assert torch.equal(images, _as_nchw(source.train.images[[5, 0, 17, 3]]))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_imagefolder(root, per_class=(3, 2), sizes=((90, 120), (110, 84)))
    return root


def test_jpeg_round_trip_square_storage(jpeg_folder, tmp_path):
    source = load_source("imagefolder", str(jpeg_folder), resolution=80)
    info = prepare_dataset(source, tmp_path / "sq", num_workers=2, progress=False)
    assert info.storage == "jpeg" and info.resolution == 80 and info.eval_crop_ratio == 1.0
    images, labels, index = _collect(make_loader(tmp_path / "sq", "val", batch_size=4, num_workers=1,
                                                 normalize=False, indices=[4, 1, 5]))
    assert index.tolist() == [4, 1, 5] and images.shape == (3, 3, 80, 80)
    expected = _as_nchw(np.stack([decode_rgb(source.val.paths[i], square=80) for i in [4, 1, 5]]))
    assert (images - expected).abs().mean() < 0.02  # JPEG quality 90
    np.testing.assert_array_equal(labels.numpy(), source.val.labels[[4, 1, 5]])
    pixels = np.concatenate([decode_rgb(p, square=80).reshape(-1, 3) for p in source.train.paths]) / 255
    np.testing.assert_allclose(info.mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(info.std, pixels.std(0), atol=1e-9)


def test_jpeg_aspect_preserving_storage_and_pipelines(jpeg_folder, tmp_path):
    source = load_source("imagefolder", str(jpeg_folder))
    info = prepare_dataset(source, tmp_path / "var", max_resolution=100, num_workers=2, progress=False)
    assert info.storage == "jpeg" and info.max_resolution == 100 and info.resolution == 88
    assert info.eval_crop_ratio == pytest.approx(224 / 256)
    images, _, index = _collect(make_loader(tmp_path / "var", "val", batch_size=4, num_workers=2, normalize=False,
                                            drop_last=False))
    assert images.shape == (6, 3, 88, 88) and index.tolist() == list(range(6))
    for i in (0, 3):
        stored = torch.from_numpy(decode_rgb(source.val.paths[i], max_side=100)).permute(2, 0, 1)[None].float() / 255
        expected = center_crop_resize(stored, 88, ratio=224 / 256)
        assert (images[i] - expected[0]).abs().mean() < 0.05
    train, labels, index = _collect(make_loader(tmp_path / "var", "train", batch_size=4, num_workers=2, train=True,
                                                resolution=32))
    assert train.shape == (9, 3, 32, 32) and sorted(index.tolist()) == list(range(9))
    np.testing.assert_array_equal(labels.numpy(), source.train.labels[index.numpy()])


# ----------------------------------------------------------------------------- fingerprints
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _recorded_fingerprint(source, max_resolution: int) -> str:
    """The fingerprint ``prepare_dataset`` records for ``source`` at ``max_resolution`` (nothing is written)."""
    plan = plan_storage(source, write_mode="auto", max_resolution=max_resolution, jpeg_quality=90,
                        compress_probability=0.5)
    return stored_fingerprint(source.fingerprint, writer_geometry(source, plan))


def test_a_side_chosen_by_the_writer_is_in_the_fingerprint(tmp_path):
    root = tmp_path / "folder"
    write_imagefolder(root, per_class=(2, 1), sizes=((20, 26), (30, 18)))
    source = load_source("imagefolder", str(root))  # keeps each file's size: max_resolution decides the side
    infos = {cap: prepare_dataset(source, tmp_path / f"cap{cap}", max_resolution=cap, num_workers=1, progress=False)
             for cap in (16, 32)}
    assert [(info.storage, info.resolution) for info in infos.values()] == [("raw", 16), ("raw", 32)]
    assert len({infos[16].fingerprint, infos[32].fingerprint, source.fingerprint}) == 3
    for cap, info in infos.items():
        assert read_dataset_info(tmp_path / f"cap{cap}") == info and info.source["fingerprint"] == source.fingerprint
    fixed = load_source("imagefolder", str(root), resolution=16)  # the source fixes the side
    for cap in (16, 32):
        info = prepare_dataset(fixed, tmp_path / f"fixed{cap}", max_resolution=cap, num_workers=1, progress=False)
        assert (info.storage, info.resolution, info.fingerprint) == ("raw", 16, fixed.fingerprint)


def test_jpeg_caps_below_the_source_side_are_in_the_fingerprint(jpeg_folder):
    free = load_source("imagefolder", str(jpeg_folder))
    assert len({_recorded_fingerprint(free, cap) for cap in (100, 128, 256)} | {free.fingerprint}) == 4
    fixed = load_source("imagefolder", str(jpeg_folder), resolution=80)
    assert _recorded_fingerprint(fixed, 80) == _recorded_fingerprint(fixed, 256) == fixed.fingerprint
    assert len({_recorded_fingerprint(fixed, 64), _recorded_fingerprint(fixed, 48), fixed.fingerprint}) == 3
    digits = load_source("digits")
    assert _recorded_fingerprint(digits, 8) == _recorded_fingerprint(digits, 256) == digits.fingerprint


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_native_size_fashion_mnist_keeps_its_recorded_fingerprint():
    # the fingerprint in dataset.json of the Fashion-MNIST data behind
    # docs/notes/2026-12-06-fashion-mnist-investigations.md (recipe: max_resolution 256)
    recorded = "0fbcd853f3a04cae45b56464f21375eb9f3d5642a13dab5ee7274abe9f372e0d"
    source = load_source("fashion-mnist")
    assert _recorded_fingerprint(source, 256) == source.fingerprint == recorded


# ----------------------------------------------------------------------------- atomicity
def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_failure_midway_leaves_no_partial_files(monkeypatch, tmp_path):
    source = load_source("digits")
    real = prepare_module.write_beton

    def failing(path, rows, field, **kwargs):
        if path.name == "val.beton":
            path.write_bytes(b"half a beton")
            raise RuntimeError("injected failure while writing val")
        return real(path, rows, field, **kwargs)

    monkeypatch.setattr(prepare_module, "write_beton", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected failure"):
        prepare_dataset(source, out, num_workers=1, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert list(tmp_path.rglob("*.beton")) == []


def test_failure_keeps_an_existing_dataset_intact(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (12, 4, 4), dtype=np.uint8), y=np.arange(12) % 2)
    source = load_source("npz", str(path))
    out = tmp_path / "out"
    first = prepare_dataset(source, out, num_workers=1, progress=False)
    again = prepare_dataset(source, out, num_workers=1, progress=False)  # a complete overwrite
    assert again.fingerprint == first.fingerprint and verify_dataset(out) == again

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "write_beton", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(source, out, num_workers=1, progress=False)
    assert verify_dataset(out) == again and _leftovers(tmp_path) == []


def test_corrupt_image_fails_preparation_naming_the_file(jpeg_folder, tmp_path):
    root = tmp_path / "folder"
    write_imagefolder(root, per_class=(2, 1))
    bad = root / "train" / "dog" / "dog_01.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    source = load_source("imagefolder", str(root), resolution=16)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"1 image file\(s\) could not be decoded .*dog_01.JPEG"):
        prepare_dataset(source, out, num_workers=2, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_directory_with_other_files_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"is not a prepared dataset \(it holds \['notes.txt'\]\)"):
        prepare_dataset(load_source("digits"), tmp_path / "mine", progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_storage_choices_are_validated(tmp_path):
    source = load_source("digits")
    with pytest.raises(ValueError, match="JPEG storage .* needs RGB images"):
        prepare_dataset(source, tmp_path / "x", write_mode="jpg", progress=False)
    with pytest.raises(ValueError, match="write_mode must be one of"):
        prepare_dataset(source, tmp_path / "x", write_mode="png", progress=False)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the conversion op
def test_to_float_nchw_is_exact_flips_with_a_seed_and_never_overwrites_kept_batches():
    from unidd_ray.data.ffcv_ops import ToFloatNCHW

    batch = np.random.default_rng(0).integers(0, 256, (16, 5, 7, 3), dtype=np.uint8)
    expected = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    plain = ToFloatNCHW.for_stats(3).generate_code()
    first = plain(batch, None)
    assert first.shape == (16, 3, 5, 7) and torch.equal(torch.from_numpy(first), expected)
    kept = [plain(batch[::-1].copy(), None) for _ in range(10)]  # more than the pool holds
    assert torch.equal(torch.from_numpy(first), expected) and len({k.ctypes.data for k in kept}) == 10
    # ... while a batch nobody holds any more lends its memory to the next one (no fresh pages)
    fresh = ToFloatNCHW.for_stats(3).generate_code()
    dropped = fresh(batch, None)
    address = dropped.ctypes.data
    del dropped
    held = torch.from_numpy(fresh(batch, None))  # reuses the dropped batch's buffer; a tensor now holds it
    assert held.data_ptr() == address
    assert fresh(batch[::-1].copy(), None).ctypes.data != address and torch.equal(held, expected)
    mean, std = [0.2, 0.5, 0.7], [0.3, 0.2, 0.1]
    normed = ToFloatNCHW.for_stats(3, mean, std).generate_code()(batch, None)
    torch.testing.assert_close(torch.from_numpy(normed), Normalize(mean, std)(expected))
    offset, divisor = ((255 * np.asarray(v, dtype=np.float64)).astype(np.float32) for v in (mean, std))
    per_pixel = (batch.astype(np.float32) - offset) / divisor  # float32 arithmetic, pixel by pixel
    assert np.array_equal(normed, per_pixel.transpose(0, 3, 1, 2))  # the lookup table changes no bit
    flipped = [ToFloatNCHW.for_stats(3, flip_seed=5).generate_code()(batch, None) for _ in range(2)]
    assert np.array_equal(flipped[0], flipped[1])
    mirrored = [np.array_equal(f, e.flip(-1).numpy()) for f, e in zip(flipped[0], expected)]
    same = [np.array_equal(f, e.numpy()) for f, e in zip(flipped[0], expected)]
    assert all(m or s for m, s in zip(mirrored, same)) and 0 < sum(mirrored) < 16


def test_torch_conversion_for_accelerators_matches_the_numba_op():
    from unidd_ray.data.ffcv_ops import ToFloatNCHW
    from unidd_ray.data.loading import ToFloatImages

    batch = np.random.default_rng(1).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    assert torch.equal(ToFloatImages()(torch.from_numpy(batch)),
                       torch.from_numpy(ToFloatNCHW.for_stats(3).generate_code()(batch, None)))
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    torch.testing.assert_close(ToFloatImages(mean, std)(torch.from_numpy(batch)),
                               torch.from_numpy(ToFloatNCHW.for_stats(3, mean, std).generate_code()(batch, None)))


# ----------------------------------------------------------------------------- augmentations
def test_random_resized_crop_flip_is_per_image_and_seeded():
    x = torch.rand(1, 3, 20, 24).expand(16, -1, -1, -1).contiguous()
    crop = RandomResizedCropFlip(12, generator=torch.Generator().manual_seed(0))
    out = crop(x)
    assert out.shape == (16, 3, 12, 12) and out.dtype == torch.float32
    assert len({tuple(o.flatten().tolist()) for o in out}) == 16  # every image got its own crop
    again = RandomResizedCropFlip(12, generator=torch.Generator().manual_seed(0))(x)
    assert torch.equal(out, again)
    assert not torch.equal(crop(x), out)  # the generator advances


def test_flip_only_mirrors_some_images_exactly():
    x = torch.rand(32, 1, 8, 8)
    flip_only = RandomResizedCropFlip(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(3))
    out = flip_only(x)
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 4 < sum(mirrored) < 28
    identity = RandomResizedCropFlip(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(identity(x), x, atol=1e-5, rtol=0)


def test_normalize_and_center_crop_resize():
    x = torch.rand(2, 3, 10, 14)
    norm = Normalize([0.5, 0.4, 0.3], [0.2, 0.1, 0.5])
    torch.testing.assert_close(norm(x)[:, 1], (x[:, 1] - 0.4) / 0.1)
    assert center_crop_resize(x, 6).shape == (2, 3, 6, 6)
    torch.testing.assert_close(center_crop_resize(x, 10), x[..., 2:12])
    with pytest.raises(ValueError, match="expected 3 channels"):
        norm(torch.rand(1, 1, 4, 4))
