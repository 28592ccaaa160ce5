"""The skyrl-gym adapter (``envs/skyrl/``): its generated problems and what it maps.

The conformance suite (``tests/envs/test_conformance.py``) checks the contract; these tests check
the adapter's own rules against skyrl-gym's real envs: the problems' answers, the reward of each
kind of reply, where an episode ends and how, and the anchors of the turns.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

import envs
from envs.skyrl.problems import KINDS, generate

needs_skyrl = pytest.mark.skipif(
    importlib.util.find_spec("skyrl_gym") is None,
    reason="env 'skyrl' needs the skyrl_gym package: pip install '.[skyrl]'",
)


def _solve(question: str) -> int:
    """The answer of a generated problem, read back from its numbers (not from the generator)."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "gives" in question:
        return n[0] + n[1] - n[2]
    if "box holds" in question:
        return n[0] * n[1] + n[2]
    if "equally among" in question:
        assert n[0] % n[1] == 0, question
        return n[0] // n[1]
    return n[0] * n[1] + n[2]


def test_problems_are_deterministic_and_their_answers_follow_from_the_text() -> None:
    seen = set()
    for seed in [*range(200), *range(1_000_000, 1_000_050)]:
        problem = generate(seed)
        assert generate(seed) == problem
        assert problem.answer == _solve(problem.question) >= 0, problem
        seen.add(problem.kind)
    assert seen == set(KINDS)


@needs_skyrl
def test_training_and_heldout_problems_differ_and_seeds_cycle_the_list() -> None:
    train = envs.make("skyrl", num_problems=8).unwrapped
    heldout = envs.make("skyrl", split="heldout", num_problems=8).unwrapped
    assert not {p.question for p in train.problems} & {p.question for p in heldout.problems}
    assert train.num_tasks == 8 and train.task_subtasks == ("gsm8k_multi_turn",) * 8
    assert train.reset(seed=3)[0] == train.reset(seed=11)[0] != train.reset(seed=4)[0]
    assert train.reset(options={"index": 3})[0] == train.reset(seed=3)[0]


@needs_skyrl
def test_multi_turn_scores_each_reply_and_truncates_after_the_last_turn() -> None:
    env = envs.make("skyrl", task="gsm8k_multi_turn", max_turns=3)
    _, info = env.reset(seed=0)
    wrong = f"#### {int(info['reference']) + 1}"
    obs, reward, terminated, truncated, info = env.step("no number here")
    assert (reward, terminated, truncated, info["action_valid"]) == (0.0, False, False, False)
    assert "####" in obs  # skyrl-gym asks for another answer in its format
    obs, reward, terminated, truncated, info = env.step(f"Let me see. {wrong}")
    assert reward == pytest.approx(0.2 / 3) and info["action_valid"] and not info["won"]
    assert info["extracted"] == wrong.removeprefix("#### ") and not terminated and not truncated
    obs, reward, terminated, truncated, info = env.step(wrong)
    assert (terminated, truncated, info["won"], info["turn"]) == (False, True, False, 3)
    assert obs == "" and info["expert_plan"] == []
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(wrong)


@needs_skyrl
def test_a_right_answer_on_a_later_turn_wins_and_terminates() -> None:
    env = envs.make("skyrl", max_turns=5)
    _, info = env.reset(seed=5)
    env.step("#### 100000")
    _, reward, terminated, truncated, info = env.step(f"so the answer is\n#### {info['reference']}")
    assert (reward, terminated, truncated, info["won"], info["turn"]) == (1.0, True, False, True, 2)


@needs_skyrl
def test_anchors_tell_the_turns_of_a_problem_apart_and_repeat_across_envs() -> None:
    a, b = envs.make("skyrl"), envs.make("skyrl")
    anchors = []
    for env in (a, b):
        _, info = env.reset(seed=2)
        first = info["anchor"]
        obs_1, *_, info_1 = env.step("#### 1")
        obs_2, *_, info_2 = env.step("#### 2")
        assert obs_1 == obs_2  # skyrl-gym's request is the same on these turns ...
        assert len({first, info_1["anchor"], info_2["anchor"]}) == 3  # ... the anchors are not
        anchors.append((first, info_1["anchor"], info_2["anchor"]))
    assert anchors[0] == anchors[1]


@needs_skyrl
def test_single_turn_gsm8k_ends_after_one_answer() -> None:
    env = envs.make("skyrl", task="gsm8k")
    assert env.unwrapped.max_steps == 1
    _, info = env.reset(seed=1)
    right = info["expert_plan"][0]
    assert env.step(right)[1:4] == (1.0, True, False)
    env.reset(seed=1)
    _, reward, terminated, truncated, info = env.step(f"#### {int(info['reference']) + 2}")
    assert (reward, terminated, truncated, info["won"], info["action_valid"]) == (
        0.0,
        True,
        False,
        False,
        True,
    )


@needs_skyrl
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "search"}, "env.kwargs.task="),
        ({"split": "test"}, "env.kwargs.split="),
        ({"num_problems": 0}, "env.kwargs.num_problems"),
        ({"max_turns": True}, "env.kwargs.max_turns"),
        ({"seed_start": 999_990, "num_problems": 20}, "env.kwargs.seed_start"),
    ],
)
def test_bad_settings_raise_naming_the_setting(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        envs.make("skyrl", **kwargs)
