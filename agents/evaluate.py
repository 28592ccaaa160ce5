"""Evaluate a policy: ``python -m agents.evaluate env=alfworld split=valid_unseen checkpoint=...``.

Reports success per subtask (ALFWorld: pick, look, clean, heat, cool, pick two) or accuracy per
benchmark (math, Pass@1 greedy) with counts, 95 % Wilson intervals and the share of valid steps
(``info["action_valid"]``: an admissible command, a parsable final answer), as JSON and Markdown
under ``<run_dir>/eval/``, plus a PNG of success per subtask over training when several evaluations
of a run exist. ``policy=expert`` (the env's expert plan) and ``policy=random`` (a random admissible
action) check the env and the report before any training. ``stage=k`` starts every episode ``k``
expert actions from the goal (the reverse curriculum's stages, :mod:`envs.prefix`); during training
``curriculum.eval_stages`` lists the stages evaluated, each with its own report.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import hydra
from omegaconf import DictConfig

from agents.config import ConfigError, RunConfig, build_run_config
from agents.evaluation.report import (
    ALFWORLD_SUBTASKS,
    EpisodeResult,
    Report,
    load_report,
    plot_history,
    stage_table,
    summarise,
    write_report,
)
from agents.rollout.curriculum import Stage, parse_stage, stage_name, stage_options
from agents.rollout.env_pool import EnvFactory, EnvPool
from agents.rollout.manager import RolloutManager
from agents.run.cli import register_env_configs, to_container
from agents.run.preflight import check_env, check_model, cli_errors
from agents.run.runtime import Runtime, build_runtime, make_pool
from agents.training import checkpoint
from agents.training.distributed import load_model_weights
from agents.types import Trajectory
from envs.base import InfoKeys

log = logging.getLogger("agents.evaluate")


class Actor(Protocol):
    """Chooses actions from observations and infos (baselines that need no model)."""

    def act(self, observations: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
        """One action per env."""
        ...


@dataclass
class ExpertActor:
    """Follows the env's expert plan (``info["expert_plan"]``: the actions left to win)."""

    fallback: str = "look"
    """Action sent when an env offers no plan."""

    def act(self, observations: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
        """The next action of each env's plan."""
        return [(info.get("expert_plan") or [self.fallback])[0] for info in infos]


@dataclass
class RandomActor:
    """Picks a uniformly random admissible action (``"look"`` when the env lists none)."""

    seed: int = 0
    """Seed of the choices."""

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def act(self, observations: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
        """A random admissible action per env."""
        return [self._rng.choice(info.get("admissible_actions") or ["look"]) for info in infos]


@dataclass
class VerbRuleActor:
    """Always takes an admissible action that starts with ``verb`` (a random one when none does).

    With ``verb`` the most frequent verb of the winning actions of the training tasks
    (:func:`winning_verb`), this is the best single-verb rule: the shortcut a policy that learned
    only "which kind of command wins" would follow.
    """

    verb: str
    """The verb to prefer (``move`` on ALFWorld's embedded training games)."""
    seed: int = 0
    """Seed of the choices."""

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def act(self, observations: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
        """One action per env: the first admissible ``verb`` action, else a random one."""
        out = []
        for info in infos:
            admissible = info.get("admissible_actions") or ["look"]
            preferred = [a for a in admissible if a.split(" ", 1)[0] == self.verb]
            out.append(preferred[0] if preferred else self._rng.choice(admissible))
        return out


def winning_verb(factory: EnvFactory) -> str | None:
    """The most frequent first word of the last expert action over an env's tasks.

    Reads ``info["expert_plan"]`` at reset (the actions left to win) for every task of an env
    with a finite task list (``num_tasks``); ``None`` when the env has no plan or no task list.
    """
    env = factory()
    try:
        n = getattr(env.unwrapped, "num_tasks", None)
        counts: Counter[str] = Counter()
        for seed in range(n or 0):
            plan = env.reset(seed=seed)[1].get("expert_plan") or []
            if plan:
                counts[str(plan[-1]).split(" ", 1)[0]] += 1
    finally:
        env.close()
    return counts.most_common(1)[0][0] if counts else None


BASELINES: dict[str, type] = {"expert": ExpertActor, "random": RandomActor}
"""Baseline actors by the name ``policy=<name>`` takes."""


def run_episodes(
    actor: Actor, pool: EnvPool, seeds: Sequence[int], *, max_steps: int, stage: Stage = None
) -> list[EpisodeResult]:
    """Play one episode per seed with ``actor``, ``pool.num_envs`` episodes at a time.

    ``stage=k`` starts each episode ``k`` expert actions from the goal (``None``: the game);
    the replayed expert actions are not counted in the episode's steps.
    """
    results: list[EpisodeResult] = []
    for start in range(0, len(seeds), pool.num_envs):
        chunk = list(seeds[start : start + pool.num_envs])
        results += _play(actor, pool, chunk, max_steps, stage)
    return results


def _play(
    actor: Actor, pool: EnvPool, seeds: list[int], max_steps: int, stage: Stage
) -> list[EpisodeResult]:
    envs_idx = list(range(len(seeds)))
    options = [stage_options(stage)] * len(seeds)
    obs_info = dict(zip(envs_idx, pool.reset(envs_idx, seeds, options), strict=True))
    steps = dict.fromkeys(envs_idx, 0)
    valid = dict.fromkeys(envs_idx, 0)
    reward = dict.fromkeys(envs_idx, 0.0)
    done: dict[int, EpisodeResult] = {}
    for _ in range(max_steps):
        active = [i for i in envs_idx if i not in done]
        if not active:
            break
        actions = actor.act([obs_info[i][0] for i in active], [obs_info[i][1] for i in active])
        for i, res in zip(active, pool.step(active, actions), strict=True):
            steps[i] += 1
            valid[i] += bool(res.info.get(InfoKeys.ACTION_VALID, True))
            reward[i] += res.reward
            obs_info[i] = (res.obs, dict(res.info))
            if res.terminated or res.truncated:
                done[i] = _result(res.info, steps[i], valid[i], reward[i])
    for i in envs_idx:
        if i not in done:
            done[i] = _result(obs_info[i][1], steps[i], valid[i], reward[i])
    return [done[i] for i in envs_idx]


def _result(info: Any, steps: int, valid_steps: int, reward: float) -> EpisodeResult:
    return EpisodeResult(
        subtask=str(info.get("subtask", "unknown")),
        success=bool(info.get("won", False)),
        steps=steps,
        reward=reward,
        valid_steps=valid_steps,
    )


def subtask_order(env_name: str) -> tuple[str, ...]:
    """Subtasks a report always lists (ALFWorld's six; others list what they saw)."""
    return ALFWORLD_SUBTASKS if env_name == "alfworld" else ()


def report_history(run_dir: Path, stage: Stage = None) -> list[Report]:
    """All evaluation reports written during a run at one stage (default the game), by iteration."""
    paths = sorted(stage_dir(run_dir, stage).glob("iter-*.json"))
    return [load_report(p) for p in paths]


def stage_dir(run_dir: Path, stage: Stage) -> Path:
    """Where a stage's reports go: ``eval/`` for the game, ``eval/stage-k<k>/`` otherwise."""
    root = run_dir / "eval"
    return root if stage is None else root / f"stage-{stage_name(stage)}"


def finish_reports(run_dir: Path) -> Path | None:
    """Plot success per subtask over training from the run's evaluation reports (per stage).

    Returns the plot of the ordinary game (or of the first stage evaluated when it was not).
    """
    folders = sorted((run_dir / "eval").glob("stage-k*"))
    stages: list[Stage] = [None, *(parse_stage(f.name.removeprefix("stage-k")) for f in folders)]
    plots = []
    for stage in stages:
        history = report_history(run_dir, stage)
        if history:
            path = stage_dir(run_dir, stage) / "success_over_training.png"
            plots.append(plot_history(history, path))
    return plots[0] if plots else None


def save_report(report: Report, run_dir: Path, stem: str, stage: Stage = None) -> None:
    """Write the report's JSON and Markdown under the stage's folder and log the table."""
    json_path, md_path = write_report(report, stage_dir(run_dir, stage), stem)
    log.info("evaluation report: %s\n%s", md_path, report.to_markdown())


def summarise_episodes(
    results: list[EpisodeResult], env_name: str, *, label: str, iteration: int | None = None
) -> Report:
    """The per-subtask report of ``results``."""
    return summarise(results, subtasks=subtask_order(env_name), label=label, iteration=iteration)


def eval_seeds(cfg: RunConfig, episodes: int | None) -> list[int]:
    """Reset seeds of an evaluation.

    Envs with a finite task list play task ``i mod n`` for seed ``i``: all ``n`` tasks when
    ``episodes`` is None or at least ``n``, else ``episodes`` tasks spread evenly over the list
    (so every subtask of a sorted list is represented). Other envs get seeds ``0 .. episodes-1``.
    """
    env = EnvFactory(cfg.env.name, {**cfg.env.kwargs, **cfg.env.eval_kwargs})()
    try:
        n = getattr(env.unwrapped, "num_tasks", None)
    finally:
        env.close()
    if n is None:
        return list(range(episodes or cfg.trainer.eval_episodes))
    if episodes is None or episodes >= n:
        return list(range(n))
    return [i * n // episodes for i in range(episodes)]


def evaluate_policy(
    cfg: RunConfig,
    rt: Runtime,
    *,
    iteration: int | None = None,
    seeds: Sequence[int] | None = None,
    stage: Stage = None,
) -> Report:
    """Greedy (Pass@1) evaluation of the run's policy on the eval envs during training.

    The tasks are the evaluation's own fixed list (:func:`eval_seeds`), never the training
    sampler's; ``stage=k`` starts each episode ``k`` expert actions from the goal.
    """
    if seeds is None:
        seeds = eval_seeds(cfg, cfg.trainer.eval_episodes)
    results = policy_episodes(cfg, rt, rt.eval_pool(), seeds, stage=stage)
    label = " ".join(
        [cfg.env.name, cfg.model.name]
        + ([f"stage {stage_name(stage)}"] if stage is not None else [])
        + ([f"iteration {iteration}"] if iteration else [])
    )
    stem = f"iter-{iteration:06d}" if iteration is not None else "final"
    report = summarise_episodes(results, cfg.env.name, label=label, iteration=iteration)
    save_report(report, cfg.run_dir, stem, stage)
    return report


def evaluate_stages(cfg: RunConfig, rt: Runtime, *, iteration: int | None) -> dict[str, float]:
    """Evaluate at every stage of ``curriculum.eval_stages``; their metrics.

    The ordinary game reports ``eval/success/<subtask>`` and ``eval/valid/<subtask>`` (share of
    valid steps), stage ``k`` reports ``eval/k<k>/success/<subtask>`` and ``eval/k<k>/valid/...``.
    With several stages, ``eval/stages-<stem>.md`` puts them side by side (one column per stage).
    """
    reports: dict[str, Report] = {}
    metrics: dict[str, float] = {}
    for stage in cfg.curriculum.stages:
        report = evaluate_policy(cfg, rt, iteration=iteration, stage=stage)
        reports[stage_name(stage)] = report
        prefix = "eval" if stage is None else f"eval/{stage_name(stage)}"
        metrics.update(report.metrics(prefix))
    baselines = baseline_reports(cfg, rt) if cfg.trainer.eval_baselines else {}
    if len(reports) > 1 or baselines:
        stem = f"iter-{iteration:06d}" if iteration is not None else "final"
        label = f"{cfg.env.name} {cfg.model.name} by stage" + (
            f" iteration {iteration}" if iteration is not None else ""
        )
        columns: dict[str, Report] = {}
        for name_of_stage, report in reports.items():
            columns[f"{name_of_stage}: model" if baselines else name_of_stage] = report
            columns.update(
                {f"{name_of_stage}: {b}": r[name_of_stage] for b, r in baselines.items()}
            )
        folder = cfg.run_dir / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"stages-{stem}.md").write_text(stage_table(columns, label=label))
    return metrics


def baseline_reports(cfg: RunConfig, rt: Runtime) -> dict[str, dict[str, Report]]:
    """Random admissible actions and the best single-verb rule at every evaluation stage.

    Played once per run on the evaluation's tasks, with the same turn limit as the policy, and
    kept under ``eval/baselines/`` (later evaluations of the run read them back). Empty for an
    env without admissible actions or expert plans (math).
    """
    folder = cfg.run_dir / "eval" / "baselines"
    seeds = eval_seeds(cfg, cfg.trainer.eval_episodes)
    factory = EnvFactory(cfg.env.name, {**cfg.env.kwargs})
    actors: dict[str, Actor] = {"random": RandomActor(seed=cfg.trainer.seed)}
    out: dict[str, dict[str, Report]] = {}
    for stage in cfg.curriculum.stages:
        for name in ("random", "verb rule"):
            path = folder / f"{name.replace(' ', '_')}-{stage_name(stage)}.json"
            if not path.is_file():
                if name == "verb rule" and name not in actors:
                    verb = winning_verb(factory)
                    if verb is None:
                        return {}
                    actors[name] = VerbRuleActor(verb, seed=cfg.trainer.seed)
                results = run_episodes(
                    actors[name],
                    rt.eval_pool(),
                    seeds,
                    max_steps=cfg.rollout.max_steps,
                    stage=stage,
                )
                if not any(r.steps for r in results):
                    return {}
                label = f"{name} baseline, stage {stage_name(stage)}"
                write_report(
                    summarise_episodes(results, cfg.env.name, label=label), folder, path.stem
                )
            out.setdefault(name, {})[stage_name(stage)] = load_report(path)
    return out


def policy_episodes(
    cfg: RunConfig, rt: Runtime, pool: EnvPool, seeds: Sequence[int], *, stage: Stage = None
) -> list[EpisodeResult]:
    """One greedy episode of the run's policy per seed, ``pool.num_envs`` at a time."""
    manager = RolloutManager(rt.policy, pool, dataclasses.replace(rt.rollout.config, greedy=True))
    results: list[EpisodeResult] = []
    for start in range(0, len(seeds), pool.num_envs):
        chunk = list(seeds[start : start + pool.num_envs])
        trajectories, _ = manager.collect(
            len(chunk),
            1,
            cfg.rollout.max_steps,
            seed=0,
            group_seeds=chunk,
            group_options=[stage_options(stage)] * len(chunk),
        )
        results += [_from_trajectory(t) for t in trajectories]
    return results


def _from_trajectory(t: Trajectory) -> EpisodeResult:
    return EpisodeResult(
        subtask=t.subtask,
        success=t.success,
        steps=len(t.steps),
        reward=t.total_reward,
        valid_steps=sum(s.action_valid for s in t.steps),
    )


@dataclass(frozen=True)
class EvalRequest:
    """What ``python -m agents.evaluate`` was asked to evaluate."""

    policy: str = "model"
    """``model`` (the configured model or a checkpoint of it), ``expert`` or ``random``."""
    checkpoint: str | None = None
    """A ``ckpt-XXXXXX`` folder, or a run folder (its newest checkpoint)."""
    split: str | list[str] | None = None
    """ALFWorld split or math benchmark (the env's ``split_key``), or a list of them in one
    report (``split=[aime24,amc,math500,minerva,olympiad_bench]``); default ``env.eval_kwargs``."""
    episodes: int | None = None
    """Episodes; default every task of the split once."""
    max_steps: int = 50
    """Turns per episode."""
    stage: int | str | None = None
    """Start every episode this many expert actions from the goal (``full`` or None: the game)."""

    def __post_init__(self) -> None:
        if self.stage is not None:
            try:
                parse_stage(self.stage)
            except ValueError as exc:
                raise ConfigError(f"stage={self.stage!r}: {exc}") from exc
        if self.policy not in ("model", *BASELINES):
            raise ConfigError(
                f"policy={self.policy!r} is unknown; use policy=model, "
                + ", ".join(f"policy={b}" for b in BASELINES)
            )
        if self.checkpoint is not None and self.policy != "model":
            raise ConfigError(f"checkpoint= only applies to policy=model, not policy={self.policy}")
        if self.episodes is not None and (isinstance(self.episodes, bool) or self.episodes < 1):
            raise ConfigError(
                f"episodes must be >= 1 (or null: every task once), got {self.episodes}"
            )
        if isinstance(self.max_steps, bool) or self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")


def with_split(cfg: RunConfig, split: str | None) -> RunConfig:
    """``cfg`` with the evaluation split/benchmark set through the env's ``split_key``."""
    if split is None:
        return cfg
    if cfg.env.split_key is None:
        raise ConfigError(f"env {cfg.env.name!r} has no splits (its config sets no split_key)")
    env = dataclasses.replace(
        cfg.env, eval_kwargs={**cfg.env.eval_kwargs, cfg.env.split_key: split}
    )
    return dataclasses.replace(cfg, env=env)


def run_evaluation(cfg: RunConfig, request: EvalRequest) -> Report:
    """Evaluate a baseline or the model (optionally a checkpoint) on each split; one report."""
    splits = request.split if isinstance(request.split, list) else [request.split]
    configs = [with_split(cfg, split) for split in splits]
    names = [str(c.env.eval_kwargs.get(cfg.env.split_key or "", "")) for c in configs]
    stage = None if request.stage is None else parse_stage(request.stage)
    at = [] if stage is None else [stage_name(stage)]
    stem = "-".join([request.policy, *filter(None, names), *at])
    label = " ".join([cfg.env.name, *filter(None, names), f"policy={request.policy}"])
    label += "".join(f" stage {a}" for a in at)
    results: list[EpisodeResult] = []
    if request.policy in BASELINES:
        actor = BASELINES[request.policy]()
        for c in configs:
            seeds = eval_seeds(c, request.episodes)
            kwargs = {**c.env.kwargs, **c.env.eval_kwargs}
            with make_pool(c, kwargs, min(len(seeds), 16)) as pool:
                results += run_episodes(
                    actor, pool, seeds, max_steps=request.max_steps, stage=stage
                )
    else:
        cfg = dataclasses.replace(
            cfg, rollout=dataclasses.replace(cfg.rollout, max_steps=request.max_steps)
        )
        with build_runtime(cfg, train_pool=False) as rt:
            if request.checkpoint is not None:
                label += f" checkpoint={load_weights(rt, Path(request.checkpoint))}"
            for c in configs:
                seeds = eval_seeds(c, request.episodes)
                kwargs = {**c.env.kwargs, **c.env.eval_kwargs}
                size = min(len(seeds), cfg.rollout.num_groups * cfg.rollout.group_size)
                with make_pool(c, kwargs, max(size, 1)) as pool:
                    results += policy_episodes(cfg, rt, pool, seeds, stage=stage)
    report = summarise_episodes(results, cfg.env.name, label=label)
    save_report(report, cfg.run_dir, stem)
    return report


def load_weights(rt: Runtime, path: Path) -> Path:
    """Load a checkpoint's model weights (either layout) into the run's model.

    Only the weights are read (verified against the manifest first): never the trainer state,
    and no RNG state is restored. A run folder loads its newest checkpoint whose weights verify.
    Under LoRA the checkpoint holds the adapters only: the runtime, built with the run's
    ``model.*`` settings, provides the base.
    """
    candidates = resolve_checkpoint(path)

    def load(candidate: Path) -> checkpoint.Manifest:
        return load_model_weights(candidate, rt.model, map_location=rt.device)

    found = checkpoint.first_loadable(candidates, load, where=path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path} (expected a ckpt-XXXXXX folder or a run)")
    rt.policy.sync(rt.model)
    return found[0]


def resolve_checkpoint(path: Path) -> list[Path]:
    """A checkpoint folder as given, or the checkpoints of a run folder, newest first."""
    if checkpoint.is_checkpoint_folder(path) or (path / checkpoint.MANIFEST).is_file():
        return [path]
    return list(reversed(checkpoint.all_checkpoints(path)))


@hydra.main(config_path="pkg://configs", config_name="evaluate", version_base="1.3")
def main(tree: DictConfig) -> None:
    """Hydra entry point: ``python -m agents.evaluate env=alfworld split=valid_unseen ...``.

    Every setting is checked before any work (the env of each split, the model when it is
    evaluated); a configuration error is printed alone (exit status 2).
    """
    with cli_errors(tree):
        container = to_container(tree)
        fields = {f.name for f in dataclasses.fields(EvalRequest)}
        request = EvalRequest(**{k: container.pop(k) for k in list(container) if k in fields})
        cfg = build_run_config(container)
        splits = request.split if isinstance(request.split, list) else [request.split]
        for split in splits:
            check_env(with_split(cfg, split))
        if request.policy == "model":
            check_model(cfg)
        report = run_evaluation(cfg, request)
    print(report.to_markdown())


if __name__ == "__main__":
    register_env_configs()
    main()
