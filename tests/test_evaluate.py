"""Relabel-and-train evaluation (SPEC §1.3) on hand-made distilled sets with predictable accuracy.

The distilled sets here are *real* digits images written in the distilled format
(``write_real_subset``), so the accuracy a student reaches is known in advance:
real labels teach the task, shuffled labels do not.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from unidd_ray.config import EvaluateConfig

STUDENT = {"student": "convnet", "student_options": {"width": 32, "depth": 2, "norm": "batch"}}


def _cfg(**kw) -> EvaluateConfig:
    base = dict(STUDENT, epochs=60, seeds=1, temperature=4.0, eval_batch_size=512)
    base.update(kw)
    return EvaluateConfig(**base)


@pytest.fixture(scope="module")
def real_set(digits_data, tmp_path_factory) -> Path:
    """10 real images per class of the digits train split, in the distilled format."""
    from unidd_ray.stages.evaluate import write_real_subset

    return write_real_subset(digits_data, tmp_path_factory.mktemp("evaluate") / "real-ipc10", ipc=10, seed=0)


@pytest.fixture(scope="module")
def small_set(digits_data, tmp_path_factory) -> Path:
    """2 real images per class: the IPC of the digits recipe."""
    from unidd_ray.stages.evaluate import write_real_subset

    return write_real_subset(digits_data, tmp_path_factory.mktemp("evaluate") / "real-ipc2", ipc=2, seed=0)


@pytest.fixture(scope="module")
def teacher(digits_teacher):
    from unidd_ray.teacher import load_teacher

    return load_teacher(digits_teacher)


def _load(path, tinfo):
    from unidd_ray.stages.evaluate import load_distilled

    return load_distilled(path, mean=tinfo.mean, std=tinfo.std)


def _evaluate(images, labels, teacher, data_dir, cfg, **kw) -> list[float]:
    from unidd_ray.stages.evaluate import evaluate_in_process

    model, tinfo = teacher
    return evaluate_in_process(images, labels, model, str(data_dir), cfg, num_classes=tinfo.num_classes,
                               in_channels=tinfo.in_channels, resolution=tinfo.resolution,
                               seeds=kw.pop("seeds", [0]), **kw)


# ----------------------------------------------------------------------------- the distilled format
def test_real_subset_is_a_valid_distilled_set(real_set, digits_data, teacher):
    from unidd_ray.artifacts import read_manifest
    from unidd_ray.data.loading import read_labels

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
    """`norm: instance` (the ConvNet-IN student of docs/RESULTS.md): each image's channel is
    standardised over its own H x W positions, in train and eval mode alike, so an image's output
    does not depend on the rest of the batch (a BatchNorm student's does, in training)."""
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
    _, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    cfg = _cfg(epochs=20)
    first = _evaluate(images, labels, teacher, digits_data, cfg, seeds=[0, 1])
    again = _evaluate(images, labels, teacher, digits_data, cfg, seeds=[1])
    assert again[0] == first[1]


# ----------------------------------------------------------------------------- augmentation stream
def test_epoch_augment_is_a_function_of_stream_seed_and_epoch():
    from unidd_ray.evaluation import EvalSettings, epoch_augment

    def same(a, b):
        return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("crop", "flip", "partner", "box"))

    base = EvalSettings(aug_seed=3)
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
    from unidd_ray.evaluation import EvalSettings, augment_batch, epoch_augment

    images = torch.randn(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    aug = epoch_augment(30, 2, EvalSettings())
    full, partner_full, lam_full = augment_batch(images, torch.arange(30), aug)
    ids = torch.tensor([17, 3, 29, 0])
    part, partner_part, lam_part = augment_batch(images, ids, aug)
    assert torch.equal(part, full[ids]) and torch.equal(partner_part, partner_full[ids])
    assert torch.equal(lam_part, lam_full[ids])


def test_teacher_labels_do_not_depend_on_batch_order_and_memoise(small_set, teacher):
    """Online labels are a function of (epoch, image id): the seed's batch order changes nothing, a
    later student of the same set reads them from the memo, and the memo keeps to its budget."""
    from unidd_ray.evaluation import EvalSettings, TeacherLabels, augment_batch, epoch_augment

    model, tinfo = teacher
    images, _, _ = _load(small_set, tinfo)
    n = len(images)
    aug = epoch_augment(n, 3, EvalSettings())
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
    memo(4, ids, augment_batch(images, ids, epoch_augment(n, 4, EvalSettings()))[0])  # another epoch: computed
    assert memo.hits == 1 and len(memo.memo) == 2
    tiny = TeacherLabels(model, memo_bytes=direct.numel() * direct.element_size() - 1)
    tiny(3, ids, mixed)
    assert tiny.memo == {}  # one epoch's logits exceed the budget


def test_channels_last_trains_the_same_student(small_set, teacher):
    """``channels_last`` is a layout, not a method change: the same student up to rounding."""
    from unidd_ray.evaluation import EvalSettings, TeacherLabels, train_student
    from unidd_ray.models import build_model

    model, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    students = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        student = build_model("convnet", num_classes=10, in_channels=1, resolution=8, **STUDENT["student_options"])
        settings = EvalSettings(epochs=4, temperature=4.0, channels_last=channels_last)
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
    from unidd_ray.evaluation import train_student
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

    from unidd_ray.evaluation import augment_batch, epoch_augment
    from unidd_ray.stages.evaluate import _settings
    from unidd_ray.stages.relabel import FILE

    out, cfg = relabelled
    model, tinfo = teacher
    images, _, _ = _load(small_set, tinfo)
    table = pq.read_table(out / FILE)
    assert {"epoch", "image_id", "crop", "flip", "partner", "box", "logits"} <= set(table.column_names)
    assert table.num_rows == 12 * 20
    keys = set(zip(table.column("epoch").to_pylist(), table.column("image_id").to_pylist()))
    assert keys == {(e, i) for e in range(12) for i in range(20)}
    rows = [r for r in table.to_pylist() if r["epoch"] == 5]
    aug = epoch_augment(20, 5, _settings(cfg))
    ids = torch.tensor([r["image_id"] for r in rows])
    assert torch.equal(torch.tensor([r["crop"] for r in rows], dtype=torch.float64), aug.crop[ids])
    assert torch.equal(torch.tensor([r["flip"] for r in rows]), aug.flip[ids])
    assert torch.equal(torch.tensor([r["partner"] for r in rows]), aug.partner[ids])
    assert torch.equal(torch.tensor([r["box"] for r in rows], dtype=torch.float64), aug.box[ids])
    with torch.no_grad():
        expected = model(augment_batch(images, ids, aug)[0])
    torch.testing.assert_close(torch.tensor([r["logits"] for r in rows]), expected, rtol=1e-5, atol=1e-5)


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
    from unidd_ray.evaluation import TeacherLabels
    from unidd_ray.stages.evaluate import _settings
    from unidd_ray.stages.relabel import StoredSoftLabels

    out, cfg = relabelled
    model, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    settings = replace(_settings(cfg), batch_size=batch_size)
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
    wrong = StoredSoftLabels(out)
    wrong.logits = wrong.logits.roll(1, dims=-1)
    bad = _train(images, labels, teacher, settings, wrong)
    assert not torch.allclose(bad.state_dict()["classifier.weight"], online.state_dict()["classifier.weight"],
                              atol=1e-3)
    with pytest.raises(AssertionError):
        _assert_same_student(online, bad, images)


def test_stored_labels_same_accuracy_in_evaluate(relabelled, small_set, digits_data, teacher):
    from unidd_ray.stages.relabel import StoredSoftLabels

    out, cfg = relabelled
    _, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    online = _evaluate(images, labels, teacher, digits_data, cfg, seeds=[0, 1])
    stored = _evaluate(images, labels, teacher, digits_data, cfg, seeds=[0, 1], soft_labels=StoredSoftLabels(out))
    assert stored == online


def test_mismatched_stream_is_refused(relabelled, small_set, teacher):
    from unidd_ray.stages.evaluate import _settings
    from unidd_ray.stages.relabel import StoredSoftLabels

    out, cfg = relabelled
    _, tinfo = teacher
    images, labels, _ = _load(small_set, tinfo)
    settings = _settings(cfg)
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
    # stored parameters that differ from this run's stream (e.g. another version of the sampler)
    tampered = StoredSoftLabels(out)
    tampered.crop[3, 0, 0] += 0.01
    with pytest.raises(ValueError, match="epoch 3"):
        _train(images, labels, teacher, replace(settings, epochs=5), tampered)
    # hard-label training ignores the stored labels entirely
    _train(images, labels, teacher, replace(settings, hard_labels=True, aug_seed=1, epochs=2), StoredSoftLabels(out))


def test_relabel_cli(small_set, digits_teacher, tmp_path, capsys):
    from unidd_ray.cli import main
    from unidd_ray.stages.relabel import StoredSoftLabels

    out = tmp_path / "labels"
    rc = main(["relabel", "--recipe", "digits", "--set", "evaluate.epochs=3", "--set", "evaluate.aug_seed=5",
               "--distilled", str(small_set), "--teacher", str(digits_teacher), "--out", str(out)])
    assert rc == 0
    assert "3 epochs" in capsys.readouterr().out
    stored = StoredSoftLabels(out)
    assert stored.meta["epochs"] == 3 and stored.meta["aug_seed"] == 5 and stored.meta["images"] == 20
    assert stored.logits.shape == (3, 20, 10)


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
    assert summary["top1"][0] != summary["top1"][1] or summary["top1_std"] == 0.0

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
    # interrupted run of the same evaluation (kept under .seeds) is taken, not retrained
    from unidd_ray.artifacts import atomic_write_json, read_manifest
    from unidd_ray.stages.evaluate import PARTIAL, EvalJob, job_key, run_evaluations
    from unidd_ray.teacher import read_teacher_info

    both = replace(cfg, workers=2, split="seeds")
    hard = EvalJob(small_set, tmp_path / "eval-hard", replace(both, hard_labels=True, seeds=1))
    resumed = EvalJob(small_set, tmp_path / "eval-resumed", both)
    key = job_key(resumed, read_manifest(small_set, "distilled"), read_teacher_info(digits_teacher).sha256)
    atomic_write_json(tmp_path / "eval-resumed" / PARTIAL / "seed-1.json",
                      {"job": 0, "seed": 1, "top1": 12.5, "seconds": 1.0, "key": key})
    atomic_write_json(tmp_path / "eval-resumed" / PARTIAL / "seed-0.json",  # another evaluation's: ignored
                      {"job": 0, "seed": 0, "top1": 99.0, "seconds": 1.0, "key": "other"})
    grouped = run_evaluations([EvalJob(small_set, tmp_path / "eval-grouped", both), hard, resumed],
                              digits_teacher, digits_data, storage_path=tmp_path / "ray")
    assert grouped[0]["top1"] == summary["top1"] and grouped[0]["evaluated_with"] == 3
    assert grouped[1]["labels"] == "hard" and len(grouped[1]["top1"]) == 1
    assert grouped[2]["top1"] == [summary["top1"][0], 12.5]
    assert not (tmp_path / "eval-resumed" / PARTIAL).exists()
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


def test_soft_labels_for_another_teacher_or_set_are_refused(relabelled, small_set, real_set):
    from unidd_ray.artifacts import read_manifest
    from unidd_ray.stages.evaluate import _settings
    from unidd_ray.stages.relabel import check_soft_labels

    labels_dir, cfg = relabelled
    settings = _settings(cfg)
    own = read_manifest(small_set, "distilled")["files"]
    meta = check_soft_labels(labels_dir, settings, 20, distilled_files=own)
    check_soft_labels(labels_dir, settings, 20, teacher_sha256=meta["teacher_sha256"], distilled_files=own)
    with pytest.raises(ValueError, match="another teacher"):
        check_soft_labels(labels_dir, settings, 20, teacher_sha256="0" * 64)
    with pytest.raises(ValueError, match="another distilled set"):
        check_soft_labels(labels_dir, settings, 20, distilled_files=read_manifest(real_set, "distilled")["files"])
    with pytest.raises(ValueError, match="stream"):
        check_soft_labels(labels_dir, replace(settings, aug_seed=2), 20)
