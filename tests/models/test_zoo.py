"""The model zoo: ``torchvision:<name>`` and ``timm:<name>`` models build for the data's classes, channels and side
(the CIFAR stem at ≤ 32 px), train, are refused by name at config time, bring their own normalisation
(``teacher.normalization: model``), and ``evaluate.students`` evaluates each of them on every set.

Cost on 2 CPU cores: every model trains one AdamW step at 32 px and gives its logits at 224 px (no gradient
there: a 224-px backward of regnet_y_8gf alone takes ~10 s)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unidd_ray.models import build_model

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# the paper's cross-architecture table, as zoo names, and the path of each one's first conv
ZOO = {
    "torchvision:resnet18": "conv1",
    "torchvision:resnet50": "conv1",
    "torchvision:resnet101": "conv1",
    "torchvision:densenet121": "features.conv0",
    "torchvision:regnet_y_8gf": "stem.0",
    "timm:convnext_tiny": "stem.0",
    "torchvision:mobilenet_v2": "features.0.0",
}


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", list(ZOO))
def test_a_zoo_model_builds_trains_at_32_px_and_runs_at_224_px(name):
    torch.manual_seed(0)
    small = build_model(name, num_classes=10, in_channels=3, resolution=32)
    first = small.get_submodule(ZOO[name])
    assert first is _first_conv(small) and first.stride == (1, 1)  # the CIFAR stem
    if name.endswith(("resnet18", "resnet50", "resnet101")):
        assert first.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    if name.endswith("densenet121"):
        assert first.kernel_size == (3, 3) and isinstance(small.features.pool0, nn.Identity)
    if name == "timm:convnext_tiny":
        assert first.kernel_size == (3, 3)  # not the 4x4 stride-4 patchify
    small.train()
    optimizer = torch.optim.AdamW(small.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in small.parameters()]
    logits = small(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 7]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, small.parameters()))

    large = build_model(name, num_classes=10, in_channels=3, resolution=224).eval()
    assert large.get_submodule(ZOO[name]).stride != (1, 1)  # the ImageNet stem, as the library builds it
    with torch.inference_mode():
        assert large(torch.randn(2, 3, 224, 224)).shape == (2, 10)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18", "torchvision:convnext_tiny"])
def test_a_zoo_model_takes_the_datas_channel_count(name):
    model = build_model(name, num_classes=4, in_channels=1, resolution=28)
    assert _first_conv(model).in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_stem_imagenet_keeps_the_librarys_stem_and_a_family_without_an_adaptation_is_kept():
    model = build_model("torchvision:resnet18", num_classes=10, in_channels=3, resolution=32, stem="imagenet")
    assert model.conv1.stride == (2, 2) and isinstance(model.maxpool, nn.MaxPool2d)
    vgg = build_model("torchvision:vgg11", num_classes=10, in_channels=3, resolution=32)  # no CIFAR stem: as is
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_registered_names_are_unchanged():
    from unidd_ray.models import available_models

    assert available_models() == ["convnet", "densenet121", "mobilenet_v2", "resnet18", "resnet50"]
    zoo = build_model("torchvision:resnet18", num_classes=10, in_channels=3, resolution=32)
    registered = build_model("resnet18", num_classes=10, in_channels=3, resolution=32)
    # the same parameters, under the same names: a resnet18 weights file loads into either
    assert {k: v.shape for k, v in zoo.state_dict().items()} == {k: v.shape for k, v in registered.state_dict().items()}


@pytest.mark.parametrize("recipe, message", [
    ({"teacher": {"arch": "timm:convnext_tny"}},
     r"^teacher.arch 'timm:convnext_tny': timm has no classifier named 'convnext_tny'; did you mean "
     r"timm:convnext_tiny"),
    ({"evaluate": {"student": "torchvision:regnet_y_8g"}},
     r"^evaluate.student 'torchvision:regnet_y_8g': torchvision has no classifier named 'regnet_y_8g'; did you mean "
     r"torchvision:regnet_y_8gf"),
    ({"evaluate": {"students": ["resnet18", "torchvision:resnet_101"]}},
     r"^evaluate.students\[1\] 'torchvision:resnet_101': .*did you mean torchvision:resnet101"),
    ({"evaluate": {"student": "regnet_y_8gf"}},
     r"^evaluate.student must be one of \[.*\] or a zoo name, .*\(e.g. torchvision:regnet_y_8gf\), got"),
    ({"teacher": {"arch": "timm:resnet18", "options": {"pretrained": True}}},
     r"^teacher.options do not suit 'timm:resnet18': .*'pretrained': weights are never downloaded here: give a "
     r"weights file as teacher.weights"),
    ({"evaluate": {"students": ["resnet18", "resnet18"]}}, r"^evaluate.students must name each architecture once"),
    ({"teacher": {"normalization": "model"}}, r"^teacher.normalization model takes teacher.arch's own constants, "
                                              r"but 'convnet' has no normalisation of its own"),
])
def test_an_unknown_zoo_name_is_refused_when_the_recipe_is_read(recipe, message):
    from unidd_ray.config import ConfigError, Recipe, from_dict

    with pytest.raises(ConfigError, match=message) as caught:
        from_dict(Recipe, recipe)
    assert "\n" not in str(caught.value)


def test_normalization_model_gives_the_models_own_constants():
    import timm

    from unidd_ray.config import ModelConfig
    from unidd_ray.data.normalization import normalization_source, resolve_normalization

    rgb = SimpleNamespace(name="rgb", channels=3, mean=[0.1] * 3, std=[0.2] * 3)
    assert resolve_normalization("model", rgb, "torchvision:regnet_y_8gf") == IMAGENET
    assert resolve_normalization("model", rgb, "resnet18") == IMAGENET  # a registered torchvision architecture
    assert "RegNet_Y_8GF_Weights" in normalization_source("model", "torchvision:regnet_y_8gf")
    convnext = timm.models.get_pretrained_cfg("convnext_tiny")
    assert resolve_normalization("model", rgb, "timm:convnext_tiny") == (list(convnext.mean), list(convnext.std))
    # timm's own: inception_v3 was trained with 0.5/0.5, not ImageNet's
    assert resolve_normalization("model", rgb, "timm:inception_v3") == ([0.5] * 3, [0.5] * 3)
    assert normalization_source("model", "timm:inception_v3").startswith("timm pretrained_cfg of inception_v3")
    assert normalization_source("imagenet", "timm:inception_v3") is None
    gray = SimpleNamespace(name="digits", channels=1, mean=[0.1], std=[0.2])
    with pytest.raises(ValueError, match=r"gives 3 channel\(s\) but the images of 'digits' have 1"):
        resolve_normalization("model", gray, "torchvision:resnet18")
    assert ModelConfig(arch="timm:convnext_tiny", normalization="model").normalization == "model"


def test_evaluate_students_plans_one_evaluation_per_student_and_set(monkeypatch, tmp_path):
    from unidd_ray import pipeline
    from unidd_ray.config import from_dict, Recipe
    from unidd_ray.keys import evaluate_key

    students = ["resnet18", "torchvision:regnet_y_8gf", "timm:convnext_tiny"]
    recipe = from_dict(Recipe, {"evaluate": {"student": "convnet", "students": students}})
    alone = from_dict(Recipe, {"evaluate": {"student": "convnet"}})
    # a distilled set's identity is its images: stand-ins, one per set directory
    monkeypatch.setattr(pipeline.distilled, "identity_inputs",
                        lambda out: ([{"path": f"{Path(out).name}.png", "class": 0}], {f"{Path(out).name}.png": "0"}))
    info = SimpleNamespace(fingerprint="f" * 64, storage="raw", mean=[0.5], std=[0.25])
    tinfo = SimpleNamespace(sha256="t" * 64, mean=[0.5], std=[0.25])
    inputs = pipeline.RunInputs(run=tmp_path, data_dir=tmp_path, info=info, teacher_dir=tmp_path, tinfo=tinfo,
                                stats_dir=None, stats_id=None, recipe_yaml="")
    sets = [pipeline._Set("cfm", 10, tmp_path / "cfm-ipc10"), pipeline._Set("random", 10, tmp_path / "random-ipc10")]
    planned = pipeline._plan_evaluations(recipe, inputs, sets)
    assert [(e.method, e.job.cfg.student) for e in planned] == [(s.method, name) for s in sets
                                                                for name in ["convnet", *students]]
    assert len({e.out for e in planned}) == len({e.key for e in planned}) == len(planned) == 8
    assert all(e.job.cfg.students == [] for e in planned)
    assert [e.out.name.split("-")[3] for e in planned[:4]][1:] == ["resnet18", "torchvision", "timm"]
    # evaluate.student among them is that one evaluation
    again = from_dict(Recipe, {"evaluate": {"student": "convnet", "students": ["convnet", *students]}})
    assert [e.out for e in pipeline._plan_evaluations(again, inputs, sets)] == [e.out for e in planned]
    # evaluate.student's evaluations keep the directories (keys) they had without evaluate.students
    before = pipeline._plan_evaluations(alone, inputs, sets)
    assert [e.out for e in before] == [planned[0].out, planned[4].out]
    assert evaluate_key(alone.evaluate, info, tinfo, "x") == evaluate_key(
        pipeline.replace(recipe.evaluate, students=[]), info, tinfo, "x")


def test_the_imagenet_recipe_names_the_papers_cross_architecture_students():
    from unidd_ray.config import RECIPE_DIR, load_recipe

    line = next(t for t in (RECIPE_DIR / "imagenet1k.yaml").read_text().splitlines()
                if t.strip().startswith("# students: ["))
    recipe = load_recipe("imagenet1k", overrides=[f"evaluate.{line.strip().removeprefix('# ').replace(': ', '=', 1)}"])
    assert [recipe.evaluate.student, *recipe.evaluate.students] == [
        "resnet18", "torchvision:resnet50", "torchvision:resnet101", "torchvision:densenet121",
        "torchvision:regnet_y_8gf", "timm:convnext_tiny", "torchvision:mobilenet_v2"]
