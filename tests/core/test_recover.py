"""Recovery stage (SPEC §1.2, §2.2): one loop for every method, class-partitioned Ray Train workers,
EMU synchronisation, outputs, and input validation before any work.

The distributed runs use the digits fixtures (10 classes, 8 px) with IPC ≤ 2 and 3 iterations per
batch; the fault-injection and kill/resume tests are in ``test_recover_distributed.py`` (slow).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from unidd_ray.config import RecoverConfig, from_dict, to_dict
from support.training import StubTrainer
from unidd_ray.artifacts.dataset import read_labels
from unidd_ray.artifacts.distilled import BETON, to_png_bytes
from unidd_ray.core.plan import make_plan
from unidd_ray.core.recovery import InitImages, build_distiller, recover_in_process, run_round
from unidd_ray.data.loading import load_real_images
from unidd_ray.spectral import EMU
from unidd_ray.stages.recover import BATCHES, run_recover

ITERS = 3
# what every Ray Train run here shares: tiny, deterministic, one thread per worker
BASE = {"iterations": ITERS, "lr": 0.05, "max_roll": 1, "cpus_per_worker": 1, "max_failures": 0}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """FFCV loaders set torch's thread count to their ``num_workers``; keep other tests unaffected."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pixels(out: Path) -> dict[tuple[int, int], np.ndarray]:
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    return {(r["class"], r["slot"]): np.asarray(Image.open(out / r["path"]), dtype=np.int16) for r in rows}


def _emu_close(a: dict, b: dict, *, rtol=1e-5, atol=1e-7):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(torch.as_tensor(a[k]).double(), torch.as_tensor(b[k]).double(), rtol=rtol,
                                   atol=atol, msg=lambda m, k=k: f"EMU state {k}: {m}")


# ----------------------------------------------------------------------------- a 2-worker run via the CLI
@pytest.fixture(scope="module")
def cli_run(ray_session, digits_data, digits_teacher, digits_stats, tmp_path_factory):
    """``unidd-ray recover`` with 2 workers each optimising its own batch (``distribution: independent``), CFM,
    IPC 2, 3 iterations, .beton on."""
    from unidd_ray.cli import main

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("recover-cli")
    out = root / "distilled"
    sets = {**BASE, "save_beton": "true", "distribution": "independent"}
    argv = ["recover", "--recipe", "digits", "--data", str(digits_data), "--teacher", str(digits_teacher),
            "--stats", str(digits_stats), "--ipc", "2", "--method", "cfm", "--workers", "2", "--out", str(out),
            "--storage-path", str(root / "ray")]
    for k, v in sets.items():
        argv += ["--set", f"recover.{k}={v}"]
    assert main(argv) == 0
    torch.set_num_threads(threads)
    return out


def test_cli_output_layout_and_checksums(cli_run, digits_data):
    from unidd_ray.artifacts.files import read_manifest
    from unidd_ray.artifacts.dataset import read_dataset_info

    out = cli_run
    info = read_dataset_info(digits_data)
    names = {p.name for p in out.iterdir()}
    assert {"images", "manifest.parquet", "summary.json", "config.yaml", "manifest.json", BATCHES, BETON,
            "emu_state.pt", "plan.json"} <= names
    assert not (out.parent / f"{out.name}.partial").exists()
    assert not any(n.startswith(".") for n in names)  # batch records and fault markers are gone

    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 10 * 2
    assert {"class", "slot", "beta", "method", "seed", "source_index", "sha256", "path", "loss_ce",
            "loss_filter", "loss_signal", "loss_total"} <= set(rows[0])
    assert sorted((r["class"], r["slot"]) for r in rows) == [(k, b) for k in range(10) for b in range(2)]
    # ImageFolder layout of lossless 8-bit PNGs, each matching its recorded sha256
    for r in rows:
        path = out / r["path"]
        assert path.parent.parent.name == "images" and path.parent.name == f"{r['class']:04d}"
        assert path.suffix == ".png" and _sha(path) == r["sha256"]
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (info.resolution, info.resolution)
        assert r["method"] == "cfm" and r["seed"] == 0
        assert all(np.isfinite(r[k]) for k in ("loss_ce", "loss_filter", "loss_signal", "loss_total"))
    assert len({r["sha256"] for r in rows}) == len(rows)
    # every file of the artifact is checksummed in manifest.json
    manifest = read_manifest(out, "distilled")
    listed = set(manifest["files"])
    assert {r["path"] for r in rows} | {"manifest.parquet", "summary.json", BETON} <= listed
    for name, digest in manifest["files"].items():
        assert _sha(out / name) == digest

    # β per slot follows the cosine schedule over the slots (not iterations)
    from unidd_ray.spectral import beta_schedule

    betas = beta_schedule("cosine", 0.1, 2)
    for r in rows:
        assert r["beta"] == pytest.approx(betas[r["slot"]])

    # the seeded initialisation: the recorded source image is the plan's choice, of the right class
    cfg = RecoverConfig(**{**to_dict(RecoverConfig()), "ipc": 2, "workers": 2})
    labels = read_labels(digits_data, "train")
    plan = make_plan(labels, 10, cfg)
    for r in rows:
        assert r["source_index"] == plan.init_index[r["class"]][r["slot"]]
        assert labels[r["source_index"]] == r["class"]
    assert len({r["source_index"] for r in rows}) == len(rows)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cfm" and summary["ipc"] == 2 and summary["images"] == 20
    assert summary["workers"] == 2 and summary["batches"] == 4 and summary["batches_executed"] == 4
    assert summary["batches_redone"] == []
    assert summary["per_slot"]["0"]["beta"] == pytest.approx(betas[0])
    recipe = yaml.safe_load((out / "config.yaml").read_text())  # the resolved recipe, overrides applied
    assert recipe["recover"]["workers"] == 2 and recipe["recover"]["iterations"] == ITERS
    assert recipe["recover"]["save_beton"] is True


def test_worker_partition_is_balanced_and_disjoint(cli_run):
    out = cli_run
    batches = json.loads((out / BATCHES).read_text())
    assert sorted(b["batch"] for b in batches) == [0, 1, 2, 3]
    assert all(b["executions"] == 1 for b in batches)
    owned = {}
    for b in batches:
        owned.setdefault(b["worker"], set()).update(b["classes"])
    assert owned == {0: set(range(5)), 1: set(range(5, 10))}
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert all(r["worker"] == (0 if r["class"] < 5 else 1) for r in rows)


def test_plan_partitions_and_seeded_init():
    labels = np.repeat(np.arange(7), 5)
    cfg = RecoverConfig(ipc=3, workers=3, seed=4, batch_classes=2, distribution="independent")
    plan = make_plan(labels, 7, cfg)
    assert plan.partitions == [[0, 1, 2], [3, 4], [5, 6]]
    assert sorted(k for p in plan.partitions for k in p) == list(range(7))
    assert plan.chunks[0] == [[0, 1], [2]] and plan.rounds_per_slot == 2 and plan.rounds == 6
    ids = [plan.batch_id(b, w, j) for b in range(3) for w in range(3) for j in range(len(plan.chunks[w]))]
    assert len(set(ids)) == len(ids) == plan.batches()
    again = make_plan(labels, 7, cfg)
    assert again.init_index == plan.init_index  # seeded
    other = make_plan(labels, 7, RecoverConfig(ipc=3, workers=3, seed=5))
    assert other.init_index != plan.init_index
    for k in range(7):
        assert len(set(plan.init_index[k])) == 3 and all(labels[i] == k for i in plan.init_index[k])


@pytest.mark.parametrize("budget_images", [1, 5, 1000])
def test_init_images_read_ahead_gives_each_round_its_own_images(digits_data, budget_images):
    """Whatever the read-ahead budget, every round gets exactly the images it would read itself."""
    labels = read_labels(str(digits_data), "train")
    cfg = RecoverConfig(ipc=3, workers=2, seed=1, batch_classes=9)  # batches 0-8 and 9: worker 1's 2nd piece empty
    plan = make_plan(labels, 10, cfg)
    assert plan.piece(1, 1) == [] and plan.rounds == 6
    one = load_real_images(str(digits_data), [0])
    image_bytes = one[0].numel() * 4
    for rank in range(2):
        start = 2  # as after a resume from round 2
        source = InitImages(str(digits_data), plan, rank, image_bytes=image_bytes, start_round=start,
                            budget_bytes=budget_images * image_bytes)
        for r in range(start, plan.rounds):
            if not plan.piece(rank, r):
                continue  # (run_round asks for no images)
            indices = [plan.init_index[k][r // plan.rounds_per_slot] for k in plan.piece(rank, r)]
            assert torch.equal(source(indices), load_real_images(str(digits_data), indices))
        assert source.cache == {}  # nothing kept once no later round needs it


def test_beton_holds_the_pngs(cli_run):
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption

    out = cli_run
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    loader = Loader(str(out / BETON), batch_size=len(rows), num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [NDArrayDecoder()], "label": [IntDecoder()],
                                                "index": [IntDecoder()]})
    (images, labels, index), = [tuple(np.asarray(t).copy() for t in batch) for batch in loader]
    assert images.shape == (len(rows), 8, 8, 1) and images.dtype == np.uint8
    assert index.ravel().tolist() == list(range(len(rows)))
    for i, r in enumerate(rows):
        assert labels.ravel()[i] == r["class"]
        np.testing.assert_array_equal(images[i, :, :, 0], np.asarray(Image.open(out / r["path"])))


# ----------------------------------------------------------------------------- EMU synchronisation
def test_round_sync_equals_single_process_over_the_union(cli_run, digits_data, digits_teacher, digits_stats):
    """Replay the 2-worker run in one process: each round, both chunks start from the same EMU state and the
    state then absorbs the union of their batches.  Images and the final EMU state match the Ray run."""
    out = cli_run
    torch.set_num_threads(1)  # as in the workers (cpus_per_worker=1)
    cfg = from_dict(RecoverConfig, yaml.safe_load((out / "config.yaml").read_text())["recover"])
    info, distiller = build_distiller(cfg, digits_data, digits_teacher, digits_stats, "cpu")
    plan = make_plan(read_labels(digits_data, "train"), info.num_classes, cfg)
    union = EMU(distiller.emu_layers())
    pngs = {}
    for r in range(plan.rounds):
        slot = r // plan.rounds_per_slot
        results = []
        for w in range(plan.workers):
            local = copy.deepcopy(union)  # every worker starts the round from the synchronised state
            chunk, result = run_round(distiller, plan, r, rank=w, emu=local, reducer=None, data_dir=str(digits_data),
                                      num_workers=1, device="cpu")
            results.append((chunk, result))
        for chunk, result in results:  # one process holding the union of the round's batches
            for name, st in result.stats.items():
                union.commit(name, st.covariance, st.signal, st.columns)
            for cls, image in zip(chunk, result.images):
                pngs[(cls, slot)] = to_png_bytes(image, info.mean, info.std)
        union.synchronise(None)
    ray_state = torch.load(out / "emu_state.pt", weights_only=True)
    _emu_close(union.state_dict(), ray_state)
    got = _pixels(out)
    for key, data in pngs.items():
        mine = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
        assert np.abs(mine - got[key]).max() <= 1, key  # identical up to one 8-bit level of rounding
    # the synchronised batch count is every batch of the run
    first = sorted(distiller.emu_layers())[0]
    assert float(union.synced[first].batches) == plan.batches()


def test_real_side_cache_keeps_only_the_current_slot(digits_data, digits_teacher, digits_stats):
    """Each slot has its own β, so the real side of a finished slot is never read again: over three slots
    the distiller's cache holds one entry per tapped layer, and within a slot every iteration after the
    first reads it from there."""
    torch.set_num_threads(1)
    cfg = RecoverConfig(**BASE, ipc=3, workers=1)
    info, distiller = build_distiller(cfg, digits_data, digits_teacher, digits_stats, "cpu")
    plan = make_plan(read_labels(digits_data, "train"), info.num_classes, cfg)
    emu = EMU(distiller.emu_layers())
    layers = len(distiller.layers)
    for r in range(plan.rounds):
        run_round(distiller, plan, r, rank=0, emu=emu, reducer=None, data_dir=str(digits_data), num_workers=1,
                  device="cpu")
        emu.synchronise(None)
        assert len(distiller.cache) == layers
    assert distiller.cache.misses == plan.rounds * layers
    assert distiller.cache.hits == plan.rounds * layers * (ITERS - 1)


# ----------------------------------------------------------------------------- exact distribution
# global batches of 4 classes (0-3, 4-7, 8-9): 3 workers get pieces of 2/1/1, 2/1/1 and 1/1/0 classes (uneven, and
# the last worker's piece of the third batch is empty); the class signal's columns come from every worker
EXACT = {**BASE, "ipc": 2, "batch_classes": 4, "signal": "class"}


def _one_process(cfg: RecoverConfig, data, teacher, stats, real: dict[int, torch.Tensor] | None = None) -> dict:
    """The one-process recovery of ``cfg``: images per (class, slot), loss parts per round, final EMU state, and
    ``real``: the initial images by train index (read at once when not given: a loader costs ~1 s a start)."""
    torch.set_num_threads(1)  # as in the workers (cpus_per_worker=1)
    info, distiller = build_distiller(cfg, data, teacher, stats, "cpu")
    plan = make_plan(read_labels(data, "train"), info.num_classes, cfg)
    if real is None:
        indices = sorted(i for k in plan.classes for i in plan.init_index[k])
        real = dict(zip(indices, load_real_images(str(data), indices, normalize=distiller.normalize)))
    emu = EMU(distiller.emu_layers())
    images, parts = {}, []
    for r in range(plan.rounds):
        chunk, result = run_round(distiller, plan, r, rank=0, emu=emu, reducer=None, data_dir=str(data),
                                  num_workers=1, device="cpu",
                                  init_images=lambda indices: torch.stack([real[i] for i in indices]))
        for cls, image in zip(chunk, result.images):
            images[(cls, r // plan.rounds_per_slot)] = image
        parts.append(result.parts)
    return {"images": images, "parts": parts, "emu": emu.state_dict(), "real": real, "normalize": distiller.normalize}


def test_exact_distribution_gives_the_images_of_one_process_for_any_worker_count(digits_data, digits_teacher,
                                                                                 digits_stats):
    """``distribution: exact`` (the default): 1, 2 and 3 workers (a gloo group, the all-reduces of a Ray Train
    recovery) recover the same images, loss parts and EMU state: the authors' batches of ``batch_classes``
    classes in order, whatever the split, and a worker with an empty piece still joins every all-reduce.

    Tolerance 1e-5 on the (normalised) pixels, 1e-5 relative on the loss parts and the EMU's float64 sums: the
    workers evaluate the same loss of the same global batch, and only the rounding differs (the moments are
    summed in float64 across workers where one process sums its float32 batch once; convolutions over batches
    of other sizes may take other kernels), about 1e-7 relative, which Adam's steps (lr 0.05, 3 iterations)
    carry into the pixels at that scale (measured: 1.2e-7).  Another batch composition moves pixels by ~lr."""
    from support.gloo import recover_rank, run_ranks

    ref = _one_process(RecoverConfig(**EXACT, workers=1), digits_data, digits_teacher, digits_stats)
    real = ref["real"]  # the initial images, read once for every worker
    assert len(ref["parts"]) == 2 * 3  # IPC 2 × 3 global batches, the EMU counting each once
    for workers in (2, 3):
        ranks = run_ranks(recover_rank, workers, RecoverConfig(**EXACT, workers=workers), str(digits_data),
                          str(digits_teacher), str(digits_stats), real)
        images = {key: image for rank in ranks for key, image in rank["images"].items()}
        assert sorted(images) == sorted(ref["images"])
        for key, image in ref["images"].items():
            torch.testing.assert_close(images[key], image, rtol=0, atol=1e-5,
                                       msg=lambda m, key=key, w=workers: f"{w} workers, {key}: {m}")
        for rank in ranks:
            for got, want in zip(rank["parts"], ref["parts"]):  # every worker sees the global batch's loss
                assert got == pytest.approx(want, rel=1e-5, abs=1e-8)
            assert all(torch.equal(rank["emu"][k], ranks[0]["emu"][k]) for k in ranks[0]["emu"])  # one state
        _emu_close(ranks[0]["emu"], ref["emu"], rtol=1e-5, atol=1e-8)
    other = _one_process(RecoverConfig(**{**EXACT, "batch_classes": 5}), digits_data, digits_teacher, digits_stats,
                         real)
    assert max((other["images"][k] - ref["images"][k]).abs().max() for k in ref["images"]) > 1e-3


@pytest.mark.slow
def test_exact_recovery_on_ray_matches_one_process(ray_session, digits_data, digits_teacher, digits_stats,
                                                   tmp_path):
    """The stage itself: ``run_recover`` with 3 Ray Train workers (pieces 2/1/1, 2/1/1, 1/1/0) writes the
    images of one process, to one 8-bit level (a value within float rounding of a rounding boundary can land on
    either side), with each piece's record holding its global batch's loss parts and the empty piece none."""
    ref = _one_process(RecoverConfig(**EXACT, workers=1), digits_data, digits_teacher, digits_stats)
    out = run_recover(digits_data, digits_teacher, digits_stats, tmp_path / "out", RecoverConfig(**EXACT, workers=3),
                      storage_path=tmp_path / "ray", progress=False)
    got = _pixels(out)
    assert sorted(got) == sorted(ref["images"])
    for key, image in ref["images"].items():
        mine = np.asarray(Image.open(io.BytesIO(to_png_bytes(image, *ref["normalize"]))), dtype=np.int16)
        assert np.abs(mine - got[key]).max() <= 1, key
    batches = json.loads((out / BATCHES).read_text())
    pieces = {(b["slot"], b["chunk"], b["worker"]): b for b in batches}
    assert len(pieces) == 2 * 8 and (0, 2, 2) not in pieces and pieces[(0, 2, 1)]["classes"] == [9]
    for b in batches:
        want = ref["parts"][b["slot"] * 3 + b["chunk"]]
        assert b["parts"] == pytest.approx(want, rel=1e-4, abs=1e-6), b["batch"]
    _emu_close(ref["emu"], torch.load(out / "emu_state.pt", weights_only=True), rtol=1e-4, atol=1e-6)


def test_exact_and_independent_plans():
    """exact: the classes in order cut into global batches, each split across the workers (uneven, possibly
    empty pieces), one EMU batch per round; independent: each worker's own classes cut into its own batches."""
    labels = np.repeat(np.arange(10), 3)
    exact = make_plan(labels, 10, RecoverConfig(ipc=2, workers=3, batch_classes=4))
    assert exact.chunks == [[[0, 1], [4, 5], [8]], [[2], [6], [9]], [[3], [7], []]]
    assert exact.global_batches and exact.rounds_per_slot == 3 and exact.rounds == 6
    assert [exact.batch_size(r) for r in range(3)] == [4, 4, 2]
    assert exact.batches() == 2 * 8 and exact.batches_done(2) == 8 and exact.batches_done(3) == 11
    assert exact.partitions == [[0, 1, 4, 5, 8], [2, 6, 9], [3, 7]]
    one = make_plan(labels, 10, RecoverConfig(ipc=2, workers=1, batch_classes=4))
    assert one.chunks == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]] and not one.global_batches
    assert make_plan(labels, 10, RecoverConfig(ipc=2, workers=1, batch_classes=4, distribution="independent")) == one
    whole = make_plan(labels, 10, RecoverConfig(ipc=2, workers=3))  # batch_classes None: one batch of every class
    assert whole.chunks == [[[0, 1, 2, 3]], [[4, 5, 6]], [[7, 8, 9]]] and whole.rounds_per_slot == 1
    independent = make_plan(labels, 10, RecoverConfig(ipc=2, workers=3, batch_classes=2, distribution="independent"))
    assert independent.chunks == [[[0, 1], [2, 3]], [[4, 5], [6]], [[7, 8], [9]]]
    assert not independent.global_batches and independent.batches() == 2 * 6


def test_init_first_takes_each_class_in_file_order_and_random_is_unchanged():
    """``init: first`` starts slot b of class k from the b-th train image of class k in file order (the authors'
    choice), for any seed; ``random`` (the default) is the seeded draw it always was."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=60)
    first = make_plan(labels, 5, RecoverConfig(ipc=3, init="first", seed=7))
    for k in range(5):
        assert first.init_index[k] == np.flatnonzero(labels == k)[:3].tolist()
    assert make_plan(labels, 5, RecoverConfig(ipc=3, init="first", seed=1, workers=2)).init_index == first.init_index
    plan = make_plan(labels, 5, RecoverConfig(ipc=3, seed=7))
    for k in range(5):
        members = np.flatnonzero(labels == k)
        assert plan.init_index[k] == members[np.random.default_rng([7, k]).permutation(len(members))[:3]].tolist()
    assert plan.init_index != first.init_index


def test_keys_tell_the_distributions_apart_and_keep_their_former_form():
    """The key holds ``distribution`` as the ``sync`` it replaced — ``round`` for independent and for one worker
    (both compute the same), ``exact`` for an exact recovery over several workers — and ``batch_classes`` under
    its former name ``classes_per_batch``; ``init`` enters only when it is not ``random``.  So the recoveries
    stored before these settings keep their keys."""
    from types import SimpleNamespace

    from unidd_ray.keys import recover_key, recover_settings

    info, tinfo = SimpleNamespace(fingerprint="f" * 64, storage="raw"), SimpleNamespace(sha256="t" * 64)

    def key(**cfg):
        return recover_key(RecoverConfig(**cfg), info, tinfo, "s" * 12)

    default = recover_settings(RecoverConfig())
    assert default["sync"] == "round" and default["classes_per_batch"] is None
    assert not {"distribution", "batch_classes", "init"} & set(default)
    assert recover_settings(RecoverConfig(init="first"))["init"] == "first" and key(init="first") != key()
    assert key(distribution="independent") == key()  # one worker: the same images
    assert recover_settings(RecoverConfig(workers=2))["sync"] == "exact"
    assert recover_settings(RecoverConfig(workers=2, distribution="independent"))["sync"] == "round"
    assert len({key(), key(workers=2), key(workers=2, distribution="independent")}) == 3
    assert key(batch_classes=5) != key()
    # keys computed before these settings existed (cache format 2, with classes_per_batch and sync): still the same
    assert key() == "9436ffb687e8" and key(workers=2, distribution="independent") == "24c3b4fb037f"
    assert key(workers=2, batch_classes=3, distribution="independent") == "f93830238601"
    assert recover_key(RecoverConfig(method="sre2l"), info, tinfo, None) == "713c8c365aeb"


# ----------------------------------------------------------------------------- every method, one loop
@pytest.mark.parametrize("method", ["cfm", "krr", "dc", "dm", "mtt", "sre2l", "ce"])
def test_every_method_runs_through_the_loop(method, digits_data, digits_teacher, digits_stats):
    cfg = RecoverConfig(ipc=1, iterations=ITERS, lr=0.05, max_roll=1, method=method, batch_classes=5)
    stats = digits_stats if method not in ("sre2l", "ce") else None
    info, distiller = build_distiller(cfg, digits_data, digits_teacher, stats, "cpu")
    plan = make_plan(read_labels(digits_data, "train"), info.num_classes, cfg)
    seen = []
    images, labels, parts = recover_in_process(distiller, plan, data_dir=str(digits_data),
                                               on_round=lambda r, res: seen.append(r))
    assert seen == [0, 1] and images.shape == (10, 1, 8, 8) and labels.tolist() == list(range(10))
    assert torch.isfinite(images).all()
    assert (images >= distiller.pixel_min.cpu().view(1, -1, 1, 1) - 1e-6).all()
    assert (images <= distiller.pixel_max.cpu().view(1, -1, 1, 1) + 1e-6).all()

    init = load_real_images(str(digits_data), [plan.init_index[k][0] for k in range(10)])
    assert not torch.allclose(images, init)  # the pixels were optimised
    expected = {"cfm": {"filter", "signal"}, "krr": {"filter", "signal"}, "dc": {"filter", "signal"},
                "dm": {"filter", "signal"}, "mtt": {"filter", "signal"}, "sre2l": {"bn"}, "ce": set()}[method]
    for p in parts:
        assert set(p) == {"slot", "classes", "ce", "total"} | expected
        assert all(np.isfinite(p[k]) for k in expected | {"ce", "total"})



def test_alpha_scale_emu_weights_the_t_th_batch_by_t(digits_data, digits_teacher, digits_stats):
    """``alpha_scale: emu`` multiplies α by t for the t-th batch (undoing the EMU's 1/t weight of the
    current batch); the first batch is the same as with a constant α, later ones are not."""
    runs = {}
    for scale in ("constant", "emu"):
        cfg = RecoverConfig(ipc=3, iterations=ITERS, lr=0.05, max_roll=1, alpha=0.5, alpha_scale=scale)
        info, distiller = build_distiller(cfg, digits_data, digits_teacher, digits_stats, "cpu")
        plan = make_plan(read_labels(digits_data, "train"), info.num_classes, cfg)
        runs[scale] = recover_in_process(distiller, plan, data_dir=str(digits_data))
    for scale, (_, _, parts) in runs.items():
        assert [p["slot"] for p in parts] == [0, 1, 2]
        for t, p in enumerate(parts, start=1):
            weight = 0.5 * (t if scale == "emu" else 1)
            assert p["total"] == pytest.approx(p["ce"] + weight * (p["filter"] + p["signal"]), rel=1e-9)
    (const, labels, _), (emu, labels_emu, _) = runs["constant"], runs["emu"]
    assert torch.equal(labels, labels_emu)
    first = labels.new_tensor([i for i in range(len(labels)) if i % 3 == 0])  # slot 0 of every class
    later = labels.new_tensor([i for i in range(len(labels)) if i % 3 != 0])
    torch.testing.assert_close(emu[first], const[first], rtol=0, atol=0)
    assert (emu[later] - const[later]).abs().max() > 1e-3


def test_refuses_an_unknown_alpha_scale(tmp_path, digits_data, digits_teacher, digits_stats):
    with pytest.raises(ValueError, match=r"recover.alpha_scale must be one of \['constant', 'emu'\], got 'slot'"):
        _recover(tmp_path, digits_data, digits_teacher, digits_stats, alpha_scale="slot")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("method", ["cfm", "sre2l"])
def test_channels_last_recovers_the_same_images(method, digits_data, digits_teacher, digits_stats):
    """``channels_last`` is a layout (NHWC teacher and images; one-matmul Gram matrices), not a method
    change: the same images and loss parts up to float32 rounding."""
    runs = {}
    for channels_last in (False, True):
        cfg = RecoverConfig(ipc=1, iterations=ITERS, lr=0.05, max_roll=1, method=method, batch_classes=5,
                            channels_last=channels_last)
        stats = digits_stats if method == "cfm" else None
        info, distiller = build_distiller(cfg, digits_data, digits_teacher, stats, "cpu")
        conv = [m for m in distiller.teacher.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # C_in > 1
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        plan = make_plan(read_labels(digits_data, "train"), info.num_classes, cfg)
        runs[channels_last] = recover_in_process(distiller, plan, data_dir=str(digits_data))
    (nchw, labels, parts), (nhwc, labels_cl, parts_cl) = runs[False], runs[True]
    assert torch.equal(labels, labels_cl)
    torch.testing.assert_close(nhwc.contiguous(), nchw, rtol=1e-4, atol=1e-4)
    for a, b in zip(parts, parts_cl):
        for k in a.keys() - {"slot", "classes"}:
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), k

# ----------------------------------------------------------------------------- bad input
def _nothing_written(root: Path):
    assert not (root / "out").exists()
    assert not (root / "out.partial").exists()
    assert not (root / "ray").exists()


def _recover(root: Path, data, teacher, stats, *, resume=False, **cfg):
    """A recovery that gets at most as far as starting its workers (:class:`support.training.StubTrainer`)."""
    return run_recover(data, teacher, stats, root / "out", RecoverConfig(**{**BASE, "ipc": 1, **cfg}),
                       storage_path=root / "ray", progress=False, resume=resume, trainer_class=StubTrainer)


@pytest.fixture(scope="module")
def other_teacher(digits_teacher, tmp_path_factory) -> Path:
    """The same architecture with other (random) weights: another sha256."""
    from unidd_ray.artifacts.teacher import read_teacher_info, save_teacher

    info = read_teacher_info(digits_teacher)
    torch.manual_seed(123)
    out = tmp_path_factory.mktemp("other-teacher")
    save_teacher(info.build().eval(), info, out)
    return out


def test_refuses_statistics_of_another_teacher(tmp_path, digits_data, other_teacher, digits_stats):
    with pytest.raises(ValueError, match="computed with teacher"):
        _recover(tmp_path, digits_data, other_teacher, digits_stats)
    _nothing_written(tmp_path)


def test_refuses_statistics_of_another_dataset(tmp_path, digits_data, digits_teacher, digits_stats):
    from unidd_ray.artifacts.statistics import load_stats, read_stats_metadata, write_stats

    meta = read_stats_metadata(digits_stats)
    bad = tmp_path / "stats-other"
    write_stats(bad, load_stats(digits_stats), teacher_sha256=meta["teacher_sha256"], dataset_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="computed on dataset"):
        _recover(tmp_path, digits_data, digits_teacher, bad)
    _nothing_written(tmp_path)


def test_refuses_a_teacher_of_another_dataset(tmp_path, digits_data, digits_teacher, digits_stats):
    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher, teacher)
    meta = json.loads((teacher / "teacher.json").read_text())
    meta["dataset_fingerprint"] = "0" * 64
    del meta["info_sha256"]  # as teacher.json was before its checksum: read, and its dataset compared
    (teacher / "teacher.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="was trained on dataset 000000000000…, not on"):
        _recover(tmp_path, digits_data, teacher, digits_stats)
    _nothing_written(tmp_path)


def test_refuses_ipc_larger_than_a_class(tmp_path, digits_data, digits_teacher, digits_stats):
    counts = np.bincount(read_labels(digits_data, "train"))
    with pytest.raises(ValueError, match=rf"IPC {counts.max() + 1} is larger than the \d+ training images"):
        _recover(tmp_path, digits_data, digits_teacher, digits_stats, ipc=int(counts.max()) + 1)
    _nothing_written(tmp_path)


def test_ipc_limit_named_is_that_of_the_distilled_classes():
    """Class 0 (2 images) is not distilled: the largest IPC possible is that of classes 1 and 2 (3 images)."""
    labels = np.array([0, 0] + [1] * 5 + [2] * 3)
    with pytest.raises(ValueError, match=r"IPC 4 is larger than the 3 training images of class 2; lower "
                                         r"recover.ipc to at most 3$"):
        make_plan(labels, 3, RecoverConfig(ipc=4), classes=[1, 2])


@pytest.mark.parametrize("method", ["cfm", "krr"])
@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_refuses_nonpositive_beta(tmp_path, digits_data, digits_teacher, digits_stats, method, beta):
    with pytest.raises(ValueError, match="beta"):
        _recover(tmp_path, digits_data, digits_teacher, digits_stats, method=method, beta_max=beta)
    _nothing_written(tmp_path)


def test_singular_covariance_is_fine_for_positive_beta_only(digits_stats):
    """A dead channel makes Ψ singular: Ψ + βI is factorised for β > 0, refused (naming β) for β = 0."""
    from unidd_ray.spectral import cholesky_factor
    from unidd_ray.artifacts.statistics import load_stats

    m = load_stats(digits_stats)
    name = sorted(m, key=lambda k: m[k].channels)[-1]
    cov = m[name].covariance("total").clone()
    cov[0, :] = 0
    cov[:, 0] = 0
    cholesky_factor(cov, 0.1)
    with pytest.raises(ValueError, match=r"beta=0.*smallest eigenvalue"):
        cholesky_factor(cov, 0.0)


def test_refuses_unknown_method(tmp_path, digits_data, digits_teacher, digits_stats, capsys):
    with pytest.raises(ValueError, match=r"recover.method must be one of \['cfm'.*got 'nope'"):
        _recover(tmp_path, digits_data, digits_teacher, digits_stats, method="nope")
    _nothing_written(tmp_path)
    from unidd_ray.cli import main

    rc = main(["recover", "--recipe", "digits", "--data", str(digits_data), "--teacher", str(digits_teacher),
               "--stats", str(digits_stats), "--method", "nope", "--out", str(tmp_path / "out"),
               "--storage-path", str(tmp_path / "ray")])
    assert rc == 2 and "recover.method must be one of" in capsys.readouterr().err
    _nothing_written(tmp_path)


def test_refuses_a_teacher_without_batchnorm_for_sre2l(tmp_path, digits_data, digits_teacher):
    from unidd_ray.artifacts.teacher import read_teacher_info, save_teacher

    info = read_teacher_info(digits_teacher)
    info.options = {**info.options, "norm": "none"}
    teacher = tmp_path / "teacher-nobn"
    save_teacher(info.build().eval(), info, teacher)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        _recover(tmp_path, digits_data, teacher, None, method="sre2l")
    _nothing_written(tmp_path)


def test_refuses_statistics_missing_the_teachers_layers(tmp_path, digits_data, digits_teacher, digits_stats):
    from unidd_ray.artifacts.statistics import load_stats, read_stats_metadata, write_stats

    meta = read_stats_metadata(digits_stats)
    moments = load_stats(digits_stats)
    dropped = list(moments)[-1]
    bad = tmp_path / "stats-partial"
    write_stats(bad, {k: v for k, v in moments.items() if k != dropped}, teacher_sha256=meta["teacher_sha256"],
                dataset_fingerprint=meta["dataset_fingerprint"])
    with pytest.raises(ValueError, match=rf"layers \['{dropped}'\] have no statistics"):
        _recover(tmp_path, digits_data, digits_teacher, bad)
    _nothing_written(tmp_path)


def test_refuses_more_workers_than_classes_and_missing_stats(tmp_path, digits_data, digits_teacher):
    with pytest.raises(ValueError, match="recover.workers must be between 1 and the number of classes"):
        _recover(tmp_path, digits_data, digits_teacher, None, method="sre2l", workers=11)
    with pytest.raises(ValueError, match="needs --stats"):
        _recover(tmp_path, digits_data, digits_teacher, None, method="cfm")
    with pytest.raises(ValueError, match=r"recover.distribution must be one of \['exact', 'independent'\], got "
                                         r"'always'"):
        _recover(tmp_path, digits_data, digits_teacher, None, method="sre2l", distribution="always")
    with pytest.raises(ValueError, match=r"recover.init must be one of \['random', 'first'\], got 'last'"):
        _recover(tmp_path, digits_data, digits_teacher, None, method="sre2l", init="last")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("setting, message", [
    ({"iterations": 0}, "recover.iterations must be an integer >= 1, got 0"),
    ({"lr": 0.0}, "recover.lr must be a finite number > 0, got 0.0"),
    ({"alpha": -0.1}, "recover.alpha must be a finite number >= 0"),
    ({"crop_scale": (0.0, 1.0)}, r"recover.crop_scale must be \[low, high\]"),
    ({"crop_scale": (0.9, 0.5)}, r"recover.crop_scale must be \[low, high\]"),
    ({"method": "dm", "schedule": "cosin"}, r"recover.schedule must be one of \['cosine'.*got 'cosin'"),
    ({"signal": "bogus"},
     r"recover.signal must be one of \['mean', 'class', 'soft', 'class_share', 'mix_share'\], got 'bogus'"),
    ({"method": "dm", "signal": "bogus"}, "recover.signal must be one of"),
    ({"method": "dm", "covariance": "bogus"}, r"recover.covariance must be one of \['total'"),
    ({"method": "mtt", "covariance": "bogus"}, "recover.covariance must be one of"),
    ({"adam_betas": (2.0, 3.0)}, r"recover.adam_betas must be two numbers in \[0, 1\)"),
    ({"beta_max": 0.0}, "recover.beta_max must be a finite number > 0"),
])
def test_refuses_bad_settings_before_any_work(setting, message, tmp_path, digits_data, digits_teacher, digits_stats,
                                              no_training):
    with pytest.raises(ValueError, match=message):
        _recover(tmp_path, digits_data, digits_teacher, digits_stats, **setting)
    _nothing_written(tmp_path)


@pytest.mark.parametrize("method", ["sre2l", "ce"])
def test_checks_statistics_given_to_any_method(method, tmp_path, digits_data, other_teacher, digits_teacher,
                                               digits_stats, no_training):
    """Statistics given to a method that reads none are still checked (another teacher's are a mistake), and
    they are not handed to its workers."""
    with pytest.raises(ValueError, match="computed with teacher"):
        _recover(tmp_path, digits_data, other_teacher, digits_stats, method=method)
    _nothing_written(tmp_path)
    with pytest.raises(no_training):
        _recover(tmp_path, digits_data, digits_teacher, digits_stats, method=method)
    assert no_training.configs[-1]["job"].stats_dir is None


# ----------------------------------------------------------------------------- resume
def _start(root: Path, data, teacher, stats, *, resume=False, **cfg):
    """A recovery that gets as far as starting its workers (``no_training``): staging and plan.json written."""
    return _recover(root, data, teacher, stats, resume=resume, **cfg)


@pytest.mark.parametrize("changed, named", [
    ({"lr": 0.1}, r"recover.lr: 0.05 -> 0.1"),
    ({"iterations": 4}, r"recover.iterations: 3 -> 4"),
    ({"beta_max": 0.2}, r"recover.beta_max: 0.1 -> 0.2"),
    ({"schedule": "linear"}, r'recover.schedule: "cosine" -> "linear"'),
    ({"alpha": 0.5}, r"recover.alpha: 0.1 -> 0.5"),
    ({"signal": "class"}, r'recover.signal: "mean" -> "class"'),
    ({"emu": False}, r"recover.emu: true -> false"),
    ({"method": "krr"}, r'recover.method: "cfm" -> "krr"'),
    ({"init": "first"}, r'recover.init: null -> "first"'),
])
def test_resume_refuses_other_settings_naming_them(changed, named, tmp_path, digits_data, digits_teacher,
                                                   digits_stats, no_training):
    with pytest.raises(no_training):
        _start(tmp_path, digits_data, digits_teacher, digits_stats)
    staging = tmp_path / "out.partial"
    plan = (staging / "plan.json").read_bytes()
    (staging / ".batches").mkdir()
    (staging / ".batches" / "00000000.json").write_text("{}")  # a finished batch of the first run
    with pytest.raises(ValueError, match=rf"cannot resume .*out.partial: it was started with other settings or "
                                         rf"inputs \(.*{named}.*\); start over without --resume, give another --out"):
        _start(tmp_path, digits_data, digits_teacher, digits_stats, resume=True, **changed)
    assert (staging / "plan.json").read_bytes() == plan and (staging / ".batches" / "00000000.json").exists()
    assert len(no_training.configs) == 1  # no worker started for the refused resume


def test_resume_refuses_another_teacher_or_statistics(tmp_path, digits_data, digits_teacher, other_teacher,
                                                      digits_stats, no_training):
    from unidd_ray.artifacts.statistics import load_stats, read_stats_metadata, write_stats

    with pytest.raises(no_training):  # sre2l reads the teacher only
        _start(tmp_path, digits_data, digits_teacher, None, method="sre2l")
    with pytest.raises(ValueError, match=r"cannot resume .*out.partial: .*\(teacher: "):
        _start(tmp_path, digits_data, other_teacher, None, method="sre2l", resume=True)

    meta = read_stats_metadata(digits_stats)
    other_stats = tmp_path / "stats-other"  # the same teacher and data, another file (e.g. recomputed differently)
    write_stats(other_stats, load_stats(digits_stats), teacher_sha256=meta["teacher_sha256"],
                dataset_fingerprint=meta["dataset_fingerprint"], extra={"plan": {"recomputed": True}})
    with pytest.raises(no_training):
        _start(tmp_path, digits_data, digits_teacher, digits_stats)
    with pytest.raises(ValueError, match=r"cannot resume .*out.partial: .*\(statistics: "):
        _start(tmp_path, digits_data, digits_teacher, other_stats, resume=True)


def test_resume_accepts_the_same_run_with_other_performance_settings(tmp_path, digits_data, digits_teacher,
                                                                     digits_stats, no_training):
    with pytest.raises(no_training):
        _start(tmp_path, digits_data, digits_teacher, digits_stats)
    staging = tmp_path / "out.partial"
    plan = json.loads((staging / "plan.json").read_text())
    (staging / ".batches").mkdir()
    (staging / ".batches" / "00000000.json").write_text("{}")
    for performance in ({}, {"cpus_per_worker": 2, "max_failures": 3, "channels_last": False, "save_beton": True}):
        with pytest.raises(no_training):
            _start(tmp_path, digits_data, digits_teacher, digits_stats, resume=True, **performance)
        assert (staging / ".batches" / "00000000.json").exists()  # resumed, not started over
    assert json.loads((staging / "plan.json").read_text()) == plan
    assert plan["identity"]["recover"]["lr"] == BASE["lr"] and "cpus_per_worker" not in plan["identity"]["recover"]


def test_resume_refuses_a_plan_that_records_no_identity(tmp_path, digits_data, digits_teacher, digits_stats,
                                                        no_training):
    with pytest.raises(no_training):
        _start(tmp_path, digits_data, digits_teacher, digits_stats)
    path = tmp_path / "out.partial" / "plan.json"
    plan = json.loads(path.read_text())
    del plan["identity"]  # as an earlier unidd_ray wrote it
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"cannot resume .*out.partial: it records no settings and inputs"):
        _start(tmp_path, digits_data, digits_teacher, digits_stats, resume=True)


def test_resume_without_plan_starts_over(tmp_path, digits_data, digits_teacher, digits_stats, no_training):
    """A crash between making the staging directory and writing plan.json (its temporary file left): nothing to
    resume, start over."""
    staging = tmp_path / "out.partial"
    staging.mkdir()
    (staging / ".plan.json.k2j4h5.tmp").write_text("{")
    with pytest.raises(no_training):
        _start(tmp_path, digits_data, digits_teacher, digits_stats, resume=True)
    assert (staging / "plan.json").is_file() and not (staging / ".plan.json.k2j4h5.tmp").exists()


def test_plan_records_the_identity_of_the_run(cli_run, digits_data, digits_teacher, digits_stats):
    from unidd_ray.artifacts.files import read_manifest
    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.artifacts.teacher import read_teacher_info

    identity = json.loads((cli_run / "plan.json").read_text())["identity"]
    assert identity["teacher"] == read_teacher_info(digits_teacher).sha256
    assert identity["statistics"] == read_manifest(digits_stats, "stats")["files"]["stats.parquet"]
    assert identity["dataset"]["fingerprint"] == read_dataset_info(digits_data).fingerprint
    assert identity["recover"]["method"] == "cfm" and identity["recover"]["iterations"] == ITERS
    assert not {"cpus_per_worker", "save_beton", "max_failures"} & set(identity["recover"])
