"""The restricted unpickler against hostile files: a crafted object array and mutated CIFAR batches.

Each hostile file is read in a child process, so that a crash (a segmentation fault, an abort) shows
up as the child's exit status instead of taking the test session down.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.fakes import py2_pickle, write_cifar10

ROOT = Path(__file__).resolve().parents[2]


class _Call:
    """Pickles as ``callable(*args)``."""

    def __init__(self, callable_, args):
        self.reduced = (callable_, args)

    def __reduce__(self):
        return self.reduced


def crafted_object_array(count: int = 4) -> bytes:
    """``batches.meta`` whose label names are ``numpy.ndarray((count,), 'O', <file bytes>)``: an object array
    whose pointers are the file's bytes (0x41...), which numpy dereferences when the names are read."""
    return pickle.dumps({b"label_names": _Call(np.ndarray, ((count,), "O", b"\x41" * 8 * count)),
                         b"num_cases_per_batch": 10, b"num_vis": 3072}, protocol=2)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), str(ROOT / "tests"),
                                                        str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_crafted_object_array_is_refused_not_dereferenced(tmp_path):
    write_cifar10(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(crafted_object_array())
    done = _run("import sys\nfrom unidd_ray.cli import main\n"
                "sys.exit(main(['prepare', '--dataset', 'cifar10', '--root', sys.argv[1], '--out', sys.argv[2]]))",
                str(tmp_path), str(tmp_path / "out"))
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])  # a clear refusal: not -11 (SIGSEGV)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "batches.meta cannot be loaded safely" in lines[0], done.stderr
    assert "refusing to call numpy.ndarray" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("payload", [
    _Call(np.ndarray, ((2,), "u1", b"\x00\x01")),  # the class itself is not callable, whatever the dtype
    _Call(np.ndarray.__reduce__(np.zeros(1))[0], (np.recarray, (0,), b"b")),  # another array class
    _Call(np.ndarray.__reduce__(np.zeros(1))[0], (np.ndarray, (1 << 40,), b"b")),  # a huge placeholder
])
def test_only_numpys_own_reconstruction_is_accepted(tmp_path, payload):
    from unidd_ray.data.safe_pickle import load_restricted_pickle
    from unidd_ray.data.source_types import SourceError

    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": payload}, protocol=2))
    with pytest.raises(SourceError, match=r"batch cannot be loaded safely \(refusing"):
        load_restricted_pickle(path)


def fuzz(root: str, mutations: int, seed: int) -> dict:
    """Read ``mutations`` mutated copies of the CIFAR batches under ``root`` (random byte flips and
    truncations) as the CIFAR source reads them; every one must load or be refused with a SourceError.
    Returns counts per outcome and the first few unexpected exceptions."""
    from unidd_ray.data.formats.cifar import _read_batch
    from unidd_ray.data.source_types import SourceError

    rng = np.random.default_rng(seed)
    folder = Path(root)
    originals = [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.name != "batches.meta"]
    target = folder / "mutated"
    counts = {"loaded": 0, "refused": 0, "unexpected": 0}
    unexpected = []
    for i in range(mutations):
        name, data = originals[rng.integers(len(originals))]
        data = bytearray(data)
        if i % 3 == 2:  # a truncation
            data = data[:int(rng.integers(0, len(data)))]
        else:  # 1 to 16 flipped bytes, anywhere
            for at in rng.integers(0, len(data), int(rng.integers(1, 17))):
                data[at] ^= int(rng.integers(1, 256))
        target.write_bytes(bytes(data))
        try:
            images, labels = _read_batch(target, "train", "labels", 10)
            assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3) and len(labels) == len(images)
            counts["loaded"] += 1
        except SourceError as exc:
            assert str(target) in str(exc)  # the message names the file
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - what the test counts
            counts["unexpected"] += 1
            unexpected.append(f"{name} mutation {i}: {type(exc).__name__}: {exc}"[:300])
    return {"counts": counts, "unexpected": unexpected[:5]}


@pytest.mark.parametrize("python2", [False, True], ids=["python3-pickles", "python2-pickles"])
def test_mutated_cifar_batches_are_read_or_refused_never_crash(tmp_path, python2):
    write_cifar10(tmp_path, per_batch=10, python2=python2)
    folder = tmp_path / "cifar-10-batches-py"
    done = _run("import json, sys\nfrom test_safe_pickle import fuzz\n"
                "print(json.dumps(fuzz(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))",
                str(folder), "3000", str(int(python2)))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # no crash, no uncaught error
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["counts"]["unexpected"] == 0, result["unexpected"]
    # Python 3 pickles store bytes as UTF-8 text, so most flips there break the encoding: fewer load
    assert result["counts"]["refused"] > 1000 and result["counts"]["loaded"] >= 10, result["counts"]


def test_py2_form_of_the_fakes_is_what_the_fuzz_starts_from(tmp_path):
    """The fuzz's starting files load: the mutations, not the originals, are what gets refused."""
    from unidd_ray.data.formats.cifar import _read_batch

    path = tmp_path / "batch"
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path.write_bytes(py2_pickle({b"data": images, b"labels": [1, 2]}))
    loaded, labels = _read_batch(path, "train", "labels", 10)
    assert loaded.shape == (2, 32, 32, 3) and labels.tolist() == [1, 2]
