"""End to end: ``python -m agents.train`` / ``python -m agents.evaluate`` as real subprocesses.

Tiny model, tiny sizes: the runs finish, write their reports, change every trainable parameter,
resume exactly after ``kill -9``, and train on an env that a plugin registers by entry point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.generation.models import load_policy_model
from agents.run.metrics import read_metrics
from tests.conftest import REPO_ROOT
from tests.envs.plugin_fixture import write_plugin

TINY = [
    "model=tiny",
    "trainer.iterations=2",
    "rollout.num_groups=2",
    "rollout.group_size=2",
    "rollout.max_turns=2",
    "rollout.max_new_tokens=24",
    "trainer.mini_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.eval_every=1",
    "trainer.eval_episodes=6",
    "trainer.eval_max_turns=2",  # whole games at test size (the env limit is 50)
    "trainer.lr=1e-3",
    # one evaluation stage and no baselines or evaluation before training: each run stays short
    # (tests/e2e/test_curriculum_cli.py covers those)
    "curriculum.eval_stages=[full]",
    "trainer.eval_before=false",
    "trainer.eval_baselines=false",
]
# The tiny random model rarely wins an ALFWorld game or solves a math problem, so rewards (and
# advantages) are mostly zero there; a small entropy bonus makes the update reach every parameter.
ENTROPY = "algorithm.entropy_coef=0.01"


def _env(cache: Path, extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + ([str(extra_path)] if extra_path else [])
    env.update(
        OMP_NUM_THREADS="1",
        HOLDERPO_CACHE=str(cache),
        PYTHONPATH=os.pathsep.join(paths + [env.get("PYTHONPATH", "")]),
        HYDRA_FULL_ERROR="1",
    )
    return env


def _call(
    module: str, args: list[str], env: dict[str, str], timeout: int = 420
) -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` from the repository root; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run(module: str, args: list[str], env: dict[str, str], timeout: int = 420) -> str:
    proc = _call(module, args, env, timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _assert_all_parameters_changed(run_dir: Path, cache: Path) -> None:
    initial, _ = load_policy_model("tiny", device="cpu", cache_dir=cache)
    final = load_file(run_dir / "ckpt-000002" / "model.safetensors")
    unchanged = [
        name
        for name, param in initial.named_parameters()
        if param.requires_grad and torch.equal(param.detach(), final[name])
    ]
    assert not unchanged, f"parameters not updated by training: {unchanged}"


@pytest.mark.parametrize(("env_name", "subtask"), [("alfworld", "pick"), ("math", "embedded")])
def test_train_finishes_reports_and_updates_every_parameter(
    cache: Path, tmp_path: Path, env_name: str, subtask: str
) -> None:
    run_dir = tmp_path / "run"
    out = _run(
        "agents.train", [f"env={env_name}", *TINY, ENTROPY, f"run_dir={run_dir}"], _env(cache)
    )
    assert "iter 2/2" in out  # the one-line summary per iteration
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("rollout/reward_mean", "adv/mean", "loss/total", "holder/p", "time/learn_s"):
        assert key in rows[0]
    assert rows[0]["holder/p"] == 2.0 and rows[1]["holder/p"] == -1.0  # +2 -> -1 over the run
    report = json.loads((run_dir / "eval" / "iter-000002.json").read_text())
    names = [s["name"] for s in report["scores"]]
    assert subtask in names and report["overall"]["episodes"] == 6
    valid = report["overall"]["valid_rate"]  # share of valid steps (math: a parsable answer)
    assert 0.0 <= valid <= 1.0 and rows[1]["eval/valid/overall"] == valid
    assert (run_dir / "eval" / "iter-000002.md").read_text().startswith("### ")
    png = run_dir / "eval" / "success_over_training.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "tensorboard").iterdir())
    assert json.loads((run_dir / "run_config.json").read_text())["env"]["name"] == env_name
    _assert_all_parameters_changed(run_dir, cache)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


def test_resume_after_kill_reproduces_the_uninterrupted_run(cache: Path, tmp_path: Path) -> None:
    args = ["env=alfworld", *TINY, "trainer.iterations=4", "trainer.eval_every=0", ENTROPY]
    args.append("trainer.save_every=1")  # a checkpoint after every iteration to resume from
    env = _env(cache)
    straight = tmp_path / "straight"
    _run("agents.train", [*args, f"run_dir={straight}"], env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.train", *args, f"run_dir={killed}"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / "ckpt-000001").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "ckpt-000004").exists()
    _run("agents.train", [*args, f"run_dir={killed}", "resume=true"], env)

    expected = _comparable(read_metrics(straight / "metrics.jsonl"))
    got = _comparable(read_metrics(killed / "metrics.jsonl"))
    assert [r["iteration"] for r in got] == [0, 1, 2, 3]
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        for key in e:
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), (g["iteration"], key)
    final_straight = load_file(straight / "ckpt-000004" / "model.safetensors")
    final_killed = load_file(killed / "ckpt-000004" / "model.safetensors")
    for name, value in final_straight.items():
        torch.testing.assert_close(final_killed[name], value)


def test_plugin_env_trains_by_name(cache: Path, tmp_path: Path) -> None:
    plugin = write_plugin(tmp_path / "plugin", env_name="echo_e2e")
    run_dir = tmp_path / "run"
    args = [
        "env=echo_e2e",
        *TINY,
        "rollout.group_size=4",
        "protocol=grpo",
        "algorithm=grpo",
        f"run_dir={run_dir}",
    ]
    _run("agents.train", args, _env(cache, plugin.root))
    rows = read_metrics(run_dir / "metrics.jsonl")
    # constrained decoding picks one of the four words: some rollouts win, some lose
    assert any(r["adv/std"] > 0 for r in rows), rows
    assert all(r["rollout/invalid_action_rate"] == 0.0 for r in rows)
    report = json.loads((run_dir / "eval" / "iter-000002.json").read_text())
    assert [s["name"] for s in report["scores"]] == ["echo"]


def test_evaluate_cli_expert_baseline_wins_the_embedded_games(cache: Path, tmp_path: Path) -> None:
    out = _run(
        "agents.evaluate",
        ["env=alfworld", "policy=expert", f"run_dir={tmp_path}"],
        _env(cache),
    )
    report = json.loads((tmp_path / "eval" / "expert-embedded_heldout.json").read_text())
    assert report["overall"]["successes"] == report["overall"]["episodes"] > 0
    assert {s["name"] for s in report["scores"] if s["episodes"]} == {
        "pick",
        "look",
        "clean",
        "heat",
        "cool",
        "pick_two",
    }
    assert "| overall |" in out


def test_bad_config_fails_before_any_work_and_names_the_fix(cache: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agents.train",
            "env=alfworld",
            "model=tiny",
            "trainer.micro_batch_size=3",
            f"run_dir={tmp_path / 'run'}",
        ],
        cwd=REPO_ROOT,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "multiple of trainer.micro_batch_size" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_evaluate_cli_reports_each_math_benchmark(
    cache: Path, tmp_path: Path, shared_data: Path
) -> None:
    env = dict(_env(cache), HOLDERPO_MATH_DATA=str(shared_data / "math"))
    _run(
        "agents.evaluate",
        ["env=math", "split=[aime24,amc]", "policy=expert", "episodes=5", f"run_dir={tmp_path}"],
        env,
    )
    report = json.loads((tmp_path / "eval" / "expert-aime24-amc.json").read_text())
    scores = {s["name"]: (s["successes"], s["episodes"]) for s in report["scores"]}
    assert scores == {"aime24": (5, 5), "amc": (5, 5)}  # the gold answers verify
