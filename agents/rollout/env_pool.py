"""Pools of text environments stepped in batches: in this process or in Ray actors.

Both pools have the interface of :class:`EnvPool`: envs are addressed by a global index
``0 .. num_envs-1``; ``reset`` and ``step`` take a list of indices and return one result per index,
in the order given. :class:`SerialEnvPool` steps the envs one after another in this process (tests,
debugging with pdb); :class:`RayEnvPool` spreads them over Ray actors, each holding
``envs_per_actor`` envs, and steps the actors in parallel.

A Ray actor that dies (its process killed, its node lost), stops sending heartbeats for
``heartbeat_timeout_s`` (a stopped or frozen process: each actor's own thread reports to a small
board actor every second) or does not answer a call within ``step_timeout_s`` (an env that never
returns) is killed and replaced by a new one that rebuilds its envs. While a call waits, a line is
logged every ``progress_every_s``. The episodes the actor held end at once: their ``step``
returns a truncated :class:`StepResult` whose info carries ``worker_failed=True``, and those envs
must be reset before they are stepped again. The rollout goes on with the other envs. A
``reset`` is retried on a fresh actor (after a short pause that doubles), at most
``max_attempts`` actors in all; envs whose reset still fails come back failed
(``worker_failed``: their episodes are cut like a step's) while the others play, and only a
reset that fails for every env of the call raises :class:`EnvWorkerError`.

Only this module imports Ray (lazily, so that the serial pool never loads it).
"""

from __future__ import annotations

import abc
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import gymnasium as gym

import envs
from envs.base import InfoKeys
from envs.prefix import ExpertPrefix
from protocols.registry import CUT_INFO_KEY

WORKER_FAILED: Final = CUT_INFO_KEY
"""Info key set to ``True`` on the step result of an episode lost with its Ray actor: the key the
protocols read to cut its group (one spelling, ``protocols.registry``)."""

DEFAULT_STEP_TIMEOUT_S: Final = 600.0
"""Default longest wait for one actor's answer to a ``reset``/``step`` call (generous: an
ALFWorld step takes milliseconds, a math verification at most its own timeout)."""
DEFAULT_START_TIMEOUT_S: Final = 600.0
"""Default extra wait for a new actor's first answer (process start, imports, env construction)."""
DEFAULT_HEARTBEAT_TIMEOUT_S: Final = 30.0
"""Default silence after which an actor whose heartbeats stopped is taken for stopped (its own
thread beats every :data:`HEARTBEAT_EVERY_S` whatever its envs do, unless the process is frozen)."""
HEARTBEAT_EVERY_S: Final = 1.0
"""Seconds between an actor's heartbeats."""
DEFAULT_PROGRESS_EVERY_S: Final = 30.0
"""Default seconds between the log lines of a call still waiting for actors."""
RESET_BACKOFF_S: Final = 1.0
"""Pause before the first retry of a failed reset (doubled for each next one): actors dying in a
burst (an OOM kill, a node restart) no longer use every attempt within a second."""
_POLL_S: Final = 1.0

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

    def __init__(
        self, factory: Callable[[], gym.Env], count: int, heartbeat: tuple[Any, str] | None = None
    ) -> None:
        """Build ``count`` envs.

        ``heartbeat=(board, token)`` first starts a daemon thread that reports ``token`` to the
        :class:`HeartbeatBoard` actor every :data:`HEARTBEAT_EVERY_S`.
        """
        if heartbeat is not None:
            threading.Thread(target=_beat, args=heartbeat, daemon=True, name="heartbeat").start()
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


def _beat(board: Any, token: str) -> None:
    """Report ``token`` to ``board`` forever (the thread stops with its process)."""
    while True:
        try:
            board.beat.remote(token)
        except Exception:  # the board is gone: the pool still has its step timeout
            log.debug("heartbeat %s not delivered", token, exc_info=True)
        time.sleep(HEARTBEAT_EVERY_S)


class HeartbeatBoard:
    """The last heartbeat of each env actor, on this (tiny, CPU-free) actor's own clock."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def beat(self, token: str) -> None:
        """Record a heartbeat of ``token`` now."""
        self._last[token] = time.monotonic()

    def ages(self, tokens: Sequence[str]) -> dict[str, float | None]:
        """Seconds since each token's last heartbeat (None: none yet)."""
        now = time.monotonic()
        return {t: (now - self._last[t]) if t in self._last else None for t in tokens}


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
        heartbeat_timeout_s: float | None = DEFAULT_HEARTBEAT_TIMEOUT_S,
        progress_every_s: float = DEFAULT_PROGRESS_EVERY_S,
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
            heartbeat_timeout_s: An actor whose heartbeats stop this long while a call waits on
                it (a stopped or frozen process) is killed and replaced like a timed-out one;
                ``None``: no heartbeats (only ``step_timeout_s``).
            progress_every_s: Seconds between the log lines of a call still waiting.
            max_attempts: Actors tried for one ``reset`` (the first and fresh replacements)
                before its envs come back failed (:class:`EnvWorkerError` when that is all of
                the call's envs).

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
        if heartbeat_timeout_s is not None and not heartbeat_timeout_s > HEARTBEAT_EVERY_S:
            raise ValueError(
                f"need heartbeat_timeout_s > {HEARTBEAT_EVERY_S:g} s (the heartbeat period) or "
                f"None, got {heartbeat_timeout_s}"
            )
        if not progress_every_s > 0:
            raise ValueError(f"need progress_every_s > 0, got {progress_every_s}")
        if not ray.is_initialized():
            init_ray(address)
        self.num_envs = num_envs
        self.envs_per_actor = envs_per_actor
        self.restarts = 0
        """Actors replaced after a failure since the pool was built."""
        self.timeouts = 0
        """Calls that ran past ``step_timeout_s`` since the pool was built."""
        self.stalls = 0
        """Actors replaced because their heartbeats stopped (``heartbeat_timeout_s``)."""
        self.step_timeout_s = float(step_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.progress_every_s = float(progress_every_s)
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
        self._board: Any = None
        if heartbeat_timeout_s is not None:
            self._board = ray.remote(HeartbeatBoard).options(num_cpus=0).remote()
        self._generation = [0] * len(self._sizes)
        self._actors: list[Any] = [self._start(k) for k in range(len(self._sizes))]
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

        After ``max_attempts`` actors in a row failed one actor's share of the call, those envs
        come back failed (``worker_failed`` in their info; stepping them returns the truncated
        result, so their episodes are cut) and the others play on.

        Raises:
            EnvWorkerError: every env of the call failed on ``max_attempts`` actors.
        """
        self._check(env_indices, seeds, "seeds")
        if options is not None:
            self._check(env_indices, options, "reset options")
        opts = [dict(o) if o else None for o in options or [None] * len(env_indices)]
        calls = self._by_actor(env_indices, list(zip(seeds, opts, strict=True)))

        def remote(k: int) -> Any:
            _, loc, val = calls[k]
            return self._actors[k].reset.remote(loc, [s for s, _ in val], [o for _, o in val])

        answers, lost = self._gather({k: remote(k) for k in calls}, "reset")
        given_up: dict[int, _ActorLost] = {}
        for k, first in lost.items():
            failure: _ActorLost | None = first
            for attempt in range(1, self.max_attempts):
                assert failure is not None
                self._replace(k)
                pause = RESET_BACKOFF_S * 2 ** (attempt - 1)
                log.warning(
                    "env actor %d %s during reset (attempt %d of %d, rollout.worker_attempts); "
                    "retrying on a new one in %g s",
                    k,
                    failure,
                    attempt,
                    self.max_attempts,
                    pause,
                )
                time.sleep(pause)
                retried, failed = self._gather({k: remote(k)}, "reset")
                failure = failed.get(k)
                if failure is None:
                    answers[k] = retried[k]
                    break
            if failure is not None:
                self._replace(k)
                given_up[k] = failure
        out: dict[int, ResetResult] = {}
        for k, (glob, _, _) in calls.items():
            if k in answers:
                out.update(zip(glob, answers[k], strict=True))
        for i, (_, info) in out.items():
            self._lost.discard(i)
            self._subtask[i] = info[InfoKeys.SUBTASK]
        if given_up:
            self._give_up(given_up, calls, everything=not out)
            out.update((i, ("", dict(self._failed(i).info))) for k in given_up for i in calls[k][0])
        return [out[i] for i in env_indices]

    def _give_up(
        self,
        given_up: Mapping[int, _ActorLost],
        calls: Mapping[int, tuple[list[int], list[int], list[Any]]],
        *,
        everything: bool,
    ) -> None:
        """Log (or raise, when no env of the call is left) that resets failed on every attempt."""
        envs_lost = sorted(i for k in given_up for i in calls[k][0])
        causes = "; ".join(f"actor {k} {lost}" for k, lost in given_up.items())
        timed_out = any(lost.timed_out for lost in given_up.values())
        hint = (
            "raise rollout.worker_attempts (fresh actors tried per reset)"
            + (
                ", or rollout.step_timeout_s / rollout.heartbeat_timeout_s if the env is just slow"
                if timed_out
                else ""
            )
            + "; check the env: does its reset hang or crash its process?"
        )
        message = (
            f"resetting envs {envs_lost} failed on {self.max_attempts} env actors in a row "
            f"(rollout.worker_attempts={self.max_attempts}; last: {causes})"
        )
        if everything:
            raise EnvWorkerError(f"{message}: no env of the call is left; {hint}") from next(
                iter(given_up.values())
            ).__cause__
        log.error("%s; their episodes are cut and the others go on (%s)", message, hint)

    def step(self, env_indices: Sequence[int], actions: Sequence[str]) -> list[StepResult]:
        """Step the given envs in parallel across actors; lost episodes come back truncated.

        An actor that dies, stops beating or does not answer within ``step_timeout_s`` is killed
        and replaced; its envs' results are the truncated ``worker_failed`` ones.
        """
        self._check(env_indices, actions, "actions")
        out = {i: self._failed(i) for i in env_indices if i in self._lost}
        live = [(i, a) for i, a in zip(env_indices, actions, strict=True) if i not in self._lost]
        calls = self._by_actor([i for i, _ in live], [a for _, a in live])
        refs = {k: self._actors[k].step.remote(loc, val) for k, (_, loc, val) in calls.items()}
        answers, lost = self._gather(refs, "step")
        for k, (glob, _, _) in calls.items():
            if k in lost:
                log.warning("env actor %d %s; replacing it", k, lost[k])
                self._replace(k)
                out.update((i, self._failed(i)) for i in glob)
            else:
                out.update(zip(glob, answers[k], strict=True))
        return [out[i] for i in env_indices]

    def close(self) -> None:
        """Kill the actors (the Ray session stays up for other users)."""
        import ray

        for actor in [*self._actors, *([self._board] if self._board is not None else [])]:
            ray.kill(actor, no_restart=True)
        self._actors = []
        self._board = None

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

    def _start(self, k: int) -> Any:
        """A new actor for slot ``k`` (its heartbeats under a token of its own)."""
        heartbeat = None if self._board is None else (self._board, self._token(k))
        return self._actor_cls.remote(self._factory, self._sizes[k], heartbeat)

    def _token(self, k: int) -> str:
        return f"{k}.{self._generation[k]}"

    def _replace(self, k: int) -> None:
        """Swap actor ``k`` for a new one; its envs lose their episodes until reset."""
        import ray

        ray.kill(self._actors[k], no_restart=True)  # a stopped process is SIGKILLed by Ray
        self._generation[k] += 1
        self._actors[k] = self._start(k)
        self._fresh.add(k)
        start = k * self.envs_per_actor
        self._lost.update(range(start, start + self._sizes[k]))
        self.restarts += 1

    def _gather(
        self, refs: Mapping[int, Any], what: str
    ) -> tuple[dict[int, Any], dict[int, _ActorLost]]:
        """Each actor's answer to one call, or why it is lost (died, stopped beating, too slow).

        The calls run at once and share one deadline, ``step_timeout_s`` from now (plus
        ``start_timeout_s`` for an actor that has not answered yet). While some still wait, the
        heartbeats are read every second and a line is logged every ``progress_every_s``.
        """
        import ray
        from ray.exceptions import RayActorError

        begin = time.monotonic()
        deadline = {
            k: begin + self.step_timeout_s + (self.start_timeout_s if k in self._fresh else 0.0)
            for k in refs
        }
        pending = dict(refs)
        answers: dict[int, Any] = {}
        lost: dict[int, _ActorLost] = {}
        report_at = begin + self.progress_every_s
        while pending:
            now = time.monotonic()
            wait_s = max(0.0, min(_POLL_S, min(deadline[k] for k in pending) - now))
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=wait_s)
            done = set(ready)
            for k in [k for k, ref in pending.items() if ref in done]:
                try:
                    answers[k] = ray.get(pending.pop(k))
                    self._fresh.discard(k)
                except RayActorError as exc:
                    lost[k] = _ActorLost(f"died ({type(exc).__name__})", cause=exc)
            now = time.monotonic()
            for k in [k for k in pending if now >= deadline[k]]:
                del pending[k]
                self.timeouts += 1
                lost[k] = _ActorLost(
                    f"did not answer within {self.step_timeout_s:g} s (rollout.step_timeout_s)",
                    timed_out=True,
                )
            for k, age in self._silent(pending).items():
                del pending[k]
                self.stalls += 1
                lost[k] = _ActorLost(
                    f"stopped: no heartbeat for {age:.0f} s (rollout.heartbeat_timeout_s="
                    f"{self.heartbeat_timeout_s:g})",
                    timed_out=True,
                )
            if pending and now >= report_at:
                report_at = now + self.progress_every_s
                log.warning(
                    "still waiting for env actors %s to answer a %s after %.0f s "
                    "(rollout.step_timeout_s=%g%s)",
                    sorted(pending),
                    what,
                    now - begin,
                    self.step_timeout_s,
                    "" if self._board is None else "; their heartbeats go on: busy, not stopped",
                )
        return answers, lost

    def _silent(self, pending: Mapping[int, Any]) -> dict[int, float]:
        """The pending actors whose heartbeats stopped longer than ``heartbeat_timeout_s`` ago.

        An actor with no heartbeat yet (still starting) is not judged; a board that does not
        answer judges none (the step timeout still applies).
        """
        if self._board is None or not pending or self.heartbeat_timeout_s is None:
            return {}
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        tokens = {k: self._token(k) for k in pending}
        try:
            ages = ray.get(self._board.ages.remote(list(tokens.values())), timeout=_POLL_S)
        except (GetTimeoutError, RayActorError):
            return {}
        limit = self.heartbeat_timeout_s
        return {k: a for k, t in tokens.items() if (a := ages.get(t)) is not None and a > limit}

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
    """An actor died, stopped or timed out on one call (internal: the pool replaces it)."""

    def __init__(
        self, reason: str, *, timed_out: bool = False, cause: BaseException | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out
        """It stopped beating or ran past ``step_timeout_s`` (rather than died)."""
        self.__cause__ = cause


def _fair_share(free_cpus: float, num_actors: int) -> float:
    """Per-actor CPUs that fit in ``free_cpus`` (rounded down to Ray's 1e-4 resolution), <= 1."""
    return min(1.0, math.floor(free_cpus / num_actors * 1e4) / 1e4)
