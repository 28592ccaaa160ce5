"""Hydra glue shared by ``python -m agents.train`` and ``python -m agents.evaluate``."""

from __future__ import annotations

from importlib import resources
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import envs
from agents.rollout.prompts import plugin_templates

DEFAULT_PROMPT = "text"
"""Prompt template of a plugin env that ships none (``configs/prompts/text.yaml``)."""


def register_env_configs() -> list[str]:
    """Give every registered env without a ``configs/env/<name>.yaml`` a default config node.

    A plugin env (entry point ``holderpo.envs``) is then trainable as ``env=<name>``, ``kwargs``
    taken from ``env.kwargs.*`` overrides. Its prompt is the template a plugin ships under the
    env's name (entry point ``holderpo.prompts``, :func:`agents.rollout.prompts.plugin_templates`),
    else the generic :data:`DEFAULT_PROMPT`. Returns the names added.
    """
    shipped = {
        p.name.removesuffix(".yaml") for p in resources.files("configs").joinpath("env").iterdir()
    }
    added = [name for name in envs.registered() if name not in shipped]
    store = ConfigStore.instance()
    templates = plugin_templates() if added else {}
    for name in added:
        node: dict[str, Any] = {
            "name": name,
            "prompt": name if name in templates else DEFAULT_PROMPT,
            "split_key": None,
            "kwargs": {},
            "eval_kwargs": {},
        }
        store.store(group="env", name=name, node=node)
    return added


def with_hydra_run_dir(container: dict[str, Any]) -> dict[str, Any]:
    """``container`` whose ``run_dir`` is Hydra's output folder of this job, when Hydra runs.

    ``run_dir=X`` sets ``hydra.run.dir`` (``configs/config.yaml``), and ``hydra.run.dir=X`` or a
    ``--multirun`` job's ``<hydra.sweep.dir>/<hydra.sweep.subdir>`` sets ``run_dir``: the run's
    files and Hydra's (``.hydra/``, the log) share one folder.
    """
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        container["run_dir"] = str(HydraConfig.get().runtime.output_dir)
    return container


def to_container(tree: DictConfig) -> dict[str, Any]:
    """The composed config as a plain, resolved dict."""
    container = OmegaConf.to_container(tree, resolve=True)
    if not isinstance(container, dict):
        raise TypeError(f"the composed config is a {type(container).__name__}, not a mapping")
    return {str(k): v for k, v in container.items()}
