"""The env registry: built-ins, duplicates, unknown names and real entry-point plugins."""

from __future__ import annotations

import warnings

import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import registry
from envs.base import TextEnv, check_info
from envs.registry import PluginError, load_plugins
from tests.envs import plugin_fixture
from tests.envs.plugin_fixture import write_plugin

fresh_registry = plugin_fixture.fresh_registry
plugin_path = plugin_fixture.plugin_path


def test_builtins_are_registered():
    names = envs.registered()
    assert {"alfworld", "math"} <= set(names)
    assert names == sorted(names)


def test_duplicate_name_raises(fresh_registry):
    envs.register("toy-dup", TextEnv)
    with pytest.raises(ValueError, match="already registered"):
        envs.register("toy-dup", TextEnv)
    with pytest.raises(ValueError, match="'math' is already registered"):
        envs.register("math", TextEnv)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError) as err:
        envs.make("no-such-env")
    message = str(err.value)
    assert "no-such-env" in message
    for name in envs.registered():
        assert repr(name) in message


def test_registered_factory_is_called_with_kwargs(fresh_registry):
    seen = {}

    def factory(**kwargs):
        seen.update(kwargs)
        return TextEnv()

    envs.register("toy-factory", factory)
    assert isinstance(envs.make("toy-factory", size=3).unwrapped, TextEnv)
    assert seen == {"size": 3}


def test_entry_point_plugin_is_found_and_made(plugin_path):
    plugin = write_plugin(plugin_path, env_name="echo")
    load_plugins(reload=True)
    assert "echo" in envs.registered()
    assert "plugin 'echo'" in registry._REGISTRY["echo"].source
    env = envs.make("echo", max_steps=2)
    obs, info = env.reset(seed=0)
    check_info(info)
    word = obs.rsplit(" ", 1)[-1]
    assert type(env.unwrapped).__module__ == plugin.package
    assert env.step("not it")[1:3] == (0.0, False)
    assert env.step(word)[1:3] == (1.0, True)


def test_plugins_load_once_unless_reloaded(plugin_path):
    load_plugins(reload=True)
    write_plugin(plugin_path, env_name="late_echo")
    load_plugins()  # already loaded: the new distribution is not looked at
    assert "late_echo" not in envs.registered()
    load_plugins(reload=True)  # the earlier plugins are kept, the new one is added
    assert "late_echo" in envs.registered()
    load_plugins(reload=True)  # reloading again does not count as a duplicate
    assert envs.registered().count("late_echo") == 1


def test_broken_plugin_raises_naming_it(plugin_path):
    write_plugin(plugin_path, env_name="broken_env", broken=True)
    with pytest.raises(PluginError, match="'broken_env'") as err:
        load_plugins(reload=True)
    assert "not installed" in str(err.value)
    with pytest.raises(PluginError, match="'broken_env'"):  # raises again, not silently skipped
        envs.make("math")


def test_plugin_with_a_taken_name_raises(plugin_path):
    write_plugin(plugin_path, env_name="math", dist="holderpo-test-shadow")
    with pytest.raises(ValueError, match="'math' is already registered.*plugin 'math'"):
        load_plugins(reload=True)


def test_plugin_env_passes_env_checker(plugin_path):
    write_plugin(plugin_path, env_name="echo")
    load_plugins(reload=True)
    env = envs.make("echo")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not having a spec.*")
        check_env(env)
