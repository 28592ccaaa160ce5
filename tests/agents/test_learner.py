"""The learner on a real (tiny) transformers model: accumulation, old log-probs, KL, updates."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from agents.generation.models import load_policy_model
from agents.training.learner import Learner, LearnerConfig, token_logprobs
from agents.types import Step, collate
from holderpo.loss import PRESETS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = load_policy_model(
        "tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache")
    )
    return model, tokenizer


def _steps(tokenizer, n: int, seed: int) -> tuple[list[Step], list[float]]:
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    steps, advs = [], []
    for i in range(n):
        prompt = torch.randint(3, vocab, (5 + i % 3,), generator=g).tolist()
        response = torch.randint(3, vocab, (2 + (i * 5) % 7,), generator=g).tolist()
        logprobs = (-torch.rand(len(response), generator=g) * 3 - 3).tolist()
        steps.append(
            Step(
                prompt_ids=tuple(prompt),
                response_ids=tuple(response),
                logprobs=tuple(logprobs),
                response_text="",
                action="",
                action_valid=True,
                reward=0.0,
                terminated=True,
                truncated=False,
                anchor=i,
            )
        )
        advs.append(float(torch.randn((), generator=g)))
    return steps, advs


def _gradient(model, batch, loss_cfg, *, micro: int, p: float) -> dict[str, torch.Tensor]:
    """The mini-batch gradient the learner accumulated (lr 0 keeps the weights), in float64."""
    model = copy.deepcopy(model).double()
    cfg = LearnerConfig(mini_batch_size=len(batch), micro_batch_size=micro, lr=0.0, grad_clip=0.0)
    Learner(model, loss_cfg, cfg).update(batch, p=p)
    return {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize(
    ("preset", "aggregation"),
    [
        ("holderpo", None),
        ("grpo", None),
        ("dr_grpo", None),
        ("gmpo", None),
        ("grpo", "seq_sum_norm"),  # a fixed divisor: every micro-batch loss weighs 1
        ("holderpo", "seq_sum_norm"),
    ],
)
def test_micro_batch_accumulation_equals_full_batch(tiny, preset: str, aggregation) -> None:
    model, tokenizer = tiny
    steps, advs = _steps(tokenizer, 8, seed=1)
    batch = collate(steps, advs, pad_id=tokenizer.pad_token_id)
    loss_cfg = dataclasses.replace(PRESETS[preset], norm_length=16)
    if aggregation is not None:
        loss_cfg = dataclasses.replace(loss_cfg, aggregation=aggregation)
    full = _gradient(model, batch, loss_cfg, micro=8, p=1.5)
    accumulated = _gradient(model, batch, loss_cfg, micro=2, p=1.5)
    for key, value in full.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-7, atol=1e-10)
    assert sum(float(g.abs().sum()) for g in full.values()) > 0


def test_old_logprobs_are_recomputed_so_first_ratios_are_one(tiny) -> None:
    model, tokenizer = tiny
    steps, advs = _steps(tokenizer, 4, seed=2)
    batch = collate(steps, advs, pad_id=tokenizer.pad_token_id)
    learner = Learner(
        copy.deepcopy(model),
        PRESETS["holderpo"],
        LearnerConfig(mini_batch_size=4, micro_batch_size=4, lr=0.0),
    )
    recomputed = learner.recompute_old_logprobs(batch)
    with torch.no_grad():
        direct, _ = token_logprobs(learner.model, batch)
    torch.testing.assert_close(recomputed.old_logprobs, direct * batch.loss_mask)
    metrics = learner.update(batch, p=2.0)  # lr 0: ratios stay exactly 1
    assert metrics["loss/generator_drift"] > 0.1  # the random "generator" log-probs were replaced
    assert metrics["loss/clip_frac"] == 0.0
    assert metrics["holder/M_mean"] == pytest.approx(1.0, abs=1e-5)


def test_kl_reference_is_frozen_and_penalty_reported(tiny) -> None:
    model, tokenizer = tiny
    steps, advs = _steps(tokenizer, 4, seed=3)
    batch = collate(steps, advs, pad_id=tokenizer.pad_token_id)
    loss_cfg = dataclasses.replace(PRESETS["holderpo"], kl_coef=0.1)
    learner = Learner(
        copy.deepcopy(model),
        loss_cfg,
        LearnerConfig(mini_batch_size=2, micro_batch_size=2, lr=1e-2),
    )
    assert learner.reference is not None
    ref_before = {k: v.clone() for k, v in learner.reference.state_dict().items()}
    first = learner.update(batch, p=1.0)
    second = learner.update(batch, p=1.0)
    assert first["loss/kl"] >= 0.0
    assert second["loss/kl"] > 0.0  # the policy moved away from the frozen reference
    for key, value in learner.reference.state_dict().items():
        assert torch.equal(value, ref_before[key])


def test_bad_micro_batch_size_names_the_fix() -> None:
    with pytest.raises(ValueError, match="multiple of trainer.micro_batch_size"):
        LearnerConfig(mini_batch_size=6, micro_batch_size=4)


@pytest.mark.numerics
def test_response_span_logprobs_equal_a_full_forward(tiny) -> None:
    model, tokenizer = tiny
    steps, advs = _steps(tokenizer, 5, seed=4)
    batch = collate(steps, advs, pad_id=tokenizer.pad_token_id)
    logp, entropy = token_logprobs(model, batch, with_entropy=True)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = torch.log_softmax(logits[:, :-1].float(), -1)  # [N, L-1, V]
    want = torch.gather(full, 2, batch.input_ids[:, 1:, None]).squeeze(-1)  # [N, L-1]
    want_entropy = -(full.exp() * full).sum(-1)
    mask = batch.loss_mask[:, 1:].bool()
    torch.testing.assert_close(logp[:, 1:][mask], want[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[:, 1:][mask], want_entropy[mask], rtol=1e-5, atol=1e-5)
    empty = dataclasses.replace(batch, loss_mask=torch.zeros_like(batch.loss_mask))
    assert token_logprobs(model, empty)[0].shape == batch.input_ids.shape


# every preset, with the aggregation each uses and the others (the constant length set)
AGGREGATIONS = ("seq_mean", "token_mean", "seq_sum_const", "seq_sum_norm")


def _mixed_batch(tokenizer, zero: tuple[int, ...], seed: int = 5):
    steps, advs = _steps(tokenizer, 8, seed=seed)
    advs = [0.0 if i in zero else a for i, a in enumerate(advs)]
    return collate(steps, advs, pad_id=tokenizer.pad_token_id)


def _run(model, batch, loss_cfg, **cfg):
    """float64 copy of ``model`` after one update; returns (model, metrics, forward count)."""
    model = copy.deepcopy(model).double()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    defaults = {"mini_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "grad_clip": 0.0}
    learner = Learner(model, loss_cfg, LearnerConfig(**{**defaults, **cfg}))
    metrics = learner.update(batch, p=1.5)
    return model, metrics, len(calls), learner


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_skipping_zero_advantage_rows_keeps_the_gradient(tiny, preset: str, aggregation) -> None:
    model, tokenizer = tiny
    batch = _mixed_batch(tokenizer, zero=(0, 3, 4, 6))
    loss_cfg = dataclasses.replace(PRESETS[preset], aggregation=aggregation, norm_length=16)
    full, full_m, full_calls, _ = _run(model, batch, loss_cfg, skip_zero_rows=False)
    skip, skip_m, skip_calls, _ = _run(model, batch, loss_cfg)
    want, got = _grads(full), _grads(skip)
    assert want.keys() == got.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-9, msg=key)
    assert sum(float(g.abs().sum()) for g in want.values()) > 0
    assert skip_calls < full_calls  # 4 live rows in 2 micro-batches instead of 4
    assert skip_m["loss/rows_skipped_frac"] == pytest.approx(0.5)
    assert full_m["loss/rows_skipped_frac"] == 0.0
    for key in ("loss/total", "loss/policy", "loss/clip_frac"):
        assert skip_m[key] == pytest.approx(full_m[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_zero_rows_are_computed_when_kl_or_entropy_is_on(tiny, preset: str) -> None:
    model, tokenizer = tiny
    batch = _mixed_batch(tokenizer, zero=(0, 3, 4, 6))
    loss_cfg = dataclasses.replace(PRESETS[preset], entropy_coef=0.01, norm_length=16)
    _, metrics, _, _ = _run(model, batch, loss_cfg)
    assert metrics["loss/rows_skipped_frac"] == 0.0


def test_all_zero_batch_runs_no_forward_and_no_optimizer_step(tiny) -> None:
    model, tokenizer = tiny
    batch = _mixed_batch(tokenizer, zero=tuple(range(8)))
    before = {k: v.clone() for k, v in copy.deepcopy(model).double().state_dict().items()}
    after, metrics, calls, learner = _run(model, batch, PRESETS["holderpo"])
    assert calls == 0
    assert learner.optimizer.state_dict()["state"] == {}  # AdamW never stepped
    assert learner.scheduler.last_epoch == 0
    for key, value in after.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert metrics["loss/rows_skipped_frac"] == 1.0
    assert metrics["loss/optimizer_steps"] == 0.0
    assert metrics["loss/total"] == 0.0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_single_update_old_logprobs_from_the_forward_equal_the_recompute(tiny, preset) -> None:
    model, tokenizer = tiny
    batch = _mixed_batch(tokenizer, zero=(2,))
    loss_cfg = dataclasses.replace(PRESETS[preset], norm_length=16)
    recomputed, rec_m, rec_calls, _ = _run(model, batch, loss_cfg, reuse_single_update=False)
    reused, reu_m, reu_calls, _ = _run(model, batch, loss_cfg)
    want, got = _grads(recomputed), _grads(reused)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-9, msg=key)
    for key in ("loss/total", "loss/policy", "loss/generator_drift", "holder/M_mean"):
        assert reu_m[key] == pytest.approx(rec_m[key], rel=1e-6, abs=1e-9), key
    assert reu_calls == rec_calls // 2  # one forward per micro-batch instead of two
    for key, value in recomputed.state_dict().items():
        torch.testing.assert_close(reused.state_dict()[key], value, rtol=1e-6, atol=1e-9)


def test_several_updates_recompute_and_generator_source_uses_the_given_logprobs(tiny) -> None:
    model, tokenizer = tiny
    batch = _mixed_batch(tokenizer, zero=())
    loss_cfg = PRESETS["holderpo"]
    two = {"mini_batch_size": 4, "lr": 0.0}  # two optimizer steps; lr 0 keeps π_θ = π_old
    _, rec, rec_calls, _ = _run(model, batch, loss_cfg, **two)
    _, gen, gen_calls, _ = _run(model, batch, loss_cfg, **two, old_logprobs="generator")
    assert rec_calls == gen_calls + 4  # recompute: 4 extra no-grad forwards before the updates
    assert rec["holder/M_mean"] == pytest.approx(1.0, abs=1e-9)  # recomputed: ratios are 1
    # the "generator" log-probs of _steps are random: the ratios are far from 1 and drift large
    assert gen["loss/generator_drift"] > 0.1
    assert abs(gen["holder/M_mean"] - 1.0) > 0.1
    with pytest.raises(ValueError, match="trainer.old_logprobs"):
        LearnerConfig(old_logprobs="vllm")


def test_optimizer_steps_count_every_mini_batch_step(tiny) -> None:
    model, tokenizer = tiny
    batch = _mixed_batch(tokenizer, zero=())  # 8 rows, every one movable
    _, one, _, _ = _run(model, batch, PRESETS["holderpo"])
    _, four, _, learner = _run(model, batch, PRESETS["holderpo"], mini_batch_size=4, ppo_epochs=2)
    assert one["loss/optimizer_steps"] == 1.0
    assert four["loss/optimizer_steps"] == 4.0 == learner.scheduler.last_epoch


def test_temperature_scaled_logprobs_match_the_generator(tiny) -> None:
    from agents.generation.hf import HFPolicy
    from agents.types import SamplingParams

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    policy = HFPolicy(model, tokenizer, seed=0)
    prompts = [[{"role": "user", "content": f"go to shelf {i}"}] for i in range(4)]
    gens = policy.generate(prompts, SamplingParams(temperature=2.0, max_new_tokens=6))
    steps = [
        Step(g.prompt_ids, g.response_ids, g.logprobs, g.text, "", True, 0.0, True, False, i)
        for i, g in enumerate(gens)
    ]
    batch = collate(steps, [1.0, -1.0, 0.5, -0.5], pad_id=policy.pad_id)
    cfg = LearnerConfig(mini_batch_size=4, micro_batch_size=4, lr=0.0, old_logprobs="generator")
    at_t = Learner(model, PRESETS["holderpo"], cfg, temperature=2.0).update(batch, p=1.0)
    at_one = Learner(model, PRESETS["holderpo"], cfg).update(batch, p=1.0)
    assert at_t["loss/generator_drift"] < 1e-4  # float noise: the learner sees what was sampled
    assert at_t["holder/M_mean"] == pytest.approx(1.0, abs=1e-4)
    assert at_one["loss/generator_drift"] > 1e-2  # T = 1 log-probs are another distribution


def _state(learner: Learner) -> dict[str, torch.Tensor]:
    """Every weight and AdamW moment/step of ``learner`` (copies)."""
    out = {f"w/{k}": v.clone() for k, v in learner.model.state_dict().items()}
    for i, st in learner.optimizer.state_dict()["state"].items():
        out.update({f"opt/{i}/{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    return out


def test_a_non_finite_gradient_skips_the_step_and_leaves_weights_and_optimizer_alone(tiny) -> None:
    """As verl's dp_actor: a step whose gradient norm is not finite is skipped and counted; the
    learning-rate schedule advances as if it had stepped (verl steps it once per update)."""
    model, tokenizer = tiny
    batch = _mixed_batch(tokenizer, zero=())
    cfg = LearnerConfig(mini_batch_size=8, micro_batch_size=4, lr=1e-3, warmup_steps=4)
    learner = Learner(copy.deepcopy(model), PRESETS["holderpo"], cfg)
    first = learner.update(batch, p=1.0)  # a finite step: AdamW has moments now
    assert (first["loss/optimizer_steps"], first["loss/skipped_steps"]) == (1.0, 0.0)
    before, lr_before = _state(learner), learner.scheduler.get_last_lr()[0]
    param = next(p for p in learner.model.parameters() if p.requires_grad)
    hook = param.register_hook(lambda g: torch.full_like(g, float("nan")))
    second = learner.update(batch, p=1.0)
    hook.remove()
    assert second["loss/skipped_steps"] == 1.0 and second["loss/optimizer_steps"] == 0.0
    assert not math.isfinite(second["loss/grad_norm"])
    after = _state(learner)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # bit for bit: no step, no decay, no moment
    assert all(p.grad is None for p in learner.model.parameters())  # the bad gradient is gone
    assert learner.scheduler.last_epoch == 2  # the warm-up advanced past the skipped step
    assert learner.scheduler.get_last_lr()[0] == pytest.approx(lr_before * 3 / 2)
    third = learner.update(batch, p=1.0)
    assert third["loss/optimizer_steps"] == 1.0 and math.isfinite(third["loss/grad_norm"])

    unguarded = Learner(
        copy.deepcopy(model),
        PRESETS["holderpo"],
        dataclasses.replace(cfg, skip_nonfinite_grad=False),
    )
    param = next(p for p in unguarded.model.parameters() if p.requires_grad)
    param.register_hook(lambda g: torch.full_like(g, float("nan")))
    unguarded.update(batch, p=1.0)
    assert not torch.isfinite(param.detach()).all()  # without the guard the weights are lost


def test_the_built_case_row_adds_no_gradient_as_in_the_official_code(tiny) -> None:
    """A < 0 and log M = 100 in float32 (π_old 100 nats below π_θ on every token of a row): the
    row's objective saturates, its gradient is 0 (the official safe exponential), and the update
    equals the one where that row has advantage 0 (same normaliser, no term)."""
    model, tokenizer = tiny
    steps, advs = _steps(tokenizer, 4, seed=11)
    advs[0] = -0.5
    batch = collate(steps, advs, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch)
    old = torch.where(torch.arange(4)[:, None] == 0, logp - 100.0, logp) * batch.loss_mask
    built = dataclasses.replace(batch, old_logprobs=old)
    zeroed = dataclasses.replace(built, advantages=torch.tensor([0.0, *advs[1:]]))
    cfg = LearnerConfig(
        mini_batch_size=4,
        micro_batch_size=2,
        lr=1e-3,
        old_logprobs="generator",
        skip_zero_rows=False,  # the same micro-batches on both sides
    )
    ours = Learner(copy.deepcopy(model), PRESETS["holderpo"], cfg)
    metrics = ours.update(built, p=2.0)
    assert metrics["loss/skipped_steps"] == 0.0 and math.isfinite(metrics["loss/grad_norm"])
    assert metrics["holder/ratio_max"] > 1e40  # the built ratio is there
    reference = Learner(copy.deepcopy(model), PRESETS["holderpo"], cfg)
    ref_metrics = reference.update(zeroed, p=2.0)
    assert metrics["loss/grad_norm"] == pytest.approx(ref_metrics["loss/grad_norm"], rel=1e-6)
    for (name, param), ref in zip(
        ours.model.named_parameters(), reference.model.parameters(), strict=True
    ):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(param.detach(), ref.detach(), rtol=1e-6, atol=1e-8, msg=name)


def test_adam_betas_reach_the_optimizer_as_adamw_with_those_betas() -> None:
    """Two AdamW steps on fixed gradients against the written-out update (β1 = 0.9, β2 = 0.95)."""
    from agents.training.learner import build_optimizer

    net = torch.nn.Linear(3, 1, bias=False).double()
    w0 = net.weight.detach().clone()
    lr, wd, (b1, b2), eps = 0.1, 0.01, (0.9, 0.95), 1e-8
    cfg = LearnerConfig(lr=lr, weight_decay=wd, adam_betas=(b1, b2))
    optimizer, _ = build_optimizer(net, cfg)
    assert optimizer.param_groups[0]["betas"] == (b1, b2)
    grads = torch.tensor([[[1.0, -2.0, 0.5]], [[-0.5, 1.0, 3.0]]], dtype=torch.float64)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        net.weight.grad = g.clone()
        optimizer.step()
        w = w * (1 - lr * wd)  # decoupled weight decay
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(net.weight.detach(), w, rtol=1e-12, atol=1e-14)
    torch_default = build_optimizer(torch.nn.Linear(3, 1), LearnerConfig())[0]
    assert torch_default.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 1.0), (-0.1, 0.9), ("a", 0.9)])
def test_bad_adam_betas_name_the_key(betas) -> None:
    with pytest.raises(ValueError, match="trainer.adam_betas"):
        LearnerConfig(adam_betas=betas)  # type: ignore[arg-type]
