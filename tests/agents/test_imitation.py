"""Behaviour cloning (:meth:`Learner.imitate`) and the guided-rollout anneal (``guided_at``).

The warm start's loss is written out by hand here: the mean over response tokens of
``-log softmax(logits / T)[token]``, on a real (tiny) transformers model.
"""

from __future__ import annotations

import copy

import pytest
import torch

from agents.config import ConfigError, RolloutSection
from agents.generation.models import load_policy_model
from agents.training.learner import Learner, LearnerConfig
from agents.types import collate
from holderpo.loss import PRESETS
from tests.agents.test_learner import _steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return load_policy_model("tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))


def _hand_nll(model, batch, temperature: float) -> float:
    """Mean token NLL from one plain forward: logits at t-1 predict token t."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].double() / temperature, -1)
    token = logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]  # [B, L-1]
    mask = batch.loss_mask[:, 1:].double()
    return float(-(token * mask).sum() / mask.sum())


def test_imitation_minimises_the_token_nll_written_out(tiny) -> None:
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    steps, _ = _steps(tokenizer, 6, seed=3)
    batch = collate(steps, [0.0] * 6, pad_id=tokenizer.pad_token_id)  # advantages are ignored
    before = _hand_nll(model, batch, temperature=2.0)
    cfg = LearnerConfig(mini_batch_size=6, micro_batch_size=2, lr=1e-3)
    learner = Learner(model, PRESETS["holderpo"], cfg, temperature=2.0)
    metrics = learner.imitate(batch, epochs=5)
    # one mini-batch per epoch: the first epoch's loss is the NLL before any step
    assert metrics["bc/loss_first"] == pytest.approx(before, rel=1e-5)
    after = _hand_nll(model, batch, temperature=2.0)
    assert after < 0.8 * before and metrics["bc/loss"] < metrics["bc/loss_first"]
    assert metrics["bc/optimizer_steps"] == 5.0 and metrics["bc/rows"] == 6.0
    assert metrics["bc/tokens"] == float(batch.loss_mask.sum())
    with pytest.raises(ValueError, match="epochs"):
        learner.imitate(batch, epochs=0)


def test_micro_batches_accumulate_the_mini_batch_nll_gradient(tiny) -> None:
    model, tokenizer = tiny
    steps, _ = _steps(tokenizer, 8, seed=4)
    batch = collate(steps, [1.0] * 8, pad_id=tokenizer.pad_token_id)
    grads = []
    for micro in (8, 2):
        m = copy.deepcopy(model).double()
        cfg = LearnerConfig(mini_batch_size=8, micro_batch_size=micro, lr=0.0, grad_clip=0.0)
        Learner(m, PRESETS["holderpo"], cfg).imitate(batch, epochs=1)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, full in grads[0].items():
        torch.testing.assert_close(grads[1][name], full, rtol=1e-7, atol=1e-10)


def test_the_warm_start_steps_at_its_own_rate_and_the_updates_after_it_at_lr(tiny) -> None:
    model, tokenizer = tiny
    steps, advs = _steps(tokenizer, 4, seed=5)
    batch = collate(steps, advs, pad_id=tokenizer.pad_token_id)
    plain_sgd = dict(mini_batch_size=4, micro_batch_size=4, grad_clip=0.0, warmup_steps=4)
    moved = {}
    for lr, bc_lr in ((1e-3, 1e-2), (1e-2, None)):  # the second takes 1e-2 from its lr
        m = copy.deepcopy(model).double()
        learner = Learner(m, PRESETS["holderpo"], LearnerConfig(lr=lr, **plain_sgd))
        start = {n: p.detach().clone() for n, p in m.named_parameters()}
        learner.imitate(batch, epochs=2, lr=bc_lr)
        moved[bc_lr] = {n: p.detach() - start[n] for n, p in m.named_parameters()}
        # the warm-up counts the two warm-start steps; the next update gets lr at step 3 of 4
        assert learner.scheduler.last_epoch == 2
        assert learner.scheduler.get_last_lr() == pytest.approx([lr * 3 / 4])
        assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 3 / 4)
        assert learner.update(batch, p=1.0)["loss/lr"] == pytest.approx(lr)  # warm-up done
    for name, delta in moved[None].items():  # the same steps as a run whose lr is bc_lr
        torch.testing.assert_close(moved[1e-2][name], delta, rtol=1e-9, atol=1e-12, msg=name)


def _rollout(**changes) -> RolloutSection:
    values = dict(
        num_groups=4, group_size=4, guided=1, guided_anneal=0.75, max_turns=4,
        history_window=1, temperature=1.0, top_p=1.0, max_new_tokens=16, constrained=True,
        backend="hf", vllm=None, generator_savings=True, pool="serial", num_workers=1,
        ray_address=None, step_timeout_s=60.0, worker_attempts=3, heartbeat_timeout_s=30.0,
    )  # fmt: skip
    return RolloutSection(**{**values, **changes})


def test_guided_rollouts_anneal_to_none_in_the_last_quarter() -> None:
    assert [_rollout().guided_at(i, 12) for i in range(12)] == [1] * 9 + [0] * 3
    two = _rollout(guided=2, guided_anneal=1.0)
    assert [two.guided_at(i, 4) for i in range(4)] == [2, 2, 1, 1]  # ceil(2 * (1 - i / 4))
    assert [_rollout(guided_anneal=None).guided_at(i, 5) for i in range(5)] == [1] * 5
    for bad in (0.0, 1.5, -0.25):
        with pytest.raises(ConfigError, match="rollout.guided_anneal"):
            _rollout(guided_anneal=bad)
