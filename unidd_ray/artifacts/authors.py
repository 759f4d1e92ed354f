"""Reading the UniDD authors' released artifacts (github bdy9527/UniDD): their teacher checkpoints and their
real-feature statistics, turned into this project's teacher and statistics artifacts.

Their files, and how each is read (parsed, never unpickled beyond ``torch.load(weights_only=True)``):

- a checkpoint ``ckpt/<dataset>/<Model>.pth``: a state_dict.  Their ConvNet names its modules
  ``layers.conv.i``, ``layers.norm.i`` and ``classifier``; ours ``features.{4i}``, ``features.{4i+1}`` and
  ``classifier`` (conv → norm → ReLU → pool per stage).  Their ResNet-18 is torchvision's with the CIFAR stem,
  so its names are ours.
- the statistics ``statistic/<dataset>/input/ConvFeatureHook/<Model>.pth=<layer>/running.npz`` (read with
  ``allow_pickle=False``), one folder per tapped layer (the input of every Conv2d but the 1×1 shortcuts, the
  same taps as ours), float32 arrays ``running_cov`` (C × C, the per_batch covariance), ``running_corr``
  (C × C, E[x xᵀ] over positions), ``running_mean`` (C), ``running_class_mean`` and ``running_mix_mean``
  (C × K, the class_share and mix_share signals).

:func:`import_unidd` writes ``OUT/teacher`` and ``OUT/stats`` (an ``import`` output, recorded in
``OUT/import.json`` with the sha256 of every file it read), refusing an incomplete or inconsistent tree by
naming the missing layer or key before anything is written.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unidd_ray.artifacts.files import ArtifactError, atomic_directory, atomic_write_json, sha256_file
from unidd_ray.artifacts.statistics import write_targets
from unidd_ray.artifacts.teacher import TeacherInfo, save_teacher
from unidd_ray.models import default_tap_layers
from unidd_ray.spectral import Targets

KIND = "import"
RECORD = "import.json"
NPZ = "running.npz"
# their key -> what it holds here (every key must be there and finite)
KEYS = {"running_cov": "per_batch", "running_corr": "second_moment", "running_mean": "mean",
        "running_class_mean": "class_share", "running_mix_mean": "mix_share"}
SOURCE = "github bdy9527/UniDD"


@dataclass(frozen=True)
class Model:
    """One of their models: our architecture and options, and how their state_dict names map onto ours."""

    arch: str
    options: dict

    def our_name(self, theirs: str) -> str:
        """Our module name of their module (or parameter) name."""
        if self.arch == "convnet":
            match = re.fullmatch(r"layers\.(conv|norm)\.(\d+)(\..+)?", theirs)
            if match:
                kind, index, rest = match.groups()
                return f"features.{4 * int(index) + (0 if kind == 'conv' else 1)}{rest or ''}"
        return theirs


def parse_model(name: str, arch: str) -> Model:
    """Their model name (``ConvNetW128D3``, ``ConvNetW128`` = depth 3, ``ResNet18``) as our architecture;
    ``arch`` must agree with it."""
    convnet = re.fullmatch(r"ConvNetW(\d+)(?:D(\d+))?", name)
    if convnet and arch == "convnet":
        return Model("convnet", {"width": int(convnet.group(1)), "depth": int(convnet.group(2) or 3),
                                 "norm": "batch"})
    if name == "ResNet18" and arch == "resnet18":
        return Model("resnet18", {"stem": "cifar"})
    raise ArtifactError(f"--model {name} with --arch {arch} is not one of the authors' models this importer knows "
                        "(ConvNetW<width>[D<depth>] with --arch convnet, ResNet18 with --arch resnet18)")


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"--checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"--checkpoint {path} is not a readable torch state_dict ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"--checkpoint {path} does not hold a state_dict of tensors")
    return state


def build_teacher(model: Model, state: dict, *, num_classes: int, resolution: int, checkpoint: Path):
    """Our module with their weights (names mapped), refusing a missing, extra or misshapen tensor by name."""
    teacher = TeacherInfo(arch=model.arch, options=model.options, num_classes=num_classes, in_channels=3,
                          resolution=resolution, dataset="", dataset_fingerprint="", mean=[], std=[]).build()
    mapped = {model.our_name(k): v for k, v in state.items()}
    ours = teacher.state_dict()
    missing = [k for k in ours if k not in mapped]
    extra = [k for k in mapped if k not in ours]
    if missing or extra:
        raise ArtifactError(f"--checkpoint {checkpoint} does not fit {model.arch} {model.options} with "
                            f"{num_classes} classes: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in ours.items():
        if tuple(mapped[k].shape) != tuple(v.shape):
            raise ArtifactError(f"--checkpoint {checkpoint}: {k} has shape {tuple(mapped[k].shape)}, "
                                f"{model.arch} {model.options} with {num_classes} classes needs {tuple(v.shape)}")
    teacher.load_state_dict(mapped)
    return teacher.eval()


def statistics_folder(root: Path, model_name: str) -> Path:
    """The folder holding ``<model_name>.pth=<layer>`` folders: ``root`` itself or the one folder under it."""
    if not root.is_dir():
        raise ArtifactError(f"--statistics {root} is not a directory")
    pattern = f"{model_name}.pth=*"
    if any(root.glob(pattern)):
        return root
    found = sorted({p.parent for p in root.rglob(pattern)})
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(map(str, found[:3]))})"
        raise ArtifactError(f"--statistics {root} holds {what} folders of {pattern} statistics; give the folder "
                            "that holds them (statistic/<dataset>/input/ConvFeatureHook)")
    return found[0]


def read_statistics(folder: Path, model_name: str, model: Model, layers: list[str], num_classes: int
                    ) -> tuple[dict[str, Targets], dict[str, str], dict[str, str]]:
    """``{our layer: Targets}`` for every tapped layer of the teacher, the sha256 of every file read, and the
    folder each layer was read from (``{our layer: "<Model>.pth=<their layer>"}``)."""
    theirs = {}
    for path in folder.glob(f"{model_name}.pth=*"):
        theirs[model.our_name(path.name.split("=", 1)[1])] = path
    missing = [name for name in layers if name not in theirs]
    if missing:
        raise ArtifactError(f"--statistics {folder} has no statistics of the teacher's layer(s) {missing} "
                            f"(expected {model_name}.pth=<layer>/{NPZ} for each)")
    targets, read = {}, {}
    for name in layers:
        path = theirs[name] / NPZ
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (statistics of layer {name})")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: np.array(npz[k], dtype=np.float64) for k in npz.files if k in KEYS}
        except (ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
            raise ArtifactError(f"{path} is not a readable .npz of arrays ({exc})") from None
        absent = [k for k in KEYS if k not in arrays]
        if absent:
            raise ArtifactError(f"{path} lacks the key(s) {absent} (layer {name})")
        try:
            t = Targets(**{KEYS[k]: torch.from_numpy(v) for k, v in arrays.items()})
        except ValueError as exc:
            raise ArtifactError(f"{path} is inconsistent (layer {name}): {exc}") from None
        if t.num_classes != num_classes:
            raise ArtifactError(f"{path} holds signals of {t.num_classes} classes, the dataset has {num_classes}")
        targets[name] = t
        read[str(path.relative_to(folder))] = sha256_file(path)
    return targets, read, {name: theirs[name].name for name in layers}


def import_unidd(*, statistics: str | Path, checkpoint: str | Path, model_name: str, arch: str, dataset: str,
                 num_classes: int, resolution: int, mean: list[float], std: list[float], out: str | Path) -> Path:
    """Write their teacher and statistics as ``out/teacher`` and ``out/stats`` (see the module docstring)."""
    checkpoint, out = Path(checkpoint), Path(out)
    model = parse_model(model_name, arch)
    state = _load_checkpoint(checkpoint)
    teacher = build_teacher(model, state, num_classes=num_classes, resolution=resolution, checkpoint=checkpoint)
    layers = default_tap_layers(teacher)
    folder = statistics_folder(Path(statistics), model_name)
    targets, read, sources = read_statistics(folder, model_name, model, layers, num_classes)
    provenance = {"source": SOURCE, "model": model_name, "checkpoint": {"path": str(checkpoint),
                  "sha256": sha256_file(checkpoint)}, "statistics": {"path": str(folder), "files": read},
                  "layers": sources}
    with atomic_directory(out, KIND) as tmp:
        info = TeacherInfo(arch=model.arch, options=model.options, num_classes=num_classes, in_channels=3,
                           resolution=resolution, dataset=dataset, dataset_fingerprint="", mean=list(mean),
                           std=list(std), extra={"provenance": provenance})
        info = save_teacher(teacher, info, tmp / "teacher")
        write_targets(tmp / "stats", targets, teacher_sha256=info.sha256, provenance=provenance)
        atomic_write_json(tmp / RECORD, {"source": SOURCE, "teacher": "teacher", "stats": "stats",
                                         "teacher_sha256": info.sha256, **provenance})
    return out

