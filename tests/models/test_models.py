"""Loading user-supplied weights into registry models: accepted layouts and clear refusals."""

from __future__ import annotations

import pytest
import torch

from unidd_ray.models import build_model
from unidd_ray.models.registry import load_weights


def _convnet(width: int = 16, num_classes: int = 10):
    return build_model("convnet", num_classes=num_classes, in_channels=1, resolution=28, width=width, depth=2)


def test_loads_plain_wrapped_and_ddp_prefixed_state_dicts(tmp_path):
    source = _convnet()
    state = source.state_dict()
    for name, obj in {"plain": state, "wrapped": {"state_dict": state},
                      "ddp": {"model": {f"module.{k}": v for k, v in state.items()}}}.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        target = load_weights(_convnet(), tmp_path / f"{name}.pt")
        for k, v in state.items():
            assert torch.equal(target.state_dict()[k], v), (name, k)


def test_refuses_weights_of_another_shape_with_the_layer_and_both_shapes(tmp_path):
    torch.save(_convnet(width=16).state_dict(), tmp_path / "w16.pt")
    with pytest.raises(ValueError, match=r"other shapes than the model.*\(16, 1, 3, 3\) vs \(32, 1, 3, 3\).*width"):
        load_weights(_convnet(width=32), tmp_path / "w16.pt")
    torch.save(_convnet(num_classes=5).state_dict(), tmp_path / "k5.pt")
    with pytest.raises(ValueError, match="other shapes"):
        load_weights(_convnet(num_classes=10), tmp_path / "k5.pt")


def test_refuses_missing_keys_unless_not_strict(tmp_path):
    state = _convnet().state_dict()
    dropped = next(iter(state))
    torch.save({k: v for k, v in state.items() if k != dropped}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=f"missing.*{dropped}"):
        load_weights(_convnet(), tmp_path / "partial.pt")
    model = load_weights(_convnet(), tmp_path / "partial.pt", strict=False)
    key = next(k for k in state if k != dropped and state[k].is_floating_point())
    assert torch.equal(model.state_dict()[key], state[key])


def test_refuses_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(_convnet(), tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_weights(_convnet(), tmp_path / "junk.pt")


@pytest.mark.parametrize("options, weights, message", [
    ({"widht": 8}, None, "widht"),
    ({"width": 8}, "absent.pt", "does not exist"),
    ({"width": 8}, "w16.pt", "other shapes than the model"),
])
def test_squeeze_checks_the_teacher_before_any_worker_starts(options, weights, message, ray_session, digits_data,
                                                             tmp_path):
    from unidd_ray.config import DataConfig, ModelConfig, SqueezeConfig
    from unidd_ray.stages.squeeze import squeeze

    torch.save(_convnet(width=16).state_dict(), tmp_path / "w16.pt")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        model = ModelConfig(arch="convnet", options=options, weights=str(tmp_path / weights) if weights else None)
        squeeze(digits_data, tmp_path / "teacher", squeeze_cfg=SqueezeConfig(epochs=1, workers=1, cpus_per_worker=1),
                model_cfg=model, data_cfg=DataConfig(dataset="digits"), storage_path=tmp_path / "ray")
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "ray").exists()
