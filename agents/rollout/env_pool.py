"""Pools of text environments stepped in batches: in this process or in Ray actors.

Both pools have the interface of :class:`EnvPool`: envs are addressed by a global index
``0 .. num_envs-1``; ``reset`` and ``step`` take a list of indices and return one result per index,
in the order given. :class:`SerialEnvPool` steps the envs one after another in this process (tests,
debugging with pdb); :class:`RayEnvPool` spreads them over Ray actors, each holding
``envs_per_actor`` envs, and steps the actors in parallel.

A Ray actor that dies (its process killed, its node lost) or does not answer a call within
``step_timeout_s`` (a stopped process, an env that never returns) is killed and replaced by a new
one that rebuilds its envs. The episodes it held end at once: their ``step`` returns a truncated
:class:`StepResult` whose info carries ``worker_failed=True``, and those envs must be reset before
they are stepped again. The rollout goes on with the other envs. A ``reset`` is retried on a fresh
actor, at most ``max_attempts`` actors in all, then raises :class:`EnvWorkerError`.

Only this module imports Ray (lazily, so that the serial pool never loads it).
"""

from __future__ import annotations

import abc
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import gymnasium as gym

import envs
from envs.base import InfoKeys
from envs.prefix import ExpertPrefix

WORKER_FAILED: Final = "worker_failed"
"""Info key set to ``True`` on the step result of an episode lost with its Ray actor (the
protocols read it as ``protocols.registry.CUT_INFO_KEY``)."""

DEFAULT_STEP_TIMEOUT_S: Final = 600.0
"""Default longest wait for one actor's answer to a ``reset``/``step`` call (generous: an
ALFWorld step takes milliseconds, a math verification at most its own timeout)."""
DEFAULT_START_TIMEOUT_S: Final = 600.0
"""Default extra wait for a new actor's first answer (process start, imports, env construction)."""

_FAILED_ANCHOR: Final = "<worker failed>"
_WORKER_ENV_VARS: Final = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

log = logging.getLogger(__name__)


class EnvWorkerError(RuntimeError):
    """Env actors kept failing: every attempt, each on a fresh actor, died or timed out."""


ResetResult = tuple[str, dict[str, Any]]
"""``(observation, info)`` of one env after ``reset``."""

ResetOptions = Mapping[str, Any] | None
"""Reset options of one env (``{"expert_remaining": k}`` starts ``k`` expert actions from the goal,
see :mod:`envs.prefix`; ``None``: the ordinary game)."""


@dataclass(frozen=True)
class EnvFactory:
    """Builds one env of the registry; picklable, so that Ray actors build their own envs."""

    name: str
    """Registered env name (see :func:`envs.registered`)."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments of :func:`envs.make`."""

    def __call__(self) -> gym.Env:
        """A new env."""
        return envs.make(self.name, **dict(self.kwargs))


@dataclass(frozen=True)
class StepResult:
    """What one env returned for one action."""

    obs: str
    """Next observation."""
    reward: float
    """Reward of the step."""
    terminated: bool
    """The env reached a terminal state."""
    truncated: bool
    """The episode was cut (by the env, or because its worker failed)."""
    info: Mapping[str, Any]
    """The env's info (schema of ``envs/base.py``; ``worker_failed`` when its worker died)."""


class EnvBlock:
    """A few envs owned by one process: the body of a Ray actor, or all envs of a serial pool."""

    def __init__(self, factory: Callable[[], gym.Env], count: int) -> None:
        # ExpertPrefix is transparent unless a reset asks for an expert prefix
        self.envs = [ExpertPrefix(factory()) for _ in range(count)]

    def reset(
        self,
        local: Sequence[int],
        seeds: Sequence[int | None],
        options: Sequence[ResetOptions] | None = None,
    ) -> list[ResetResult]:
        """Reset the envs ``local`` with ``seeds`` (and per-env reset ``options``)."""
        out = []
        opts = options if options is not None else [None] * len(local)
        for i, seed, opt in zip(local, seeds, opts, strict=True):
            obs, info = self.envs[i].reset(seed=seed, options=dict(opt) if opt else None)
            out.append((obs, dict(info)))
        return out

    def step(self, local: Sequence[int], actions: Sequence[str]) -> list[StepResult]:
        """Step the envs ``local`` with ``actions``."""
        out = []
        for i, action in zip(local, actions, strict=True):
            obs, reward, terminated, truncated, info = self.envs[i].step(action)
            out.append(StepResult(obs, float(reward), bool(terminated), bool(truncated), info))
        return out

    def pid(self) -> int:
        """Id of the process holding these envs."""
        return os.getpid()

    def close(self) -> None:
        """Close every env."""
        for env in self.envs:
            env.close()


class EnvPool(abc.ABC):
    """A fixed set of ``num_envs`` text envs addressed by index, reset and stepped in batches."""

    num_envs: int
    """Number of envs in the pool."""

    @abc.abstractmethod
    def reset(
        self,
        env_indices: Sequence[int],
        seeds: Sequence[int | None],
        options: Sequence[ResetOptions] | None = None,
    ) -> list[ResetResult]:
        """Reset the given envs, each with its seed and options; one ``(obs, info)`` per index."""

    @abc.abstractmethod
    def step(self, env_indices: Sequence[int], actions: Sequence[str]) -> list[StepResult]:
        """Step the given envs, each with its action; one :class:`StepResult` per index."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the envs (and the worker processes)."""

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, env_indices: Sequence[int], values: Sequence[Any], what: str) -> None:
        """Raise on a length mismatch, an index out of range or an index given twice."""
        if len(env_indices) != len(values):
            raise ValueError(f"got {len(env_indices)} env indices but {len(values)} {what}")
        bad = [i for i in env_indices if not 0 <= i < self.num_envs]
        if bad:
            raise IndexError(f"env indices {bad} out of range for a pool of {self.num_envs} envs")
        if len(set(env_indices)) != len(env_indices):
            raise ValueError(f"env indices repeat in one call: {list(env_indices)}")


class SerialEnvPool(EnvPool):
    """All envs in this process, stepped one after another (tests, debugging, pdb)."""

    def __init__(self, factory: Callable[[], gym.Env], num_envs: int) -> None:
        """Build ``num_envs`` envs.

        Args:
            factory: Builds one env (an :class:`EnvFactory` or any zero-argument callable).
            num_envs: Number of envs.
        """
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self._block = EnvBlock(factory, num_envs)

    def reset(
        self,
        env_indices: Sequence[int],
        seeds: Sequence[int | None],
        options: Sequence[ResetOptions] | None = None,
    ) -> list[ResetResult]:
        """Reset the given envs, each with its seed and options; one ``(obs, info)`` per index."""
        self._check(env_indices, seeds, "seeds")
        if options is not None:
            self._check(env_indices, options, "reset options")
        return self._block.reset(env_indices, seeds, options)

    def step(self, env_indices: Sequence[int], actions: Sequence[str]) -> list[StepResult]:
        """Step the given envs, each with its action; one :class:`StepResult` per index."""
        self._check(env_indices, actions, "actions")
        return self._block.step(env_indices, actions)

    def close(self) -> None:
        """Close every env."""
        self._block.close()


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, temp_dir: str | None = None
) -> None:
    """Start a quiet local Ray session, or join the cluster at ``address`` (``"auto"`` works).

    Args:
        address: Cluster address; ``None`` starts a local session.
        num_cpus: CPUs of a local session (default: all of the machine's).
        temp_dir: Ray's session directory for a local session (default: a new short dir in /tmp;
            Ray's socket paths must stay under ~100 characters).
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {
        "address": address,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "include_dashboard": False,
    }
    if address is None:
        kwargs["num_cpus"] = num_cpus
        kwargs["_temp_dir"] = temp_dir or tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(**kwargs)


class RayEnvPool(EnvPool):
    """Envs spread over Ray actors (``envs_per_actor`` each), stepped in parallel across actors."""

    def __init__(
        self,
        factory: Callable[[], gym.Env],
        num_envs: int,
        *,
        envs_per_actor: int = 4,
        num_cpus_per_actor: float | None = None,
        address: str | None = None,
        spread: bool = True,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        max_attempts: int = 3,
    ) -> None:
        """Start the actors and build their envs (joins or starts Ray when it is not running).

        Args:
            factory: Builds one env inside an actor; must pickle (an :class:`EnvFactory` does).
            num_envs: Number of envs.
            envs_per_actor: Envs held by each actor (a few per actor beats one per actor on a
                small machine: fewer processes, fewer round trips).
            num_cpus_per_actor: Ray CPU reservation of each actor; default: the CPUs free now
                shared evenly (at most 1). Reservations above the free CPUs leave actors pending.
            address: Ray cluster to join when Ray is not yet initialised (``None``: local;
                ``"auto"``: the cluster this machine belongs to).
            spread: place the actors across the cluster's nodes (Ray's ``SPREAD`` strategy)
                rather than packing them onto the first nodes with free CPUs.
            step_timeout_s: Longest wait for an actor's answer to one ``reset``/``step`` call;
                past it the actor is killed and replaced (its episodes are cut).
            start_timeout_s: Extra wait for the first answer of a new actor (it builds its envs).
            max_attempts: Actors tried for one ``reset`` (the first and fresh replacements)
                before :class:`EnvWorkerError`.

        Raises:
            EnvWorkerError: the actors did not start within ``start_timeout_s``.
        """
        import ray

        if num_envs < 1 or envs_per_actor < 1:
            raise ValueError(
                f"need num_envs >= 1 and envs_per_actor >= 1, got {num_envs}, {envs_per_actor}"
            )
        if not (step_timeout_s > 0 and start_timeout_s > 0) or max_attempts < 1:
            raise ValueError(
                f"need step_timeout_s > 0, start_timeout_s > 0 and max_attempts >= 1, got "
                f"{step_timeout_s}, {start_timeout_s}, {max_attempts}"
            )
        if not ray.is_initialized():
            init_ray(address)
        self.num_envs = num_envs
        self.envs_per_actor = envs_per_actor
        self.restarts = 0
        """Actors replaced after a failure since the pool was built."""
        self.timeouts = 0
        """Calls that ran past ``step_timeout_s`` since the pool was built."""
        self.step_timeout_s = float(step_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.max_attempts = max_attempts
        self._factory = factory
        self._sizes = [
            min(envs_per_actor, num_envs - s) for s in range(0, num_envs, envs_per_actor)
        ]
        cpus = num_cpus_per_actor
        if cpus is None:
            cpus = _fair_share(ray.available_resources().get("CPU", 0.0), len(self._sizes))
        self._actor_cls: Any = ray.remote(EnvBlock).options(
            num_cpus=cpus,
            runtime_env={"env_vars": dict(_WORKER_ENV_VARS)},
            scheduling_strategy="SPREAD" if spread else "DEFAULT",
        )
        self._actors: list[Any] = [self._actor_cls.remote(factory, n) for n in self._sizes]
        self._lost: set[int] = set()
        self._subtask: dict[int, Any] = {}
        self._fresh: set[int] = set()  # actors that have not answered yet (still starting)
        try:  # surfaces env construction errors now
            ray.get([a.pid.remote() for a in self._actors], timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            self.close()
            raise EnvWorkerError(
                f"the {len(self._actors)} env actors did not start within {start_timeout_s:g} s "
                "(not enough free CPUs for their reservations, or the env hangs in __init__)"
            ) from exc

    @property
    def actors(self) -> list[Any]:
        """The actor handles, actor ``k`` holding envs ``k*envs_per_actor ..``."""
        return list(self._actors)

    def reset(
        self,
        env_indices: Sequence[int],
        seeds: Sequence[int | None],
        options: Sequence[ResetOptions] | None = None,
    ) -> list[ResetResult]:
        """Reset the given envs; a dead or stuck actor is replaced and the reset retried.

        Raises:
            EnvWorkerError: ``max_attempts`` actors in a row failed one actor's share of the call.
        """
        self._check(env_indices, seeds, "seeds")
        if options is not None:
            self._check(env_indices, options, "reset options")
        opts = [dict(o) if o else None for o in options or [None] * len(env_indices)]
        calls = self._by_actor(env_indices, list(zip(seeds, opts, strict=True)))

        def remote(k: int, loc: list[int], val: list[Any]) -> Any:
            return self._actors[k].reset.remote(loc, [s for s, _ in val], [o for _, o in val])

        refs = {k: remote(k, loc, val) for k, (_, loc, val) in calls.items()}
        deadline = time.monotonic() + self.step_timeout_s
        out: dict[int, ResetResult] = {}
        for k, (glob, loc, val) in calls.items():
            ref = refs[k]
            for attempt in range(1, self.max_attempts + 1):
                try:
                    results = self._get(k, ref, deadline)
                    break
                except _ActorLost as lost:
                    self._replace(k)
                    if attempt == self.max_attempts:
                        raise EnvWorkerError(
                            f"resetting envs {glob} failed on {attempt} env actors in a row "
                            f"(last: {lost.reason}); check the env (does reset hang or crash "
                            "its process?) or raise rollout.step_timeout_s"
                        ) from lost.__cause__
                    log.warning("env actor %d %s during reset; retrying on a new one", k, lost)
                    ref = remote(k, loc, val)
                    deadline = time.monotonic() + self.step_timeout_s
            out.update(zip(glob, results, strict=True))
        for i, (_, info) in out.items():
            self._lost.discard(i)
            self._subtask[i] = info[InfoKeys.SUBTASK]
        return [out[i] for i in env_indices]

    def step(self, env_indices: Sequence[int], actions: Sequence[str]) -> list[StepResult]:
        """Step the given envs in parallel across actors; lost episodes come back truncated.

        An actor that dies or does not answer within ``step_timeout_s`` is killed and replaced;
        its envs' results are the truncated ``worker_failed`` ones.
        """
        self._check(env_indices, actions, "actions")
        out = {i: self._failed(i) for i in env_indices if i in self._lost}
        live = [(i, a) for i, a in zip(env_indices, actions, strict=True) if i not in self._lost]
        calls = self._by_actor([i for i, _ in live], [a for _, a in live])
        refs = {k: self._actors[k].step.remote(loc, val) for k, (_, loc, val) in calls.items()}
        deadline = time.monotonic() + self.step_timeout_s  # one deadline: the calls run at once
        for k, (glob, _, _) in calls.items():
            try:
                out.update(zip(glob, self._get(k, refs[k], deadline), strict=True))
            except _ActorLost as lost:
                log.warning("env actor %d %s; replacing it", k, lost)
                self._replace(k)
                out.update((i, self._failed(i)) for i in glob)
        return [out[i] for i in env_indices]

    def close(self) -> None:
        """Kill the actors (the Ray session stays up for other users)."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

    def _by_actor(
        self, env_indices: Sequence[int], values: Sequence[Any]
    ) -> dict[int, tuple[list[int], list[int], list[Any]]]:
        """Split a call by actor: actor -> (global indices, local indices, values)."""
        calls: dict[int, tuple[list[int], list[int], list[Any]]] = {}
        for i, v in zip(env_indices, values, strict=True):
            k, j = divmod(i, self.envs_per_actor)
            glob, loc, val = calls.setdefault(k, ([], [], []))
            glob.append(i)
            loc.append(j)
            val.append(v)
        return calls

    def _replace(self, k: int) -> None:
        """Swap actor ``k`` for a new one; its envs lose their episodes until reset."""
        import ray

        ray.kill(self._actors[k], no_restart=True)  # a stopped process is SIGKILLed by Ray
        self._actors[k] = self._actor_cls.remote(self._factory, self._sizes[k])
        self._fresh.add(k)
        start = k * self.envs_per_actor
        self._lost.update(range(start, start + self._sizes[k]))
        self.restarts += 1

    def _get(self, k: int, ref: Any, deadline: float) -> Any:
        """Actor ``k``'s answer by ``deadline`` (later for a new actor, which builds its envs).

        Raises:
            _ActorLost: the actor died, or ran past the deadline.
        """
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if k in self._fresh:
            deadline += self.start_timeout_s
        try:
            result = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
        except GetTimeoutError as exc:
            self.timeouts += 1
            raise _ActorLost(f"did not answer within {self.step_timeout_s:g} s") from exc
        except RayActorError as exc:
            raise _ActorLost(f"died ({type(exc).__name__})") from exc
        self._fresh.discard(k)
        return result

    def _failed(self, i: int) -> StepResult:
        """The truncated result of an episode lost with its actor (info schema kept)."""
        info = {
            InfoKeys.ADMISSIBLE_ACTIONS: [],
            InfoKeys.ANCHOR: _FAILED_ANCHOR,
            InfoKeys.WON: False,
            InfoKeys.SUBTASK: self._subtask.get(i, ""),
            InfoKeys.ACTION_VALID: False,
            WORKER_FAILED: True,
        }
        return StepResult("", 0.0, False, True, info)


class _ActorLost(Exception):
    """An actor died or timed out on one call (internal: the pool replaces it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _fair_share(free_cpus: float, num_actors: int) -> float:
    """Per-actor CPUs that fit in ``free_cpus`` (rounded down to Ray's 1e-4 resolution), <= 1."""
    return min(1.0, math.floor(free_cpus / num_actors * 1e4) / 1e4)
