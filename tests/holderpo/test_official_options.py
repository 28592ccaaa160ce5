"""The options the official code has, each against a transcription of its formula (written here
from the upstream semantics; the files and commits are named in docs/loss.md):

* the official ``holder_seq``'s safe exponential (HölderPO verl fork ``core_algos.py``): the built
  case A < 0, log M = 100 in float32 has a finite gradient there, and now here too;
* verl's ``low_var_kl`` clamp of Δ to ±20 before the exponential;
* verl's GSPO clamp of the sequence log-ratio at 10 (the ``gspo`` preset);
* oat's ``sequence_w_clip`` (``token_clip``): token log-ratio clip, then the sequence clip;
* verl's ``seq-mean-token-sum-norm`` aggregation (``seq_sum_norm``) and its gradient accumulation.
"""

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
    kl_per_token,
    loss_units,
    loss_weight,
    reg_units,
)

pytestmark = pytest.mark.numerics  # float results of two computations (tests/numerics.py)

B, T = 6, 7


def grad(loss, x):
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


def rows(seed: int, dtype=torch.float64, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=dtype) * scale).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=dtype)
    adv[0], adv[1] = -1.2, 0.8
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old, adv, mask


# --- the built case: A < 0, log M = 100 in float32 ----------------------------------------------


def fork_holder_seq(old, logp, adv, mask, eps, p):
    """``compute_policy_loss_holder_seq`` with ``safe_exp_from_log`` (clamp at log finfo.max)."""
    lr = logp - old
    n = mask.sum(-1).to(lr.dtype)
    log_m = (torch.logsumexp((lr * p).masked_fill(~mask, -math.inf), -1) - torch.log(n)) / p
    clipped = torch.clamp(log_m, math.log1p(-eps), math.log1p(eps))
    sel = torch.where(
        adv > 0,
        torch.minimum(log_m, clipped),
        torch.where(adv < 0, torch.maximum(log_m, clipped), log_m),
    )
    ratio = torch.exp(torch.clamp(sel, max=math.log(torch.finfo(logp.dtype).max)))
    return torch.mean(-adv * ratio), sel


def test_the_built_case_has_a_finite_gradient_as_the_official_safe_exp() -> None:
    logp, old, adv, mask = rows(0, dtype=torch.float32)
    adv[0] = -0.9  # |A| < 1: A·(largest float32) is finite, so the value is too
    old = torch.where(torch.arange(B)[:, None] == 0, logp.detach() - 100.0, old)  # row 0: ℓ = 100
    cfg = dataclasses.replace(PRESETS["holderpo"], p=2.0)
    theirs, sel = fork_holder_seq(old, logp, adv, mask, 0.2, 2.0)
    assert adv[0] < 0  # log M = 100 and A < 0:
    assert float(sel[0].detach()) == pytest.approx(100.0, rel=1e-6)
    plain = torch.mean(-adv * torch.exp(sel))  # the exponential without the cap
    assert not torch.isfinite(grad(plain, logp)).all()  # what the project computed before
    official = grad(theirs, logp)
    assert torch.isfinite(official).all() and torch.all(official[0] == 0)
    assert not torch.isfinite(theirs)  # its cap log(finfo.max) rounds up in float32: exp = inf
    out = compute_loss(cfg, logp, old, adv, mask)
    ours = grad(out.loss, logp)
    assert torch.isfinite(ours).all() and torch.isfinite(out.loss)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-7)
    assert out.metrics["holder/M_mean"] > 1e40  # the metric still shows the ratio (float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_capped_exponential_is_finite_and_exact_below_the_cap(dtype) -> None:
    from holderpo.loss import safe_exp

    big = torch.tensor([1e4, 100.0, 700.0, 80.0, -5.0], dtype=dtype)
    out = safe_exp(big)
    assert torch.isfinite(out).all()
    free = big < math.log(torch.finfo(dtype).max) - 1
    torch.testing.assert_close(out[free], torch.exp(big[free]))


def verl_low_var_kl(logp, ref):
    """``kl_penalty(..., "low_var_kl")``: Δ clamped to ±20, k3, clamped to ±10."""
    kl = torch.clamp(ref - logp, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def test_low_var_kl_clamps_delta_first_so_huge_gaps_keep_a_finite_gradient() -> None:
    delta = torch.tensor([-30.0, -20.5, -11.0, -1.0, 0.3, 5.0, 25.0, 95.0])
    logp = torch.zeros(1, 8, requires_grad=True)
    ref = delta[None, :]
    ours = kl_per_token(logp, ref, "k3", 10.0)
    torch.testing.assert_close(ours, verl_low_var_kl(logp, ref))
    g = grad(ours.sum(), logp)
    assert torch.isfinite(g).all()  # Δ = 95: expm1 overflows without the Δ clamp (0·inf = nan)
    torch.testing.assert_close(g, grad(verl_low_var_kl(logp, ref).sum(), logp))
    free = kl_per_token(logp, ref, "k3", None)  # no clamp asked: the plain estimator
    assert not torch.isfinite(free).all()


# --- GSPO: the sequence log-ratio clamped at 10 -------------------------------------------------


def verl_gspo(old, logp, adv, mask, lo, hi):
    """``compute_policy_loss_gspo``: token-level s_i,t = sg(s_i)·π/sg(π), log clamped at 10."""
    m = mask.to(logp.dtype)
    nakl = logp - old
    seq = (nakl * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_s = logp - logp.detach() + seq.detach()[:, None]
    s = torch.exp(torch.clamp(log_s, max=10.0))
    a = adv[:, None].expand_as(s)
    losses = torch.maximum(-a * s, -a * torch.clamp(s, 1 - lo, 1 + hi))
    return (((losses * m).sum(-1) / m.sum(-1)).mean()), seq


@pytest.mark.parametrize("seed", range(3))
def test_gspo_preset_is_verl_gspo_with_its_clamp_at_10(seed) -> None:
    logp, old, adv, mask = rows(seed)
    shift = torch.zeros(B, 1, dtype=old.dtype)
    shift[0], shift[1], shift[2] = 12.0, 11.0, -13.0  # mean log-ratio beyond 10 (A < 0, A > 0)
    old = old - shift
    cfg = PRESETS["gspo"]
    assert cfg.max_log_ratio == 10.0
    want, seq = verl_gspo(old, logp, adv, mask, 3e-4, 4e-4)
    assert float(seq[0].detach()) > 10 and float(seq[1].detach()) > 10
    out = compute_loss(cfg, logp, old, adv, mask)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad(out.loss, logp), grad(want, logp), rtol=1e-10, atol=1e-12)
    free = compute_loss(dataclasses.replace(cfg, max_log_ratio=None), logp, old, adv, mask)
    assert not torch.allclose(free.loss, want)  # row 0 (A < 0, log s > 10) differs unclamped


# --- oat's sequence_w_clip ----------------------------------------------------------------------


def oat_sequence_w_clip(old, logp, adv, mask, eps, p):
    """``critic_type_modify == "sequence_w_clip"`` of ``train_zero_math_holder.py``."""
    m = mask.to(logp.dtype)
    raw = logp - old
    delta = math.log(1.0 + eps)
    lr = torch.clamp(raw, -delta, delta)
    n = m.sum(-1, keepdim=True)
    if abs(p) < 1e-6:
        ratio = torch.exp((lr * m).sum(-1, keepdim=True) / (n + 1e-8)).squeeze(-1)
    else:
        ratio = ((torch.exp(p * lr) * m).sum(-1, keepdim=True) / (n + 1e-8)) ** (1.0 / p)
        ratio = ratio.squeeze(-1)
    loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - eps, 1.0 + eps)).mean()
    frac = ((raw != lr).to(m.dtype) * m).sum() / (m.sum() + 1e-8)
    return loss, frac


@pytest.mark.parametrize("p", [-1.0, 0.0, 0.5, 2.0])
def test_token_clip_is_oat_sequence_w_clip(p) -> None:
    logp, old, adv, mask = rows(3, scale=0.5)
    cfg = LossConfig(p=p, level="sequence", aggregation="seq_mean", token_clip=0.2)
    want, frac = oat_sequence_w_clip(old, logp, adv, mask, 0.2, p)
    out = compute_loss(cfg, logp, old, adv, mask)
    assert 0.1 < float(frac) < 0.9  # the token clip is exercised
    torch.testing.assert_close(out.loss, want, rtol=1e-7, atol=1e-9)  # oat's +1e-8 on lengths
    torch.testing.assert_close(grad(out.loss, logp), grad(want, logp), rtol=1e-6, atol=1e-9)
    assert out.metrics["loss/token_clip_frac"] == pytest.approx(float(frac), rel=1e-7)
    plain = compute_loss(dataclasses.replace(cfg, token_clip=None), logp, old, adv, mask)
    assert not torch.allclose(plain.loss, want)


def test_token_clip_needs_the_sequence_level() -> None:
    with pytest.raises(ValueError, match="level='sequence'"):
        LossConfig(level="token", token_clip=0.2)


# --- verl's seq-mean-token-sum-norm -------------------------------------------------------------


def verl_token_loss_sum_norm(old, logp, adv, mask, eps, c, scale):
    """``compute_policy_loss`` (dual clip) aggregated with ``seq-mean-token-sum-norm``."""
    ratio = torch.exp(logp - old)
    a = adv[:, None].expand_as(ratio)
    clip1 = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps, 1 + eps))
    losses = torch.where(a < 0, torch.minimum(-a * c, clip1), clip1)
    return (losses * mask.to(losses.dtype)).sum(-1).sum() / scale


def test_seq_sum_norm_is_verl_seq_mean_token_sum_norm() -> None:
    logp, old, adv, mask = rows(4, scale=0.8)
    cfg = LossConfig(
        p=1.0, level="token", aggregation="seq_sum_norm", norm_length=T, clip_ratio_c=3.0
    )
    want = verl_token_loss_sum_norm(old, logp, adv, mask, 0.2, 3.0, T)  # loss_scale_factor = T
    out = compute_loss(cfg, logp, old, adv, mask)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad(out.loss, logp), grad(want, logp), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("aggregation", "reg"),
    [
        ("seq_sum_norm", None),
        ("seq_sum_norm", "token_mean"),
        ("token_mean", "seq_sum_norm"),
        ("seq_mean", "seq_sum_norm"),
    ],
)
def test_seq_sum_norm_micro_batches_add_up(aggregation, reg) -> None:
    """A fixed divisor: each micro-batch loss weighs 1 (loss_weight), the KL/entropy carry the
    ratio of the weights (accumulation_reg_scale); the sum is the whole batch's loss."""
    logp, old, adv, mask = rows(5, scale=0.6)
    g = torch.Generator().manual_seed(9)
    ref = old + torch.randn(B, T, generator=g, dtype=old.dtype)
    entropy = torch.rand(B, T, generator=g, dtype=old.dtype).requires_grad_(True)
    cfg = LossConfig(
        p=0.5,
        aggregation=aggregation,
        reg_aggregation=reg,
        norm_length=11,
        kl_coef=0.05,
        entropy_coef=0.01,
    )
    full = compute_loss(cfg, logp, old, adv, mask, ref_logp=ref, entropy=entropy)
    total, total_reg = loss_units(mask, cfg), reg_units(mask, cfg)
    summed = torch.zeros((), dtype=old.dtype)
    kl = 0.0
    for s in (slice(0, 2), slice(2, 3), slice(3, B)):
        weight = loss_weight(mask[s], cfg, total)
        if aggregation == "seq_sum_norm":
            assert weight == 1.0
        scale = accumulation_reg_scale(mask[s], cfg, total, total_reg)
        part = compute_loss(
            cfg, logp[s], old[s], adv[s], mask[s], ref_logp=ref[s], entropy=entropy[s],
            reg_scale=scale,
        )  # fmt: skip
        summed = summed + part.loss * weight
        kl += part.metrics["loss/kl"] * weight
    torch.testing.assert_close(summed, full.loss, rtol=1e-12, atol=1e-12)
    for x in (logp, entropy):
        torch.testing.assert_close(grad(summed, x), grad(full.loss, x), rtol=1e-10, atol=1e-13)
    assert kl == pytest.approx(full.metrics["loss/kl"], rel=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aggregation": "seq_sum_norm"}, "norm_length"),
        ({"max_log_ratio": 0.0}, "max_log_ratio must be"),
        ({"max_log_ratio": math.inf}, "max_log_ratio must be"),
        ({"token_clip": -0.1}, "token_clip must be"),
    ],
)
def test_bad_new_options_name_the_field(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)
