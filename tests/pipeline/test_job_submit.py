"""`ray job submit` of a tiny unidd-ray pipeline to a real local Ray head with token authentication.

A head is started with ``ray start --head --block`` (everything bound to 127.0.0.1, its own temp dir and
HOME, RAY_AUTH_MODE=token and a freshly generated token), a pipeline on digits is submitted through
``cluster/submit.sh`` (``ray job submit --working-dir .``), and submissions without / with a wrong token
are refused.  The head is shut down by its own process group (``ray stop`` would stop every Ray on the
machine, including other test sessions').
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray / unidd-ray (CI: .venv, dev: /tmp/venv)

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _http(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _kill_group(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head started by this test: its process group, then any process of its session left over."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    import psutil

    deadline = time.time() + 20
    while time.time() < deadline:  # processes of this session only: their command lines name its temp dir
        left = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or []):
                    left.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.5)


@pytest.fixture
def token_head(tmp_path):
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, agent, agent_grpc, metrics, env_agent, nm, om = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(home), PATH=f"{BIN}{os.pathsep}{env['PATH']}",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               # one-machine mode: Ray keeps the 127.0.0.1 node address instead of the machine's network one
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    log = open(tmp_path / "ray_start.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
         f"--node-manager-port={nm}", f"--object-manager-port={om}", "--num-cpus=2", "--num-gpus=0",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{(tmp_path / 'ray_start.log').read_text()}")
            try:
                status, _ = _http(f"{address}/api/jobs/", token)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the dashboard did not come up:\n{(tmp_path / 'ray_start.log').read_text()}")
            time.sleep(1)
        startup = time.perf_counter() - started
        yield {"address": address, "token": token, "env": env, "startup_s": startup, "home": home}
    finally:
        _kill_group(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_with_token_auth(token_head, tmp_path):
    address, token, env = token_head["address"], token_head["token"], token_head["env"]
    timings = {"ray_start_s": round(token_head["startup_s"], 1)}

    # the job's working dir: a recipe file next to nothing else (uploaded by `ray job submit --working-dir .`)
    work = tmp_path / "work"
    work.mkdir()
    recipe = yaml.safe_load((ROOT / "unidd_ray" / "recipes" / "digits.yaml").read_text())
    recipe.update(name="digits-job", methods=["random", "cfm"], ipcs=[1])
    recipe["squeeze"].update(epochs=2)
    recipe["stats"].update(actors=1)
    recipe["recover"].update(iterations=5)
    recipe["evaluate"].update(epochs=5, seeds=1)
    (work / "job_recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"  # absolute: the job's cwd is its unpacked working dir

    # 1. without the token: the job API refuses (HTTP 401 / 403; the CLI exits non-zero)
    status, _ = _http(f"{address}/api/jobs/")
    assert status == 401
    status, _ = _http(f"{address}/api/jobs/", "0" * 64)
    assert status == 403
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_MODE"] = "disabled"
    t0 = time.perf_counter()
    refused = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                              "--no-wait", "--", "unidd-ray", "pipeline", "--config", "job_recipe.yaml"],
                             cwd=work, env=no_token, capture_output=True, text=True, timeout=120)
    timings["refused_submit_s"] = round(time.perf_counter() - t0, 1)
    assert refused.returncode != 0
    text = refused.stdout + refused.stderr
    assert "401" in text or "nauthorized" in text or "uthentication" in text, text[-2000:]

    # 2. with the token (from RAY_AUTH_TOKEN), through cluster/submit.sh
    job_env = {**env, "RAY_ADDRESS": address, "RAY": str(BIN / "ray")}
    t0 = time.perf_counter()
    done = subprocess.run([str(ROOT / "cluster" / "submit.sh"), "--config", "job_recipe.yaml", "--set", f"out={out}"],
                          cwd=work, env=job_env, capture_output=True, text=True, timeout=540)
    timings["pipeline_job_s"] = round(time.perf_counter() - t0, 1)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "succeeded" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == "digits-job"
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"teacher (full data)", "random", "cfm"}
    for method in ("random", "cfm"):
        assert rows[method]["ipc"] == 1 and rows[method]["seeds"] == 1
        assert 0 <= rows[method]["top1_mean"] <= 100
    assert rows["teacher (full data)"]["top1_mean"] > 50
    timings["pipeline_inside_job_s"] = round(results["seconds"], 1)
    timings.update({f"{m}_recover_eval_s": rows[m]["seconds"] for m in ("random", "cfm")})

    # 3. the token from ~/.ray/auth_token (RAY_AUTH_TOKEN unset): accepted; this job fails fast (unknown recipe)
    (token_head["home"] / ".ray").mkdir()
    (token_head["home"] / ".ray" / "auth_token").write_text(token)
    file_env = {k: v for k, v in job_env.items() if k != "RAY_AUTH_TOKEN"}
    quick = subprocess.run([str(ROOT / "cluster" / "submit.sh"), "--no-wait", "--recipe", "no-such-recipe"],
                           cwd=work, env=file_env, capture_output=True, text=True, timeout=120)
    assert quick.returncode == 0, (quick.stdout + quick.stderr)[-3000:]
    deadline = time.time() + 60
    while True:
        status, body = _http(f"{address}/api/jobs/", token)
        states = sorted(j["status"] for j in json.loads(body))
        if states == ["FAILED", "SUCCEEDED"] or time.time() > deadline:
            break
        time.sleep(1)
    assert states == ["FAILED", "SUCCEEDED"]  # the refused submission created no job
    # measured: ~10 s to start the head, ~3 s for a refused submission, ~3-4 min for the job on a busy 2-core
    # machine (4 Ray Train runs + a stats actor; the time is almost all process start-up and torch imports)
    print(f"\njob submission timings: {timings}")
