"""The loss options that follow verl and the official HölderPO verl fork, against transcriptions
of their formulas: dual clip (clip_ratio_c), the low_var_kl clamp (kl_clamp), separate KL/entropy
aggregation (reg_aggregation) and its gradient accumulation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from holderpo.loss import (
    PRESETS,
    LossConfig,
    accumulation_reg_scale,
    compute_loss,
    loss_units,
    reg_units,
)

pytestmark = pytest.mark.numerics  # float results of two computations (tests/numerics.py)

B, T = 8, 9


def batch(seed: int, scale: float = 1.5):
    """float64 batch with wide log-ratios (many ratios beyond 3), both advantage signs."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[0], adv[1] = -1.3, 0.9
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 2.5  # k3 beyond 10 at places
    entropy = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    return logp, old, adv, mask, ref, entropy


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# --- transcriptions of verl's core_algos (written here from its semantics) ---------------------


def verl_agg(loss_mat, mask, mode):
    """agg_loss: token-mean | seq-mean-token-mean."""
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return (loss_mat * m).sum() / m.sum()
    return ((loss_mat * m).sum(-1) / m.sum(-1)).mean()


def verl_policy_loss(old, logp, adv_bt, mask, lo, hi, c, mode="token-mean"):
    """compute_policy_loss with the dual clip; also pg_clipfrac and pg_clipfrac_lower."""
    ratio = torch.exp(logp - old)
    l1 = -adv_bt * ratio
    l2 = -adv_bt * torch.clamp(ratio, 1 - lo, 1 + hi)
    clip1 = torch.maximum(l1, l2)
    l3 = -adv_bt * c
    clip2 = torch.min(l3, clip1)
    losses = torch.where(adv_bt < 0, clip2, clip1)
    m = mask.to(ratio.dtype)
    frac = ((l2 > l1).to(m.dtype) * m).sum() / m.sum()
    frac_lower = (((clip1 > l3) & (adv_bt < 0)).to(m.dtype) * m).sum() / m.sum()
    return verl_agg(losses, mask, mode), frac, frac_lower


def verl_low_var_kl(logp, ref):
    """kl_penalty(..., 'low_var_kl'): k3 clamped to [-10, 10]."""
    kl = ref - logp
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def official_holder_seq(old, logp, adv, mask, lo, hi, p):
    """compute_policy_loss_holder_seq of the HölderPO verl fork: mean over rows of −A·ratio."""
    lr = logp - old
    n = mask.sum(-1).to(lr.dtype)
    log_m = (torch.logsumexp((lr * p).masked_fill(~mask, -math.inf), -1) - torch.log(n)) / p
    clipped = torch.clamp(log_m, math.log1p(-lo), math.log1p(hi))
    sel = torch.where(
        adv > 0,
        torch.minimum(log_m, clipped),
        torch.where(adv < 0, torch.maximum(log_m, clipped), log_m),
    )
    return torch.mean(-adv * torch.exp(sel))


# --- dual clip ----------------------------------------------------------------------------------


def test_grpo_preset_is_verl_token_loss_with_dual_clip():
    logp, old, adv, mask, _, _ = batch(0)
    cfg = PRESETS["grpo"]
    assert cfg.clip_ratio_c == 3.0
    out = compute_loss(cfg, logp, old, adv, mask)
    want, frac, frac_lower = verl_policy_loss(
        old, logp, adv[:, None].expand(B, T), mask, 0.2, 0.2, 3.0
    )
    assert frac_lower > 0  # the batch exercises the dual clip
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        grads(out.loss, logp)[0], grads(want, logp)[0], rtol=1e-10, atol=1e-12
    )
    assert out.metrics["loss/clip_frac"] == pytest.approx(float(frac), abs=1e-6)  # float32
    assert out.metrics["loss/dual_clip_frac"] == pytest.approx(float(frac_lower), abs=1e-6)
    off = compute_loss(dataclasses.replace(cfg, clip_ratio_c=None), logp, old, adv, mask)
    assert not torch.allclose(off.loss, want)  # without the dual clip the loss differs


@pytest.mark.parametrize("c", [1.5, 3.0, 10.0])
def test_dual_clip_any_bound_and_seq_mean_token_mean(c):
    logp, old, adv, mask, _, _ = batch(1)
    cfg = LossConfig(p=1.0, level="token", aggregation="seq_mean", clip_ratio_c=c)
    out = compute_loss(cfg, logp, old, adv, mask, with_metrics=False)
    want, _, _ = verl_policy_loss(
        old, logp, adv[:, None].expand(B, T), mask, 0.2, 0.2, c, "seq-mean-token-mean"
    )
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        grads(out.loss, logp)[0], grads(want, logp)[0], rtol=1e-10, atol=1e-12
    )


def test_dual_clip_at_sequence_level_caps_the_clipped_holder_mean():
    """A < 0 rows: objective max(min(M·A, clip(M)·A), c·A) = A·min(max(M, 1−ε), c)."""
    logp, old, adv, mask, _, _ = batch(2, scale=0.3)
    adv = -adv.abs()  # every row negative
    cfg = LossConfig(p=2.0, level="sequence", clip_ratio_c=1.2)
    out = compute_loss(cfg, logp, old, adv, mask)
    n = mask.sum(-1)
    lr = torch.where(mask, logp - old, torch.zeros_like(logp))
    m = ((torch.exp(2.0 * lr) * mask).sum(-1) / n) ** 0.5
    direct = torch.maximum(torch.minimum(m * adv, torch.clamp(m, 0.8, 1.2) * adv), 1.2 * adv)
    capped = (m > 1.2).detach()
    assert 0 < int(capped.sum()) < B
    torch.testing.assert_close(out.loss, -direct.mean(), rtol=1e-12, atol=1e-12)
    (g,) = grads(out.loss, logp)
    assert torch.all(g[capped] == 0) and torch.any(g[~capped] != 0)
    assert out.metrics["loss/dual_clip_frac"] == pytest.approx(float(capped.double().mean()))


def test_holderpo_preset_has_no_dual_clip_as_the_official_holder_seq():
    logp, old, adv, mask, _, _ = batch(3)
    cfg = dataclasses.replace(PRESETS["holderpo"], p=0.7)
    assert cfg.clip_ratio_c is None
    out = compute_loss(cfg, logp, old, adv, mask, with_metrics=False)
    want = official_holder_seq(old, logp, adv, mask, 0.2, 0.2, 0.7)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        grads(out.loss, logp)[0], grads(want, logp)[0], rtol=1e-10, atol=1e-12
    )


# --- KL clamp and KL/entropy aggregation --------------------------------------------------------


def test_kl_clamp_is_verl_low_var_kl():
    logp, old, adv, mask, ref, _ = batch(4)
    cfg = LossConfig(p=1.0, level="token", aggregation="token_mean", kl_coef=1.0, kl_clamp=10.0)
    out = compute_loss(cfg, logp, old, adv, mask, ref_logp=ref)
    kl = verl_low_var_kl(logp, ref)
    assert bool(((torch.exp(ref - logp) - (ref - logp) - 1)[mask] > 10).any())  # clamp exercised
    want = verl_agg(kl, mask, "token-mean")
    assert out.metrics["loss/kl"] == pytest.approx(float(want.detach()), rel=1e-12)
    free = compute_loss(dataclasses.replace(cfg, kl_clamp=None), logp, old, adv, mask, ref_logp=ref)
    assert free.metrics["loss/kl"] > out.metrics["loss/kl"] + 1e-3
    only_kl = (
        out.loss - compute_loss(dataclasses.replace(cfg, kl_coef=0.0), logp, old, adv, mask).loss
    )
    torch.testing.assert_close(grads(only_kl, logp)[0], grads(want, logp)[0], rtol=1e-9, atol=1e-12)


def test_official_alfworld_loss_policy_per_row_kl_and_entropy_per_token():
    """holder_seq + kl_loss_coef·agg(low_var_kl, token-mean) − entropy_coeff·agg(H, token-mean)."""
    logp, old, adv, mask, ref, entropy = batch(5)
    cfg = dataclasses.replace(PRESETS["holderpo"], p=1.0, kl_coef=0.01, entropy_coef=0.001)
    assert (cfg.aggregation, cfg.reg_aggregation, cfg.kl_clamp) == ("seq_mean", "token_mean", 10)
    out = compute_loss(cfg, logp, old, adv, mask, ref_logp=ref, entropy=entropy)
    want = (
        official_holder_seq(old, logp, adv, mask, 0.2, 0.2, 1.0)
        + 0.01 * verl_agg(verl_low_var_kl(logp, ref), mask, "token-mean")
        - 0.001 * verl_agg(entropy, mask, "token-mean")
    )
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(
        grads(out.loss, logp, entropy), grads(want, logp, entropy), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)
    same = dataclasses.replace(cfg, reg_aggregation=None)
    other = compute_loss(same, logp, old, adv, mask, ref_logp=ref, entropy=entropy)
    assert not torch.allclose(other.loss, want)  # per-row KL/entropy means differ


@pytest.mark.parametrize(
    ("aggregation", "reg"),
    [("seq_mean", "token_mean"), ("token_mean", "seq_mean"), ("seq_mean", "seq_sum_const")],
)
def test_micro_batches_add_up_with_a_separate_reg_aggregation(aggregation, reg):
    """Weights loss_units(micro)/total and accumulation_reg_scale give the full batch's loss,
    gradient and KL/entropy metrics."""
    logp, old, adv, mask, ref, entropy = batch(6)
    cfg = LossConfig(
        p=0.5,
        aggregation=aggregation,
        reg_aggregation=reg,
        norm_length=16,
        kl_coef=0.05,
        entropy_coef=0.01,
        kl_clamp=10.0,
    )
    kw = {"ref_logp": ref, "entropy": entropy}
    full = compute_loss(cfg, logp, old, adv, mask, ref_logp=ref, entropy=entropy)
    total, total_reg = loss_units(mask, cfg), reg_units(mask, cfg)
    summed = torch.zeros((), dtype=torch.float64)
    metrics = {"loss/kl": 0.0, "loss/entropy": 0.0, "loss/total": 0.0}
    for s in (slice(0, 3), slice(3, 4), slice(4, B)):
        scale = accumulation_reg_scale(mask[s], cfg, total, total_reg)
        part = compute_loss(
            cfg,
            logp[s],
            old[s],
            adv[s],
            mask[s],
            reg_scale=scale,
            **{k: v[s] for k, v in kw.items()},
        )
        weight = loss_units(mask[s], cfg) / total
        summed = summed + part.loss * weight
        for key in metrics:
            metrics[key] += part.metrics[key] * weight
    torch.testing.assert_close(summed, full.loss, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(
        grads(summed, logp, entropy), grads(full.loss, logp, entropy), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)
    for key, value in metrics.items():
        assert value == pytest.approx(full.metrics[key], rel=1e-10)


def test_reg_scale_is_one_when_the_aggregations_agree():
    _, _, _, mask, _, _ = batch(7)
    cfg = PRESETS["grpo"]
    assert accumulation_reg_scale(mask[:3], cfg, loss_units(mask, cfg), reg_units(mask, cfg)) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_ratio_c": 1.0}, "clip_ratio_c must be > 1"),
        ({"clip_ratio_c": 0.5}, "clip_ratio_c must be > 1"),
        ({"kl_clamp": 0.0}, "kl_clamp must be > 0"),
        ({"reg_aggregation": "token-mean"}, "reg_aggregation must be"),
        ({"reg_aggregation": "seq_sum_const"}, "norm_length"),
    ],
)
def test_bad_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)
