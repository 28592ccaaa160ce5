"""Reset/step latency and memory of AlfWorldEnv against alfworld's stock AlfredTWEnv, same games.

Usage: ``ALFWORLD_DATA=../shared/data/alfworld python bench/alfworld_env.py [--games 10]``

For each of N valid_unseen games (spread over the sorted paths), both envs do: a first reset (new
game; ours compiles it into an empty disk cache), a repeat reset (same game again, as the n rollouts
of a group do), then the game's walkthrough steps. Then a fresh Python process resets each game once
from that disk cache ("cold process", as a new Ray actor would; the stock env has no cache, so its
row compares with the stock first reset). Printed: median and p90 per phase, the ratio stock / ours
and ours as a share of stock, and resident memory (stock: its process plus the worker process
textworld.gym starts; ours: the process, measured after the run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from envs.alfworld.engine import CACHE_ENV, GameCache
from envs.alfworld.env import SUBTASKS, AlfWorldEnv, find_games

COLD_PROCESS = """
import json, sys, time
from envs.alfworld.env import SHARED_CACHE, AlfWorldEnv
env = AlfWorldEnv(split="valid_unseen")
times = []
for game in sys.argv[1:]:
    start = time.perf_counter()
    env.reset(options={"game": game})
    times.append(time.perf_counter() - start)
assert SHARED_CACHE.translations_computed == 0, "a game was not in the disk cache"
print(json.dumps(times))
"""


def _stock_config(data_dir: str) -> dict:
    """The smallest AlfredTWEnv config for evaluation on valid_unseen."""
    split = os.path.join(data_dir, "json_2.1.1", "valid_unseen")
    return {
        "env": {
            "goal_desc_human_anns_prob": 0,
            "task_types": [1, 2, 3, 4, 5, 6],
            "domain_randomization": False,
            "expert_type": "handcoded",
        },
        "dataset": {"eval_ood_data_path": split, "num_eval_games": -1},
        "general": {"training_method": "dagger"},
        "dagger": {"training": {"max_nb_steps_per_episode": 50}},
    }


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def _rss_mb(proc: psutil.Process, children: bool) -> float:
    procs = [proc, *(proc.children(recursive=True) if children else [])]
    return sum(p.memory_info().rss for p in procs) / 2**20


def bench_ours(games: list[str], cache_root: Path) -> dict[str, list[float]]:
    """Latencies of AlfWorldEnv (empty cache under ``cache_root``: first resets compile)."""
    cache = GameCache(maxsize=16, cache_dir=cache_root / "alfworld")
    env = AlfWorldEnv(split="valid_unseen", cache=cache)
    out: dict[str, list[float]] = {"first reset": [], "repeat reset": [], "step": []}
    for game in games:
        out["first reset"].append(_timed(lambda g=game: env.reset(options={"game": g})))
        _, info = env.reset(options={"game": game})
        out["repeat reset"].append(_timed(lambda g=game: env.reset(options={"game": g})))
        for action in info["expert_plan"]:
            out["step"].append(_timed(lambda a=action: env.step(a)))
    env.close()
    return out


def bench_cold_process(games: list[str], cache_root: Path) -> list[float]:
    """First-reset latency of each game in a new interpreter whose disk cache holds the games."""
    env = {**os.environ, CACHE_ENV: str(cache_root)}
    done = subprocess.run(
        [sys.executable, "-c", COLD_PROCESS, *games], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"cold-process run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def bench_stock(games: list[str], data_dir: str) -> tuple[dict[str, list[float]], float]:
    """Latencies of alfworld's AlfredTWEnv (one batch env of one game per game) and peak RSS."""
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    out: dict[str, list[float]] = {"first reset": [], "repeat reset": [], "step": []}
    peak = 0.0
    for game in games:
        stock = AlfredTWEnv(_stock_config(data_dir), train_eval="eval_out_of_distribution")
        stock.game_files, stock.num_games = [game], 1
        env = stock.init_env(batch_size=1)
        out["first reset"].append(_timed(env.reset))
        out["repeat reset"].append(_timed(env.reset))
        for action in json.load(open(game))["walkthrough"]:
            out["step"].append(_timed(lambda a=action, e=env: e.step([a])))
        peak = max(peak, _rss_mb(psutil.Process(), children=True))
        env.close()
    return out, peak


def main() -> None:
    """Run both benchmarks and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=10)
    args = parser.parse_args()
    data_dir = os.environ.get("ALFWORLD_DATA")
    if not data_dir:
        raise SystemExit("set ALFWORLD_DATA to the folder holding json_2.1.1/ (alfworld-download)")
    games = find_games("valid_unseen", data_dir, SUBTASKS)[:: max(1, 134 // args.games)][
        : args.games
    ]
    proc = psutil.Process()
    base = _rss_mb(proc, children=False)
    with tempfile.TemporaryDirectory() as cache_root:
        ours = bench_ours(games, Path(cache_root))
        ours_rss = _rss_mb(proc, children=False)
        ours["cold process"] = bench_cold_process(games, Path(cache_root))
    stock, stock_rss = bench_stock(games, data_dir)
    stock["cold process"] = stock["first reset"]
    print(f"{len(games)} valid_unseen games; seconds (median / p90); ratio = stock / ours (median)")
    for phase in ("first reset", "repeat reset", "cold process", "step"):
        om, op = _stats(ours[phase])
        sm, sp = _stats(stock[phase])
        print(
            f"{phase:13s} ours {om:8.4f} / {op:8.4f}   stock {sm:8.4f} / {sp:8.4f}   "
            f"ratio {sm / om:7.1f}x   ours {om / sm:6.3f}x of stock"
        )
    print(
        f"memory: ours {ours_rss:.0f} MB process RSS ({ours_rss - base:+.0f} MB over the "
        f"{base:.0f} MB before the first env); stock peak {stock_rss:.0f} MB (process + worker)"
    )


if __name__ == "__main__":
    main()
