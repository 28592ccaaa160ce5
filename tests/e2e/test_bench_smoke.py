"""The benchmarks' quick modes run end to end through the real CLI (tiny model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.learning_curve import write_docs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_learning_curve_quick_writes_the_table_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "lc"
    cmd = [sys.executable, "-m", "bench.learning_curve", "--quick", "--algorithms",
           "holderpo,grpo", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "| holderpo | 1 |" in table and "| grpo | 1 |" in table
    assert (out / "learning_curve.png").stat().st_size > 0
    assert (out / "diagnostics.png").stat().st_size > 0
    # the first run evaluated before training (iteration 0), the others reuse its greedy reports;
    # every run evaluated after its one iteration
    for run in ("holderpo-seed0", "grpo-seed0"):
        reports = sorted((out / run / "eval" / "stage-k1").glob("iter-*.json"))
        assert [p.name for p in reports] == ["iter-000000.json", "iter-000001.json"]
    first, reused = (
        out / r / "eval" / "stage-k1" / "iter-000000.json" for r in ("holderpo-seed0", "grpo-seed0")
    )
    assert reused.read_text() == first.read_text()
    assert "Final held-out success per stage" in table and table.count("| holderpo | ") == 2
    assert "at most one optimizer step" in table  # quick mode: one update per batch
    # a re-run trains nothing again (each run's last evaluation is there) and rewrites the table
    runs = ("holderpo-seed0", "grpo-seed0")
    metrics = [(out / r / "metrics.jsonl").read_bytes() for r in runs]
    (out / "results.md").unlink()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "results.md").read_text() == table
    assert [(out / r / "metrics.jsonl").read_bytes() for r in runs] == metrics
    # --docs NAME: the page and both plots under that stem, the page linking to them
    docs = tmp_path / "docs"
    docs.mkdir()
    write_docs(out, docs, "results_study", table)
    page = (docs / "results_study.md").read_text()
    assert table in page
    for name in ("learning_curve", "diagnostics"):
        plot = docs / f"results_study_{name}.png"
        assert plot.read_bytes() == (out / f"{name}.png").read_bytes()
        assert f"]({plot.name})" in page


@pytest.mark.parametrize("name", ["../results", "results.md", "a b"])
def test_learning_curve_rejects_a_docs_name_that_is_not_a_stem(tmp_path: Path, name: str) -> None:
    cmd = [sys.executable, "-m", "bench.learning_curve", "--quick", "--docs", name, "--out",
           str(tmp_path / "lc")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--docs" in done.stderr and "plain file stem" in done.stderr
    assert not (tmp_path / "lc").exists()  # refused before any run


def test_logprob_memory_writes_both_paths_with_their_ratios(tmp_path: Path) -> None:
    table = tmp_path / "logprob_memory.md"
    cmd = [sys.executable, "-m", "bench.logprob_memory", "--vocab", "4096", "--hidden", "32",
           "--prompt", "16", "--response", "64", "--chunk-tokens", "32", "--entropy",
           "--masks", "dense", "--markdown", str(table)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "chunks of 32" in done.stdout
    text = table.read_text()
    assert text.startswith("<!-- written by bench/logprob_memory.py")
    rows = [line for line in text.splitlines() if line.startswith(("| dense", "| ragged"))]
    paths = [r.split(" | ")[:2] for r in rows]
    assert paths == [["| dense", "unchunked"], ["| dense", "chunks of 32"]]
    assert "x)" not in rows[0] and rows[1].count("x)") == 3  # saved, peak and time ratios


@pytest.mark.slow
def test_textworld_learning_quick_reads_the_runs_reports_and_plays_the_expert(
    tmp_path: Path,
) -> None:
    pytest.importorskip("textworld")
    out = tmp_path / "tw"
    cmd = [sys.executable, "-m", "bench.textworld_learning", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (out / "results.md").read_text()
    assert "wins training: 4 of 4; held-out: 4 of 4 games" in page  # 2 levels x 2 games each
    rows = [line for line in page.splitlines() if line.startswith(("| k", "| full"))]
    policies = ["model, iteration 0", "model, iteration 2", "random", "verb rule"]
    assert [r.split(" | ")[1] for r in rows] == policies * 4  # k1..k3 and the whole game
    assert all(r.count("%") == 3 for r in rows)  # cooking-1, cooking-2, overall
