"""Arithmetic word problems generated from seeds: the task list of the skyrl-gym adapter.

skyrl-gym's gsm8k envs read their problem and its answer from a dataset row handed to them at
construction; this module writes such rows itself, so the adapter needs no download. Each problem
is drawn from one :class:`random.Random` seeded with its generation seed: one of four kinds of
one- or two-step problems with a non-negative integer answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

NAMES: Final = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ines", "Jonas")
THINGS: Final = ("apples", "marbles", "stickers", "pencils", "shells", "cards", "buttons")


@dataclass(frozen=True)
class Problem:
    """One generated problem."""

    question: str
    """The problem text."""
    answer: int
    """Its answer."""
    kind: str
    """Which of :data:`KINDS` made it."""


def _gain_loss(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    have, got = rng.randint(5, 40), rng.randint(2, 30)
    gave = rng.randint(1, have + got - 1)
    text = (
        f"{name} has {have} {things}. {name} gets {got} more, then gives {gave} away. "
        f"How many {things} does {name} have now?"
    )
    return text, have + got - gave


def _boxes(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    size, boxes = rng.randint(3, 12), rng.randint(2, 9)
    left = rng.randint(0, size - 1)
    text = (
        f"A box holds {size} {things}. {name} fills {boxes} boxes and has {left} {things} left "
        f"over. How many {things} does {name} have in all?"
    )
    return text, size * boxes + left


def _share(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    text = (
        f"{name} shares {friends * each} {things} equally among {friends} friends. "
        f"How many {things} does each friend get?"
    )
    return text, each


def _rate(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    per_day, days, extra = rng.randint(2, 15), rng.randint(2, 7), rng.randint(1, 20)
    text = (
        f"{name} collects {per_day} {things} every day for {days} days, then finds {extra} more. "
        f"How many {things} has {name} collected in total?"
    )
    return text, per_day * days + extra


KINDS: Final[dict[str, Callable[[random.Random, str, str], tuple[str, int]]]] = {
    "gain_loss": _gain_loss,
    "boxes": _boxes,
    "share": _share,
    "rate": _rate,
}
"""The kinds of problem, each a function of the generator, a name and a plural noun."""


def generate(seed: int) -> Problem:
    """The problem of generation seed ``seed`` (the same problem for the same seed)."""
    rng = random.Random(seed)
    kind = rng.choice(sorted(KINDS))
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    question, answer = KINDS[kind](rng, name, things)
    return Problem(question=question, answer=answer, kind=kind)
