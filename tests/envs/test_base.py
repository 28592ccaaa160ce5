"""The text-env contract: text spaces, the info schema and its checker."""

from __future__ import annotations

import gymnasium as gym
import pytest

from envs.base import MAX_TEXT_LENGTH, InfoKeys, TextEnv, check_info, text_space


def test_text_space_accepts_model_text():
    space = text_space()
    for text in ["", "go to cabinet 1", "<think>x</think>\n\t<action>look</action>", "答案 ü ∑"]:
        assert space.contains(text)
    assert not space.contains("x" * (MAX_TEXT_LENGTH + 1))
    assert not space.contains(b"bytes")


def test_text_env_has_text_spaces():
    env = TextEnv()
    assert isinstance(env, gym.Env)
    assert env.observation_space.contains("anything") and env.action_space.contains("anything")


def test_check_info_names_missing_keys():
    full = {key: None for key in InfoKeys.REQUIRED}
    check_info(full)
    partial = dict(full)
    del partial[InfoKeys.ANCHOR], partial[InfoKeys.WON]
    with pytest.raises(KeyError, match="anchor.*won"):
        check_info(partial)


def test_required_keys_are_the_documented_schema():
    assert InfoKeys.REQUIRED == (
        "admissible_actions",
        "anchor",
        "won",
        "subtask",
        "action_valid",
    )


def test_each_text_space_is_its_own_but_shares_the_charset_index():
    a, b = text_space(), text_space()
    assert a is not b and a == b  # equal spaces (same charset and lengths)
    assert vars(a)["_char_index"] is vars(b)["_char_index"]  # gymnasium's index, built once
    a.seed(0)
    first = a.sample()
    b.seed(1)
    a.seed(0)
    assert a.sample() == first  # seeding one space leaves the other's generator alone
    assert a.np_random is not b.np_random
