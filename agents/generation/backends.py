"""Generator backends by ``rollout.backend`` name: :data:`BACKENDS`, the one place that maps them.

``agents.run.runtime`` builds the run's generator with ``BACKENDS[name].build(inputs)`` from a
:class:`GeneratorInputs` (each backend takes the parts it needs); ``agents.config`` checks the name
and ``agents.run.preflight`` that the backend's package is installed.

* ``hf``: :class:`~agents.generation.hf.HFPolicy`, transformers, generating with the training
  model itself.
* ``vllm``: :class:`~agents.generation.vllm.VLLMPolicy`, a vLLM engine beside the learner whose
  weights are synced after every update.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import torch

from agents.generation.base import GatherWeights, WeightExport
from agents.generation.hf import HFPolicy
from agents.generation.vllm import VLLM_INSTALL, VLLMPolicy, VLLMSettings
from agents.types import Policy


@dataclass(frozen=True)
class GeneratorInputs:
    """What a backend may build its generator from (each takes the parts it needs)."""

    model: torch.nn.Module
    """The training model (LoRA and FSDP2 applied): the HF generator itself."""
    tokenizer: Any
    """Its tokenizer."""
    source: str | os.PathLike[str]
    """The model's folder or hub id, for an engine that loads its own copy."""
    device: torch.device
    """The learner's device."""
    dtype: str
    """``model.dtype`` on GPU, ``float32`` on CPU (an engine's weight dtype)."""
    autocast_dtype: torch.dtype | None
    """Mixed-precision dtype of the HF forward passes (``None``: the model's)."""
    savings: bool
    """``rollout.generator_savings`` (HF)."""
    vllm: VLLMSettings
    """``rollout.vllm.*``."""
    export: WeightExport
    """The learner's weights as a separate engine loads them (see :data:`WeightExport`)."""
    seed: int
    """Sampling seed of this process (an engine's)."""
    distributed: bool
    """More than one process (``torchrun``): each rank builds its own generator."""
    gather: GatherWeights | None = None
    """Holds the training model's full parameters while the HF generator runs (FSDP2's gather;
    ``None``: nothing to hold)."""


@dataclass(frozen=True)
class Backend:
    """A generator backend: how to build it, and what it needs installed."""

    build: Callable[[GeneratorInputs], Policy]
    """Builds the generator."""
    requires: str | None = None
    """Module that must import (``None``: nothing beyond the core dependencies)."""
    install: str = ""
    """Command that installs ``requires``."""

    def missing(self) -> bool:
        """Whether ``requires`` is not installed."""
        return self.requires is not None and importlib.util.find_spec(self.requires) is None


def _build_hf(inputs: GeneratorInputs) -> Policy:
    return HFPolicy(
        inputs.model,
        inputs.tokenizer,
        autocast_dtype=inputs.autocast_dtype,
        last_logits_only=inputs.savings,
        share_prefill=inputs.savings,
        reserve_cache=inputs.savings,
        gather=inputs.gather,
    )


def _build_vllm(inputs: GeneratorInputs) -> Policy:
    settings = inputs.vllm
    # Under torchrun each rank's engine joins the existing process group as its own replica.
    launcher: dict[str, Any] = {}
    if inputs.distributed:
        launcher["distributed_executor_backend"] = "external_launcher"
    return VLLMPolicy(
        inputs.source,
        inputs.tokenizer,
        dtype=inputs.dtype,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_gib=settings.kv_cache_gib,
        enforce_eager=settings.enforce_eager,
        seed=inputs.seed,
        sleep=settings.sleep,
        export=inputs.export,
        **launcher,
    )


BACKENDS: Final[Mapping[str, Backend]] = MappingProxyType(
    {
        "hf": Backend(_build_hf),
        "vllm": Backend(_build_vllm, requires="vllm", install=VLLM_INSTALL),
    }
)
"""Generator backends by ``rollout.backend`` name."""
