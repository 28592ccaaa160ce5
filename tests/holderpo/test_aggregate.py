"""Hölder mean, weights and diagnostics against direct float64 formulas and HölderPO Theorem 1."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holderpo.aggregate import SMALL_P, holder_diagnostics, holder_weights, log_holder_mean

pytestmark = pytest.mark.numerics  # float results of two computations (tests/numerics.py)

P_VALUES = [-16.0, -3.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.0, 3.0, 16.0]


def ragged(seed: int, b: int = 5, t: int = 9, scale: float = 1.0, dtype=torch.float64):
    """Random log-ratios and a mask with rows of varied lengths (one of length 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=g, dtype=dtype) * scale
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = 1
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [B, T]
    return x, mask


def ref_log_mean(row: list[float], p: float) -> float:
    """Direct float64 log M_p of exp(row) (plain formulas, no shared code)."""
    n = len(row)
    if p == math.inf:
        return max(row)
    if p == -math.inf:
        return min(row)
    if p == 0.0:
        return math.fsum(row) / n
    m = max(p * v for v in row)
    return (m + math.log(math.fsum(math.exp(p * v - m) for v in row) / n)) / p


def ref_weights(row: list[float], p: float) -> list[float]:
    """Direct float64 w_t = r_t^p / Σ r^p."""
    m = max(p * v for v in row)
    e = [math.exp(p * v - m) for v in row]
    s = math.fsum(e)
    return [v / s for v in e]


def rows_of(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [x[b][mask[b]].tolist() for b in range(x.shape[0])]


@pytest.mark.parametrize("p", P_VALUES)
def test_value_and_gradient_match_direct_formulas(p):
    x, mask = ragged(1, scale=1.5)
    x.requires_grad_(True)
    log_m = log_holder_mean(x, mask, p)
    ref = torch.tensor([ref_log_mean(r, p) for r in rows_of(x.detach(), mask)], dtype=x.dtype)
    torch.testing.assert_close(log_m.detach(), ref, rtol=1e-12, atol=1e-12)

    # d log M / d ℓ_t = w_t (HölderPO Theorem 1) against the direct weight formula
    (grad,) = torch.autograd.grad(log_m.sum(), x)
    w_ref = torch.zeros_like(x)
    for b, row in enumerate(rows_of(x.detach(), mask)):
        w_row = ref_weights(row, p) if p else [1 / len(row)] * len(row)
        w_ref[b, : len(row)] = torch.tensor(w_row, dtype=torch.float64)
    torch.testing.assert_close(grad, w_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(holder_weights(x.detach(), mask, p), w_ref, rtol=1e-10, atol=1e-12)

    # d M / d ℓ_t = M · w_t
    (grad_m,) = torch.autograd.grad(log_holder_mean(x, mask, p).exp().sum(), x)
    torch.testing.assert_close(grad_m, ref.exp()[:, None] * w_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [-2.0, 0.0, 1e-8, 0.7, 4.0])
def test_gradcheck(p):
    x, mask = ragged(2, b=3, t=5)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: log_holder_mean(v, mask, p), (x,))


@pytest.mark.parametrize("p", [*P_VALUES, math.inf, -math.inf, 1e-8])
def test_padding_invariance(p):
    x, mask = ragged(3)
    garbage = torch.tensor([[1e4, -1e4, float("nan"), 80.0]], dtype=x.dtype).expand(x.shape[0], 4)
    x_pad = torch.cat([x, garbage], dim=1).clone().requires_grad_(True)
    mask_pad = torch.cat([mask, torch.zeros(x.shape[0], 4, dtype=torch.bool)], dim=1)
    x = x.clone().requires_grad_(True)

    a = log_holder_mean(x, mask, p)
    b = log_holder_mean(x_pad, mask_pad, p)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x_pad)
    torch.testing.assert_close(gb[:, : x.shape[1]], ga, rtol=0, atol=0)
    assert torch.all(gb[:, x.shape[1] :] == 0)
    wa = holder_weights(x.detach(), mask, p)
    wb = holder_weights(x_pad.detach(), mask_pad, p)
    torch.testing.assert_close(wb[:, : x.shape[1]], wa, rtol=0, atol=0)
    assert torch.all(wb[:, x.shape[1] :] == 0)


def test_continuity_in_p_around_zero():
    x, mask = ragged(4, scale=2.0)
    at_zero = log_holder_mean(x, mask, 0.0)
    for p in [1e-12, -1e-12, 1e-8, -1e-8, 0.99 * SMALL_P, -0.99 * SMALL_P]:
        torch.testing.assert_close(log_holder_mean(x, mask, p), at_zero, rtol=0, atol=1e-5)
    # both sides of the switch to the exact form follow log M_p = μ + p σ²/2 + O(p²): no jump
    rows = rows_of(x, mask)
    mu = torch.tensor([math.fsum(r) / len(r) for r in rows], dtype=x.dtype)
    var = torch.tensor(
        [
            math.fsum((v - m) ** 2 for v in r) / len(r)
            for r, m in zip(rows, mu.tolist(), strict=True)
        ],
        dtype=x.dtype,
    )
    for p in [0.999 * SMALL_P, 1.001 * SMALL_P, -0.999 * SMALL_P, -1.001 * SMALL_P]:
        torch.testing.assert_close(
            log_holder_mean(x, mask, p), mu + 0.5 * p * var, rtol=0, atol=1e-10
        )


@pytest.mark.parametrize("p", [1e-5, -1e-5, 1e-3, 0.1, 2.0, -4.0])
def test_float32_accurate_for_small_p(p):
    """The centred expm1 form keeps float32 accurate where (logsumexp − log n)/p would not."""
    x, mask = ragged(5, b=8, t=512, scale=1.0)
    exact = log_holder_mean(x, mask, p)
    single = log_holder_mean(x.float(), mask, p).double()
    torch.testing.assert_close(single, exact, rtol=0, atol=2e-6)


def test_infinite_p_gives_max_and_min():
    x, mask = ragged(6)
    x.requires_grad_(True)
    rows = rows_of(x.detach(), mask)
    top = log_holder_mean(x, mask, math.inf)
    bottom = log_holder_mean(x, mask, -math.inf)
    torch.testing.assert_close(top.detach(), torch.tensor([max(r) for r in rows], dtype=x.dtype))
    torch.testing.assert_close(bottom.detach(), torch.tensor([min(r) for r in rows], dtype=x.dtype))
    # finite p approaches the limits (power mean inequality: min <= M_p <= max)
    assert torch.all(log_holder_mean(x, mask, 400.0) <= top + 1e-12)
    torch.testing.assert_close(log_holder_mean(x, mask, 400.0), top, rtol=0, atol=0.01)
    torch.testing.assert_close(log_holder_mean(x, mask, -400.0), bottom, rtol=0, atol=0.01)
    (grad,) = torch.autograd.grad(top.sum(), x)
    torch.testing.assert_close(grad, holder_weights(x.detach(), mask, math.inf))


def test_infinite_p_weights_split_ties():
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0, 9.0], [0.5, -1.0, -1.0, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w_max = holder_weights(x, mask, math.inf)
    w_min = holder_weights(x, mask, -math.inf)
    torch.testing.assert_close(w_max, torch.tensor([[0, 0.5, 0.5, 0, 0], [1.0, 0, 0, 0, 0]]))
    torch.testing.assert_close(w_min, torch.tensor([[0, 0, 0, 1.0, 0], [0, 0.5, 0.5, 0, 0]]))


@pytest.mark.parametrize("p", [-16.0, -1.0, 0.0, 1e-7, 1.0, 16.0, math.inf, -math.inf])
def test_extreme_log_ratios_are_finite(p):
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(6, 64, generator=g) * 100 - 50).float()  # log-ratios in [-50, 50]
    x[0, :] = 50.0
    x[1, :] = -50.0
    x[2, ::2], x[2, 1::2] = 50.0, -50.0
    mask = torch.rand(6, 64, generator=g) < 0.8
    x.requires_grad_(True)
    log_m = log_holder_mean(x, mask, p)
    (grad,) = torch.autograd.grad(log_m.exp().sum(), x)
    assert torch.isfinite(log_m).all() and torch.isfinite(grad).all()
    assert torch.isfinite(holder_weights(x.detach(), mask, p)).all()
    rows = rows_of(x.detach().double(), mask)
    ref = torch.tensor([ref_log_mean(r, p) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(log_m.detach().double(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("p", [*P_VALUES, math.inf, -math.inf, 1e-8])
def test_empty_rows_and_single_tokens(p):
    x = torch.tensor([[0.3, float("nan"), 5.0], [-0.7, 2.0, 1.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    x.requires_grad_(True)
    log_m = log_holder_mean(x, mask, p)
    (grad,) = torch.autograd.grad(log_m.sum(), x)
    assert log_m[0].item() == 0 and log_m[1].item() == pytest.approx(-0.7)
    assert torch.all(grad[0] == 0) and torch.isfinite(grad).all()
    w = holder_weights(x.detach(), mask, p)
    assert torch.all(w[0] == 0)
    torch.testing.assert_close(w[1], torch.tensor([1.0, 0.0, 0.0]))
    d = holder_diagnostics(x.detach(), mask, p)
    assert d.ess[0] == 0 and d.ess[1] == 1 and d.weight_entropy[0] == 0
    assert torch.isfinite(d.weight_entropy).all()


def test_diagnostics_against_direct_formulas():
    x, mask = ragged(8, scale=1.3)
    for p in [-2.0, 0.0, 1.0, 5.0]:
        d = holder_diagnostics(x, mask, p)
        for b, row in enumerate(rows_of(x, mask)):
            w = ref_weights(row, p) if p else [1 / len(row)] * len(row)
            ent = -math.fsum(v * math.log(v) for v in w if v > 0)
            assert d.weight_entropy[b].item() == pytest.approx(ent, abs=1e-10)
            assert d.ess[b].item() == pytest.approx(1 / math.fsum(v * v for v in w), rel=1e-10)
            assert d.log_ratio_max[b].item() == max(row)
            assert d.log_ratio_min[b].item() == min(row)
            assert d.n_tokens[b].item() == len(row)


def test_bad_shapes_and_nan_p_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        log_holder_mean(x, torch.ones(2, 4, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="nan"):
        holder_weights(x, torch.ones(2, 3, dtype=torch.bool), float("nan"))


# --- HölderPO Theorem 1 as properties ---------------------------------------------------------

rows_st = st.lists(
    st.floats(-8.0, 8.0, allow_nan=False, allow_subnormal=False), min_size=1, max_size=12
)
p_st = st.floats(-12.0, 12.0, allow_nan=False, allow_subnormal=False)


def as_batch(row: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([row + [123.0]], dtype=torch.float64)  # one padded garbage column
    mask = torch.tensor([[True] * len(row) + [False]])
    return x, mask


def entropy_at(row: list[float], p: float) -> float:
    x, mask = as_batch(row)
    return holder_diagnostics(x, mask, p).weight_entropy.item()


@settings(max_examples=80, deadline=None)
@given(rows_st, p_st)
def test_weights_sum_to_one_and_entropy_bounded(row, p):
    x, mask = as_batch(row)
    w = holder_weights(x, mask, p)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.all(w >= 0) and w[0, -1] == 0
    assert -1e-12 <= entropy_at(row, p) <= math.log(len(row)) + 1e-12


@settings(max_examples=60, deadline=None)
@given(rows_st)
def test_entropy_is_maximal_at_p_zero(row):
    assert entropy_at(row, 0.0) == pytest.approx(math.log(len(row)), abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(rows_st, st.floats(0.0, 12.0), st.floats(0.0, 12.0))
def test_entropy_non_increasing_in_abs_p(row, a, b):
    lo, hi = sorted((a, b))
    # p > 0: entropy non-increasing as p grows; p < 0: non-increasing as p decreases
    assert entropy_at(row, hi) <= entropy_at(row, lo) + 1e-9
    assert entropy_at(row, -hi) <= entropy_at(row, -lo) + 1e-9


@settings(max_examples=80, deadline=None)
@given(rows_st, p_st, p_st)
def test_mass_on_extreme_tokens_is_monotone_in_p(row, a, b):
    lo, hi = sorted((a, b))
    x, mask = as_batch(row)
    top = torch.tensor([row + [0.0]]) == max(row)
    bottom = torch.tensor([row + [0.0]]) == min(row)
    w_lo, w_hi = holder_weights(x, mask, lo), holder_weights(x, mask, hi)
    assert w_hi[top[:, :]].sum() >= w_lo[top].sum() - 1e-12  # concentrates on max as p grows
    assert w_lo[bottom].sum() >= w_hi[bottom].sum() - 1e-12  # and on min as p decreases


@settings(max_examples=60, deadline=None)
@given(rows_st)
def test_weights_concentrate_on_max_and_min(row):
    values = sorted(set(row))
    gap = min((b - a for a, b in zip(values, values[1:], strict=False)), default=1.0)
    p = 40.0 / max(gap, 1e-3)  # p·gap >= 40: the others hold < n·e^-40 of the mass
    x, mask = as_batch(row)
    top = torch.tensor([row + [0.0]]) == max(row)
    bottom = torch.tensor([row + [0.0]]) == min(row)
    if gap >= 1e-3:
        assert holder_weights(x, mask, p)[top].sum().item() == pytest.approx(1.0, abs=1e-12)
        assert holder_weights(x, mask, -p)[bottom].sum().item() == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(rows_st, p_st, p_st)
def test_power_mean_inequality(row, a, b):
    lo, hi = sorted((a, b))
    x, mask = as_batch(row)
    m_lo, m_hi = log_holder_mean(x, mask, lo).item(), log_holder_mean(x, mask, hi).item()
    assert min(row) - 1e-9 <= m_lo <= m_hi + 1e-9 <= max(row) + 2e-9
