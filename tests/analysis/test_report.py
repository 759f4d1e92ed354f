"""The report of a pipeline run (``unidd_ray.analysis``): figures exist, numbers are right, links resolve.

The run directory is assembled by hand from the session fixtures (no recovery or
evaluation is run): a random real subset written by ``write_real_subset`` and a
hand-made "cfm" set (the same real images plus high-frequency noise, with
per-slot loss parts in its summary), next to the digits teacher and statistics.
Every number in ``report.json`` is then recomputed here with numpy from the PNG
files on disk.
"""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

IPC = 3


# ----------------------------------------------------------------------------- building the run directory
def _write_set(src: Path, out: Path, method: str, transform, per_slot: dict) -> Path:
    """A distilled-format copy of ``src`` with every image passed through ``transform`` (uint8 → uint8)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from unidd_ray.artifacts.files import atomic_write_json, read_manifest, sha256_bytes, write_manifest

    meta = read_manifest(src, "distilled")
    rows = pq.read_table(src / "manifest.parquet").to_pylist()
    out.mkdir(parents=True)
    new_rows = []
    for i, r in enumerate(rows):
        a = np.asarray(Image.open(src / r["path"]))
        b = transform(a, i)
        buf = io.BytesIO()
        Image.fromarray(b).save(buf, format="PNG")
        (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        (out / r["path"]).write_bytes(buf.getvalue())
        new_rows.append({**r, "sha256": sha256_bytes(buf.getvalue()), "method": method})
    pq.write_table(pa.Table.from_pylist(new_rows), out / "manifest.parquet")
    atomic_write_json(out / "summary.json", {"method": method, "ipc": meta["ipc"], "images": len(rows),
                                             "per_slot": per_slot})
    write_manifest(out, "distilled", method=method, ipc=meta["ipc"], dataset_fingerprint=meta["dataset_fingerprint"])
    return out


def _noisy(a: np.ndarray, i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    # a checkerboard (all its power in the corner of the spectrum, beyond the radial PSD's last ring, which
    # the high-frequency share must still count) plus white noise
    checkerboard = (np.indices(a.shape)[:2].sum(axis=0) % 2) * 2 - 1
    return np.clip(a.astype(np.int32) + 60 * checkerboard * rng.choice([-1, 1]) + rng.integers(-40, 41, a.shape),
                   0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def run_dir(digits_data, digits_teacher, digits_stats, tmp_path_factory) -> Path:
    from unidd_ray.artifacts.files import atomic_write_json, atomic_write_text
    from unidd_ray.config import load_recipe, recipe_to_yaml
    from unidd_ray.stages.subset import write_real_subset

    run = tmp_path_factory.mktemp("report") / "run"
    run.mkdir()
    recipe = load_recipe("digits", overrides=[f"ipcs=[{IPC}]", "methods=[random, cfm]", f"out={run}"])
    atomic_write_text(run / "config.yaml", recipe_to_yaml(recipe))
    random_dir = write_real_subset(digits_data, run / f"random-ipc{IPC}-aaaa", ipc=IPC, seed=0)
    per_slot = {str(b): {"beta": 0.1 / (b + 1), "loss_filter": 1.0 / (b + 1), "loss_signal": 0.5 / (b + 1)}
                for b in range(IPC)}
    cfm_dir = _write_set(random_dir, run / f"cfm-ipc{IPC}-bbbb", "cfm", _noisy, per_slot)
    teacher_info = json.loads((digits_teacher / "teacher.json").read_text())
    rows = [{"method": "teacher (full data)", "ipc": None, "top1_mean": 95.0, "top1_std": None, "seeds": None,
             "seconds": None},
            {"method": "random", "ipc": IPC, "top1_mean": 70.5, "top1_std": 1.25, "seeds": 2, "seconds": 3.0,
             "labels": "soft", "top1": [69.25, 71.75]},
            {"method": "cfm", "ipc": IPC, "top1_mean": 72.0, "top1_std": 0.5, "seeds": 2, "seconds": 4.0,
             "labels": "soft", "top1": [71.5, 72.5]}]
    stages = {"data": str(digits_data), "teacher": str(digits_teacher), "stats": str(digits_stats),
              f"random-ipc{IPC}": str(random_dir), f"eval-random-ipc{IPC}": str(run / "eval-random"),
              f"cfm-ipc{IPC}": str(cfm_dir), f"eval-cfm-ipc{IPC}": str(run / "eval-cfm")}
    atomic_write_json(run / "results.json", {"recipe": "digits", "dataset": "digits",
                                             "teacher": {"arch": teacher_info["arch"], "val_top1": 95.0},
                                             "rows": rows, "stages": stages, "seconds": 1.0})
    return run


@pytest.fixture(scope="module")
def report(run_dir):
    from unidd_ray.analysis.report import write_report

    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    return json.loads((run_dir / "report.json").read_text())


# ----------------------------------------------------------------------------- independent numpy versions
def _pixels(distilled: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) float64 pixels in [0, 1] read straight from the PNGs, and the labels."""
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(distilled / "manifest.parquet").to_pylist()
    imgs = []
    for r in rows:
        a = np.asarray(Image.open(distilled / r["path"]), dtype=np.float64) / 255
        imgs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(imgs), np.array([r["class"] for r in rows])


def _numpy_psd(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    h, w = x.shape[-2:]
    power = np.fft.fftshift(np.abs(np.fft.fft2(x)) ** 2 / (h * w), axes=(-2, -1)).mean(axis=(0, 1))
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.rint(np.hypot(yy - h // 2, xx - w // 2)).astype(int)
    r_max = min(h, w) // 2
    return np.array([power[radius == r].mean() for r in range(r_max + 1)])


def _numpy_high_frequency_fraction(x: np.ndarray, cutoff: float = 0.5) -> float:
    """Power of the full 2-D spectrum above ``cutoff`` × min(H, W) / 2 cycles per image over all non-zero frequencies."""
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    h, w = x.shape[-2:]
    power = (np.abs(np.fft.fft2(x)) ** 2).sum(axis=(0, 1))
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w, indexing="ij"))
    return float(power[radius > cutoff * min(h, w) / 2].sum() / power[radius > 0].sum())


def _numpy_intra_class_cosine(features: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    out = {}
    for k in np.unique(labels):
        f = features[labels == k]
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        sim = f @ f.T
        n = len(f)
        if n > 1:
            out[int(k)] = float(sim[~np.eye(n, dtype=bool)].mean())
    return out


def _teacher_taps(teacher_dir: Path, pixels: np.ndarray):
    """Penultimate features and the inputs of every Conv2d of the teacher, captured with our own hooks."""
    from unidd_ray.artifacts.teacher import load_teacher

    model, tinfo = load_teacher(teacher_dir)
    mean = np.array(tinfo.mean).reshape(1, -1, 1, 1)
    std = np.array(tinfo.std).reshape(1, -1, 1, 1)
    x = torch.from_numpy(((pixels - mean) / std).astype(np.float32))
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    for name, m in convs:
        hooks.append(m.register_forward_pre_hook(lambda _m, a, _n=name: captured.__setitem__(_n, a[0].detach())))
    hooks.append(linear.register_forward_pre_hook(lambda _m, a: captured.__setitem__("_penultimate",
                                                                                     a[0].flatten(1).detach())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return captured.pop("_penultimate").double().numpy(), {k: v.double().numpy() for k, v in captured.items()}


def _numpy_cov_eigs(feature_map: np.ndarray) -> np.ndarray:
    c = feature_map.shape[1]
    x = feature_map.transpose(1, 0, 2, 3).reshape(c, -1)
    mu = x.mean(1)
    cov = x @ x.T / x.shape[1] - np.outer(mu, mu)
    return np.clip(np.linalg.eigvalsh((cov + cov.T) / 2)[::-1], 0, None)


# ----------------------------------------------------------------------------- the report
EXPECTED_FIGURES = {"psd", "similarity", "spectra", "losses", f"grid:random-ipc{IPC}", f"grid:cfm-ipc{IPC}"}


def test_every_figure_is_a_valid_png(run_dir, report):
    from PIL import Image

    figs = report["figures"]
    assert set(figs) == EXPECTED_FIGURES
    for key, rel in figs.items():
        path = run_dir / rel
        assert path.is_file() and path.stat().st_size > 1000, key
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            a = np.asarray(im.convert("L"))
            assert min(a.shape) > 50 and a.std() > 1, key  # a real picture, not a blank canvas
    # the grids show classes × slots: taller than wide for 10 classes and 3 slots
    with Image.open(run_dir / figs[f"grid:cfm-ipc{IPC}"]) as im:
        assert im.height > im.width


def test_html_references_only_existing_files(run_dir, report):
    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs = []

        def handle_starttag(self, tag, attrs):
            self.refs += [v for k, v in attrs if k in ("src", "href") and v]

    parser = Links()
    parser.feed((run_dir / "report.html").read_text())
    assert parser.refs, "the report shows no figures"
    for ref in parser.refs:
        assert not ref.startswith(("/", "http:", "https:", "file:")), ref  # relative: the run dir can move
        assert (run_dir / ref).is_file(), ref
    assert set(parser.refs) == set(report["figures"].values())


def test_report_json_accuracy_table(run_dir, report):
    def refuse(constant):
        raise ValueError(f"report.json holds {constant}, which is not JSON")

    json.loads((run_dir / "report.json").read_text(), parse_constant=refuse)
    results = json.loads((run_dir / "results.json").read_text())
    assert report["accuracy"] == results["rows"]
    html = (run_dir / "report.html").read_text()
    assert "70.50 ± 1.25" in html and "72.00 ± 0.50" in html and "95.00" in html
    assert f"<title>{run_dir.name}</title>" in html and f"<h1>{run_dir.name}</h1>" in html  # the run's name
    assert set(report["methods"]) == {f"random-ipc{IPC}", f"cfm-ipc{IPC}"}
    for key, entry in report["methods"].items():
        assert entry["ipc"] == IPC and entry["images"] == 10 * IPC
        assert entry["method"] == key.split("-ipc")[0]
    assert report["methods"][f"cfm-ipc{IPC}"]["per_slot"] == \
        json.loads((Path(report["methods"][f"cfm-ipc{IPC}"]["path"]) / "summary.json").read_text())["per_slot"]
    assert report["methods"][f"random-ipc{IPC}"]["per_slot"] is None


def test_psd_matches_numpy(report):
    for entry in report["methods"].values():
        pixels, _ = _pixels(Path(entry["path"]))
        psd = _numpy_psd(pixels)
        assert entry["radii"] == list(range(len(psd)))
        np.testing.assert_allclose(entry["psd"], psd, rtol=1e-4, atol=1e-7 * psd.max())
        assert entry["high_frequency_fraction"] == pytest.approx(_numpy_high_frequency_fraction(pixels), rel=1e-4)
    # the checkerboard-and-noise set has more power at high frequencies than the real images it was made from
    assert report["methods"][f"cfm-ipc{IPC}"]["high_frequency_fraction"] > \
        report["methods"][f"random-ipc{IPC}"]["high_frequency_fraction"] + 0.1


def test_intra_class_cosine_matches_numpy(report, digits_teacher):
    for key, entry in report["methods"].items():
        pixels, labels = _pixels(Path(entry["path"]))
        features, _ = _teacher_taps(digits_teacher, pixels)
        per_class = _numpy_intra_class_cosine(features, labels)
        got = {int(k): v for k, v in entry["intra_class_cosine_per_class"].items()}
        assert set(got) == set(range(10))
        for k in per_class:
            assert got[k] == pytest.approx(per_class[k], rel=1e-4, abs=1e-5), (key, k)
        assert entry["intra_class_cosine"] == pytest.approx(np.mean(list(per_class.values())), rel=1e-4)
        assert -1 <= entry["intra_class_cosine"] <= 1


def test_covariance_eigenvalues_match_numpy(report, digits_teacher, digits_stats):
    from unidd_ray.artifacts.statistics import load_stats

    layers = report["layers"]
    for key, entry in report["methods"].items():
        pixels, _ = _pixels(Path(entry["path"]))
        _, taps = _teacher_taps(digits_teacher, pixels)
        assert set(entry["eigenvalues"]) == set(layers) and set(layers) <= set(taps)
        for layer in layers:
            expected = _numpy_cov_eigs(taps[layer])
            got = np.array(entry["eigenvalues"][layer])
            assert got.shape == expected.shape
            assert np.all(np.diff(got) <= 1e-12)  # largest first
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.max())
    real = load_stats(digits_stats)
    assert set(report["real"]["eigenvalues"]) == set(layers)
    for layer in layers:
        m = real[layer]
        mu = (m.sum / m.n).numpy()
        cov = m.sumsq.numpy() / float(m.n) - np.outer(mu, mu)
        expected = np.clip(np.linalg.eigvalsh((cov + cov.T) / 2)[::-1], 0, None)
        np.testing.assert_allclose(report["real"]["eigenvalues"][layer], expected, rtol=1e-6,
                                   atol=1e-9 * expected.max())
    assert len(report["filter"]["betas"]) == IPC


def test_report_without_statistics(run_dir, tmp_path):
    """A run of baselines only (no statistics stage) still gets every figure."""
    import shutil

    from unidd_ray.analysis.report import write_report

    other = tmp_path / "run"
    other.mkdir()
    shutil.copy(run_dir / "config.yaml", other / "config.yaml")
    results = json.loads((run_dir / "results.json").read_text())
    results["stages"] = {k: v for k, v in results["stages"].items() if k != "stats" and "cfm" not in k}
    results["rows"] = [r for r in results["rows"] if r["method"] != "cfm"]
    (other / "results.json").write_text(json.dumps(results))
    write_report(other)
    rep = json.loads((other / "report.json").read_text())
    assert "eigenvalues" not in rep["real"]
    assert set(rep["figures"]) == {"psd", "similarity", "spectra", "losses", f"grid:random-ipc{IPC}"}
    assert all((other / p).is_file() for p in rep["figures"].values())


def test_report_needs_a_finished_run(tmp_path):
    from unidd_ray.analysis.report import write_report

    with pytest.raises(FileNotFoundError, match="results.json"):
        write_report(tmp_path)


# ----------------------------------------------------------------------------- metrics against numpy
def test_radial_power_spectrum_of_a_cosine():
    from unidd_ray.analysis import radial_power_spectrum

    n = 16
    yy, xx = np.mgrid[0:n, 0:n]
    for fy, fx, r in [(0, 2, 2), (3, 4, 5), (0, 8, 8), (5, 0, 5)]:
        img = 0.5 + 0.25 * np.cos(2 * np.pi * (fy * yy + fx * xx) / n)
        radii, psd = radial_power_spectrum(torch.from_numpy(img)[None, None])
        assert radii.tolist() == list(range(n // 2 + 1))
        assert int(psd.argmax()) == r
        others = torch.cat([psd[:r], psd[r + 1:]])
        assert others.abs().max() < 1e-12 * psd[r]
        # Parseval: a cosine of amplitude a has mean power a²/2 per pixel, i.e. a²/2 · H·W in total over its
        # two frequency bins ±f (a² · H·W at the Nyquist frequency, where +f and −f are one bin and
        # cos(π x) = ±1); the ring average divides that total by the number of bins on the ring
        ring = np.rint(np.hypot(yy - n // 2, xx - n // 2)) == r
        total = 0.25 ** 2 * n * n * (1.0 if 2 * max(fy, fx) == n else 0.5)
        assert float(psd[r]) == pytest.approx(total / ring.sum(), rel=1e-9)


def test_radial_power_spectrum_matches_numpy():
    from unidd_ray.analysis import radial_power_spectrum

    x = np.random.default_rng(0).random((5, 3, 12, 10))
    _, psd = radial_power_spectrum(torch.from_numpy(x))
    np.testing.assert_allclose(psd.numpy(), _numpy_psd(x), rtol=1e-10, atol=1e-20)
    with pytest.raises(ValueError):
        radial_power_spectrum(torch.zeros(3, 8, 8))


def test_high_frequency_fraction_closed_forms():
    from unidd_ray.analysis import high_frequency_fraction

    n = 8
    yy, xx = np.mgrid[0:n, 0:n]
    constant = torch.full((2, 1, n, n), 0.7, dtype=torch.float64)
    assert high_frequency_fraction(constant) == 0.0
    checkerboard = 0.5 + 0.5 * np.cos(np.pi * (yy + xx))  # all power at the corner frequency (n/2, n/2)
    assert high_frequency_fraction(torch.from_numpy(checkerboard)[None, None]) == pytest.approx(1.0, abs=1e-12)
    stripes = torch.from_numpy(0.5 + 0.5 * np.cos(np.pi * xx))[None, None]  # the Nyquist frequency along x
    assert high_frequency_fraction(stripes) == pytest.approx(1.0, abs=1e-12)
    slow = torch.from_numpy(0.5 + 0.5 * np.cos(2 * np.pi * xx / n))[None, None]  # the lowest frequency, 1 cycle
    assert high_frequency_fraction(slow) == pytest.approx(0.0, abs=1e-12)
    # a checkerboard of amplitude a beside the lowest frequency at amplitude b: mean powers a² and b²/2
    a, b = 0.1, 0.3
    mixed = 0.5 + a * np.cos(np.pi * (yy + xx)) + b * np.cos(2 * np.pi * xx / n)
    assert high_frequency_fraction(torch.from_numpy(mixed)[None, None]) == pytest.approx(a**2 / (a**2 + b**2 / 2),
                                                                                      rel=1e-12)
    assert high_frequency_fraction(torch.from_numpy(mixed)[None, None], cutoff=0.0) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_fraction(constant, cutoff=-0.1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        high_frequency_fraction(constant[0])


def test_high_frequency_fraction_of_white_noise_is_the_share_of_bins():
    """White noise spreads its power evenly over the frequency bins, so its fraction is the share of non-zero
    bins above the cutoff: on a 16 x 12 grid of frequencies (cycles per image) against min(16, 12) / 2 = 6."""
    from unidd_ray.analysis import high_frequency_fraction

    h, w = 16, 12
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w, indexing="ij"))
    noise = torch.from_numpy(np.random.default_rng(3).normal(size=(400, 3, h, w)))
    for cutoff in (0.25, 0.5, 1.0, 1.2):
        share = (radius > cutoff * 6).sum() / (radius > 0).sum()
        assert high_frequency_fraction(noise, cutoff) == pytest.approx(share, abs=0.005), cutoff


def test_high_frequency_fraction_matches_numpy():
    from unidd_ray.analysis import high_frequency_fraction

    rng = np.random.default_rng(4)
    for shape in ((5, 3, 12, 10), (2, 1, 9, 14), (3, 2, 8, 8)):
        x = np.cumsum(rng.random(shape), axis=-1) / shape[-1]  # a red spectrum: most power at low frequencies
        for cutoff in (0.3, 0.5, 0.9):
            got = high_frequency_fraction(torch.from_numpy(x), cutoff)
            assert got == pytest.approx(_numpy_high_frequency_fraction(x, cutoff), rel=1e-10), (shape, cutoff)


def test_intra_class_cosine_function_matches_numpy():
    from unidd_ray.analysis import intra_class_cosine

    rng = np.random.default_rng(1)
    f = rng.normal(size=(40, 6)) + np.repeat(rng.normal(size=(4, 6)) * 3, 10, axis=0)
    labels = np.repeat(np.arange(4), 10)
    labels[-1] = 7  # a class with a single sample has no pairs and is skipped
    mean, per_class = intra_class_cosine(torch.from_numpy(f), torch.from_numpy(labels))
    expected = _numpy_intra_class_cosine(f, labels)
    assert set(per_class) == set(expected)
    for k in expected:
        assert per_class[k] == pytest.approx(expected[k], rel=1e-12)
    assert mean == pytest.approx(np.mean(list(expected.values())), rel=1e-12)
    same = torch.ones(3, 4)
    assert intra_class_cosine(same, torch.zeros(3, dtype=torch.long))[0] == pytest.approx(1.0)
    assert intra_class_cosine(same, torch.arange(3)) == (None, {})  # IPC 1: no pairs (and no NaN in report.json)


def test_covariance_spectrum_matches_numpy():
    from unidd_ray.analysis import covariance_spectrum

    rng = np.random.default_rng(2)
    a = rng.normal(size=(7, 3))
    cov = a @ a.T  # rank 3: four eigenvalues are zero up to rounding
    got = covariance_spectrum(torch.from_numpy(cov)).numpy()
    expected = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    np.testing.assert_allclose(got, expected, atol=1e-10)
    assert np.all(got >= 0) and np.all(np.diff(got) <= 0)
    assert (got > 1e-8).sum() == 3


def test_a_grid_draws_at_most_its_caps_evenly_spaced():
    from unidd_ray.analysis.report import GRID_CLASSES, spread

    assert spread(list(range(5)), 20) == [0, 1, 2, 3, 4]
    picked = spread(list(range(1000)), GRID_CLASSES)
    assert len(picked) == GRID_CLASSES and picked[0] == 0 and picked[-1] == 999
    assert picked == sorted(set(picked))
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced
    assert spread(list(range(50)), 10) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]


def test_the_power_spectrum_in_chunks_is_the_whole_set_s():
    from unidd_ray.analysis.metrics import _mean_power

    x = torch.rand(23, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    whole = _mean_power(x, chunk=1000)
    a = x.double().numpy()
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    expected = (np.abs(np.fft.fft2(a)) ** 2 / (16 * 12)).mean(axis=(0, 1))
    np.testing.assert_allclose(whole.numpy(), expected, rtol=1e-12, atol=1e-15)
    for chunk in (1, 5, 7, 22):
        np.testing.assert_allclose(_mean_power(x, chunk=chunk).numpy(), expected, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- streaming over a set
def test_iter_distilled_chunks_are_load_distilled(run_dir, digits_teacher):
    from unidd_ray.artifacts.distilled import iter_distilled, load_distilled
    from unidd_ray.artifacts.teacher import load_teacher

    _, tinfo = load_teacher(digits_teacher)
    for key in (f"random-ipc{IPC}", f"cfm-ipc{IPC}"):
        path = json.loads((run_dir / "results.json").read_text())["stages"][key]
        images, labels, rows = load_distilled(path, mean=tinfo.mean, std=tinfo.std)
        for chunk in (1, 3, 7, 10 * IPC, 1000):
            parts = list(iter_distilled(path, mean=tinfo.mean, std=tinfo.std, chunk=chunk))
            assert [len(x) for x, _, _ in parts[:-1]] == [chunk] * (len(parts) - 1)
            assert all(len(x) == len(y) == len(r) for x, y, r in parts)
            assert torch.equal(torch.cat([x for x, _, _ in parts]), images)
            assert torch.equal(torch.cat([y for _, y, _ in parts]), labels)
            assert [r for _, _, part in parts for r in part] == rows
        with pytest.raises(ValueError, match="chunk"):
            iter_distilled(path, mean=tinfo.mean, std=tinfo.std, chunk=0)


def test_the_teacher_pass_does_not_depend_on_how_the_set_is_cut(run_dir, digits_teacher):
    """The teacher sees the same batches whatever the chunks: features and moments are identical."""
    from unidd_ray.analysis.report import teacher_pass
    from unidd_ray.artifacts.distilled import load_distilled
    from unidd_ray.artifacts.teacher import load_teacher
    from unidd_ray.models import resolve_layers

    teacher, tinfo = load_teacher(digits_teacher)
    layers = resolve_layers(teacher, None)
    path = json.loads((run_dir / "results.json").read_text())["stages"][f"cfm-ipc{IPC}"]
    images, labels, _ = load_distilled(path, mean=tinfo.mean, std=tinfo.std)
    whole_features, whole = teacher_pass(teacher, [(images, labels)], layers, tinfo.num_classes, batch=4)
    assert whole_features.shape[0] == len(images)
    for chunk in (1, 3, 4, 7, 1000):
        parts = [(images[i:i + chunk], labels[i:i + chunk]) for i in range(0, len(images), chunk)]
        features, moments = teacher_pass(teacher, iter(parts), layers, tinfo.num_classes, batch=4)
        assert torch.equal(features, whole_features), chunk
        for name in layers:
            for field in ("n", "sum", "sumsq", "class_n", "class_sum", "image_n", "pooled_sum"):
                assert torch.equal(getattr(moments[name], field), getattr(whole[name], field)), (chunk, name, field)


def test_a_set_s_numbers_do_not_depend_on_the_chunk_size(run_dir, report, digits_teacher):
    from unidd_ray.analysis.report import _set_entry
    from unidd_ray.artifacts.teacher import load_teacher

    teacher, tinfo = load_teacher(digits_teacher)
    for key, entry in report["methods"].items():
        one = _set_entry(key, entry["path"], teacher, tinfo, report["layers"], chunk=1000)  # the set in one chunk
        assert one["images"] == 10 * IPC
        for chunk in (1, 3, 7):
            got = _set_entry(key, entry["path"], teacher, tinfo, report["layers"], chunk=chunk)
            assert set(got) == set(one)
            # (the zero frequency holds only rounding noise: each channel's mean is subtracted)
            np.testing.assert_allclose(got["psd"], one["psd"], rtol=1e-10, atol=1e-14 * max(one["psd"]))
            assert got["radii"] == one["radii"]
            assert got["high_frequency_fraction"] == pytest.approx(one["high_frequency_fraction"], rel=1e-10)
            # the teacher saw the same batches: its features and moments are identical
            assert got["intra_class_cosine"] == one["intra_class_cosine"]
            assert got["intra_class_cosine_per_class"] == one["intra_class_cosine_per_class"]
            assert got["eigenvalues"] == one["eigenvalues"]
            assert {k: v for k, v in got.items() if k not in ("psd", "high_frequency_fraction")} == \
                {k: v for k, v in one.items() if k not in ("psd", "high_frequency_fraction")}
        # the report's default chunk gives the same numbers
        np.testing.assert_allclose(entry["psd"], one["psd"], rtol=1e-10, atol=1e-14 * max(one["psd"]))
        assert entry["eigenvalues"] == one["eigenvalues"]


def test_a_grid_reads_only_the_images_it_draws(run_dir, report, monkeypatch, tmp_path):
    """A set larger than the grid: only the drawn (class, slot) images are opened, after every checksum is
    verified."""
    import shutil

    import PIL.Image

    from unidd_ray.analysis import report as report_module
    from unidd_ray.artifacts.distilled import image_path
    from unidd_ray.artifacts.files import ArtifactError

    monkeypatch.setattr(report_module, "GRID_CLASSES", 4)
    monkeypatch.setattr(report_module, "GRID_SLOTS", 2)
    opened = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(Path(fp) if isinstance(fp, (str, Path)) else fp)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    key = f"cfm-ipc{IPC}"
    entry = report["methods"][key]
    rel = report_module._grid(key, entry, tmp_path)
    assert (tmp_path / Path(rel).name).is_file()
    drawn = {Path(entry["path"]) / image_path(k, b) for k in (0, 3, 6, 9) for b in (0, IPC - 1)}
    assert sorted(map(str, opened)) == sorted(map(str, drawn))  # 8 of the set's 30 images, each once
    # the checksums of the images not drawn are still verified
    copy = shutil.copytree(entry["path"], tmp_path / "tampered")
    (copy / image_path(1, 1)).write_bytes((copy / image_path(1, 0)).read_bytes())
    with pytest.raises(ArtifactError, match="sha256"):
        report_module._grid(key, {**entry, "path": str(copy)}, tmp_path)


def test_power_sums_over_parts_give_the_whole_set_s_spectrum():
    from unidd_ray.analysis import high_frequency_fraction, radial_power_spectrum
    from unidd_ray.analysis.metrics import high_frequency_share, power_sum, radial_average

    x = torch.rand(23, 3, 16, 12, generator=torch.Generator().manual_seed(1)) ** 3
    whole, count = power_sum(x)
    assert whole.shape == (16, 12) and whole.dtype == torch.float64 and count == 23 * 3
    parts = [power_sum(x[i:i + 5]) for i in range(0, 23, 5)]
    assert sum(c for _, c in parts) == count
    np.testing.assert_allclose(sum(p for p, _ in parts).numpy(), whole.numpy(), rtol=1e-12, atol=1e-20)
    mean = sum(p for p, _ in parts) / count
    radii, psd = radial_average(mean)
    expected_radii, expected_psd = radial_power_spectrum(x)
    assert torch.equal(radii, expected_radii)
    np.testing.assert_allclose(psd.numpy(), expected_psd.numpy(), rtol=1e-12, atol=1e-20)
    np.testing.assert_allclose(psd.numpy(), _numpy_psd(x.double().numpy()), rtol=1e-10, atol=1e-20)
    for cutoff in (0.0, 0.3, 0.5, 1.0):
        assert high_frequency_share(mean, cutoff) == pytest.approx(high_frequency_fraction(x, cutoff), rel=1e-12)
    with pytest.raises(ValueError, match="power"):
        radial_average(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_share(mean, -1.0)
