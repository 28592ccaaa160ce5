"""Chunked token log-probs: the same values and gradients as the unchunked path, less memory.

The reference is ``token_logprobs`` with ``chunk_tokens=0`` (the unchunked span path) and, in
float64, also a full forward written out here (all logits, ``log_softmax(logits / T)``, gather);
on the tiny random Llama, a tiny random Qwen2 and the tiny Llama under LoRA.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from agents.generation.models import load_policy_model
from agents.training.learner import LearnerConfig, token_logprobs
from agents.types import Batch, Step, collate
from tests.numerics import assert_close_in

pytestmark = pytest.mark.numerics  # float32 and float64 sums in two orders (tests/numerics.py)

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, tokenizer = load_policy_model(
        "tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache")
    )
    return model, tokenizer


def _batch(vocab: int, pad_id: int, n: int = 5, seed: int = 3) -> Batch:
    """Rows of different prompt and response lengths, a hole in two rows' loss masks (the
    observation between two turns) and one row with no response token."""
    g = torch.Generator().manual_seed(seed)
    steps, advs = [], []
    for i in range(n):
        prompt = torch.randint(4, vocab, (4 + 3 * i % 5,), generator=g).tolist()
        response = torch.randint(4, vocab, (3 + (i * 5) % 9,), generator=g).tolist()
        steps.append(
            Step(
                prompt_ids=tuple(prompt),
                response_ids=tuple(response),
                logprobs=tuple([-1.0] * len(response)),
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
    batch = collate(steps, advs, pad_id=pad_id)
    mask = batch.loss_mask.clone()
    for row in (1, 3):
        on = mask[row].nonzero().flatten()
        mask[row, on[1:3]] = 0.0  # ragged: a gap inside the response
    mask[2] = 0.0  # a row with no response token
    return dataclasses.replace(batch, loss_mask=mask)


def _full_forward(model: nn.Module, batch: Batch, temperature: float):
    """Log-probs and entropies [N, L] from every position's logits, written out."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1]
    if logits.dtype == torch.bfloat16:
        logits = logits.float()
    full = torch.log_softmax(logits / temperature, -1)  # [N, L-1, V]
    logp = torch.gather(full, 2, batch.input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(full.exp() * full).sum(-1)
    pad = logp.new_zeros(len(batch), 1)
    return torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)


def _values_and_grads(model: nn.Module, batch: Batch, how: int | str):
    """(logp, entropy) on the loss mask and d(Σ w·logp + Σ v·entropy)/dθ for trainable θ."""
    model.zero_grad(set_to_none=True)
    if how == "full":
        logp, entropy = _full_forward(model, batch, TEMPERATURE)
    else:
        logp, entropy = token_logprobs(
            model, batch, temperature=TEMPERATURE, with_entropy=True, chunk_tokens=int(how)
        )
    assert entropy is not None
    g = torch.Generator().manual_seed(0)
    w = torch.randn(batch.loss_mask.shape, generator=g).to(logp.dtype)
    v = torch.randn(batch.loss_mask.shape, generator=g).to(logp.dtype)
    mask = batch.loss_mask.bool()
    ((logp * w)[mask].sum() + (entropy * v)[mask].sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp[mask].detach(), entropy[mask].detach(), grads


def _assert_same(got, want, atol: float) -> None:
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=0.0, atol=atol)
    assert got[2].keys() == want[2].keys() and got[2]
    for name in want[2]:
        torch.testing.assert_close(
            got[2][name].double(), want[2][name].double(), rtol=0.0, atol=atol, msg=name
        )


@pytest.mark.parametrize("chunk", [1, 4, 8, 10_000])
def test_chunked_equals_unchunked_and_full_forward_in_float64(tiny, chunk: int) -> None:
    model, tokenizer = tiny
    model = copy.deepcopy(model).double()
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    tokens = int(batch.loss_mask[:, 1:].sum())
    assert tokens == 21  # 4 and 8 do not divide it: the last chunk is short
    got = _values_and_grads(model, batch, chunk)
    _assert_same(got, _values_and_grads(model, batch, 0), atol=1e-6)
    _assert_same(got, _values_and_grads(model, batch, "full"), atol=1e-6)


def _assert_same_in_bfloat16(got, want, truth) -> None:
    """Values and every gradient but the head's to 1e-4; the head's gradient, a bfloat16 sum of
    per-chunk products in the chunked path and one product unchunked, is as close to the float64
    truth as the unchunked one (both are about 2% off it; they differ by about 0.3%)."""
    head = "lm_head.weight"
    rest = {k: v for k, v in got[2].items() if k != head}
    _assert_same((*got[:2], rest), (*want[:2], {k: want[2][k] for k in rest}), atol=1e-4)
    exact = truth[2][head]
    err_got = (got[2][head].double() - exact).norm() / exact.norm()
    err_want = (want[2][head].double() - exact).norm() / exact.norm()
    assert err_got <= 1.1 * err_want + 1e-3, (float(err_got), float(err_want))
    assert (got[2][head] - want[2][head]).double().norm() / exact.norm() < 1e-2


def test_chunked_equals_unchunked_in_bfloat16(tiny) -> None:
    model, tokenizer = tiny
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    truth = _values_and_grads(copy.deepcopy(model).double(), batch, 0)
    model = copy.deepcopy(model).to(torch.bfloat16)
    got = _values_and_grads(model, batch, 5)
    assert got[0].dtype == torch.float32  # the log-softmax runs in float32
    _assert_same_in_bfloat16(got, _values_and_grads(model, batch, 0), truth)


def test_chunked_equals_unchunked_under_bfloat16_autocast(tiny) -> None:
    model, tokenizer = tiny
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    truth = _values_and_grads(copy.deepcopy(model).double(), batch, 0)
    model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _values_and_grads(model, batch, 6)
        want = _values_and_grads(model, batch, 0)
    _assert_same_in_bfloat16(got, want, truth)


def test_zero_outside_the_loss_mask_and_without_entropy(tiny) -> None:
    model, tokenizer = tiny
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, temperature=TEMPERATURE, chunk_tokens=3)
        want, _ = token_logprobs(model, batch, temperature=TEMPERATURE, chunk_tokens=0)
    assert entropy is None
    mask = batch.loss_mask.bool()
    assert logp.shape == batch.input_ids.shape
    assert torch.all(logp[~mask] == 0) and torch.all(logp[mask] < 0)
    # float32, chunked and unchunked matmuls: equal to a few ulps at the log-probs' magnitude
    assert_close_in(torch.float32, logp[mask], want[mask])


def test_a_batch_with_no_response_token_still_has_a_gradient_path(tiny) -> None:
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    empty = dataclasses.replace(batch, loss_mask=torch.zeros_like(batch.loss_mask))
    logp, entropy = token_logprobs(model, empty, with_entropy=True, chunk_tokens=4)
    assert entropy is not None and logp.shape == entropy.shape == batch.input_ids.shape
    assert torch.all(logp == 0) and torch.all(entropy == 0)
    assert logp.requires_grad  # the learner backpropagates an empty micro-batch's zero loss
    ((logp * empty.loss_mask).sum() + entropy.sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.all(g == 0) for g in grads)


def test_chunks_keep_no_vocabulary_wide_tensor_for_the_backward(tiny) -> None:
    model, tokenizer = tiny
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    vocab = model.config.vocab_size
    widest = {}
    for chunk in (8, 0):
        rows: list[int] = []

        def pack(t: torch.Tensor, rows=rows) -> torch.Tensor:
            if t.dim() and t.shape[-1] == vocab:
                rows.append(t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_logprobs(model, batch, with_entropy=True, chunk_tokens=chunk)
        widest[chunk] = max(rows, default=0)
    assert widest[8] == 0  # a chunk's [chunk, V] tensors are recomputed in the backward
    assert widest[0] >= int(batch.loss_mask[:, 1:].sum())  # the unchunked path keeps [N, K, V]


def test_qwen2_chunked_equals_unchunked() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).double()
    batch = _batch(512, 0, seed=7)
    _assert_same(_values_and_grads(model, batch, 4), _values_and_grads(model, batch, 0), atol=1e-6)


def test_lora_chunked_equals_unchunked(tiny) -> None:
    pytest.importorskip("peft")
    from agents.training.lora import LoraSettings, apply_lora
    from agents.training.reference import adapter_disabled_logprobs

    model, tokenizer = tiny
    lora = apply_lora(copy.deepcopy(model).double(), LoraSettings(r=4, alpha=8.0))
    with torch.no_grad():  # non-zero B, so the adapters change the log-probs
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    got = _values_and_grads(lora, batch, 3)
    assert all("lora_" in name for name in got[2])
    _assert_same(got, _values_and_grads(lora, batch, 0), atol=1e-6)
    base = adapter_disabled_logprobs(lora)(batch, TEMPERATURE)  # the default (chunked) path
    with torch.no_grad():
        want, _ = token_logprobs(model.double(), batch, temperature=TEMPERATURE, chunk_tokens=0)
    mask = batch.loss_mask.bool()
    torch.testing.assert_close(base[mask], want[mask], rtol=0.0, atol=1e-6)
    assert not torch.allclose(got[0], base[mask])  # the adapters are on in the chunked forward


class _SoftCapped(nn.Module):
    """A causal LM whose forward changes its head's output (a logit soft-cap, as Gemma 2)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner: Any = inner

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):  # noqa: ANN003, ANN201 - a transformers-style forward
        out = self.inner(**kwargs)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out


def test_a_model_that_changes_the_head_output_falls_back_to_unchunked(tiny) -> None:
    model, tokenizer = tiny
    capped = _SoftCapped(copy.deepcopy(model).double())
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    with pytest.warns(UserWarning, match="computed unchunked"):
        got = _values_and_grads(capped, batch, 4)
    _assert_same(got, _values_and_grads(capped, batch, 0), atol=1e-12)
    assert capped.inner.get_output_embeddings().__dict__.get("forward") is None  # restored


def test_the_learner_passes_its_chunk_size_and_gets_the_same_update(tiny) -> None:
    from agents.training.learner import Learner
    from holderpo.loss import PRESETS

    model, tokenizer = tiny
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    loss_cfg = dataclasses.replace(PRESETS["holderpo"], entropy_coef=0.01)
    vocab = model.config.vocab_size
    grads, widest = {}, {}
    for chunk in (3, 0):
        trained = copy.deepcopy(model).double()
        cfg = LearnerConfig(
            mini_batch_size=len(batch), micro_batch_size=len(batch), lr=0.0, grad_clip=0.0,
            logprob_chunk_tokens=chunk,
        )  # fmt: skip
        rows: list[int] = []

        def pack(t: torch.Tensor, rows=rows) -> torch.Tensor:
            if t.dim() and t.shape[-1] == vocab:
                rows.append(t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            Learner(trained, loss_cfg, cfg, temperature=TEMPERATURE).update(batch, p=1.0)
        grads[chunk] = {n: p.grad for n, p in trained.named_parameters()}
        widest[chunk] = max(rows, default=0)
    assert widest == {3: 0, 0: widest[0]} and widest[0] > 3  # the knob reached token_logprobs
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[3][name], grad, rtol=0.0, atol=1e-6, msg=name)


def test_negative_chunk_size_names_the_key() -> None:
    with pytest.raises(ValueError, match="trainer.logprob_chunk_tokens"):
        LearnerConfig(logprob_chunk_tokens=-1)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_written_out_softmax_gradient_passes_gradcheck(with_entropy: bool, temperature: float):
    from agents.training.logprobs import _TokenLogprobEntropy

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(5, 11, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 11, (5,), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: _TokenLogprobEntropy.apply(z, targets, temperature, with_entropy), (logits,)
    )


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_linear_head_gradient_passes_gradcheck(with_entropy: bool, temperature: float):
    from agents.training.logprobs import _LinearHeadLogprobs

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    weight = (2 * torch.randn(11, 3, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(11, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 11, (5,), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w, b: _LinearHeadLogprobs.apply(h, targets, w, b, temperature, with_entropy),
        (hidden, weight, bias),
    )


class _WrappedHead(nn.Module):
    """An output head that is not a plain ``nn.Linear`` (its own forward around one)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


def test_a_head_that_is_not_a_plain_linear_is_chunked_under_a_checkpoint(tiny) -> None:
    from agents.training.logprobs import _output_head, _plain_linear

    model, tokenizer = tiny
    model = copy.deepcopy(model).double()
    batch = _batch(len(tokenizer), tokenizer.pad_token_id)
    want = _values_and_grads(model, batch, 4)  # the fused linear head
    assert _plain_linear(_output_head(model)) is not None
    model.lm_head = _WrappedHead(model.lm_head)
    assert _plain_linear(_output_head(model)) is None
    got = _values_and_grads(model, batch, 4)
    renamed = {k.replace("lm_head.linear.", "lm_head."): v for k, v in got[2].items()}
    _assert_same((*got[:2], renamed), want, atol=1e-10)
    _assert_same(got, _values_and_grads(model, batch, 0), atol=1e-6)
