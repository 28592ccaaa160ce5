"""Train a policy: ``python -m agents.train env=alfworld`` (Hydra overrides, ``configs/``).

One iteration: collect rollouts (:mod:`agents.rollout.manager`) -> advantages (the configured
protocol) -> :func:`~agents.types.collate` -> :meth:`Learner.update` (p from the learner's own
schedule) -> the generator's weights synced (``policy.sync``) -> metrics, checkpoint, and every
``trainer.eval_every`` iterations a per-subtask evaluation report.
Hydra is seen here, in ``agents/evaluate.py`` and in ``agents/run/`` (the glue); the engine
folders (generation, rollout, training) get typed dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from agents.config import ConfigError, RunConfig, build_run_config
from agents.evaluation.episodes import eval_tasks, evaluate_stages, finish_reports
from agents.export import export_runtime
from agents.rollout import curriculum
from agents.rollout.curriculum import TaskSampler, rollout_seed
from agents.rollout.env_pool import EnvWorkerError
from agents.run.cli import register_env_configs, to_container, with_hydra_run_dir
from agents.run.metrics import MetricsWriter
from agents.run.preflight import check_renamed, cli_errors, preflight
from agents.run.runtime import Runtime, build_runtime, local_groups, seed_everything
from agents.training import checkpoint
from agents.training.distributed import (
    all_gather_list,
    all_reduce_metrics,
    barrier,
    close_distributed,
)
from agents.training.learner import Learner
from agents.types import Batch, collate
from protocols import StepSamples, compute_advantages

log = logging.getLogger("agents.train")


@dataclass(frozen=True)
class IterationResult:
    """What one training iteration produced."""

    metrics: dict[str, float]
    """All metrics of the iteration (``rollout/``, ``adv/``, ``loss/``, ``holder/``, ``time/``)."""
    p: float
    """The Hölder order used."""


def train(cfg: RunConfig) -> Path:
    """Run training as configured (one process, or one rank under ``torchrun``)."""
    with build_runtime(cfg) as rt:
        main = rt.ctx.is_main
        tree = _config_tree(cfg) if main else None  # run_config.json and the trackers' config
        if tree is not None:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "run_config.json").write_text(json.dumps(tree, indent=2))
        learner = rt.build_learner()
        sampler = _sampler(cfg)
        start = _maybe_resume(cfg, rt, learner, sampler)
        with MetricsWriter(
            cfg.run_dir, loggers=cfg.trainer.loggers, config=tree, enabled=main
        ) as writer:
            writer.truncate(start)
            if start == 0 and cfg.trainer.eval_before:  # where the curves start (iteration 0)
                _evaluate(cfg, rt, 0)
            if start == 0 and cfg.trainer.bc_epochs:  # a resumed run has its warm start already
                warm = warm_start(cfg, rt, learner)
                if main:
                    (cfg.run_dir / WARM_START_FILE).write_text(json.dumps(warm, indent=2))
                    log.info("warm start: %s", _warm_summary(warm))
            saved = start  # iterations the newest checkpoint holds
            for it in _progress(range(start, cfg.trainer.iterations), cfg, enabled=main):
                try:
                    result = run_iteration(cfg, rt, learner, it, sampler)
                except EnvWorkerError as exc:  # no env of a reset left: keep what was learned
                    _save_before_stop(cfg, rt, learner, it, saved, sampler, exc)
                    raise
                if _due(it, cfg.trainer.eval_every, cfg.trainer.iterations):
                    result.metrics.update(_evaluate(cfg, rt, it + 1))
                writer.write(it, result.metrics)
                if main:
                    log.info(_summary(it, cfg.trainer.iterations, result))
                if _due(it, cfg.trainer.save_every, cfg.trainer.iterations):
                    _save(cfg, rt, learner, it, result.p, sampler)
                    saved = it + 1
        if main:
            finish_reports(cfg.run_dir)
        if cfg.trainer.export:  # <run_dir>/export, a Hugging Face model folder
            export_runtime(rt)
    close_distributed()
    return cfg.run_dir


def run_iteration(
    cfg: RunConfig, rt: Runtime, learner: Learner, it: int, sampler: TaskSampler | None = None
) -> IterationResult:
    """Rollout (this rank's groups, tasks from the sampler), advantages and one learner update."""
    seed_everything(cfg.trainer.seed, it, rt.ctx.rank)
    if sampler is None:  # the tasks of curriculum=uniform
        sampler = curriculum.UniformSampler(cfg.curriculum, seed=cfg.trainer.seed, num_tasks=None)
    tasks = sampler.plan(
        it, rank=rt.ctx.rank, world_size=rt.ctx.world_size, num_groups=local_groups(cfg, rt.ctx)
    )
    guided = cfg.rollout.guided_at(it, cfg.trainer.iterations)
    t0 = time.perf_counter()
    with rt.policy.generating():
        trajectories, rollout_metrics = rt.rollout.collect(
            len(tasks),
            cfg.rollout.group_size,
            cfg.rollout.max_turns,
            seed=rollout_seed(cfg.trainer.seed, it, rt.ctx.rank),
            group_seeds=[t.seed for t in tasks],
            group_options=[t.reset_options for t in tasks],
            group_turns=[t.turns for t in tasks],
            guided=guided,
        )
    curriculum_metrics = curriculum.observe(
        sampler, tasks, trajectories, partial(all_gather_list, ctx=rt.ctx)
    )
    t1 = time.perf_counter()
    samples = StepSamples.from_trajectories(trajectories)
    advantages, adv_metrics = compute_advantages(samples, cfg.protocol)
    batch = collate(samples.steps, advantages, pad_id=rt.pad_id, max_length=cfg.trainer.max_length)
    batch = without_rows(batch, ~samples.trainable)  # groups cut by a dead env worker
    learn_metrics = learner.update(batch, it)  # p from the learner's schedule (holder/p)
    rt.policy.sync(rt.model)  # the next rollout samples the updated policy (a no-op for hf)
    t2 = time.perf_counter()
    local = {
        **rollout_metrics,
        **adv_metrics,
        "time/rollout_s": t1 - t0,
        "time/learn_s": t2 - t1,
        "time/iteration_s": t2 - t0,
        "rollout/step_samples": float(len(samples)),
        "rollout/guided": float(guided),
    }
    metrics = {
        **all_reduce_metrics(local, rt.ctx),  # means over the ranks
        **learn_metrics,  # already reduced by the learner
        **curriculum_metrics,  # every rank's groups already
    }
    return IterationResult(metrics=metrics, p=learn_metrics["holder/p"])


WARM_START_FILE = "warm_start.json"
"""The warm start's metrics (``bc/…``, ``time/…``) in the run folder."""


def warm_start(cfg: RunConfig, rt: Runtime, learner: Learner) -> dict[str, float]:
    """Behaviour cloning on the expert's trajectories of every training task (``bc_epochs``).

    Each task of the training env is played once by its expert through the rollout manager (all
    rollouts guided: the prompts, history window and tokenisation of the RL rollouts) within the
    env's own step limit (``rollout.max_turns`` for an env without one); the winning
    trajectories' actions are cloned by :meth:`Learner.imitate` with the run's optimizer. Tasks
    are split over the ranks.

    Raises:
        ConfigError: the env has no finite task list.
        RuntimeError: no demonstration won.
    """
    num_tasks, _ = curriculum.env_tasks(cfg.env.name, cfg.env.kwargs)
    if not num_tasks:
        raise ConfigError(
            f"trainer.bc_epochs={cfg.trainer.bc_epochs} clones the expert on every training "
            f"task, but env {cfg.env.name!r} has no finite task list; set trainer.bc_epochs=0"
        )
    seeds = list(range(rt.ctx.rank, num_tasks, rt.ctx.world_size))
    turns = eval_tasks(cfg, 1).step_limit or cfg.rollout.max_turns  # the env's own limit
    chunk = rt.pool.num_envs
    t0 = time.perf_counter()
    demos = []
    with rt.policy.generating():
        for first in range(0, len(seeds), chunk):
            part = seeds[first : first + chunk]
            trajs, _ = rt.rollout.collect(len(part), 1, turns, seed=0, group_seeds=part, guided=1)
            demos += [t for t in trajs if t.success]
    t1 = time.perf_counter()
    won = sum(all_gather_list([len(demos)], rt.ctx))  # the demonstrations of every rank
    if not won:
        raise RuntimeError(
            f"the warm start's {num_tasks} expert demonstrations all failed within {turns} turns; "
            "check the env's expert_plan (python -m agents.evaluate policy=expert)"
        )
    steps = [s for t in demos for s in t.steps]
    ones = np.ones(len(steps))  # the NLL ignores advantages
    batch = collate(steps, ones, pad_id=rt.pad_id, max_length=cfg.trainer.max_length)
    metrics = learner.imitate(batch, epochs=cfg.trainer.bc_epochs, lr=cfg.trainer.bc_lr)
    rt.policy.sync(rt.model)
    return {
        **metrics,
        "bc/demonstrations": float(won),
        "bc/tasks": float(num_tasks),
        "time/bc_collect_s": t1 - t0,
    }


def _warm_summary(m: Mapping[str, float]) -> str:
    return (
        f"{m['bc/demonstrations']:.0f} of {m['bc/tasks']:.0f} tasks demonstrated, "
        f"{m['bc/rows']:.0f} steps, {m['bc/optimizer_steps']:.0f} optimizer steps, token NLL "
        f"{m['bc/loss_first']:.3f} -> {m['bc/loss']:.3f}, collect {m['time/bc_collect_s']:.0f}s "
        f"learn {m['time/bc_s']:.0f}s"
    )


def without_rows(batch: Batch, drop: np.ndarray) -> Batch:
    """``batch`` with the ``drop`` rows ([N] bool) out of the loss: no loss token, advantage 0.

    The rows stay (as the padding rows of a data-parallel batch do), so every rank keeps its row
    count; a row without loss tokens adds nothing to the loss, its normaliser or the gradient, and
    the learner runs no forward for it.
    """
    if not drop.any():
        return batch
    keep = torch.from_numpy(~drop).to(batch.loss_mask.device)  # [N]
    return dataclasses.replace(
        batch,
        loss_mask=batch.loss_mask * keep[:, None].to(batch.loss_mask.dtype),
        advantages=batch.advantages * keep.to(batch.advantages.dtype),
    )


def _sampler(cfg: RunConfig) -> TaskSampler:
    """The run's task sampler, fresh (a resume restores its state from the checkpoint)."""
    sampler_cls = curriculum.SAMPLERS[cfg.curriculum.name]
    num_tasks, subtasks = None, None
    if sampler_cls.needs_num_tasks:
        num_tasks, subtasks = curriculum.env_tasks(cfg.env.name, cfg.env.kwargs)
    return sampler_cls(
        cfg.curriculum, seed=cfg.trainer.seed, num_tasks=num_tasks, subtasks=subtasks
    )


def sampler_state(
    sampler: TaskSampler, path: Path, manifest: checkpoint.Manifest
) -> dict[str, object] | None:
    """The sampler state checkpoint ``path`` resumes from, checked; ``None`` when stateless.

    A checkpoint holds it as ``curriculum.json``, verified against the manifest's sha256; one of
    format 1 (an earlier version) as ``curriculum/state-XXXXXX.json`` beside it, unchecked.

    Raises:
        CheckpointError: the state is missing, damaged or not the sampler's (an older
            checkpoint may hold a good one).
        ConfigError: it is the state of another curriculum than ``curriculum=``.
    """
    if not sampler.stateful:
        return None
    if curriculum.STATE_FILE in manifest.files:
        source = path / curriculum.STATE_FILE
        blob = checkpoint.read_document(path, curriculum.STATE_FILE, manifest)
    elif manifest.format == 1:
        source = curriculum.legacy_state_file(path.parent, manifest.iteration)
        try:
            blob = json.loads(source.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:  # missing, UnicodeDecodeError, JSONDecodeError
            raise checkpoint.CheckpointError(
                f"{source}, the curriculum state of {path.name}, does not read ({exc})"
            ) from exc
    else:
        raise checkpoint.CheckpointError(
            f"{path} holds no {curriculum.STATE_FILE}, which curriculum={sampler.name} resumes "
            "from (if the run was started with another curriculum, resume with that one)"
        )
    try:
        curriculum.check_state(sampler, blob, source)
    except curriculum.StateError as exc:
        raise checkpoint.CheckpointError(str(exc)) from exc
    except ValueError as exc:  # another curriculum's state: no older checkpoint differs
        raise ConfigError(str(exc)) from exc
    return dict(blob)


def _evaluate(cfg: RunConfig, rt: Runtime, iteration: int) -> dict[str, float]:
    """Rank 0 evaluates (the others hold the gathered weights and wait); returns its metrics."""
    metrics: dict[str, float] = {}
    with rt.policy.generating():
        if rt.ctx.is_main:
            metrics = evaluate_stages(cfg, rt, iteration=iteration)
    barrier(rt.ctx)
    return metrics


def _maybe_resume(cfg: RunConfig, rt: Runtime, learner: Learner, sampler: TaskSampler) -> int:
    """Remove stale checkpoint temporaries, then resume if asked; returns the first iteration.

    ``resume=true`` loads the newest checkpoint that verifies, the task sampler's state in it
    included (older ones are the fallback, each skip logged with its reason). A run folder with
    no checkpoint starts from iteration 0 with a warning; one whose checkpoints all fail
    verification is an error (starting over would overwrite its metrics and, after
    ``trainer.keep`` saves, delete folders that might be saved).
    """
    if rt.ctx.is_main:
        checkpoint.remove_stale(cfg.run_dir)
    barrier(rt.ctx)
    if not cfg.resume:
        return 0
    check = partial(sampler_state, sampler)
    found = checkpoint.resume_checkpoint(cfg.run_dir, learner=learner, check=check)
    if found is None:
        log.warning("resume=true but %s has no checkpoint; starting from iteration 0", cfg.run_dir)
        return 0
    path, state = found
    blob = sampler_state(sampler, path, checkpoint.read_manifest(path))  # rank 0 checked it
    if blob is not None:
        curriculum.restore_state(sampler, blob, path / curriculum.STATE_FILE)
    rt.policy.sync(rt.model)
    log.info("resumed from %s (iteration %d, p=%.3f)", path, state.iteration, state.p)
    return state.iteration


def _save(
    cfg: RunConfig, rt: Runtime, learner: Learner, it: int, p: float, sampler: TaskSampler
) -> None:
    """Checkpoint after iteration ``it``: the learner, and the task sampler's state beside it."""
    state = checkpoint.TrainingState(
        iteration=it + 1, optimizer_steps=int(learner.scheduler.last_epoch), p=p
    )
    layout = checkpoint.run_layout(rt.ctx)  # one process: model.safetensors; torchrun: shards
    document = curriculum.state_document(sampler)
    checkpoint.save_checkpoint(
        cfg.run_dir,
        learner=learner,
        state=state,
        keep=cfg.trainer.keep,
        layout=layout,
        documents={curriculum.STATE_FILE: document} if document is not None else None,
    )


def _save_before_stop(
    cfg: RunConfig,
    rt: Runtime,
    learner: Learner,
    it: int,
    saved: int,
    sampler: TaskSampler,
    exc: EnvWorkerError,
) -> None:
    """Checkpoint the iterations done since the last save before iteration ``it`` stops the run.

    The failed iteration stopped in its rollout, before any update, so the learner holds
    iteration ``it - 1``'s state; ``resume=true`` reruns iteration ``it`` from there, as the run
    would have. One process only: under torchrun the other ranks are not at this point.
    """
    if it == saved or rt.ctx.world_size > 1:
        exc.add_note(f"the newest checkpoint holds iteration {saved}; resume=true continues there")
        return
    _save(cfg, rt, learner, it - 1, learner.p_at(it - 1), sampler)  # the p that update used
    log.error("iteration %d stopped (env workers); iteration %d is checkpointed", it + 1, it)
    exc.add_note(f"iteration {it} was checkpointed before stopping; resume=true continues there")


def _due(it: int, every: int, total: int) -> bool:
    """Whether iteration ``it`` (0-based) ends a period of ``every``; the last one always does."""
    return it + 1 == total or (every > 0 and (it + 1) % every == 0)


def _progress(iterations: range, cfg: RunConfig, *, enabled: bool) -> Iterable[int]:
    from tqdm.auto import tqdm

    return tqdm(
        iterations,
        desc=f"train {cfg.env.name}",
        unit="it",
        initial=iterations.start,
        total=cfg.trainer.iterations,
        disable=not enabled,
    )


def _summary(it: int, total: int, result: IterationResult) -> str:
    m = result.metrics
    nan = float("nan")
    return (
        f"iter {it + 1}/{total} | reward {m.get('rollout/reward_mean', nan):.3f} "
        f"| success {m.get('rollout/success_rate', nan):.2f} "
        f"| invalid {m.get('rollout/invalid_action_rate', nan):.2f} "
        f"| A!=0 {1 - m.get('adv/zero_frac', nan):.2f} | p {result.p:+.2f} "
        f"| loss {m.get('loss/total', nan):+.4f} "
        f"| gen {m.get('rollout/time_generate_s', 0):.1f}s "
        f"env {m.get('rollout/time_env_s', 0):.1f}s learn {m.get('time/learn_s', 0):.1f}s"
    )


def _config_tree(cfg: RunConfig) -> dict[str, object]:
    """The resolved run config as plain JSON values (``run_config.json``, the trackers' config)."""

    def default(o: object) -> object:
        if isinstance(o, Path):
            return str(o)
        return dict(o) if isinstance(o, Mapping) else repr(o)

    return dict(json.loads(json.dumps(dataclasses.asdict(cfg), default=default)))


@hydra.main(config_path="pkg://configs", config_name="config", version_base="1.3")
def main(tree: DictConfig) -> None:
    """Hydra entry point; a configuration error is printed alone (exit status 2)."""
    with cli_errors(tree):
        container = with_hydra_run_dir(to_container(tree))
        train(preflight(build_run_config(container)))


if __name__ == "__main__":
    register_env_configs()
    with cli_errors({}):
        check_renamed(sys.argv[1:])
    main()
