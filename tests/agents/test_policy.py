"""HFPolicy on the tiny random model: sampling, log-probs, batching, stops, constraints."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from agents.generation.base import render_chat
from agents.generation.hf import HFPolicy, TokenTrie, sample_next
from agents.generation.models import load_policy_model
from agents.generation.vllm import VLLMPolicy
from agents.types import Policy, SamplingParams
from tests.numerics import assert_close_in

pytestmark = pytest.mark.numerics  # float32 log-probs of two computations (tests/numerics.py)

DECODE_ULPS = 128
"""Ulps (float32) between a KV-cached, left-padded decode and one teacher-forced forward: every
layer's attention and matmuls run over other shapes, so each rounds differently."""

PROMPTS = [
    [{"role": "user", "content": "go to desk 1"}],
    [
        {"role": "system", "content": "You are in a room. Solve the task."},
        {"role": "user", "content": "What is 12 + 7? Put the answer in \\boxed{}."},
    ],
    [{"role": "user", "content": "Héllo wörld, 数学 — open the fridge 1 please"}],
]

ACTIONS = [
    "<action>go to desk 1</action>",
    "<action>go to desk 10</action>",
    "<action>go to drawer 2</action>",
    "<action>open fridge 1</action>",
    "<action>take apple 1 from countertop 2</action>",
]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.getbasetemp() / "holderpo-model-cache"
    return load_policy_model("tiny", cache_dir=cache, device="cpu")


@pytest.fixture()
def policy(tiny) -> HFPolicy:
    model, tokenizer = tiny
    return HFPolicy(model, tokenizer, seed=1234)


def teacher_forced_logprobs(model, prompt_ids, response_ids, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each response token, from one fresh forward pass (no padding)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    n = len(prompt_ids)
    targets = torch.tensor(list(response_ids))
    return logp[n - 1 : -1].gather(-1, targets[:, None]).squeeze(-1)  # [R]


def test_hf_policy_satisfies_the_protocol(policy: HFPolicy, tiny) -> None:
    _, tokenizer = tiny
    assert isinstance(policy, Policy)
    assert policy.max_context == 2048
    assert policy.pad_id == tokenizer.pad_token_id
    ids = policy.prompt_ids(PROMPTS[0])
    assert tokenizer.decode(ids) == render_chat(tokenizer, PROMPTS[0])
    assert ids[0] == tokenizer.bos_token_id  # from the template, not added twice
    assert ids[1] != tokenizer.bos_token_id


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_teacher_forcing(policy: HFPolicy, tiny, temperature) -> None:
    model, _ = tiny
    params = SamplingParams(temperature=temperature, max_new_tokens=12)
    gens = policy.generate(PROMPTS, params)
    assert len({len(g.prompt_ids) for g in gens}) == 3  # left padding is exercised
    for g in gens:
        assert len(g.logprobs) == len(g.response_ids) > 0
        ref = teacher_forced_logprobs(model, g.prompt_ids, g.response_ids, temperature)
        assert_close_in(torch.float32, torch.tensor(g.logprobs), ref, ulps=DECODE_ULPS)


def test_greedy_logprobs_are_temperature_one(tiny) -> None:
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer)
    # temperature is ignored by greedy decoding, log-probs are at temperature 1
    (g,) = policy.generate(
        PROMPTS[:1], SamplingParams(greedy=True, temperature=0.3, max_new_tokens=8)
    )
    ref = teacher_forced_logprobs(model, g.prompt_ids, g.response_ids, 1.0)
    assert_close_in(torch.float32, torch.tensor(g.logprobs), ref, ulps=DECODE_ULPS)
    full = torch.tensor(list(g.prompt_ids) + list(g.response_ids))[None]
    with torch.no_grad():
        logits = model(input_ids=full).logits[0, len(g.prompt_ids) - 1 : -1]
    assert logits.argmax(-1).tolist() == list(g.response_ids)  # each token is the arg-max


def test_batched_greedy_equals_one_by_one(policy: HFPolicy) -> None:
    params = SamplingParams(greedy=True, max_new_tokens=16)
    batched = policy.generate(PROMPTS, params)
    for prompt, gen in zip(PROMPTS, batched, strict=True):
        (alone,) = policy.generate([prompt], params)
        assert alone.response_ids == gen.response_ids
        assert alone.prompt_ids == gen.prompt_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(gen.logprobs))


def test_sampling_is_seeded_and_random(tiny) -> None:
    model, tokenizer = tiny
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    a = HFPolicy(model, tokenizer, seed=7).generate(PROMPTS, params)
    b = HFPolicy(model, tokenizer, seed=7).generate(PROMPTS, params)
    c = HFPolicy(model, tokenizer, seed=8).generate(PROMPTS, params)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.response_ids for g in a] != [g.response_ids for g in c]
    greedy = HFPolicy(model, tokenizer).generate(
        PROMPTS, SamplingParams(greedy=True, max_new_tokens=10)
    )
    assert [g.response_ids for g in a] != [g.response_ids for g in greedy]


def test_max_new_tokens_and_eos_end_rows(policy: HFPolicy, tiny) -> None:
    _, tokenizer = tiny
    gens = policy.generate(PROMPTS * 3, SamplingParams(temperature=1.0, max_new_tokens=5))
    for g in gens:
        assert 1 <= len(g.response_ids) <= 5
        eos_at = [i for i, t in enumerate(g.response_ids) if t == tokenizer.eos_token_id]
        assert eos_at in ([], [len(g.response_ids) - 1])  # nothing after an EOS
        if len(g.response_ids) < 5:
            assert eos_at
    assert any(len(g.response_ids) == 5 for g in gens)


def test_stop_string_ends_the_row_and_is_kept(policy: HFPolicy, tiny) -> None:
    _, tokenizer = tiny
    params = SamplingParams(greedy=True, max_new_tokens=24)
    (full,) = policy.generate(PROMPTS[1:2], params)
    tokens = list(full.response_ids)
    # a stop string taken from the middle of the greedy response
    k = next(
        i
        for i in range(4, len(tokens))
        if (s := tokenizer.decode(tokens[i - 1 : i + 1])).isascii() and s.strip()
    )
    stop = tokenizer.decode(tokens[k - 1 : k + 1])
    (cut,) = policy.generate(
        PROMPTS[1:2], SamplingParams(greedy=True, max_new_tokens=24, stop=(stop,))
    )
    resp = list(cut.response_ids)
    assert resp == tokens[: len(resp)] and len(resp) <= k + 1 < len(tokens)
    assert stop in tokenizer.decode(resp)
    assert stop not in tokenizer.decode(resp[:-1])
    assert len(cut.logprobs) == len(resp)


def test_constrained_decoding_returns_an_allowed_string(policy: HFPolicy, tiny) -> None:
    model, tokenizer = tiny
    prompts = PROMPTS * 4
    allowed = [ACTIONS, None, ACTIONS[:2]] * 4
    gens = policy.generate(
        prompts, SamplingParams(temperature=1.0, max_new_tokens=40), allowed=allowed
    )
    chosen = set()
    for g, a in zip(gens, allowed, strict=True):
        if a is None:
            continue
        assert g.text in a
        expected = tokenizer(g.text, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        assert list(g.response_ids) == expected
        # the reported log-probs are the model's unconstrained ones
        ref = teacher_forced_logprobs(model, g.prompt_ids, g.response_ids, 1.0)
        assert_close_in(torch.float32, torch.tensor(g.logprobs), ref, ulps=DECODE_ULPS)
        assert sum(g.logprobs) < -1.0  # a random model puts mass outside the allowed strings
        chosen.add(g.text)
    assert len(chosen) > 1  # sampling, not a fixed choice


def test_constrained_greedy_and_single_choice(policy: HFPolicy, tiny) -> None:
    _, tokenizer = tiny
    params = SamplingParams(greedy=True, max_new_tokens=40)
    gens = policy.generate(PROMPTS, params, allowed=[ACTIONS, ["only this one ✓"], [""]])
    assert gens[0].text in ACTIONS
    assert gens[1].text == "only this one ✓"
    assert gens[2].response_ids == (tokenizer.eos_token_id,)
    assert gens[2].text == ""


def test_constraint_cut_by_max_new_tokens_is_a_prefix(policy: HFPolicy) -> None:
    params = SamplingParams(greedy=True, max_new_tokens=3)
    (g,) = policy.generate(PROMPTS[:1], params, allowed=[ACTIONS])
    assert len(g.response_ids) == 3
    assert any(a.startswith(g.text) for a in ACTIONS)


def test_token_trie_shares_prefixes() -> None:
    trie = TokenTrie([[1, 2, 9], [1, 3, 9], [1, 2, 4, 9]])
    assert set(trie.children[0]) == {1}
    after_1 = trie.children[trie.children[0][1]]
    assert set(after_1) == {2, 3}
    assert set(trie.children[after_1[2]]) == {9, 4}
    with pytest.raises(ValueError, match="at least one"):
        TokenTrie([])


def test_top_p_keeps_the_nucleus() -> None:
    logp = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, -2.0], [2.0, 0.0, 0.0, 2.1]]), dim=-1)
    gen = torch.Generator().manual_seed(0)
    tight = SamplingParams(top_p=1e-6)
    draws = torch.stack([sample_next(logp, tight, gen) for _ in range(50)])  # [50, 2]
    assert draws[:, 0].eq(1).all() and draws[:, 1].eq(3).all()
    two = SamplingParams(top_p=0.6)  # row 1: tokens 3 and 0 hold ~0.87 together, 3 alone ~0.46
    draws = torch.stack([sample_next(logp, two, gen) for _ in range(200)])
    assert set(draws[:, 1].tolist()) == {0, 3}


def test_generation_runs_in_eval_mode_and_restores_training(policy: HFPolicy, tiny) -> None:
    model, _ = tiny
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    try:
        model.train()
        policy.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3))
        assert model.training
        model.eval()
        policy.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3))
        assert not model.training
    finally:
        handle.remove()
    assert seen and not any(seen)


def test_prompt_longer_than_context_names_the_fix(tiny) -> None:
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer, max_context=20)
    with pytest.raises(ValueError, match="truncate the prompt ids"):
        policy.generate(PROMPTS[1:2], SamplingParams(max_new_tokens=8))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(temperature=0.0), "greedy=True"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(max_new_tokens=0), "at least one token"),
    ],
)
def test_bad_sampling_params_name_the_fix(policy: HFPolicy, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        policy.generate(PROMPTS[:1], params)


def test_allowed_must_match_prompts(policy: HFPolicy) -> None:
    with pytest.raises(ValueError, match="allowed has 1 entries for 2 prompts"):
        policy.generate(PROMPTS[:2], SamplingParams(max_new_tokens=2), allowed=[None])
    with pytest.raises(ValueError, match="at least one allowed response"):
        policy.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2), allowed=[[]])


def test_sync_copies_weights_from_another_model(tiny) -> None:
    model, tokenizer = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5, alpha=1.0)
    policy = HFPolicy(copy.deepcopy(model), tokenizer)
    params = SamplingParams(greedy=True, max_new_tokens=8)
    before = policy.generate(PROMPTS, params)
    policy.sync(policy.model)  # the generator itself: nothing changes
    assert policy.generate(PROMPTS, params) == before
    policy.sync(other)
    after = policy.generate(PROMPTS, params)
    expected = HFPolicy(other, tokenizer).generate(PROMPTS, params)
    assert [g.response_ids for g in after] == [g.response_ids for g in expected]
    assert [g.response_ids for g in after] != [g.response_ids for g in before]


def test_chat_fallback_without_template(tiny) -> None:
    _, tokenizer = tiny
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert render_chat(plain, PROMPTS[1]) == (
        "system: You are in a room. Solve the task.\n"
        "user: What is 12 + 7? Put the answer in \\boxed{}.\nassistant: "
    )


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_policy_without_vllm_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r'pip install "holderpo-agents\[vllm\]"'):
        VLLMPolicy(tmp_path)


SAVINGS = ("last_logits_only", "share_prefill", "reserve_cache")
"""The HFPolicy switches that change the cost of generation but not its results."""


def plain_greedy(model, prompt_ids, max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding with no cache and no batching: a full forward over all tokens per step."""
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(tok)
            ids.append(tok)
            if tok == eos_id:
                break
    return out


def duplicated_prompts(policy: HFPolicy) -> list[list[int]]:
    """Prompt ids of unequal lengths, each distinct prompt repeated (as a group's first turn)."""
    ids = [policy.prompt_ids(p) for p in PROMPTS]
    return [ids[0], ids[1], ids[0], ids[2], ids[1], ids[0]]


def test_greedy_equals_a_plain_full_forward_loop(tiny) -> None:
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer)
    ids = duplicated_prompts(policy)
    gens = policy.generate_ids(ids, SamplingParams(greedy=True, max_new_tokens=12))
    for row, g in zip(ids, gens, strict=True):
        assert list(g.response_ids) == plain_greedy(model, row, 12, tokenizer.eos_token_id)


@pytest.mark.parametrize("off", [(), *((s,) for s in SAVINGS), SAVINGS])
def test_savings_keep_the_logprobs_of_a_full_forward(tiny, off) -> None:
    model, tokenizer = tiny
    policy = HFPolicy(model, tokenizer, seed=5, **{s: False for s in off})
    ids = duplicated_prompts(policy)
    allowed = [ACTIONS, None, ACTIONS, None, ACTIONS[:2], None]
    gens = policy.generate_ids(ids, SamplingParams(max_new_tokens=30), allowed=allowed)
    for g in gens:
        ref = teacher_forced_logprobs(model, g.prompt_ids, g.response_ids, 1.0)
        assert_close_in(torch.float32, torch.tensor(g.logprobs), ref, ulps=DECODE_ULPS)
    # the same seed draws the same tokens whichever savings are on
    same = HFPolicy(model, tokenizer, seed=5).generate_ids(
        ids, SamplingParams(max_new_tokens=30), allowed=allowed
    )
    assert [g.response_ids for g in gens] == [g.response_ids for g in same]
    assert len({g.response_ids for g in gens}) > 3  # duplicated prompts are sampled apart


def test_prefill_runs_each_distinct_prompt_once_through_the_last_position(tiny) -> None:
    model, tokenizer = tiny
    calls: list[tuple[int, int]] = []  # (rows, positions) entering the output head

    def record(module, args) -> None:
        calls.append(tuple(args[0].shape[:2]))

    handle = model.lm_head.register_forward_pre_hook(record)
    try:
        policy = HFPolicy(model, tokenizer)
        policy.generate_ids(duplicated_prompts(policy), SamplingParams(max_new_tokens=3))
        assert calls[0] == (3, 1)  # three distinct prompts, one position each
        assert calls[1:] == [(6, 1)] * (len(calls) - 1)
        calls.clear()
        plain = HFPolicy(model, tokenizer, last_logits_only=False, share_prefill=False)
        ids = duplicated_prompts(plain)
        plain.generate_ids(ids, SamplingParams(max_new_tokens=3))
        assert calls[0] == (6, max(len(r) for r in ids))
    finally:
        handle.remove()


def test_reserved_cache_is_filled_in_place(tiny) -> None:
    from agents.generation.hf import _new_cache

    model, _ = tiny
    cache = _new_cache(model, 8, reserve=True)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), cache=cache, use_cache=True)
        stores = [layer.key_store for layer in cache.layers]
        model(input_ids=torch.tensor([[11], [12]]), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 4
    assert all(layer.key_store is s for layer, s in zip(cache.layers, stores, strict=True))
    assert all(layer.keys.shape[-2] == 4 for layer in cache.layers)
    cache.batch_select_indices(torch.tensor([1, 1, 0]))
    assert cache.layers[0].keys.shape[0] == 3
    torch.testing.assert_close(cache.layers[0].keys[0], cache.layers[0].keys[1])
    with pytest.raises(RuntimeError, match="reserved for 8 positions"):
        with torch.no_grad():
            model(input_ids=torch.ones((3, 5), dtype=torch.long), cache=cache, use_cache=True)


def test_autocast_dtype_runs_generation_under_autocast(tiny) -> None:
    model, tokenizer = tiny
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(
        lambda mod, args: seen.append(torch.is_autocast_enabled("cpu"))
    )
    try:
        policy = HFPolicy(model, tokenizer, autocast_dtype=torch.bfloat16)
        (g,) = policy.generate(PROMPTS[:1], SamplingParams(greedy=True, max_new_tokens=6))
    finally:
        handle.remove()
    assert seen and all(seen)
    assert next(model.parameters()).dtype == torch.float32  # the weights are not cast
    ref = teacher_forced_logprobs(model, g.prompt_ids, g.response_ids, 1.0)
    assert (torch.tensor(g.logprobs) - ref).abs().max() < 0.1  # bfloat16 rounding only


def test_generation_with_gradient_checkpointing_keeps_the_cache(tiny) -> None:
    from agents.generation.models import enable_gradient_checkpointing

    model, tokenizer = tiny
    params = SamplingParams(greedy=True, max_new_tokens=8)
    expected = HFPolicy(model, tokenizer).generate(PROMPTS, params)
    checkpointed = copy.deepcopy(model)
    enable_gradient_checkpointing(checkpointed)
    checkpointed.train()
    lengths: list[int] = []
    handle = checkpointed.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        gens = HFPolicy(checkpointed, tokenizer).generate(PROMPTS, params)
    finally:
        handle.remove()
    assert checkpointed.training  # restored after generation
    assert [g.response_ids for g in gens] == [g.response_ids for g in expected]
    assert lengths[1:] and set(lengths[1:]) == {1}  # one new token per step: the cache is used
