"""Generator backends without vLLM: config keys and checks, the registry, the weight exports.

The weight exports are what a vLLM engine reloads after each update (one process, LoRA merged, and
FSDP2 gathered from two real gloo ranks, with and without LoRA); they are compared here with the
unsharded model's own weights. The engine itself is tested in the vllm environment
(tests/agents/test_vllm_policy.py, tests/agents/test_vllm_training.py).
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.config import ConfigError, RunConfig, build_run_config
from agents.generation.backends import BACKENDS
from agents.generation.hf import HFPolicy
from agents.generation.models import load_policy_model
from agents.generation.vllm import VLLMSettings
from agents.run.preflight import preflight
from agents.run.runtime import build_runtime, weight_export
from agents.training.distributed import close_distributed, init_local_process, shard_model
from agents.training.lora import LoraSettings, apply_lora, merged_state_dict
from tests.conftest import REPO_ROOT

LORA = LoraSettings(r=4, target_modules=("q_proj", "v_proj"))


def _cfg(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        tree = OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)
    return build_run_config(tree)  # type: ignore[arg-type]


def test_default_backend_is_hf_and_the_vllm_section_is_the_dataclass_default() -> None:
    rollout = _cfg("run_dir=/tmp/x").rollout
    assert rollout.backend == "hf"
    assert rollout.vllm == VLLMSettings()  # configs/rollout/default.yaml states the defaults
    assert sorted(BACKENDS) == ["hf", "vllm"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.backend=sglang", r"rollout.backend=<one of \['hf', 'vllm'\]>"),
        ("rollout.vllm.mode=server", "rollout.vllm.mode='server' is not available"),
        ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization"),
        ("rollout.vllm.kv_cache_gib=0", "rollout.vllm.kv_cache_gib"),
        ("+rollout.vllm.tp=2", r"rollout.vllm.tp"),
    ],
)
def test_bad_backend_settings_fail_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(override, "run_dir=/tmp/x")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_fails_before_any_work_with_the_fix() -> None:
    cfg = _cfg("rollout.backend=vllm", "model=tiny", "run_dir=/tmp/x")
    with pytest.raises(
        ConfigError, match=r"rollout.backend=vllm .*pip install .*rollout.backend=hf"
    ):
        preflight(cfg)  # its first check: before the env or the model is built


def test_hf_runtime_generates_with_the_training_model_and_sync_is_a_no_op(tmp_path: Path) -> None:
    cfg = _cfg(
        "env=math", "env.prompt=math", "model=tiny", "trainer.device=cpu", f"run_dir={tmp_path}"
    )
    with build_runtime(cfg) as rt:
        assert isinstance(rt.policy, HFPolicy) and rt.policy.model is rt.model
        before = {k: v.clone() for k, v in rt.model.state_dict().items()}
        with rt.policy.generating():
            rt.policy.sync(rt.model)
        for key, value in rt.model.state_dict().items():
            assert torch.equal(value, before[key])


def test_one_process_exports_the_state_dict_and_lora_the_merged_weights(tmp_path: Path) -> None:
    model, _ = load_policy_model("tiny", device="cpu", cache_dir=tmp_path)
    plain = weight_export(lora=False, distributed=False)(model)
    assert plain.keys() == model.state_dict().keys()
    assert all(plain[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())
    pytest.importorskip("peft")
    lora = _lora_model(tmp_path)
    merged = weight_export(lora=True, distributed=False)(lora)
    assert merged.keys() == model.state_dict().keys()  # base names, loadable by a plain model
    changed = [k for k in merged if not torch.equal(merged[k], model.state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def _lora_model(cache: Path) -> torch.nn.Module:
    """The tiny model with seeded random adapters (B too, so the merge changes the weights)."""
    model, _ = load_policy_model("tiny", device="cpu", cache_dir=cache)
    model = apply_lora(model, LORA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, cache: Path, out: Path) -> None:
    ctx = init_local_process(rank, 2, port)
    try:
        plain, _ = load_policy_model("tiny", device="cpu", cache_dir=cache)
        plain = shard_model(plain, ctx)
        lora = shard_model(_lora_model(cache), ctx)
        got = {
            "plain": weight_export(lora=False, distributed=True)(plain),
            "lora": weight_export(lora=True, distributed=True)(lora),
        }
        torch.save(got, out / f"rank{rank}.pt")
    finally:
        close_distributed()


def test_fsdp2_exports_the_full_weights_on_every_rank(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    cache = tmp_path / "cache"
    plain, _ = load_policy_model("tiny", device="cpu", cache_dir=cache)  # build before the ranks
    expected = {"plain": plain.state_dict(), "lora": merged_state_dict(_lora_model(cache))}
    mp.spawn(_worker, args=(_free_port(), cache, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for kind, weights in expected.items():
            assert got[kind].keys() == weights.keys(), (rank, kind)
            for key, value in weights.items():
                assert got[kind][key].device.type == "cpu"
                torch.testing.assert_close(got[kind][key], value, msg=f"{rank} {kind} {key}")
