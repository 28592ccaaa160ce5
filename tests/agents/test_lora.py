"""LoRA on the tiny model: adapter-only updates, the adapter-off KL reference, merged weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from agents.generation.models import load_policy_model
from agents.training.learner import Learner, LearnerConfig, token_logprobs
from agents.types import Batch, Step, collate
from holderpo.loss import PRESETS

pytest.importorskip("peft")

from agents.training.lora import (  # noqa: E402 - after the skip guard
    LoraSettings,
    apply_lora,
    merged_state_dict,
)
from agents.training.reference import adapter_disabled_logprobs  # noqa: E402

SETTINGS = LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _base(cache: Path) -> torch.nn.Module:
    model, _ = load_policy_model("tiny", device="cpu", dtype=torch.float64, cache_dir=cache)
    return model


def _batch(rows: int = 4) -> Batch:
    g = torch.Generator().manual_seed(7)
    steps, advs = [], []
    for i in range(rows):
        prompt = torch.randint(4, 600, (5,), generator=g).tolist()
        response = torch.randint(4, 600, (3 + i,), generator=g).tolist()
        logprobs = (-torch.rand(len(response), generator=g) * 3).tolist()
        steps.append(
            Step(tuple(prompt), tuple(response), tuple(logprobs), "", "", True, 0.0, True, False, i)
        )
        advs.append(float(torch.randn((), generator=g)))
    return collate(steps, advs, pad_id=0)


def _trained(cache: Path, kl_coef: float = 0.5) -> tuple[torch.nn.Module, Learner, dict]:
    """A LoRA model after two updates, its learner and the last update's metrics."""
    model = apply_lora(_base(cache), SETTINGS)
    loss = dataclasses.replace(PRESETS["holderpo"], kl_coef=kl_coef, kl_estimator="k1")
    cfg = LearnerConfig(mini_batch_size=4, micro_batch_size=2, lr=5e-2)
    learner = Learner(model, loss, cfg, reference_logprobs=adapter_disabled_logprobs(model))
    learner.update(_batch(), p=1.0)
    return model, learner, learner.update(_batch(), p=1.0)


def test_update_changes_only_adapters(cache: Path) -> None:
    base = _base(cache)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, learner, _ = _trained(cache)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    after = model.get_base_model().state_dict()
    for key, value in before.items():  # the frozen base weights (peft renames wrapped layers)
        wrapped = key.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(after.get(key, after.get(wrapped)), value, rtol=0, atol=0)
    changed = [k for k in after if ".lora_B" in k and float(after[k].abs().sum()) > 0]
    assert len(changed) == 2 * 3  # lora_B starts at 0; every targeted layer of both blocks moved
    assert learner.reference is None  # no frozen copy held


def test_disabled_adapter_reference_equals_base_model(cache: Path) -> None:
    model, _, metrics = _trained(cache)
    batch = _batch()
    with torch.no_grad():
        base_logp, _ = token_logprobs(_base(cache), batch)
        lora_logp, _ = token_logprobs(model, batch)
    torch.testing.assert_close(adapter_disabled_logprobs(model)(batch, 1.0), base_logp)
    mask = batch.loss_mask.bool()
    assert float((lora_logp - base_logp)[mask].abs().max()) > 1e-4  # the adapters matter
    assert metrics["loss/kl"] != 0.0  # the KL term sees the policy/base gap


def test_merged_state_dict_reproduces_peft_logits_in_a_plain_model(cache: Path) -> None:
    model, _, _ = _trained(cache, kl_coef=0.0)
    model.eval()
    adapters = {k: v.clone() for k, v in model.state_dict().items()}
    plain = _base(cache)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    batch = _batch()
    with torch.no_grad():
        want = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        base = _base(cache)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert float((want - base).abs().max()) > 1e-4
    for key, value in model.state_dict().items():  # merging left the training model alone
        assert torch.equal(value, adapters[key])


def test_settings_name_the_fix() -> None:
    with pytest.raises(ValueError, match="r >= 0"):
        LoraSettings(r=-1)
    with pytest.raises(ValueError, match="target_modules"):
        LoraSettings(target_modules=())
    with pytest.raises(ValueError, match="r=0"):
        apply_lora(torch.nn.Linear(2, 2), LoraSettings(r=0))
