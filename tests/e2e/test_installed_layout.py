"""The package as a user installs it (a wheel, not the source tree) finds its configs and data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import agents, configs, envs
    site = Path(sys.argv[1]).resolve()
    for module in (agents, configs, envs):
        assert Path(module.__file__).resolve().is_relative_to(site), module.__file__
    from hydra import compose, initialize_config_module
    with initialize_config_module(config_module="configs", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=holderpo_gigpo_alfworld"])
        assert cfg.env.name == "alfworld" and cfg.rollout.group_size == 8
        compose("evaluate", overrides=["policy=expert"])
    from agents.rollout.prompts import load_template
    for name in ("alfworld", "math", "text"):
        load_template(name)
    alf = envs.make("alfworld", split="embedded")
    assert alf.num_tasks >= 12, alf.num_tasks
    held = envs.make("alfworld", split="embedded_heldout")
    assert held.num_tasks == 30 and not set(held.games) & set(alf.games), held.num_tasks
    math_env = envs.make("math")
    assert math_env.num_tasks >= 32
    print("installed layout ok")
    """
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--target",
            str(target),
            str(REPO_ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return target


def test_wheel_ships_configs_prompts_and_embedded_data(site: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)],
        cwd=tmp_path,  # not the repo: imports must come from the installed copy
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "installed layout ok" in proc.stdout


def test_installed_cli_prints_its_composed_config(site: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "agents.train", "env=math", "algorithm=gspo", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "preset: gspo" in proc.stdout and "name: grpo" in proc.stdout
