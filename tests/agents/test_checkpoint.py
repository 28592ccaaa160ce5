"""Checkpoints: round trips, pickle-free trainer state, manifests, pruning, tied weights, LoRA."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from agents.config import ConfigError, build_trainer
from agents.generation.models import load_policy_model
from agents.training import checkpoint
from agents.training.checkpoint import resume_checkpoint
from agents.training.distributed import DistContext
from agents.training.learner import Learner, LearnerConfig
from agents.types import Batch, Step, collate
from holderpo.loss import PRESETS
from tests.conftest import REPO_ROOT

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LEARNER = LearnerConfig(mini_batch_size=4, micro_batch_size=2, lr=1e-2)


def _draws() -> tuple[float, float, float, torch.Tensor]:
    return (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1))  # noqa: NPY002


def test_save_load_round_trip_restores_weights_and_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    state = checkpoint.TrainingState(iteration=2, optimizer_steps=7, p=0.5)
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002 - the global state is what a checkpoint restores
    torch.manual_seed(1)
    random.gauss(0, 1)  # a cached gaussian is part of Python's state
    path = checkpoint.save(tmp_path, model=model, learner_state={"x": 1}, state=state)
    expected = _draws()
    clone = torch.nn.Linear(3, 2)
    learner_state, loaded = checkpoint.load(path, model=clone)
    assert loaded == state and learner_state == {"x": 1}
    assert _draws() == expected
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_files_are_safetensors_a_weights_only_trainer_state_and_a_manifest(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = checkpoint.save(
        tmp_path,
        model=model,
        learner_state={"optimizer": torch.optim.AdamW(model.parameters()).state_dict()},
        state=checkpoint.TrainingState(1, 1, 0.0),
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "trainer.pt",
    ]
    assert load_file(path / "model.safetensors").keys() == {"weight", "bias"}
    blob = torch.load(path / "trainer.pt", weights_only=True)  # no code runs on load
    assert blob["state"] == {"iteration": 1, "optimizer_steps": 1, "p": 0.0}
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["layout"], manifest["weights"], manifest["iteration"]) == ("single", "full", 1)
    for name in ("model.safetensors", "trainer.pt"):
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


def test_latest_ignores_partial_writes_and_old_ones_are_pruned(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    for it in (1, 2, 3):
        checkpoint.save(
            tmp_path,
            model=model,
            learner_state={},
            state=checkpoint.TrainingState(it, it, 0.0),
            keep=2,
        )
    (tmp_path / ".ckpt-tmp-dead").mkdir()  # what a kill -9 during a save leaves
    (tmp_path / "ckpt-000009").write_text("not a folder")
    assert [p.name for p in checkpoint.all_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000003"]
    assert checkpoint.latest(tmp_path) == tmp_path / "ckpt-000003"
    checkpoint.save(
        tmp_path, model=model, learner_state={}, state=checkpoint.TrainingState(4, 4, 0.0), keep=1
    )
    assert [p.name for p in checkpoint.all_checkpoints(tmp_path)] == ["ckpt-000004"]


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_load_back_tied(tmp_path: Path) -> None:
    model = _Tied()
    path = checkpoint.save(
        tmp_path, model=model, learner_state={}, state=checkpoint.TrainingState(1, 1, 0.0)
    )
    assert list(load_file(path / "model.safetensors")) == ["embed.weight"]
    clone = _Tied()
    checkpoint.load(path, model=clone)
    assert torch.equal(clone.head.weight, model.embed.weight)
    assert clone.head.weight is clone.embed.weight


def test_trainer_section_takes_the_yaml_and_bad_values_name_the_key() -> None:
    tree = yaml.safe_load((REPO_ROOT / "configs" / "config.yaml").read_text())["trainer"]
    defaults, _ = build_trainer(tree)
    assert (tree["save_every"], tree["keep"]) == (defaults.save_every, defaults.keep)
    assert 1 < defaults.save_every < defaults.iterations  # the default run writes 2 checkpoints
    with pytest.raises(ConfigError, match="trainer.keep"):
        build_trainer({**tree, "keep": 0})


# ------------------------------------------------------------------------------------------------
# LoRA: adapters only, exact resume


def _batch(seed: int, vocab: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    steps, advantages = [], []
    for i in range(4):
        prompt = torch.randint(4, vocab, (5 + i,), generator=g).tolist()
        response = torch.randint(4, vocab, (3 + i,), generator=g).tolist()
        logprobs = (-torch.rand(len(response), generator=g) - 3).tolist()
        steps.append(
            Step(tuple(prompt), tuple(response), tuple(logprobs), "", "", True, 0.0, True, False, i)
        )
        advantages.append(float(torch.randn((), generator=g)))
    return collate(steps, advantages, pad_id=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    load_policy_model("tiny", device="cpu", cache_dir=root)
    return root


def _vocab(learner: Learner) -> int:
    embeddings: Any = learner.model.get_input_embeddings()  # type: ignore[operator]
    return int(embeddings.num_embeddings)


def _lora_learner(cache: Path) -> Learner:
    from agents.training.lora import LoraSettings, apply_lora

    model, _ = load_policy_model("tiny", device="cpu", cache_dir=cache)
    model = apply_lora(model, LoraSettings(r=4, alpha=8.0))
    return Learner(model, PRESETS["grpo"], LEARNER)


def test_lora_checkpoint_holds_the_adapters_only_and_resumes_exactly(
    cache: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft", reason="LoRA needs the lora extra (peft)")
    learner = _lora_learner(cache)
    vocab = _vocab(learner)
    first, second = _batch(1, vocab), _batch(2, vocab)
    learner.update(first, p=1.0)
    path = checkpoint.save(
        tmp_path,
        model=learner.model,
        learner_state=learner.state_dict(),
        state=checkpoint.TrainingState(1, 1, 1.0),
    )
    learner.update(second, p=1.0)

    stored = load_file(path / "model.safetensors")
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert set(stored) == trainable and all("lora_" in k for k in stored)
    assert json.loads((path / "manifest.json").read_text())["weights"] == "trainable"

    resumed = _lora_learner(cache)  # the base rebuilt from the model name, fresh adapters
    found = resume_checkpoint(tmp_path, learner=resumed, ctx=SINGLE)
    assert found is not None and found[1] == checkpoint.TrainingState(1, 1, 1.0)
    resumed.update(second, p=1.0)
    expected = learner.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_lora_weights_do_not_load_into_a_model_without_adapters(
    cache: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft", reason="LoRA needs the lora extra (peft)")
    learner = _lora_learner(cache)
    path = checkpoint.save(
        tmp_path,
        model=learner.model,
        learner_state=learner.state_dict(),
        state=checkpoint.TrainingState(1, 0, 1.0),
    )
    plain, _ = load_policy_model("tiny", device="cpu", cache_dir=cache)
    with pytest.raises(ValueError, match="model.lora"):
        checkpoint.load_weights(path, model=plain)
