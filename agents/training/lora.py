"""LoRA adapters (through ``peft``): apply, merged weights; the KL reference needs no second model.

With ``model.lora.r > 0`` only the low-rank adapters train (W' = W + (α/r)·B·A on the target
linear layers, LoRA Eq. 3); the base weights stay frozen. Two consequences:

* The KL reference policy is the base model itself: the same :class:`peft.PeftModel` with its
  adapters disabled (:func:`agents.training.reference.adapter_disabled_logprobs`, which
  :func:`~agents.training.reference.build_reference` picks for a PEFT model), so no frozen copy of
  the model is held.
* Generation sees the updated policy without any copy for the transformers backend (the
  generator *is* the PeftModel); a vLLM engine reloads :func:`merged_state_dict`, the base-named
  weights with the adapters folded in, computed without touching the training model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

INSTALL = "pip install 'holderpo-agents[lora]'  (or: pip install peft)"


@dataclass(frozen=True)
class LoraSettings:
    """Shape of the LoRA adapters (``model.lora.*``)."""

    r: int = 0
    """Rank of each adapter (0 turns LoRA off)."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Names of the linear layers that get adapters (``("all-linear",)``: every linear layer but
    the output head)."""

    def __post_init__(self) -> None:
        if self.r < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"model.lora needs r >= 0, alpha > 0 and 0 <= dropout < 1 (got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout})"
            )
        if not self.target_modules:
            raise ValueError(
                "model.lora.target_modules is empty; name layers, e.g. [q_proj, v_proj]"
            )


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"LoRA needs the peft package: {INSTALL}") from exc
    return peft


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap a causal LM in LoRA adapters; only the adapters keep ``requires_grad``.

    Args:
        model: a transformers causal LM.
        settings: adapter rank, scale, dropout and target layers.

    Returns:
        The :class:`peft.PeftModel` (it shares the base weights with ``model``).
    """
    if settings.r == 0:
        raise ValueError("apply_lora with r=0: leave LoRA off instead (model.lora.r=0)")
    peft = _peft()
    targets: str | list[str] = list(settings.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model weights with the active adapters merged in (W + ΔW), under the base names.

    The training model is not modified (unlike peft's ``merge_and_unload``); the result loads
    with ``strict=True`` into a plain model of the base architecture (e.g. a vLLM reload).
    """
    from peft.tuners.lora import LoraLayer

    peft_model: Any = model
    base = peft_model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            layer: Any = module
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    delta = layer.get_delta_weight(adapter)  # [out, in] (α/r)·B·A
                    deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    merged: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        merged[key] = value.detach().clone()
        if key in deltas:
            merged[key] += deltas[key].to(value.dtype)
    return merged
