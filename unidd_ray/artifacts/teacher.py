"""The teacher artifact: ``teacher.pt`` (a state_dict) and ``teacher.json`` (what it is).

``teacher.json`` names the architecture and its options, the dataset it was
trained on (name and fingerprint; an empty fingerprint for a teacher trained
elsewhere and imported), the normalisation of its inputs (``mean``/``std``,
which every stage normalises the data with), the validation top-1,
the sha256 of ``teacher.pt`` and ``info_sha256``, the checksum of its other
keys; :func:`read_teacher_info` refuses an edited file, :func:`load_teacher`
checks the weights' checksum and loads them with ``weights_only=True``, and
:func:`check_teacher_data` refuses a teacher that does not suit the prepared
data it is used with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from unidd_ray.artifacts.files import ArtifactError, atomic_write_bytes, atomic_write_json, sha256_file
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
    out_dir = Path(out_dir)
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, buffer)
    atomic_write_bytes(out_dir / WEIGHTS, buffer.getvalue())
    info = dataclasses.replace(info, sha256=sha256_file(out_dir / WEIGHTS))
    data = dataclasses.asdict(info)
    atomic_write_json(out_dir / INFO, {**data, "info_sha256": _content_sha256(data)})
    return info


def _content_sha256(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "info_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_teacher_info(teacher_dir: str | Path) -> TeacherInfo:
    path = Path(teacher_dir) / INFO
    if not path.is_file():
        raise ArtifactError(f"{teacher_dir} holds no teacher: {INFO} is missing (run `unidd-ray squeeze` first)")
    try:
        data = json.loads(path.read_text())
        recorded = data.pop("info_sha256", None)
        if recorded is not None and recorded != _content_sha256(data):
            raise ArtifactError(f"{path} was edited after it was written (its info_sha256 no longer matches its "
                                "content); re-run `unidd-ray squeeze`")
        return TeacherInfo(**data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path} is not a valid teacher description ({exc}); re-run `unidd-ray squeeze`") from exc


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
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{weights} cannot be loaded as the weights of a {info.arch} with options {info.options} "
                            f"({first}); re-run `unidd-ray squeeze`") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info


def check_teacher_data(tinfo: TeacherInfo, info, teacher_dir: str | Path, data_dir: str | Path) -> None:
    """Refuse a teacher that cannot be used with the prepared dataset ``info`` (in ``data_dir``).

    The rule:

    - a teacher trained here (``dataset_fingerprint`` set) must have been trained on this very data: the same
      dataset fingerprint, and the class and channel counts ``dataset.json`` records now;
    - an imported teacher, trained elsewhere (``dataset_fingerprint == ""``, e.g. ``unidd-ray import``, which
      records where it came from in ``extra["provenance"]``), is checked for what the data can show: its class
      count, its channel count and, for raw storage (where every image has the stored side), its resolution;
    - the normalisation is never compared: it belongs to the teacher (``mean``/``std``, e.g. a pretrained
      teacher's fixed constants), and every stage normalises the data with the teacher's, whatever the
      dataset's own mean and std are.
    """
    imported = not tinfo.dataset_fingerprint
    if not imported and tinfo.dataset_fingerprint != info.fingerprint:
        raise ArtifactError(f"the teacher in {teacher_dir} was trained on dataset {tinfo.dataset_fingerprint[:12]}…, "
                            f"not on {data_dir} ({info.fingerprint[:12]}…); train one on this data with "
                            "`unidd-ray squeeze`")
    checks = [("num_classes", tinfo.num_classes, info.num_classes), ("channels", tinfo.in_channels, info.channels)]
    if imported and info.storage == "raw":
        checks.append(("resolution", tinfo.resolution, info.resolution))
    differ = [f"{name} {theirs} (teacher) vs {ours} (dataset)" for name, theirs, ours in checks if theirs != ours]
    if differ and imported:
        raise ArtifactError(f"the imported teacher in {teacher_dir} does not suit {data_dir} ({'; '.join(differ)}): "
                            f"it was trained on {tinfo.dataset or 'other data'}; import a teacher of this data or "
                            "prepare the data it was trained on")
    if differ:
        raise ArtifactError(f"{teacher_dir}/{INFO} and {data_dir}/dataset.json disagree ({'; '.join(differ)}): one "
                            "of them was edited; prepare the dataset again and re-run `unidd-ray squeeze`")
