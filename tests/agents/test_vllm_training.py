"""Training with ``rollout.backend=vllm``: the CLI runs, and every update reaches the engine.

Needs the vllm extra (see .ci/vllm-env). The model is the tiny Llama with two heads of 32 (vLLM's
CPU attention has no kernel for the default heads of 16); the env is the embedded math problems.
The sync checks score one fixed response with the engine (vLLM's prompt log-probs) and with the
training model (a transformers forward) before and after an update made by the train loop itself
(:func:`agents.train.run_iteration`): removing the loop's ``policy.sync`` leaves the engine on the
pre-update policy, which the first check then catches.

The rollout-correction check makes the engine's log-probs really differ from the trainer's (one
update left unsynced, then samples from the stale engine) and compares the corrected update's loss
with the hand formula over the engine's log-probs: without the correction it is another value.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.config import build_run_config
from agents.generation.models import TinyConfig, build_tiny
from agents.run.metrics import read_metrics
from agents.run.preflight import preflight
from agents.run.runtime import build_runtime
from agents.train import run_iteration
from agents.training.learner import Learner
from agents.types import collate
from holderpo.correction import RolloutCorrection
from protocols import StepSamples, compute_advantages
from tests.conftest import REPO_ROOT
from tests.e2e.test_train_cli import _call

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (build its environment with .ci/vllm-env)",
    ),
]

SMALL = [
    "env=math",
    "env.prompt=math",
    "rollout.backend=vllm",
    "rollout.vllm.kv_cache_gib=0.25",
    "rollout.num_groups=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=24",
    "trainer.mini_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.device=cpu",
    # the tiny model rarely solves a problem: the entropy bonus gives every update a gradient
    "algorithm.entropy_coef=0.01",
]
"""Overrides shared by the CLI run and the in-process runtime."""

TOL = 1e-3
"""Log-prob tolerance between vLLM's CPU kernels and transformers (both float32)."""

PROMPT = [{"role": "user", "content": "What is 12 + 7? Put the answer in \\boxed{}."}]
RESPONSE = "The answer is \\boxed{19}."
"""A fixed response, scored by both sides."""


@pytest.fixture(scope="module")
def tiny_h32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vllm-train") / "tiny-h32"
    out.mkdir()
    build_tiny(out, TinyConfig(num_heads=2))
    return out


def test_train_cli_runs_two_iterations_with_the_vllm_backend(tiny_h32: Path, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        f"model.name={tiny_h32}",
        "trainer.iterations=2",
        "trainer.lr=1e-3",
        "trainer.eval_every=1",
        "trainer.eval_episodes=4",
        "curriculum.eval_stages=[full]",
        "trainer.eval_before=false",
        "trainer.eval_baselines=false",
        f"run_dir={run_dir}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = _call("agents.train", args, env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"agents.train failed:\n{out[-6000:]}"
    assert "iter 2/2" in out
    assert "Traceback" not in out  # the engine shuts down cleanly with the runtime
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["rollout/tokens_generated"] > 0 for r in rows)
    report = json.loads((run_dir / "eval" / "iter-000002.json").read_text())
    assert report["overall"]["episodes"] == 4
    assert json.loads((run_dir / "run_config.json").read_text())["rollout"]["backend"] == "vllm"
    assert (run_dir / "ckpt-000002" / "model.safetensors").is_file()


def engine_logprobs(policy: Any, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Any:
    """The engine's log-probs [R] of ``response_ids`` after ``prompt_ids`` (prompt log-probs)."""
    from vllm import SamplingParams

    ids = [*prompt_ids, *response_ids]
    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
    (out,) = policy.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    steps = out.prompt_logprobs[len(prompt_ids) :]  # one {token: Logprob} per response token
    return torch.tensor([step[t].logprob for step, t in zip(steps, response_ids, strict=True)])


def model_logprobs(
    model: torch.nn.Module, prompt_ids: Sequence[int], response_ids: Sequence[int]
) -> torch.Tensor:
    """log_softmax of the training model's logits for each response token [R] (temperature 1)."""
    ids = torch.tensor([[*prompt_ids, *response_ids]])  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]  # [R, V]
    return logp.gather(-1, torch.tensor(list(response_ids))[:, None]).squeeze(-1)  # [R]


@pytest.fixture(scope="module", params=["full", "lora"])
def scored(
    request: pytest.FixtureRequest, tiny_h32: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """Scores of the fixed response around two updates: one by the train loop (with its sync),
    then one by the learner alone (no sync); full fine-tuning, and LoRA (merged weights synced).
    """
    overrides = [*SMALL, f"model.name={tiny_h32}", "trainer.lr=1e-2", "rollout.max_turns=1"]
    if request.param == "lora":
        pytest.importorskip("peft", reason="LoRA needs peft (the lora extra)")
        overrides += ["model.lora.r=8", "model.lora.target_modules=[all-linear]"]
    overrides.append(f"run_dir={tmp_path_factory.mktemp('vllm-run')}")
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        tree = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    cfg = preflight(build_run_config(tree))  # type: ignore[arg-type]
    with build_runtime(cfg) as rt:
        prompt = rt.policy.prompt_ids(PROMPT)
        response = [*rt.tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]]
        response.append(rt.tokenizer.eos_token_id)
        learner = rt.build_learner()
        before = model_logprobs(rt.model, prompt, response)
        engine_before = engine_logprobs(rt.policy, prompt, response)
        run_iteration(cfg, rt, learner, 0)  # rollout, update, sync
        after = model_logprobs(rt.model, prompt, response)
        engine_after = engine_logprobs(rt.policy, prompt, response)
        with rt.policy.generating():  # a second update, made without the sync
            trajectories, _ = rt.rollout.collect(2, 2, 1, seed=1)
        advantages, _ = compute_advantages(
            StepSamples.from_trajectories(trajectories), cfg.protocol
        )
        steps = [s for t in trajectories for s in t.steps]
        learner.update(collate(steps, advantages.tolist(), pad_id=rt.pad_id), p=1.0)
        yield {
            "before": before,
            "engine_before": engine_before,
            "after": after,
            "engine_after": engine_after,
            "unsynced": model_logprobs(rt.model, prompt, response),
            "engine_unsynced": engine_logprobs(rt.policy, prompt, response),
        }


def test_engine_scores_as_the_training_model_before_any_update(scored: dict) -> None:
    torch.testing.assert_close(scored["engine_before"], scored["before"], atol=TOL, rtol=0)


def test_after_a_train_loop_update_the_engine_scores_as_the_learner(scored: dict) -> None:
    moved = (scored["after"] - scored["before"]).abs().max().item()
    assert moved > 20 * TOL, f"the update moved the log-probs by {moved} only: no test of sync"
    torch.testing.assert_close(scored["engine_after"], scored["after"], atol=TOL, rtol=0)


def test_without_a_sync_the_engine_keeps_the_previous_policy(scored: dict) -> None:
    moved = (scored["unsynced"] - scored["after"]).abs().max().item()
    assert moved > 20 * TOL, f"the second update moved the log-probs by {moved} only"
    torch.testing.assert_close(scored["engine_unsynced"], scored["after"], atol=TOL, rtol=0)


C = 1.0
"""tis bound of the correction check: weights min(π_trainer/π_engine, 1)."""


@pytest.fixture(scope="module")
def stale(tiny_h32: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An update the engine never sees, then samples from that stale engine, and the corrected
    updates of a learner (tis from the config, mis built beside it) on those samples."""
    overrides = [
        *SMALL,
        f"model.name={tiny_h32}",
        "trainer.lr=1e-2",
        "rollout.max_turns=1",
        "rollout.temperature=1.0",
        "algorithm=grpo",
        "algorithm.rollout_correction.mode=tis",
        f"algorithm.rollout_correction.clip={C}",
        f"run_dir={tmp_path_factory.mktemp('vllm-correction')}",
    ]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        tree = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    cfg = preflight(build_run_config(tree))  # type: ignore[arg-type]
    with build_runtime(cfg) as rt:
        learner = rt.build_learner()
        assert learner.correction == RolloutCorrection(mode="tis", clip=C)
        with rt.policy.generating():
            trajectories, _ = rt.rollout.collect(2, 2, 1, seed=0)
        steps = [s for t in trajectories for s in t.steps]
        learner.update(collate(steps, [1.0] * len(steps), pad_id=rt.pad_id), p=1.0)  # no sync
        with rt.policy.generating():
            trajectories, _ = rt.rollout.collect(2, 2, 1, seed=1)
        steps = [s for t in trajectories for s in t.steps]
        trainer = [model_logprobs(rt.model, s.prompt_ids, s.response_ids) for s in steps]
        engine = [torch.tensor(s.logprobs, dtype=torch.float32) for s in steps]
        batch = collate(steps, [1.0] * len(steps), pad_id=rt.pad_id)  # every A = 1
        mis = RolloutCorrection(mode="mis", low=0.97, high=1.03)
        masked = Learner(copy.deepcopy(rt.model), cfg.loss, cfg.learner, correction=mis)
        yield {
            "trainer": trainer,
            "engine": engine,
            "mis": mis,
            "mis_metrics": masked.update(batch, p=1.0),
            "tis_metrics": learner.update(batch, p=1.0),  # one optimizer step: ratios 1
        }


def log_ratios(stale: dict) -> torch.Tensor:
    """log π_trainer − log π_engine of every sampled token [N] (the correction's Δ)."""
    pairs = zip(stale["trainer"], stale["engine"], strict=True)
    return torch.cat([trainer - engine for trainer, engine in pairs])


def test_the_stale_engine_log_probs_differ_from_the_trainers(stale: dict) -> None:
    gaps = log_ratios(stale).abs()
    assert float(gaps.max()) > 20 * TOL, "the engine is not stale: no test of the correction"
    metrics = stale["tis_metrics"]
    assert metrics["loss/generator_drift"] == pytest.approx(float(gaps.mean()), abs=TOL)
    assert metrics["loss/generator_drift_max"] == pytest.approx(float(gaps.max()), abs=TOL)


def test_tis_weights_the_engines_samples_by_min_rho_c(stale: dict) -> None:
    """GRPO token loss at ratio 1 with every A = 1: −Σ_t min(ρ_t, C) / N with ρ_t the trainer's
    probability over the engine's; uncorrected it would be −1."""
    rho = torch.exp(log_ratios(stale))
    want = -float(rho.clamp(max=C).mean())
    metrics = stale["tis_metrics"]
    assert abs(want - -1.0) > 20 * TOL  # the correction changes the loss by far more than TOL
    assert metrics["loss/policy"] == pytest.approx(want, abs=TOL)
    assert metrics["loss/rollout_truncated_frac"] == pytest.approx(float((rho > C).double().mean()))


def test_mis_drops_the_engine_tokens_outside_the_bounds(stale: dict) -> None:
    delta = log_ratios(stale)
    rho, mis = torch.exp(delta), stale["mis"]
    keep = (rho >= mis.low) & (rho <= mis.high)
    bounds = torch.tensor([math.log(mis.low), math.log(mis.high)])
    if float((delta[:, None] - bounds).abs().min()) < TOL:  # kept or not depends on float noise
        pytest.skip("a token's log-ratio lies within the log-prob tolerance of a bound")
    assert 0 < int(keep.sum()) < len(rho)
    metrics = stale["mis_metrics"]
    assert metrics["loss/rollout_masked_frac"] == pytest.approx(1 - float(keep.double().mean()))
    assert metrics["loss/policy"] == pytest.approx(-float(rho[keep].mean()), abs=TOL)
