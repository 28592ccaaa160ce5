"""What each lever of the whole-game recipe is worth, on whole held-out ALFWorld games.

Run: ``python -m bench.whole_games`` (``--seeds``, ``--variants``, ``--jobs``; ``--docs`` writes
``docs/results_whole_games.md`` and its plots). Each (variant, seed) is one
``python -m agents.train experiment=alfworld_whole_cpu <variant overrides> trainer.seed=<s>`` run;
the variants remove one lever each (:data:`VARIANTS`): the warm start, the guided rollouts,
GiGPO's step groups (``protocol=grpo``, episode-level advantages) and the annealed p (a constant
p = 1). ``--default`` adds the CPU default run (``env=alfworld``, the reverse curriculum) with and
without its guided rollout, read on its own stages. A variant's run folder that already holds its
final report is read, not run again. Held-out success is read from the runs' own reports
(``eval/iter-*.json``: 30 games, greedy, the whole-game turn budget each report states); the
random and single-verb baselines from the first run's ``eval/baselines/``. Evaluation before
training is the same for every run of the recipe (same weights, greedy): the first run evaluates
it and the others reuse its reports. Each run's wall time is measured here, and its split (warm
start, generation, env, learner, evaluation) is read from its metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean

from agents.evaluation.baselines import RULE_BASELINES
from agents.evaluation.report import Report, load_report
from bench.learning_curve import interval

RECIPE = "experiment=alfworld_whole_cpu"
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "no warm start": ["trainer.bc_epochs=0"],
    "no guidance": ["rollout.guided=0"],
    "RL at lr 5e-5": ["trainer.lr=5e-5"],  # the RL updates at the warm start's (the default's) rate
    "GRPO advantages": ["protocol=grpo"],
    "constant p = 1": [
        "algorithm.p_schedule.schedule=constant",
        "algorithm.p_schedule.p_start=1.0",
        "algorithm.p_schedule.p_end=1.0",
    ],
}
"""Variant name -> its overrides of the recipe (each removes one lever)."""
DEFAULT_RUNS: dict[str, list[str]] = {
    "default (guided 1 of 4)": ["env=alfworld"],
    "default, rollout.guided=0": ["env=alfworld", "rollout.guided=0"],
}
"""The CPU default run with and without its guided rollout (``--default``)."""
QUICK: list[str] = [
    "model=tiny",
    "trainer.iterations=4",
    "trainer.bc_epochs=1",
    "trainer.eval_every=2",
    "trainer.eval_episodes=6",
    "trainer.eval_max_turns=3",
    "trainer.mini_batch_size=4",
    "trainer.micro_batch_size=2",
    "rollout.num_groups=2",
    "rollout.group_size=2",
    "rollout.max_turns=3",
    "rollout.max_new_tokens=24",
    "algorithm.p_schedule.total_steps=3",
]
"""``--quick``: the recipe at the tiny model's sizes (a smoke test of the pipeline, no learning)."""
TIMES = "bench_time.json"
"""Wall time of a run as measured here, in its run folder."""
SUBTASKS = ("pick", "look", "clean", "heat", "cool", "pick_two")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def train(run_dir: Path, overrides: list[str], seed: int, *, before: bool, recipe: bool) -> None:
    """One run (skipped when its final report exists); its wall time into ``bench_time.json``."""
    if finished(run_dir):
        return
    cmd = [
        sys.executable, "-m", "agents.train", *([RECIPE] if recipe else []), *overrides,
        f"trainer.seed={seed}", f"run_dir={run_dir}", "trainer.export=false",
        f"trainer.eval_before={str(before).lower()}",
        *([] if before else ["trainer.eval_baselines=false"]),
    ]  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    (run_dir / TIMES).write_text(json.dumps({"wall_s": time.perf_counter() - t0, "cmd": cmd}))


def planned(run_dir: Path) -> int:
    """The run's ``trainer.iterations``."""
    return int(json.loads((run_dir / "run_config.json").read_text())["trainer"]["iterations"])


def finished(run_dir: Path) -> bool:
    if not (run_dir / "run_config.json").is_file():
        return False
    return (run_dir / "eval" / f"iter-{planned(run_dir):06d}.json").is_file()


def share_before(source: Path, run_dir: Path) -> None:
    """Copy the iteration-0 reports (every stage) of ``source`` into ``run_dir``."""
    for path in (source / "eval").rglob("iter-000000.*"):
        target = run_dir / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def reports(run_dir: Path, stage: str = "") -> dict[int, Report]:
    """The run's whole-game reports (``stage``: e.g. ``stage-k1``) by iteration."""
    folder = run_dir / "eval" / stage if stage else run_dir / "eval"
    history = (load_report(path) for path in sorted(folder.glob("iter-*.json")))
    return {int(r.iteration): r for r in history if r.iteration is not None}


def rates(report: Report) -> dict[str, float]:
    """Overall and per-subtask success of one report."""
    out = {s.name: s.rate for s in report.scores if s.episodes}
    return {"overall": report.overall.rate, **out}


def split(run_dir: Path) -> dict[str, float]:
    """Wall time and where it went (seconds): warm start, generation, env, learner, evaluation."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    warm_path = run_dir / "warm_start.json"
    warm = json.loads(warm_path.read_text()) if warm_path.is_file() else {}
    times = json.loads((run_dir / TIMES).read_text()) if (run_dir / TIMES).is_file() else {}
    out = {
        "warm start": warm.get("time/bc_collect_s", 0.0) + warm.get("time/bc_s", 0.0),
        "generation": sum(r.get("rollout/time_generate_s", 0.0) for r in rows),
        "env": sum(r.get("rollout/time_env_s", 0.0) for r in rows),
        "learner": sum(r.get("time/learn_s", 0.0) for r in rows),
    }
    # measured here; a run not started by this script: its folder's first and last writes
    last = max(f.stat().st_mtime for f in (run_dir / "eval").rglob("*") if f.is_file())
    wall = float(times.get("wall_s", last - (run_dir / "run_config.json").stat().st_mtime))
    out["evaluation and start-up"] = wall - sum(out.values())
    out["wall"] = wall
    total = planned(run_dir)
    quarter = [r for r in rows if r["iteration"] >= total - total // 4]
    out["guided, last quarter"] = (
        sum(r.get("rollout/guided", 0.0) for r in quarter) if quarter else math.nan
    )  # nan: the run stopped before its last quarter
    out["iterations"] = len(rows)
    out["of"] = total
    return out


def undo_note(run_dir: Path) -> str:
    """How many failed held-out episodes of the last evaluation put back what they just took."""
    history = sorted((run_dir / "eval").glob("iter-*.episodes.jsonl"))
    if not history:
        return ""
    rows = [json.loads(x) for x in history[-1].read_text().splitlines() if x.strip()]
    failed = [r for r in rows if not r["success"]]

    def undoes(actions: list[str]) -> bool:
        for a, b in zip(actions, actions[1:], strict=False):
            if a.startswith("take ") and " from " in a:
                thing, place = a.removeprefix("take ").split(" from ", 1)
                if b == f"move {thing} to {place}":
                    return True
        return False

    looped = sum(r.get("cycle_from") is not None for r in failed)
    undo = sum(undoes(r["actions"]) for r in failed)
    return (
        f"In the last evaluation ({history[-1].name}), {len(failed)} of {len(rows)} episodes "
        f"failed; {looped} of them were stopped in a repeating loop, and {undo} put an object "
        "straight back where they had just taken it from (`take X from R`, then `move X to R`)."
    )


def training_table(run_dir: Path) -> str:
    """Per iteration: the sampled rollouts' success on the training games, guided rollouts."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    keys = ("rollout/success_rate", "rollout/guided", "adv/zero_frac", "holder/p")
    lines = ["| iteration | " + " | ".join(f"`{k}`" for k in keys) + " |"]
    lines.append("|---" * (len(keys) + 1) + "|")
    for r in rows:
        cells = [f"{r.get(k, math.nan):.2f}" for k in keys]
        lines.append(f"| {r['iteration'] + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pct(values: list[float]) -> str:
    m, lo, hi = interval(values)
    if len(values) < 2:
        return f"{100 * m:.1f}%"
    return f"{100 * m:.1f}% ({100 * lo:.1f}–{100 * hi:.1f}%)"


def variant_table(finals: dict[str, list[dict[str, float]]], baselines: dict[str, Report]) -> str:
    head = "| variant | seeds | overall (mean, 95% CI) | " + " | ".join(SUBTASKS) + " |"
    lines = [head, "|---" * (len(SUBTASKS) + 3) + "|"]
    for name, runs in finals.items():
        cells = [pct([r.get(s, 0.0) for r in runs]) for s in SUBTASKS]
        overall = pct([r["overall"] for r in runs])
        lines.append(f"| {name} | {len(runs)} | {overall} | " + " | ".join(cells) + " |")
    for name, report in baselines.items():
        r = rates(report)
        cells = [f"{100 * r.get(s, 0.0):.1f}%" for s in SUBTASKS]
        overall = f"{100 * r['overall']:.1f}%"
        lines.append(f"| {name} baseline | – | {overall} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def overlap_sentence(finals: dict[str, list[dict[str, float]]]) -> str:
    """Which variants' 95 % intervals overlap the recipe's (a plain sentence)."""
    if "recipe" not in finals:
        return ""
    _, lo, hi = interval([r["overall"] for r in finals["recipe"]])
    same, apart = [], []
    for name, runs in finals.items():
        if name == "recipe":
            continue
        m, a, b = interval([r["overall"] for r in runs])
        single = len(runs) < 2 or len(finals["recipe"]) < 2
        (same if single or not (b < lo or a > hi) else apart).append(name)
    text = ""
    if same:
        text += (
            f"The intervals of {', '.join(same)} overlap the recipe's (or a single seed gives no "
            "interval): these runs do not show that lever's worth apart from seed noise. "
        )
    if apart:
        text += f"{', '.join(apart)} lie outside the recipe's interval."
    return text


def not_run(finals: dict[str, list[dict[str, float]]]) -> str:
    """A sentence naming the variants this page has no run of, and the command that runs them."""
    missing = [v for v in VARIANTS if v not in finals]
    if not missing:
        return ""
    names = ", ".join(f"{m!r}" for m in missing)
    return (
        f"\n\nNot run for this page: {names} (`python -m bench.whole_games --variants "
        f'"{",".join(VARIANTS)}"` runs every variant).'
    )


def curve_table(curves: dict[str, list[dict[int, float]]]) -> str:
    its = sorted(set().union(*[set(c) for runs in curves.values() for c in runs]))
    lines = ["| variant | " + " | ".join(f"it {i}" for i in its) + " |"]
    lines.append("|---" * (len(its) + 1) + "|")
    for name, runs in curves.items():
        cells = [
            f"{100 * mean(c[i] for c in runs):.1f}%" if all(i in c for c in runs) else "–"
            for i in its
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict[int, float]]], out: Path, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, runs in curves.items():
        its = sorted(set.intersection(*[set(c) for c in runs]))
        means = [mean(c[i] for c in runs) for i in its]
        ax.plot(its, [100 * m for m in means], marker="o", label=variant)
        if len(runs) > 1:
            lows = [100 * min(c[i] for c in runs) for i in its]
            highs = [100 * max(c[i] for c in runs) for i in its]
            ax.fill_between(its, lows, highs, alpha=0.15)
    ax.set(xlabel="iteration", ylabel="held-out whole-game success (%)", ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--default", action="store_true", help="add the default run, guided on/off")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/whole_games"))
    parser.add_argument("--docs", action="store_true", help="write docs/results_whole_games.md")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 short iterations")
    parser.add_argument(
        "--collect", action="store_true", help="run nothing: write the page from the run folders"
    )
    parser.add_argument(
        "--default-override", action="append", default=[], help="Hydra override of the default runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.override = [*QUICK, *args.override]
    chosen = [v for v in args.variants.split(",") if v]  # "": the default runs alone
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    runs = [(v, s) for v in chosen for s in range(args.seeds)]
    dirs = {r: args.out / f"{slug(r[0])}-seed{r[1]}" for r in runs}
    defaults = list(DEFAULT_RUNS) if args.default else []
    default_dirs = {d: args.out / slug(d) for d in defaults}

    def one(run: tuple[str, int]) -> None:
        train(dirs[run], [*args.override, *VARIANTS[run[0]]], run[1], before=run == runs[0],
              recipe=True)  # fmt: skip
        print(*run, "done", flush=True)

    def default_one(name: str) -> None:
        overrides = [*DEFAULT_RUNS[name], *args.default_override]
        train(default_dirs[name], overrides, 0, before=True, recipe=False)
        print(name, "done", flush=True)

    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        if not args.collect:
            list(pool.map(one, runs))
            list(pool.map(default_one, defaults))
    for run in runs[1:]:
        share_before(dirs[runs[0]], dirs[run])
    text = page(runs, dirs, default_dirs, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_whole_games.md").write_text(text)
    if args.docs:
        for png in args.out.glob("results_whole_games*.png"):
            shutil.copyfile(png, Path("docs") / png.name)
        Path("docs/results_whole_games.md").write_text(text)
    print(text)


def page(
    runs: list[tuple[str, int]],
    dirs: dict[tuple[str, int], Path],
    default_dirs: dict[str, Path],
    args: argparse.Namespace,
) -> str:
    if not runs:
        return default_section(default_dirs)
    curves: dict[str, list[dict[int, float]]] = {}
    finals: dict[str, list[dict[str, float]]] = {}
    histories = {run: reports(dirs[run]) for run in runs}
    common = min(max(h) for h in histories.values())  # the last iteration every run reached
    for run, history in histories.items():
        curves.setdefault(run[0], []).append({i: rates(r)["overall"] for i, r in history.items()})
        finals.setdefault(run[0], []).append(rates(history[max(i for i in history if i <= common)]))
    first = dirs[runs[0]]
    baselines = {
        name: load_report(path)
        for name in RULE_BASELINES
        if (path := first / "eval" / "baselines" / f"{name.replace(' ', '_')}-full.json").is_file()
    }
    recipe_history = reports(first)
    budget = recipe_history[max(recipe_history)].turn_budget
    lines = [
        "# Whole ALFWorld games on a CPU: the recipe and its levers",
        "",
        f"Written by `python -m bench.whole_games {' '.join(sys.argv[1:])}`. Every run is "
        f"`python -m agents.train {RECIPE}` (SmolLM2-135M-Instruct from its released weights) "
        "with one lever removed; held-out success on the 30 `embedded_heldout` games, greedy, "
        f"whole games with a turn budget of {budget} (the env's step limit), at iteration "
        f"{common}, the last every run reached (of {planned(first)}); "
        f"{len(set(s for _, s in runs))} seed(s) per variant, 95 % t intervals over "
        "seeds where there are several. Baselines: random admissible commands and the best "
        "single-verb rule on the same games and budget.",
        "",
        variant_table(finals, baselines),
        overlap_sentence(finals),
        not_run(finals),
        "",
        "Held-out whole-game success at each evaluated iteration (mean over seeds):",
        "",
        curve_table(curves),
        f"![curves]({plot(curves, args.out, 'results_whole_games_curve').name})",
        "",
        "Per-subtask success of the first run of each variant, at each evaluation:",
        "",
    ]
    for name in dict.fromkeys(v for v, _ in runs):
        history = reports(dirs[(name, 0)])
        lines += [f"**{name}**", "", subtask_table(history), undo_note(dirs[(name, 0)]), ""]
    lines += [
        "Training rollouts of the first run of each variant (the training games, sampled at the "
        "recipe's temperature; guided rollouts are not in the success rate):",
        "",
    ]
    for name in dict.fromkeys(v for v, _ in runs):
        lines += [f"**{name}**", "", training_table(dirs[(name, 0)]), ""]
    lines += ["Where the time went (seconds, first run of each variant):", ""]
    lines.append(time_table({n: dirs[(n, 0)] for n in dict.fromkeys(v for v, _ in runs)}))
    if default_dirs:
        lines += ["", default_section(default_dirs)]
    return "\n".join(lines) + "\n"


def subtask_table(history: dict[int, Report]) -> str:
    cols = ["overall", *SUBTASKS]
    lines = ["| iteration | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for it, report in sorted(history.items()):
        r = rates(report)
        lines.append(f"| {it} | " + " | ".join(f"{100 * r.get(c, 0.0):.0f}%" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def time_table(dirs: dict[str, Path]) -> str:
    splits = {n: split(d) for n, d in dirs.items()}
    keys = list(next(iter(splits.values())))
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, s in splits.items():
        lines.append(f"| {name} | " + " | ".join(f"{s[k]:.0f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def default_section(dirs: dict[str, Path]) -> str:
    stages = ["stage-k1", "stage-k2", "stage-k3", ""]
    head = "| run | k=1 | k=2 | k=3 | whole game | mean k=1..3 |"
    lines = [
        "## The CPU default run (`env=alfworld`), with and without its guided rollout", "",
        "Held-out success after the last iteration, greedy; the stages with training's budget "
        "(k + 1 turns), whole games with the env's step limit.", "",
        head, "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, d in dirs.items():
        finals = []
        for stage in stages:
            history = reports(d, stage)
            last = max(history, default=0)
            finals.append(rates(history[last])["overall"] if last else math.nan)
        cells = [f"{100 * v:.1f}%" for v in finals]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * mean(finals[:3]):.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
