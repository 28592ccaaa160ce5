"""Arbitrary model text never breaks the parser or the envs (hypothesis, bounded in time).

Model output is untrusted text: tags half open, nested, in any case, control characters, huge
runs, LaTeX braces that never close. The parser must return a verdict, and both envs (the
embedded ALFWorld games and the math env with its real verifier) must answer every step with an
observation, a float reward and the info schema, whatever they were sent.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import envs
from envs.base import check_info
from envs.parsing import extract_answer_tag, extract_boxed, parse_action

FRAGMENTS = [
    "<action>",
    "</action>",
    "<ACTION>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "\\boxed{",
    "\\fbox{",
    "{",
    "}",
    "\\{",
    "\\}",
    "\\\\",
    "go to desk 1",
    "take mug 1 from desk 1",
    "look",
    "inventory",
    "\\frac{1}{2}",
    "9^{9^{9^{9}}}",
    "\n",
    "\x00",
    "\u200b",
    "é",
    " ",
]
"""Pieces that real outputs are made of, mixed with arbitrary characters below."""

TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=40)), max_size=30).map(
    "".join
)
"""Model-like text: fragments and arbitrary unicode, up to a few hundred characters."""

# No per-example deadline: a wall-clock limit fails on a loaded machine (a cold game took 3.2 s
# at load 17, 13 ms when retried); a hang is still caught by pytest-timeout.
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENV = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MATH = settings(
    max_examples=40,
    deadline=None,  # the verifier's own hard limit bounds a step (5 s, then a fresh worker)
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(text=TEXT, admissible=st.one_of(st.none(), st.lists(st.text(max_size=20), max_size=5)))
def test_parse_action_returns_a_verdict(text: str, admissible: list[str] | None) -> None:
    for think in (False, True):
        parsed = parse_action(text, admissible, require_think=think)
        assert isinstance(parsed.action, str) and isinstance(parsed.valid, bool)
        assert parsed.valid == (parsed.reason == "")
        if parsed.valid and admissible is not None:
            assert parsed.action in admissible
        if parsed.valid:
            assert parsed.action.strip() == parsed.action != ""


@FAST
@given(text=TEXT)
def test_answer_extractors_return_text_from_the_input_or_none(text: str) -> None:
    boxed = extract_boxed(text)
    assert boxed is None or boxed in text
    tag = extract_answer_tag(text)
    assert tag is None or tag in text


@FAST
@given(text=TEXT)
def test_a_wrapped_action_parses_back(text: str) -> None:
    action = " ".join(text.replace("<", " ").replace(">", " ").split())
    parsed = parse_action(f"noise <action>{action}</action>")
    assert parsed.valid == bool(action) and parsed.action == action


@pytest.fixture(scope="module")
def alfworld():
    env = envs.make("alfworld", split="embedded_train", disk_cache=False)
    yield env
    env.close()


@pytest.fixture(scope="module")
def math_env():
    pytest.importorskip("math_verify")
    env = envs.make("math", dataset="embedded", verify_timeout_s=5.0)
    yield env
    env.close()


def _check_step(out: tuple) -> None:
    obs, reward, terminated, truncated, info = out
    assert isinstance(obs, str) and isinstance(reward, float) and math.isfinite(reward)
    assert isinstance(terminated, bool) and isinstance(truncated, bool)
    check_info(dict(info))


@ENV
@given(seed=st.integers(0, 2**16), actions=st.lists(TEXT, min_size=1, max_size=4))
def test_alfworld_answers_any_text(alfworld, seed: int, actions: list[str]) -> None:
    alfworld.reset(seed=seed)
    for action in actions:
        out = alfworld.step(action)
        _check_step(out)
        if out[2] or out[3]:
            break


@MATH
@given(seed=st.integers(0, 2**16), answer=TEXT)
def test_math_env_answers_any_text(math_env, seed: int, answer: str) -> None:
    math_env.reset(seed=seed)
    for text in (answer, f"so \\boxed{{{answer}}}"):  # as it comes, and boxed (verified)
        out = math_env.step(text)
        _check_step(out)
        assert out[2] and out[1] in (0.0, 1.0)
        math_env.reset(seed=seed)
