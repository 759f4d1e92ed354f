"""The statistics stage on a multi-node Ray cluster (``ray.cluster_utils.Cluster`` on this machine).

A head and two worker nodes (1 CPU each, bound to 127.0.0.1) run the actor pool; the moments
must equal the single-actor result bit-for-bit when the units run on several nodes and when a
node is removed mid-run (its actor's unit is re-run on a surviving node).

A process holds one Ray connection and the other test modules share the session's embedded
Ray (``ray_session``), so the cluster lives in a child process: this file run as a script.
The child gets its own ``RAY_TMPDIR`` so that the cluster's address file never reaches other
Ray programs on the machine (a bare ``ray.init()`` connects to the last cluster recorded there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

BATCH, BLOCK = 64, 128
RUNS = ("single", "spread", "removed")


# ----------------------------------------------------------------------------- the child process
def _recording_worker(base: type, log_dir: Path, expected_actors: int, name: str):
    """A StatsWorker that logs (node, blocks) per unit and waits until ``expected_actors`` are up.

    The wait makes every actor of the pool join before the first unit finishes, so that the
    dynamic hand-out really spreads the (tiny) digits units over all nodes.
    """
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._log = Path(log_dir)
        (self._log / f"ready-{uuid.uuid4().hex}").touch()

    def compute(self, blocks):
        deadline = time.monotonic() + 300
        while len(list(self._log.glob("ready-*"))) < expected_actors and time.monotonic() < deadline:
            time.sleep(0.05)
        out = base.compute(self, blocks)
        record = {"node": self.node_id(), "blocks": [b for b, _, _ in blocks]}
        (self._log / f"unit-{uuid.uuid4().hex}.json").write_text(json.dumps(record))
        return out

    return type(name, (base,), {"__init__": __init__, "compute": compute})


def _child(data: str, teacher: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import unidd_ray.stages.stats as stage
    from unidd_ray.config import StatsConfig
    from unidd_ray.runtime.cluster import SETUP_HOOK

    out_dir = Path(out)
    local = dict(node_ip_address="127.0.0.1", num_cpus=1, object_store_memory=100 * 1024 ** 2)
    cluster = Cluster(initialize_head=True, head_node_args=dict(local, include_dashboard=False))
    workers = [cluster.add_node(**local) for _ in range(2)]
    cluster.wait_for_nodes()
    # the driver must look for its raylet on 127.0.0.1 too (else it waits for one on the host's address)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1",
             runtime_env={"worker_process_setup_hook": SETUP_HOOK}, logging_level="WARNING")
    original = stage.StatsWorker
    report: dict = {"nodes": {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]}}
    try:
        for run, actors in zip(RUNS, (1, 3, 3)):
            log = out_dir / f"log-{run}"
            log.mkdir()
            stage.StatsWorker = _recording_worker(original, log, actors, f"StatsWorker_{run}")
            removed = []

            def remove_node(unit, pool, run=run, removed=removed):
                if run == "removed" and not removed:
                    removed.append(workers[1].node_id)
                    cluster.remove_node(workers[1])

            cfg = StatsConfig(actors=actors, batch_size=BATCH, block_size=BLOCK, blocks_per_unit=1, max_retries=3)
            t0 = time.perf_counter()
            res = stage.compute_stats(teacher, data, cfg, progress=False, on_result=remove_node)
            units = [json.loads(p.read_text()) for p in log.glob("unit-*.json")]
            torch.save({name: m.state_dict() for name, m in res.moments.items()}, out_dir / f"{run}.pt")
            report[run] = {"seconds": time.perf_counter() - t0, "retried_units": res.retried_units,
                           "units": len(res.plan.units), "log": units, "removed": removed}
    finally:
        stage.StatsWorker = original
        ray.shutdown()
        cluster.shutdown()
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def cluster_runs(digits_data, digits_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats_cluster")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"
    # Ray resolves "127.0.0.1" to the host's outward address unless this is off; with it off the
    # driver (and every node) uses the loopback address, where the cluster's GCS listens
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    with tempfile.TemporaryDirectory(prefix="rc", dir="/tmp") as ray_tmp:  # short: Unix socket paths
        env["RAY_TMPDIR"] = ray_tmp
        proc = subprocess.run([sys.executable, __file__, str(digits_data), str(digits_teacher), str(out)], env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    from unidd_ray.spectral import Moments

    moments = {run: {name: Moments.from_state_dict(state)
                     for name, state in torch.load(out / f"{run}.pt", weights_only=True).items()} for run in RUNS}
    return json.loads((out / "report.json").read_text()), moments


def _assert_identical(a, b):
    from unidd_ray.spectral import Moments

    assert list(a) == list(b)
    for name in a:
        for f in Moments._FIELDS:
            assert torch.equal(getattr(a[name], f), getattr(b[name], f)), (name, f)


@pytest.mark.slow
def test_units_on_several_nodes_equal_single_actor(cluster_runs):
    report, moments = cluster_runs
    single, spread = report["single"], report["spread"]
    assert single["retried_units"] == spread["retried_units"] == 0
    # every unit ran exactly once, on more than one node
    for run in (single, spread):
        assert sorted(b for u in run["log"] for b in u["blocks"]) == list(range(run["units"]))
    nodes = {u["node"] for u in spread["log"]}
    assert len(nodes) >= 2, spread["log"]
    assert nodes <= {report["nodes"]["head"], *report["nodes"]["workers"]}
    _assert_identical(moments["spread"], moments["single"])
    assert moments["single"]["features.0"].images == 1438


@pytest.mark.slow
def test_node_removed_mid_run_equals_single_actor(cluster_runs):
    report, moments = cluster_runs
    run = report["removed"]
    gone = report["nodes"]["workers"][1]
    assert run["removed"] == [gone]
    # the removed node's actor lost its unit (or the next one handed to it): those were re-run elsewhere
    assert run["retried_units"] >= 1
    finished = sorted(b for u in run["log"] for b in u["blocks"])
    assert set(finished) == set(range(run["units"]))
    _assert_identical(moments["removed"], moments["single"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import faulthandler

    faulthandler.dump_traceback_later(540, exit=True)  # a hang shows where, before the test's timeout
    _child(*sys.argv[1:4])
