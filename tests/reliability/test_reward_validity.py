"""Validity means what the config and the docs say: a parsable answer, an action that is executed.

Math: ``action_valid`` (and with it ``format_reward``) used to be True for any non-empty
``\\boxed{…}``: a megabyte of garbage the verifier gave up on, or text in which math-verify found no
expression, earned the 0.1 format reward. A comparison math-verify gave up on (its own timeout)
read "not equal". ALFWorld with unconstrained decoding (the official recipe's ``alfworld``
template): an untagged exact command, or a tagged one without the required think block, was sent
to the env and executed while the step was flagged invalid (a probe won a game that way). The
policy here is the tiny model with its decoding constrained to the response under test, so the
rollout manager, the env and the engine are the real ones.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from agents.generation.hf import HFPolicy
from agents.rollout.env_pool import EnvFactory, SerialEnvPool
from agents.rollout.manager import RolloutConfig, RolloutManager
from agents.rollout.prompts import load_template
from agents.types import Trajectory
from envs.base import InfoKeys
from envs.math.env import VERIFY_STATUS, MathEnv
from envs.math.verify import TIMEOUT, Verifier
from tests.reliability.test_worker_failures import tiny  # noqa: F401 (the tiny model fixture)

# ------------------------------------------------------------------------------------ math


def _garbage(size: int) -> str:
    """Printable junk without braces or backslashes (so that it stays inside one box)."""
    rng = random.Random(0)
    chars = [chr(c) for c in range(33, 127) if chr(c) not in "{}\\"]
    return "".join(rng.choice(chars) for _ in range(size))


@pytest.mark.parametrize(
    ("case", "answer", "statuses"),
    [
        ("a megabyte of garbage", _garbage(1 << 20), {"timeout", "unparsable"}),
        ("text with no expression", "?!?", {"unparsable"}),
        ("words math-verify reads as a product", "the answer is forty two", {"unparsable"}),
    ],
)
def test_an_unparsable_box_is_invalid_and_earns_no_format_reward(
    case: str, answer: str, statuses: set[str]
) -> None:
    env = MathEnv(format_reward=0.1)
    try:
        env.reset(seed=0)
        _, reward, _, _, info = env.step(f"so the answer is \\boxed{{{answer}}}")
        assert info[VERIFY_STATUS] in statuses, (case, info["verify_reason"][:200])
        assert info[InfoKeys.ACTION_VALID] is False and reward == 0.0, case
        env.reset(seed=0)
        _, reward, _, _, info = env.step("\\boxed{-123456789}")  # parsable and wrong: paid
        assert info[InfoKeys.ACTION_VALID] is True and reward == 0.1
    finally:
        env.close()


def test_a_comparison_the_verifier_gave_up_on_is_a_timeout_not_a_wrong_answer() -> None:
    # parsing both is quick; expanding the difference takes far longer than math-verify's 1 s
    heavy = "(x+1)^{4000}-(x-1)^{4000}"  # ^400 finishes in about 1 s on a fast core
    with Verifier(num_workers=1, timeout_s=60.0, inner_timeout_s=1) as verifier:
        result, plain = verifier.score([(heavy, "0"), ("3", "4")])
    assert result.status == TIMEOUT and not result.correct and not result.parsed
    assert "comparing with the reference timed out" in result.reason
    assert (plain.status, plain.reason) == ("not_equal", "not equal to the reference")


# -------------------------------------------------------------------------------- ALFWorld


class Says:
    """The tiny model's policy, its decoding constrained to one given response per turn."""

    def __init__(self, policy: HFPolicy, responses: list[str]) -> None:
        self.policy, self.responses = policy, list(responses)
        self.tokenizer, self.max_context, self.pad_id = (
            policy.tokenizer,
            policy.max_context,
            policy.pad_id,
        )

    def prompt_ids(self, prompt: Any) -> Any:
        return self.policy.prompt_ids(prompt)

    def generate_ids(self, ids: Any, params: Any, *, allowed: Any = None) -> Any:
        response = self.responses.pop(0)
        return self.policy.generate_ids(ids, params, allowed=[[response]] * len(ids))


def _play(loaded: Any, template: str, wrap: str) -> tuple[Trajectory, list[str]]:
    """An embedded game played by responses ``wrap.format(command)`` along its walkthrough."""
    model, tokenizer, _ = loaded
    pool = SerialEnvPool(EnvFactory("alfworld", {"split": "embedded", "disk_cache": False}), 1)
    try:
        _, info = pool.reset([0], [0])[0]
        plan = list(info["expert_plan"])
        policy = Says(HFPolicy(model, tokenizer), [wrap.format(c) for c in plan])
        config = RolloutConfig(load_template(template), max_new_tokens=96)
        manager = RolloutManager(policy, pool, config)
        (trajectory,), _ = manager.collect(1, 1, len(plan), seed=0, group_seeds=[0])
    finally:
        pool.close()
    return trajectory, plan


@pytest.mark.parametrize(
    ("case", "template", "wrap"),
    [
        ("untagged exact command", "alfworld", "{}"),
        ("no think block", "alfworld", "<action>{}</action>"),
        ("untagged, no think required", "maze", "{}"),
    ],
)
def test_an_invalid_response_is_not_executed(tiny, case: str, template: str, wrap: str) -> None:  # noqa: F811
    trajectory, plan = _play(tiny, template, wrap)
    assert [s.response_text for s in trajectory.steps] == [wrap.format(c) for c in plan], case
    for step in trajectory.steps:
        assert step.action_valid is False
        assert step.info[InfoKeys.ACTION_VALID] is False, f"{case}: {step.action!r} was executed"
    assert not trajectory.success and trajectory.total_reward == 0.0
    assert trajectory.steps[-1].info["expert_plan"] == plan  # the game did not move


def test_the_walkthrough_in_valid_responses_still_wins(tiny) -> None:  # noqa: F811
    trajectory, _ = _play(tiny, "alfworld", "<think>go on</think><action>{}</action>")
    assert all(s.action_valid and s.info[InfoKeys.ACTION_VALID] for s in trajectory.steps)
    assert trajectory.success
