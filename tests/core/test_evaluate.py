"""Relabel-and-train evaluation (SPEC §1.3) on hand-made distilled sets with predictable accuracy.

The distilled sets here are *real* digits images written in the distilled format
(``write_real_subset``), so the accuracy a student reaches is known in advance:
real labels teach the task, shuffled labels do not.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from unidd_ray.config import EvaluateConfig

STUDENT = {"student": "convnet", "student_options": {"width": 32, "depth": 2, "norm": "batch"}}


def _cfg(**kw) -> EvaluateConfig:
    base = dict(STUDENT, epochs=60, seeds=1, temperature=4.0, eval_batch_size=512)
    base.update(kw)
    return EvaluateConfig(**base)


@pytest.fixture(scope="module")
def real_set(digits_data, tmp_path_factory) -> Path:
    """10 real images per class of the digits train split, in the distilled format."""
    from unidd_ray.stages.subset import write_real_subset

    return write_real_subset(digits_data, tmp_path_factory.mktemp("evaluate") / "real-ipc10", ipc=10, seed=0)


@pytest.fixture(scope="module")
def small_set(digits_data, tmp_path_factory) -> Path:
    """2 real images per class: the IPC of the digits recipe."""
    from unidd_ray.stages.subset import write_real_subset

    return write_real_subset(digits_data, tmp_path_factory.mktemp("evaluate") / "real-ipc2", ipc=2, seed=0)


@pytest.fixture(scope="module")
def teacher(digits_teacher):
    from unidd_ray.artifacts.teacher import load_teacher

    return load_teacher(digits_teacher)


def _load(path, tinfo):
    from unidd_ray.artifacts.distilled import load_distilled

    return load_distilled(path, mean=tinfo.mean, std=tinfo.std)


def _evaluate(images, labels, teacher, data_dir, cfg, **kw) -> list[float]:
    from unidd_ray.core.evaluation import evaluate_in_process

    model, tinfo = teacher
    return evaluate_in_process(images, labels, model, str(data_dir), cfg, num_classes=tinfo.num_classes,
                               in_channels=tinfo.in_channels, resolution=tinfo.resolution,
                               seeds=kw.pop("seeds", [0]), **kw)


# ----------------------------------------------------------------------------- the distilled format
def test_real_subset_is_a_valid_distilled_set(real_set, digits_data, teacher):
    from unidd_ray.artifacts.files import read_manifest
    from unidd_ray.artifacts.dataset import read_labels

    _, tinfo = teacher
    images, labels, rows = _load(real_set, tinfo)
    assert images.shape == (100, 1, 8, 8)
    assert torch.bincount(labels, minlength=10).tolist() == [10] * 10
    train_labels = read_labels(str(digits_data), "train")
    # every image is the real train image it claims to be, of the class it is filed under
    assert all(int(train_labels[r["source_index"]]) == r["class"] for r in rows)
    assert len({r["source_index"] for r in rows}) == 100
    assert read_manifest(real_set, "distilled")["method"] == "random"


# ----------------------------------------------------------------------------- predictable accuracy
def test_hard_labels_real_beat_shuffled(real_set, digits_data, teacher):
    _, tinfo = teacher
    images, labels, _ = _load(real_set, tinfo)
    cfg = _cfg(hard_labels=True)
    real = _evaluate(images, labels, teacher, digits_data, cfg)[0]
    shuffled_labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert (shuffled_labels != labels).float().mean() > 0.8
    shuffled = _evaluate(images, shuffled_labels, teacher, digits_data, cfg)[0]
    # a consistent relabelling of the classes: the student learns the task but names every class wrong
    permuted = _evaluate(images, (labels + 1) % 10, teacher, digits_data, cfg)[0]
    assert real > 60, real
    assert shuffled < 30, shuffled
    assert permuted < 15, permuted


def test_soft_labels_match_or_beat_hard_labels(small_set, digits_data, teacher):
    """At IPC 2 (the digits recipe, 300 epochs) the teacher's soft labels beat one-hot labels."""
    _, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    hard = _evaluate(images, labels, teacher, digits_data, _cfg(hard_labels=True, epochs=300), seeds=[0, 1])
    soft = _evaluate(images, labels, teacher, digits_data, _cfg(epochs=300), seeds=[0, 1])
    assert statistics.fmean(soft) >= statistics.fmean(hard) - 1.0, (soft, hard)
    assert min(soft) > 60, soft
    # soft labels do not read the set's labels at all: wrong labels give the same students
    soft_wrong = _evaluate(images, (labels + 1) % 10, teacher, digits_data, _cfg(epochs=300), seeds=[0])
    assert soft_wrong[0] == soft[0]


def test_any_registry_model_works_as_student(small_set, digits_data, teacher):
    _, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    # a ResNet-18 student (CIFAR stem at 8 px) learns from the ConvNet teacher's soft labels on 20 images:
    # 75 % and 77 % after 30 epochs when written; chance is 10 %
    accs = _evaluate(images, labels, teacher, digits_data, _cfg(student="resnet18", student_options={}, epochs=30),
                     seeds=[0, 1])
    assert len(accs) == 2 and min(accs) > 50, accs


def test_instance_norm_convnet_normalises_each_image_channel_over_its_positions():
    """`norm: instance` (the ConvNet-IN student of docs/notes/2026-12-06-fashion-mnist-investigations.md):
    each image's channel is standardised over its own H x W positions, in train and eval mode alike,
    so an image's output does not depend on the rest of the batch (a BatchNorm student's does, in training)."""
    from unidd_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("convnet", num_classes=10, in_channels=1, resolution=16, width=8, depth=2, norm="instance")
    norm = model.features[1]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(4, 8, 16, 16) * torch.linspace(0.1, 5, 8).view(1, 8, 1, 1) + 3.0
    x64 = x.double()
    mean = x64.mean(dim=(2, 3), keepdim=True)
    var = x64.var(dim=(2, 3), unbiased=False, keepdim=True)
    expected = (x64 - mean) / torch.sqrt(var + norm.eps) * norm.weight.double().view(1, 8, 1, 1) \
        + norm.bias.double().view(1, 8, 1, 1)
    for mode in (True, False):
        norm.train(mode)
        torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-5)

    images = torch.randn(6, 1, 16, 16)
    crowd = torch.cat([images[:1], 5 * images[1:] + 2])  # the first image among differently scaled ones
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(model(images[:1]), model(crowd)[:1], rtol=1e-5, atol=1e-5)
    batch_model = build_model("convnet", num_classes=10, in_channels=1, resolution=16, width=8, depth=2).train()
    with torch.no_grad():
        assert not torch.allclose(batch_model(images[:1].repeat(2, 1, 1, 1))[:1], batch_model(crowd)[:1], atol=1e-3)


def test_seeds_are_reproducible_and_distinct(small_set, digits_data, teacher):
    from unidd_ray.core.evaluation import TeacherLabels

    model, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    cfg = _cfg(epochs=20)
    first = _evaluate(images, labels, teacher, digits_data, cfg, seeds=[0, 1])
    again = _evaluate(images, labels, teacher, digits_data, cfg, seeds=[1])
    assert again[0] == first[1]
    # the students themselves: a seed gives the same weights every time, another seed other weights
    settings = cfg
    a, b, a_again = (_train(images, labels, teacher, settings, TeacherLabels(model), seed=s) for s in (0, 1, 0))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), a_again.state_dict().values()))
    assert not torch.allclose(a.state_dict()["classifier.weight"], b.state_dict()["classifier.weight"], atol=1e-3)
    with torch.no_grad():
        assert not torch.allclose(a(images), b(images), atol=1e-3)


# ----------------------------------------------------------------------------- settings checked up front
@pytest.mark.parametrize("override, message", [
    ({"epochs": 0}, "evaluate.epochs must be an integer >= 1, got 0"),
    ({"batch_size": 0}, r"evaluate.batch_size must be an integer >= 1 \(or null\), got 0"),
    ({"batch_size": -4}, "evaluate.batch_size must be an integer >= 1"),
    ({"lr": 0.0}, "evaluate.lr must be a finite number > 0, got 0.0"),
    ({"lr": float("inf")}, "evaluate.lr must be a finite number > 0, got inf"),
    ({"weight_decay": float("nan")}, "evaluate.weight_decay must be a finite number >= 0, got nan"),
    ({"weight_decay": -0.1}, "evaluate.weight_decay must be a finite number >= 0"),
    ({"temperature": 0.0}, "evaluate.temperature must be a finite number > 0"),
    ({"temperature": float("inf")}, "evaluate.temperature must be a finite number > 0"),
    ({"cutmix": -0.5}, "evaluate.cutmix must be a finite number >= 0"),
    ({"cutmix": float("nan")}, "evaluate.cutmix must be a finite number >= 0"),
    ({"crop_scale": (1.0, 0.5)}, r"evaluate.crop_scale must be \[low, high\] with 0 < low <= high <= 1"),
    ({"crop_scale": (0.0, 1.0)}, "evaluate.crop_scale must be"),
    ({"crop_scale": (0.5, 1.5)}, "evaluate.crop_scale must be"),
    ({"seeds": 0}, "evaluate.seeds must be an integer >= 1"),
    ({"split": "batch"}, r"evaluate.split must be one of \['data', 'seeds'\], got 'batch'"),
    ({"eval_every": -1}, "evaluate.eval_every must be an integer >= 0"),
    ({"workers": 0}, "evaluate.workers must be an integer >= 1"),
    ({"student": "vgg11"}, "evaluate.student must be one of"),
    ({"student_options": {"widht": 8}}, r"evaluate.student_options do not suit 'convnet'.*not \['widht'\]"),
])
def test_bad_evaluate_settings_are_refused_when_built(override, message):
    """Refused when the section is built, from code or from a recipe's ``--set``: no evaluation settings
    object exists that a stage would have to check again."""
    from unidd_ray.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**override)
    key, value = next(iter(override.items()))
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True).strip()
    if text.startswith(".nan") or text.startswith(".inf"):
        return  # (YAML spells them so: checked above)
    with pytest.raises(ConfigError, match=message):
        load_recipe("digits", overrides=[f"evaluate.{key}={text}"])


def test_good_evaluate_settings_pass():
    for good in ({}, {"batch_size": None}, {"batch_size": 1}, {"cutmix": 0.0}, {"crop_scale": (1.0, 1.0)},
                 {"weight_decay": 0.0}, {"eval_every": 5}):
        EvaluateConfig(**good)


@pytest.mark.parametrize("batch_size, images, workers, refused", [
    (None, 20, 2, False),  # one batch of 20: 10 each
    (None, 1, 2, True),  # one image for two workers
    (19, 20, 2, True),  # the last batch holds one image
    (18, 20, 2, False),  # 18 + 2
    (30, 20, 2, False),  # the batch is the whole set
    (5, 20, 6, True),
    (10, 20, 10, False),
])
def test_data_parallel_batches_leave_no_worker_empty(batch_size, images, workers, refused):
    """With ``split: data`` each batch is shared out to the workers: a batch (the last, partial one too) with
    fewer images than workers would leave one without any, so the settings are refused up front."""
    from unidd_ray.core.evaluation import check_batches

    cfg = EvaluateConfig(split="data", workers=workers, batch_size=batch_size)
    if refused:
        with pytest.raises(ValueError, match=f"shares every batch out to the {workers} evaluate.workers"):
            check_batches(cfg, images=images)
    else:
        check_batches(cfg, images=images)
    check_batches(replace(cfg, split="seeds"), images=images)  # each worker trains on every image
    check_batches(replace(cfg, workers=1), images=images)


def test_check_student_names_the_student_and_its_options():
    from unidd_ray.core.evaluation import check_student

    shape = {"num_classes": 10, "in_channels": 1, "resolution": 8}
    check_student(_cfg(), **shape)
    check_student(_cfg(student="resnet18", student_options={"stem": "cifar"}), **shape)
    with pytest.raises(ValueError, match=r"evaluate.student_options do not suit 'resnet18'.*"
                                         r"takes options \['stem'\], not \['depth', 'norm', 'width'\]"):
        check_student(_cfg(student="resnet18"), **shape)  # (refused when the settings are built)
    with pytest.raises(ValueError, match="evaluate.student 'convnet'"):  # an option's value: when it is built
        check_student(_cfg(student_options={"width": "wide"}), **shape)


# ----------------------------------------------------------------------------- finished seeds of a crashed run
def test_finished_seeds_survive_a_change_of_performance_settings(tmp_path):
    """A re-run after a crash with other performance settings (fewer workers, another eval batch size or
    layout) or another seed count takes the seeds the crashed run finished; a setting that changes the
    students does not, nor other images, teacher or dataset."""
    from types import SimpleNamespace

    from unidd_ray.artifacts.evaluation import finished_seeds, write_seed_record
    from unidd_ray.artifacts.files import write_manifest
    from unidd_ray.stages.evaluate import EvalJob, job_key

    teacher, data = SimpleNamespace(sha256="t"), SimpleNamespace(fingerprint="f", storage="raw")
    cfg = _cfg(split="seeds", workers=2, cpus_per_worker=2, eval_batch_size=512, channels_last=False, seeds=2)
    crashed = EvalJob("set", tmp_path / "eval", cfg)
    record = {"job": 0, "seed": 0, "top1": 81.0, "seconds": 1.0, "key": job_key(crashed, "images", teacher, data)}
    write_seed_record(tmp_path / "eval", record)
    for performance in ({"workers": 1}, {"cpus_per_worker": 1}, {"eval_batch_size": 100}, {"channels_last": True},
                        {"use_gpu": True}, {"seeds": 5}, {"seeds": 1}):
        again = EvalJob("set", tmp_path / "eval", replace(cfg, **performance))
        assert finished_seeds(tmp_path / "eval", job_key(again, "images", teacher, data)) == {0: record}, performance
    for result in ({"lr": 2e-3}, {"epochs": 61}, {"split": "data"}, {"batch_size": 4}):
        other = EvalJob("set", tmp_path / "eval", replace(cfg, **result))
        assert finished_seeds(tmp_path / "eval", job_key(other, "images", teacher, data)) == {}, result
    assert job_key(crashed, "other images", teacher, data) != record["key"]
    assert job_key(crashed, "images", SimpleNamespace(sha256="u"), data) != record["key"]
    assert job_key(crashed, "images", teacher, SimpleNamespace(fingerprint="g", storage="raw")) != record["key"]
    # stored soft labels enter by content: other labels written into the same folder are other students
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "soft_labels.parquet").write_bytes(b"first")
    write_manifest(labels, "soft_labels")
    stored = EvalJob("set", tmp_path / "eval", cfg, soft_labels=labels)
    first = job_key(stored, "images", teacher, data)
    (labels / "soft_labels.parquet").write_bytes(b"second")
    write_manifest(labels, "soft_labels")
    assert len({first, job_key(stored, "images", teacher, data), record["key"]}) == 3
    hard = replace(cfg, hard_labels=True)  # hard labels read no soft labels
    assert job_key(EvalJob("set", "o", hard, soft_labels=labels), "images", teacher, data) == \
        job_key(EvalJob("set", "o", hard), "images", teacher, data)
    # with split: data the worker count shards every batch (and BatchNorm): it is part of the key
    split_data = replace(cfg, split="data")
    assert job_key(EvalJob("set", "o", replace(split_data, workers=1)), "images", teacher, data) != \
        job_key(EvalJob("set", "o", replace(split_data, workers=2)), "images", teacher, data)


def _identity(directory) -> str:
    from unidd_ray.artifacts import distilled
    from unidd_ray.keys import distilled_identity

    return distilled_identity(*distilled.identity_inputs(directory))


def test_distilled_identity_is_the_images_the_evaluation_reads(small_set, tmp_path):
    """The identity of a distilled set changes with an image's bytes or class, not with its summary, config
    or an extra file (a .beton): a bit-identical recomputed set is the same input."""
    import pyarrow.parquet as pq

    from unidd_ray.artifacts.files import read_manifest, write_manifest
    copy = tmp_path / "set"
    shutil.copytree(small_set, copy)
    manifest = read_manifest(copy, "distilled")
    meta = {k: v for k, v in manifest.items() if k not in ("kind", "format_version", "files")}
    identity = _identity(copy)
    assert _identity(small_set) == identity
    (copy / "summary.json").write_text('{"seconds": 123.4}')
    (copy / "distilled.beton").write_bytes(b"beton")
    write_manifest(copy, "distilled", **meta)
    assert read_manifest(copy, "distilled")["files"] != manifest["files"]
    assert _identity(copy) == identity
    table = pq.read_table(copy / "manifest.parquet")
    rows = table.to_pylist()
    image = copy / rows[0]["path"]
    image.write_bytes(image.read_bytes() + b"\0")  # another file under the same name
    write_manifest(copy, "distilled", **meta)
    assert _identity(copy) != identity
    shutil.rmtree(copy)
    shutil.copytree(small_set, copy)
    # the same images in another order: an image's row is its id in the augmentation stream and soft labels
    pq.write_table(pa.Table.from_pylist(rows[::-1], schema=table.schema), copy / "manifest.parquet")
    write_manifest(copy, "distilled", **meta)
    assert _identity(copy) != identity
    shutil.rmtree(copy)
    shutil.copytree(small_set, copy)
    rows[0]["class"] = (rows[0]["class"] + 1) % 10  # the same image under another label
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), copy / "manifest.parquet")
    write_manifest(copy, "distilled", **meta)
    assert _identity(copy) != identity


def test_stored_seeds_alone_make_the_summary(ray_session, small_set, digits_teacher, digits_data, tmp_path):
    """Every seed stored: no Ray Train run starts and the summary says nothing was trained."""
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.evaluation import write_seed_record
    from unidd_ray.artifacts.teacher import read_teacher_info
    from unidd_ray.stages.evaluate import RUN_NAME, EvalJob, job_key, run_evaluations

    cfg = _cfg(epochs=5, seeds=1)
    out = tmp_path / "eval"
    key = job_key(EvalJob(small_set, out, cfg), _identity(small_set),
                  read_teacher_info(digits_teacher), read_dataset_info(digits_data))
    write_seed_record(out, {"job": 3, "seed": 0, "top1": 42.5, "seconds": 2.0, "key": key})
    (summary,) = run_evaluations([EvalJob(small_set, out, cfg)], digits_teacher, digits_data,
                                 storage_path=tmp_path / "ray")
    assert not (tmp_path / "ray" / RUN_NAME).exists()
    assert (summary["top1"], summary["seeds"], summary["seconds"]) == ([42.5], [0], 2.0)
    assert (summary["trained_seeds"], summary["trained_seconds"]) == ([], 0)
    (again,) = run_evaluations([EvalJob(small_set, out, replace(cfg, seeds=2))], digits_teacher, digits_data,
                               storage_path=tmp_path / "ray")
    assert again["trained_seeds"] == [1] and again["top1"][0] == 42.5


def test_evaluations_with_other_settings_in_one_folder_keep_their_seeds(ray_session, small_set, digits_teacher,
                                                                        digits_data, tmp_path):
    """``evaluate --out`` twice into one folder with settings that change the students: each run's seeds stay
    (named by seed and key), so going back to the first settings trains nothing."""
    from unidd_ray.artifacts.evaluation import SEEDS
    from unidd_ray.stages.evaluate import RUN_NAME, EvalJob, run_evaluations

    first, other = _cfg(epochs=5, seeds=1), _cfg(epochs=5, seeds=1, lr=3e-3)
    out = tmp_path / "eval"
    (a,) = run_evaluations([EvalJob(small_set, out, first)], digits_teacher, digits_data, storage_path=tmp_path / "r")
    (b,) = run_evaluations([EvalJob(small_set, out, other)], digits_teacher, digits_data, storage_path=tmp_path / "r")
    assert b["trained_seeds"] == [0] and len(list((out / SEEDS).iterdir())) == 2
    shutil.rmtree(tmp_path / "r" / RUN_NAME)
    (again,) = run_evaluations([EvalJob(small_set, out, first)], digits_teacher, digits_data,
                               storage_path=tmp_path / "r")
    assert not (tmp_path / "r" / RUN_NAME).exists()  # no Ray Train run: the first settings' seed was kept
    assert again["top1"] == a["top1"] and again["trained_seeds"] == []


# ----------------------------------------------------------------------------- augmentation stream
def test_epoch_augment_is_a_function_of_stream_seed_and_epoch():
    from unidd_ray.core.evaluation import epoch_augment

    def same(a, b):
        return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("crop", "flip", "partner", "box"))

    base = EvaluateConfig(aug_seed=3)
    torch.manual_seed(0)
    a = epoch_augment(50, 7, base)
    torch.manual_seed(123)  # the global RNG plays no part
    torch.rand(10)
    assert same(a, epoch_augment(50, 7, base))
    # settings that are not part of the stream do not change it
    other = replace(base, epochs=5, batch_size=7, lr=0.5, weight_decay=0.0, temperature=1.0, hard_labels=True)
    assert same(a, epoch_augment(50, 7, other))
    # the epoch and the stream seed do
    assert not torch.equal(a.crop, epoch_augment(50, 8, base).crop)
    assert not torch.equal(a.crop, epoch_augment(50, 7, replace(base, aug_seed=4)).crop)
    assert not torch.equal(a.partner, epoch_augment(50, 7, replace(base, aug_seed=4)).partner)
    # parameters are valid: crops inside the image, a permutation of partners, boxes inside the image
    assert torch.equal(a.partner.sort().values, torch.arange(50))
    assert (a.crop >= 0).all() and (a.crop[:, 0] + a.crop[:, 2] <= 1 + 1e-9).all()
    assert (a.box >= 0).all() and (a.box[:, 0] + a.box[:, 2] <= 1 + 1e-9).all()
    assert a.box[:, 2:].sum() > 0
    assert (epoch_augment(50, 7, replace(base, cutmix=0)).box == 0).all()


def test_augment_batch_is_independent_of_the_batch(teacher):
    from unidd_ray.core.evaluation import augment_batch, epoch_augment

    images = torch.randn(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    aug = epoch_augment(30, 2, EvaluateConfig())
    full, partner_full, lam_full = augment_batch(images, torch.arange(30), aug)
    ids = torch.tensor([17, 3, 29, 0])
    part, partner_part, lam_part = augment_batch(images, ids, aug)
    assert torch.equal(part, full[ids]) and torch.equal(partner_part, partner_full[ids])
    assert torch.equal(lam_part, lam_full[ids])


def test_teacher_labels_do_not_depend_on_batch_order_and_memoise(small_set, teacher):
    """Online labels are a function of (epoch, image id): the seed's batch order changes nothing, a
    later student of the same set reads them from the memo, and the memo keeps to its budget."""
    from unidd_ray.core.evaluation import TeacherLabels, augment_batch, epoch_augment

    model, tinfo = teacher
    images, _, _ = _load(small_set, tinfo)
    n = len(images)
    aug = epoch_augment(n, 3, EvaluateConfig())
    ids = torch.arange(n)
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    mixed, _, _ = augment_batch(images, ids, aug)
    mixed_shuffled, _, _ = augment_batch(images, shuffled, aug)
    with torch.no_grad():
        direct = model(mixed)
    plain = TeacherLabels(model)
    in_order = plain(3, ids, mixed)
    torch.testing.assert_close(in_order, direct, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain(3, shuffled, mixed_shuffled), in_order[shuffled])  # bit for bit
    assert plain.memo == {} and plain.hits == 0  # no budget, no memo

    memo = TeacherLabels(model, memo_bytes=1 << 20)
    first = memo(3, shuffled, mixed_shuffled)
    again = memo(3, ids, mixed)  # another seed's order, same epoch and images: from the memo
    assert memo.hits == 1 and torch.equal(again, in_order) and torch.equal(first, in_order[shuffled])
    memo(4, ids, augment_batch(images, ids, epoch_augment(n, 4, EvaluateConfig()))[0])  # another epoch: computed
    assert memo.hits == 1 and len(memo.memo) == 2
    tiny = TeacherLabels(model, memo_bytes=direct.numel() * direct.element_size() - 1)
    tiny(3, ids, mixed)
    assert tiny.memo == {}  # one epoch's logits exceed the budget


def test_channels_last_trains_the_same_student(small_set, teacher):
    """``channels_last`` is a layout, not a method change: the same student up to rounding."""
    from unidd_ray.core.evaluation import TeacherLabels, train_student
    from unidd_ray.models import build_model

    model, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    students = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        student = build_model("convnet", num_classes=10, in_channels=1, resolution=8, **STUDENT["student_options"])
        settings = EvaluateConfig(epochs=4, temperature=4.0, channels_last=channels_last)
        students.append(train_student(student, images, labels, settings, seed=0, soft_labels=TeacherLabels(model),
                                      num_classes=10))
    plain, nhwc = students
    assert nhwc.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    # (parameter-wise comparison is meaningless for the conv biases in front of BatchNorm: their true
    # gradient is zero, so Adam turns rounding noise into full-size steps; the function is what counts)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(images), plain(images), rtol=1e-2, atol=1e-2)
        assert torch.equal(nhwc(images).argmax(1), plain(images).argmax(1))


# ----------------------------------------------------------------------------- relabel: stored soft labels
def _train(images, labels, teacher, settings, soft, seed=0):
    from unidd_ray.core.evaluation import train_student
    from unidd_ray.models import build_model

    model, tinfo = teacher
    torch.manual_seed(seed)
    student = build_model("convnet", num_classes=10, in_channels=1, resolution=8, **STUDENT["student_options"])
    return train_student(student, images, labels, settings, seed=seed, soft_labels=soft, num_classes=10)


@pytest.fixture(scope="module")
def relabelled(small_set, digits_teacher, tmp_path_factory):
    """Soft labels for 12 epochs of the default stream, computed in batches of 7 images."""
    from unidd_ray.stages.relabel import relabel

    out = tmp_path_factory.mktemp("relabel") / "labels"
    cfg = _cfg(epochs=12)
    relabel(small_set, digits_teacher, out, cfg, batch_size=7, progress=False)
    return out, cfg


def test_relabel_stores_keyed_soft_labels(relabelled, small_set, teacher):
    import pyarrow.parquet as pq

    from unidd_ray.core.evaluation import augment_batch, epoch_augment
    from unidd_ray.artifacts.soft_labels import FILE

    out, cfg = relabelled
    model, tinfo = teacher
    images, _, _ = _load(small_set, tinfo)
    table = pq.read_table(out / FILE)
    assert {"epoch", "image_id", "crop", "flip", "partner", "box", "logits"} <= set(table.column_names)
    assert table.num_rows == 12 * 20
    keys = set(zip(table.column("epoch").to_pylist(), table.column("image_id").to_pylist()))
    assert keys == {(e, i) for e in range(12) for i in range(20)}
    rows = [r for r in table.to_pylist() if r["epoch"] == 5]
    aug = epoch_augment(20, 5, cfg)
    ids = torch.tensor([r["image_id"] for r in rows])
    assert torch.equal(torch.tensor([r["crop"] for r in rows], dtype=torch.float64), aug.crop[ids])
    assert torch.equal(torch.tensor([r["flip"] for r in rows]), aug.flip[ids])
    assert torch.equal(torch.tensor([r["partner"] for r in rows]), aug.partner[ids])
    assert torch.equal(torch.tensor([r["box"] for r in rows], dtype=torch.float64), aug.box[ids])
    with torch.no_grad():
        expected = model(augment_batch(images, ids, aug)[0])
    torch.testing.assert_close(torch.tensor([r["logits"] for r in rows]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_relabel_lays_out_the_teacher_as_the_evaluation_does(small_set, digits_teacher, tmp_path, monkeypatch,
                                                             channels_last):
    """``evaluate.channels_last`` reaches relabel: the teacher's weights and every batch it labels are NHWC when
    it is set (as in the online evaluation, so both compute in the same summation order), NCHW otherwise."""
    from unidd_ray.stages import relabel as stage

    layouts = []
    real_load = stage.load_teacher

    def spied(*args, **kwargs):
        model, tinfo = real_load(*args, **kwargs)

        def record(conv, inputs):
            layouts.append((inputs[0].is_contiguous(memory_format=torch.channels_last),
                            conv.weight.is_contiguous(memory_format=torch.channels_last)))

        # a convolution with several input channels (with one, NCHW and NHWC are the same strides)
        deep = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1][-1]
        deep.register_forward_pre_hook(record)
        return model, tinfo

    monkeypatch.setattr(stage, "load_teacher", spied)
    stage.relabel(small_set, digits_teacher, tmp_path / "labels", _cfg(epochs=2, channels_last=channels_last),
            batch_size=7, progress=False)
    assert layouts and set(layouts) == {(channels_last, channels_last)}


class _Tampered:
    """Stored labels with one field of one epoch (``epoch=None``: of every epoch) changed: logits moved to the
    next class, a crop or box shifted, a flip inverted, partners rotated."""

    def __new__(cls, directory, *, epoch: int | None, field: str):
        from unidd_ray.artifacts.soft_labels import StoredSoftLabels

        class Tampered(StoredSoftLabels):
            def read_epoch(self, e):
                stored = super().read_epoch(e)
                if epoch is not None and e != epoch:
                    return stored
                value = getattr(stored, field)
                changed = {"logits": lambda v: v.roll(1, dims=-1), "crop": lambda v: v + 0.01,
                           "box": lambda v: v + 0.01, "flip": lambda v: ~v,
                           "partner": lambda v: v.roll(1)}[field](value)
                return replace(stored, **{field: changed})

        return Tampered(directory)


def _bias_before_batchnorm(student: torch.nn.Module) -> set[str]:
    """State entries that rounding alone decides: a convolution's bias in front of BatchNorm and the
    running mean that absorbs it.  The batch mean removes the bias, so its gradient is zero in exact
    arithmetic; Adam scales the rounding noise of that zero into steps of the learning rate's size."""
    names = set()
    for prefix, module in student.named_modules():
        children = list(module.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.Conv2d) and conv.bias is not None and isinstance(norm, torch.nn.BatchNorm2d):
                dot = f"{prefix}." if prefix else ""
                names |= {f"{dot}{conv_name}.bias", f"{dot}{norm_name}.running_mean"}
    return names


def _assert_same_student(a: torch.nn.Module, b: torch.nn.Module, images: torch.Tensor) -> None:
    """Every learned weight equal to float32 tolerance, and the same function in training mode (where
    BatchNorm uses the batch's statistics, so the entries rounding decides do not enter)."""
    import copy

    skip = _bias_before_batchnorm(a)
    assert skip, "the student has no convolution bias in front of BatchNorm: compare every entry"
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if name not in skip:
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(b).train()(images), copy.deepcopy(a).train()(images),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_size", [None, 6])
def test_stored_labels_give_the_same_student_as_online_labels(relabelled, small_set, teacher, batch_size):
    """The labels were stored in batches of 7; training at another batch size reads them unchanged."""
    from unidd_ray.core.evaluation import TeacherLabels
    from unidd_ray.artifacts.soft_labels import StoredSoftLabels

    out, cfg = relabelled
    model, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    settings = replace(cfg, batch_size=batch_size)
    online = _train(images, labels, teacher, settings, TeacherLabels(model))
    stored = _train(images, labels, teacher, settings, StoredSoftLabels(out))
    _assert_same_student(online, stored, images)
    # and stored labels for fewer epochs than stored are fine (a prefix of the stream)
    shorter = replace(settings, epochs=4)
    a = _train(images, labels, teacher, shorter, TeacherLabels(model))
    b = _train(images, labels, teacher, shorter, StoredSoftLabels(out))
    _assert_same_student(a, b, images)
    # the student's top-1 is identical, and labels that are wrong change it (the comparison is not vacuous)
    x = images
    assert torch.equal(online(x).argmax(1), stored(x).argmax(1))
    bad = _train(images, labels, teacher, settings, _Tampered(out, epoch=None, field="logits"))
    assert not torch.allclose(bad.state_dict()["classifier.weight"], online.state_dict()["classifier.weight"],
                              atol=1e-3)
    with pytest.raises(AssertionError):
        _assert_same_student(online, bad, images)


def test_stored_labels_same_accuracy_in_evaluate(relabelled, small_set, digits_data, teacher):
    from unidd_ray.artifacts.soft_labels import StoredSoftLabels

    out, cfg = relabelled
    _, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    online = _evaluate(images, labels, teacher, digits_data, cfg, seeds=[0, 1])
    stored = _evaluate(images, labels, teacher, digits_data, cfg, seeds=[0, 1], soft_labels=StoredSoftLabels(out))
    assert stored == online


def test_mismatched_stream_is_refused(relabelled, small_set, teacher):
    from unidd_ray.artifacts.soft_labels import StoredSoftLabels

    out, cfg = relabelled
    _, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    settings = cfg
    with pytest.raises(ValueError, match="stream"):
        _train(images, labels, teacher, replace(settings, aug_seed=1), StoredSoftLabels(out))
    with pytest.raises(ValueError, match="stream"):
        _train(images, labels, teacher, replace(settings, crop_scale=(0.3, 1.0)), StoredSoftLabels(out))
    with pytest.raises(ValueError, match="stream"):
        _train(images, labels, teacher, replace(settings, cutmix=0.0), StoredSoftLabels(out))
    with pytest.raises(ValueError, match="cover 12 epochs"):
        _train(images, labels, teacher, replace(settings, epochs=13), StoredSoftLabels(out))
    with pytest.raises(ValueError, match="images"):
        _train(images[:10], labels[:10], teacher, settings, StoredSoftLabels(out))
    # stored parameters that differ from this run's stream (e.g. another version of the sampler): each of
    # crop, flip, CutMix partner and box is compared
    for field in ("crop", "flip", "partner", "box"):
        with pytest.raises(ValueError, match=rf"epoch 3: the stored augmentation parameters \({field}\) differ"):
            _train(images, labels, teacher, replace(settings, epochs=5), _Tampered(out, epoch=3, field=field))
    # hard-label training ignores the stored labels entirely
    _train(images, labels, teacher, replace(settings, hard_labels=True, aug_seed=1, epochs=2), StoredSoftLabels(out))


def test_relabel_cli(small_set, digits_teacher, tmp_path, capsys):
    import yaml

    from unidd_ray.artifacts.files import read_manifest
    from unidd_ray.cli import main
    from unidd_ray.artifacts.soft_labels import StoredSoftLabels

    out = tmp_path / "labels"
    rc = main(["relabel", "--recipe", "digits", "--set", "evaluate.epochs=3", "--set", "evaluate.aug_seed=5",
               "--distilled", str(small_set), "--teacher", str(digits_teacher), "--out", str(out)])
    assert rc == 0
    assert "3 epochs" in capsys.readouterr().out
    stored = StoredSoftLabels(out)
    assert stored.meta["epochs"] == 3 and stored.meta["aug_seed"] == 5 and stored.meta["images"] == 20
    assert stored.epoch(2).logits.shape == (20, 10)
    # the resolved recipe beside the labels, like every stage's, and covered by the manifest
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["name"] == "digits" and config["evaluate"]["epochs"] == 3 and config["evaluate"]["aug_seed"] == 5
    assert set(read_manifest(out, "soft_labels")["files"]) == {"soft_labels.parquet", "config.yaml"}


def test_relabel_refuses_a_teacher_of_another_dataset_before_computing(small_set, digits_teacher, tmp_path):
    import json
    import shutil

    from unidd_ray.stages.relabel import relabel

    other = tmp_path / "teacher"
    shutil.copytree(digits_teacher, other)
    info = json.loads((other / "teacher.json").read_text())
    del info["info_sha256"]  # a teacher.json from before its checksum: it is read, and its dataset compared
    (other / "teacher.json").write_text(json.dumps({**info, "dataset_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="trained on another dataset than the one .* was distilled from"):
        relabel(small_set, other, tmp_path / "labels", _cfg(epochs=2), progress=False)
    with pytest.raises(ValueError, match="evaluate.epochs must be an integer >= 1"):
        relabel(small_set, digits_teacher, tmp_path / "labels", _cfg(epochs=0), progress=False)
    assert not (tmp_path / "labels").exists()


def test_stored_labels_are_read_one_epoch_at_a_time(relabelled, monkeypatch):
    """Training holds one epoch of the stored labels, read on its own, never the whole artifact; the rows are
    those of the file, in image-id order."""
    import pyarrow.parquet as pq

    from unidd_ray.artifacts.soft_labels import FILE, StoredSoftLabels

    out, _ = relabelled
    table = pq.read_table(out / FILE)
    assert pq.ParquetFile(out / FILE).metadata.num_row_groups == 12  # one per epoch
    reads = []
    real_read = pq.read_table

    def counting(*args, **kwargs):
        result = real_read(*args, **kwargs)
        reads.append(result.num_rows)
        return result

    monkeypatch.setattr(pq, "read_table", counting)
    stored = StoredSoftLabels(out)
    for epoch in (5, 5, 6, 5):
        got = stored.epoch(epoch)
        rows = sorted((r for r in table.to_pylist() if r["epoch"] == epoch), key=lambda r: r["image_id"])
        assert torch.equal(got.logits, torch.tensor([r["logits"] for r in rows]))
        assert torch.equal(got.crop, torch.tensor([r["crop"] for r in rows], dtype=torch.float64))
        assert torch.equal(got.flip, torch.tensor([r["flip"] for r in rows]))
        assert torch.equal(got.partner, torch.tensor([r["partner"] for r in rows]))
        assert torch.equal(got.box, torch.tensor([r["box"] for r in rows], dtype=torch.float64))
        ids = torch.tensor([7, 0, 19])
        assert torch.equal(stored(epoch, ids, None), got.logits[ids])
    assert reads == [20, 20, 20]  # epoch 5, 6, then 5 again: one epoch of 20 rows per read
    with pytest.raises(ValueError, match="cover epochs 0..11, not 12"):
        stored.epoch(12)


# ----------------------------------------------------------------------------- through Ray Train
def test_run_evaluate_seeds_summary(ray_session, small_set, digits_teacher, digits_data, relabelled, tmp_path):
    from unidd_ray.stages.evaluate import run_evaluate

    labels_dir, cfg = relabelled
    cfg = replace(cfg, epochs=12, seeds=2)
    summary = run_evaluate(small_set, digits_teacher, digits_data, tmp_path / "eval", cfg,
                           storage_path=tmp_path / "ray")
    on_disk = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["labels"] == "soft" and summary["method"] == "random" and summary["ipc"] == 2
    assert summary["seeds"] == [0, 1] and len(summary["top1"]) == 2
    assert all(0 <= a <= 100 for a in summary["top1"])
    assert summary["top1_mean"] == pytest.approx(statistics.fmean(summary["top1"]))
    assert summary["top1_std"] == pytest.approx(statistics.stdev(summary["top1"]))

    # the same students from the stored labels, through Ray Train too
    stored = run_evaluate(small_set, digits_teacher, digits_data, tmp_path / "eval-stored", cfg,
                          storage_path=tmp_path / "ray", soft_labels=labels_dir)
    assert stored["labels"] == "stored"
    assert stored["top1"] == summary["top1"]

    # two workers that each train their own seed give the same students, returned in seed order
    split = run_evaluate(small_set, digits_teacher, digits_data, tmp_path / "eval-split",
                         replace(cfg, workers=2, split="seeds"), storage_path=tmp_path / "ray")
    assert split["top1"] == summary["top1"]

    # several sets in one worker group: the same students as set-by-set; a seed finished by an
    # interrupted run of the same evaluation (kept under .seeds), there with other performance settings, is
    # taken, not retrained
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.evaluation import write_seed_record
    from unidd_ray.artifacts.teacher import read_teacher_info
    from unidd_ray.stages.evaluate import RUN_NAME, EvalJob, job_key, run_evaluations

    both = replace(cfg, workers=2, split="seeds")
    hard = EvalJob(small_set, tmp_path / "eval-hard", replace(both, hard_labels=True, seeds=1))
    resumed = EvalJob(small_set, tmp_path / "eval-resumed", both)
    interrupted = EvalJob(small_set, tmp_path / "eval-resumed", replace(both, workers=1, eval_batch_size=64,
                                                                        channels_last=not both.channels_last))
    key = job_key(interrupted, _identity(small_set), read_teacher_info(digits_teacher),
                  read_dataset_info(digits_data))
    write_seed_record(tmp_path / "eval-resumed", {"job": 0, "seed": 1, "top1": 12.5, "seconds": 1.0, "key": key})
    write_seed_record(tmp_path / "eval-resumed",  # another evaluation's: ignored
                      {"job": 0, "seed": 0, "top1": 99.0, "seconds": 1.0, "key": "other"})
    grouped = run_evaluations([EvalJob(small_set, tmp_path / "eval-grouped", both), hard, resumed],
                              digits_teacher, digits_data, storage_path=tmp_path / "ray")
    assert grouped[0]["top1"] == summary["top1"] and grouped[0]["evaluated_with"] == 3
    assert grouped[1]["labels"] == "hard" and len(grouped[1]["top1"]) == 1
    assert grouped[2]["top1"] == [summary["top1"][0], 12.5]
    # the seeds stay: fewer seeds train nothing; more train only the new ones
    shutil.rmtree(tmp_path / "ray" / RUN_NAME)
    (fewer,) = run_evaluations([EvalJob(small_set, tmp_path / "eval-resumed", replace(both, seeds=1))],
                               digits_teacher, digits_data, storage_path=tmp_path / "ray")
    assert fewer["top1"] == [summary["top1"][0]] and fewer["seeds"] == [0]
    assert not (tmp_path / "ray" / RUN_NAME).exists()  # no Ray Train run started
    (more,) = run_evaluations([EvalJob(small_set, tmp_path / "eval-resumed", replace(both, seeds=3))],
                              digits_teacher, digits_data, storage_path=tmp_path / "ray")
    assert more["top1"][:2] == [summary["top1"][0], 12.5] and more["seeds"] == [0, 1, 2]
    assert json.loads((tmp_path / "eval-resumed" / "summary.json").read_text())["top1"] == more["top1"]
    with pytest.raises(ValueError, match="share evaluate.workers"):
        run_evaluations([EvalJob(small_set, tmp_path / "a", cfg), EvalJob(small_set, tmp_path / "b", both)],
                        digits_teacher, digits_data, storage_path=tmp_path / "ray")
    # more workers than the embedded Ray has CPUs: refused at once instead of waiting forever
    with pytest.raises(ValueError, match="cannot grow"):
        run_evaluate(small_set, digits_teacher, digits_data, tmp_path / "eval-big",
                     replace(cfg, workers=8, cpus_per_worker=1), storage_path=tmp_path / "ray")
    assert not (tmp_path / "eval-big").exists()
    with pytest.raises(ValueError, match="evaluate.split"):
        run_evaluate(small_set, digits_teacher, digits_data, tmp_path / "eval-bad", replace(cfg, split="batch"),
                     storage_path=tmp_path / "ray")

    # a stream the labels were not made for is refused with the reason, before any worker starts
    with pytest.raises(ValueError, match="stream"):
        run_evaluate(small_set, digits_teacher, digits_data, tmp_path / "eval-bad", replace(cfg, aug_seed=9),
                     storage_path=tmp_path / "ray", soft_labels=labels_dir)
    assert not (tmp_path / "eval-bad" / "summary.json").exists()


def test_evaluate_cli_refuses_mismatched_soft_labels(ray_session, small_set, digits_teacher, digits_data, relabelled,
                                                     tmp_path, capsys):
    from unidd_ray.cli import main

    labels_dir, _ = relabelled
    rc = main(["evaluate", "--recipe", "digits", "--set", "evaluate.epochs=20", "--distilled", str(small_set),
               "--teacher", str(digits_teacher), "--data", str(digits_data), "--soft-labels", str(labels_dir),
               "--out", str(tmp_path / "eval")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cover 12 epochs" in err and "needs 20" in err
    assert not (tmp_path / "eval" / "summary.json").exists()


def test_evaluate_cli_evaluates_every_student_of_the_recipe(ray_session, small_set, digits_teacher, digits_data,
                                                           tmp_path, capsys):
    """`unidd-ray evaluate` with ``evaluate.students``: the recipe's student into --out, each listed one into
    ``<out>-<student>``, as the pipeline evaluates a set; ``--student`` evaluates that one alone."""
    from unidd_ray.cli import main

    common = ["evaluate", "--recipe", "digits", "--set", "evaluate.epochs=2", "--set", "evaluate.seeds=1",
              "--distilled", str(small_set), "--teacher", str(digits_teacher), "--data", str(digits_data)]
    rc = main([*common, "--set", "evaluate.students=[resnet18]", "--out", str(tmp_path / "eval")])
    assert rc == 0, capsys.readouterr().err
    own = json.loads((tmp_path / "eval" / "summary.json").read_text())
    other = json.loads((tmp_path / "eval-resnet18" / "summary.json").read_text())
    assert (own["student"], other["student"]) == ("convnet", "resnet18")
    assert len(own["top1"]) == len(other["top1"]) == 1
    table = capsys.readouterr().out
    assert "resnet18" in table and "convnet" in table
    rc = main([*common, "--set", "evaluate.students=[resnet18]", "--student", "resnet18", "--out",
               str(tmp_path / "alone")])
    assert rc == 0
    assert json.loads((tmp_path / "alone" / "summary.json").read_text())["student"] == "resnet18"
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))  # (not the Train storage)
    assert names == ["alone", "eval", "eval-resnet18"]


def test_soft_labels_for_another_teacher_or_set_are_refused(relabelled, small_set, real_set, tmp_path):
    import pyarrow.parquet as pq

    from unidd_ray.artifacts.files import read_manifest, write_manifest
    from unidd_ray.artifacts.soft_labels import CONFIG, FILE, KIND, check_soft_labels

    labels_dir, settings = relabelled
    own, other = _identity(small_set), _identity(real_set)
    meta = check_soft_labels(labels_dir, settings, 20, distilled=own)
    check_soft_labels(labels_dir, settings, 20, teacher_sha256=meta["teacher_sha256"], distilled=own)
    with pytest.raises(ValueError, match="another teacher"):
        check_soft_labels(labels_dir, settings, 20, teacher_sha256="0" * 64)
    with pytest.raises(ValueError, match="another distilled set"):
        check_soft_labels(labels_dir, settings, 20, distilled=other)
    # labels that do not record the images they were made for are for no set
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    table = pq.read_table(labels_dir / FILE)
    pq.write_table(table.replace_schema_metadata({"unidd_ray": json.dumps(
        {k: v for k, v in meta.items() if k != "distilled"})}), unnamed / FILE)
    shutil.copy(labels_dir / CONFIG, unnamed / CONFIG)
    stored = read_manifest(labels_dir, KIND)
    write_manifest(unnamed, KIND, files=[FILE, CONFIG], teacher_sha256=stored["teacher_sha256"], images=20,
                   epochs=stored["epochs"])
    with pytest.raises(ValueError, match="another distilled set"):
        check_soft_labels(unnamed, settings, 20, distilled=own)
    with pytest.raises(ValueError, match="stream"):
        check_soft_labels(labels_dir, replace(settings, aug_seed=2), 20)
