"""The KL reference policy π_ref, built in one place (one process or many, LoRA or not).

:func:`build_reference` is the one entry: no reference without a KL penalty; under LoRA the
training model itself with its adapters disabled (the base policy, no second model held); else a
frozen copy of the model taken before it is sharded and sharded like it (:func:`frozen_reference`;
in one process the copy is not sharded). Each is a :class:`Reference`, called by the learner on
every micro-batch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from agents.training.distributed import ONE_PROCESS, DistContext, shard_model
from agents.training.logprobs import LOGPROB_CHUNK_TOKENS, token_logprobs
from agents.types import Batch

ReferenceLogprobs = Callable[[Batch, float], torch.Tensor]
"""Reference-policy log-probs of a micro-batch at a sampling temperature:
``(Batch [n, l], T) -> Tensor [n, l]`` (no grad)."""


@dataclass(frozen=True, eq=False)
class Reference:
    """π_ref as a :data:`ReferenceLogprobs` callable."""

    model: nn.Module
    """The module that computes it: a frozen copy of the initial model, or the LoRA training
    model itself (``adapters_off``)."""
    adapters_off: bool = False
    """``model`` is a PEFT model whose forward runs with its adapters disabled (the base policy)."""
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS
    """Loss tokens per output-head chunk (``trainer.logprob_chunk_tokens``)."""

    def __call__(self, micro: Batch, temperature: float) -> torch.Tensor:
        """Log-probs [n, l] of ``micro``'s tokens under π_ref at temperature ``temperature``."""
        peft_model: Any = self.model
        adapters = peft_model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with torch.no_grad(), adapters:
            logp, _ = token_logprobs(
                self.model, micro, temperature=temperature, chunk_tokens=self.chunk_tokens
            )
        return logp

    @property
    def held(self) -> nn.Module | None:
        """The second model this reference keeps in memory (``None`` under LoRA)."""
        return None if self.adapters_off else self.model


def build_reference(
    model: nn.Module,
    *,
    kl_coef: float,
    ctx: DistContext = ONE_PROCESS,
    chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
) -> Reference | None:
    """The KL reference of a run; call it after LoRA is applied and before :func:`shard_model`.

    Args:
        model: the training model (a PEFT model under LoRA), not yet sharded.
        kl_coef: the loss's KL weight; 0 builds nothing.
        ctx: the process context (the frozen copy is sharded as the model will be).
        chunk_tokens: loss tokens per output-head chunk of its log-probs.

    Returns:
        ``None`` without a KL penalty; the adapter-disabled model under LoRA; else a frozen copy.
    """
    if kl_coef <= 0:
        return None
    if hasattr(model, "disable_adapter"):
        return adapter_disabled_logprobs(model, chunk_tokens=chunk_tokens)
    return frozen_reference(model, ctx, chunk_tokens=chunk_tokens)


def frozen_reference(
    model: nn.Module, ctx: DistContext = ONE_PROCESS, *, chunk_tokens: int = LOGPROB_CHUNK_TOKENS
) -> Reference:
    """A frozen copy of ``model``, sharded like the training model (call before shard_model)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        raise ValueError(
            "the KL reference needs the unsharded model: build it (agents.training.reference."
            "build_reference) before shard_model, or train LoRA adapters (model.lora.r > 0)"
        )
    frozen = copy.deepcopy(model).eval()
    for param in frozen.parameters():
        param.requires_grad_(False)
    return Reference(shard_model(frozen, ctx), chunk_tokens=chunk_tokens)


def adapter_disabled_logprobs(
    model: nn.Module, *, chunk_tokens: int = LOGPROB_CHUNK_TOKENS
) -> Reference:
    """Reference log-probs of the base model: the PeftModel's forward with its adapters off."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("adapter_disabled_logprobs needs a peft model; call apply_lora first")
    return Reference(model, adapters_off=True, chunk_tokens=chunk_tokens)
