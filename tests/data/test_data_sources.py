"""Dataset sources on small fake files in their real on-disk formats, including every error case."""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.fakes import (
    idx_bytes,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_imagefolder,
    write_tiny_imagenet,
)

import unidd_ray  # noqa: F401  (applies the torchvision import fix first)
from unidd_ray.data import safe_pickle
from unidd_ray.data.image_files import decode_rgb
from unidd_ray.data.safe_pickle import load_restricted_pickle
from unidd_ray.data.source_types import SourceDataset, Split, validate_source
from unidd_ray.data.sources import SourceError, available_sources, load_source

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- registry
def test_registry_lists_sources_and_rejects_unknown_names_and_options():
    assert available_sources() == sorted(["fashion-mnist", "digits", "imagefolder", "cifar10", "cifar100",
                                          "tiny-imagenet", "npz"])
    with pytest.raises(ValueError, match=r"unknown dataset source 'mnist'.*cifar10"):
        load_source("mnist")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['colour'\]"):
        load_source("digits", colour="red")
    with pytest.raises(ValueError, match="val_fraction='half' is not a valid float"):
        load_source("digits", val_fraction="half")


# ----------------------------------------------------------------------------- fashion-mnist
def test_fashion_mnist_reads_idx_gz(tmp_path):
    arrays = write_fashion_mnist(tmp_path)
    source = load_source("fashion-mnist", str(tmp_path))
    assert source.channels == 1 and source.resolution == 28 and source.class_names[0] == "T-shirt/top"
    assert source.class_names[-1] == "Ankle boot" and source.num_classes == 10
    np.testing.assert_array_equal(source.train.images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(source.val.labels, arrays["t10k"][1].astype(np.int64))
    assert source.train.labels.dtype == np.int64 and source.train.images.shape == (30, 28, 28, 1)
    assert len(source.fingerprint) == 64
    assert load_source("fashion-mnist", str(tmp_path)).fingerprint == source.fingerprint


def test_fashion_mnist_missing_root_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist", str(tmp_path / "nowhere"))


def test_fashion_mnist_truncated_gzip_names_the_file(tmp_path):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is truncated or corrupt"):
        load_source("fashion-mnist", str(tmp_path))


def test_fashion_mnist_short_idx_payload_names_the_file(tmp_path):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-28]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is truncated or corrupt: the header announces"):
        load_source("fashion-mnist", str(tmp_path))


def test_fashion_mnist_label_out_of_range_names_value_and_file(tmp_path):
    write_fashion_mnist(tmp_path)
    labels = np.arange(30, dtype=np.uint8) % 10
    labels[7] = 12
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(ValueError, match=r"train label 12 is out of range for 10 classes .* in .*train-labels-idx1-ubyte.gz"):
        load_source("fashion-mnist", str(tmp_path))


def test_fashion_mnist_class_without_samples_is_named(tmp_path):
    write_fashion_mnist(tmp_path)
    labels = np.arange(20, dtype=np.uint8) % 9  # no "Ankle boot" (class 9) in val
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(ValueError, match=r"val split has no samples of class\(es\) \['Ankle boot'\]"):
        load_source("fashion-mnist", str(tmp_path))


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files_from_the_debian_package():
    source = load_source("fashion-mnist")
    assert source.train.images.shape == (60000, 28, 28, 1) and source.val.images.shape == (10000, 28, 28, 1)
    assert np.bincount(source.train.labels).tolist() == [6000] * 10


# ----------------------------------------------------------------------------- digits
def test_digits_stratified_seeded_split():
    source = load_source("digits")
    assert source.resolution == 8 and source.channels == 1 and source.train.images.dtype == np.uint8
    assert len(source.train) + len(source.val) == 1797
    assert source.train.images.max() == 255 and source.train.images.min() == 0
    fractions = np.bincount(source.val.labels) / (np.bincount(source.val.labels) + np.bincount(source.train.labels))
    assert np.allclose(fractions, 0.2, atol=0.02)
    again = load_source("digits", seed="0")
    assert again.fingerprint == source.fingerprint
    np.testing.assert_array_equal(again.val.labels, source.val.labels)
    assert load_source("digits", seed=1).fingerprint != source.fingerprint


# ----------------------------------------------------------------------------- cifar
def test_cifar10_reads_official_pickle_layout_from_root_or_parent(tmp_path):
    written = write_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        source = load_source("cifar10", str(root))
        assert source.class_names[:2] == ["airplane", "automobile"] and source.resolution == 32
        assert source.train.images.shape == (50, 32, 32, 3) and source.val.images.shape == (10, 32, 32, 3)
        np.testing.assert_array_equal(source.train.images[:10], written["train"][0][0])
        np.testing.assert_array_equal(source.val.labels, written["val"][0][1])


def test_cifar100_uses_fine_labels(tmp_path):
    written = write_cifar100(tmp_path)
    source = load_source("cifar100", str(tmp_path))
    assert source.num_classes == 100 and source.class_names[3] == "fine3"
    np.testing.assert_array_equal(source.val.labels, written["test"][1])
    np.testing.assert_array_equal(source.train.images, written["train"][0])


def test_cifar_missing_root_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --root"):
        load_source("cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_source("cifar10", str(tmp_path))


def test_cifar_truncated_batch_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="data_batch_3 is truncated or corrupt"):
        load_source("cifar10", str(tmp_path))


def test_cifar_label_out_of_range_names_value_and_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"labels"][4] = 10
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"val label 10 is out of range for 10 classes .* in .*test_batch"):
        load_source("cifar10", str(tmp_path))


def test_cifar_class_without_samples_is_named(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"labels"] = [k % 9 for k in range(10)]  # no "truck"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"no samples of class\(es\) \['truck'\]"):
        load_source("cifar10", str(tmp_path))


@pytest.mark.parametrize("bad, shown", [(3.7, "float 3.7"), (True, "bool True"), ("4", "str '4'"),
                                        (np.float64(2.0), "float64 np.float64(2.0)")])
def test_cifar_non_integer_labels_are_refused_naming_the_file(tmp_path, bad, shown):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"labels"][6] = bad
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(SourceError, match=rf"data_batch_4: 'labels' must be a list of integers, but entry 6 is "
                                          rf"{re.escape(shown)}; the file is corrupt"):
        load_source("cifar10", str(tmp_path))


def test_cifar_label_arrays_must_hold_integers(tmp_path):
    written = write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"labels"] = np.asarray(batch[b"labels"], dtype=np.uint8)  # an integer array is fine
    path.write_bytes(pickle.dumps(batch, protocol=2))
    np.testing.assert_array_equal(load_source("cifar10", str(tmp_path)).val.labels, written["val"][0][1])
    batch[b"labels"] = batch[b"labels"].astype(np.float32)
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(SourceError, match="test_batch: 'labels' must hold integers, got an array of float32"):
        load_source("cifar10", str(tmp_path))


class _Exploit:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


@pytest.mark.parametrize("protocol", [2, 5])
def test_restricted_unpickler_refuses_code_and_accepts_numpy(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({b"data": _Exploit(str(marker))}, protocol=protocol))
    with pytest.raises(ValueError, match=r"evil cannot be loaded safely \(refusing to load posix.mkdir"):
        load_restricted_pickle(evil)
    assert not marker.exists()
    good = tmp_path / "good"
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    good.write_bytes(pickle.dumps({b"data": array, "n": np.int64(3), "raw": b"\x00\xff"}, protocol=protocol))
    loaded = load_restricted_pickle(good)
    np.testing.assert_array_equal(loaded[b"data"], array)
    assert loaded["n"] == 3 and loaded["raw"] == b"\x00\xff"


def test_cifar_batch_with_code_is_refused(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Exploit(str(marker)), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_1 cannot be loaded safely"):
        load_source("cifar10", str(tmp_path))
    assert not marker.exists()


class _Reduced:
    """Pickles as ``callable(*args)``, followed by ``BUILD state`` when a state is given."""

    def __init__(self, callable_, args, state=None):
        self.reduced = (callable_, args) if state is None else (callable_, args, state)

    def __reduce__(self):
        return self.reduced


_PLAIN = (None, None, None, -1, -1, 0)  # subarray, names, fields, elsize, alignment, flags of u1/i8/f8...
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct, pickled by its module path


def _forged_payloads() -> dict:
    """Pickled objects whose dtype (or array dtype) numpy must not build from a file's bytes."""
    object_array = _Reduced(_RECONSTRUCT, (np.ndarray, (0,), b"b"),
                            (1, (2,), _Reduced(np.dtype, ("O8", False, True)), False, [1, None]))
    return {
        "object dtype, flags 0": _Reduced(np.dtype, ("O8", False, True), (3, "|", *_PLAIN)),
        "object dtype, numpy's flags": np.dtype("O"),
        "structured dtype with an object field": np.dtype([("a", "<i4"), ("b", "O")]),
        "object array": object_array,
        "uint8 dtype claiming to hold objects": _Reduced(np.dtype, ("u1", False, True),
                                                         (3, "|", None, None, None, -1, -1, 63)),
        "uint8 dtype given fields": _Reduced(np.dtype, ("u1", False, True),
                                             (3, "|", None, ("a",), {"a": (np.dtype("u1"), 0)}, 1, 1, 0)),
        "uint8 dtype with a byte order": _Reduced(np.dtype, ("u1", False, True), (3, ">", *_PLAIN)),
        "void dtype": np.dtype("V8"),
        "datetime array": np.zeros(2, dtype="M8[s]"),
        "array given a dict state": _Reduced(_RECONSTRUCT, (np.ndarray, (0,), b"b"), {"x": 1}),
        "state on bytes": _Reduced(codecs.encode, ("abc", "latin1"), {"x": 1}),
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("what", list(_forged_payloads()))
def test_restricted_unpickler_refuses_forged_dtypes(tmp_path, what, protocol):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": _forged_payloads()[what]}, protocol=protocol))
    with pytest.raises(SourceError, match=r"batch cannot be loaded safely \(refusing"):
        load_restricted_pickle(path)


@pytest.mark.parametrize("what", ["object dtype, flags 0", "object dtype, numpy's flags",
                                  "structured dtype with an object field", "object array"])
def test_build_checks_refuse_object_dtypes_without_the_dtype_allow_list(tmp_path, monkeypatch, what):
    """The BUILD checks alone stop object dtypes, even if numpy.dtype itself were let through."""
    monkeypatch.setattr(safe_pickle, "_dtype", np.dtype)
    monkeypatch.setattr(safe_pickle, "_CALLABLES", safe_pickle._CALLABLES | {np.dtype})
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": _forged_payloads()[what]}, protocol=2))
    with pytest.raises(SourceError, match=r"batch cannot be loaded safely \(refusing (the|a numpy \w+) state"):
        load_restricted_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_keeps_plain_dtypes_and_byte_orders(tmp_path, protocol):
    names = ("|b1", "u1", "<i2", ">i8", "<f4", ">f8", "<c16", ">c8", "S5", "<U3", ">U3")
    arrays = {name: np.arange(6).astype(name).reshape(2, 3) for name in names}
    path = tmp_path / "arrays"
    path.write_bytes(pickle.dumps({"arrays": arrays, "dtypes": [np.dtype(n) for n in names]}, protocol=protocol))
    loaded = load_restricted_pickle(path)
    reference = pickle.loads(path.read_bytes())  # numpy's own unpickling (it may load arrays in native order)
    assert [d.str for d in loaded["dtypes"]] == [np.dtype(n).str for n in names]
    for name, array in arrays.items():
        assert loaded["arrays"][name].dtype == reference["arrays"][name].dtype
        np.testing.assert_array_equal(loaded["arrays"][name], array)


def test_cifar10_official_python2_pickles_load(tmp_path):
    written = write_cifar10(tmp_path, python2=True)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_2").read_bytes()
    assert b"U\x01|NNN" in raw and b"X" not in raw[:200]  # Python 2 str opcodes, no Python 3 unicode ones
    source = load_source("cifar10", str(tmp_path))
    assert source.class_names[-1] == "truck"
    np.testing.assert_array_equal(source.train.images[10:20], written["train"][1][0])
    np.testing.assert_array_equal(source.val.images, written["val"][0][0])
    np.testing.assert_array_equal(source.train.labels[40:], written["train"][4][1])


# ----------------------------------------------------------------------------- validate_source
def _two_class_source(tmp_path, train_files: bool, val_files: bool, channels: int = 3) -> SourceDataset:
    labels = np.array([0, 1, 0, 1], dtype=np.int64)
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"img_{i}.png"))
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(paths[-1])
    images = np.zeros((4, 8, 8, channels), dtype=np.uint8)

    def split(files: bool) -> Split:
        return Split(labels=labels.copy(), paths=list(paths)) if files else Split(labels=labels.copy(), images=images)

    return SourceDataset(name="mixed", class_names=["a", "b"], channels=channels, resolution=8,
                         train=split(train_files), val=split(val_files), fingerprint="0" * 64, origin=str(tmp_path))


@pytest.mark.parametrize("train_files, val_files", [(False, True), (True, False)])
def test_validate_source_refuses_an_array_split_beside_a_file_split(tmp_path, train_files, val_files):
    source = _two_class_source(tmp_path, train_files, val_files)
    kinds = {True: r"image files \(paths=\)", False: r"arrays \(images=\)"}
    with pytest.raises(SourceError, match=rf"mixed source at .*: the train split holds {kinds[train_files]} but the "
                                          rf"val split holds {kinds[val_files]}; both splits must be"):
        validate_source(source)


def test_validate_source_file_backed_needs_three_channels(tmp_path):
    assert validate_source(_two_class_source(tmp_path, True, True)).file_backed
    assert not validate_source(_two_class_source(tmp_path, False, False, channels=1)).file_backed
    with pytest.raises(SourceError, match="decoded to RGB, so a file-backed source must declare channels=3, got 1"):
        validate_source(_two_class_source(tmp_path, True, True, channels=1))


# ----------------------------------------------------------------------------- imagefolder
def test_imagefolder_class_folders(tmp_path):
    written = write_imagefolder(tmp_path)
    source = load_source("imagefolder", str(tmp_path))
    assert source.class_names == ["cat", "dog", "eel"] and source.channels == 3 and source.resolution is None
    assert source.file_backed and len(source.train) == 9 and len(source.val) == 6
    assert [Path(p) for p in source.train.paths] == [p for p, _ in written["train"]]
    assert source.train.labels.tolist() == [k for _, k in written["train"]]
    assert decode_rgb(source.train.paths[0]).shape == (40, 56, 3)  # the PNG
    listing = load_source("imagefolder", str(tmp_path), fingerprint="listing")
    assert listing.fingerprint != source.fingerprint
    assert load_source("imagefolder", str(tmp_path), resolution="32").resolution == 32


def test_imagefolder_flat_val_with_label_file_forms(tmp_path):
    written = write_imagefolder(tmp_path, flat_val=True)
    source = load_source("imagefolder", str(tmp_path), val_labels=str(written["labels_file"]))
    expected = sorted(written["val"], key=lambda item: item[0].name)
    assert source.val.labels.tolist() == [k for _, k in expected]
    # the index form: one 0-based class index per line, in sorted file-name order
    index_file = tmp_path / "indices.txt"
    index_file.write_text("".join(f"{k}\n" for _, k in expected))
    assert load_source("imagefolder", str(tmp_path), val_labels=str(index_file)).val.labels.tolist() == \
        [k for _, k in expected]
    # Kaggle's CSV: header, stem without extension, class then a box
    csv_file = tmp_path / "LOC_val_solution.csv"
    csv_file.write_text("ImageId,PredictionString\n" + "".join(
        f"{p.stem},{['cat', 'dog', 'eel'][k]} 1 2 3 4\n" for p, k in expected))
    assert load_source("imagefolder", str(tmp_path), val_labels=str(csv_file)).val.labels.tolist() == \
        [k for _, k in expected]


def test_imagefolder_flat_val_needs_label_file(tmp_path):
    write_imagefolder(tmp_path, flat_val=True)
    with pytest.raises(ValueError, match="pass the option val_labels=PATH"):
        load_source("imagefolder", str(tmp_path))


def test_imagefolder_label_index_out_of_range_names_value_and_file(tmp_path):
    write_imagefolder(tmp_path, flat_val=True)
    bad = tmp_path / "bad.txt"
    bad.write_text("0\n1\n2\n0\n7\n2\n")
    with pytest.raises(ValueError, match=r"val label 7 is out of range for 3 classes .* in .*bad.txt"):
        load_source("imagefolder", str(tmp_path), val_labels=str(bad))


def test_imagefolder_empty_class_folder_is_named(tmp_path):
    write_imagefolder(tmp_path)
    for path in (tmp_path / "train" / "dog").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="class 'dog' has no images"):
        load_source("imagefolder", str(tmp_path))


def test_imagefolder_train_val_class_mismatch_names_classes(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "val" / "eel").rename(tmp_path / "val" / "emu")
    with pytest.raises(ValueError, match=r"train and val classes differ .*only in train \['eel'\], only in val \['emu'\]"):
        load_source("imagefolder", str(tmp_path))


def test_imagefolder_missing_split_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val does not exist"):
        load_source("imagefolder", str(tmp_path))


# ----------------------------------------------------------------------------- tiny-imagenet
def test_tiny_imagenet_official_layout(tmp_path):
    written = write_tiny_imagenet(tmp_path)
    source = load_source("tiny-imagenet", str(tmp_path))
    assert source.class_names == ["thing n01", "thing n02", "thing n03"]
    assert source.train.images.shape == (9, 64, 64, 3) and source.val.images.shape == (6, 64, 64, 3)
    first_val = min(written["val"], key=lambda item: item[0].name)
    np.testing.assert_array_equal(source.val.images[0], np.asarray(Image.open(first_val[0]).convert("RGB")))
    assert source.val.labels[0] == ["n01", "n02", "n03"].index(first_val[1])
    assert source.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_tiny_imagenet_corrupt_image_names_the_file(tmp_path):
    written = write_tiny_imagenet(tmp_path)
    path = written["train"][4][0]
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"{path.name} is truncated or corrupt"):
        load_source("tiny-imagenet", str(tmp_path))


def test_tiny_imagenet_wrong_size_image_names_the_file(tmp_path):
    written = write_tiny_imagenet(tmp_path)
    path = written["val"][1][0]
    Image.new("RGB", (32, 64)).save(path, format="JPEG")
    with pytest.raises(ValueError, match=f"{path.name} is 32 x 64 px"):
        load_source("tiny-imagenet", str(tmp_path))


def test_tiny_imagenet_unknown_val_class_is_named(tmp_path):
    write_tiny_imagenet(tmp_path)
    annotations = tmp_path / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace("\tn03\t", "\tn99\t"))
    with pytest.raises(ValueError, match=r"classes not in wnids.txt: \['n99'\]"):
        load_source("tiny-imagenet", str(tmp_path))


def test_tiny_imagenet_empty_class_is_named(tmp_path):
    written = write_tiny_imagenet(tmp_path)
    for path, wnid in written["train"]:
        if wnid == "n03":
            path.unlink()
    with pytest.raises(ValueError, match="class 'n03' has no images"):
        load_source("tiny-imagenet", str(tmp_path))


# ----------------------------------------------------------------------------- npz
def test_npz_with_explicit_val_and_names(tmp_path):
    rng = np.random.default_rng(0)
    x, x_val = rng.integers(0, 256, (12, 10, 10), dtype=np.uint8), rng.integers(0, 256, (6, 10, 10), dtype=np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=np.arange(12) % 3, x_val=x_val, y_val=np.arange(6) % 3, class_names=np.array(["a", "b", "c"]))
    source = load_source("npz", str(path))
    assert source.name == "toy" and source.class_names == ["a", "b", "c"] and source.channels == 1
    np.testing.assert_array_equal(source.val.images[..., 0], x_val)
    # a split option cannot apply to a file with its own val arrays: refused, not ignored
    with pytest.raises(ValueError, match=r"has its own val split.*\['val_fraction'\] would be ignored"):
        load_source("npz", str(path), val_fraction="0.3")


def test_digits_refuse_a_root():
    with pytest.raises(ValueError, match="ship with scikit-learn; remove data.root"):
        load_source("digits", "/data/digits")


def test_npz_seeded_split_of_rgb_arrays(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, x=x, y=np.arange(40) % 4)
    source = load_source("npz", str(path), val_fraction="0.25", seed="3")
    assert source.channels == 3 and source.resolution == 6 and source.class_names == ["0", "1", "2", "3"]
    assert len(source.val) == 8 and np.bincount(source.val.labels).tolist() == [2, 2, 2, 2]
    assert source.options == {"val_fraction": 0.25, "seed": 3}


def test_npz_errors_name_the_file_value_and_class(tmp_path):
    x = np.zeros((8, 4, 4), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(8) % 2, x_val=x[:4], y_val=np.array([0, 1, 5, 0]), class_names=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"val label 5 is out of range for 2 classes .* in .*d.npz \(array 'y_val'\)"):
        load_source("npz", str(path))
    np.savez(path, x=x, y=np.arange(8) % 2, x_val=x[:4], y_val=np.zeros(4, dtype=int), class_names=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"val split has no samples of class\(es\) \['b'\]"):
        load_source("npz", str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="d.npz is truncated or corrupt"):
        load_source("npz", str(path))
    np.savez(path, x=x.astype(np.float32), y=np.arange(8) % 2)
    with pytest.raises(ValueError, match="'x' must be uint8"):
        load_source("npz", str(path))
