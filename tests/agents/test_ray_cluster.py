"""RayEnvPool on a two-node Ray cluster simulated on this machine (a head and a worker raylet).

The cluster runs in a subprocess of its own, so it neither meets nor disturbs the Ray session that
the other Ray tests of the run share (tests/agents/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MARK = "CLUSTER-RESULT "


def cluster_body() -> dict[str, Any]:
    """Start a head and a worker node, join with ``address="auto"``, step math envs on both."""
    import ray
    from ray.cluster_utils import Cluster

    from agents.rollout.env_pool import EnvFactory, RayEnvPool, init_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address  # what "auto" resolves to on a real node
        init_ray("auto")
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        # tiny reservations: all four actors fit on the head node (Ray's default packs them
        # there), so only SPREAD puts them on both nodes
        pool = RayEnvPool(
            EnvFactory("math", {}), 4, envs_per_actor=1, num_cpus_per_actor=0.01, spread=True
        )
        actor_nodes = ray.get(
            [
                a.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
                for a in pool.actors
            ]
        )
        first = pool.reset(list(range(4)), [0, 1, 2, 3])
        steps = pool.step(list(range(4)), ["The answer is \\boxed{0}."] * 4)
        pool.close()
        return {
            "nodes": nodes,
            "actor_nodes": sorted(actor_nodes),
            "observations": [obs for obs, _ in first],
            "subtasks": [info.get("subtask") for _, info in first],
            "terminated": [s.terminated for s in steps],
            "rewards": [s.reward for s in steps],
            "extracted": [s.info.get("extracted") for s in steps],
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def _run_in_subprocess() -> dict[str, Any]:
    code = (
        "import json; from tests.agents.test_ray_cluster import cluster_body, MARK; "
        "print(MARK + json.dumps(cluster_body()), flush=True)"
    )
    # a private Ray temp dir: the cluster's session files and address file stay out of /tmp/ray
    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    assert proc.returncode == 0 and lines, (
        f"cluster run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )
    return json.loads(lines[-1][len(MARK) :])


@pytest.fixture(scope="module")
def cluster_result() -> dict[str, Any]:
    pytest.importorskip("ray")
    return _run_in_subprocess()


def test_env_actors_spread_over_both_nodes(cluster_result: dict[str, Any]) -> None:
    assert len(cluster_result["nodes"]) == 2
    assert sorted(set(cluster_result["actor_nodes"])) == cluster_result["nodes"]


def test_math_envs_step_on_the_cluster(cluster_result: dict[str, Any]) -> None:
    observations = cluster_result["observations"]
    assert len(observations) == 4 and all(isinstance(o, str) and o for o in observations)
    assert len(set(observations)) > 1  # different seeds, different problems
    assert all(cluster_result["terminated"])  # the math env answers in one step
    assert all(r in (0.0, 1.0) for r in cluster_result["rewards"])
    assert cluster_result["extracted"] == ["0"] * 4
