"""VLLMPolicy against transformers on a tiny random Llama (needs the vllm extra; see .ci/vllm-env).

One engine serves the whole module (an engine start takes 10-30 s on CPU). vLLM's CPU attention
has kernels for head sizes 32, 64, ... only, so the tiny model is built with two heads of 32
(``TinyConfig(num_heads=2)``) instead of the default four heads of 16.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from agents.generation.hf import HFPolicy
from agents.generation.models import TinyConfig, build_tiny, load_policy_model
from agents.generation.vllm import VLLMPolicy
from agents.types import Policy, SamplingParams

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (build its environment with .ci/vllm-env)",
    ),
]

PROMPTS = [
    [{"role": "user", "content": "go to desk 1"}],
    [
        {"role": "system", "content": "You are in a room. Solve the task."},
        {"role": "user", "content": "What is 12 + 7? Put the answer in \\boxed{}."},
    ],
    [{"role": "user", "content": "open the fridge 1 please"}],
]

ACTIONS = ["go to desk 1", "go to desk 10", "open fridge 1", "take apple 1 from countertop 2"]

TOL = 1e-2
"""Log-prob tolerance between vLLM's CPU kernels and transformers (both float32)."""


def build(root: Path, seed: int) -> Path:
    """The tiny model with 32-wide heads and weight seed ``seed``, written under ``root``."""
    out = root / f"tiny-h32-seed{seed}"
    if not out.is_dir():
        out.mkdir(parents=True)
        build_tiny(out, TinyConfig(num_heads=2, seed=seed))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    return build(root, seed=0), build(root, seed=1)


@pytest.fixture(scope="module")
def engine(models) -> VLLMPolicy:
    return VLLMPolicy(models[0], dtype="float32", max_context=512, kv_cache_gib=0.25, seed=0)


@pytest.fixture(scope="module")
def hf(models) -> HFPolicy:
    model, tokenizer = load_policy_model(models[0], device="cpu")
    return HFPolicy(model, tokenizer)


def teacher_forced(model, prompt_ids, response_ids, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each response token from one transformers forward pass."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [T, V]
    targets = torch.tensor(list(response_ids))  # [R]
    n = len(prompt_ids)
    return logp[n - 1 : -1].gather(-1, targets[:, None]).squeeze(-1)  # [R]


def test_satisfies_the_protocol_and_renders_prompts_as_hf(engine: VLLMPolicy, hf) -> None:
    assert isinstance(engine, Policy)
    assert engine.max_context == 512
    assert engine.pad_id == hf.pad_id
    for prompt in PROMPTS:
        assert engine.prompt_ids(prompt) == hf.prompt_ids(prompt)


def test_lengths_max_new_tokens_and_prompt_ids(engine: VLLMPolicy) -> None:
    gens = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=7))
    assert len(gens) == len(PROMPTS)
    for prompt, g in zip(PROMPTS, gens, strict=True):
        assert g.prompt_ids == tuple(engine.prompt_ids(prompt))
        assert 0 < len(g.response_ids) <= 7
        assert len(g.logprobs) == len(g.response_ids)
        assert all(lp <= 0 for lp in g.logprobs)
        ended_early = len(g.response_ids) < 7
        assert not ended_early or g.response_ids[-1] == engine.tokenizer.eos_token_id
        assert g.text == engine.tokenizer.decode(g.response_ids, skip_special_tokens=True)


def test_too_long_prompt_and_bad_params_raise(engine: VLLMPolicy) -> None:
    with pytest.raises(ValueError, match="max_context"):
        engine.generate_ids([[5] * 500], SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="allowed has 1 entries"):
        engine.generate(PROMPTS, SamplingParams(), allowed=[ACTIONS])


def test_stop_string_ends_the_response(engine: VLLMPolicy) -> None:
    free = engine.generate(PROMPTS, SamplingParams(greedy=True, max_new_tokens=24))
    # A stop string the greedy response reaches after a few tokens: the text of its 3rd-4th tokens.
    stops = [engine.tokenizer.decode(g.response_ids[2:4]) for g in free]
    checked = 0
    for prompt, stop, g in zip(PROMPTS, stops, free, strict=True):
        if not stop.strip() or len(g.response_ids) < 4:
            continue
        (cut,) = engine.generate(
            [prompt], SamplingParams(greedy=True, max_new_tokens=24, stop=(stop,))
        )
        text = engine.tokenizer.decode(cut.response_ids, skip_special_tokens=False)
        before = engine.tokenizer.decode(cut.response_ids[:-1], skip_special_tokens=False)
        assert stop in text and stop not in before
        assert cut.response_ids == g.response_ids[: len(cut.response_ids)]
        assert len(cut.response_ids) <= 4
        checked += 1
    assert checked >= 2, "the greedy responses gave too few usable stop strings"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_transformers(engine: VLLMPolicy, hf, temperature) -> None:
    gens = engine.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=12))
    for g in gens:
        ref = teacher_forced(hf.model, g.prompt_ids, g.response_ids, temperature)
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=TOL, rtol=0)


def test_greedy_tokens_and_logprobs_equal_hf_policy(engine: VLLMPolicy, hf) -> None:
    params = SamplingParams(greedy=True, max_new_tokens=16)
    ours = engine.generate(PROMPTS, params)
    theirs = hf.generate(PROMPTS, params)
    for a, b in zip(ours, theirs, strict=True):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(
            torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=TOL, rtol=0
        )


def test_constrained_decoding_returns_an_allowed_string(engine: VLLMPolicy) -> None:
    allowed = [ACTIONS, ACTIONS[2:], None]
    for params in (
        SamplingParams(greedy=True, max_new_tokens=24),
        SamplingParams(max_new_tokens=24),
    ):
        gens = engine.generate(PROMPTS, params, allowed=allowed)
        assert gens[0].text in ACTIONS
        assert gens[1].text in ACTIONS[2:]
        assert gens[0].response_ids[-1] == engine.tokenizer.eos_token_id
        assert gens[2].text not in ACTIONS  # the free row is left alone


def test_sync_makes_new_weights_visible(engine: VLLMPolicy, hf, models) -> None:
    params = SamplingParams(greedy=True, max_new_tokens=12)
    before = engine.generate(PROMPTS, params)
    other, _ = load_policy_model(models[1], device="cpu")
    try:
        engine.sync(other)
        after = engine.generate(PROMPTS, params)
        expected = HFPolicy(other, hf.tokenizer).generate(PROMPTS, params)
        assert [g.response_ids for g in after] != [g.response_ids for g in before]
        for a, b in zip(after, expected, strict=True):
            assert a.response_ids == b.response_ids
            ref = teacher_forced(other, a.prompt_ids, a.response_ids, 1.0)
            torch.testing.assert_close(torch.tensor(a.logprobs), ref, atol=TOL, rtol=0)
    finally:
        engine.sync(hf.model)  # leave the module's engine on its original weights
    restored = engine.generate(PROMPTS, params)
    assert [g.response_ids for g in restored] == [g.response_ids for g in before]
