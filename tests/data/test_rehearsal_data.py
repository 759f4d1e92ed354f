"""`unidd-ray rehearsal-data`: an ImageNet-shaped folder that the imagefolder source reads as ImageNet."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from unidd_ray.artifacts.files import OutputError
from unidd_ray.cli import main
from unidd_ray.data.rehearsal import LABEL_FILE, write_imagenet_like
from unidd_ray.data.sources import load_source


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_imagenet_like(tmp_path_factory.mktemp("rehearsal") / "inet", classes=12, train_per_class=4,
                               val_per_class=2, min_side=40, max_side=90, grayscale=0.25, cmyk=0.25, seed=3)


def test_the_layout_is_imagenet_s(folder):
    wnids = sorted(p.name for p in (folder / "train").iterdir())
    assert len(wnids) == 12 and all(len(w) == 9 and w.startswith("n0") and w[1:].isdigit() for w in wnids)
    for wnid in wnids:
        assert sorted(p.name for p in (folder / "train" / wnid).iterdir()) == [f"{wnid}_{i}.JPEG" for i in range(4)]
    val = sorted(p.name for p in (folder / "val").iterdir())
    assert val == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 25)]
    rows = (folder / LABEL_FILE).read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString" and len(rows) == 25
    assert Counter(r.split(",")[1].split()[0] for r in rows[1:]) == {w: 2 for w in wnids}


def test_images_vary_in_size_and_mode_like_the_real_set(folder):
    images = [Image.open(p) for p in sorted(folder.rglob("*.JPEG"))]
    assert all(im.format == "JPEG" and 40 <= min(im.size) and max(im.size) <= 90 for im in images)
    assert {im.mode for im in images} == {"RGB", "L", "CMYK"}
    assert len({im.size for im in images}) > 20
    assert any(im.size[0] > im.size[1] for im in images) and any(im.size[0] < im.size[1] for im in images)


def test_the_imagefolder_source_reads_it_with_the_label_file(folder):
    source = load_source("imagefolder", str(folder), val_labels=str(folder / LABEL_FILE))
    wnids = sorted(p.name for p in (folder / "train").iterdir())
    assert source.class_names == wnids
    truth = {r.split(",")[0]: wnids.index(r.split(",")[1].split()[0])
             for r in (folder / LABEL_FILE).read_text().splitlines()[1:]}
    val = source.val
    assert [truth[Path(p).stem] for p in val.paths] == list(val.labels)
    assert list(source.train.labels) == [k for k in range(12) for _ in range(4)]


def test_same_seed_same_bytes_and_a_rerun_replaces_its_own_output(folder, tmp_path):
    again = write_imagenet_like(tmp_path / "again", classes=12, train_per_class=4, val_per_class=2, min_side=40,
                                max_side=90, grayscale=0.25, cmyk=0.25, seed=3)
    assert _digest(again) == _digest(folder)
    write_imagenet_like(again, classes=3, min_side=20, max_side=30, seed=4)  # over its own output: replaced
    assert len(list((again / "train").iterdir())) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside it


def test_a_folder_it_did_not_write_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(OutputError, match="did not write"):
        write_imagenet_like(mine, classes=2, min_side=20, max_side=30)
    assert main(["rehearsal-data", "--out", str(mine), "--classes", "2"]) == 2
    assert "photos" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


def test_bad_counts_are_one_line(tmp_path, capsys):
    assert main(["rehearsal-data", "--out", str(tmp_path / "x"), "--classes", "0"]) == 2
    assert "classes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
