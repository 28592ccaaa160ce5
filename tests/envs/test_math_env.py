"""MathEnv on the embedded problems: contract, templates, rewards and errors."""

from __future__ import annotations

import warnings

import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.base import check_info
from envs.math.dataset import DATA_DIR_ENV, load_problems, load_templates
from envs.math.env import EXTRACTED, REFERENCE, MathEnv
from envs.math.verify import Verifier


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=2, timeout_s=5.0) as v:
        yield v


@pytest.fixture
def env(verifier):
    return MathEnv(verifier=verifier)


@pytest.mark.parametrize("template", ["qwen_math", "r1"])
def test_passes_env_checker(verifier, template):
    env = envs.make("math", template=template, verifier=verifier)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not having a spec.*")
        check_env(env)


def test_reset_renders_the_problem_with_the_template(env):
    obs, info = env.reset(options={"index": 3})
    problem = load_problems()[3]
    assert obs == load_templates()["qwen_math"].replace("{problem}", problem.problem)
    assert obs.endswith("put your final answer within \\boxed{}.")
    check_info(info)
    assert info["anchor"] == problem.problem
    assert info["admissible_actions"] == []
    assert info["subtask"] == "embedded"
    assert info["won"] is False and info["action_valid"] is True
    assert info[REFERENCE] == problem.answer and info[EXTRACTED] == ""


def test_reset_is_determined_by_the_seed(env):
    first = [env.reset(seed=s)[0] for s in range(8)]
    again = [env.reset(seed=s)[0] for s in range(8)]
    assert first == again
    assert len(set(first)) > 1


def test_every_embedded_reference_scores_one_and_a_wrong_answer_zero(env):
    for i, problem in enumerate(env.problems):
        env.reset(options={"index": i})
        obs, reward, terminated, truncated, info = env.step(
            f"Working...\nSo the answer is $\\boxed{{{problem.answer}}}$."
        )
        check_info(info)
        assert (obs, reward, terminated, truncated) == ("", 1.0, True, False), problem
        assert info["won"] is True and info[EXTRACTED] == problem.answer
        env.reset(options={"index": i})
        assert env.step("\\boxed{-999}")[1] == 0.0


@pytest.mark.parametrize(
    ("answer", "reward", "valid", "extracted"),
    [
        ("\\boxed{\\frac{3}{4}}", 1.0, True, "\\frac{3}{4}"),
        ("\\boxed{0.75}", 1.0, True, "0.75"),
        ("first \\boxed{1/2}, no wait: \\boxed{\\dfrac{3}{4}}", 1.0, True, "\\dfrac{3}{4}"),
        ("\\boxed{0.7}", 0.0, True, "0.7"),
        ("the answer is 3/4", 0.0, False, ""),
        ("\\boxed{\\frac{3}{4}", 0.0, False, ""),
        ("\\boxed{}", 0.0, False, ""),
    ],
)
def test_qwen_math_answers(env, answer, reward, valid, extracted):
    env.reset(options={"index": 2})  # Simplify 18/24 -> 3/4
    _, got, terminated, _, info = env.step(answer)
    assert (got, terminated, info["action_valid"], info[EXTRACTED]) == (
        reward,
        True,
        valid,
        extracted,
    )


@pytest.mark.parametrize(
    ("answer", "reward", "valid"),
    [
        ("<think>18/24 = 3/4</think> <answer>\\frac{3}{4}</answer>", 1.0, True),
        ("<think>…</think> <answer>So it is \\boxed{0.75}.</answer>", 1.0, True),
        ("<think>…</think> <answer>2/3</answer>", 0.0, True),
        ("<think>…</think> the answer is \\boxed{\\frac34}", 0.0, False),
        ("<think>…</think> <answer>3/4", 0.0, False),
    ],
)
def test_r1_answers(verifier, answer, reward, valid):
    env = MathEnv(template="r1", verifier=verifier)
    obs, _ = env.reset(options={"index": 2})
    assert "<answer>" in obs and obs.endswith("<think>")
    _, got, _, _, info = env.step(answer)
    assert (got, info["action_valid"]) == (reward, valid)


def test_step_needs_a_reset_per_problem(env):
    with pytest.raises(RuntimeError, match="reset"):
        env.step("\\boxed{1}")
    env.reset(seed=0)
    env.step("\\boxed{1}")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("\\boxed{1}")


def test_default_verifier_is_the_shared_one():
    env = MathEnv()
    env.reset(options={"index": 0})
    assert env.step("\\boxed{47}")[1] == 1.0


def test_bad_arguments_name_the_fix(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=DATA_DIR_ENV):
        MathEnv(dataset="math500")
    with pytest.raises(ValueError, match="embedded"):
        MathEnv(dataset="gsm8k")
    with pytest.raises(ValueError, match="qwen_math"):
        MathEnv(template="llama")
    with pytest.raises(IndexError):
        MathEnv().reset(options={"index": 32})


def test_format_reward_pays_a_parsable_wrong_answer_only() -> None:
    env = MathEnv(format_reward=0.1)
    env.reset(seed=0)
    right = env.expert_answer()
    env.reset(seed=0)
    assert env.step(right)[1] == 1.0
    env.reset(seed=0)
    assert env.step("the answer is \\boxed{-123456789}")[1] == 0.1
    env.reset(seed=0)
    assert env.step("no final answer here")[1] == 0.0
    with pytest.raises(ValueError, match="format_reward"):
        MathEnv(format_reward=1.0)
