"""The teacher artifact: ``teacher.pt`` (a state_dict) and ``teacher.json`` (what it is).

``teacher.json`` names the architecture and its options, the dataset it was
trained on (name and fingerprint), the normalisation, the validation top-1 and
the sha256 of ``teacher.pt``; :func:`load_teacher` checks that checksum and
loads the weights with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from unidd_ray.artifacts import ArtifactError, atomic_write_bytes, atomic_write_json, sha256_file
from unidd_ray.models import build_model

WEIGHTS = "teacher.pt"
INFO = "teacher.json"


@dataclass
class TeacherInfo:
    arch: str
    options: dict
    num_classes: int
    in_channels: int
    resolution: int
    dataset: str
    dataset_fingerprint: str
    mean: list[float]
    std: list[float]
    val_top1: float | None = None
    sha256: str = ""
    extra: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        return build_model(self.arch, num_classes=self.num_classes, in_channels=self.in_channels,
                           resolution=self.resolution, **self.options)


def save_teacher(model: nn.Module, info: TeacherInfo, out_dir: str | Path) -> TeacherInfo:
    """Write ``teacher.pt`` then ``teacher.json`` (with the weights' sha256), each atomically."""
    import io

    out_dir = Path(out_dir)
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, buffer)
    atomic_write_bytes(out_dir / WEIGHTS, buffer.getvalue())
    info = dataclasses.replace(info, sha256=sha256_file(out_dir / WEIGHTS))
    atomic_write_json(out_dir / INFO, dataclasses.asdict(info))
    return info


def read_teacher_info(teacher_dir: str | Path) -> TeacherInfo:
    path = Path(teacher_dir) / INFO
    if not path.is_file():
        raise ArtifactError(f"{teacher_dir} holds no teacher: {INFO} is missing (run `unidd-ray squeeze` first)")
    try:
        data = json.loads(path.read_text())
        return TeacherInfo(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a valid teacher description: {exc}") from exc


def load_teacher(teacher_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, TeacherInfo]:
    """The frozen teacher in eval mode and its description; the weights' checksum is verified."""
    teacher_dir = Path(teacher_dir)
    info = read_teacher_info(teacher_dir)
    weights = teacher_dir / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing")
    if sha256_file(weights) != info.sha256:
        raise ArtifactError(f"{weights} does not match the sha256 recorded in {INFO}: it was modified or "
                            "truncated; re-run `unidd-ray squeeze`")
    model = info.build()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info
