"""Storage: where stages keep their Ray Train checkpoints, how outputs are written (modes, whole-directory
replacement), squeeze's input checks and resume records, and what the embedded Ray listens on."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from support.training import StubTrainer
from unidd_ray.artifacts.files import stage_storage


def test_default_is_beside_the_output(tmp_path):
    assert stage_storage(tmp_path / "syn") == tmp_path / ".syn.ray"


def test_shared_storage_gives_each_output_its_own_directory(tmp_path):
    shared = tmp_path / "shared"
    a = stage_storage(tmp_path / "a" / "out", str(shared))
    b = stage_storage(tmp_path / "b" / "out", str(shared))
    assert a.parent == b.parent == shared and a != b
    assert stage_storage(tmp_path / "a" / "out", str(shared)) == a  # stable across calls (resume)


def test_uri_storage_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="mount"):
        stage_storage(tmp_path / "x", "s3://bucket/prefix")


# ----------------------------------------------------------------------------- permissions and replacement
@pytest.fixture(params=[0o022, 0o007])
def umask(request):
    """A known umask for the test (restored after it)."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_writes_get_the_modes_of_the_umask(tmp_path, umask):
    """Files and directories written through a temporary name end up as a plain open()/mkdir() would make
    them (readable by the group and others the umask lets read them), not private to the owner."""
    from unidd_ray.artifacts.files import atomic_directory, atomic_file, atomic_write_bytes, atomic_write_json

    atomic_write_bytes(tmp_path / "a.bin", b"a")
    atomic_write_json(tmp_path / "b.json", {"b": 1})
    with atomic_file(tmp_path / "c.pt") as tmp:
        tmp.write_bytes(b"c")
    with atomic_directory(tmp_path / "d", "stats") as d:
        atomic_write_bytes(d / "stats.parquet", b"d")
    plain_file, plain_dir = tmp_path / "plain", tmp_path / "plain-dir"
    plain_file.write_bytes(b"")
    plain_dir.mkdir()
    assert stat.S_IMODE(plain_file.stat().st_mode) == 0o666 & ~umask
    for name in ("a.bin", "b.json", "c.pt", "d/stats.parquet"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == stat.S_IMODE(plain_dir.stat().st_mode) == 0o777 & ~umask


def _output(path: Path, text: str) -> Path:
    """A (teacher) output whose config.yaml holds ``text``."""
    path.mkdir()
    (path / "teacher.json").write_text('{"arch": "convnet"}')
    (path / "config.yaml").write_text(text)
    return path


def test_replace_directory_removes_what_a_crash_left_aside(tmp_path, monkeypatch):
    """A crash between the two renames leaves the older output in ``.NAME.XXXXXXXX.old``; the next replacement
    removes it, and only it (another output's folders stay)."""
    from unidd_ray.artifacts import files as artifacts

    dst = _output(tmp_path / "out", "first")
    real_replace = os.replace
    calls = []

    def crash_on_second(src, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("killed between the renames")
        real_replace(src, target)

    monkeypatch.setattr(artifacts.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="between the renames"):
        artifacts.replace_directory(_output(tmp_path / "second", "second"), dst, "teacher")
    monkeypatch.undo()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith(".old")]
    assert len(left) == 1 and (left[0] / "out" / "config.yaml").read_text() == "first" and not dst.exists()
    others = [_output(tmp_path / ".out.partial.abcd1234.old", "other"), _output(tmp_path / ".out.abcd1234.tmp", "tmp")]

    artifacts.replace_directory(_output(tmp_path / "third", "third"), dst, "teacher")
    assert (dst / "config.yaml").read_text() == "third"
    assert not any(p.exists() for p in left) and all(p.exists() for p in others)
    artifacts.replace_directory(_output(tmp_path / "fourth", "fourth"), dst, "teacher")  # over an existing output
    assert (dst / "config.yaml").read_text() == "fourth"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "second", *(p.name for p in others)])


# ----------------------------------------------------------------------------- squeeze: checks, resume, output
def _squeeze(data, root: Path, *, resume=False, model=None, **settings):
    from unidd_ray.config import DataConfig, ModelConfig, SqueezeConfig
    from unidd_ray.stages.squeeze import squeeze

    cfg = SqueezeConfig(**{"epochs": 2, "batch_size": 64, "workers": 1, "cpus_per_worker": 1, **settings})
    model = model or ModelConfig(arch="convnet", options={"width": 8, "depth": 2, "norm": "batch"})
    return squeeze(data, root / "teacher", squeeze_cfg=cfg, model_cfg=model, data_cfg=DataConfig(dataset="digits"),
                   storage_path=root / "ray", resume=resume, trainer_class=StubTrainer)


@pytest.mark.parametrize("workers, batch_size", [(8, 256), (1, 2048)])
def test_squeeze_refuses_a_batch_larger_than_each_workers_share(workers, batch_size, digits_data, tmp_path,
                                                                no_training):
    """digits has 1438 train images: 8 workers get 179 each, fewer than a batch of 256, and the loaders drop
    the partial batch, so the teacher would not be trained at all."""
    with pytest.raises(ValueError, match=rf"squeeze.batch_size {batch_size} is larger than each worker's share"
                                         rf".*squeeze.workers {workers}"):
        _squeeze(digits_data, tmp_path, workers=workers, batch_size=batch_size)
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "ray").exists()


def test_squeeze_resume_refuses_checkpoints_of_other_settings(digits_data, tmp_path, no_training):
    from unidd_ray.config import ModelConfig

    with pytest.raises(no_training):
        _squeeze(digits_data, tmp_path)
    run_dir = tmp_path / "ray" / "squeeze"
    assert run_dir.is_dir() and (tmp_path / "ray" / "squeeze.identity.json").is_file()
    with pytest.raises(ValueError, match=r"cannot resume.*squeeze.lr: 0.05 -> 0.1.*without --resume"):
        _squeeze(digits_data, tmp_path, resume=True, lr=0.1)
    other = ModelConfig(arch="convnet", options={"width": 16, "depth": 2, "norm": "batch"})
    with pytest.raises(ValueError, match=r"cannot resume.*teacher.options.width: 8 -> 16"):
        _squeeze(digits_data, tmp_path, resume=True, model=other)
    assert run_dir.is_dir()  # a refused resume leaves the checkpoints alone
    with pytest.raises(no_training):  # performance settings may change
        _squeeze(digits_data, tmp_path, resume=True, cpus_per_worker=2, max_failures=0)
    with pytest.raises(no_training):
        _squeeze(digits_data, tmp_path, resume=True)


def test_squeeze_resume_refuses_checkpoints_that_record_nothing(digits_data, tmp_path, no_training):
    (tmp_path / "ray" / "squeeze").mkdir(parents=True)  # checkpoints without a record of their settings
    with pytest.raises(ValueError, match=r"cannot resume the checkpoints in .*squeeze: it records no settings and inputs"):
        _squeeze(digits_data, tmp_path, resume=True)
    with pytest.raises(no_training):  # a fresh start replaces them
        _squeeze(digits_data, tmp_path)


def test_squeeze_replaces_a_teacher_whole(digits_data, digits_teacher, tmp_path, monkeypatch):
    """A crash while writing the new teacher leaves the previous one as it was (weights, description and
    config together), with no temporary folder beside it."""
    import ray.train
    import torch

    from unidd_ray.artifacts.dataset import read_dataset_info
    from unidd_ray.config import DataConfig, ModelConfig, SqueezeConfig
    from unidd_ray.models import build_model
    from unidd_ray.stages import squeeze as stage

    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher, teacher)
    (teacher / "config.yaml").write_text("name: the previous run\n")
    before = {p.name: p.read_bytes() for p in teacher.iterdir()}
    info = read_dataset_info(digits_data)
    options = {"width": 8, "depth": 2, "norm": "batch"}
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    model = build_model("convnet", num_classes=info.num_classes, in_channels=info.channels,
                        resolution=info.resolution, **options)
    torch.save({"model": model.state_dict()}, checkpoint / "state.pt")

    class Result:  # what Ray Train's fit returns: the last checkpoint and its metrics
        def __init__(self):
            self.checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint))
            self.metrics = {"val_top1": 10.0, "train_loss": 2.3}

    class Trainer:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            return Result()

    real_write = stage.atomic_write_text

    def crash_on_config(path, text):
        if Path(path).name == "config.yaml":
            raise OSError("killed while writing config.yaml")
        return real_write(path, text)

    monkeypatch.setattr(stage, "atomic_write_text", crash_on_config)
    with pytest.raises(OSError, match="config.yaml"):
        stage.squeeze(digits_data, teacher, squeeze_cfg=SqueezeConfig(epochs=1, batch_size=64, cpus_per_worker=1),
                      model_cfg=ModelConfig(arch="convnet", options=options), data_cfg=DataConfig(dataset="digits"),
                      storage_path=tmp_path / "ray", recipe_yaml="name: the new run\n", trainer_class=Trainer)
    assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "ray", "teacher"]


# ----------------------------------------------------------------------------- the embedded Ray
def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_embedded_ray_listens_on_loopback_only(ray_session):
    """Every server of the embedded Ray the tests and the local pipeline use (GCS, raylet, agents, the
    driver's and the workers' gRPC servers) is bound to 127.0.0.1."""
    import psutil

    ray = ray_session

    @ray.remote
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    actor = Probe.remote()
    actor_pid = ray.get(actor.pid.remote())
    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    assert actor_pid in {p.pid for p in processes}
    names = {p.name() for p in processes}
    assert {"gcs_server", "raylet"} <= names
    listening = []
    for p in processes:
        try:
            listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    ray.kill(actor)
    assert {name for name, _, _ in listening} >= {"gcs_server", "raylet"}
    assert [entry for entry in listening if not _loopback(entry[1])] == []


def _listeners_and_sum(config):
    """Every Ray Train worker's all-reduce of its rank + 1, the sockets its process listens on and the
    interface gloo was told to bind to (gathered on every rank)."""
    import os

    import psutil
    import torch
    import torch.distributed as dist

    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total)
    sockets = [(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
               if c.status == psutil.CONN_LISTEN]
    mine = {"rank": dist.get_rank(), "sum": float(total), "listening": sockets,
            "gloo_interface": os.environ.get("GLOO_SOCKET_IFNAME")}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)  # also: no worker leaves before every one has listed its sockets
    return everyone


def test_two_worker_ray_train_run_listens_on_loopback_only(ray_session, tmp_path):
    """A multi-worker Ray Train run of the embedded instance (the project's torch config) forms its process group
    without a listener outside 127.0.0.1: Ray's default rendezvous has worker 0 host a TCP store on ``::``;
    workers on one node meet through a file, whose folder is removed at the end."""
    import glob
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from unidd_ray.runtime.train import torch_config

    from unidd_ray.runtime.rendezvous import PREFIX

    before = set(glob.glob(f"{tempfile.gettempdir()}/{PREFIX}*"))
    trainer = TorchTrainer(_listeners_and_sum, torch_config=torch_config(False),
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="listeners", storage_path=str(tmp_path)))
    result = trainer.fit()
    assert result.error is None
    workers = result.return_value  # rank 0's: every rank's report
    assert [w["rank"] for w in workers] == [0, 1]
    assert [w["sum"] for w in workers] == [3.0, 3.0]  # 1 + 2: both workers are in one group
    loopback = {name for _, name in socket.if_nameindex() if name in ("lo", "lo0")}
    for w in workers:
        assert w["listening"]  # gloo's own socket at least
        assert [address for address in w["listening"] if not _loopback(address[0])] == [], w
        assert w["gloo_interface"] in loopback  # gloo binds there whatever the host name resolves to
    # the store's folder is gone (the start may also have swept folders that stopped runs left)
    assert set(glob.glob(f"{tempfile.gettempdir()}/{PREFIX}*")) <= before


def test_workers_on_several_machines_keep_rays_tcp_rendezvous(monkeypatch):
    """A file is shared only by workers of one machine: a group spread over machines takes Ray's own rendezvous."""
    from ray.train.torch.config import _TorchBackend

    from unidd_ray.runtime import rendezvous
    from unidd_ray.runtime.train import torch_config

    class Group:
        def __init__(self, nodes):
            self.nodes = nodes

        def __len__(self):
            return len(self.nodes)

        def execute(self, fn, *args, **kwargs):
            assert fn is rendezvous._host, "only the machines are asked before the choice"
            return list(self.nodes)

        def execute_single(self, rank, fn, *args, **kwargs):
            raise AssertionError("a file rendezvous was set up for workers on several nodes")

    started = []
    monkeypatch.setattr(_TorchBackend, "on_start", lambda self, group, config: started.append(group))
    config = torch_config(False)
    assert config.backend == "gloo" and torch_config(True).backend == "nccl"
    group = Group([("host-a", "boot-1"), ("host-b", "boot-1")])
    config.backend_cls().on_start(group, config)
    assert started == [group]
    group = Group([("host-a", "boot-1"), ("host-a", "boot-2")])  # one name, two machines (or a reboot)
    config.backend_cls().on_start(group, config)
    assert started[-1] is group
    with pytest.raises(ValueError, match="gloo' or 'nccl"):
        rendezvous.FileRendezvousTorchConfig(backend="mpi")


def test_workers_of_one_machine_that_do_not_share_the_folder_keep_rays_tcp_rendezvous(monkeypatch, tmp_path):
    """One host name and boot id, but a worker that cannot see worker 0's folder (containers of one host, each its
    own /tmp): Ray's own rendezvous, and the folder is removed."""
    import tempfile

    from ray.train.torch.config import _TorchBackend

    from unidd_ray.runtime import rendezvous
    from unidd_ray.runtime.train import torch_config

    class Group:
        def __len__(self):
            return 2

        def execute(self, fn, *args, **kwargs):
            if fn is rendezvous._host:
                return [("host-a", "boot-1")] * 2
            assert fn is rendezvous._sees, fn
            return [fn(*args), False]  # worker 1 has a /tmp of its own

        def execute_single(self, rank, fn, *args, **kwargs):
            assert rank == 0
            return fn(*args, **kwargs)

        def execute_single_async(self, rank, fn, *args, **kwargs):
            raise AssertionError("a file rendezvous was set up for workers that do not share its folder")

    started = []
    monkeypatch.setattr(_TorchBackend, "on_start", lambda self, group, config: started.append(group))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config, group = torch_config(False), Group()
    config.backend_cls().on_start(group, config)
    assert started == [group]
    assert list(tmp_path.glob(f"{rendezvous.PREFIX}*")) == []


def test_host_is_this_machine():
    from unidd_ray.runtime import rendezvous

    name, boot = rendezvous._host()
    assert name == socket.gethostname()
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip() and len(boot) == 36


def test_file_rendezvous_has_a_folder_per_start_removed_at_shutdown(monkeypatch, tmp_path):
    """A restarted group (on_start again) gets a fresh folder, so it cannot read the last group's keys; shutdown
    removes every folder through worker 0 and keeps, for the next shutdown, those it could not remove."""
    import tempfile

    from ray.train.torch.config import _TorchBackend

    from unidd_ray.runtime import rendezvous
    from unidd_ray.runtime.train import torch_config

    class Group:
        worker_dead = False

        def __len__(self):
            return 2

        def execute(self, fn, *args, **kwargs):
            if fn is rendezvous._host:
                return [("host-a", "boot-1")] * 2  # two Ray nodes of one machine, say
            if fn is rendezvous._sees:
                return [fn(*args)] * 2
            calls.append(fn.__name__)  # _bind_to_loopback, _set_torch_distributed_env_vars: not run here
            return [None, None]

        def execute_single(self, rank, fn, *args, **kwargs):
            assert rank == 0
            return fn(*args, **kwargs)

        def execute_single_async(self, rank, fn, *args, **kwargs):
            if fn is rendezvous._remove_folder:
                if self.worker_dead:
                    raise RuntimeError("worker 0 is dead")
                return fn(*args, **kwargs)
            calls.append((rank, kwargs["init_method"], kwargs["world_size"]))
            return None

    calls = []
    monkeypatch.setattr(rendezvous.ray, "get", lambda refs, timeout=None: refs)
    monkeypatch.setattr(_TorchBackend, "on_shutdown", lambda self, group, config: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config, group = torch_config(False), Group()
    backend = config.backend_cls()
    backend.on_start(group, config)
    backend.on_start(group, config)  # a restart
    folders = sorted(tmp_path.glob(f"{rendezvous.PREFIX}*"))
    assert len(folders) == 2
    urls = [c[1] for c in calls if isinstance(c, tuple)]
    assert urls == [f"file://{folders[0]}/store"] * 2 + [f"file://{folders[1]}/store"] * 2 or \
        urls == [f"file://{folders[1]}/store"] * 2 + [f"file://{folders[0]}/store"] * 2
    assert [c for c in calls if isinstance(c, str)].count("_bind_to_loopback") == 2
    group.worker_dead = True
    backend.on_shutdown(group, config)
    assert sorted(tmp_path.glob(f"{rendezvous.PREFIX}*")) == folders
    group.worker_dead = False
    backend.on_shutdown(group, config)
    assert list(tmp_path.glob(f"{rendezvous.PREFIX}*")) == []


def test_a_later_start_removes_the_rendezvous_folders_stopped_runs_left(monkeypatch, tmp_path):
    """A run stopped before its shutdown leaves its folder, with or without torch's store file in it; the
    next folder made on that node removes those whose maker (worker 0, named in the folder) has exited, and
    empty ones an hour old, but never a live maker's folder with a store file, a fresh one (a group forming
    now) or another program's."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    from unidd_ray.runtime import rendezvous

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    hours_ago = time.time() - 2 * 3600
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                            text=True, check=True)
    dead_pid, live_pid = int(exited.stdout), os.getpid()

    def folder(name, files=(), old=True):
        path = tmp_path / name
        path.mkdir()
        for f in files:
            (path / f).write_bytes(b"x")
        if old:
            os.utime(path, (hours_ago, hours_ago))
        return path

    removed = [folder(f"{rendezvous.PREFIX}{dead_pid}-a1", files=["store"], old=False),  # killed maker
               folder(f"{rendezvous.PREFIX}{dead_pid}-b2"),
               folder(f"{rendezvous.PREFIX}olds_1x"),  # named before the pid was: empty and old
               folder(f"{rendezvous.PREFIX}{live_pid}-d4")]  # empty for an hour: its group has ended
    kept = [folder(f"{rendezvous.PREFIX}{live_pid}-c3", files=["store"]),  # a long run, store untouched for hours
            folder(f"{rendezvous.PREFIX}{live_pid}-d5", old=False),  # a group forming now
            folder(f"{rendezvous.PREFIX}olds_2y", files=["store"]),
            folder(f"{rendezvous.PREFIX}news_3z", old=False),
            folder("someone-elses-folder"),
            folder(f"other-{rendezvous.PREFIX}{dead_pid}-e5")]
    made = rendezvous._make_folder()
    assert os.path.dirname(made) == str(tmp_path)
    assert os.path.basename(made).startswith(f"{rendezvous.PREFIX}{live_pid}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] + [os.path.basename(made)])
    assert all((p / "store").read_bytes() == b"x" for p in kept if p.name.endswith(("c3", "2y")))
    assert not any(p.exists() for p in removed)
