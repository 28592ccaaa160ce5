"""Hydra glue shared by ``python -m agents.train`` and ``python -m agents.evaluate``."""

from __future__ import annotations

from importlib import resources
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import envs

DEFAULT_PROMPT = "text"
"""Prompt template of envs whose config names none (``configs/prompts/text.yaml``)."""


def register_env_configs() -> list[str]:
    """Give every registered env without a ``configs/env/<name>.yaml`` a default config node.

    A plugin env (entry point ``holderpo.envs``) is then trainable as ``env=<name>`` with the
    generic prompt, ``kwargs`` taken from ``env.kwargs.*`` overrides. Returns the names added.
    """
    shipped = {
        p.name.removesuffix(".yaml") for p in resources.files("configs").joinpath("env").iterdir()
    }
    added = [name for name in envs.registered() if name not in shipped]
    store = ConfigStore.instance()
    for name in added:
        node: dict[str, Any] = {
            "name": name,
            "prompt": DEFAULT_PROMPT,
            "split_key": None,
            "kwargs": {},
            "eval_kwargs": {},
        }
        store.store(group="env", name=name, node=node)
    return added


def to_container(tree: DictConfig) -> dict[str, Any]:
    """The composed config as a plain, resolved dict."""
    container = OmegaConf.to_container(tree, resolve=True)
    if not isinstance(container, dict):
        raise TypeError(f"the composed config is a {type(container).__name__}, not a mapping")
    return {str(k): v for k, v in container.items()}
