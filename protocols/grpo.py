"""Group-normalised outcome advantages: GRPO and Dr.GRPO, and the group normaliser GiGPO reuses.

Conventions (shared with :mod:`protocols.gigpo`, and those of verl's
``compute_grpo_outcome_advantage``):

* the statistics of a group are taken over its entries; the standard deviation is the unbiased one
  (``ddof=1``, as ``torch.std``);
* ``A = (r - mean) / (std + eps)`` with ``eps = 1e-6`` (GRPO), or ``A = r - mean`` (Dr.GRPO);
* a group of a single entry has ``mean = 0`` and ``std = 1``, so its advantage is its own reward
  (divided by ``1 + eps`` for GRPO): a lone sample is not centred;
* a group whose entries are all equal has advantage exactly 0.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike

EPS: Final = 1e-6
"""Added to every std before dividing (verl's ``epsilon``)."""

SingletonMean = Literal["zero", "self"]
"""Mean given to a group of one entry: ``"zero"`` (GRPO, GiGPO episode level) or ``"self"`` (GiGPO
step level, which makes the advantage of a singleton step group 0)."""


def grpo_advantages(
    rewards: ArrayLike,
    group_ids: ArrayLike,
    *,
    normalize_std: bool = True,
    eps: float = EPS,
) -> np.ndarray:
    """GRPO (``normalize_std=True``) or Dr.GRPO (``False``) advantage of each sample.

    GRPO: ``A_i = (r_i - mean_g) / (std_g + eps)``; Dr.GRPO drops the division:
    ``A_i = r_i - mean_g``, where ``g`` is the group of sample ``i`` (the rollouts of one prompt).

    Args:
        rewards: ``[N]`` outcome reward of each sample.
        group_ids: ``[N]`` group id of each sample (any sortable values, usually ints).
        normalize_std: divide by the group's unbiased std plus ``eps`` (GRPO) or not (Dr.GRPO).
        eps: added to the std.

    Returns:
        ``[N]`` float64 advantages in the order of the input.

    Raises:
        ValueError: on mismatched shapes, non-finite rewards or ``eps <= 0``.
    """
    r = np.asarray(rewards, dtype=np.float64)  # [N]
    ids = np.asarray(group_ids)  # [N]
    if r.ndim != 1 or r.shape != ids.shape:
        raise ValueError(
            f"rewards and group_ids must be 1-D of equal length; got {r.shape} and {ids.shape}"
        )
    if r.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    _, codes = np.unique(ids, return_inverse=True)  # [N]
    return group_normalize(r, codes.reshape(-1), normalize_std=normalize_std, eps=eps)


def group_normalize(
    values: np.ndarray,
    codes: np.ndarray,
    *,
    normalize_std: bool,
    eps: float,
    singleton_mean: SingletonMean = "zero",
) -> np.ndarray:
    """Centre (and scale) each value by the statistics of its group.

    Args:
        values: ``[N]`` float values.
        codes: ``[N]`` group index of each value, integers in ``[0, G)``.
        normalize_std: divide by ``std + eps`` (unbiased std; 1 for a group of one).
        eps: added to the std; must be positive.
        singleton_mean: mean of a group of one: ``"zero"`` keeps the value, ``"self"`` gives 0.

    Returns:
        ``[N]`` normalised values.
    """
    v = np.asarray(values, dtype=np.float64)  # [N]
    if not np.all(np.isfinite(v)):
        raise ValueError("values to normalise contain NaN or inf; check the rewards")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if v.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    n_groups = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=n_groups)  # [G]
    mean = np.bincount(codes, weights=v, minlength=n_groups) / np.maximum(counts, 1)  # [G]
    single = counts == 1  # [G]
    if singleton_mean == "zero":
        mean[single] = 0.0
    dev = v - mean[codes]  # [N]
    dev[_constant_groups(v, codes, n_groups)[codes] & ~single[codes]] = 0.0
    if not normalize_std:
        return dev
    sq = np.bincount(codes, weights=dev**2, minlength=n_groups)  # [G]
    std = np.sqrt(sq / np.maximum(counts - 1, 1))  # [G] unbiased (ddof=1)
    std[single] = 1.0
    return dev / (std[codes] + eps)


def _constant_groups(v: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """``[G]`` True where every value of the group is equal (their deviation is exactly 0)."""
    hi = np.full(n_groups, -np.inf)
    lo = np.full(n_groups, np.inf)
    np.maximum.at(hi, codes, v)
    np.minimum.at(lo, codes, v)
    return hi == lo
