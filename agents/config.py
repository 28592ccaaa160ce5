"""The run configuration as typed dataclasses, built once from the composed config tree.

``agents/train.py`` composes the YAML tree with Hydra and hands :func:`build_run_config` a plain
dict; everything after that sees only the dataclasses below (and the ones beside their code:
``holderpo.loss.LossConfig``, ``holderpo.schedule.PSchedule``, ``protocols.ProtocolConfig``,
``agents.training.learner.LearnerConfig``, ``agents.rollout.manager.RolloutConfig``). A bad value
fails here, before any work, with a message naming the key and the fix.

Each default lives in one place. A section only the config tree builds (:class:`EnvConfig`,
:class:`ModelConfig`, :class:`RolloutSection`, :class:`TrainerSection`) has no defaults: its YAML
(``configs/env/``, ``configs/model/``, ``configs/rollout/default.yaml``, the ``trainer:`` block of
``configs/config.yaml``) holds every value. A dataclass that code also builds directly
(``LearnerConfig``, ``CurriculumConfig``, ``ProtocolConfig``, ``VLLMSettings``, ``LoraSettings``,
``PSchedule``, the loss presets) holds its defaults, and a YAML that lists one of its fields (so
that the composed tree shows it and Hydra can override it) states the same value, or ``???``.
``tests/agents/test_config_defaults.py`` checks both rules for every YAML key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

from agents.generation.backends import BACKENDS
from agents.generation.vllm import VLLMSettings
from agents.rollout.curriculum import CurriculumConfig
from agents.training.learner import LearnerConfig
from agents.training.lora import LoraSettings
from holderpo.correction import RolloutCorrection
from holderpo.loss import PRESETS, LossConfig
from holderpo.schedule import PSchedule
from protocols import ProtocolConfig
from protocols import available as available_protocols
from protocols.registry import min_group_size

MAX_SEED: Final = 2**32 - 1
"""Largest ``trainer.seed``: NumPy's legacy seeding (``np.random.seed``, which transformers and
vLLM call with the run's seed) takes ``0 .. 2**32 - 1``."""

MIN_PROMPT_TOKENS: Final = 64
"""Prompt tokens a training row keeps at least: ``trainer.max_length`` must leave this much room
beside ``rollout.max_new_tokens`` (longer rows lose the head of their prompt)."""

UNSET: Final = "???"
"""A config value that is not set (OmegaConf's missing value): the preset's or the default."""

RENAMED_KEYS: Final[Mapping[str, tuple[str, str]]] = {
    "rollout.max_steps": (
        "rollout.max_turns",
        "the policy's turns per episode; the env's own step limit is env.kwargs.max_steps",
    ),
}
"""Keys that were renamed: old key -> (new key, what it means). The old key on the command line
(:func:`agents.run.preflight.check_renamed`) or in a config file fails naming the new one."""

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which key and how to fix it."""


@dataclass(frozen=True)
class EnvConfig:
    """Which environment to train and evaluate on (``configs/env/<name>.yaml``; no defaults)."""

    name: str
    """Registered env name (``envs.registered()``)."""
    prompt: str
    """Prompt template name (``configs/prompts/<prompt>.yaml``)."""
    kwargs: Mapping[str, Any]
    """Keyword arguments of ``envs.make`` for training."""
    eval_kwargs: Mapping[str, Any]
    """Overrides of ``kwargs`` for evaluation (e.g. another split)."""
    split_key: str | None
    """The ``kwargs`` key that selects a split/benchmark (``split=`` of ``agents.evaluate``)."""


@dataclass(frozen=True)
class ModelConfig:
    """The policy model (``configs/model/<name>.yaml``; no defaults)."""

    name: str
    """Built-in name (``tiny``, ``smollm2_135m``), a local folder, or a hub id."""
    dtype: str
    """``float32`` | ``bfloat16`` | ``float16``: the autocast dtype of generation and of the
    learner's forward/backward on GPU (the weights stay float32). CPU runs in float32 (bfloat16
    autocast measured faster there but with log-probs off by ~2e-2, see ``docs/models.md``)."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass (less memory, one more forward per update)."""
    cache_dir: str | None
    """Where built-in models are built and cached."""
    lora: LoraSettings
    """LoRA adapters (``model.lora.r > 0`` turns them on; peft, the ``lora`` extra)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"model.dtype={self.dtype!r} is not supported; use float32, bfloat16 or float16"
            )


@dataclass(frozen=True)
class RolloutSection:
    """How rollouts are collected (``configs/rollout/default.yaml`` holds every value; no defaults).

    The fields that :class:`agents.rollout.manager.RolloutConfig` also has (``temperature``,
    ``top_p``, ``max_new_tokens``, ``history_window``, ``constrained``) reach it by name
    (:func:`agents.run.runtime.rollout_config`).
    """

    num_groups: int
    """Games/problems per iteration."""
    group_size: int
    """Rollouts per game (they share the reset seed)."""
    guided: int
    """Rollouts per group (of ``group_size``) that follow the env's expert plan (off-policy
    guidance, :mod:`agents.rollout.manager`); 0: every rollout samples the policy."""
    guided_anneal: float | None
    """Share of ``trainer.iterations`` over which ``guided`` falls linearly to 0 (rounded up:
    :meth:`guided_at`); None: ``guided`` in every iteration."""
    max_turns: int
    """The policy's turns per episode (the env's own step limit, e.g. ``env.kwargs.max_steps``,
    still applies; the expert actions of a curriculum stage are not turns)."""
    history_window: int
    """Recent (observation, action) pairs in the prompt; -1 for the whole history."""
    temperature: float
    """Sampling temperature."""
    top_p: float
    """Nucleus mass."""
    max_new_tokens: int
    """Tokens per response."""
    constrained: bool
    """Decode only admissible actions."""
    backend: str
    """Generator backend (``agents.generation.backends.BACKENDS``): ``hf`` generates with the
    training model
    itself; ``vllm`` runs a vLLM engine beside it (the ``vllm`` extra) whose weights are synced
    after every update."""
    vllm: VLLMSettings
    """The vLLM engine's mode and memory settings (``rollout.backend=vllm``)."""
    generator_savings: bool
    """The transformers generator's savings (output head on the last prompt position only, one
    prefill per distinct prompt, a KV cache filled in place); false runs the plain loop (same
    samples; benchmarks)."""
    pool: str
    """``serial`` or ``ray``."""
    num_workers: int
    """Ray env actors."""
    ray_address: str | None
    """``None`` starts a local Ray; ``"auto"`` joins a running cluster."""
    step_timeout_s: float
    """Ray pool: longest wait for an env actor's answer to one reset/step; past it the actor is
    killed and replaced and its episodes are cut (their groups are left out of the update)."""
    heartbeat_timeout_s: float | None
    """Ray pool: an env actor whose heartbeats (one a second, from a thread of its own) stop this
    long while a call waits on it (a stopped or frozen process) is replaced like a timed-out one,
    long before ``step_timeout_s``; ``null``: no heartbeats."""
    worker_attempts: int
    """Ray pool: actors tried for one reset (the first and fresh replacements) before its envs'
    episodes are cut (the run stops only when no env of the reset is left)."""

    def guided_at(self, iteration: int, iterations: int) -> int:
        """Guided rollouts per group at ``iteration`` (0-based) of ``iterations``.

        ``ceil(guided * (1 - iteration / (guided_anneal * iterations)))``, at least 0: the full
        count at iteration 0, none from iteration ``guided_anneal * iterations`` on.
        """
        if self.guided_anneal is None or self.guided == 0:
            return self.guided
        left = 1.0 - iteration / (self.guided_anneal * iterations)
        return max(0, math.ceil(round(self.guided * left, 9)))

    def __post_init__(self) -> None:
        if self.guided_anneal is not None and not 0.0 < self.guided_anneal <= 1.0:
            raise ConfigError(
                f"rollout.guided_anneal must be in (0, 1] (the share of the iterations over "
                f"which rollout.guided falls to 0) or null, got {self.guided_anneal}; e.g. "
                "rollout.guided_anneal=0.75 plays no guided rollout in the last quarter"
            )
        keys = ("num_groups", "group_size", "max_turns", "max_new_tokens", "num_workers")
        for key in (*keys, "worker_attempts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rollout.{key} must be >= 1, got {getattr(self, key)}")
        if self.history_window < -1:
            raise ConfigError(
                f"rollout.history_window must be >= 0, or -1 for the whole history; got "
                f"{self.history_window}"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if not self.step_timeout_s > 0:
            raise ConfigError(
                f"rollout.step_timeout_s must be > 0 seconds, got {self.step_timeout_s}"
            )
        if self.heartbeat_timeout_s is not None and not self.heartbeat_timeout_s > 1:
            raise ConfigError(
                "rollout.heartbeat_timeout_s must be > 1 second (actors beat once a second) or "
                f"null (no heartbeats), got {self.heartbeat_timeout_s}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"rollout.backend={self.backend!r} is unknown; use rollout.backend=<one of "
                f"{sorted(BACKENDS)}>"
            )
        if self.pool not in ("serial", "ray"):
            raise ConfigError(
                f"rollout.pool={self.pool!r}: use rollout.pool=serial or rollout.pool=ray"
            )
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ConfigError(
                f"rollout.temperature must be > 0, got {self.temperature} (evaluation is greedy)"
            )


@dataclass(frozen=True)
class TrainerSection:
    """Run-level settings that are not the learner's.

    The ``trainer:`` block of ``configs/config.yaml`` less the :class:`LearnerConfig` keys
    (:func:`build_trainer`); that block holds every value (no defaults).
    """

    iterations: int
    """Training iterations."""
    seed: int
    """Seed of everything random in the run (the learner's mini-batch shuffling too)."""
    save_every: int
    """Checkpoint every k iterations and after the last one (0: only after the last one)."""
    keep: int
    """Checkpoints kept on disk (the newest ``keep``; an older one is the fallback of a resume
    whose newest checkpoint does not verify)."""
    eval_every: int
    """Evaluate every k iterations (0: only at the end)."""
    eval_episodes: int
    """Episodes per evaluation."""
    eval_stop_cycles: bool
    """Greedy evaluation stops an episode whose env state and prompt recur and scores it as
    played to its turn limit (the same report, sooner; envs that give ``info["state_key"]``)."""
    bc_epochs: int
    """Warm start by behaviour cloning before the first iteration: passes over the expert's
    trajectories of every training task, rendered through the rollout's prompt template
    (:func:`agents.train.warm_start`); 0: none."""
    bc_lr: float | None
    """Learning rate of the warm start's steps; None: ``trainer.lr``. Supervised steps on
    demonstrations tolerate a larger step than the RL updates that follow them."""
    eval_max_turns: int | None
    """The policy's turns per whole-game evaluation episode; None: the env's own step limit
    (ALFWorld's ``max_steps``, 50, as the official evaluation), or ``rollout.max_turns`` for an
    env without one. A stage ``k`` gets training's budget there (``curriculum.turn_slack``)."""
    eval_before: bool
    """Evaluate once before the first iteration too (iteration 0 of the reports and plots)."""
    eval_baselines: bool
    """Evaluations also report random admissible actions and the best single-verb rule at the
    same stages (envs with admissible actions and expert plans; played once per run)."""
    max_length: int
    """Longest prompt+response a training row keeps."""
    device: str
    """``auto`` | ``cpu`` | ``cuda``."""
    torch_threads: int
    """torch intra-op threads (0 leaves the default)."""
    loggers: tuple[str, ...]
    """Metric sinks beside ``metrics.jsonl`` (``agents.run.metrics.LOGGERS``): ``tensorboard``,
    ``wandb``, ``mlflow`` (both offline, under the run folder; the ``trackers`` extra)."""
    export: bool
    """Write the trained policy as a Hugging Face model folder, ``<run_dir>/export``, at the end
    (``agents/export.py``)."""

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"trainer.iterations must be >= 1, got {self.iterations}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(
                f"trainer.seed={self.seed} is out of range: a seed is an integer in "
                f"[0, {MAX_SEED}] (NumPy's seeding, which the generators use, takes no other); "
                "e.g. trainer.seed=0"
            )
        if self.keep < 1 or self.save_every < 0:
            raise ConfigError(
                f"trainer.keep must be >= 1 and trainer.save_every >= 0 (got keep={self.keep}, "
                f"save_every={self.save_every}); e.g. trainer.keep=2 trainer.save_every=5"
            )
        if self.eval_every < 0:
            raise ConfigError(
                f"trainer.eval_every must be >= 0 (0: only after the last iteration), got "
                f"{self.eval_every}"
            )
        if self.eval_episodes < 1:
            raise ConfigError(f"trainer.eval_episodes must be >= 1, got {self.eval_episodes}")
        if type(self.bc_epochs) is not int or self.bc_epochs < 0:
            raise ConfigError(
                f"trainer.bc_epochs must be an integer >= 0 (0: no warm start), got "
                f"{self.bc_epochs!r}; e.g. trainer.bc_epochs=3"
            )
        if self.bc_lr is not None and not (
            isinstance(self.bc_lr, float | int) and math.isfinite(self.bc_lr) and self.bc_lr > 0
        ):
            raise ConfigError(
                f"trainer.bc_lr must be a finite number > 0 or null (null: trainer.lr), got "
                f"{self.bc_lr!r}; e.g. trainer.bc_lr=5e-5"
            )
        turns = self.eval_max_turns
        if turns is not None and (type(turns) is not int or turns < 1):
            raise ConfigError(
                f"trainer.eval_max_turns must be an integer >= 1 (or null: the env's step "
                f"limit), got {turns!r}; e.g. trainer.eval_max_turns=50"
            )
        if self.max_length < 1 or self.torch_threads < 0:
            raise ConfigError(
                f"trainer.max_length must be >= 1 and trainer.torch_threads >= 0 (got "
                f"{self.max_length}, {self.torch_threads})"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"trainer.device={self.device!r}: use auto, cpu or cuda")
        loggers = (self.loggers,) if isinstance(self.loggers, str) else tuple(self.loggers or ())
        object.__setattr__(self, "loggers", loggers)  # names checked by agents.run.preflight


@dataclass(frozen=True)
class RunConfig:
    """Everything a training or evaluation run needs."""

    env: EnvConfig
    """Environment."""
    loss: LossConfig
    """Loss preset with its overrides."""
    p_schedule: PSchedule
    """The p of the Hölder mean over training (total steps = iterations)."""
    rollout_correction: RolloutCorrection
    """Correction of the gap between π_old and the generator's log-probs
    (``algorithm.rollout_correction``)."""
    protocol: ProtocolConfig
    """Advantage protocol."""
    model: ModelConfig
    """Policy model."""
    rollout: RolloutSection
    """Rollout collection."""
    learner: LearnerConfig
    """Optimisation."""
    trainer: TrainerSection
    """Run-level settings."""
    run_dir: Path
    """Output folder (config, metrics, checkpoints, reports)."""
    resume: bool
    """Continue from the newest checkpoint in ``run_dir``."""
    curriculum: CurriculumConfig
    """Which tasks each iteration plays and the evaluation stages (``configs/curriculum/``)."""


_LEARNER_KEYS = {f.name for f in dataclasses.fields(LearnerConfig)} - {"seed"}


def build_run_config(tree: Mapping[str, Any]) -> RunConfig:
    """Turn the composed config tree (a plain dict) into a :class:`RunConfig`.

    Every value is type- and range-checked here, and so are the rules across sections
    (:func:`check_across`); what needs the env or the model is checked by
    :func:`agents.run.preflight.preflight` before any work.
    """
    trainer_cfg, learner_cfg = build_trainer(_section(tree, "trainer"))
    loss, schedule, correction = _algorithm(_section(tree, "algorithm"), trainer_cfg.iterations)
    protocol = _build(ProtocolConfig, _section(tree, "protocol"), "protocol")
    if protocol.name not in available_protocols():
        raise ConfigError(
            f"protocol.name={protocol.name!r} is unknown; choose protocol=<one of "
            f"{available_protocols()}>"
        )
    run = RunConfig(
        env=_build(EnvConfig, _section(tree, "env"), "env"),
        loss=loss,
        p_schedule=schedule,
        rollout_correction=correction,
        protocol=protocol,
        model=_model(_section(tree, "model")),
        rollout=_rollout(_section(tree, "rollout")),
        learner=learner_cfg,
        trainer=trainer_cfg,
        run_dir=Path(str(tree["run_dir"])) if "run_dir" in tree else _missing("run_dir"),
        resume=_flag(tree, "resume"),
        curriculum=_build(CurriculumConfig, _section(tree, "curriculum"), "curriculum"),
    )
    check_across(run)
    return run


def build_trainer(section: Mapping[str, Any]) -> tuple[TrainerSection, LearnerConfig]:
    """The ``trainer:`` block as its two dataclasses.

    The :class:`LearnerConfig` keys (optimisation) go to the learner, the others to
    :class:`TrainerSection`; ``trainer.seed`` seeds both (the learner shuffles mini-batches).
    """
    values = dict(section)
    learner_part = {k: values.pop(k) for k in list(values) if k in _LEARNER_KEYS}
    if isinstance(learner_part.get("adam_betas"), list):  # YAML/Hydra lists: the field's tuple
        learner_part["adam_betas"] = tuple(learner_part["adam_betas"])
    trainer = _build(TrainerSection, values, "trainer", also_valid=_LEARNER_KEYS)
    learner = _build(LearnerConfig, {**learner_part, "seed": trainer.seed}, "trainer")
    _check_learner(learner)
    return trainer, learner


def _section(tree: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The tree's ``key`` section as a new dict (the root config composes every one)."""
    value = tree.get(key)
    if not isinstance(value, Mapping):
        _missing(key)
    return dict(value)


def _missing(key: str) -> NoReturn:
    raise ConfigError(
        f"the config has no {key!r}; compose it from configs/config.yaml (which sets every "
        f"section) or set {key}=..."
    )


def _flag(tree: Mapping[str, Any], key: str) -> bool:
    """A top-level boolean of the tree (``resume=maybe`` is an error, not ``True``)."""
    value = tree.get(key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def check_across(run: RunConfig) -> None:
    """The rules that tie sections together (a bad combination raises naming the keys)."""
    need = min_group_size(run.protocol.name)
    if run.rollout.group_size < need:
        raise ConfigError(
            f"protocol={run.protocol.name} compares the rollouts of a group, so it needs "
            f"rollout.group_size >= {need} (got {run.rollout.group_size}: every advantage would "
            f"be 0 or uncentred); set rollout.group_size={max(need, 4)}"
        )
    if not 0 <= run.rollout.guided < run.rollout.group_size:
        raise ConfigError(
            f"rollout.guided={run.rollout.guided} must be in [0, rollout.group_size="
            f"{run.rollout.group_size}): at least one rollout per group samples the policy"
        )
    correction = run.rollout_correction
    if correction.enabled and run.learner.old_logprobs != "recompute":
        raise ConfigError(
            f"algorithm.rollout_correction.mode={correction.mode} weighs π_old (the trainer's "
            f"recompute) against the generator's log-probs, but trainer.old_logprobs="
            f"{run.learner.old_logprobs} makes them the same; set trainer.old_logprobs=recompute "
            f"or algorithm.rollout_correction.mode=none"
        )
    room = run.rollout.max_new_tokens + MIN_PROMPT_TOKENS
    if run.trainer.max_length < room:
        raise ConfigError(
            f"trainer.max_length={run.trainer.max_length} leaves no room for the prompt beside "
            f"rollout.max_new_tokens={run.rollout.max_new_tokens} (rows longer than max_length "
            f"lose the head of their prompt); set trainer.max_length >= {room}"
        )


def _check_learner(cfg: LearnerConfig) -> None:
    """Ranges of the learner's settings that its own dataclass leaves open."""
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"trainer.lr must be a finite number > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0 or cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise ConfigError(
            f"trainer.warmup_steps, trainer.weight_decay and trainer.grad_clip must be >= 0 (got "
            f"{cfg.warmup_steps}, {cfg.weight_decay}, {cfg.grad_clip}; grad_clip=0 disables it)"
        )


def _model(section: dict[str, Any]) -> ModelConfig:
    lora = dict(section.pop("lora", None) or {})  # null: LoraSettings' defaults (LoRA off)
    if "target_modules" in lora:
        lora["target_modules"] = tuple(lora["target_modules"])
    settings = _build(LoraSettings, lora, "model.lora")
    return _build(ModelConfig, {**section, "lora": settings}, "model")


def _rollout(section: dict[str, Any]) -> RolloutSection:
    engine = _build(VLLMSettings, dict(section.pop("vllm", None) or {}), "rollout.vllm")
    return _build(RolloutSection, {**section, "vllm": engine}, "rollout")


def _algorithm(
    section: dict[str, Any], iterations: int
) -> tuple[LossConfig, PSchedule, RolloutCorrection]:
    """The loss, the p schedule and the rollout correction of ``algorithm``.

    The loss is the preset with the section's values. A value of ``???`` (the keys of
    ``configs/loss_fields.yaml``) is unset: the preset's value, or the schedule's or correction's
    default; so each value lives in one place and every key can be overridden.
    """
    section = _set_values(section)
    correction = section.pop("rollout_correction", None) or {}
    if not isinstance(correction, Mapping):
        raise ConfigError(
            f"algorithm.rollout_correction={correction!r} must be a section; set its keys, e.g. "
            f"algorithm.rollout_correction.mode=tis"
        )
    correction = _set_values(correction)
    preset = section.pop("preset", "holderpo")
    if preset not in PRESETS:
        raise ConfigError(
            f"algorithm.preset={preset!r} is unknown; choose algorithm=<one of {sorted(PRESETS)}>"
        )
    schedule = section.pop("p_schedule", None)
    schedule = None if schedule is None else _set_values(schedule)
    loss = _build(LossConfig, section, "algorithm", base=PRESETS[preset])
    if schedule is None:  # a fixed order: the preset's (or the overridden) p
        schedule = {"schedule": "constant", "p_start": loss.p, "p_end": loss.p}
    first = schedule.get("first_step", 0)
    last = iterations - 1 + (first if isinstance(first, int) else 0)  # the last update's step
    schedule = {"total_steps": max(last, 1), **schedule}  # by default the last update uses p_end
    return (
        loss,
        _build(PSchedule, schedule, "algorithm.p_schedule"),
        _build(RolloutCorrection, correction, "algorithm.rollout_correction"),
    )


def _set_values(section: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` without its unset (``???``) values."""
    return {k: v for k, v in section.items() if not (isinstance(v, str) and v == UNSET)}


def _build(
    cls: type[T],
    values: Mapping[str, Any],
    where: str,
    base: T | None = None,
    also_valid: set[str] | frozenset[str] = frozenset(),
) -> T:
    """``cls(**values)`` (or ``replace(base, **values)``) with errors that name the keys.

    ``also_valid``: keys of the same config section that another dataclass takes (listed in the
    unknown-key hint).
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = {f.name for f in fields}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{where}.{k}' for k in unknown]}; "
            + "".join(_renamed(f"{where}.{k}") for k in unknown)
            + f"valid keys of {where}: {sorted(names | set(also_valid))}"
        )
    missing = [f"{where}.{f.name}" for f in fields if f.name not in values and _required(f)]
    if base is None and missing:
        raise ConfigError(
            f"missing key(s) {missing}: {cls.__name__} has no defaults, the YAML under configs/ "
            f"sets every key (a config of your own must set them too)"
        )
    _check_types(cls, values, where)
    try:
        if base is not None:
            return dataclasses.replace(base, **values)  # type: ignore[type-var]
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {where} config: {exc}") from exc


def _renamed(key: str) -> str:
    """``"<key> is now <new key> (<meaning>); "`` for a renamed key, else ``""``."""
    if key not in RENAMED_KEYS:
        return ""
    new, meaning = RENAMED_KEYS[key]
    return f"{key} is now {new} ({meaning}); "


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_types(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Raise naming the key when a value's type does not match its field's annotation.

    Plain annotations are checked (``int``, ``float``, ``bool``, ``str``, literals, ``X | None``
    and unions of them); containers are left to the dataclass.
    """
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation this module cannot resolve: leave it to cls
        return
    for key, value in values.items():
        expected = _accepted_types(hints.get(key))
        if expected is not None and not _is_instance(value, expected):
            names = " or ".join(sorted({t.__name__ for t in expected}))
            raise ConfigError(
                f"{where}.{key}={value!r} must be {names} (got {type(value).__name__}); "
                f"e.g. {where}.{key}={_example(expected)}"
            )


def _accepted_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types a field accepts, or ``None`` when it is not a plain annotation."""
    if hint in (int, float, bool, str, type(None)):
        return (hint,)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)})
    if origin in (typing.Union, types.UnionType):
        parts = [_accepted_types(a) for a in typing.get_args(hint)]
        if any(p is None for p in parts):
            return None
        return tuple(t for p in parts if p is not None for t in p)
    return None


def _is_instance(value: Any, expected: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; YAML true/false only fit bool fields
        return bool in expected
    if isinstance(value, int) and float in expected:
        return True
    return isinstance(value, expected)


def _example(expected: tuple[type, ...]) -> str:
    for t, example in ((int, "4"), (float, "0.5"), (bool, "true"), (str, "name")):
        if t in expected:
            return example
    return "null"
