"""``evaluate.protocol``: the UniDD authors' student training (``paper``) beside ours, item by item.

Each fact of the authors' ``generate_soft_label_online.py`` (bdy9527/UniDD at 4afb992; docs/AUTHORS.md) has a test
here that fails if it drifts: the per-epoch quarter-cosine lr, the KL without T², one CutMix box, λ and in-batch
partner permutation per batch, and the test-selected best of the late checks.  The expected values are computed
here from the formulas, not with the code under test.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from unidd_ray.config import ConfigError, EvaluateConfig, from_dict
from unidd_ray.core import evaluation as ev

REAL_AUGMENT = ev.augment_batch
TINY = {"student": "convnet", "student_options": {"width": 8, "depth": 1, "norm": "batch"}}


def _student():
    from unidd_ray.models import build_model

    torch.manual_seed(0)
    return build_model("convnet", num_classes=10, in_channels=1, resolution=8, **TINY["student_options"])


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10


class _Teacher(torch.nn.Module):
    """A fixed, parameter-free 'teacher': logits from the image's mean per quadrant."""

    def forward(self, x):
        q = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 4)
        return torch.cat([q, -q, q[:, :2]], 1) * 3.0  # (B, 10)


# ----------------------------------------------------------------------------- learning rate
def test_paper_lr_factor_is_a_quarter_cosine_ending_at_half():
    assert ev.paper_lr_factor(0, 1000) == pytest.approx(1.0, abs=1e-12)
    assert ev.paper_lr_factor(500, 1000) == pytest.approx(0.5 * (1 + 2 ** -0.5), abs=1e-12)  # ≈ 0.8536
    assert ev.paper_lr_factor(500, 1000) == pytest.approx(0.853553, abs=1e-6)
    assert ev.paper_lr_factor(1000, 1000) == pytest.approx(0.5, abs=1e-12)
    assert ev.paper_lr_factor(150, 300) == pytest.approx(0.853553, abs=1e-6)


def _lrs(monkeypatch, settings, n=12):
    """The lr of every optimiser step of a tiny train_student run."""
    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, *a, **kw):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*a, **kw)

    monkeypatch.setattr(ev.torch.optim, "AdamW", Recording)
    images, labels = _data(n)
    ev.train_student(_student(), images, labels, settings, seed=0, soft_labels=ev.TeacherLabels(_Teacher()),
                     num_classes=10)
    return seen


def test_paper_lr_is_stepped_per_epoch(monkeypatch):
    epochs, n, batch = 4, 12, 4
    lrs = _lrs(monkeypatch, EvaluateConfig(**TINY, epochs=epochs, batch_size=batch, protocol="paper"), n)
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / (2 * epochs))) for e in range(epochs) for _ in range(n // batch)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_ours_lr_is_still_a_per_step_cosine_to_zero(monkeypatch):
    epochs, n, batch = 4, 12, 4
    lrs = _lrs(monkeypatch, EvaluateConfig(**TINY, epochs=epochs, batch_size=batch), n)
    total = epochs * n // batch
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)], rel=1e-12)


# ----------------------------------------------------------------------------- the loss
def _kl_numpy(student, teacher, t):
    """KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes, averaged over the batch (float64)."""
    def log_softmax(x):
        x = x / t
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    log_p, log_q = log_softmax(teacher), log_softmax(student)
    return float((np.exp(log_p) * (log_p - log_q)).sum(1).mean())


def test_paper_kl_has_no_t_squared():
    g = np.random.default_rng(0)
    s, t = g.normal(size=(7, 10)) * 5, g.normal(size=(7, 10)) * 5
    temperature = 20.0
    expected = _kl_numpy(s, t, temperature)
    paper = float(ev.distill_loss(torch.tensor(s), torch.tensor(t), temperature, "paper"))
    ours = float(ev.distill_loss(torch.tensor(s), torch.tensor(t), temperature, "ours"))
    assert paper == pytest.approx(expected, rel=1e-9)
    assert ours == pytest.approx(expected * temperature ** 2, rel=1e-9)
    assert paper == pytest.approx(ours / temperature ** 2, rel=1e-12)
    # the authors' own form: KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T))
    theirs = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(torch.tensor(s) / temperature, 1),
                                                        torch.softmax(torch.tensor(t) / temperature, 1))
    assert paper == pytest.approx(float(theirs), rel=1e-9)


def test_train_student_uses_the_protocols_loss(monkeypatch):
    seen = []
    real = ev.distill_loss
    monkeypatch.setattr(ev, "distill_loss", lambda *a: seen.append(a[3]) or real(*a))
    images, labels = _data()
    for protocol in ("ours", "paper"):
        ev.train_student(_student(), images, labels, EvaluateConfig(**TINY, epochs=1, protocol=protocol), seed=0,
                         soft_labels=ev.TeacherLabels(_Teacher()), num_classes=10)
    assert seen == ["ours", "paper"]


# ----------------------------------------------------------------------------- CutMix per batch
def _batches(monkeypatch, settings, n=12, shard=(0, 1)):
    """(ids, box rows, partner rows) of every augment_batch call of a tiny train_student run."""
    calls = []
    real = REAL_AUGMENT

    def recording(images, ids, aug):
        calls.append((ids.cpu().clone(), aug.box[ids.cpu()].clone(), aug.partner[ids.cpu()].clone()))
        return real(images, ids, aug)

    monkeypatch.setattr(ev, "augment_batch", recording)
    images, labels = _data(n)
    ev.train_student(_student(), images, labels, settings, seed=3, soft_labels=ev.TeacherLabels(_Teacher()),
                     num_classes=10, shard=shard)
    return calls


def test_paper_cutmix_has_one_box_and_an_in_batch_partner_per_batch(monkeypatch):
    calls = _batches(monkeypatch, EvaluateConfig(**TINY, epochs=3, batch_size=4, protocol="paper"))
    assert len(calls) == 9
    boxes = []
    for ids, box, partner in calls:
        assert (box == box[0]).all()  # one box (and so one λ) for every image of the batch
        assert sorted(partner.tolist()) == sorted(ids.tolist())  # the partners: a permutation of the batch
        boxes.append(tuple(box[0].tolist()))
    assert len(set(boxes)) > 1  # a new box for each batch
    ours = _batches(monkeypatch, EvaluateConfig(**TINY, epochs=1, batch_size=4))
    assert any(not (box == box[0]).all() for _, box, _ in ours)  # ours: a box per image


def test_paper_batch_mix_masks_the_same_pixels_of_every_image():
    settings = EvaluateConfig(**TINY, protocol="paper", crop_scale=(1.0, 1.0))
    n, size = 8, 16
    aug = ev.epoch_augment(n, 0, settings)
    aug.flip[:] = False
    ids = torch.tensor([5, 1, 6, 2])
    ev.paper_batch_mix(aug, ids, epoch=0, batch_index=1, size=size, settings=settings)
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, size, size).clone()
    mixed, partner, lam = ev.augment_batch(images, ids, aug)
    masks = mixed != images[ids]
    assert (masks == masks[0]).all() and masks[0].any()  # one box, at the same pixels of every image
    assert torch.equal(mixed[masks].view(len(ids), -1)[:, 0], partner.float())  # filled from the partner
    assert (lam == lam[0]).all()
    # the authors' rand_bbox: a square of side int(size·sqrt(1 − λ)), centred on a random pixel, clipped
    again = ev.epoch_augment(n, 0, settings)
    ev.paper_batch_mix(again, ids.flip(0), epoch=0, batch_index=1, size=size, settings=settings)
    assert torch.equal(again.box[ids], aug.box[ids]) and torch.equal(again.partner[ids], aug.partner[ids])


def test_paper_mixing_is_the_same_in_every_shard(monkeypatch):
    settings = EvaluateConfig(**TINY, epochs=2, batch_size=6, protocol="paper")
    whole = _batches(monkeypatch, settings)
    halves = [_batches(monkeypatch, settings, shard=(r, 2)) for r in range(2)]
    for k, (ids, box, partner) in enumerate(whole):
        for r in range(2):
            sub_ids, sub_box, sub_partner = halves[r][k]
            assert torch.equal(sub_ids, ids[r::2])
            assert torch.equal(sub_box, box[r::2]) and torch.equal(sub_partner, partner[r::2])


def test_paper_training_is_deterministic():
    images, labels = _data()
    settings = EvaluateConfig(**TINY, epochs=2, batch_size=5, protocol="paper")
    a, b = (ev.train_student(_student(), images, labels, settings, seed=1, soft_labels=ev.TeacherLabels(_Teacher()),
                             num_classes=10) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------- the reported figure
def test_paper_checks_every_10_epochs_in_the_last_fifth():
    assert ev.paper_checks(1000) == list(range(810, 1001, 10))  # 0-based epochs 809, 819, …, 999 (> 800)
    assert ev.paper_checks(300) == [250, 260, 270, 280, 290, 300]
    assert ev.paper_checks(10) == [10]
    assert ev.paper_checks(60) == [50, 60]
    assert ev.paper_checks(5) == [5]  # the final epoch is always tested


@pytest.mark.parametrize("epochs", [1000, 300, 10])
def test_the_best_is_taken_over_exactly_the_checks(epochs):
    window = ev.paper_checks(epochs)
    accs = {e: 10.0 + (e % 7) for e in range(1, epochs + 1)}
    accs[max(1, window[0] - 10)] = 99.0  # a better epoch outside the window (the first when epochs is 10)
    if epochs > 10:
        best = max(accs[e] for e in window)
        first = min(e for e in window if accs[e] == best)
        assert ev.select_best(accs, epochs) == (best, first)
    accs[window[-1]] = 98.0
    assert ev.select_best(accs, epochs) == (98.0, window[-1])
    accs[window[0]] = 98.0  # a tie: the earliest, as the authors keep only a strictly better test
    assert ev.select_best(accs, epochs) == (98.0, window[0])


# ----------------------------------------------------------------------------- configuration
def test_an_unknown_protocol_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        from_dict(EvaluateConfig, {"protocol": "authors"})
    message = str(err.value)
    assert "evaluate.protocol" in message and "'authors'" in message and "\n" not in message


def test_batch_size_by_ipc_is_checked_and_resolved():
    cfg = from_dict(EvaluateConfig, {"batch_size": 100, "batch_size_by_ipc": {"1": 10, 10: 50, 50: 100}})
    assert cfg.batch_size_by_ipc == {1: 10, 10: 50, 50: 100}
    assert cfg.for_ipc(10).batch_size == 50 and cfg.for_ipc(10).batch_size_by_ipc is None
    assert cfg.for_ipc(100).batch_size == 100
    assert cfg.for_ipc(10) == replace(cfg, batch_size=50, batch_size_by_ipc=None)
    for bad in ({0: 10}, {1: 0}, {"x": 10}, [10]):
        with pytest.raises(ConfigError, match="batch_size_by_ipc"):
            from_dict(EvaluateConfig, {"batch_size_by_ipc": bad})


def test_new_settings_at_their_former_behaviour_keep_the_keys():
    from unidd_ray.keys import evaluate_settings

    base = evaluate_settings(EvaluateConfig())
    assert "protocol" not in base and "batch_size_by_ipc" not in base
    assert evaluate_settings(EvaluateConfig(protocol="paper"))["protocol"] == "paper"
    resolved = EvaluateConfig(batch_size=64, batch_size_by_ipc={10: 50}).for_ipc(10)
    assert evaluate_settings(resolved) == evaluate_settings(EvaluateConfig(batch_size=50))


def test_stored_soft_labels_are_refused_with_paper(tmp_path):
    from unidd_ray.artifacts import soft_labels
    from unidd_ray.stages.relabel import relabel

    meta = {"aug_seed": 0, "crop_scale": [0.5, 1.0], "cutmix": 1.0, "images": 4, "epochs": 300}
    soft_labels._check_stream(meta, EvaluateConfig(), 4)  # ours: fine
    with pytest.raises(ValueError, match="evaluate.protocol 'paper'") as err:
        soft_labels._check_stream(meta, EvaluateConfig(protocol="paper"), 4)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="evaluate.protocol 'paper'"):
        relabel(tmp_path / "set", tmp_path / "teacher", tmp_path / "out", EvaluateConfig(protocol="paper"))


# ----------------------------------------------------------------------------- end to end
def test_a_paper_result_records_protocol_final_and_test_selected(digits_data, digits_teacher, tmp_path):
    from unidd_ray.artifacts.distilled import load_distilled
    from unidd_ray.artifacts.teacher import load_teacher
    from unidd_ray.stages.subset import write_real_subset

    model, tinfo = load_teacher(digits_teacher)
    path = write_real_subset(digits_data, tmp_path / "real-ipc2", ipc=2, seed=0)
    images, labels, _ = load_distilled(path, mean=tinfo.mean, std=tinfo.std)
    cfg = EvaluateConfig(student="convnet", student_options={"width": 16, "depth": 2, "norm": "batch"}, epochs=60,
                         seeds=1, temperature=4.0, eval_batch_size=512, batch_size=4, protocol="paper")
    kw = dict(num_classes=tinfo.num_classes, in_channels=tinfo.in_channels, resolution=tinfo.resolution, seeds=[0],
              normalize=(tinfo.mean, tinfo.std))
    (result,) = ev.evaluate_students(images, labels, model, str(digits_data), cfg, **kw)
    assert result["protocol"] == "paper" and result["seed"] == 0
    assert sorted(result["checks"]) == ["50", "60"]  # paper_checks(60)
    assert result["checks"]["60"] == result["top1"]
    assert result["top1_selected"] == max(result["checks"].values())
    assert result["checks"][str(result["selected_epoch"])] == result["top1_selected"]
    assert result["top1"] > 25  # it learned something (10 classes, chance 10 %)
    assert ev.evaluate_in_process(images, labels, model, str(digits_data), cfg, **kw) == [result["top1"]]
    (ours,) = ev.evaluate_students(images, labels, model, str(digits_data), replace(cfg, protocol="ours"), **kw)
    assert ours.keys() == {"seed", "protocol", "top1"} and ours["protocol"] == "ours"


def test_summary_rows_and_tables_show_the_protocol(tmp_path):
    from unidd_ray.analysis.results_page import run_table
    from unidd_ray.pipeline import protocol_fields, results_markdown
    from unidd_ray.stages.evaluate import EvalJob, _summarise

    cfg = EvaluateConfig(protocol="paper", seeds=2)
    job = EvalJob(tmp_path / "set", tmp_path / "eval", cfg)
    (tmp_path / "eval").mkdir()
    records = {s: {"seed": s, "top1": 50.0 + s, "top1_selected": 52.0 + s, "selected_epoch": 290, "seconds": 1.0}
               for s in range(2)}
    summary = _summarise(job, {"method": "cfm", "ipc": 10}, {}, records, wall=1.0, evaluated_with=1)
    assert summary["protocol"] == "paper" and summary["top1_selected"] == [52.0, 53.0]
    assert summary["top1_selected_mean"] == 52.5 and summary["top1_selected_note"] == ev.SELECTED_NOTE
    row = {"method": "cfm", "ipc": 10, "top1_mean": summary["top1_mean"], "top1_std": summary["top1_std"],
           "seeds": 2, "seconds": 3.0, "labels": "soft", "top1": summary["top1"], **protocol_fields(summary)}
    assert row["protocol"] == "paper" and row["top1_selected_mean"] == 52.5
    old = {"method": "sre2l", "ipc": 10, "top1_mean": 40.0, "top1_std": 0.0, "seeds": 1, "seconds": 1.0,
           "labels": "soft", "top1": [40.0]}  # a row of a run before evaluate.protocol
    results = {"recipe": "r", "dataset": "d", "rows": [row, old]}
    md = results_markdown(results)
    assert "| cfm | 10 | soft | paper | 50.50 ± 0.71 (final); 52.50 ± 0.71 (test-selected) | 2 |" in md
    assert "| sre2l | 10 | soft | ours | 40.00 ± 0.00 | 1 |" in md
    page = "\n".join(run_table(results))
    assert "| paper | 50.50 ± 0.71 (final); 52.50 ± 0.71 (test-selected) |" in page
    ours = _summarise(replace(job, cfg=replace(cfg, protocol="ours")), {}, {}, records, wall=1.0, evaluated_with=1)
    assert ours["protocol"] == "ours" and "top1_selected" not in ours
