"""One conformance suite that every built-in env and every ecosystem adapter passes.

Per env, made through the registry (so ``envs.checker.EnvChecker`` checks the first reset and step):
gymnasium's ``check_env``, the info contract on every step, ``reset(seed)`` determinism, the
admissible actions valid and malformed text invalid (never a crash), and the expert winning where
the env has one. An env whose package is absent is skipped with the pip command that installs it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.checker import info_problems
from envs.prefix import expert_plan_head, has_expert

MALFORMED = ("", "   ", "<action>", "\x00\x01 ]]][[[ ", "I think I will " * 50)
"""Model output no env understands as a move."""


@dataclass(frozen=True)
class Case:
    """One env of the suite."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs: str | None = None
    """The module the env imports (absent: skip)."""
    install: str = ""
    """How to install it (the skip reason)."""
    seeds: tuple[int, ...] = (0, 1)
    label: str = ""
    """The test id when one env is tested with two settings (default: the name)."""


CASES = [
    Case("alfworld", {"split": "embedded_heldout"}, "alfworld", "pip install '.[alfworld]'"),
    Case("math", {"dataset": "embedded"}, "math_verify", "pip install '.[math]'"),
    Case(
        "textworld",
        {"challenge": "tw-coin_collector", "levels": [1, 2], "num_games": 2},
        "textworld",
        "pip install '.[textworld]'",
    ),
    Case("textarena", {"game": "GuessTheNumber-v0"}, "textarena", "pip install '.[textarena]'"),
    Case(
        "skyrl", {"task": "gsm8k_multi_turn", "max_turns": 3}, "skyrl_gym", "pip install '.[skyrl]'"
    ),
    Case("skyrl", {"task": "gsm8k"}, "skyrl_gym", "pip install '.[skyrl]'", label="skyrl-gsm8k"),
]


def _case_id(case: Case) -> str:
    return case.label or case.name


@pytest.fixture(params=CASES, ids=_case_id, scope="module")
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    c: Case = request.param
    if c.needs and importlib.util.find_spec(c.needs) is None:
        pytest.skip(f"env {c.name!r} needs the {c.needs} package: {c.install}")
    if c.name == "textworld":  # its games are built into a folder of the test's own
        folder: Path = tmp_path_factory.mktemp("conformance-textworld")
        return replace(c, kwargs={**c.kwargs, "cache_dir": str(folder)})
    return c


@pytest.fixture
def make(case: Case) -> Iterator[Any]:
    made: list[gym.Env] = []

    def build() -> gym.Env:
        env = envs.make(case.name, **case.kwargs)
        made.append(env)
        return env

    yield build
    for env in made:
        env.close()


def test_registered_and_gymnasium_check_env(case: Case, make: Any) -> None:
    assert case.name in envs.registered()
    check_env(make().unwrapped, skip_render_check=True)


def test_every_reset_and_step_keeps_the_info_contract(case: Case, make: Any) -> None:
    env = make()
    for seed in case.seeds:
        _, info = env.reset(seed=seed)
        assert info_problems(info) == []
        action = (info["admissible_actions"] or ["[1]"])[0]
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, str) and isinstance(float(reward), float)
        assert isinstance(terminated, bool) and isinstance(truncated, bool)
        assert info_problems(info) == []


def test_reset_seed_is_deterministic(case: Case, make: Any) -> None:
    a, b = make(), make()
    for seed in case.seeds:
        first_a, first_b = a.reset(seed=seed), b.reset(seed=seed)
        assert first_a[0] == first_b[0] and _contract(first_a[1]) == _contract(first_b[1])
        action = (first_a[1]["admissible_actions"] or ["[7]"])[0]
        step_a, step_b = a.step(action), b.step(action)
        assert step_a[:4] == step_b[:4] and _contract(step_a[4]) == _contract(step_b[4])


def test_admissible_actions_are_valid_and_malformed_text_is_invalid(case: Case, make: Any) -> None:
    env = make()
    _, info = env.reset(seed=case.seeds[0])
    for action in info["admissible_actions"][:3]:
        env.reset(seed=case.seeds[0])
        assert env.step(action)[4]["action_valid"] is True, action
    for text in MALFORMED:
        env.reset(seed=case.seeds[0])
        obs, _, _, _, step_info = env.step(text)
        assert isinstance(obs, str) and step_info["action_valid"] is False, repr(text)
        assert step_info["won"] is False


def test_the_expert_wins_where_there_is_one(case: Case, make: Any) -> None:
    env = make()
    _, info = env.reset(seed=case.seeds[0])
    if not has_expert(env, info):
        pytest.skip(f"env {case.name!r} has no expert (no expert_plan, no expert_action())")
    for seed in case.seeds:
        _, info = env.reset(seed=seed)
        done = False
        for _ in range(env.unwrapped.max_steps or 100):
            expert = getattr(env.unwrapped, "expert_action", None)
            _, _, terminated, truncated, info = env.step(
                expert() if callable(expert) else expert_plan_head(info)
            )
            if terminated or truncated:
                done = True
                break
        assert done and info["won"], (case.name, seed)


def _contract(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in envs.base.InfoKeys.REQUIRED}
