"""``recover.amp: bf16`` and the Distiller's device: a short recovery on the digits ConvNet teacher in bfloat16
autocast against float32, the dtypes the filter is given, and every tensor of a step on the device passed.

The real moments are computed here in-process from 512 training images (no Ray), so these tests need only the
``digits_data`` and ``digits_teacher`` fixtures.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import unidd_ray.core.recovery as recovery
from support.devices import Devices, Factories
from unidd_ray.artifacts.dataset import read_dataset_info, read_labels
from unidd_ray.artifacts.teacher import load_teacher
from unidd_ray.config import InvalidSetting, RecoverConfig
from unidd_ray.core.recovery import Distiller
from unidd_ray.data.loading import load_real_images
from unidd_ray.models import layer_channels, resolve_layers, tapped
from unidd_ray.spectral import EMU
from unidd_ray.spectral.moments import Moments

ITERS = 5


@pytest.fixture(scope="module")
def digits(digits_data, digits_teacher):
    """The teacher, real moments of its default taps over 512 training images, and one real image per class."""
    threads = torch.get_num_threads()
    teacher, tinfo = load_teacher(digits_teacher)
    info = read_dataset_info(digits_data)
    labels = torch.as_tensor(read_labels(digits_data, "train"))
    norm = (list(tinfo.mean), list(tinfo.std))
    images = load_real_images(str(digits_data), list(range(512)), normalize=norm)
    layers = resolve_layers(teacher, None)
    real = {n: Moments(c, info.num_classes) for n, c in layer_channels(teacher, layers).items()}
    def update(name, feats):  # (a pre-hook returning a value would replace the layer's input)
        real[name].update(feats, labels[:512])

    with torch.no_grad(), tapped(teacher, layers, update):
        teacher(images)
    first = [int(np.flatnonzero(labels.numpy() == k)[0]) for k in range(info.num_classes)]
    init = load_real_images(str(digits_data), first, normalize=norm)
    torch.set_num_threads(threads)  # FFCV loaders change torch's thread count
    mean, std = torch.tensor(tinfo.mean), torch.tensor(tinfo.std)
    return {"teacher": teacher, "real": real, "num_classes": info.num_classes, "resolution": tinfo.resolution,
            "pixel_min": (0 - mean) / std, "pixel_max": (1 - mean) / std, "init": init,
            "labels": torch.arange(info.num_classes)}


def _distiller(d, device=torch.device("cpu"), **settings) -> Distiller:
    cfg = RecoverConfig(**{"ipc": 1, "iterations": ITERS, "lr": 0.05, "max_roll": 1, **settings})
    return Distiller(copy.deepcopy(d["teacher"]), d["real"], cfg, num_classes=d["num_classes"],
                     resolution=d["resolution"], pixel_min=d["pixel_min"], pixel_max=d["pixel_max"], device=device)


def _recover(d, **settings):
    distiller = _distiller(d, **settings)
    emu = EMU(distiller.emu_layers(), device=distiller.device) if distiller.layers else None
    return distiller.optimize(d["init"], d["labels"], slot=0, ipc=1, aug_seed=7, emu=emu)


def test_amp_is_validated_up_front():
    assert RecoverConfig().amp == "none"
    with pytest.raises(InvalidSetting, match=r"recover.amp must be one of \['none', 'bf16'\], got 'fp16'"):
        RecoverConfig(amp="fp16")


@pytest.mark.parametrize("method", ["cfm", "sre2l", "ce"])
def test_bf16_recovery_agrees_with_float32(method, digits):
    """The teacher in bfloat16 autocast against float32: one loss evaluation, then a 5-iteration recovery (Adam,
    lr 0.05, cosine, augmentation on) of 10 digits images.

    bfloat16 keeps 8 significant bits, so each rounding is off by up to 2^-8 ≈ 3.9e-3 relative; the teacher's
    two conv blocks and its head round activations and gradients a few times each.  Measured on this CPU
    (oneDNN bf16, the session's digits teacher):

    - one evaluation at the initial images: loss parts within 7.9e-3 relative of float32 (about 2 × 2^-8: the CE
      of every method; the CFM filter/signal terms 3e-4/9e-4, their moments being float64), the pixels' gradient
      within 1.5e-2 (CE, SRe2L) to 3.5e-2 (CFM) in relative L2 norm.  Bounds: 3e-2 on the parts, 0.1 on the
      gradient (about 4 and 3 times the measured).
    - after 5 iterations (augmentation seeds 7, 8, 9 measured, 7 tested): loss parts within 4e-2 relative (the
      worst, a CE of 0.49; typically 1e-3 to 8e-3), mean |Δpixel| 0.4e-3 to 1.3e-3 in normalised units against a
      mean move of 0.05, and the displacement from the initial images off by 7 % to 15 % in relative L2 norm.
      The last is larger than the per-step error because Adam's first steps are ±lr whatever the gradient's size:
      a pixel whose gradient is near 0 can step the other way (the largest single-pixel difference is ~0.17, two
      such steps).  Bounds: 0.1 on the parts, 5e-3 on the mean pixel difference, 0.3 on the displacement.

    Both runs must also differ (the autocast was on) and every value be finite.
    """
    distillers = {amp: _distiller(digits, method=method, amp=amp) for amp in ("none", "bf16")}
    one = {}
    for amp, distiller in distillers.items():
        x = digits["init"].clone().requires_grad_(True)
        emu = EMU(distiller.emu_layers()) if distiller.layers else None
        loss, parts, _ = distiller.batch_loss(x, digits["labels"], filt=distiller.slot_filter(0, 1), alpha=0.1,
                                              emu=emu)
        loss.backward()
        one[amp] = (parts, x.grad)
    (parts, grad), (parts_bf16, grad_bf16) = one["none"], one["bf16"]
    for k, v in parts.items():
        assert parts_bf16[k] == pytest.approx(v, rel=3e-2), k
    assert 0 < ((grad_bf16 - grad).norm() / grad.norm()).item() < 0.1

    f32 = _recover(digits, method=method)
    bf16 = _recover(digits, method=method, amp="bf16")
    assert set(f32.parts) == set(bf16.parts)
    for k, v in f32.parts.items():
        assert np.isfinite(bf16.parts[k]) and bf16.parts[k] == pytest.approx(v, rel=0.1), k
    assert torch.isfinite(bf16.images).all()
    assert 0 < (bf16.images - f32.images).abs().mean().item() < 5e-3
    moved, moved_bf16 = f32.images - digits["init"], bf16.images - digits["init"]
    assert ((moved_bf16 - moved).norm() / moved.norm()).item() < 0.3


def test_bf16_gives_the_filter_float64_moments(digits, monkeypatch):
    """Under bf16 the taps' inputs are cast to float64 (the default ``precision: mixed`` keeps the resolvent's
    values in float64) before the batch statistics: the covariance and signal handed to the filter are float64
    with or without the EMU, and the CE is taken from float32 logits."""
    seen = []
    real_loss = recovery.unidd_layer_loss

    def spy(filt, real_cov, real_signal, syn_cov, syn_signal, **kwargs):
        seen.append((real_cov.dtype, syn_cov.dtype, syn_signal.dtype))
        return real_loss(filt, real_cov, real_signal, syn_cov, syn_signal, **kwargs)

    monkeypatch.setattr(recovery, "unidd_layer_loss", spy)
    distiller = _distiller(digits, amp="bf16")
    images = digits["init"].clone().requires_grad_(True)
    for emu in (None, EMU(distiller.emu_layers())):
        seen.clear()
        loss, parts, stats = distiller.batch_loss(images, digits["labels"], filt=distiller.slot_filter(0, 1),
                                                  alpha=0.1, emu=emu)
        assert len(seen) == len(distiller.layers) > 0
        assert all(d == (torch.float64,) * 3 for d in seen), seen
        assert all(s.sumsq.dtype == torch.float64 and s.signal_sum.dtype == torch.float64 for s in stats.values())
        loss.backward()
        assert images.grad.dtype == torch.float32 and torch.isfinite(images.grad).all()
    # the autocast really ran the teacher in bfloat16: the tapped inputs of the conv layers
    captured = {}
    with tapped(distiller.teacher, distiller.layers, lambda n, f: captured.__setitem__(n, f.dtype)):
        with distiller.autocast():
            distiller.teacher(images)
    later = [dt for name, dt in captured.items() if name != distiller.layers[0]]  # the first tap sees the pixels
    assert later and all(dt == torch.bfloat16 for dt in later), captured


# ----------------------------------------------------------------------------- device explicitness
# sre2l reads no signal: it runs once, with the default
@pytest.mark.parametrize("method,amp,signal", [("cfm", "none", "mean"), ("cfm", "none", "class"),
                                              ("cfm", "bf16", "mean"), ("cfm", "bf16", "class"),
                                              ("sre2l", "none", "mean")])
def test_every_tensor_of_a_step_is_on_the_device_passed(method, amp, signal, digits):
    """With ``device=torch.device("cpu")`` passed explicitly, a step (batch_loss with the EMU, backward) makes every
    tensor on that device, and the Distiller calls no tensor factory without ``device=`` (which on CUDA would
    silently make a CPU tensor and fail when it meets the device's); its outputs, statistics, real targets and
    EMU state are on the device."""
    device = torch.device("cpu")
    distiller = _distiller(digits, device=device, method=method, amp=amp, signal=signal)
    emu = EMU(distiller.emu_layers(), device=distiller.device) if distiller.layers else None
    images = digits["init"].to(device).clone().requires_grad_(True)
    labels = digits["labels"].to(device)
    factories, devices = Factories(), Devices()
    with factories, devices:
        loss, parts, stats = distiller.batch_loss(images, labels, filt=distiller.slot_filter(0, 1), alpha=0.1,
                                                  emu=emu)
        loss.backward()
    assert factories.missing == [], factories.missing
    assert devices.devices == {device}
    assert loss.device == device and images.grad.device == device
    for s in stats.values():
        assert {t.device for t in (s.n, s.sum, s.sumsq, s.signal_sum, s.signal_weight, s.columns)} == {device}
    for t in [*distiller.real_cov.values(), *distiller.real_signal.values(), distiller.pixel_min, distiller.pixel_max]:
        assert t.device == device
    if emu is not None:
        for name, s in stats.items():
            emu.commit(name, s.covariance, s.signal, s.columns)
        emu.synchronise(None)
        assert {t.device for t in emu.state_dict().values()} == {device}
    assert all(p.device == device for p in distiller.teacher.parameters())


# ----------------------------------------------------------------------------- evaluate.amp: the student's training
def _student_run(d, amp: str, protocol: str = "ours"):
    from unidd_ray.config import EvaluateConfig
    from unidd_ray.core.evaluation import TeacherLabels, train_student
    from unidd_ray.models import build_model

    cfg = EvaluateConfig(student="convnet", student_options={"width": 32, "depth": 2, "norm": "batch"}, epochs=4,
                         batch_size=5, temperature=4.0, amp=amp, protocol=protocol)
    torch.manual_seed(0)
    student = build_model("convnet", num_classes=d["num_classes"], in_channels=d["init"].shape[1],
                          resolution=d["resolution"], **cfg.student_options)
    trained = train_student(student, d["init"], d["labels"], cfg, seed=0, soft_labels=TeacherLabels(d["teacher"]),
                            num_classes=d["num_classes"])
    params = torch.cat([p.detach().flatten() for p in trained.parameters()])
    with torch.no_grad():
        logits = trained(d["init"])
    return params, logits


@pytest.mark.parametrize("protocol", ["ours", "paper"])
def test_bf16_student_training_agrees_with_float32(digits, protocol):
    """``evaluate.amp: bf16``: the student's and the teacher's forward (hence their backward) under bfloat16
    autocast, the loss in float32.  Eight AdamW steps (4 epochs of 2 batches on one image per class) from the
    same initial weights and the same augmentation stream.

    Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2⁻⁸ ≈ 3.9e-3 per operation); AdamW's update
    is about lr·sign(g) early on, so a parameter whose gradient is near zero may step the other way, and the
    parameters move by about lr·steps = 8e-3 in all.  Measured here: the parameters' difference is 10–12 % of
    their displacement from the initial weights and the final logits 0.9–1.1 % of their norm (ours, paper);
    the bounds are 3× that."""
    start = torch.cat([p.detach().flatten() for p in _fresh_student(digits).parameters()])
    p32, l32 = _student_run(digits, "none", protocol)
    p16, l16 = _student_run(digits, "bf16", protocol)
    assert l16.dtype == torch.float32
    moved = float((p32 - start).norm())
    assert moved > 0
    assert float((p16 - p32).norm()) <= 0.35 * moved
    assert float((l16 - l32).norm()) <= 0.03 * float(l32.norm())


def _fresh_student(d):
    from unidd_ray.models import build_model

    torch.manual_seed(0)
    return build_model("convnet", num_classes=d["num_classes"], in_channels=d["init"].shape[1],
                       resolution=d["resolution"], width=32, depth=2, norm="batch")


def test_evaluate_amp_is_validated_up_front():
    from unidd_ray.config import EvaluateConfig

    with pytest.raises(InvalidSetting, match="evaluate.amp must be one of"):
        EvaluateConfig(amp="fp16")


@pytest.mark.parametrize("protocol", ["ours", "paper"])
def test_every_tensor_of_a_student_run_is_on_the_device_passed(digits, protocol):
    """``train_student`` with ``device=torch.device("cpu")`` passed explicitly (both protocols: per-image and
    per-batch CutMix, the teacher's labels online): every tensor its steps make is on that device, and this
    package's code calls no tensor factory without ``device=``."""
    from unidd_ray.config import EvaluateConfig
    from unidd_ray.core.evaluation import TeacherLabels, train_student

    device = torch.device("cpu")
    cfg = EvaluateConfig(student="convnet", student_options={"width": 32, "depth": 2, "norm": "batch"}, epochs=2,
                         batch_size=5, temperature=4.0, protocol=protocol)
    student = _fresh_student(digits)
    factories, devices = Factories(ours_only=True), Devices()
    with factories, devices:
        trained = train_student(student, digits["init"], digits["labels"], cfg, seed=0,
                                soft_labels=TeacherLabels(digits["teacher"]), num_classes=digits["num_classes"],
                                device=device)
    assert factories.missing == [], factories.missing
    assert devices.devices == {device}
    assert all(p.device == device for p in trained.parameters())
