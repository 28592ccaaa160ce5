"""Per-subtask reports: counts, Wilson intervals, valid steps, Markdown, JSON, the PNG plot."""

from __future__ import annotations

import json
import math

import pytest

from agents.evaluation.report import (
    EpisodeResult,
    load_episodes,
    load_report,
    plot_history,
    summarise,
    wilson_interval,
    write_episodes,
    write_report,
)
from envs.alfworld.env import SUBTASKS as ALFWORLD_SUBTASKS


def test_wilson_interval_matches_the_closed_form() -> None:
    # 8 of 10: centre (0.8 + z²/20)/(1 + z²/10), half-width z·sqrt(0.016 + z²/400)/(1 + z²/10)
    z = 1.959964
    low, high = wilson_interval(8, 10)
    denom = 1 + z * z / 10
    centre = (0.8 + z * z / 20) / denom
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / denom
    assert low == pytest.approx(centre - half)
    assert high == pytest.approx(centre + half)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def _results() -> list[EpisodeResult]:
    return [
        EpisodeResult("pick", True, 5, 10.0),
        EpisodeResult("pick", False, 50, 0.0),
        EpisodeResult("heat", True, 12, 10.0),
        EpisodeResult("pick_two", True, 20, 10.0),
    ]


def test_summary_lists_all_six_subtasks_in_order_with_counts() -> None:
    report = summarise(_results(), subtasks=ALFWORLD_SUBTASKS, label="expert")
    assert [s.name for s in report.scores] == list(ALFWORLD_SUBTASKS)
    by_name = {s.name: s for s in report.scores}
    assert (by_name["pick"].successes, by_name["pick"].episodes) == (1, 2)
    assert by_name["look"].episodes == 0 and by_name["look"].rate == 0.0
    assert report.overall.successes == 3 and report.overall.episodes == 4
    assert report.overall.mean_steps == pytest.approx(87 / 4)
    md = report.to_markdown()
    assert "| pick two | 1 / 1 | 100.0% |" in md
    assert "| overall | 3 / 4 | 75.0% |" in md
    assert report.metrics()["eval/success/overall"] == 0.75
    # results that do not record validity show no rate and no eval/valid metric
    assert report.overall.valid_rate is None and "| 21.8 | – |" in md
    assert not [k for k in report.metrics() if k.startswith("eval/valid/")]


def test_valid_rate_is_the_share_of_valid_steps_per_subtask() -> None:
    results = [
        EpisodeResult("pick", True, 4, 10.0, valid_steps=4),
        EpisodeResult("pick", False, 6, 0.0, valid_steps=3),  # pick: 7 of 10 steps
        EpisodeResult("heat", False, 2, 0.0, valid_steps=0),
        EpisodeResult("heat", False, 3, 0.0),  # not recorded: left out of the rate
        EpisodeResult("cool", False, 0, 0.0, valid_steps=0),  # no step: no rate
    ]
    report = summarise(results, subtasks=ALFWORLD_SUBTASKS)
    by_name = {s.name: s for s in report.scores}
    assert by_name["pick"].valid_rate == pytest.approx(0.7)
    assert by_name["heat"].valid_rate == 0.0
    assert by_name["cool"].valid_rate is None and by_name["look"].valid_rate is None
    assert report.overall.valid_rate == pytest.approx(7 / 12)
    md = report.to_markdown()
    assert md.splitlines()[0].endswith("| mean steps | valid steps |")
    assert "| pick | 1 / 2 | 50.0% |" in md and md.count("| 70.0% |") == 1
    assert "| overall | 1 / 5 | 20.0% |" in md and "| 58.3% |" in md
    metrics = report.metrics("eval/k1")
    assert metrics["eval/k1/valid/pick"] == pytest.approx(0.7)
    assert metrics["eval/k1/valid/heat"] == 0.0
    assert metrics["eval/k1/valid/overall"] == pytest.approx(7 / 12)
    assert "eval/k1/valid/cool" not in metrics and "eval/k1/valid/look" not in metrics


def test_json_round_trip_and_plot(tmp_path) -> None:
    reports = []
    for it, extra in enumerate([False, True], start=1):
        results = _results() + [EpisodeResult("cool", extra, 3, 0.0, valid_steps=2)]
        report = summarise(results, subtasks=ALFWORLD_SUBTASKS, iteration=it)
        json_path, _ = write_report(report, tmp_path, f"iter-{it:06d}")
        assert load_report(json_path) == report
        assert json.loads(json_path.read_text())["overall"]["valid_rate"] == pytest.approx(2 / 3)
        reports.append(report)
    png = plot_history(reports, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_report_written_before_valid_rates_still_loads(tmp_path) -> None:
    report = summarise(_results(), subtasks=ALFWORLD_SUBTASKS)
    raw = json.loads(report.to_json())
    for s in [*raw["scores"], raw["overall"]]:
        del s["valid_rate"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    assert load_report(tmp_path / "old.json") == report


def test_episode_log_round_trips_one_json_line_per_episode(tmp_path) -> None:
    results = [
        EpisodeResult("pick", True, 2, 10.0, valid_steps=2, seed=7, game="g7",
                      actions=("go to desk 1", "move cd 1 to desk 1")),
        EpisodeResult("look", False, 1, 0.0, valid_steps=0, seed=3, game="g3",
                      actions=('say "hi"\nthen',)),
    ]  # fmt: skip
    path = write_episodes(results, tmp_path / "eval", "iter-000001")
    assert path.name == "iter-000001.episodes.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["actions"] == [
        "go to desk 1",
        "move cd 1 to desk 1",
    ]
    assert load_episodes(path) == results
