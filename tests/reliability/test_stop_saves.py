"""A run that env workers stop keeps what it learned: the iterations since the last save.

When every env of a reset fails on ``rollout.worker_attempts`` fresh Ray actors in a row, nothing is
left to roll out and the run stops (``EnvWorkerError``). It used to stop without saving, losing
every iteration since the last checkpoint (the default saves every 5). Now the iterations done so
far are checkpointed first and the error says that ``resume=true`` continues from there. The env
is a real plugin whose reset kills its own process once a shared counter passes a limit (a game
that crashes its planner, a node that is gone); the actors are real Ray actors; both runs are the
real ``python -m agents.train`` CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.generation.models import load_policy_model
from tests.e2e.test_train_cli import TINY, _call, _env, _run
from tests.envs.plugin_fixture import write_plugin

pytestmark = pytest.mark.slow

CRASHING = '''

import os
from pathlib import Path


class CrashingEcho(EchoEnv):
    """The echo env, whose reset kills its process once ``counter`` holds ``resets_ok`` marks
    (every reset adds one while the file exists; no file, no crash)."""

    def __init__(self, counter="", resets_ok=0, max_steps=1):
        super().__init__(max_steps=max_steps)
        self.counter, self.resets_ok = Path(counter), int(resets_ok)

    def reset(self, *, seed=None, options=None):
        if self.counter.is_file():
            if len(self.counter.read_text()) >= self.resets_ok:
                os._exit(1)
            with self.counter.open("a") as f:
                f.write("x")
        return super().reset(seed=seed, options=options)
'''


def test_a_run_stopped_by_its_env_workers_saves_its_iterations_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    cache = tmp_path / "model-cache"
    load_policy_model("tiny", device="cpu", cache_dir=cache)
    plugin = write_plugin(tmp_path / "plugin", env_name="echo_crash")
    module = plugin.root / plugin.package / "__init__.py"
    module.write_text(module.read_text() + CRASHING)
    entry_points = (
        plugin.root / f"{plugin.dist.replace('-', '_')}-0.1.dist-info" / "entry_points.txt"
    )
    entry_points.write_text(entry_points.read_text().replace(":EchoEnv", ":CrashingEcho"))
    counter, run_dir = tmp_path / "resets", tmp_path / "run"
    counter.write_text("")  # armed: the 4 resets of iteration 1 pass, then every reset crashes
    args = [
        "env=echo_crash",
        *TINY,
        "trainer.iterations=3",
        "trainer.save_every=0",  # no checkpoint before the last iteration: all would be lost
        "trainer.eval_every=0",
        "trainer.eval_before=false",
        "trainer.eval_baselines=false",
        "trainer.export=false",
        "protocol=grpo",
        "rollout.pool=ray",
        "rollout.num_workers=1",
        "rollout.worker_attempts=1",
        f"+env.kwargs.counter={counter}",
        "+env.kwargs.resets_ok=4",  # rollout.num_groups=2 x group_size=2
        f"run_dir={run_dir}",
    ]
    env = _env(cache, plugin.root)
    stopped = _call("agents.train", args, env, timeout=600)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and "EnvWorkerError" in out, out[-3000:]
    assert "iteration 1 was checkpointed before stopping; resume=true continues there" in out
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-000001"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1

    counter.unlink()  # the env is mended
    _run("agents.train", [*args, "resume=true"], env, timeout=600)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # iteration 1 once, not trained again
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == ["ckpt-000001", "ckpt-000003"]
