"""The statistics stage: shard-invariant float64 moments over Ray actors, the artifact, ``stats --inspect``.

The invariance tests run the actor pool with 1 actor, 3 actors with another unit size, and 3
actors of which one is killed mid-run, and require bit-for-bit identical moments.  The first
tapped layer's input is the normalised image, so its statistics are also checked against a
numpy float64 computation over the images read straight from the ``.beton``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import unidd_ray  # noqa: F401  (applies the torchvision import fix first)
from unidd_ray.artifacts.files import ArtifactError
from unidd_ray.config import StatsConfig
from unidd_ray.spectral import Moments

# the merge plan shared by every run that must agree (forward batch and canonical block): that of
# the ``digits_stats`` fixture, so that the artifact is compared with the runs below as well
BATCH, BLOCK = 128, 256


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """FFCV loaders set torch's thread count to their ``num_workers``; keep other tests unaffected."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _assert_identical(a: dict[str, Moments], b: dict[str, Moments]) -> None:
    assert list(a) == list(b)
    for name in a:
        for f in Moments._FIELDS:
            x, y = getattr(a[name], f), getattr(b[name], f)
            assert x.dtype == torch.float64 and y.dtype == torch.float64
            assert torch.equal(x, y), f"layer {name}, field {f}: max diff {(x - y).abs().max().item():.3e}"


@pytest.fixture(scope="module")
def single_actor(ray_session, digits_data, digits_teacher):
    """The reference: one actor, one block per unit."""
    from unidd_ray.stages.stats import compute_stats

    cfg = StatsConfig(actors=1, batch_size=BATCH, block_size=BLOCK, blocks_per_unit=1)
    return compute_stats(digits_teacher, digits_data, cfg, progress=False)


# ----------------------------------------------------------------------------- the plan
def test_plan_blocks_and_units():
    from unidd_ray.stages.stats import make_plan

    plan = make_plan(1438, StatsConfig(batch_size=64, block_size=128, blocks_per_unit=3))
    assert plan.blocks[0] == (0, 128) and plan.blocks[-1] == (1408, 1438)
    assert len(plan.blocks) == 12 and sum(b - a for a, b in plan.blocks) == 1438
    assert plan.units == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(ValueError, match=r"stats.block_size must be a multiple of stats.batch_size \(64\)"):
        StatsConfig(batch_size=64, block_size=100)
    with pytest.raises(ValueError, match="stats.blocks_per_unit must be an integer >= 1"):
        StatsConfig(batch_size=64, block_size=128, blocks_per_unit=0)


def test_worker_in_process_matches_block_fold(digits_data, digits_teacher, single_actor):
    """The worker used directly (no Ray) gives the same per-block moments the pool folds."""
    from unidd_ray.stages.stats import StatsWorker, fold

    worker = StatsWorker(str(digits_teacher), str(digits_data), None, BATCH, BLOCK, threads=1)
    blocks = [(b, *single_actor.plan.blocks[b]) for b in range(len(single_actor.plan.blocks))]
    out = worker.compute(blocks)
    total = None
    for b in sorted(out):
        total = fold(total, out[b])
    _assert_identical(total, single_actor.moments)


def test_worker_makes_every_tensor_on_the_device_passed(digits_data, digits_teacher, single_actor):
    """The worker's device logic with ``device="cpu"`` passed explicitly (as an actor with
    ``stats.gpus_per_actor`` gets ``"cuda"``): the teacher, the moments and every tensor of a unit are on that
    device, and this package's code calls no tensor factory without ``device=``."""
    from support.devices import Devices, Factories
    from unidd_ray.stages.stats import StatsWorker

    device = torch.device("cpu")
    worker = StatsWorker(str(digits_teacher), str(digits_data), None, BATCH, BLOCK, threads=1, device="cpu")
    assert worker.device == device and all(p.device == device for p in worker.model.parameters())
    factories, devices = Factories(ours_only=True), Devices()
    with factories, devices:
        out = worker.compute([(0, *single_actor.plan.blocks[0])])
    assert factories.missing == [], factories.missing
    assert devices.devices == {device}
    assert {t.device for layers in out.values() for state in layers.values() for t in state.values()
            if isinstance(t, torch.Tensor)} == {device}


# ----------------------------------------------------------------------------- invariance
def test_single_actor_covers_every_image(single_actor, digits_data):
    from unidd_ray.artifacts.dataset import read_labels

    labels = read_labels(str(digits_data), "train")
    assert single_actor.plan.images == len(labels) == 1438
    assert single_actor.retried_units == 0
    for name, m in single_actor.moments.items():
        assert m.images == len(labels), name
        np.testing.assert_array_equal(m.image_n.numpy(), np.bincount(labels, minlength=m.num_classes))
        # the soft weights are softmax rows summed: one per image
        assert abs(float(m.soft_weight.sum()) - len(labels)) < 1e-9


def test_three_actors_other_unit_size_identical(ray_session, digits_data, digits_teacher, single_actor):
    from unidd_ray.stages.stats import compute_stats

    arrivals = []
    cfg = StatsConfig(actors=3, batch_size=BATCH, block_size=BLOCK, blocks_per_unit=2)
    res = compute_stats(digits_teacher, digits_data, cfg, progress=False,
                        on_result=lambda unit, pool: arrivals.append(unit))
    assert sorted(arrivals) == list(range(len(res.plan.units))) == list(range(3))
    assert res.retried_units == 0
    _assert_identical(res.moments, single_actor.moments)


def test_actor_larger_than_the_embedded_cluster_is_refused(ray_session, digits_data, digits_teacher):
    from unidd_ray.stages.stats import compute_stats

    cpus = ray_session.cluster_resources()["CPU"]
    cfg = StatsConfig(actors=1, cpus_per_actor=cpus + 1, batch_size=BATCH, block_size=BLOCK)
    with pytest.raises(ValueError, match="stats.cpus_per_actor.*cannot grow"):
        compute_stats(digits_teacher, digits_data, cfg, progress=False)


@pytest.fixture
def no_actors(monkeypatch):
    """Any actor start (``ray.remote``) fails the test: checks that must come before them."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("a Ray actor was about to start")

    monkeypatch.setattr(ray, "remote", refuse)


@pytest.mark.parametrize("layers, message", [
    (["features.0", "nope"], (r"cannot tap the teacher in .*: the model has no layers named \['nope'\]; its "
                              r"default taps are \['features.0', 'features.4'\]; set stats.layers")),
    (["classifier"], r"cannot tap the teacher in .*: cannot tell the input channels of layer 'classifier' \(Linear\)"),
])
def test_bad_layers_are_named_before_any_actor_starts(layers, message, digits_data, digits_teacher, no_actors):
    from unidd_ray.stages.stats import compute_stats

    cfg = StatsConfig(actors=2, batch_size=BATCH, block_size=BLOCK, layers=layers)
    with pytest.raises(ValueError, match=message):
        compute_stats(digits_teacher, digits_data, cfg, progress=False)


def test_tampered_teacher_is_named_before_any_actor_starts(digits_data, digits_teacher, tmp_path, no_actors):
    from unidd_ray.stages.stats import run_stats

    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher, teacher)
    weights = bytearray((teacher / "teacher.pt").read_bytes())
    weights[-1] ^= 0xFF
    (teacher / "teacher.pt").write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match="teacher.pt does not match the sha256"):
        run_stats(digits_data, teacher, tmp_path / "stats", StatsConfig(actors=2, batch_size=BATCH, block_size=BLOCK),
                  progress=False)
    assert not (tmp_path / "stats").exists()


def test_killed_actor_unit_is_rerun_identically(ray_session, digits_data, digits_teacher, single_actor):
    """Kill an actor after the first finished unit: its unit is re-run elsewhere, same bits."""
    from unidd_ray.stages.stats import compute_stats

    killed = []

    def kill_one(unit, pool):
        if not killed:
            key = min(pool)
            killed.append(key)
            ray_session.kill(pool[key], no_restart=True)

    cfg = StatsConfig(actors=3, batch_size=BATCH, block_size=BLOCK, blocks_per_unit=1)
    res = compute_stats(digits_teacher, digits_data, cfg, progress=False, on_result=kill_one)
    assert killed
    # whether the killed actor was busy or idle, the next unit handed to it fails and is re-run
    assert res.retried_units >= 1
    _assert_identical(res.moments, single_actor.moments)


def test_fixture_artifact_equals_single_actor(digits_stats, single_actor):
    """``digits_stats`` (2 actors, same plan) equals one actor bit-for-bit, after the Parquet round trip."""
    from unidd_ray.artifacts.statistics import load_stats, read_stats_metadata

    plan = read_stats_metadata(digits_stats)["plan"]
    assert (plan["batch_size"], plan["block_size"]) == (BATCH, BLOCK)
    _assert_identical(load_stats(digits_stats), single_actor.moments)


def test_another_block_plan_changes_only_rounding(digits_data, digits_teacher, single_actor):
    """Another block size folds in another order: equal to rounding, not necessarily bit-for-bit."""
    from unidd_ray.stages.stats import StatsWorker, fold, make_plan

    plan = make_plan(1438, StatsConfig(batch_size=64, block_size=64))
    worker = StatsWorker(str(digits_teacher), str(digits_data), None, 64, 64, threads=1)
    out = worker.compute([(b, *plan.blocks[b]) for b in range(len(plan.blocks))])
    other = None
    for b in sorted(out):
        other = fold(other, out[b])
    for name, m in single_actor.moments.items():
        for f in Moments._FIELDS:
            np.testing.assert_allclose(getattr(other[name], f).numpy(), getattr(m, f).numpy(), rtol=1e-9,
                                       atol=1e-9 * float(getattr(m, f).abs().max()))


# ----------------------------------------------------------------------------- exactness
def _train_images(data: Path):
    from unidd_ray.data.loading import make_loader

    xs, ys, idx = [], [], []
    for x, y, i in make_loader(str(data), "train", batch_size=200, num_workers=1):
        xs.append(x.numpy().astype(np.float64))
        ys.append(y.numpy())
        idx.append(i.numpy())
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(idx)


def test_first_layer_equals_numpy_float64_over_the_images(digits_stats, digits_data, digits_teacher):
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.statistics import load_stats
    from unidd_ray.artifacts.teacher import load_teacher

    images, labels, index = _train_images(digits_data)
    np.testing.assert_array_equal(index, np.arange(len(index)))
    info = read_dataset_info(digits_data)
    assert images.shape == (1438, info.channels, info.resolution, info.resolution)
    # the images are normalised (not raw pixels): the per-channel mean over the train split is ≈ 0
    assert abs(images.mean()) < 0.05 and abs(images.std() - 1) < 0.05

    stats = load_stats(digits_stats)
    first = next(iter(stats))
    model, _ = load_teacher(digits_teacher)
    assert first == "features.0" and isinstance(dict(model.named_modules())[first], torch.nn.Conv2d)
    m = stats[first]
    n_img, c, h, w = images.shape
    x = images.transpose(1, 0, 2, 3).reshape(c, -1)  # (C, N·H·W)
    n = x.shape[1]
    mean = x.mean(1)
    cov = (x @ x.T) / n - np.outer(mean, mean)
    assert m.count == n == n_img * h * w
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.covariance("total").numpy(), cov, rtol=1e-10)
    np.testing.assert_allclose(m.sumsq.numpy(), x @ x.T, rtol=1e-10)

    # per class: position counts and sums, the within-class covariance and pooled class means
    per_image = images.reshape(n_img, c, h * w)
    between = np.zeros((c, c))
    for k in range(m.num_classes):
        xk = per_image[labels == k].transpose(1, 0, 2).reshape(c, -1)
        assert m.class_n[k].item() == xk.shape[1]
        np.testing.assert_allclose(m.class_sum[k].numpy(), xk.sum(1), rtol=1e-10, atol=1e-9)
        between += np.outer(xk.sum(1), xk.sum(1)) / xk.shape[1]
        np.testing.assert_allclose(m.class_means[k].numpy(), per_image[labels == k].mean(2).mean(0), rtol=1e-10,
                                   atol=1e-12)
    np.testing.assert_allclose(m.covariance("within_class").numpy(), (x @ x.T - between) / n, rtol=1e-10)


# ----------------------------------------------------------------------------- the artifact
@pytest.fixture
def stats_copy(digits_stats, tmp_path) -> Path:
    out = tmp_path / "stats"
    shutil.copytree(digits_stats, out)
    return out


def test_artifact_layout_and_round_trip(digits_stats, digits_data, digits_teacher, tmp_path):
    import pyarrow.parquet as pq

    from unidd_ray.artifacts.files import sha256_file
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.statistics import STATS_FILE, load_stats, read_stats_metadata, write_stats
    from unidd_ray.artifacts.teacher import read_teacher_info

    teacher, data = read_teacher_info(digits_teacher), read_dataset_info(digits_data)
    manifest = json.loads((digits_stats / "manifest.json").read_text())
    assert manifest["kind"] == "stats"
    assert manifest["files"] == {STATS_FILE: sha256_file(digits_stats / STATS_FILE)}
    assert manifest["teacher_sha256"] == teacher.sha256 and manifest["dataset_fingerprint"] == data.fingerprint
    assert not [p.name for p in digits_stats.iterdir() if p.name.startswith(".")]  # no temporaries left
    summary = json.loads((digits_stats / "summary.json").read_text())
    assert summary["images"] == 1438 and summary["actors"] == 2

    table = pq.read_table(digits_stats / STATS_FILE)
    assert str(table.schema.field("sumsq").type) == "list<element: double>"
    meta = read_stats_metadata(digits_stats)
    assert meta["layers"] == table.column("layer").to_pylist() == manifest["layers"]
    assert meta["images"] == 1438

    # verified load with the right teacher and dataset; then a write/load round trip is exact
    stats = load_stats(digits_stats, teacher_sha256=teacher.sha256, dataset_fingerprint=data.fingerprint)
    assert all(isinstance(m, Moments) for m in stats.values())
    write_stats(tmp_path / "again", stats, teacher_sha256=teacher.sha256, dataset_fingerprint=data.fingerprint)
    _assert_identical(load_stats(tmp_path / "again" / STATS_FILE), stats)


def test_load_refuses_other_teacher_or_dataset(stats_copy, digits_data, digits_teacher):
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.statistics import load_stats
    from unidd_ray.artifacts.teacher import read_teacher_info

    teacher, data = read_teacher_info(digits_teacher), read_dataset_info(digits_data)
    with pytest.raises(ArtifactError, match=r"computed with teacher .* not with this teacher"):
        load_stats(stats_copy, teacher_sha256="f" * 64, dataset_fingerprint=data.fingerprint)
    with pytest.raises(ArtifactError, match=r"computed on dataset .* not on this one"):
        load_stats(stats_copy, teacher_sha256=teacher.sha256, dataset_fingerprint="0" * 64)


def test_load_detects_tampering(stats_copy):
    from unidd_ray.artifacts.statistics import STATS_FILE, load_stats

    path = stats_copy / STATS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        load_stats(stats_copy)


def test_load_detects_truncation(stats_copy):
    from unidd_ray.artifacts.statistics import STATS_FILE, load_stats

    path = stats_copy / STATS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        load_stats(stats_copy)


def test_load_detects_missing_manifest_or_file(stats_copy, tmp_path):
    from unidd_ray.artifacts.statistics import STATS_FILE, load_stats

    (stats_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_stats(stats_copy)
    with pytest.raises(ArtifactError, match="holds no stats.parquet"):
        load_stats(tmp_path / "nothing")
    assert not (tmp_path / "nothing" / STATS_FILE).exists()


def test_failed_write_leaves_previous_artifact_intact(stats_copy, monkeypatch):
    """A crash while writing the Parquet file leaves neither a partial file nor a broken artifact."""
    import pyarrow.parquet as pq

    from unidd_ray.artifacts import statistics as stats_io

    before = (stats_copy / stats_io.STATS_FILE).read_bytes()
    stats = stats_io.load_stats(stats_copy)
    meta = stats_io.read_stats_metadata(stats_copy)
    real_write = pq.write_table

    def crash(table, where, **kw):
        real_write(table.slice(0, 1), where, **kw)  # something is on disk under the temporary name
        raise OSError("disk full")

    monkeypatch.setattr(stats_io.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        stats_io.write_stats(stats_copy, stats, teacher_sha256=meta["teacher_sha256"],
                             dataset_fingerprint=meta["dataset_fingerprint"])
    assert (stats_copy / stats_io.STATS_FILE).read_bytes() == before
    assert not [p.name for p in stats_copy.iterdir() if p.name.startswith(".")]
    _assert_identical(stats_io.load_stats(stats_copy), stats)


def _result_of(stats_dir: Path, block_size: int):
    """A :class:`StatsResult` of the moments stored in ``stats_dir``, planned with another block size."""
    from unidd_ray.stages.stats import StatsResult, make_plan
    from unidd_ray.artifacts.statistics import load_stats

    moments = load_stats(stats_dir)
    images = int(next(iter(moments.values())).images)
    return StatsResult(moments, make_plan(images, StatsConfig(batch_size=BATCH, block_size=block_size)), 1.0, 0, 1)


def test_run_stats_replaces_the_artifact_whole(stats_copy, digits_data, digits_teacher, monkeypatch):
    """The statistics, manifest, summary and config are swapped in together: a crash while writing the summary
    leaves the previous artifact as it was, and a later run leaves nothing of an earlier one (its config)."""
    from unidd_ray.stages import stats as stage
    from unidd_ray.artifacts.statistics import read_stats_metadata

    (stats_copy / "summary.json").write_text('{"run": "previous"}')
    (stats_copy / "config.yaml").write_text("name: previous\n")
    before = {p.name: p.read_bytes() for p in stats_copy.iterdir()}
    monkeypatch.setattr(stage, "compute_stats", lambda *a, **k: _result_of(stats_copy, 2 * BLOCK))
    real_write = stage.atomic_write_json

    def crash_on_summary(path, obj):
        if Path(path).name == "summary.json":
            raise OSError("killed while writing summary.json")
        return real_write(path, obj)

    cfg = StatsConfig(actors=1, batch_size=BATCH, block_size=2 * BLOCK)
    monkeypatch.setattr(stage, "atomic_write_json", crash_on_summary)
    with pytest.raises(OSError, match="summary.json"):
        stage.run_stats(digits_data, digits_teacher, stats_copy, cfg, progress=False, recipe_yaml="name: new\n")
    assert {p.name: p.read_bytes() for p in stats_copy.iterdir()} == before
    assert [p.name for p in stats_copy.parent.iterdir() if p.name.startswith(".")] == []

    monkeypatch.setattr(stage, "atomic_write_json", real_write)
    stage.run_stats(digits_data, digits_teacher, stats_copy, cfg, progress=False)  # no recipe: no config.yaml
    assert sorted(p.name for p in stats_copy.iterdir()) == ["manifest.json", "stats.parquet", "summary.json"]
    summary = json.loads((stats_copy / "summary.json").read_text())
    assert summary["plan"] == read_stats_metadata(stats_copy)["plan"] and summary["plan"]["block_size"] == 2 * BLOCK


def test_covariance_report_rejects_non_psd():
    from unidd_ray.artifacts.statistics import covariance_report

    m = Moments(2, 2)
    m.update(torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1]))
    rep = covariance_report(m, [0.1])
    assert rep["asymmetry"] == 0 and rep["total"]["eig_min"] > 0  # float64 Σxxᵀ accumulates symmetric
    m.sumsq[0, 0] = -10.0  # corrupt: negative second moment
    with pytest.raises(ArtifactError, match="not positive semi-definite"):
        covariance_report(m)


def test_covariance_report_rejects_asymmetric_second_moments():
    from unidd_ray.artifacts.statistics import covariance_report

    m = Moments(3, 2)
    m.update(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1]))
    m.sumsq[0, 1] += 1e-6 * float(m.sumsq.abs().max())  # the covariance would be symmetrised, hiding this
    with pytest.raises(ArtifactError, match=r"not symmetric \(relative asymmetry 1\.0\d*e-06\)"):
        covariance_report(m)


def test_load_refuses_corrupt_statistics_naming_the_layer(stats_copy):
    from unidd_ray.artifacts import statistics as stats_io

    stats = stats_io.load_stats(stats_copy)
    meta = stats_io.read_stats_metadata(stats_copy)
    layer = sorted(stats)[-1]
    stats[layer].sumsq[1, 0] += 1.0
    stats_io.write_stats(stats_copy, stats, teacher_sha256=meta["teacher_sha256"],
                         dataset_fingerprint=meta["dataset_fingerprint"])
    with pytest.raises(ArtifactError, match=f"layer '{layer}'.*not symmetric.*recompute"):
        stats_io.load_stats(stats_copy)


# ----------------------------------------------------------------------------- stats --inspect
def _parse_table(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    rule = next(i for i, ln in enumerate(lines) if set(ln.replace(" ", "")) == {"-"})
    header = lines[rule - 1].split()
    return [dict(zip(header, ln.split())) for ln in lines[rule + 1:]]


def _close(printed: str, expected: float, scale: float) -> bool:
    """``printed`` is ``expected`` at the table's 4 significant digits (tiny values relative to ``scale``)."""
    return abs(float(printed) - expected) <= 6e-4 * abs(expected) + 1e-12 * scale


def test_inspect_prints_numpy_spectra(digits_stats, capsys):
    from unidd_ray.cli import main
    from unidd_ray.config import load_recipe
    from unidd_ray.spectral import beta_schedule
    from unidd_ray.artifacts.statistics import load_stats

    assert main(["stats", "--inspect", str(digits_stats)]) == 0
    rows = _parse_table(capsys.readouterr().out)
    r = load_recipe(None).recover  # the default recipe's β schedule
    betas = beta_schedule(r.schedule, r.beta_max, r.ipc, beta_min=r.beta_min)
    stats = load_stats(digits_stats)
    assert [row["layer"] for row in rows] == list(stats)
    for row in rows:
        m = stats[row["layer"]]
        n = float(m.n)
        s, sq = m.sum.numpy(), m.sumsq.numpy()
        mu = s / n
        total = sq / n - np.outer(mu, mu)
        cs, cn = m.class_sum.numpy(), m.class_n.numpy()
        within = (sq - sum(np.outer(cs[k], cs[k]) / cn[k] for k in range(len(cn)) if cn[k] > 0)) / n
        ev_t = np.linalg.eigvalsh((total + total.T) / 2)
        ev_w = np.linalg.eigvalsh((within + within.T) / 2)
        scale = ev_t[-1]
        assert int(row["C"]) == m.channels and int(row["count"]) == m.count
        assert _close(row["trace"], np.trace(total), scale)
        assert _close(row["eig_min"], ev_t[0], scale) and _close(row["eig_max"], ev_t[-1], scale)
        assert _close(row["wc_eig_min"], ev_w[0], scale) and _close(row["wc_eig_max"], ev_w[-1], scale)
        for b in (betas[0], betas[-1]):
            cond = np.linalg.cond(total + b * np.eye(m.channels))
            assert _close(row[f"cond(b={b:.3g})"], cond, cond), (row["layer"], b)


def test_inspect_reports_a_tampered_artifact(stats_copy, capsys):
    from unidd_ray.cli import main
    from unidd_ray.artifacts.statistics import STATS_FILE

    path = stats_copy / STATS_FILE
    path.write_bytes(path.read_bytes()[:-10])
    assert main(["stats", "--inspect", str(stats_copy)]) == 2
    assert "does not match its recorded sha256" in capsys.readouterr().err
