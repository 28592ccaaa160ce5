"""Start an episode part-way through the expert's solution (the reverse / backplay curriculum).

``reset(options={"expert_remaining": k})`` on an env wrapped in :class:`ExpertPrefix` resets the
env, replays its expert until ``k`` actions of the expert's plan remain, and returns the state
reached there as the episode's first observation. ``k`` at or above the plan length is the
ordinary game (nothing is replayed). Without the option the wrapper changes nothing.

Where the plan comes from (any env, no branch per env):

* the reset info's ``expert_plan`` (a list: the actions left to win; ALFWorld gives the rest of
  the game's walkthrough): its length is the plan length;
* else an ``expert_action()`` method of the unwrapped env: the expert is replayed to a win
  counting its actions, and the env is reset again with the same seed.

Each replayed action is the env's ``expert_action()`` when it has one, else the first action of
the info's ``expert_plan``. The replayed steps go through the env's own ``step``, so they count
towards the env's step limit (the env sees one ordinary episode from its start; ALFWorld's
``info["steps"]`` includes them); a replay that the env truncates raises an error naming the
limit. They are not the policy's turns: ``rollout.max_turns`` counts only the turns after them.

Info keys added by a prefixed reset (the step infos of that episode repeat the three numbers):

* ``prefix_steps`` (int): expert actions replayed;
* ``expert_plan_length`` (int): length of the expert's plan from the env's start;
* ``expert_remaining`` (int): plan actions left at the first observation (``min(k, plan)``);
* ``prefix_history`` (list of ``[observation, action]``, reset info only): the replayed pairs,
  oldest first, the first observation being the env's own reset observation (which states the
  task), so the rollout's history window can show them.

Reverse curricula from a demonstration: Salimans & Chen 2018, "Learning Montezuma's Revenge from
a single demonstration"; Resnick et al. 2018, "Backplay: 'Man muss immer umkehren'"; Florensa et
al. 2017, "Reverse curriculum generation for reinforcement learning".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import gymnasium as gym

EXPERT_REMAINING: Final = "expert_remaining"
"""Reset option: start where this many actions of the expert's plan remain."""

EXPERT_PLAN: Final = "expert_plan"
"""Info key of the actions left to win (a list; None or absent when the env has no plan)."""

PREFIX_STEPS: Final = "prefix_steps"
EXPERT_PLAN_LENGTH: Final = "expert_plan_length"
PREFIX_HISTORY: Final = "prefix_history"

PROBE_LIMIT: Final = 10_000
"""Most expert actions replayed to measure a plan from ``expert_action()`` alone."""

ResetOut = tuple[str, dict[str, Any]]


class PrefixError(RuntimeError):
    """The expert prefix cannot be replayed on this env (no expert, or the env cut it short)."""


@dataclass(frozen=True)
class Prefix:
    """What a prefixed reset replayed."""

    plan_length: int
    """Expert actions from the env's start to a win."""
    remaining: int
    """Plan actions left at the first observation (``min(k, plan_length)``)."""
    history: tuple[tuple[str, str], ...]
    """The replayed ``(observation, action)`` pairs, oldest first."""

    @property
    def steps(self) -> int:
        """Expert actions replayed."""
        return len(self.history)

    def numbers(self) -> dict[str, int]:
        """The info keys every step of the episode carries."""
        return {
            PREFIX_STEPS: self.steps,
            EXPERT_PLAN_LENGTH: self.plan_length,
            EXPERT_REMAINING: self.remaining,
        }


def expert_plan_head(info: Mapping[str, Any]) -> str | None:
    """The first action of the info's ``expert_plan`` list; ``None`` when there is none."""
    plan = info.get(EXPERT_PLAN)
    return str(plan[0]) if isinstance(plan, list) and plan else None


def has_expert(env: gym.Env, info: Mapping[str, Any]) -> bool:
    """Whether ``env`` (just reset, with ``info``) has an expert this module can replay."""
    return isinstance(info.get(EXPERT_PLAN), list) or callable(
        getattr(env.unwrapped, "expert_action", None)
    )


def reset_with_prefix(
    env: gym.Env, *, seed: int | None = None, options: Mapping[str, Any] | None = None
) -> ResetOut:
    """``env.reset`` that honours ``options["expert_remaining"]`` (see the module docstring).

    Args:
        env: Any text env; the option needs an expert (``expert_plan`` info or
            ``expert_action()``).
        seed: Reset seed.
        options: Reset options; ``expert_remaining`` (int >= 1) is taken out, the rest go to
            the env.

    Returns:
        ``(observation, info)`` of the state reached, with the keys listed above when the
        option was given.
    """
    options = dict(options or {})
    k = options.pop(EXPERT_REMAINING, None)
    env_options = options or None
    obs, info = env.reset(seed=seed, options=env_options)
    if k is None:
        return obs, info
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"reset option {EXPERT_REMAINING}={k!r} must be an integer >= 1")
    if not has_expert(env, info):
        raise PrefixError(
            f"{type(env.unwrapped).__name__} has no expert (neither an 'expert_plan' info list "
            "nor an expert_action() method); the reverse curriculum (curriculum=reverse) and "
            "stage= evaluation need one"
        )
    plan = info.get(EXPERT_PLAN)
    if isinstance(plan, list):
        length = len(plan)
    else:
        length = _probe_plan_length(env, info)
        obs, info = env.reset(seed=seed, options=env_options)
    history: list[tuple[str, str]] = []
    for _ in range(max(length - k, 0)):
        action = _expert_action(env, info)
        history.append((obs, action))
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            raise PrefixError(
                f"the env ended the episode after {len(history)} replayed expert actions of "
                f"{length - k} (terminated={terminated}, truncated={truncated}); raise the env's "
                "step limit (e.g. env.kwargs.max_steps) or start nearer the goal"
            )
    prefix = Prefix(plan_length=length, remaining=min(k, length), history=tuple(history))
    out = {**info, **prefix.numbers(), PREFIX_HISTORY: [list(p) for p in prefix.history]}
    return obs, out


def _expert_action(env: gym.Env, info: Mapping[str, Any]) -> str:
    expert: Callable[[], str] | None = getattr(env.unwrapped, "expert_action", None)
    if callable(expert):
        return str(expert())
    head = expert_plan_head(info)
    if head is None:
        raise PrefixError("the env's expert_plan ran out before the prefix was replayed")
    return head


def _probe_plan_length(env: gym.Env, info: Mapping[str, Any]) -> int:
    """Replay the expert to a win from the state just reset; the number of actions it took."""
    for n in range(1, PROBE_LIMIT + 1):
        _, _, terminated, truncated, info = env.step(_expert_action(env, info))
        if terminated and info.get("won", True):
            return n
        if terminated or truncated:
            break
    raise PrefixError(
        f"the expert of {type(env.unwrapped).__name__} did not win within {PROBE_LIMIT} actions "
        "(or the env cut the episode); its plan length cannot be measured"
    )


class ExpertPrefix(gym.Wrapper[str, str, str, str]):
    """``reset(options={"expert_remaining": k})`` starts ``k`` expert actions from the goal.

    Without the option the wrapper is transparent. Step infos of a prefixed episode carry
    ``prefix_steps``, ``expert_plan_length`` and ``expert_remaining``.
    """

    def __init__(self, env: gym.Env[str, str]) -> None:
        """Wrap ``env``."""
        super().__init__(env)
        self._numbers: dict[str, int] = {}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Reset, replaying the expert prefix when ``options`` asks for one."""
        obs, info = reset_with_prefix(self.env, seed=seed, options=options)
        self._numbers = {
            k: info[k] for k in (PREFIX_STEPS, EXPERT_PLAN_LENGTH, EXPERT_REMAINING) if k in info
        }
        return obs, info

    def step(self, action: str) -> tuple[str, Any, bool, bool, dict[str, Any]]:
        """Step the env; a prefixed episode's info keeps its prefix numbers."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._numbers:
            info = {**info, **self._numbers}
        return obs, reward, terminated, truncated, info
