"""Expert-prefix resets (envs/prefix.py): the state reached is the one the expert's actions reach.

On the embedded ALFWorld games, on real games from ../shared/data (skipped when absent), and on a
small env that has only ``expert_action()`` (its plan length is measured by replaying the expert).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agents.rollout.env_pool import EnvFactory, RayEnvPool, SerialEnvPool
from envs.alfworld.env import SUBTASKS, AlfWorldEnv, find_games, subtask_of
from envs.base import TextEnv
from envs.prefix import (
    EXPERT_PLAN_LENGTH,
    EXPERT_REMAINING,
    PREFIX_HISTORY,
    PREFIX_STEPS,
    ExpertPrefix,
    PrefixError,
    reset_with_prefix,
)
from tests.agents.conftest import ray_session  # noqa: F401 (the shared Ray session fixture)


def _by_hand(env: AlfWorldEnv, game: str, actions: list[str]) -> tuple[str, dict[str, Any]]:
    """Reset to ``game`` and play ``actions``; the observation and info reached."""
    obs, info = env.reset(options={"game": game})
    for a in actions:
        obs, _, terminated, truncated, info = env.step(a)
        assert not (terminated or truncated)
    return obs, info


def _check_prefix_reaches_the_expert_state(env: AlfWorldEnv, game: str, ks: list[int]) -> None:
    _, start = env.reset(options={"game": game})
    plan = list(start["expert_plan"])
    for k in ks:
        obs, info = reset_with_prefix(env, options={"game": game, EXPERT_REMAINING: k})
        replayed = max(len(plan) - k, 0)
        want_obs, want_info = _by_hand(env, game, plan[:replayed])
        assert obs == want_obs, (game, k)
        assert info["admissible_actions"] == want_info["admissible_actions"]
        assert info["expert_plan"] == plan[replayed:]
        assert info[PREFIX_STEPS] == replayed and info[EXPERT_PLAN_LENGTH] == len(plan)
        assert info[EXPERT_REMAINING] == min(k, len(plan))
        assert [a for _, a in info[PREFIX_HISTORY]] == plan[:replayed]
        if replayed:  # the first replayed observation is the env's own reset text (the task)
            assert info[PREFIX_HISTORY][0][0] == env.reset(options={"game": game})[0]


@pytest.fixture(scope="module")
def embedded() -> AlfWorldEnv:
    e = AlfWorldEnv(split="embedded")
    yield e
    e.close()


def _one_per_subtask(games: list[str]) -> list[str]:
    first: dict[str, str] = {}
    for g in games:
        first.setdefault(subtask_of(g), g)
    return [first[s] for s in SUBTASKS if s in first]


def test_prefix_reaches_the_expert_state_on_embedded_games(embedded: AlfWorldEnv) -> None:
    games = _one_per_subtask(embedded.games)
    assert len(games) == len(SUBTASKS)
    for game in games:
        _check_prefix_reaches_the_expert_state(embedded, game, [1, 2, 3, 100])


def test_prefix_reaches_the_expert_state_on_real_games(shared_data: Path) -> None:
    games = _one_per_subtask(find_games("valid_unseen", shared_data / "alfworld", SUBTASKS))
    env = AlfWorldEnv(split="valid_unseen", data_dir=shared_data / "alfworld")
    try:
        for game in games:
            _check_prefix_reaches_the_expert_state(env, game, [1, 2])
    finally:
        env.close()


@pytest.mark.parametrize("success_reward", [10.0, 3.5])
def test_k1_episode_won_by_the_experts_last_action_gets_the_success_reward(
    success_reward: float,
) -> None:
    env = ExpertPrefix(AlfWorldEnv(split="embedded", success_reward=success_reward))
    try:
        obs, info = env.reset(seed=3, options={EXPERT_REMAINING: 1})
        assert len(info["expert_plan"]) == 1 and not info["won"]
        _, reward, terminated, truncated, step_info = env.step(env.unwrapped.expert_action())
        assert reward == success_reward and terminated and not truncated and step_info["won"]
        assert step_info[PREFIX_STEPS] == info[PREFIX_STEPS] > 0  # step infos keep the numbers
    finally:
        env.close()


def test_k_at_or_beyond_the_plan_is_the_ordinary_game(embedded: AlfWorldEnv) -> None:
    plain_obs, plain = embedded.reset(seed=5)
    length = len(plain["expert_plan"])
    for k in (length, length + 7):
        obs, info = reset_with_prefix(embedded, seed=5, options={EXPERT_REMAINING: k})
        assert obs == plain_obs and info["expert_plan"] == plain["expert_plan"]
        assert info[PREFIX_STEPS] == 0 and info[EXPERT_REMAINING] == length


def test_without_the_option_the_wrapper_changes_nothing(embedded: AlfWorldEnv) -> None:
    wrapped = ExpertPrefix(AlfWorldEnv(split="embedded"))
    try:
        assert wrapped.reset(seed=2) == embedded.reset(seed=2)
        a = embedded.step("look")
        b = wrapped.step("look")
        assert a == b
    finally:
        wrapped.close()


def test_replayed_steps_count_towards_the_envs_step_limit() -> None:
    env = AlfWorldEnv(split="embedded", max_steps=2)
    try:
        seed = next(s for s in range(env.num_tasks) if len(env.reset(seed=s)[1]["expert_plan"]) > 3)
        _, info = env.reset(seed=seed)
        with pytest.raises(PrefixError, match="step limit"):
            reset_with_prefix(env, seed=seed, options={EXPERT_REMAINING: 1})
        _, ok = reset_with_prefix(
            env, seed=seed, options={EXPERT_REMAINING: len(info["expert_plan"]) - 1}
        )
        assert ok["steps"] == 1  # the env counted the replayed action
    finally:
        env.close()


class Corridor(TextEnv):
    """Walk ``length`` steps forward; an expert through ``expert_action()`` only."""

    def __init__(self, length: int = 5) -> None:
        super().__init__()
        self.length = length
        self.pos = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.pos = 0
        self.offset = int(self.np_random.integers(100))
        return self._obs(), self._info()

    def step(self, action: str):
        if action == "forward":
            self.pos += 1
        won = self.pos >= self.length
        return self._obs(), float(won), won, False, self._info()

    def expert_action(self) -> str:
        return "forward"

    def _obs(self) -> str:
        return f"Task: walk to the end. You are at cell {self.pos + self.offset}."

    def _info(self) -> dict[str, Any]:
        won = self.pos >= self.length
        return {
            "admissible_actions": ["forward", "wait"],
            "anchor": self.pos,
            "won": won,
            "subtask": "corridor",
            "action_valid": True,
        }


@pytest.mark.parametrize(("k", "replayed"), [(1, 4), (2, 3), (5, 0), (9, 0)])
def test_env_with_only_expert_action_measures_its_plan(k: int, replayed: int) -> None:
    env = Corridor(length=5)
    obs, info = reset_with_prefix(env, seed=11, options={EXPERT_REMAINING: k})
    fresh = Corridor(length=5)
    want, _ = fresh.reset(seed=11)
    for _ in range(replayed):
        want, *_ = fresh.step("forward")
    assert obs == want
    assert info[PREFIX_STEPS] == replayed and info[EXPERT_PLAN_LENGTH] == 5


class NoExpert(Corridor):
    expert_action = None  # type: ignore[assignment]


@pytest.mark.parametrize("bad", [0, -1, "2", True])
def test_bad_k_and_missing_expert_raise(bad: Any) -> None:
    with pytest.raises(ValueError, match="expert_remaining"):
        reset_with_prefix(Corridor(), seed=0, options={EXPERT_REMAINING: bad})
    with pytest.raises(PrefixError, match="no expert"):
        reset_with_prefix(NoExpert(), seed=0, options={EXPERT_REMAINING: 1})


def _pool_resets(pool: Any) -> None:
    options = [{EXPERT_REMAINING: 1}, None, {EXPERT_REMAINING: 2}]
    out = pool.reset([0, 1, 2], [4, 4, 4], options)
    (_, one), (_, plain), (_, two) = out
    assert len(one["expert_plan"]) == 1 and len(two["expert_plan"]) == 2
    assert PREFIX_STEPS not in plain and len(plain["expert_plan"]) == one[EXPERT_PLAN_LENGTH]
    assert [a for _, a in two[PREFIX_HISTORY]] == plain["expert_plan"][: one[PREFIX_STEPS] - 1]
    again = pool.reset([0], [4])  # the next reset without options is the ordinary game
    assert again[0][1]["expert_plan"] == plain["expert_plan"]
    step = pool.step([2], [two["expert_plan"][0]])[0]
    assert step.info[EXPERT_REMAINING] == 2 and not step.terminated


def test_serial_pool_passes_reset_options() -> None:
    with SerialEnvPool(EnvFactory("alfworld", {"split": "embedded"}), 3) as pool:
        _pool_resets(pool)


@pytest.mark.usefixtures("ray_session")
def test_ray_pool_passes_reset_options() -> None:
    factory = EnvFactory("alfworld", {"split": "embedded"})
    with RayEnvPool(factory, 3, envs_per_actor=2, num_cpus_per_actor=0.5) as pool:
        _pool_resets(pool)
