"""``--multirun`` sweeps: one run folder per job and a summary of the sweep.

``python -m agents.train -m algorithm=grpo,holderpo trainer.seed=0,1`` runs one job per
combination; Hydra's output folder of each job, ``<hydra.sweep.dir>/<hydra.sweep.subdir>``
(``<run_dir>/<job number>`` by default), is that job's ``run_dir``. When the sweep ends,
:class:`SweepSummary` (a Hydra callback of ``configs/config.yaml``) writes ``summary.json`` and
``summary.md`` into the sweep folder: per job its overrides, run folder, iterations done and the
final metrics (the last line of its ``metrics.jsonl``); the table shows the overrides that
vary across the jobs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from agents.run.metrics import read_metrics

SUMMARY_KEYS: Final = (
    "rollout/reward_mean",
    "rollout/success_rate",
    "rollout/invalid_action_rate",
    "loss/total",
    "holder/p",
)
"""Metrics shown in the Markdown table (``summary.json`` has every metric of the last line)."""


def job_summary(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    """One job of the sweep: its number, overrides, folder, iterations and final metrics."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    metrics_file = job_dir / "metrics.jsonl"
    rows = read_metrics(metrics_file) if metrics_file.is_file() else []
    config_file = job_dir / "run_config.json"
    planned = None
    if config_file.is_file():
        planned = json.loads(config_file.read_text()).get("trainer", {}).get("iterations")
    done = len(rows)
    final = dict(rows[-1]) if rows else {}
    final.pop("iteration", None)
    return {
        "job": job_dir.relative_to(sweep_dir).as_posix(),
        "overrides": [str(o) for o in overrides],
        "run_dir": str(job_dir),
        "iterations": done,
        "status": "complete" if planned is not None and done >= planned else "incomplete",
        "final_metrics": final,
    }


def summarise(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job folder under ``sweep_dir`` (the ones holding ``.hydra/overrides.yaml``).

    Each job's ``swept`` lists its overrides that not every job shares (the sweep's choices).
    """
    folders = sorted(
        (p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")),
        key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts],
    )
    jobs = [job_summary(job, sweep_dir) for job in folders if job != sweep_dir]
    shared = set.intersection(*(set(j["overrides"]) for j in jobs)) if jobs else set()
    for job in jobs:
        job["swept"] = [o for o in job["overrides"] if o not in shared]
    return jobs


def to_markdown(jobs: Sequence[Mapping[str, Any]], sweep_dir: Path) -> str:
    """The summary as a Markdown table, one row per job."""
    shared = [o for o in jobs[0]["overrides"] if o not in jobs[0]["swept"]] if jobs else []
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"Overrides of every job: {' '.join(f'`{o}`' for o in shared) or '(none)'}",
        "",
        "| job | overrides | iterations | " + " | ".join(SUMMARY_KEYS) + " | run folder |",
        "|---|---|---|" + "---|" * len(SUMMARY_KEYS) + "---|",
    ]
    for job in jobs:
        m = job["final_metrics"]
        cells = [_cell(m.get(k)) for k in SUMMARY_KEYS]
        overrides = " ".join(f"`{o}`" for o in job["swept"]) or "(none)"
        status = "" if job["status"] == "complete" else " (incomplete)"
        lines.append(
            f"| {job['job']} | {overrides} | {job['iterations']}{status} | "
            + " | ".join(cells)
            + f" | {job['run_dir']} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.json`` and ``summary.md`` into ``sweep_dir``; the jobs summarised."""
    jobs = summarise(sweep_dir)
    body = {"sweep_dir": str(sweep_dir), "jobs": jobs}
    (sweep_dir / "summary.json").write_text(json.dumps(body, indent=2) + "\n")
    (sweep_dir / "summary.md").write_text(to_markdown(jobs, sweep_dir))
    return jobs


def _cell(value: Any) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.4g}"
    return "-"


class SweepSummary(Callback):
    """Hydra callback: at the end of a ``--multirun`` sweep, :func:`write_summary`."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarise the sweep folder."""
        write_summary(Path(str(config.hydra.sweep.dir)))
