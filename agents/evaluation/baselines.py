"""Baseline actors that need no model: the env's expert, random admissible actions, a verb rule.

``policy=expert`` and ``policy=random`` of ``python -m agents.evaluate`` check an env and its
report before any training (:data:`BASELINES`); during training the random actor and the best
single-verb rule (:func:`rule_baselines`) are played beside the model at every evaluation stage.

Nothing here knows an env's commands: the actors choose among what the env's info offers
(``expert_plan``, ``admissible_actions``), the verb rule's verb is read from the expert plans of the
training tasks, and where the env offers nothing to choose from an actor sends :data:`NO_ACTION`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from agents.rollout.env_pool import EnvFactory
from envs.base import InfoKeys
from envs.prefix import EXPERT_PLAN

NO_ACTION: Final = ""
"""Sent when the env offers neither a plan nor an admissible action (an env reads it as
invalid)."""


class Actor(Protocol):
    """Chooses actions from observations and infos (baselines that need no model)."""

    def act(self, observations: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
        """One action per env."""
        ...


def _admissible(info: dict[str, Any]) -> list[str]:
    return list(info.get(InfoKeys.ADMISSIBLE_ACTIONS) or ())


@dataclass
class ExpertActor:
    """Follows the env's expert plan (``info["expert_plan"]``: the actions left to win).

    Without a plan it takes the first admissible action (:data:`NO_ACTION` when there is none).
    """

    def act(self, observations: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
        """The next action of each env's plan."""
        return [(info.get(EXPERT_PLAN) or _admissible(info) or [NO_ACTION])[0] for info in infos]


@dataclass
class RandomActor:
    """Picks a uniformly random admissible action (:data:`NO_ACTION` when the env lists none)."""

    seed: int = 0
    """Seed of the choices."""

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def act(self, observations: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
        """A random admissible action per env."""
        return [self._rng.choice(_admissible(info) or [NO_ACTION]) for info in infos]


@dataclass
class VerbRuleActor:
    """Always takes an admissible action that starts with ``verb`` (a random one when none does).

    With ``verb`` the most frequent verb of the winning actions of the training tasks
    (:func:`winning_verb`), this is the best single-verb rule: the shortcut a policy that learned
    only "which kind of command wins" would follow.
    """

    verb: str
    """The verb to prefer (e.g. ``move`` on ALFWorld's embedded training games)."""
    seed: int = 0
    """Seed of the choices."""

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def act(self, observations: Sequence[str], infos: Sequence[dict[str, Any]]) -> list[str]:
        """One action per env: the first admissible ``verb`` action, else a random one."""
        out = []
        for info in infos:
            admissible = _admissible(info) or [NO_ACTION]
            preferred = [a for a in admissible if a.split(" ", 1)[0] == self.verb]
            out.append(preferred[0] if preferred else self._rng.choice(admissible))
        return out


def winning_verb(factory: EnvFactory) -> str | None:
    """The most frequent first word of the last expert action over an env's tasks.

    Reads the reset info of every task of an env with a finite task list (``num_tasks``): its
    ``expert_plan`` (the actions left to win) where it also lists admissible actions. ``None``
    when no task does (an env that accepts any text has no command to prefer) or the env has no
    task list.
    """
    env = factory()
    try:
        n = getattr(env.unwrapped, "num_tasks", None)
        counts: Counter[str] = Counter()
        for seed in range(n or 0):
            info = env.reset(seed=seed)[1]
            plan = info.get(EXPERT_PLAN) or []
            if plan and _admissible(info):
                counts[str(plan[-1]).split(" ", 1)[0]] += 1
    finally:
        env.close()
    return counts.most_common(1)[0][0] if counts else None


RULE_BASELINES: Final = ("random", "verb rule")
"""Names of the baselines played beside the model during training, in report order."""


def rule_baselines(factory: EnvFactory, *, seed: int) -> dict[str, Actor] | None:
    """The baselines of :data:`RULE_BASELINES`, by name: random admissible, best single verb.

    ``None`` for an env without admissible actions or expert plans (:func:`winning_verb`), where
    neither rule means anything.
    """
    verb = winning_verb(factory)
    if verb is None:
        return None
    actors: tuple[Actor, ...] = (RandomActor(seed=seed), VerbRuleActor(verb, seed=seed))
    return dict(zip(RULE_BASELINES, actors, strict=True))


BASELINES: Final[dict[str, type]] = {"expert": ExpertActor, "random": RandomActor}
"""Baseline actors by the name ``policy=<name>`` of ``python -m agents.evaluate`` takes."""
