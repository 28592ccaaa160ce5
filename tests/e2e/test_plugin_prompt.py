"""A plugin env that ships its own prompt template (entry point ``holderpo.prompts``).

The plugin distribution is real (written by :mod:`tests.envs.plugin_fixture`, found through
``importlib.metadata``); its template is found by name, becomes the default prompt of the env's
config node, and drives a real ``python -m agents.train env=<name>`` run of the tiny model.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore

from agents.generation.models import load_policy_model
from agents.rollout.prompts import ENTRY_POINT_GROUP, PromptState, build_prompt, load_template
from agents.run.cli import DEFAULT_PROMPT, register_env_configs
from agents.run.metrics import read_metrics
from envs import registry
from tests.e2e.test_train_cli import TINY, _env, _run
from tests.envs import plugin_fixture
from tests.envs.plugin_fixture import Plugin, write_plugin

fresh_registry = plugin_fixture.fresh_registry
plugin_path = plugin_fixture.plugin_path

SYSTEM = "You repeat words. Answer as <action>word</action>."
WORDS = ("apple", "banana", "cherry", "grape")  # the echo env's vocabulary


def write_prompt_plugin(root: Path, env_name: str, *, template_name: str | None = None) -> Plugin:
    """An echo-env plugin that also ships a ``tag`` template under ``template_name``.

    ``template_name`` defaults to the env's name (what ``env=<name>`` picks up).
    """
    plugin = write_plugin(root, env_name=env_name)
    module = root / plugin.package / "__init__.py"
    module.write_text(
        module.read_text()
        + "\nPROMPT = {\n"
        + f"    'system': {SYSTEM!r},\n"
        + "    'first_turn': '{observation}\\nWords: {admissible_actions}',\n"
        + "    'turn': '{history}\\nNow: {observation}',\n"
        + "    'action_format': 'tag',\n"
        + "    'stop': ['</action>'],\n"
        + "}\n"
    )
    entry_points = root / f"{plugin.dist.replace('-', '_')}-0.1.dist-info" / "entry_points.txt"
    entry_points.write_text(
        entry_points.read_text()
        + f"\n[{ENTRY_POINT_GROUP}]\n{template_name or env_name} = {plugin.package}:PROMPT\n"
    )
    importlib.invalidate_caches()
    return plugin


def test_a_plugin_template_is_found_by_name_and_renders(plugin_path: Path) -> None:
    write_prompt_plugin(plugin_path, "echo_prompt")
    template = load_template("echo_prompt")
    assert template.name == "echo_prompt" and template.action_format == "tag"
    assert template.stop == ("</action>",)
    prompt = build_prompt(template, PromptState("", (), "Say the word: apple", WORDS), window=2)
    assert prompt[0] == {"role": "system", "content": SYSTEM}
    assert prompt[1]["content"] == "Say the word: apple\nWords: apple, banana, cherry, grape"
    with pytest.raises(KeyError, match="'echo_prompt'"):  # unknown names list the plugin's too
        load_template("no_such_template")


def test_a_plugin_template_cannot_take_a_shipped_name(plugin_path: Path) -> None:
    write_prompt_plugin(plugin_path, "echo_shadow", template_name="text")
    with pytest.raises(ValueError, match="'text' is shipped by the package.*another name"):
        load_template("text")


def test_the_env_config_node_uses_the_plugin_template(plugin_path: Path) -> None:
    write_prompt_plugin(plugin_path, "echo_node")
    write_plugin(plugin_path, env_name="echo_plain")  # ships no template
    registry.load_plugins(reload=True)  # the process may have loaded the plugins before
    added = register_env_configs()
    assert {"echo_node", "echo_plain"} <= set(added)
    nodes = ConfigStore.instance().repo["env"]
    assert nodes["echo_node.yaml"].node["prompt"] == "echo_node"
    assert nodes["echo_plain.yaml"].node["prompt"] == DEFAULT_PROMPT


def test_plugin_env_with_its_template_trains_by_name(tmp_path: Path) -> None:
    cache = tmp_path / "model-cache"
    _, tokenizer = load_policy_model("tiny", device="cpu", cache_dir=cache)
    plugin = write_prompt_plugin(tmp_path / "plugin", "echo_tpl")
    run_dir = tmp_path / "run"
    args = [
        "env=echo_tpl",
        *TINY,
        "trainer.iterations=1",
        "protocol=grpo",
        "algorithm=grpo",
        f"run_dir={run_dir}",
    ]
    _run("agents.train", args, _env(cache, plugin.root))
    assert json.loads((run_dir / "run_config.json").read_text())["env"]["prompt"] == "echo_tpl"
    (row,) = read_metrics(run_dir / "metrics.jsonl")
    # Constrained decoding emits one allowed response and EOS per step: under the plugin's tag
    # template that is <action>word</action>, longer than any bare word of the generic template.

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS

    shortest_tag = min(tokens(f"<action>{w}</action>") for w in WORDS)
    assert shortest_tag > max(tokens(w) for w in WORDS)
    assert row["rollout/tokens_generated"] >= shortest_tag * row["rollout/env_steps"] > 0
    assert row["rollout/invalid_action_rate"] == 0.0
    report = json.loads((run_dir / "eval" / "iter-000001.json").read_text())
    assert [s["name"] for s in report["scores"]] == ["echo"]
