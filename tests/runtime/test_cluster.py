"""Deployment files: cluster-launcher YAMLs, KubeRay manifests, tune spaces and cluster/submit.sh (fast)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
ALL_YAML = sorted(CLUSTER.rglob("*.yaml")) + sorted((ROOT / "tune_spaces").glob("*.yaml"))
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
PINS = ("torch==2.13.0", "torchvision==0.28.0", "ray[default,train,tune]==2.60.0", "ffcv==1.0.2")
FFCV_DEBS = ("libopencv-dev", "libturbojpeg0-dev", "pkg-config")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    docs = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path}: expected one {kind}"
    return docs[0]


def _commands(cfg: dict, *keys) -> str:
    return "\n".join(str(c) for k in keys for c in (cfg.get(k) or []))


def test_every_yaml_parses():
    assert {p.name for p in ALL_YAML} >= {"aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml",
                                          "cfm_beta_alpha.yaml", "schedules.yaml", "filters.yaml"}
    for path in ALL_YAML:
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_tune_spaces_validate():
    from unidd_ray.tune import load_space

    for path in sorted((ROOT / "tune_spaces").glob("*.yaml")):
        load_space(path)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_cluster_launcher(path):
    cfg = _docs(path)[0]
    for key in ("cluster_name", "provider", "auth", "head_node_type", "available_node_types", "max_workers",
                "setup_commands", "file_mounts", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"{path.name}: missing {key}"
    assert cfg["provider"]["type"] == path.stem  # aws / gcp
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "node_config" in head and head["resources"].get("GPU", 0) == 0  # a CPU head
    gpu_groups = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert group["max_workers"] >= 1 and group["min_workers"] <= group["max_workers"] <= cfg["max_workers"]
        assert "node_config" in group
    if path.stem == "aws":
        assert gpu_groups[0]["node_config"]["InstanceType"].startswith(("g", "p"))
    else:
        accel = gpu_groups[0]["node_config"]["guestAccelerators"][0]
        assert accel["acceleratorType"].startswith("nvidia") and accel["acceleratorCount"] >= 1

    setup = _commands(cfg, "initialization_commands", "setup_commands", "head_setup_commands",
                      "worker_setup_commands")
    for deb in FFCV_DEBS:
        assert deb in setup
    for pin in PINS:
        assert pin in setup, f"{path.name}: {pin} not installed"
    assert "unidd_ray" in setup  # the project itself
    # shared storage for datasets and results, mounted on every node
    assert "/mnt/shared" in setup and ("mount -t nfs" in setup)
    assert "/mnt/shared/datasets" in setup and "/mnt/shared/runs" in setup
    # the project source and the token reach every node; never a token in the file itself
    mounts = cfg["file_mounts"]
    assert "." in mounts.values() and any(v.endswith(".ray/auth_token") for v in mounts.values())
    start = _commands(cfg, "head_start_ray_commands", "worker_start_ray_commands")
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "--head" in _commands(cfg, "head_start_ray_commands")
    assert "$RAY_HEAD_IP:6379" in _commands(cfg, "worker_start_ray_commands")
    assert "0.0.0.0" not in start  # the dashboard stays on the head's localhost (SSH tunnel)
    assert "RAY_AUTH_TOKEN=" not in path.read_text()


def _token_env(container: dict) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "unidd-ray-auth" and ref["key"] == "auth_token"
    assert "value" not in env["RAY_AUTH_TOKEN"]  # from the Secret, never inline


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    head_containers = head["template"]["spec"]["containers"]
    for c in head_containers:
        _token_env(c)
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})  # a CPU head
    assert {p["containerPort"] for p in head_containers[0]["ports"]} >= {6379, 8265}
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    groups = spec["workerGroupSpecs"]
    assert groups
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"]
                                    for c in g["template"]["spec"]["containers"])]
    assert gpu, "no GPU worker group"
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        for c in g["template"]["spec"]["containers"]:
            _token_env(c)
    for group in [head, *groups]:  # the shared volume on every pod
        pod = group["template"]["spec"]
        claims = {v["name"]: v for v in pod["volumes"]}
        assert claims["shared"]["persistentVolumeClaim"]["claimName"] == "unidd-ray-shared"
        assert any(m["mountPath"] == "/mnt/shared" for c in pod["containers"] for m in c["volumeMounts"])
    if spec.get("enableInTreeAutoscaling"):
        _token_env({"name": "autoscaler", **spec["autoscalerOptions"]})


def test_kuberay_raycluster():
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    cluster = _one(path, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"])
    pvc = _one(path, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "unidd-ray-shared" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_rayjob():
    job = _one(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    # the submitter pod runs `ray job submit` against the authenticated head
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    for c in spec["submitterPodTemplate"]["spec"]["containers"]:
        _token_env(c)
    yaml.safe_load(spec["runtimeEnvYAML"])
    # the entrypoint is a valid unidd-ray command whose recipe resolves, with results on shared storage
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["unidd-ray", "pipeline"]
    from unidd_ray.cli import _recipe, build_parser

    args = build_parser().parse_args(argv[1:])
    recipe = _recipe(args)
    assert str(recipe.run_dir).startswith("/mnt/shared/") and recipe.storage_path.startswith("/mnt/shared/")
    assert recipe.data.root.startswith("/mnt/shared/")


def test_submit_script_syntax_and_usage(tmp_path):
    script = CLUSTER / "submit.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "ray_cmd\" job submit" in text and "--working-dir ." in text and "unidd-ray pipeline" in text
    for excluded in ("data/", "runs/", ".venv/"):
        assert f'\\"{excluded}\\"' in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: cluster/submit.sh")
    assert "RAY_ADDRESS" in shown.stdout and "RAY_AUTH_TOKEN" in shown.stdout
    # no arguments: usage on stderr, exit 2
    bare = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert bare.returncode == 2 and "usage:" in bare.stderr
    # no address / no token: clear errors before anything is submitted
    no_addr = subprocess.run([str(script), "--recipe", "digits"], capture_output=True, text=True, env=env, timeout=30)
    assert no_addr.returncode == 2 and "RAY_ADDRESS" in no_addr.stderr
    no_tok = subprocess.run([str(script), "--recipe", "digits"], capture_output=True, text=True, timeout=30,
                            env={**env, "RAY_ADDRESS": "http://127.0.0.1:9"})
    assert no_tok.returncode == 2 and "auth token" in no_tok.stderr


def test_submit_script_builds_the_job_command(tmp_path):
    """With a stand-in `ray`, the script passes the address, the working dir, the runtime env (excludes and
    env vars, no token) and `unidd-ray pipeline ARGS` through, and exports the token."""
    fake = tmp_path / "ray"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n'
                    'printf "%s|%s" "$RAY_AUTH_MODE" "$RAY_AUTH_TOKEN" > "$ENV_FILE"\n')
    fake.chmod(0o755)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("tok-from-file")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "RAY": str(fake), "RAY_ADDRESS": "http://127.0.0.1:8265",
           "ARGS_FILE": str(tmp_path / "args"), "ENV_FILE": str(tmp_path / "env"),
           "UNIDD_JOB_ENV": '{"NCCL_DEBUG": "INFO"}'}
    done = subprocess.run([str(CLUSTER / "submit.sh"), "--no-wait", "--recipe", "digits", "--set", "ipcs=[1, 2]"],
                          capture_output=True, text=True, env=env, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:5] == ["job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir"] and args[5] == "."
    import json

    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    assert {"data/", "runs/", ".venv/"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"]["NCCL_DEBUG"] == "INFO" and "RAY_AUTH_TOKEN" not in runtime_env["env_vars"]
    assert "--no-wait" in args
    assert args[args.index("--"):] == ["--", "unidd-ray", "pipeline", "--recipe", "digits", "--set", "ipcs=[1, 2]"]
    assert (tmp_path / "env").read_text() == "token|tok-from-file"
    # RAY_AUTH_TOKEN wins over the file
    subprocess.run([str(CLUSTER / "submit.sh"), "--recipe", "digits"], env={**env, "RAY_AUTH_TOKEN": "tok-env"},
                   check=True, capture_output=True, timeout=30, cwd=tmp_path)
    assert (tmp_path / "env").read_text() == "token|tok-env"


def test_cluster_readme():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml", "submit.sh", "RAY_AUTH_TOKEN",
                   "storage_path", "/mnt/shared"):
        assert needle in text


def _cluster(monkeypatch, nodes: list[dict], embedded: bool):
    from unidd_ray.runtime import cluster

    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: total)
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [{"Alive": True, "Resources": n} for n in nodes]
                        + [{"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}])  # a dead node counts for nothing
    monkeypatch.setattr(cluster, "_EMBEDDED", embedded)
    return cluster


def test_a_worker_larger_than_every_node_is_named(monkeypatch, caplog):
    """Three 1-CPU nodes hold 3 workers of 1 CPU, but not one worker of 2 CPU, though the cluster has 3: Ray would
    wait for a node that large forever.  Refused on an embedded instance, a warning on a cluster (it may grow)."""
    cluster = _cluster(monkeypatch, [{"CPU": 1.0}] * 3, embedded=True)
    cluster.require_resources("squeeze", workers=3, cpus=1)
    cluster.require_resources("squeeze", workers=4, cpus=0.5)
    with pytest.raises(ValueError, match=r"squeeze asks for 2 CPU per worker, but the largest node of the Ray "
                                         r"cluster has 1 CPU and 0 GPU \(a worker runs on one node\); lower "
                                         r"squeeze.workers or squeeze.cpus_per_worker \(this local Ray instance"):
        cluster.require_resources("squeeze", workers=1, cpus=2)
    with pytest.raises(ValueError, match=r"4 worker\(s\) x 1 CPU = 4 CPU, but the Ray cluster has 3 CPU"):
        cluster.require_resources("recover", workers=4, cpus=1)
    cluster = _cluster(monkeypatch, [{"CPU": 4.0, "GPU": 1.0}] * 2, embedded=True)
    with pytest.raises(ValueError, match="asks for 1 CPU \\+ 2 GPU per worker, but the largest node"):
        cluster.require_resources("recover", workers=1, cpus=1, gpus=2)
    cluster = _cluster(monkeypatch, [{"CPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], embedded=False)
    cluster.require_resources("recover", workers=1, cpus=8, gpus=1)
    with caplog.at_level("WARNING"):
        cluster.require_resources("recover", workers=1, cpus=9)
    assert "largest node of the Ray cluster has 8 CPU and 1 GPU" in caplog.text and "scale up" in caplog.text
