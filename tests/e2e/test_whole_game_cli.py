"""End to end: the whole-game recipe (``experiment=alfworld_whole_cpu``) on the tiny model.

A warm start clones the searching expert on every training game, the guided rollout falls to none
in the last quarter of the iterations, and the evaluations play whole games with their own turn
budget, printed in each report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.run.metrics import read_metrics
from agents.train import WARM_START_FILE
from bench.whole_games import QUICK
from tests.e2e.test_train_cli import _env, _run

SMALL = [
    "experiment=alfworld_whole_cpu",
    *QUICK,
    "trainer.eval_before=false",
    "trainer.eval_baselines=false",
    "trainer.export=false",
]


def test_the_whole_game_recipe_warm_starts_anneals_guidance_and_reports_its_budget(
    cache: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    _run("agents.train", [*SMALL, f"run_dir={run_dir}"], _env(cache))
    warm = json.loads((run_dir / WARM_START_FILE).read_text())
    # every one of the 60 training games demonstrated to a win, each step cloned
    assert warm["bc/demonstrations"] == warm["bc/tasks"] == 60
    assert warm["bc/rows"] >= 60 * 5 and warm["bc/optimizer_steps"] >= 1
    rows = read_metrics(run_dir / "metrics.jsonl")
    # guided = 1 annealed over 3/4 of the 4 iterations: none in the last quarter
    assert [r["rollout/guided"] for r in rows] == [1.0, 1.0, 1.0, 0.0]
    for it in (2, 4):
        report = json.loads((run_dir / "eval" / f"iter-{it:06d}.json").read_text())
        assert report["turn_budget"] == 3 and report["overall"]["episodes"] == 6
        md = (run_dir / "eval" / f"iter-{it:06d}.md").read_text()
        assert "turn budget 3 · mean steps" in md
    assert not (run_dir / "eval" / "stage-k1").exists()  # whole games only


@pytest.mark.slow
def test_the_lever_benchmark_runs_each_variant_and_writes_its_page(
    cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    args = ["--quick", "--seeds", "1", "--variants", "recipe,no warm start", "--out", str(out)]
    _run("bench.whole_games", args, _env(cache), timeout=900)
    page = (out / "results_whole_games.md").read_text()
    assert "| recipe | 1 |" in page and "| no warm start | 1 |" in page
    assert "| random baseline |" in page and "| verb rule baseline |" in page
    assert "| variant | it 0 | it 2 | it 4 |" in page  # points between the curve's ends
    assert "at iteration 4, the last every run reached (of 4)" in page  # runs compared alike
    assert (out / "results_whole_games_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "no_warm_start-seed0" / "warm_start.json").exists()
    # iteration 0 is evaluated once and shared; the other run trains with no evaluation before
    first, shared = (
        out / r / "eval" / "iter-000000.json" for r in ("recipe-seed0", "no_warm_start-seed0")
    )  # noqa: E501
    assert first.read_text() == shared.read_text()
    timing = [line for line in page.splitlines() if line.startswith("| recipe | ") and "|" in line]
    assert len(timing) >= 2  # the results row and the time row
