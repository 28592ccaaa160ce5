"""``python -m agents.train`` on TextWorld and the TextArena and skyrl-gym adapters (tiny model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.e2e.test_train_cli import TINY, _env, _run

CASES = {
    "textworld": (
        "textworld",
        "pip install '.[textworld]'",
        [
            "env.kwargs.num_games=2",
            "env.eval_kwargs.num_games=2",
            "curriculum.eval_stages=[1,full]",
        ],
    ),
    "textarena": ("textarena", "pip install '.[textarena]'", ["rollout.max_turns=3"]),
    "skyrl": ("skyrl_gym", "pip install '.[skyrl]'", ["env.eval_kwargs.num_problems=6"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_two_iterations_and_reports_per_subtask(
    name: str,
    cache: Path,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    module, install, extra = CASES[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"env {name!r} needs the {module} package: {install}")
    run_dir = tmp_path / "run"
    args = [f"env={name}", *TINY, *extra, "trainer.export=false", f"run_dir={run_dir}"]
    _run("agents.train", args, _env(cache))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["iteration"] for r in rows if "rollout/episodes" in r) == [0, 1]
    report = (run_dir / "eval" / "iter-000002.md").read_text()
    assert "| overall |" in report
