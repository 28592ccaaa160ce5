"""The env checker of ``envs.make``: the info contract on the first reset and step, nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest

import envs
from agents.rollout.env_pool import EnvFactory, SerialEnvPool
from envs.base import InfoKeys, TextEnv
from envs.checker import EnvChecker, EnvContractError
from envs.math.verify import Verifier
from envs.registry import load_plugins
from tests.envs import plugin_fixture
from tests.envs.plugin_fixture import write_plugin

fresh_registry = plugin_fixture.fresh_registry
plugin_path = plugin_fixture.plugin_path


class Counter(TextEnv):
    """Count to three; ``drop`` names info keys left out, ``on`` says where (reset or step)."""

    def __init__(self, drop: tuple[str, ...] = (), on: str = "reset", **override: Any) -> None:
        super().__init__()
        self.drop, self.on, self.override = drop, on, override
        self.n = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.n = 0
        return "count", self._info("reset")

    def step(self, action: str):
        self.n += 1
        return f"at {self.n}", float(self.n == 3), self.n == 3, False, self._info("step")

    def _info(self, call: str) -> dict[str, Any]:
        info: dict[str, Any] = {
            InfoKeys.ADMISSIBLE_ACTIONS: ["next"],
            InfoKeys.ANCHOR: self.n,
            InfoKeys.WON: self.n == 3,
            InfoKeys.SUBTASK: "count",
            InfoKeys.ACTION_VALID: True,
        }
        if call == self.on:
            info.update(self.override)
            for key in self.drop:
                del info[key]
        return info


def test_plugin_missing_won_raises_naming_the_key_and_the_env(plugin_path: Path) -> None:
    plugin = write_plugin(plugin_path, env_name="echo_no_won")
    module = plugin_path / plugin.package / "__init__.py"
    text = module.read_text()
    assert "InfoKeys.WON: won," in text
    module.write_text(text.replace("            InfoKeys.WON: won,\n", ""))
    load_plugins(reload=True)
    env = envs.make("echo_no_won")
    with pytest.raises(EnvContractError) as err:
        env.reset(seed=0)
    message = str(err.value)
    assert "'echo_no_won'" in message and plugin.package in message
    assert "lacks the required keys ['won']" in message and "first reset" in message


def test_key_missing_from_the_first_step_only_is_caught(fresh_registry: None) -> None:
    envs.register("count-no-anchor", Counter)
    env = envs.make("count-no-anchor", drop=(InfoKeys.ANCHOR,), on="step")
    env.reset(seed=0)
    with pytest.raises(EnvContractError, match=r"'count-no-anchor'.*first step.*\['anchor'\]"):
        env.step("next")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({InfoKeys.WON: "yes"}, "info['won'] must be a bool, got str"),
        ({InfoKeys.ACTION_VALID: 1}, "info['action_valid'] must be a bool, got int"),
        ({InfoKeys.ADMISSIBLE_ACTIONS: "next"}, "'admissible_actions'] must be a list of str"),
        ({InfoKeys.ANCHOR: ["a", "list"]}, "info['anchor'] must be hashable, got list"),
        ({InfoKeys.SUBTASK: None}, "info['subtask'] must be a str, got NoneType"),
    ],
)
def test_key_of_the_wrong_type_is_named(
    fresh_registry: None, override: dict[str, Any], expected: str
) -> None:
    envs.register("count-typed", Counter)
    with pytest.raises(EnvContractError, match=r"'count-typed'") as err:
        envs.make("count-typed", **override).reset(seed=0)
    assert expected in str(err.value)


class BadShapes(Counter):
    def step(self, action: str):  # type: ignore[override]
        obs, reward, terminated, _, info = super().step(action)
        return obs, True, terminated, info  # a 4-tuple, a bool reward


def test_step_of_the_wrong_shape_is_named(fresh_registry: None) -> None:
    envs.register("bad-shape", BadShapes)
    env = envs.make("bad-shape")
    env.reset()
    with pytest.raises(EnvContractError, match="got a tuple of 4"):
        env.step("next")


def test_a_factory_returning_no_gym_env_raises(fresh_registry: None) -> None:
    envs.register("not-an-env", lambda: object())
    with pytest.raises(EnvContractError, match=r"'not-an-env' is a builtins.object, not a gym"):
        envs.make("not-an-env")


def test_the_rollout_pool_gets_the_error_not_a_default(fresh_registry: None) -> None:
    envs.register("count-no-won", Counter)
    with SerialEnvPool(EnvFactory("count-no-won", {"drop": (InfoKeys.WON,)}), 2) as pool:
        with pytest.raises(EnvContractError, match=r"'count-no-won'.*\['won'\]"):
            pool.reset([0, 1], [0, 1])


def test_correct_plugin_passes_unchanged_and_adds_no_step_limit(plugin_path: Path) -> None:
    write_plugin(plugin_path, env_name="echo")
    load_plugins(reload=True)
    env = envs.make("echo", max_steps=3)
    assert isinstance(env, EnvChecker) and env.unwrapped is env.env
    raw = env.unwrapped
    obs, info = env.reset(seed=0)
    assert obs.startswith("Say the word:") and info[InfoKeys.SUBTASK] == "echo"
    results = [env.step("not a word") for _ in range(3)]
    # the env's own limit, no other: running on after it is the env's business
    assert [r[2] for r in results] == [False, False, True]
    assert env.checked_reset and env.checked_step and raw.max_steps == 3  # read through
    assert not any(isinstance(w, gym.wrappers.TimeLimit) for w in _stack(env))


def _stack(env: gym.Env) -> list[gym.Env]:
    out = [env]
    while isinstance(out[-1], gym.Wrapper):
        out.append(out[-1].env)
    return out


def test_alfworld_passes_and_keeps_its_own_truncation() -> None:
    env = envs.make("alfworld", split="embedded", max_steps=2)
    try:
        assert env.num_tasks == 60 and len(env.games) == 60  # attributes read through
        obs, info = env.reset(seed=0)
        assert info[InfoKeys.ANCHOR] == obs and isinstance(info[InfoKeys.WON], bool)
        first = env.step("look")
        second = env.step("look")
        assert env.checked_reset and env.checked_step
        assert first[3] is False and second[3] is True  # truncated by the env at max_steps=2
    finally:
        env.close()


def test_math_passes() -> None:
    with Verifier(num_workers=1, timeout_s=5.0) as verifier:
        env = envs.make("math", verifier=verifier)
        obs, info = env.reset(seed=0)
        assert info[InfoKeys.ADMISSIBLE_ACTIONS] == [] and info[InfoKeys.ANCHOR] in obs
        _, reward, terminated, truncated, info = env.step(env.expert_answer())
        assert env.checked_step and info[InfoKeys.WON] is True
        assert (reward, terminated, truncated) == (1.0, True, False)
