"""Prompt templates are chosen by name and their fields are bounded.

``env.prompt`` used to be joined to ``configs/prompts/`` as a path, so ``env.prompt=/abs/path`` or
``../..`` read any YAML file as the run's prompt; and a field with a format spec
(``{observation:3000000}``) padded every prompt to three million characters. Now only the shipped
templates and the plugins' entry points are found, and a template's fields are plain, few and in a
text of bounded length.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from agents.config import ConfigError, build_run_config
from agents.rollout.prompts import (
    _PROMPTS,
    MAX_TEMPLATE_CHARS,
    MAX_TEMPLATE_FIELDS,
    PromptState,
    PromptTemplate,
    build_prompt,
    load_template,
)
from agents.run.preflight import check_env
from tests.reliability.test_config_checks import _tree


def _outside_template(tmp_path: Path) -> Path:
    """A valid template file outside ``configs/prompts`` (the path without ``.yaml``)."""
    fields = yaml.safe_load((Path(str(_PROMPTS)) / "maze.yaml").read_text())
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump({**fields, "name": "evil"}))
    return tmp_path / "evil"


def test_a_template_path_is_not_a_name(tmp_path: Path) -> None:
    outside = _outside_template(tmp_path)
    relative = os.path.relpath(outside, Path(str(_PROMPTS)))
    assert relative.startswith("..")
    for name in (str(outside), relative):
        with pytest.raises(KeyError, match="chosen by name, not by path"):
            load_template(name)


def test_env_prompt_as_a_path_fails_before_any_work(tmp_path: Path) -> None:
    outside = _outside_template(tmp_path)
    cfg = build_run_config(_tree(tmp_path, "env=alfworld", f"env.prompt={outside}"))
    with pytest.raises(ConfigError, match="env.prompt=.*not by path.*available: .*'alfworld'"):
        check_env(cfg)


@pytest.mark.parametrize(
    "first_turn",
    [
        "{observation:3000000}",  # a field width: three million characters per prompt
        "{observation:>{current_step}}",  # a nested field in the spec
        "{observation!r}",
        "{admissible_actions:.1000000}",
    ],
)
def test_a_field_with_a_format_spec_is_refused(first_turn: str) -> None:
    with pytest.raises(ValueError, match="format spec or conversion"):
        PromptTemplate(name="wide", first_turn=first_turn, turn="{observation}")


def test_fields_and_texts_are_bounded() -> None:
    many = "{observation}" * (MAX_TEMPLATE_FIELDS + 1)
    with pytest.raises(ValueError, match=f"at most {MAX_TEMPLATE_FIELDS}"):
        PromptTemplate(name="many", first_turn=many, turn="{observation}")
    for key in ("first_turn", "system", "response_format"):
        fields = {"first_turn": "{observation}", "turn": "{observation}"}
        fields[key] = "x" * (MAX_TEMPLATE_CHARS + 1)
        with pytest.raises(ValueError, match=f"{key} has {MAX_TEMPLATE_CHARS + 1} characters"):
            PromptTemplate(name="long", **fields)
    with pytest.raises(ValueError, match="Single '}'"):
        PromptTemplate(name="brace", first_turn="{observation}}", turn="{observation}")


def test_the_shipped_templates_still_render() -> None:
    state = PromptState("task", (("seen", "did"),), "now", ("look",))
    for name in ("alfworld", "alfworld_short", "maze", "math", "math_short", "skyrl", "text"):
        template = load_template(name)
        for window in (0, 1):
            (*_, user) = build_prompt(template, state, window=window)
            assert len(user["content"]) < MAX_TEMPLATE_CHARS
