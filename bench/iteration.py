"""The cost of one training iteration: today's path against the new one, phase by phase.

Run: ``OMP_NUM_THREADS=2 python -m bench.iteration`` (``--help`` for options; ``--quick`` uses the
tiny model). Each path runs in its own child process (so each has its own peak RSS and cold
caches), one training iteration of the same configuration, built through the project's own config
and runtime code, followed by the checkpoint the run would write:

* ``today``: every saving turned off by its flag: zero-advantage rows computed
  (``trainer.skip_zero_rows=false``), π_old always recomputed
  (``trainer.reuse_single_update=false``), the generator's full-prompt output head, one prefill
  per row and a growing KV cache (``rollout.generator_savings=false``), no persistent ALFWorld
  translation cache (``env.kwargs.disk_cache=false``), and a
  checkpoint written every iteration in today's format (``torch.save`` of the model and trainer
  state);
* ``new``: the defaults.

Two configurations: ``a`` is the CPU default as it was before the curriculum (SmolLM2-135M,
embedded ALFWorld, ordinary games, 1 group x 4 rollouts x 4 turns), whose advantages are mostly
zero; ``b`` is the same with an entropy bonus (``algorithm.entropy_coef=0.001``, the official
ALFWorld launcher's value), so every row carries a gradient and none can be skipped.

Printed per phase: seconds per step sample for both paths and their ratio (new / today), and the
peak RSS of each child. The checkpoint phase is amortised over ``trainer.save_every`` iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("generation", "env", "old log-probs", "update", "checkpoint")

# the CPU default before the curriculum (full games, 1 group x 4 rollouts x 4 turns, T = 1)
_PLAIN = ["curriculum=uniform", "rollout=default", "env.prompt=alfworld"]
CONFIGS: dict[str, list[str]] = {
    "a": _PLAIN,
    "b": [*_PLAIN, "algorithm.entropy_coef=0.001"],
}

TODAY: list[str] = [
    "trainer.skip_zero_rows=false",
    "trainer.reuse_single_update=false",
    "trainer.save_every=1",
    "++env.kwargs.disk_cache=false",  # a cold process translates every game it plays
    "rollout.generator_savings=false",
]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One iteration and its checkpoint in this process; returns phase seconds and peak RSS."""
    from hydra import compose, initialize_config_module

    from agents.config import build_run_config
    from agents.run.cli import to_container
    from agents.run.runtime import build_runtime
    from agents.train import run_iteration
    from agents.training import checkpoint

    overrides = [*CONFIGS[args.config], *(TODAY if args.path == "today" else [])]
    overrides += [f"run_dir={args.run_dir}", *args.override]
    with initialize_config_module("configs", version_base="1.3"):
        tree = compose("config", overrides=overrides)
    cfg = build_run_config(to_container(tree))
    with build_runtime(cfg) as rt:
        learner = rt.build_learner()
        result = run_iteration(cfg, rt, learner, 0)
        m = result.metrics
        t0 = time.perf_counter()
        if args.path == "today":
            _today_checkpoint(cfg.run_dir, rt.model, learner)
        else:
            state = checkpoint.TrainingState(iteration=1, optimizer_steps=1, p=result.p)
            checkpoint.save(
                cfg.run_dir, model=rt.model, learner_state=learner.state_dict(), state=state
            )
        save_s = (time.perf_counter() - t0) / max(cfg.trainer.save_every, 1)
    samples = m["rollout/step_samples"]
    seconds = {
        "generation": m["rollout/time_generate_s"] + m.get("rollout/time_prompt_s", 0.0),
        "env": m["rollout/time_env_s"],
        "old log-probs": m["time/old_logprobs_s"],
        "update": m["time/update_s"],
        "checkpoint": save_s,
    }
    return {
        "per_sample": {k: v / samples for k, v in seconds.items()},
        "samples": samples,
        "nonzero_adv": 1 - m.get("adv/zero_frac", float("nan")),
        "rows_skipped": m.get("loss/rows_skipped_frac", 0.0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _today_checkpoint(run_dir: Path, model: Any, learner: Any) -> None:
    """The checkpoint writer this project had before: pickled ``.pt`` files, every iteration."""
    import torch

    out = run_dir / "ckpt-today"
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    torch.save({"learner": learner.state_dict()}, out / "trainer.pt")


def run_child(path: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter (its own caches and peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        cmd = [
            sys.executable,
            "-m",
            "bench.iteration",
            "--child",
            path,
            "--config",
            config,
            "--run-dir",
            str(Path(tmp) / "run"),
            *[f"--override={o}" for o in args.override],
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{path}/{config} failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def report(config: str, today: dict[str, Any], new: dict[str, Any]) -> str:
    """A Markdown table of one configuration."""
    lines = [
        f"### configuration {config}: {int(new['samples'])} step samples, "
        f"A!=0 {new['nonzero_adv']:.2f}, rows skipped (new) {new['rows_skipped']:.2f}",
        "",
        "| phase | today (s / sample) | new (s / sample) | new / today |",
        "|---|---|---|---|",
    ]
    for phase in PHASES:
        a, b = today["per_sample"][phase], new["per_sample"][phase]
        lines.append(f"| {phase} | {a:.3f} | {b:.3f} | {_ratio(b, a)} |")
    learn_a = today["per_sample"]["old log-probs"] + today["per_sample"]["update"]
    learn_b = new["per_sample"]["old log-probs"] + new["per_sample"]["update"]
    total_a, total_b = sum(today["per_sample"].values()), sum(new["per_sample"].values())
    lines.append(
        f"| learner (old log-probs + update) | {learn_a:.3f} | {learn_b:.3f} | "
        f"{_ratio(learn_b, learn_a)} |"
    )
    lines.append(
        f"| whole iteration | {total_a:.3f} | {total_b:.3f} | {_ratio(total_b, total_a)} |"
    )
    lines.append(
        f"| peak RSS (MB) | {today['peak_rss_mb']:.0f} | {new['peak_rss_mb']:.0f} | "
        f"{_ratio(new['peak_rss_mb'], today['peak_rss_mb'])} |"
    )
    return "\n".join(lines)


def _ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}x" if old > 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="a,b", help="comma-separated: a, b")
    parser.add_argument("--quick", action="store_true", help="tiny model (a smoke test)")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    parser.add_argument("--child", choices=("today", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.override = ["model=tiny", *args.override]
    if args.child:
        args.path = args.child
        print(json.dumps(child(args)))
        return
    for config in args.configs.split(","):
        today = run_child("today", config, args)
        new = run_child("new", config, args)
        print(report(config, today, new), "\n", flush=True)


if __name__ == "__main__":
    main()
