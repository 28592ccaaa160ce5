"""holderpo_loss and its presets against direct float64 formulas of each objective."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from holderpo.loss import PRESETS, LossConfig, compute_loss, holderpo_loss, loss_units, preset

pytestmark = pytest.mark.numerics  # float results of two computations (tests/numerics.py)

B, T = 6, 11


def batch(seed: int, scale: float = 0.3, dtype=torch.float64):
    """Random logp/old_logp/advantages and a ragged mask (a length-1 row, non-zero advantages)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=dtype) * scale).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=dtype)
    adv = torch.where(adv.abs() < 0.1, torch.full_like(adv, 0.5), adv)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = 1
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def grad_of(loss: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, logp)
    return g


def assert_same_loss(ours: torch.Tensor, direct: torch.Tensor, logp: torch.Tensor) -> None:
    torch.testing.assert_close(ours, direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(ours, logp), grad_of(direct, logp), rtol=1e-9, atol=1e-12)


# --- direct formulas (written from the papers, independent of holderpo/) -----------------------


def ppo_token_terms(logp, old, adv, lo, hi):
    """PPO/GRPO per-token min(r A, clip(r) A), [B, T]."""
    r = torch.exp(logp - old)
    a = adv[:, None]
    return torch.minimum(r * a, torch.clamp(r, 1 - lo, 1 + hi) * a)


def sequence_objective(m, adv, lo, hi):
    """HölderPO Eq. 2 / GSPO per row: min(M A, clip(M) A)."""
    return torch.minimum(m * adv, torch.clamp(m, 1 - lo, 1 + hi) * adv)


def power_mean(logp, old, mask, p):
    """Direct masked power mean ((1/n) Σ r^p)^(1/p) (p != 0) or exp(mean log r) (p = 0)."""
    lr = torch.where(mask, logp - old, torch.zeros_like(logp))
    n = mask.sum(-1)
    if p == 0:
        return torch.exp(lr.sum(-1) / n)
    return ((torch.exp(p * lr) * mask).sum(-1) / n) ** (1 / p)


# --- the reductions ------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 0.0, 2.0, -1.0, 0.5])
def test_sequence_level_equals_direct_power_mean_objective(p):
    logp, old, adv, mask = batch(1)
    ours = holderpo_loss(logp, old, adv, mask, p=p, clip_low=0.2, clip_high=0.28).loss
    direct = -sequence_objective(power_mean(logp, old, mask, p), adv, 0.2, 0.28).mean()
    assert_same_loss(ours, direct, logp)


def test_p1_sequence_is_the_arithmetic_mean_ratio_objective():
    logp, old, adv, mask = batch(2, scale=0.5)
    r_mean = (torch.exp(logp - old) * mask).sum(-1) / mask.sum(-1)
    direct = -sequence_objective(r_mean, adv, 0.2, 0.2).mean()
    assert_same_loss(holderpo_loss(logp, old, adv, mask, p=1.0).loss, direct, logp)


def test_p0_sequence_is_gspo_objective():
    logp, old, adv, mask = batch(3, scale=0.5)
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))  # GSPO s_i(θ)
    direct = -sequence_objective(s, adv, 0.2, 0.2).mean()
    assert_same_loss(holderpo_loss(logp, old, adv, mask, p=0.0).loss, direct, logp)


def test_p1_token_mean_is_the_grpo_ppo_surrogate():
    logp, old, adv, mask = batch(4, scale=0.4)
    out = holderpo_loss(logp, old, adv, mask, p=1.0, level="token", aggregation="token_mean")
    direct = -(ppo_token_terms(logp, old, adv, 0.2, 0.2) * mask).sum() / mask.sum()
    assert_same_loss(out.loss, direct, logp)


def test_grpo_preset():
    logp, old, adv, mask = batch(5, scale=0.4)
    direct = -(ppo_token_terms(logp, old, adv, 0.2, 0.2) * mask).sum() / mask.sum()
    assert_same_loss(compute_loss(PRESETS["grpo"], logp, old, adv, mask).loss, direct, logp)


def test_dr_grpo_preset():
    logp, old, adv, mask = batch(6, scale=0.4)
    cfg = PRESETS["dr_grpo"]
    sums = (ppo_token_terms(logp, old, adv, 0.2, 0.2) * mask).sum(-1)  # per-row token sum
    direct = -(sums / cfg.norm_length).mean()
    assert_same_loss(compute_loss(cfg, logp, old, adv, mask).loss, direct, logp)


def test_gspo_preset():
    logp, old, adv, mask = batch(7, scale=1e-3)
    cfg = PRESETS["gspo"]
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    direct = -sequence_objective(s, adv, cfg.clip_low, cfg.clip_high).mean()
    assert_same_loss(compute_loss(cfg, logp, old, adv, mask).loss, direct, logp)
    assert 0 < compute_loss(cfg, logp, old, adv, mask).metrics["loss/clip_frac"] < 1


def test_gmpo_preset():
    """GMPO: sgn(A)·(Π_t |min(ρ_t A, clip(ρ_t) A)|)^(1/n), log-space clip (e^-0.4, e^0.4)."""
    logp, old, adv, mask = batch(8, scale=0.5)
    lr = logp - old
    a = adv[:, None]
    clipped = torch.clamp(lr, -0.4, 0.4)
    pessimistic = torch.minimum(lr * torch.sign(a), clipped * torch.sign(a)) * torch.sign(a)
    geo = torch.exp((pessimistic * mask).sum(-1) / mask.sum(-1))  # |product|^(1/n) / |A|
    direct = -(adv * geo).mean()
    assert_same_loss(compute_loss(PRESETS["gmpo"], logp, old, adv, mask).loss, direct, logp)


def test_holderpo_preset_is_holderpo_loss_defaults():
    logp, old, adv, mask = batch(9)
    cfg = dataclasses.replace(PRESETS["holderpo"], p=-0.5)
    assert cfg.scheduled_p and PRESETS["holderpo"].p == 2.0
    ours = compute_loss(cfg, logp, old, adv, mask)
    theirs = holderpo_loss(logp, old, adv, mask, p=-0.5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)
    assert ours.metrics == theirs.metrics


def test_token_level_general_p_is_holder_mean_of_clipped_ratios():
    logp, old, adv, mask = batch(10, scale=0.5)
    p = 3.0
    terms = ppo_token_terms(logp, old, adv, 0.2, 0.2) / adv[:, None]  # clipped ratios r̃_t
    m = ((terms**p) * mask).sum(-1).div(mask.sum(-1)) ** (1 / p)
    direct = -(adv * m).mean()
    out = holderpo_loss(logp, old, adv, mask, p=p, level="token")
    assert_same_loss(out.loss, direct, logp)


def test_token_advantages_use_masked_row_mean():
    logp, old, adv, mask = batch(11)
    noise = torch.randn(B, T, dtype=logp.dtype)
    centred = noise - ((noise * mask).sum(-1) / mask.sum(-1))[:, None]
    adv_bt = torch.where(mask, adv[:, None] + centred, torch.full_like(noise, 1e6))
    for level in ("sequence", "token"):
        a = holderpo_loss(logp, old, adv, mask, p=0.5, level=level).loss
        b = holderpo_loss(logp, old, adv_bt, mask, p=0.5, level=level).loss
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- padding, empty rows, extremes ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_padding_invariance(name):
    logp, old, adv, mask = batch(12)
    cfg = dataclasses.replace(PRESETS[name], kl_coef=0.1, entropy_coef=0.01)
    ref, ent = torch.randn(B, T, dtype=logp.dtype), torch.rand(B, T, dtype=logp.dtype)
    ent.requires_grad_(True)
    out = compute_loss(cfg, logp, old, adv, mask, ref_logp=ref, entropy=ent)

    pad = 5
    junk = torch.tensor([50.0, -80.0, float("nan"), 1e4, -1e4], dtype=logp.dtype).expand(B, pad)
    logp_p = torch.cat([logp.detach(), junk], 1).requires_grad_(True)
    ent_p = torch.cat([ent.detach(), junk], 1).requires_grad_(True)
    old_p, ref_p = torch.cat([old, -junk], 1), torch.cat([ref, junk * 2], 1)
    mask_p = torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], 1)
    out_p = compute_loss(cfg, logp_p, old_p, adv, mask_p, ref_logp=ref_p, entropy=ent_p)

    torch.testing.assert_close(out_p.loss, out.loss, rtol=1e-14, atol=1e-14)
    g, ge = torch.autograd.grad(out.loss, (logp, ent))
    gp, gpe = torch.autograd.grad(out_p.loss, (logp_p, ent_p))
    torch.testing.assert_close(gp[:, :T], g, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gpe[:, :T], ge, rtol=1e-14, atol=1e-14)
    assert torch.all(gp[:, T:] == 0) and torch.all(gpe[:, T:] == 0)
    assert out_p.metrics == pytest.approx(out.metrics, rel=1e-12)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_empty_rows_contribute_nothing(name):
    logp, old, adv, mask = batch(13)
    cfg = PRESETS[name]
    empty = torch.zeros(2, T, dtype=torch.bool)
    logp_e = torch.cat([logp.detach(), torch.full((2, T), float("nan"))], 0).requires_grad_(True)
    out_e = compute_loss(
        cfg, logp_e, torch.cat([old, old[:2]]), torch.cat([adv, adv[:2]]), torch.cat([mask, empty])
    )
    out = compute_loss(cfg, logp, old, adv, mask)
    torch.testing.assert_close(out_e.loss, out.loss, rtol=1e-14, atol=1e-14)
    g = grad_of(out_e.loss, logp_e)
    torch.testing.assert_close(g[:B], grad_of(out.loss, logp), rtol=1e-14, atol=1e-14)
    assert torch.all(g[B:] == 0)
    assert all(math.isfinite(v) for v in out_e.metrics.values())


def test_all_rows_empty_is_zero_loss_without_nan():
    logp = torch.zeros(3, 4, requires_grad=True)
    out = holderpo_loss(logp, torch.zeros(3, 4), torch.ones(3), torch.zeros(3, 4), p=2.0)
    assert out.loss.item() == 0 and torch.all(grad_of(out.loss, logp) == 0)
    assert all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("p", [-16.0, -1.0, 0.0, 1.0, 16.0, math.inf, -math.inf])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_extreme_log_ratios_give_finite_loss_and_grads(p, level):
    g = torch.Generator().manual_seed(14)
    old = torch.zeros(4, 32)
    logp = (torch.rand(4, 32, generator=g) * 100 - 50).requires_grad_(True)  # ℓ in [-50, 50]
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    mask = torch.rand(4, 32, generator=g) < 0.9
    out = holderpo_loss(logp, old, adv, mask, p=p, level=level, kl_coef=0.01, ref_logp=old)
    assert torch.isfinite(out.loss) and torch.isfinite(grad_of(out.loss, logp)).all()
    assert all(not math.isnan(v) for v in out.metrics.values())


# --- KL, entropy, metrics, validation ------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_value_and_gradient_sign(estimator):
    logp, old, _, mask = batch(15, scale=0.5)
    ref = logp.detach() + torch.randn(B, T, dtype=logp.dtype) * 0.5
    zero_adv = torch.zeros(B, dtype=logp.dtype)
    out = holderpo_loss(
        logp, old, zero_adv, mask, p=1.0, kl_coef=0.5, kl_estimator=estimator, ref_logp=ref
    )
    delta = ref - logp
    kl_t = -delta if estimator == "k1" else torch.exp(delta) - delta - 1
    kl = ((kl_t * mask).sum(-1) / mask.sum(-1)).mean()
    assert out.metrics["loss/kl"] == pytest.approx(kl.item(), rel=1e-12)
    torch.testing.assert_close(out.loss, 0.5 * kl, rtol=1e-12, atol=1e-12)
    g = grad_of(out.loss, logp)
    if estimator == "k1":
        assert torch.all(g[mask] > 0)  # k1 pushes every sampled token's logp down
    else:  # k3 pulls logp towards the reference from either side
        assert torch.all(torch.sign(g[mask]) == torch.sign((logp - ref).detach()[mask]))
    assert torch.all(g[~mask] == 0)
    if estimator == "k3":
        assert kl.item() > 0


def test_entropy_bonus_lowers_loss_and_rewards_entropy():
    logp, old, adv, mask = batch(16)
    ent = torch.rand(B, T, dtype=logp.dtype, requires_grad=True)
    base = holderpo_loss(logp, old, adv, mask, p=1.0)
    out = holderpo_loss(logp, old, adv, mask, p=1.0, entropy_coef=0.1, entropy=ent)
    h = ((ent * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(out.loss, base.loss - 0.1 * h, rtol=1e-12, atol=1e-12)
    assert out.metrics["loss/entropy"] == pytest.approx(h.item(), rel=1e-12)
    g = grad_of(out.loss, ent)
    assert torch.all(g[mask] < 0) and torch.all(g[~mask] == 0)


def test_clip_fraction_counts_active_direction_only():
    old = torch.zeros(4, 3, dtype=torch.float64)
    lr = torch.tensor([[0.5] * 3, [0.5] * 3, [-0.5] * 3, [-0.5] * 3], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    seq = holderpo_loss(lr.clone().requires_grad_(), old, adv, mask, p=1.0)
    assert seq.metrics["loss/clip_frac"] == 0.5  # rows 0 (M > 1.2, A > 0) and 3 (M < 0.8, A < 0)
    mask[0, 1:] = False
    tok = holderpo_loss(lr, old, adv, mask, p=1.0, level="token")
    assert tok.metrics["loss/clip_frac"] == pytest.approx(4 / 10)


def test_metrics_keys_and_values():
    logp, old, adv, mask = batch(17, scale=0.5)
    out = holderpo_loss(logp, old, adv, mask, p=-2.0, ref_logp=old, entropy=torch.ones(B, T))
    m = out.metrics
    assert all(k.startswith(("loss/", "holder/")) for k in m)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    assert {"loss/total", "loss/policy", "loss/clip_frac", "loss/kl", "loss/entropy"} <= set(m)
    lr = (logp - old).detach()[mask]
    assert m["holder/p"] == -2.0
    assert m["holder/ratio_max"] == pytest.approx(lr.max().exp().item(), rel=1e-12)
    assert m["holder/ratio_min"] == pytest.approx(lr.min().exp().item(), rel=1e-12)
    assert m["loss/total"] == pytest.approx(out.loss.item(), rel=1e-12)
    assert m["loss/entropy"] == pytest.approx(1.0)
    assert m["holder/M_mean"] == pytest.approx(power_mean(logp, old, mask, -2.0).mean().item())
    n = mask.sum(-1).double()
    assert 1.0 <= m["holder/ess"] <= n.mean().item()
    assert 0.0 < m["holder/ess_frac"] <= 1.0
    assert 0.0 <= m["holder/weight_entropy"] <= n.log().mean().item() + 1e-12
    at_zero = holderpo_loss(logp, old, adv, mask, p=0.0).metrics
    assert at_zero["holder/weight_entropy"] == pytest.approx(n.log().mean().item(), rel=1e-12)
    assert at_zero["holder/ess_frac"] == pytest.approx(1.0)


def test_float32_loss_matches_float64():
    logp, old, adv, mask = batch(18, scale=0.5)
    for name in sorted(PRESETS):
        a = compute_loss(PRESETS[name], logp, old, adv, mask).loss
        b = compute_loss(PRESETS[name], logp.float(), old.float(), adv.float(), mask).loss
        assert b.dtype == torch.float32
        assert b.item() == pytest.approx(a.item(), rel=1e-5, abs=1e-6)


def test_validation_errors_name_the_fix():
    with pytest.raises(ValueError, match="level must be one of"):
        LossConfig(level="tokens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aggregation must be one of"):
        LossConfig(aggregation="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm_length"):
        LossConfig(aggregation="seq_sum_const")
    with pytest.raises(ValueError, match="clip_low"):
        LossConfig(clip_low=1.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        LossConfig(kl_estimator="k2")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="choose one of"):
        preset("ppo")
    logp, old, adv, mask = batch(19)
    with pytest.raises(ValueError, match="needs ref_logp"):
        holderpo_loss(logp, old, adv, mask, p=1.0, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"):
        holderpo_loss(logp, old, adv[:-1], mask, p=1.0)
    with pytest.raises(ValueError, match=r"must all be \[B, T\]"):
        holderpo_loss(logp, old[:, :-1], adv, mask, p=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["grpo"].p = 2.0  # type: ignore[misc]


def test_without_metrics_same_loss_and_no_metrics():
    logp, old, adv, mask = batch(20)
    for name in sorted(PRESETS):
        full = compute_loss(PRESETS[name], logp, old, adv, mask)
        bare = compute_loss(PRESETS[name], logp, old, adv, mask, with_metrics=False)
        assert bare.metrics == {}
        torch.testing.assert_close(bare.loss, full.loss, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_loss_units_make_micro_batches_add_up(name):
    """Micro-batch losses weighted by loss_units(micro) / loss_units(all) sum to the full loss."""
    logp, old, adv, mask = batch(21)
    cfg = PRESETS[name]
    full = compute_loss(cfg, logp, old, adv, mask, with_metrics=False).loss
    total = loss_units(mask, cfg)
    parts = [slice(0, 2), slice(2, B)]
    summed = sum(
        compute_loss(cfg, logp[s], old[s], adv[s], mask[s], with_metrics=False).loss
        * (loss_units(mask[s], cfg) / total)
        for s in parts
    )
    torch.testing.assert_close(summed, full, rtol=1e-12, atol=1e-12)
