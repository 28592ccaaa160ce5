"""Multi-turn rollouts: prompts from templates, one batched generation per turn, parsed actions.

:class:`RolloutManager.collect` plays ``num_groups × group_size`` episodes on an
:class:`~agents.rollout.env_pool.EnvPool`. Group ``g`` uses envs ``g*n .. g*n+n-1``, all reset with
one seed
derived from the rollout seed and ``g`` (so they play the same game), or with the seeds and reset
options a task sampler chose (:mod:`agents.rollout.curriculum`). Every turn:

1. one prompt per active env, built from its :class:`PromptTemplate` (task, a window of the last
   ``history_window`` (observation, action) pairs, the current observation, the admissible
   actions) and fitted to ``policy.max_context - max_new_tokens`` (oldest history dropped first,
   then the head of the observation, then the head of the task: see :func:`fit_prompt`);
2. one ``policy.generate`` call for all of them;
3. each response becomes an action as the template's ``action_format`` says (``tag``: the content of
   ``<action>…</action>``, checked against the admissible list when the env gives one; ``raw``: the
   whole response); a response that does not parse is sent to the env as it is and marked invalid;
4. one ``pool.step`` call for all of them; finished episodes leave the batch.

At ``max_steps`` the unfinished episodes end with their last step marked truncated. The metrics
(``rollout/…``) are documented in ``docs/rollout.md``.
"""

from __future__ import annotations

import dataclasses
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import numpy as np
import yaml

from agents.generation.policy import Message, Policy
from agents.rollout.env_pool import WORKER_FAILED, EnvPool, ResetOptions, StepResult
from agents.types import Generation, SamplingParams, Step, Trajectory
from envs.parsing import parse_action
from envs.prefix import PREFIX_HISTORY

ACTION_FORMATS: Final = ("tag", "raw")
"""``tag``: the action is the content of ``<action>…</action>``; ``raw``: the whole response."""

TRUNCATION_MARK: Final = "..."
"""Put in front of an observation or task whose head was cut to fit the context."""

_FIRST_FIELDS: Final = frozenset({"observation", "admissible_actions", "response_format"})
_TURN_FIELDS: Final = _FIRST_FIELDS | {"task", "step", "current_step", "history", "history_length"}
_ENTRY_FIELDS: Final = frozenset({"index", "observation", "action"})


@dataclass(frozen=True)
class PromptTemplate:
    """How one env's state becomes a chat prompt and a response becomes an action.

    Templates are ``str.format`` strings (write literal braces as ``{{``/``}}``); the fields each
    may use are listed per attribute. Loaded from ``configs/prompts/<name>.yaml`` by
    :func:`load_template`.
    """

    name: str
    """Template name (the YAML file's stem)."""
    first_turn: str
    """User message of the first turn: ``{observation}``, ``{admissible_actions}``,
    ``{response_format}``."""
    turn: str
    """User message of later turns: the first-turn fields and ``{task}``, ``{step}`` (steps taken),
    ``{current_step}`` (step + 1), ``{history}``, ``{history_length}`` (pairs shown)."""
    action_format: str = "tag"
    """``tag`` | ``raw`` (see :data:`ACTION_FORMATS`)."""
    system: str = ""
    """System message ("" for none)."""
    history_entry: str = "[{index}] {observation} -> {action}"
    """One (observation, action) pair of the history: ``{index}`` (1-based step), ``{observation}``,
    ``{action}``."""
    history_separator: str = "\n"
    """Between history entries."""
    admissible_item: str = "{action}"
    """One admissible action in ``{admissible_actions}``: ``{action}``."""
    admissible_separator: str = ", "
    """Between admissible actions."""
    response_format: str = ""
    """The instruction on how to answer (``{response_format}``)."""
    require_think: bool = False
    """A ``tag`` response also needs ``<think>…</think>`` before the action to be valid (not
    checked under constrained decoding, which emits the action tag only)."""
    task_pattern: str = ""
    """Regex whose first group reads the task from the first observation ("": the whole first
    observation is the task)."""
    stop: tuple[str, ...] = ()
    """Stop strings added to the sampling parameters (e.g. ``</action>``)."""

    def __post_init__(self) -> None:
        if self.action_format not in ACTION_FORMATS:
            raise ValueError(
                f"prompt template {self.name!r}: action_format={self.action_format!r}; "
                f"use one of {ACTION_FORMATS}"
            )
        _check_fields(self.name, "first_turn", self.first_turn, _FIRST_FIELDS)
        _check_fields(self.name, "turn", self.turn, _TURN_FIELDS)
        _check_fields(self.name, "history_entry", self.history_entry, _ENTRY_FIELDS)
        _check_fields(self.name, "admissible_item", self.admissible_item, frozenset({"action"}))
        object.__setattr__(self, "stop", tuple(self.stop))


def _check_fields(name: str, key: str, text: str, allowed: frozenset[str]) -> None:
    """Raise when ``text`` uses a format field outside ``allowed``."""
    used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    unknown = used - allowed
    if unknown:
        raise ValueError(
            f"prompt template {name!r}: {key} uses unknown fields {sorted(unknown)}; "
            f"allowed: {sorted(allowed)} (write literal braces as {{{{ }}}})"
        )


def load_template(name: str) -> PromptTemplate:
    """The template of ``configs/prompts/<name>.yaml`` (shipped with the package)."""
    folder = resources.files("configs") / "prompts"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.is_file())
        raise KeyError(f"no prompt template {name!r}; available: {known}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(PromptTemplate)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
    return PromptTemplate(**data)


@dataclass(frozen=True)
class PromptState:
    """What the prompt of one turn shows."""

    task: str
    """The task (read from the first observation by the template's ``task_pattern``)."""
    history: tuple[tuple[str, str], ...]
    """Every (observation, action) pair so far, oldest first (the window is applied later)."""
    observation: str
    """The current observation."""
    admissible: tuple[str, ...]
    """The admissible actions (empty when the env accepts any text)."""


def read_task(template: PromptTemplate, first_observation: str) -> str:
    """The task text: the template's ``task_pattern`` group, else the whole first observation."""
    if template.task_pattern:
        found = re.search(template.task_pattern, first_observation)
        if found:
            return found.group(1).strip()
    return first_observation


def build_prompt(
    template: PromptTemplate, state: PromptState, *, window: int | None
) -> list[Message]:
    """The chat prompt of one turn, showing the last ``window`` history pairs (None/-1: all)."""
    step = len(state.history)
    shown = _window(state.history, window)
    actions = template.admissible_separator.join(
        template.admissible_item.format(action=a) for a in state.admissible
    )
    common = {
        "observation": state.observation,
        "admissible_actions": actions,
        "response_format": template.response_format,
    }
    if step == 0:
        user = template.first_turn.format(**common)
    else:
        first_index = step - len(shown) + 1
        history = template.history_separator.join(
            template.history_entry.format(index=first_index + k, observation=o, action=a)
            for k, (o, a) in enumerate(shown)
        )
        user = template.turn.format(
            **common,
            task=state.task,
            step=step,
            current_step=step + 1,
            history=history,
            history_length=len(shown),
        )
    system = [{"role": "system", "content": template.system}] if template.system else []
    return [*system, {"role": "user", "content": user}]


def _window(history: Sequence[tuple[str, str]], window: int | None) -> Sequence[tuple[str, str]]:
    if window is None or window < 0:
        return history
    return history[len(history) - window :] if window else ()


def fit_prompt(
    template: PromptTemplate,
    state: PromptState,
    *,
    window: int | None,
    budget: int,
    count_tokens: Callable[[list[Message]], int],
) -> list[Message]:
    """The prompt of :func:`build_prompt` cut to at most ``budget`` tokens where it can be.

    Cuts, in order, until the prompt fits: the oldest history pairs (down to none), then the head of
    the observation, then the head of the task, and last the head of the whole user message (its
    fixed text and admissible list). Model output never makes this fail; only a budget smaller than
    the chat template's own tokens raises ``ValueError``.

    Args:
        template: The env's template.
        state: What the turn shows.
        window: History pairs to show at most (None or -1: all).
        budget: Most prompt tokens.
        count_tokens: Tokens of a rendered prompt (``len(policy.prompt_ids(prompt))``).
    """
    shown = len(_window(state.history, window))
    for keep in range(shown, -1, -1):
        prompt = build_prompt(template, state, window=keep)
        if count_tokens(prompt) <= budget:
            return prompt
    for attr in ("observation", "task"):
        state = _cut_head(template, state, attr, budget, count_tokens)
        prompt = build_prompt(template, state, window=0)
        if count_tokens(prompt) <= budget:
            return prompt
    return _cut_message_head(prompt, budget, count_tokens)


def _cut_message_head(
    prompt: list[Message], budget: int, count_tokens: Callable[[list[Message]], int]
) -> list[Message]:
    """The prompt with the longest tail of its last message that fits (its fixed text is cut)."""
    *head, last = prompt
    text = last["content"]

    def cut(keep: int) -> list[Message]:
        return [*head, {**last, "content": TRUNCATION_MARK + text[len(text) - keep :]}]

    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(cut(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if count_tokens(cut(lo)) > budget:
        raise ValueError(
            f"even an empty prompt takes more than {budget} tokens (max_context - max_new_tokens): "
            "raise the policy's max_context or lower max_new_tokens"
        )
    return cut(lo)


def _cut_head(
    template: PromptTemplate,
    state: PromptState,
    attr: str,
    budget: int,
    count_tokens: Callable[[list[Message]], int],
) -> PromptState:
    """``state`` with the longest tail of ``attr`` that fits (binary search; empty if none)."""
    text: str = getattr(state, attr)

    def cut(keep: int) -> PromptState:
        tail = text[len(text) - keep :] if keep else ""
        changes: dict[str, Any] = {attr: TRUNCATION_MARK + tail}
        return dataclasses.replace(state, **changes)

    lo, hi = 0, len(text)  # the longest fitting tail length lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(build_prompt(template, cut(mid), window=0)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo)


@dataclass(frozen=True)
class RolloutConfig:
    """How :class:`RolloutManager` turns envs and a policy into trajectories."""

    template: PromptTemplate
    """The env's prompt template (:func:`load_template`)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 256
    """Most tokens per response (raised to fit the longest allowed response when constrained)."""
    greedy: bool = False
    """Arg-max decoding (evaluation)."""
    history_window: int | None = 2
    """(observation, action) pairs shown in the prompt; ``None`` or -1: the whole history."""
    constrained: bool = False
    """Decode only admissible actions (small models): ``<action>a</action>`` for an admissible
    ``a`` under the ``tag`` format, ``a`` itself under ``raw``; envs without an admissible list
    (math) stay unconstrained."""

    @property
    def sampling(self) -> SamplingParams:
        """The sampling parameters of every response (the template's stop strings included)."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            stop=self.template.stop,
            greedy=self.greedy,
        )


@dataclass
class _Episode:
    """Mutable state of one env's episode during a rollout."""

    env: int
    group: int
    seed: int
    task: str
    obs: str
    info: Mapping[str, Any]
    history: list[tuple[str, str]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    done: bool = False

    def state(self) -> PromptState:
        admissible = tuple(self.info.get("admissible_actions") or ())
        return PromptState(self.task, tuple(self.history), self.obs, admissible)


@dataclass(frozen=True)
class _Parsed:
    """A response read as an action: what goes to the env and whether it parsed."""

    action: str
    valid: bool


@dataclass
class _Clock:
    """Seconds spent per phase of a rollout."""

    prompt: float = 0.0
    generate: float = 0.0
    env: float = 0.0


def group_seed(seed: int, group: int) -> int:
    """Reset seed of group ``group`` in a rollout seeded ``seed`` (a 32-bit integer)."""
    return int(np.random.SeedSequence([seed % 2**64, group]).generate_state(1)[0])


class RolloutManager:
    """Collects groups of multi-turn episodes with one policy on one env pool."""

    def __init__(self, policy: Policy, pool: EnvPool, config: RolloutConfig) -> None:
        """Keep the policy, the pool and the config (nothing runs until :meth:`collect`)."""
        self.policy = policy
        self.pool = pool
        self.config = config
        self._sampling = config.sampling

    def collect(
        self,
        num_groups: int,
        group_size: int,
        max_steps: int,
        *,
        seed: int,
        group_seeds: Sequence[int] | None = None,
        group_options: Sequence[ResetOptions] | None = None,
    ) -> tuple[list[Trajectory], dict[str, float]]:
        """Play ``num_groups × group_size`` episodes of at most ``max_steps`` turns.

        Args:
            num_groups: Games (problems) played; group ``g`` resets with :func:`group_seed`.
            group_size: Episodes per game.
            max_steps: Turns per episode; the last step of an unfinished episode is truncated.
            seed: Rollout seed.
            group_seeds: Explicit reset seed of each group (evaluation over a fixed task list);
                overrides the seeds derived from ``seed``.
            group_options: Reset options of each group (``{"expert_remaining": k}`` starts ``k``
                expert actions from the goal, :mod:`envs.prefix`); the replayed expert steps are
                no training samples but appear in the prompt's history window.

        Returns:
            The trajectories (env index order: group by group) and the ``rollout/…`` metrics.
        """
        n_envs = num_groups * group_size
        if min(num_groups, group_size, max_steps) < 1:
            raise ValueError("num_groups, group_size and max_steps must all be >= 1")
        if n_envs > self.pool.num_envs:
            raise ValueError(
                f"{num_groups} groups x {group_size} need {n_envs} envs but the pool has "
                f"{self.pool.num_envs}; build the pool with num_envs >= {n_envs}"
            )
        if group_seeds is None:
            group_seeds = [group_seed(seed, g) for g in range(num_groups)]
        if len(group_seeds) != num_groups:
            raise ValueError(f"got {len(group_seeds)} group_seeds for {num_groups} groups")
        if group_options is not None and len(group_options) != num_groups:
            raise ValueError(f"got {len(group_options)} group_options for {num_groups} groups")
        clock = _Clock()
        episodes = self._reset(group_seeds, group_options, group_size, clock)
        turns = 0
        for t in range(max_steps):
            active = [e for e in episodes if not e.done]
            if not active:
                break
            turns += 1
            self._turn(active, last=t == max_steps - 1, clock=clock)
        trajectories = [_trajectory(e) for e in episodes]
        return trajectories, rollout_metrics(trajectories, turns=turns, clock=clock)

    def _reset(
        self,
        group_seeds: Sequence[int],
        group_options: Sequence[ResetOptions] | None,
        group_size: int,
        clock: _Clock,
    ) -> list[_Episode]:
        seeds = [int(s) for s in group_seeds for _ in range(group_size)]
        indices = list(range(len(seeds)))
        options = None
        if group_options is not None:
            options = [o for o in group_options for _ in range(group_size)]
        t0 = time.perf_counter()
        resets = self.pool.reset(indices, seeds, options)
        clock.env += time.perf_counter() - t0
        return [
            self._episode(i, i // group_size, s, obs, info)
            for i, s, (obs, info) in zip(indices, seeds, resets, strict=True)
        ]

    def _episode(self, env: int, group: int, seed: int, obs: str, info: dict[str, Any]) -> _Episode:
        """A new episode; an expert prefix's replayed pairs start its history.

        The task is read from the env's own first observation (the prefix's first one).
        """
        replayed = [(str(o), str(a)) for o, a in info.pop(PREFIX_HISTORY, None) or ()]
        first = replayed[0][0] if replayed else obs
        task = read_task(self.config.template, first)
        return _Episode(env, group, seed, task, obs, info, history=replayed)

    def _turn(self, active: list[_Episode], *, last: bool, clock: _Clock) -> None:
        """One batched generation and one batched env step for the active episodes."""
        t0 = time.perf_counter()
        allowed = self._allowed(active)
        sampling = self._sampling_for(allowed)
        budget = self.policy.max_context - sampling.max_new_tokens
        prompts = [self._prompt(e, budget) for e in active]
        t1 = time.perf_counter()
        gens = self.policy.generate(prompts, sampling, allowed=allowed)
        t2 = time.perf_counter()
        parsed = [self._parse(g.text, e) for g, e in zip(gens, active, strict=True)]
        results = self.pool.step([e.env for e in active], [p.action for p in parsed])
        t3 = time.perf_counter()
        clock.prompt += t1 - t0
        clock.generate += t2 - t1
        clock.env += t3 - t2
        for e, g, p, r in zip(active, gens, parsed, results, strict=True):
            _record(e, g, p, r, last=last)

    def _prompt(self, episode: _Episode, budget: int) -> list[Message]:
        def count(prompt: list[Message]) -> int:
            return len(self.policy.prompt_ids(prompt))

        window = self.config.history_window
        return fit_prompt(
            self.config.template, episode.state(), window=window, budget=budget, count_tokens=count
        )

    def _allowed(self, active: list[_Episode]) -> list[list[str] | None] | None:
        """Per episode, the exact responses constrained decoding may produce (None: free)."""
        if not self.config.constrained:
            return None
        out: list[list[str] | None] = []
        for e in active:
            admissible = e.info.get("admissible_actions") or []
            out.append([self._wrap(a) for a in admissible] or None)
        return out

    def _wrap(self, action: str) -> str:
        """The response that states ``action`` in the template's action format."""
        return (
            f"<action>{action}</action>" if self.config.template.action_format == "tag" else action
        )

    def _sampling_for(self, allowed: list[list[str] | None] | None) -> SamplingParams:
        """The sampling params, with room for the longest allowed response (plus its EOS)."""
        sampling = self._sampling
        strings = [s for a in allowed or [] if a for s in a]
        if not strings:
            return sampling
        ids = self.policy.tokenizer(strings, add_special_tokens=False)["input_ids"]
        room = max(len(x) for x in ids) + 1
        return dataclasses.replace(sampling, max_new_tokens=max(sampling.max_new_tokens, room))

    def _parse(self, text: str, episode: _Episode) -> _Parsed:
        """The action sent to the env and whether the response parsed to a valid one."""
        template = self.config.template
        if template.action_format == "raw":
            return _Parsed(action=text, valid=bool(text.strip()))
        admissible = episode.info.get("admissible_actions") or None
        require_think = template.require_think and not self.config.constrained
        p = parse_action(text, admissible, require_think=require_think)
        return _Parsed(action=p.action if p.action else text, valid=p.valid)


def _record(e: _Episode, g: Generation, p: _Parsed, r: StepResult, *, last: bool) -> None:
    """Append the step to the episode and move it to the next state."""
    failed = bool(r.info.get(WORKER_FAILED, False))
    # A failed worker is not the model's fault: its step keeps the parse's verdict.
    valid = p.valid if failed else p.valid and bool(r.info.get("action_valid", True))
    truncated = r.truncated or (last and not r.terminated)
    e.steps.append(
        Step(
            prompt_ids=tuple(g.prompt_ids),
            response_ids=tuple(g.response_ids),
            logprobs=tuple(g.logprobs),
            response_text=g.text,
            action=p.action,
            action_valid=valid,
            reward=r.reward,
            terminated=r.terminated,
            truncated=truncated,
            anchor=e.info.get("anchor", e.obs),
            info=dict(r.info),
        )
    )
    e.history.append((e.obs, p.action))
    e.obs, e.info = r.obs, r.info
    e.done = r.terminated or truncated


def _trajectory(e: _Episode) -> Trajectory:
    game = e.info.get("game")
    return Trajectory(
        traj_id=e.env,
        group_id=e.group,
        game=str(game) if game else f"seed={e.seed}",
        steps=tuple(e.steps),
        success=bool(e.info.get("won", False)),
        subtask=str(e.info.get("subtask", "")),
    )


def rollout_metrics(
    trajectories: Sequence[Trajectory], *, turns: int, clock: _Clock | None = None
) -> dict[str, float]:
    """The ``rollout/…`` metrics of a finished rollout (see ``docs/rollout.md``)."""
    steps = [s for t in trajectories for s in t.steps]
    n_traj = max(len(trajectories), 1)
    n_steps = max(len(steps), 1)
    m = {
        "rollout/turns": float(turns),
        "rollout/episodes": float(len(trajectories)),
        "rollout/env_steps": float(len(steps)),
        "rollout/tokens_generated": float(sum(len(s.response_ids) for s in steps)),
        "rollout/invalid_action_rate": sum(not s.action_valid for s in steps) / n_steps,
        "rollout/success_rate": sum(t.success for t in trajectories) / n_traj,
        "rollout/reward_mean": sum(t.total_reward for t in trajectories) / n_traj,
        "rollout/episode_length_mean": len(steps) / n_traj,
        "rollout/truncated_rate": sum(bool(t.steps and t.steps[-1].truncated) for t in trajectories)
        / n_traj,
        "rollout/worker_failures": float(sum(bool(s.info.get(WORKER_FAILED)) for s in steps)),
    }
    if clock is not None:
        m["rollout/time_prompt_s"] = clock.prompt
        m["rollout/time_generate_s"] = clock.generate
        m["rollout/time_env_s"] = clock.env
    episodes = Counter(t.subtask for t in trajectories)
    wins = Counter(t.subtask for t in trajectories if t.success)
    for subtask, count in sorted(episodes.items()):
        m[f"rollout/episode_count/{subtask}"] = float(count)
        m[f"rollout/success_count/{subtask}"] = float(wins[subtask])
    return m


def collect(
    policy: Policy,
    pool: EnvPool,
    num_groups: int,
    group_size: int,
    max_steps: int,
    *,
    config: RolloutConfig,
    seed: int = 0,
) -> tuple[list[Trajectory], dict[str, float]]:
    """:meth:`RolloutManager.collect` in one call."""
    return RolloutManager(policy, pool, config).collect(
        num_groups, group_size, max_steps, seed=seed
    )
