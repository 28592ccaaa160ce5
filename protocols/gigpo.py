"""GiGPO advantages (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training").

Semantics follow the reference implementation (verl-agent ``gigpo/core_gigpo.py`` with the
invalid-action penalty of its trainer), one entry per step sample:

1. Episode score (Eq. 3 input): each sample carries the total env reward of its trajectory, minus
   ``invalid_penalty`` if *that sample's own* action was invalid. The penalty is per sample, not a
   per-trajectory count: a trajectory with two invalid steps gives those two samples a score lower
   by ``invalid_penalty`` and leaves its other samples untouched.
2. Episode advantage ``A_E`` (Eq. 3): the scores are normalised within the task group over all step
   samples of the group (longer trajectories weigh more), unbiased std, ``eps = 1e-6``; a group with
   a single step sample has mean 0 and std 1 (its ``A_E`` is its own score).
3. Step return (Eq. 5): ``R_t = r_t + γ·R_{t+1}`` over the env rewards of the trajectory; then,
   after discounting, ``invalid_penalty`` is subtracted from the return of each invalid step (it
   does not propagate to earlier steps).
4. Anchor groups (Eq. 6): samples of the same task group whose anchor states are equal, or, with
   ``similarity_threshold = τ`` (verl-agent's ``enable_similarity`` with ``similarity_thresh``),
   similar: within each task group the samples are visited in order and each joins the first
   cluster whose representative (its first member's anchor) has
   ``difflib.SequenceMatcher(None, anchor, representative).ratio() >= τ``, else starts a new one.
5. Step advantage ``A_S`` (Eq. 7): returns normalised within each anchor group; a singleton anchor
   group has mean equal to its own return and std 1, so ``A_S = 0``.
6. ``A = A_E + ω·A_S`` (Eq. 8), ``ω = step_weight``.

``mode="mean_norm"`` only subtracts the mean at both levels; ``"mean_std_norm"`` also divides by
``std + eps``. Arithmetic is float64 (the reference uses float32).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from difflib import SequenceMatcher
from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike

from protocols.grpo import EPS, group_normalize
from protocols.returns import discounted_returns

Mode = Literal["mean_norm", "mean_std_norm"]
MODES: tuple[str, ...] = ("mean_norm", "mean_std_norm")
GAMMA: Final = 0.95
"""Discount of the step return (Eq. 5; verl-agent's ``gamma``)."""
STEP_WEIGHT: Final = 1.0
"""``ω``, the weight of the step advantage (Eq. 8; verl-agent's ``step_advantage_w``)."""
MODE: Final[Mode] = "mean_norm"
"""Normalisation at both levels (verl-agent's ``mode`` default)."""
INVALID_PENALTY: Final = 0.1
"""Subtracted from the score and step return of an invalid step (verl-agent's penalty)."""


def gigpo_advantages(
    step_rewards: ArrayLike,
    anchors: Sequence[Hashable],
    group_ids: ArrayLike,
    traj_ids: ArrayLike,
    *,
    gamma: float = GAMMA,
    step_weight: float = STEP_WEIGHT,
    mode: Mode = MODE,
    invalid: ArrayLike | None = None,
    invalid_penalty: float = INVALID_PENALTY,
    eps: float = EPS,
    similarity_threshold: float | None = None,
) -> np.ndarray:
    """GiGPO advantage ``A = A_E + ω·A_S`` of each step sample (Eq. 8).

    Args:
        step_rewards: ``[N]`` env reward of each step.
        anchors: ``[N]`` hashable anchor state of each step (the state it acted from).
        group_ids: ``[N]`` task-group id (the rollouts of one game share it).
        traj_ids: ``[N]`` trajectory id; unique across groups; a trajectory's steps in time order.
        gamma: discount of the step return (Eq. 5).
        step_weight: ``ω``, the weight of the step advantage.
        mode: ``"mean_norm"`` (subtract the group mean) or ``"mean_std_norm"`` (also divide by the
            unbiased std plus ``eps``), at both levels.
        invalid: ``[N]`` bool, True where the step's action was invalid; None means all valid.
        invalid_penalty: subtracted from the episode score and from the step return of each
            invalid step (see the module docstring).
        eps: added to the std in ``"mean_std_norm"``.
        similarity_threshold: None groups equal anchors; τ in (0, 1) groups similar text anchors
            (verl-agent's similarity grouping, see :func:`anchor_groups`).

    Returns:
        ``[N]`` float64 advantages in the order of the input.

    Raises:
        ValueError: on inconsistent inputs (shapes, a trajectory in two groups, unknown mode, ...).
        TypeError: when an anchor is not hashable.
    """
    r, groups, trajs, bad = _as_arrays(step_rewards, anchors, group_ids, traj_ids, invalid)
    _check_options(mode, gamma, invalid_penalty)
    check_similarity_threshold(similarity_threshold)
    if r.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    normalize_std = mode == "mean_std_norm"
    penalty = invalid_penalty * bad.astype(np.float64)  # [N]
    scores = episode_scores(r, trajs) - penalty  # [N]
    a_e = episode_advantages(scores, groups, normalize_std=normalize_std, eps=eps)  # Eq. 3
    returns = discounted_returns(r, trajs, gamma) - penalty  # [N] Eq. 5, then the penalty
    step_codes, _ = anchor_groups(anchors, groups, similarity_threshold)  # Eq. 6
    a_s = step_advantages(returns, step_codes, normalize_std=normalize_std, eps=eps)  # Eq. 7
    return a_e + step_weight * a_s  # Eq. 8


def episode_scores(step_rewards: np.ndarray, traj_ids: np.ndarray) -> np.ndarray:
    """``[N]`` total reward of each sample's trajectory (the episode score it carries)."""
    _, codes = np.unique(traj_ids, return_inverse=True)  # [N]
    codes = codes.reshape(-1)
    totals = np.bincount(codes, weights=step_rewards)  # [K]
    return totals[codes]


def episode_advantages(
    scores: np.ndarray, group_ids: np.ndarray, *, normalize_std: bool, eps: float = EPS
) -> np.ndarray:
    """Episode relative advantage ``A_E`` (Eq. 3), statistics over all step samples of a group.

    Args:
        scores: ``[N]`` episode score carried by each step sample (penalty already applied).
        group_ids: ``[N]`` task-group id.
        normalize_std: divide by the unbiased std plus ``eps`` (``"mean_std_norm"``).
        eps: added to the std.

    Returns:
        ``[N]`` ``A_E``; a group of a single step sample gets mean 0 and std 1.
    """
    _, codes = np.unique(group_ids, return_inverse=True)  # [N]
    return group_normalize(scores, codes.reshape(-1), normalize_std=normalize_std, eps=eps)


def anchor_groups(
    anchors: Sequence[Hashable],
    group_ids: np.ndarray,
    similarity_threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Step groups of Eq. 6: samples of one task group with equal (or similar) anchor states.

    Args:
        anchors: ``[N]`` hashable anchor states.
        group_ids: ``[N]`` task-group ids; anchors in different task groups stay apart.
        similarity_threshold: None: equal anchors share a group. τ in (0, 1): verl-agent's
            similarity grouping of text anchors (module docstring, step 4).

    Returns:
        ``codes`` ``[N]`` step-group index of each sample (first-occurrence order) and ``sizes``
        ``[M]`` the number of samples in each step group.

    Raises:
        TypeError: when an anchor is not hashable, or not a str under similarity grouping.
    """
    if similarity_threshold is not None:
        return _similar_anchor_groups(anchors, group_ids, similarity_threshold)
    index: dict[tuple[Hashable, Hashable], int] = {}
    codes = np.empty(len(anchors), dtype=np.int64)  # [N]
    for i, (group, anchor) in enumerate(zip(group_ids.tolist(), anchors, strict=True)):
        try:
            codes[i] = index.setdefault((group, anchor), len(index))
        except TypeError as exc:
            raise TypeError(
                f"anchor {i} ({type(anchor).__name__}) is not hashable; pass str or tuple anchors "
                "(convert lists or arrays with tuple(...))"
            ) from exc
    sizes = np.bincount(codes, minlength=len(index))  # [M]
    return codes, sizes


def _similar_anchor_groups(
    anchors: Sequence[Hashable], group_ids: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`anchor_groups` by similarity: first cluster whose representative is similar."""
    check_similarity_threshold(threshold)
    clusters: dict[Hashable, list[tuple[str, SequenceMatcher[str], int]]] = {}  # per task group
    codes = np.empty(len(anchors), dtype=np.int64)  # [N]
    n_codes = 0
    for i, (group, anchor) in enumerate(zip(group_ids.tolist(), anchors, strict=True)):
        if not isinstance(anchor, str):
            raise TypeError(
                f"anchor {i} is a {type(anchor).__name__}; similarity grouping compares text "
                "anchors (str); use protocol.similarity_threshold=null for exact grouping"
            )
        reps = clusters.setdefault(group, [])
        code = next((c for rep, m, c in reps if _similar(anchor, rep, m, threshold)), None)
        if code is None:
            code, n_codes = n_codes, n_codes + 1
            reps.append((anchor, SequenceMatcher(None, "", anchor), code))  # b: representative
        codes[i] = code
    return codes, np.bincount(codes, minlength=n_codes)  # [N], [M]


def _similar(
    anchor: str, representative: str, matcher: SequenceMatcher[str], threshold: float
) -> bool:
    """verl-agent's test ``SequenceMatcher(None, anchor, representative).ratio() >= threshold``.

    ``matcher`` holds the representative as its second sequence (difflib caches its index); the
    cheap upper bounds real_quick_ratio() >= quick_ratio() >= ratio() only skip pairs that fail.
    """
    if anchor == representative:  # ratio 1.0
        return True
    matcher.set_seq1(anchor)
    return (
        matcher.real_quick_ratio() >= threshold
        and matcher.quick_ratio() >= threshold
        and matcher.ratio() >= threshold
    )


def check_similarity_threshold(threshold: float | None) -> None:
    """Raise unless ``threshold`` is None (exact anchors) or in (0, 1), as verl-agent requires."""
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(
            f"similarity_threshold must be in (0, 1) (verl-agent's similarity_thresh, e.g. 0.95) "
            f"or null for exact anchor groups; got {threshold}"
        )


def step_advantages(
    returns: np.ndarray, step_codes: np.ndarray, *, normalize_std: bool, eps: float = EPS
) -> np.ndarray:
    """Step relative advantage ``A_S`` (Eq. 7) within each anchor group.

    Args:
        returns: ``[N]`` discounted step returns (penalty already applied).
        step_codes: ``[N]`` anchor-group index from :func:`anchor_groups`.
        normalize_std: divide by the unbiased std plus ``eps`` (``"mean_std_norm"``).
        eps: added to the std.

    Returns:
        ``[N]`` ``A_S``; 0 for a sample alone in its anchor group.
    """
    return group_normalize(
        returns, step_codes, normalize_std=normalize_std, eps=eps, singleton_mean="self"
    )


def _as_arrays(
    step_rewards: ArrayLike,
    anchors: Sequence[Hashable],
    group_ids: ArrayLike,
    traj_ids: ArrayLike,
    invalid: ArrayLike | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(step_rewards, dtype=np.float64)  # [N]
    groups = np.asarray(group_ids)  # [N]
    trajs = np.asarray(traj_ids)  # [N]
    n = r.shape[0] if r.ndim == 1 else -1
    bad = np.zeros(max(n, 0), dtype=bool) if invalid is None else np.asarray(invalid)  # [N]
    shapes = {"step_rewards": r.shape, "group_ids": groups.shape, "traj_ids": trajs.shape}
    shapes |= {"invalid": bad.shape, "anchors": (len(anchors),)}
    if n < 0 or any(s != (n,) for s in shapes.values()):
        raise ValueError(f"GiGPO inputs must be 1-D with one entry per step sample; got {shapes}")
    if bad.dtype != np.bool_:
        raise ValueError(f"invalid must be a bool array, got dtype {bad.dtype}")
    _check_one_group_per_traj(groups, trajs)
    return r, groups, trajs, bad


def _check_one_group_per_traj(groups: np.ndarray, trajs: np.ndarray) -> None:
    if trajs.shape[0] == 0:
        return
    traj_values, tc = np.unique(trajs, return_inverse=True)  # [N]
    group_values, gc = np.unique(groups, return_inverse=True)  # [N]
    pairs = np.unique(tc.reshape(-1) * len(group_values) + gc.reshape(-1))  # [P]
    counts = np.bincount(pairs // len(group_values), minlength=len(traj_values))  # [K]
    if np.any(counts > 1):
        raise ValueError(
            f"trajectory ids {traj_values[counts > 1][:5].tolist()} appear in more than one group; "
            "traj_ids must be unique across groups (number trajectories over the whole rollout)"
        )


def _check_options(mode: str, gamma: float, invalid_penalty: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown GiGPO mode {mode!r}; choose one of {list(MODES)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not np.isfinite(invalid_penalty) or invalid_penalty < 0:
        raise ValueError(f"invalid_penalty must be finite and >= 0, got {invalid_penalty}")
