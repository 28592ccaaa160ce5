"""TextWorld learning on a CPU: held-out success before and after one run, beside baselines.

Run: ``python -m bench.textworld_learning`` (``--docs`` writes ``docs/results_textworld.md``;
``--quick`` runs the tiny model for two iterations, a smoke test). The run is
``python -m agents.train env=textworld experiment=textworld_cooking_cpu`` (SmolLM2-135M-Instruct
from its released weights; a run folder that already holds its final report is read, not run
again). Held-out success comes from the run's own reports (``eval/stage-k*/iter-*.json`` and
``eval/iter-*.json``: greedy, every held-out game once, at each stage's turn budget), the random
and single-verb baselines from its ``eval/baselines/``. Before that, the expert (each game's
walkthrough, ``info["expert_plan"]``) plays every training and held-out game of the setting: the
reverse curriculum and the baselines assume it wins them all.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from agents.evaluation.baselines import ExpertActor
from agents.evaluation.episodes import run_episodes
from agents.evaluation.report import Report, load_report
from agents.rollout.env_pool import EnvFactory, SerialEnvPool
from bench.whole_games import split, train

RUN = ["env=textworld", "experiment=textworld_cooking_cpu"]
QUICK = [
    "model=tiny",
    "trainer.iterations=2",
    "trainer.eval_episodes=4",
    "env.eval_kwargs.num_games=2",
    "env.kwargs.num_games=2",
    "rollout.max_new_tokens=24",
]
"""``--quick``: the run at the tiny model's sizes (a smoke test of the pipeline, no learning)."""
BASELINES = ("random", "verb_rule")
SPLIT_KEYS = ("generation", "env", "learner", "evaluation and start-up", "wall")
"""The parts of :func:`bench.whole_games.split` a run without a warm start has."""


def run_kwargs(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training and evaluation env kwargs the run used (from its ``run_config.json``)."""
    env = json.loads((run_dir / "run_config.json").read_text())["env"]
    return dict(env["kwargs"]), {**env["kwargs"], **env["eval_kwargs"]}


def expert_wins(kwargs: dict[str, Any]) -> tuple[int, int]:
    """(games the expert wins, games) over every task of the env built with ``kwargs``, played
    as ``agents.evaluate policy=expert`` plays them (:class:`ExpertActor`, :func:`run_episodes`)."""
    factory = EnvFactory("textworld", kwargs)
    with closing(factory()) as env:
        games, turns = env.unwrapped.num_tasks, env.unwrapped.max_steps  # one per (level, seed)
    pool = SerialEnvPool(factory, 1)
    try:
        results = run_episodes(ExpertActor(), pool, range(games), max_turns=turns)
    finally:
        pool.close()
    return sum(r.success for r in results), games


def stages(run_dir: Path) -> Iterator[tuple[str, Path]]:
    """(stage name, its report folder): ``k1``.. from ``eval/stage-k*``, then ``full``."""
    for folder in sorted((run_dir / "eval").glob("stage-k*")):
        yield folder.name.removeprefix("stage-"), folder
    yield "full", run_dir / "eval"


def cells(report: Report) -> dict[str, str]:
    return {s.name: f"{100 * s.rate:.0f}%" for s in (*report.scores, report.overall)}


def table(run_dir: Path) -> str:
    """Per stage and subtask: the model before and after training, and the baselines."""
    rows, subtasks = [], None
    for stage, folder in stages(run_dir):
        history = sorted(folder.glob("iter-*.json"))
        first, last = load_report(history[0]), load_report(history[-1])
        subtasks = subtasks or [s.name for s in first.scores]
        columns = {
            f"model, iteration {first.iteration}": first,
            f"model, iteration {last.iteration}": last,
        }
        for name in BASELINES:
            path = run_dir / "eval" / "baselines" / f"{name}-{stage}.json"
            if path.is_file():
                columns[name.replace("_", " ")] = load_report(path)
        for label, report in columns.items():
            c = cells(report)
            rows.append([stage, label, *(c[s] for s in [*subtasks, "overall"])])
    head = ["stage", "policy", *(subtasks or []), "overall"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def page(
    run_dir: Path,
    kwargs: dict[str, Any],
    eval_kwargs: dict[str, Any],
    experts: dict[str, tuple[int, int]],
    command: str,
) -> str:
    """The results page: the setting (the run's env kwargs), the expert's wins, the table."""
    times = split(run_dir)
    expert = "; ".join(f"{split_}: {w} of {n}" for split_, (w, n) in experts.items())
    parts = [
        "# TextWorld on a CPU: one learning run\n",
        f"Written by `{command}`. The run: `python -m agents.train {' '.join(RUN)}` "
        f"(challenge `{kwargs['challenge']}`, levels {kwargs['levels']}, "
        f"{eval_kwargs['num_games']} held-out games per level). Held-out success, greedy, every "
        "held-out game once, before training (iteration 0) and after the last iteration, at each "
        "stage's turn budget (stage k: the last k commands of the walkthrough; full: the whole "
        "game), beside random admissible commands and the best single-verb rule on the same "
        "games. The run's own side-by-side tables are `eval/stages-iter-*.md` in its folder.\n",
        f"The expert (each game's walkthrough) wins {expert} games.\n",
        table(run_dir),
        "\nWhere the time went (seconds): "
        + ", ".join(f"{k} {v:.0f}" for k, v in times.items() if k in SPLIT_KEYS)
        + f"; {times['iterations']:.0f} of {times['of']:.0f} iterations.\n",
    ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/textworld_learning"))
    parser.add_argument("--docs", action="store_true", help="write docs/results_textworld.md")
    parser.add_argument("--quick", action="store_true", help="tiny model, two short iterations")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    args = parser.parse_args()
    run_dir = args.out / ("quick" if args.quick else "run")
    overrides = [*RUN, *(QUICK if args.quick else []), *args.override]
    train(run_dir, overrides, 0, before=True, recipe=False)
    kwargs, eval_kwargs = run_kwargs(run_dir)
    experts = {"training": expert_wins(kwargs), "held-out": expert_wins(eval_kwargs)}
    command = "python -m bench.textworld_learning" + (" --docs" if args.docs else "")
    text = page(run_dir, kwargs, eval_kwargs, experts, command)
    (args.out / "results.md").write_text(text)
    print(text)
    if args.docs and not args.quick:
        Path("docs/results_textworld.md").write_text(text)


if __name__ == "__main__":
    main()
