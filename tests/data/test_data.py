"""Dataset sources on small fake files in their real on-disk formats, FFCV writing and loading."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from unidd_ray.data import prepare as prepare_module
from unidd_ray.data.augment import RandomResizedCropFlip
from unidd_ray.artifacts.dataset import read_labels
from unidd_ray.data.loading import make_loader
from unidd_ray.data.prepare import prepare_dataset, read_dataset_info, verify_dataset
from unidd_ray.data.sources import SourceError, available_sources, load_source


# ----------------------------------------------------------------------------- fake files
def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root, n_train=40, n_val=20, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for stem, n in [("train", n_train), ("t10k", n_val)]:
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", y)
        data[stem] = (x, y)
    return data


def fake_cifar10(root, per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(per_batch) % 10]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        batches.append((data, labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return folder, batches


def fake_image_folder(root, classes=("cat", "dog", "eel"), per_class=3, size=12, flat_val=False):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            folder = root / split if (flat_val and split == "val") else root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{name}_{i}.png")
    return root


# ----------------------------------------------------------------------------- sources
def test_registry_lists_every_source():
    assert {"fashion-mnist", "digits", "imagefolder", "cifar10", "cifar100", "tiny-imagenet", "npz"} <= set(
        available_sources())
    with pytest.raises(ValueError, match="unknown dataset source 'mnist'"):
        load_source("mnist")


def test_fashion_mnist_reads_idx_files(tmp_path):
    data = fake_fashion_mnist(tmp_path / "fm")
    src = load_source("fashion-mnist", tmp_path / "fm")
    assert src.channels == 1 and src.resolution == 28 and src.num_classes == 10
    np.testing.assert_array_equal(src.train.images[..., 0], data["train"][0])
    np.testing.assert_array_equal(src.val.labels, data["t10k"][1])


def test_fashion_mnist_missing_root_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", tmp_path / "absent")


def test_truncated_idx_file_is_named(tmp_path):
    fake_fashion_mnist(tmp_path / "fm")
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_source("fashion-mnist", tmp_path / "fm")
    path.write_bytes(b"not gzip at all")
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.gz"):
        load_source("fashion-mnist", tmp_path / "fm")


def test_digits_split_is_seeded_and_stratified():
    a, b = load_source("digits"), load_source("digits")
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    assert a.train.images.shape[1:] == (8, 8, 1) and a.train.images.max() == 255
    assert len(a.train) + len(a.val) == 1797
    assert set(np.unique(a.val.labels)) == set(range(10))
    assert a.fingerprint == b.fingerprint


def test_cifar10_pickles_load_without_running_code(tmp_path):
    folder, batches = fake_cifar10(tmp_path)
    src = load_source("cifar10", tmp_path)  # the parent folder is accepted too
    assert src.train.images.shape == (100, 32, 32, 3)
    np.testing.assert_array_equal(src.train.images[0], batches[0][0][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert src.class_names[3] == "c3"

    class Evil:  # eval, not print: Ray's tqdm replaces builtins.print once a test has used it
        def __reduce__(self):
            return (eval, ("print('pwned')",))

    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"labels": [0], b"data": Evil()}, f)
    with pytest.raises(SourceError, match="data_batch_2.*refusing to load builtins.eval"):
        load_source("cifar10", folder)


def test_cifar_out_of_range_label_is_reported(tmp_path):
    folder, _ = fake_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0, 12], b"data": np.zeros((2, 3072), np.uint8)}, f, protocol=2)
    with pytest.raises(SourceError, match="val label 12 is out of range for 10 classes"):
        load_source("cifar10", folder)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 200), ("test", 100)):
        with open(folder / name, "wb") as f:
            pickle.dump({b"fine_labels": list(range(100)) * (n // 100), b"coarse_labels": [0] * n,
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f, protocol=2)
    src = load_source("cifar100", folder)
    assert src.num_classes == 100 and len(src.train) == 200 and src.train.labels[57] == 57


def test_imagefolder_layout_and_its_errors(tmp_path):
    root = fake_image_folder(tmp_path / "if")
    src = load_source("imagefolder", root)
    assert src.class_names == ["cat", "dog", "eel"] and len(src.train.paths) == 9
    (root / "train" / "fox").mkdir()
    with pytest.raises(SourceError, match="class 'fox' has no images"):
        load_source("imagefolder", root)
    (root / "train" / "fox").rmdir()
    (root / "val" / "gnu").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "val" / "gnu" / "a.png")
    with pytest.raises(SourceError, match=r"train and val classes differ.*only in val \['gnu'\]"):
        load_source("imagefolder", root)


def test_imagefolder_flat_val_with_label_file(tmp_path):
    root = fake_image_folder(tmp_path / "flat", flat_val=True)
    files = sorted(p.name for p in (root / "val").iterdir())
    labels = tmp_path / "val.txt"
    labels.write_text("\n".join(f"{name} {name.split('_')[0]}" for name in files))
    src = load_source("imagefolder", root, val_labels=str(labels))
    assert src.val.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="val_labels"):
        load_source("imagefolder", root)
    labels.write_text("\n".join(f"{name} 7" for name in files))
    with pytest.raises(SourceError, match="val label 7 is out of range"):
        load_source("imagefolder", root, val_labels=str(labels))


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids))
    rng = np.random.default_rng(0)
    lines = []
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                root / "train" / w / "images" / f"{w}_{i}.JPEG", quality=95)
        name = f"val_{w}.JPEG"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / name)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))
    src = load_source("tiny-imagenet", root)
    assert src.train.images.shape == (4, 64, 64, 3) and src.val.labels.tolist() == [0, 1]
    (root / "val" / "images" / "val_n02.JPEG").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SourceError, match="val_n02.JPEG is truncated or corrupt"):
        load_source("tiny-imagenet", root)


def test_npz_source_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 6, 6), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "toy.npz", x=x, y=y)
    src = load_source("npz", tmp_path / "toy.npz")
    assert src.channels == 1 and len(src.train) + len(src.val) == 30
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(SourceError, match="bad.npz.*uint8"):
        load_source("npz", tmp_path / "bad.npz")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "toy.npz").read_bytes()[:200])
    with pytest.raises(SourceError, match="cut.npz is truncated or corrupt"):
        load_source("npz", tmp_path / "cut.npz")


# ----------------------------------------------------------------------------- prepare + load
@pytest.fixture(scope="module")
def fm_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    data = fake_fashion_mnist(root / "src", n_train=50, n_val=20)
    out = root / "prepared"
    prepare_dataset(load_source("fashion-mnist", root / "src"), out, num_workers=1)
    return out, data


def test_prepare_writes_betons_and_a_complete_dataset_json(fm_prepared):
    out, data = fm_prepared
    info = verify_dataset(out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "labels.npz", "train.beton", "val.beton"]
    assert info.splits["train"]["count"] == 50 and info.splits["train"]["per_class"] == [5] * 10
    x = data["train"][0].astype(np.float64) / 255
    assert info.mean[0] == pytest.approx(x.mean(), rel=1e-12)
    assert info.std[0] == pytest.approx(x.std(), rel=1e-12)
    assert info.storage == "raw" and info.channels == 1 and info.resolution == 28
    np.testing.assert_array_equal(read_labels(out, "val"), data["t10k"][1])


def test_loader_returns_exact_pixels_for_any_shard_without_dropping(fm_prepared):
    out, data = fm_prepared
    shard = [49, 3, 17, 0, 22, 8, 31]
    loader = make_loader(out, "train", batch_size=3, num_workers=1, indices=shard, normalize=False)
    rows = [(x, y, i) for x, y, i in loader]
    assert [len(r[0]) for r in rows] == [3, 3, 1]  # last partial batch kept
    index = torch.cat([r[2] for r in rows])
    assert index.tolist() == shard  # sequential order follows the given indices
    images = torch.cat([r[0] for r in rows])
    expected = torch.from_numpy(data["train"][0][shard]).float().div(255)[:, None]
    assert torch.equal(images, expected)
    assert torch.cat([r[1] for r in rows]).tolist() == data["train"][1][shard].tolist()


def test_loader_normalises_and_augments(fm_prepared):
    out, _ = fm_prepared
    info = read_dataset_info(out)
    x, _, _ = next(iter(make_loader(out, "train", batch_size=50, num_workers=1)))
    assert x.mean().item() == pytest.approx(0, abs=1e-5) and x.std().item() == pytest.approx(1, rel=1e-3)
    a, _, _ = next(iter(make_loader(out, "train", batch_size=50, num_workers=1, train=True, seed=1)))
    b, _, _ = next(iter(make_loader(out, "train", batch_size=50, num_workers=1, train=True, seed=1)))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert a.shape == (50, 1, info.resolution, info.resolution)


def test_prepare_failure_leaves_no_partial_beton(tmp_path, monkeypatch):
    fake_fashion_mnist(tmp_path / "src")
    source = load_source("fashion-mnist", tmp_path / "src")
    calls = []

    def failing_write(path, rows, field, workers, **kwargs):
        calls.append(path)
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "write_beton", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(source, tmp_path / "out", num_workers=1)
    assert calls and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".out*"))


def test_prepare_refuses_a_foreign_directory_and_detects_tampering(tmp_path, fm_prepared):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        prepare_dataset(load_source("digits"), tmp_path / "busy")
    out, _ = fm_prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with open(copy / "val.beton", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02")
    with pytest.raises(ValueError, match="val.beton does not match the sha256 recorded in dataset.json"):
        verify_dataset(copy)
    json.loads((copy / "dataset.json").read_text())


def test_jpeg_storage_for_large_image_files(tmp_path):
    root = fake_image_folder(tmp_path / "big", classes=("a", "b"), per_class=2, size=96)
    info = prepare_dataset(load_source("imagefolder", root), tmp_path / "out", max_resolution=96, num_workers=1)
    assert info.storage == "jpeg" and info.channels == 3 and info.resolution == 84
    x, y, i = next(iter(make_loader(tmp_path / "out", "val", batch_size=8, num_workers=1, normalize=False)))
    assert x.shape == (4, 3, 84, 84) and 0 <= x.min() and x.max() <= 1
    t, _, _ = next(iter(make_loader(tmp_path / "out", "train", batch_size=8, num_workers=1, train=True)))
    assert t.shape == (4, 3, 84, 84)


def test_small_image_files_are_stored_raw(tmp_path):
    root = fake_image_folder(tmp_path / "small", classes=("a", "b"), per_class=2, size=16)
    info = prepare_dataset(load_source("imagefolder", root), tmp_path / "out", max_resolution=16, num_workers=1)
    assert info.storage == "raw" and info.resolution == 16
    x, _, i = next(iter(make_loader(tmp_path / "out", "train", batch_size=8, num_workers=1, normalize=False)))
    first = np.asarray(Image.open(root / "train" / "a" / "a_0.png"), dtype=np.float32) / 255
    assert torch.allclose(x[0].permute(1, 2, 0), torch.from_numpy(first))


def test_random_resized_crop_flip_is_per_image_and_seeded():
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).repeat(8, 2, 1, 1)
    a = RandomResizedCropFlip(16, scale=(0.2, 0.5), generator=torch.Generator().manual_seed(0))(x)
    b = RandomResizedCropFlip(16, scale=(0.2, 0.5), generator=torch.Generator().manual_seed(0))(x)
    assert torch.equal(a, b) and a.shape == x.shape
    assert len({tuple(img.flatten()[:20].tolist()) for img in a}) == 8  # every image got its own crop


def test_loader_leaves_torch_threads_alone(fm_prepared):
    out, _ = fm_prepared
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # FFCV itself would set torch's threads to num_workers on construction and on every epoch
        loader = make_loader(out, "train", batch_size=4, num_workers=2)
        assert torch.get_num_threads() == 1
        for _ in range(2):
            batches = sum(1 for _ in loader)
            assert torch.get_num_threads() == 1
        assert batches == len(loader) > 0 and loader.batch_size == 4
    finally:
        torch.set_num_threads(before)
