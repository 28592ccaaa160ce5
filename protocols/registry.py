"""Advantage protocols by name, called uniformly by the learner.

A protocol is a callable ``(samples: StepSamples, cfg: ProtocolConfig) -> np.ndarray [N]``: one
advantage per step sample. Built-ins: ``"grpo"``, ``"dr_grpo"`` and ``"gigpo"``. The learner calls
``compute_advantages(samples, cfg)`` and never branches on the protocol's name.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from protocols.gigpo import (
    GAMMA,
    INVALID_PENALTY,
    MODE,
    MODES,
    STEP_WEIGHT,
    Mode,
    anchor_groups,
    check_similarity_threshold,
    episode_scores,
    gigpo_advantages,
)
from protocols.grpo import EPS, grpo_advantages

ZERO_TOLERANCE = 1e-8
"""``|A| <= ZERO_TOLERANCE`` counts as a zero advantage in ``adv/zero_frac``."""

CUT_INFO_KEY: Final = "worker_failed"
"""Step info key marking a step whose episode was cut by its env worker (the env pool sets it)."""


@dataclass(frozen=True)
class StepSamples:
    """Flat arrays with one entry per step sample (the steps of a trajectory in time order)."""

    rewards: np.ndarray
    """[N] float env reward of each step."""
    anchors: tuple[Hashable, ...]
    """[N] anchor state of each step (GiGPO step grouping key)."""
    group_ids: np.ndarray
    """[N] int task-group id (the rollouts of one game/problem share it)."""
    traj_ids: np.ndarray
    """[N] int trajectory id, unique across groups."""
    invalid: np.ndarray
    """[N] bool, True where the step's action was invalid (penalised)."""
    cut: np.ndarray | None = None
    """[N] bool, True on every step of a trajectory that its env worker cut (its outcome is not
    the policy's); ``None``: no cut. Their whole task group is left out (:attr:`trainable`)."""
    steps: tuple[Any, ...] = ()
    """[N] the step objects themselves (:meth:`from_trajectories`), in sample order: what the
    learner's batch is collated from, so its rows and the advantages come from one flattening;
    empty when the samples were built from arrays."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rewards", np.asarray(self.rewards, dtype=np.float64))
        object.__setattr__(self, "anchors", tuple(self.anchors))
        object.__setattr__(self, "group_ids", np.asarray(self.group_ids, dtype=np.int64))
        object.__setattr__(self, "traj_ids", np.asarray(self.traj_ids, dtype=np.int64))
        object.__setattr__(self, "invalid", np.asarray(self.invalid, dtype=bool))
        n = len(self.anchors)
        cut = np.zeros(n, dtype=bool) if self.cut is None else np.asarray(self.cut, dtype=bool)
        object.__setattr__(self, "cut", cut)
        object.__setattr__(self, "steps", tuple(self.steps))
        if self.steps and len(self.steps) != n:
            raise ValueError(f"StepSamples.steps has {len(self.steps)} entries; expected {n}")
        shapes = {
            k: getattr(self, k).shape
            for k in ("rewards", "group_ids", "traj_ids", "invalid", "cut")
        }
        if any(s != (n,) for s in shapes.values()):
            raise ValueError(
                f"StepSamples fields must be 1-D of length {n} (anchors); got {shapes}"
            )

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def trainable(self) -> np.ndarray:
        """[N] bool, False on every sample of a task group that holds a cut trajectory.

        Those samples get advantage 0 from :func:`compute_advantages` and must not reach the
        gradient (the trainer masks their rows out of the loss).
        """
        assert self.cut is not None  # set by __post_init__
        if not self.cut.any():
            return np.ones(len(self), dtype=bool)
        return ~np.isin(self.group_ids, self.group_ids[self.cut])

    def subset(self, keep: np.ndarray) -> StepSamples:
        """The samples where ``keep`` ([N] bool) is True, in order."""
        assert self.cut is not None
        return StepSamples(
            rewards=self.rewards[keep],
            anchors=tuple(a for a, k in zip(self.anchors, keep.tolist(), strict=True) if k),
            group_ids=self.group_ids[keep],
            traj_ids=self.traj_ids[keep],
            invalid=self.invalid[keep],
            cut=self.cut[keep],
            steps=tuple(s for s, k in zip(self.steps, keep.tolist(), strict=False) if k),
        )

    @classmethod
    def from_trajectories(cls, trajectories: Iterable[Any]) -> StepSamples:
        """Flatten trajectories (``agents.types.Trajectory`` or alike), steps in time order.

        This is the one flattening of a rollout: the step objects are kept in :attr:`steps`, in
        the order of the arrays. Each trajectory needs ``traj_id``, ``group_id`` and ``steps``;
        each step ``reward``, ``anchor`` and ``action_valid``, and may have an ``info`` mapping: a
        trajectory with a step whose info sets :data:`CUT_INFO_KEY` is marked ``cut`` on all of
        its steps.
        """
        trajectories = list(trajectories)
        rows = [(t.group_id, t.traj_id, s) for t in trajectories for s in t.steps]
        cut_trajs = {t.traj_id for t in trajectories if any(_is_cut(s) for s in t.steps)}
        return cls(
            rewards=np.array([s.reward for _, _, s in rows], dtype=np.float64),
            anchors=tuple(s.anchor for _, _, s in rows),
            group_ids=np.array([g for g, _, _ in rows], dtype=np.int64),
            traj_ids=np.array([t for _, t, _ in rows], dtype=np.int64),
            invalid=np.array([not s.action_valid for _, _, s in rows], dtype=bool),
            cut=np.array([t in cut_trajs for _, t, _ in rows], dtype=bool),
            steps=tuple(s for _, _, s in rows),
        )


def _is_cut(step: Any) -> bool:
    info = getattr(step, "info", None) or {}
    return bool(info.get(CUT_INFO_KEY, False))


@dataclass(frozen=True)
class ProtocolConfig:
    """Which protocol computes advantages, and its settings."""

    name: str = "gigpo"
    """Registered protocol name: ``"grpo"``, ``"dr_grpo"``, ``"gigpo"`` or a plugin's."""
    gamma: float = GAMMA
    """GiGPO discount of the step return (Eq. 5); unused by the GRPO family."""
    step_weight: float = STEP_WEIGHT
    """GiGPO ``ω``, weight of the step advantage (Eq. 8)."""
    mode: Mode = MODE
    """GiGPO normalisation: ``"mean_norm"`` or ``"mean_std_norm"``."""
    invalid_penalty: float = INVALID_PENALTY
    """Subtracted from the score (and GiGPO step return) of each invalid step; 0 disables it."""
    normalize_std: bool | None = None
    """GRPO family: divide by the group std; None takes the protocol's own (grpo True, dr_grpo
    False). Setting it against the protocol (dr_grpo with True) is an error."""
    eps: float = EPS
    """Added to every std before dividing."""
    similarity_threshold: float | None = None
    """GiGPO step groups: None groups equal anchors; τ in (0, 1) groups similar text anchors
    (verl-agent's ``enable_similarity=True`` with ``similarity_thresh=τ``, e.g. 0.95)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"protocol mode {self.mode!r} is unknown; choose one of {list(MODES)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"protocol gamma must be in [0, 1], got {self.gamma}")
        if self.eps <= 0:
            raise ValueError(f"protocol eps must be positive, got {self.eps}")
        check_similarity_threshold(self.similarity_threshold)
        if not np.isfinite(self.invalid_penalty) or self.invalid_penalty < 0:
            raise ValueError(
                f"invalid_penalty must be >= 0 (0 disables it), got {self.invalid_penalty}"
            )
        if self.name == "dr_grpo" and self.normalize_std:
            raise ValueError(
                "dr_grpo never divides by the std; use name='grpo' for std normalisation "
                "or leave normalize_std unset"
            )


Protocol = Callable[[StepSamples, ProtocolConfig], np.ndarray]
"""``(samples, cfg) -> [N]`` advantages, one per step sample."""
ProtocolMetrics = Callable[[StepSamples, ProtocolConfig], dict[str, float]]
"""``(samples, cfg) -> {"adv/...": value}``: a protocol's own diagnostics."""


@dataclass(frozen=True)
class ProtocolSpec:
    """One registered protocol."""

    name: str
    """Name given to :func:`get`."""
    fn: Protocol
    """The advantage function."""
    metrics: ProtocolMetrics | None
    """Extra ``adv/…`` diagnostics of this protocol, or None."""
    min_group_size: int = 1
    """Fewest rollouts per task group it needs (2 for a group-relative protocol: with one, every
    advantage is 0 or uncentred); the run config checks ``rollout.group_size`` against it."""


_REGISTRY: dict[str, ProtocolSpec] = {}


def register(
    name: str, *, metrics: ProtocolMetrics | None = None, min_group_size: int = 1
) -> Callable[[Protocol], Protocol]:
    """Decorator registering a protocol under ``name``; a name registered twice raises.

    ``min_group_size``: fewest rollouts per group the protocol needs (2 when group-relative).
    """

    def decorate(fn: Protocol) -> Protocol:
        if name in _REGISTRY:
            raise ValueError(f"protocol {name!r} is already registered; choose another name")
        _REGISTRY[name] = ProtocolSpec(name, fn, metrics, min_group_size)
        return fn

    return decorate


def min_group_size(name: str) -> int:
    """The fewest rollouts per task group the protocol ``name`` needs (``KeyError`` if unknown)."""
    return _spec(name).min_group_size


def get(name: str) -> Protocol:
    """The protocol registered as ``name``; unknown names raise ``KeyError`` naming the valid."""
    return _spec(name).fn


def available() -> list[str]:
    """Names of all registered protocols, sorted."""
    return sorted(_REGISTRY)


def compute_advantages(
    samples: StepSamples, cfg: ProtocolConfig
) -> tuple[np.ndarray, dict[str, float]]:
    """Advantages of ``samples`` under ``cfg.name`` and their ``adv/…`` metrics.

    A task group holding a trajectory cut by its env worker (``samples.cut``) is left out: the
    protocol runs on the other groups only, exactly as if the group had not been collected, and
    the left-out samples get advantage 0 (``samples.trainable`` is False there; the trainer drops
    them from the loss). See ``docs/protocols.md``.

    Metrics: ``adv/mean``, ``adv/std`` (population), ``adv/max``, ``adv/min``, ``adv/zero_frac``
    (fraction with ``|A| <= 1e-8``), all over the kept samples (0, 0, 0, 0, 1 when none is kept);
    ``adv/excluded_groups`` and ``adv/excluded_samples`` (left out for a cut); plus the protocol's
    own over the kept samples (GiGPO: ``adv/step_groups``, ``adv/step_group_size_mean``,
    ``adv/step_group_singleton_frac``).

    Raises:
        KeyError: unknown protocol name.
        ValueError: no samples, or the protocol returned the wrong shape.
    """
    spec = _spec(cfg.name)
    if len(samples) == 0:
        raise ValueError("compute_advantages got no step samples; collect at least one step")
    keep = samples.trainable  # [N]
    adv = np.zeros(len(samples), dtype=np.float64)  # [N]
    excluded = {
        "adv/excluded_groups": float(len(np.unique(samples.group_ids[~keep]))),
        "adv/excluded_samples": float((~keep).sum()),
    }
    if not keep.any():
        zeros = dict.fromkeys(("adv/mean", "adv/std", "adv/max", "adv/min"), 0.0)
        return adv, {**zeros, "adv/zero_frac": 1.0, **excluded}
    kept = samples if keep.all() else samples.subset(keep)
    kept_adv = np.asarray(spec.fn(kept, cfg), dtype=np.float64)  # [K]
    if kept_adv.shape != (len(kept),):
        raise ValueError(
            f"protocol {cfg.name!r} returned shape {kept_adv.shape}; expected ({len(kept)},)"
        )
    adv[keep] = kept_adv
    metrics = {
        "adv/mean": float(kept_adv.mean()),
        "adv/std": float(kept_adv.std()),
        "adv/max": float(kept_adv.max()),
        "adv/min": float(kept_adv.min()),
        "adv/zero_frac": float(np.mean(np.abs(kept_adv) <= ZERO_TOLERANCE)),
        **excluded,
    }
    if spec.metrics is not None:
        metrics |= spec.metrics(kept, cfg)
    return adv, metrics


def _spec(name: str) -> ProtocolSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown protocol {name!r}; registered: {available()}")
    return _REGISTRY[name]


def _outcome_scores(samples: StepSamples, cfg: ProtocolConfig) -> np.ndarray:
    """``[N]`` trajectory outcome (sum of step rewards) minus the sample's own invalid penalty."""
    return episode_scores(samples.rewards, samples.traj_ids) - cfg.invalid_penalty * samples.invalid


@register("grpo", min_group_size=2)
def _grpo(samples: StepSamples, cfg: ProtocolConfig) -> np.ndarray:
    """GRPO over the outcome scores, statistics over the step samples of each group."""
    normalize_std = True if cfg.normalize_std is None else cfg.normalize_std
    scores = _outcome_scores(samples, cfg)
    return grpo_advantages(scores, samples.group_ids, normalize_std=normalize_std, eps=cfg.eps)


@register("dr_grpo", min_group_size=2)
def _dr_grpo(samples: StepSamples, cfg: ProtocolConfig) -> np.ndarray:
    """Dr.GRPO: GRPO without the division by the std."""
    scores = _outcome_scores(samples, cfg)
    return grpo_advantages(scores, samples.group_ids, normalize_std=False, eps=cfg.eps)


def _gigpo_metrics(samples: StepSamples, cfg: ProtocolConfig) -> dict[str, float]:
    _, sizes = anchor_groups(samples.anchors, samples.group_ids, cfg.similarity_threshold)  # [M]
    return {
        "adv/step_groups": float(sizes.shape[0]),
        "adv/step_group_size_mean": float(sizes.mean()),
        "adv/step_group_singleton_frac": float(np.mean(sizes == 1)),
    }


@register("gigpo", metrics=_gigpo_metrics, min_group_size=2)
def _gigpo(samples: StepSamples, cfg: ProtocolConfig) -> np.ndarray:
    """GiGPO with the config's gamma, step weight, mode and invalid penalty."""
    return gigpo_advantages(
        samples.rewards,
        samples.anchors,
        samples.group_ids,
        samples.traj_ids,
        gamma=cfg.gamma,
        step_weight=cfg.step_weight,
        mode=cfg.mode,
        invalid=samples.invalid,
        invalid_penalty=cfg.invalid_penalty,
        eps=cfg.eps,
        similarity_threshold=cfg.similarity_threshold,
    )
