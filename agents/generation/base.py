r"""What every generator backend shares: chat rendering, the request checks, the weight-sync seam.

A backend implements the :class:`agents.types.Policy` protocol; :class:`ChatPolicy` gives it
``generate`` (chat prompts -> token ids -> ``generate_ids``), ``prompt_ids`` and the checks of a
request, so a backend writes ``generate_ids``, ``sync`` and ``generating``.

Conventions shared by every backend:

* Prompts are chat messages (``[{"role": ..., "content": ...}, ...]``) rendered with the tokenizer's
  chat template and ``add_generation_prompt=True``. A tokenizer without a template gets the fallback
  of :func:`render_chat` (``"<role>: <content>\n"`` per message, then ``"assistant: "``).
* ``Generation.logprobs`` are log-probs of the sampled tokens under the model's temperature-scaled
  distribution, ``log_softmax(logits / temperature)`` (temperature 1 for greedy decoding). Top-p
  truncation and ``allowed`` constraints change which token is drawn but not the reported log-prob:
  they are the *unconstrained* model's log-probs, the quantity the learner recomputes when it
  evaluates the policy ratio on the same tokens.
* A response ends with EOS (kept), with the token that completes the first stop string (kept; the
  text can run past the stop string by the rest of that token), or at ``max_new_tokens``.
* ``allowed[i]``, when given, is a list of strings the i-th response must equal exactly. Decoding is
  restricted to these strings, each followed by EOS. A response cut short by ``max_new_tokens`` is
  a prefix of an allowed string: give room for the longest one.

Weight sync, the seam between learner and generator, has two halves: a :data:`WeightExport`
(learner model -> full, base-named tensors: the plain state dict, LoRA merged, FSDP2 gathered;
chosen by ``agents.run.runtime``) and the generator's ``load_weights`` (in place for the colocated
engine; a server engine would receive the same tensors over the wire, see ``docs/scale_out.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from agents.types import Generation, Message, SamplingParams

WeightExport = Callable[[torch.nn.Module], Mapping[str, torch.Tensor]]
"""Learner model -> the full weights under the base model's checkpoint names (what a generator
that holds its own copy loads)."""

GatherWeights = Callable[[torch.nn.Module], contextlib.AbstractContextManager[Any]]
"""Training model -> a context that holds its full parameters on this process during the block
(FSDP2: ``agents.training.distributed.gathered_for_generation``; the runtime passes it)."""


def render_chat(tokenizer: Any, prompt: Sequence[Message]) -> str:
    """The prompt text: the chat template with a generation prompt, or the plain fallback."""
    messages = [dict(m) for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return str(text)
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return f"{lines}assistant: "


def encode_prompt(tokenizer: Any, prompt: Sequence[Message]) -> list[int]:
    """Token ids of :func:`render_chat` (the template carries its own special tokens)."""
    return list(tokenizer(render_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def check_params(params: SamplingParams) -> None:
    """Raise ``ValueError`` on sampling parameters no backend can honour."""
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={params.max_new_tokens}: generate at least one token")
    if not params.greedy and params.temperature <= 0:
        raise ValueError(
            f"temperature={params.temperature} with sampling: use a positive temperature, "
            "or greedy=True for arg-max decoding"
        )
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p={params.top_p} must be in (0, 1]")


class ChatPolicy:
    """What every backend shares: chat prompts to token ids, and the checks of a request."""

    tokenizer: Any
    max_context: int

    def prompt_ids(self, prompt: Sequence[Message]) -> list[int]:
        """Token ids of one rendered chat prompt."""
        return encode_prompt(self.tokenizer, prompt)

    def close(self) -> None:
        """Nothing to release (a backend with an engine overrides this)."""

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        params: SamplingParams,
        *,
        allowed: Sequence[Sequence[str] | None] | None = None,
    ) -> list[Generation]:
        """One response per prompt (conventions in the module docstring).

        Args:
            prompts: chat prompts.
            params: sampling parameters.
            allowed: per prompt, the responses it may produce (``None``: free text).

        Returns:
            Generations in the order of ``prompts``.

        Raises:
            ValueError: when a prompt plus ``max_new_tokens`` exceeds ``max_context`` (truncate the
                prompt ids, see :meth:`prompt_ids`), ``allowed`` has the wrong length, or the
                sampling parameters are out of range (temperature <= 0 without greedy, top_p
                outside (0, 1], max_new_tokens < 1).
        """
        if not prompts:
            return []
        if allowed is not None and len(allowed) != len(prompts):
            raise ValueError(f"allowed has {len(allowed)} entries for {len(prompts)} prompts")
        return self.generate_ids([self.prompt_ids(p) for p in prompts], params, allowed=allowed)

    def generate_ids(
        self,
        ids: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        allowed: Sequence[Sequence[str] | None] | None = None,
    ) -> list[Generation]:
        """As :meth:`generate`, from already tokenized (e.g. truncated) prompts."""
        raise NotImplementedError

    def check_request(self, ids: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """Raise ``ValueError`` for bad sampling parameters, empty or over-long prompts."""
        check_params(params)
        for row in ids:
            if not row:
                raise ValueError("empty prompt: a prompt needs at least one token")
            if len(row) + params.max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt of {len(row)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                    f"max_context={self.max_context}: truncate the prompt ids (generate_ids) or "
                    "lower max_new_tokens"
                )
