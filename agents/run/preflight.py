"""Checks of a run config that need the env or the model, run before any work; CLI error output.

:func:`agents.config.build_run_config` checks every value against its range and the rules across
sections. What it cannot see is checked here, before a model loads or an env pool starts:

* the env builds with ``env.kwargs`` and with ``env.eval_kwargs`` applied (a bad evaluation split
  fails now, not after training);
* the prompt template exists;
* the model resolves (built-in, local folder, or a hub model in the cache or on the hub), and
  ``rollout.max_new_tokens`` leaves room for a prompt in its context, and LoRA's
  ``model.lora.target_modules`` name linear layers of it;
* the generator backend (``rollout.backend``) has what it needs installed (``vllm``: vLLM);
* ``trainer.device=cuda`` has a CUDA device to run on;
* ``rollout.pool=ray`` with a ``rollout.ray_address`` reaches a Ray cluster there within
  :data:`RAY_CONNECT_TIMEOUT_S` (Ray itself would wait for minutes without a word): the port
  accepts a connection and answers as a gRPC server (HTTP/2), as Ray's GCS does;
* each ``trainer.loggers`` name is a known tracker whose package is installed;
* on the command line (:func:`cli_errors`): ``debug`` is a boolean and an ``optional`` group's
  choice exists (Hydra skips a missing ``experiment=<name>`` without a word); before Hydra
  composes (:func:`check_renamed`), no override names a renamed key
  (:data:`agents.config.RENAMED_KEYS`: Hydra would only say the old key is not in the config).

Every failure is a :class:`~agents.config.ConfigError` naming the key and the fix.
:func:`cli_errors` prints such an error alone (exit status 2) in the CLIs; ``debug=true`` or
``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import envs
from agents.config import MIN_PROMPT_TOKENS, RENAMED_KEYS, ConfigError, RunConfig
from agents.generation.backends import BACKENDS
from agents.generation.models import ModelNotAvailableError, resolve_model

EXIT_CONFIG_ERROR: Final = 2
"""Exit status of a CLI stopped by a configuration error."""
OPTIONAL_GROUPS: Final = ("experiment",)
"""Config groups the root config lists as ``optional`` (a missing choice is no Hydra error)."""
RAY_CONNECT_TIMEOUT_S: Final = 5.0
"""Longest wait for the Ray cluster at ``rollout.ray_address`` to accept a connection."""


def preflight(cfg: RunConfig, *, model: bool = True) -> RunConfig:
    """Check the env, the prompt and (``model=True``) the model of ``cfg``; returns ``cfg``.

    Raises:
        ConfigError: naming the key and the fix.
    """
    check_backend(cfg)
    check_device(cfg)
    check_loggers(cfg)
    check_ray(cfg)
    check_env(cfg)
    if model:
        check_model(cfg)
    return cfg


def check_loggers(cfg: RunConfig) -> None:
    """Each ``trainer.loggers`` name is a known tracker whose package is installed."""
    from agents.run.metrics import logger_errors

    errors = logger_errors(cfg.trainer.loggers)
    if errors:
        raise ConfigError("; ".join(errors))


def check_backend(cfg: RunConfig) -> None:
    """The package ``rollout.backend`` needs imports here."""
    backend = BACKENDS[cfg.rollout.backend]
    if backend.missing():
        raise ConfigError(
            f"rollout.backend={cfg.rollout.backend} needs the {backend.requires!r} package, which "
            f"is not installed: run `{backend.install}`, or set rollout.backend=hf"
        )


def check_device(cfg: RunConfig) -> None:
    """``trainer.device=cuda`` needs a CUDA device that torch sees."""
    if cfg.trainer.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is "
            f"false; torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); use trainer.device=auto "
            "(CUDA when there is one, else the CPU) or trainer.device=cpu"
        )


def check_ray(cfg: RunConfig, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """``rollout.pool=ray`` with an address: something accepts connections there.

    ``rollout.ray_address=null`` starts a local Ray and ``auto`` asks Ray to find the cluster of
    this machine (Ray fails at once when there is none); a ``host:port`` (or ``ray://host:port``)
    must accept a TCP connection and answer an HTTP/2 preface (gRPC) within ``timeout_s``.
    """
    address = cfg.rollout.ray_address
    if cfg.rollout.pool != "ray" or address is None or address in ("auto", "local"):
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            grpc = _speaks_grpc(conn, timeout_s)
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise ConfigError(
            f"rollout.ray_address={address!r}: no Ray cluster answers at {host}:{port} within "
            f"{timeout_s:g} s ({reason}); start one there (`ray start --head --port={port}`), "
            "name the address of a running cluster, or set rollout.ray_address=null to start a "
            "local Ray"
        ) from exc
    if not grpc:
        raise ConfigError(
            f"rollout.ray_address={address!r}: {host}:{port} accepts connections but does not "
            "answer as a Ray cluster does (gRPC over HTTP/2); is it another service's port? Name "
            "the Ray head's GCS port (`ray start --head` prints it; 6379 by default) or its Ray "
            "Client port (ray://host:10001), or set rollout.ray_address=null to start a local Ray"
        )


_HTTP2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP2_EMPTY_SETTINGS: Final = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type 4
_HTTP2_SETTINGS: Final = 0x04


def _speaks_grpc(conn: socket.socket, timeout_s: float) -> bool:
    """Whether the peer answers an HTTP/2 client preface with a SETTINGS frame.

    Every gRPC server does (Ray's GCS and its Ray Client server); an HTTP/1 server, or one that
    says nothing within ``timeout_s``, does not.
    """
    conn.settimeout(timeout_s)
    try:
        conn.sendall(_HTTP2_PREFACE + _HTTP2_EMPTY_SETTINGS)
        header = b""
        while len(header) < 9:  # a frame header: length (3), type, flags, stream id (4)
            chunk = conn.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    except OSError:  # a timeout included
        return False
    return header[3] == _HTTP2_SETTINGS


def _host_port(address: str) -> tuple[str, int]:
    """``host:port`` of a Ray address (``ray://`` prefix allowed); a clear error otherwise."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"rollout.ray_address={address!r} is not an address: use host:port (e.g. "
            "rollout.ray_address=10.0.0.1:6379), auto (this machine's cluster) or null (a local "
            "Ray)"
        )
    return host.strip("[]"), int(port)


def check_env(cfg: RunConfig) -> None:
    """The env builds with the training kwargs and with the evaluation ones; the prompt exists."""
    from agents.rollout.prompts import load_template

    if cfg.env.name not in envs.registered():
        raise ConfigError(
            f"env={cfg.env.name!r} is unknown; choose env=<one of {envs.registered()}>"
        )
    try:
        load_template(cfg.env.prompt)
    except (KeyError, ValueError) as exc:  # unknown name; a template its checks refuse
        raise ConfigError(f"env.prompt={cfg.env.prompt!r}: {exc.args[0]}") from exc
    _builds(cfg.env.name, dict(cfg.env.kwargs), "env.kwargs")
    evaluation = {**cfg.env.kwargs, **cfg.env.eval_kwargs}
    if dict(cfg.env.eval_kwargs):
        _builds(cfg.env.name, evaluation, "env.eval_kwargs")


def _builds(name: str, kwargs: dict[str, Any], key: str) -> None:
    try:
        env = envs.make(name, **kwargs)
    except Exception as exc:  # an env's own check of its arguments, whatever its type
        raise ConfigError(
            f"{key} do not build env {name!r} ({_short(kwargs)}): {type(exc).__name__}: {exc}; "
            f"fix the {key}.* values"
        ) from exc
    env.close()


def _short(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no kwargs"


def check_model(cfg: RunConfig) -> Path | str:
    """Resolve ``model.name`` now (building a built-in model into its cache); its location.

    Also checks that ``rollout.max_new_tokens`` plus a prompt fits the model's context.
    """
    name = cfg.model.name
    try:
        source = resolve_model(name, cache_dir=cfg.model.cache_dir)
    except ModelNotAvailableError as exc:
        raise ConfigError(str(exc)) from exc
    except ImportError as exc:  # a built-in model whose build needs an extra
        raise ConfigError(f"model.name={name!r} cannot be built here: {exc}") from exc
    context = max_context(source)
    room = cfg.rollout.max_new_tokens + MIN_PROMPT_TOKENS
    if context is not None and room > context:
        raise ConfigError(
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt "
            f"in the {context}-token context of model.name={name!r}; set "
            f"rollout.max_new_tokens <= {context - MIN_PROMPT_TOKENS}"
        )
    if cfg.model.lora.r > 0:
        check_lora_targets(source, cfg.model.lora.target_modules, name)
    return source


def check_lora_targets(source: Path | str, targets: tuple[str, ...], name: str) -> None:
    """Each ``model.lora.target_modules`` entry names linear layers of the model.

    A name matches a layer whose dotted name ends with it (peft's rule); the layers are read from
    a weightless copy of the model built from its config.
    """
    if tuple(targets) == ("all-linear",):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in linear)]
    if missing:
        layers = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(
            f"model.lora.target_modules {missing} name no linear layer of model.name={name!r}; "
            f"choose among {layers} (or [all-linear])"
        )


def max_context(source: Path | str) -> int | None:
    """The model's longest context (``max_position_embeddings``), ``None`` when it names none."""
    if isinstance(source, Path):
        config_file = source / "config.json"
        if not config_file.is_file():
            return None
        value = json.loads(config_file.read_text()).get("max_position_embeddings")
    else:
        from transformers import AutoConfig

        value = getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


@contextlib.contextmanager
def cli_errors(tree: Mapping[str, Any]) -> Iterator[None]:
    """Print a :class:`ConfigError` raised inside as one message and exit with status 2.

    ``debug=true`` in the config tree, or ``HYDRA_FULL_ERROR=1``, lets the error (and its
    traceback) through instead.
    """
    try:
        check_cli(tree)
        yield
    except ConfigError as exc:
        if tree.get("debug", False) is True or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"configuration error: {exc}", file=sys.stderr)
        print("(debug=true or HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def check_renamed(
    overrides: Sequence[str], renamed: Mapping[str, tuple[str, str]] = RENAMED_KEYS
) -> None:
    """No command-line override (``key=v``, ``+key=v``, ``++key=v``, ``~key``) names a renamed key.

    The CLIs call it on ``sys.argv`` before Hydra composes the config, whose own error for a key
    that left the YAML would not name the new key. ``renamed``: old key -> (new key, meaning).

    Raises:
        ConfigError: naming the old key, the new one and the override to type instead.
    """
    for arg in overrides:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue  # a Hydra flag (--cfg job, -m) or a flag's value
        key, _, value = arg.partition("=")
        key = key.lstrip("~+").split("@", 1)[0]
        if key in renamed:
            new, meaning = renamed[key]
            raise ConfigError(
                f"{key} was renamed {new} ({meaning}); use {new}={value or '<value>'}"
            )


def check_cli(tree: Mapping[str, Any]) -> None:
    """What Hydra lets through: a non-boolean ``debug``, a missing ``optional`` group choice.

    Raises:
        ConfigError: naming the key and the fix.
    """
    debug = tree.get("debug", False)
    if not isinstance(debug, bool):
        raise ConfigError(f"debug={debug!r} must be true or false")
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not GlobalHydra.instance().is_initialized():
        return
    choices = HydraConfig.get().runtime.choices
    loader = GlobalHydra.instance().config_loader()
    for group in OPTIONAL_GROUPS:
        name = choices.get(group)
        available = loader.get_group_options(group)  # every search path's options
        if name is not None and name not in available:
            raise ConfigError(
                f"{group}={name!r} is unknown; choose {group}=<one of {available}> or leave it out"
            )
