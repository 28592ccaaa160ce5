r"""Policies: batched generation from chat prompts, with log-probs, stop strings and constraints.

One protocol, :class:`Policy`, and two backends, registered in :data:`BACKENDS` under the names
``rollout.backend`` takes (``hf``, ``vllm``):

* :class:`HFPolicy`: transformers, CPU or GPU. The generator *is* the training model (same object),
  so :meth:`HFPolicy.sync` has nothing to copy. The sampling loop is written here: left-padded
  batch, position ids from the attention mask, one prefill (each distinct prompt once, only the
  last position through the output head), then one forward per new token with a KV cache
  allocated once.
* :class:`VLLMPolicy`: vLLM (the ``vllm`` extra, ``pip install "holderpo-agents[vllm]"``),
  colocated with the learner on one GPU; :meth:`VLLMPolicy.sync` pushes the learner's weights after
  each update.

Weight sync, the seam between learner and generator, has two halves: a :data:`WeightExport`
(learner model -> full, base-named tensors: the plain state dict, LoRA merged, FSDP2 gathered;
chosen by ``agents.run.runtime``) and the generator's ``load_weights`` (in place for the colocated
engine; a server engine would receive the same tensors over the wire, see ``docs/scale_out.md``).

Conventions shared by both backends:

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
  restricted to a token trie of the tokenized strings, each followed by EOS. A response cut short by
  ``max_new_tokens`` is a prefix of an allowed string: give room for the longest one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Protocol, runtime_checkable

import torch

from agents.types import Generation, SamplingParams

Message = dict[str, str]
"""One chat message: ``{"role": ..., "content": ...}``."""

VLLM_INSTALL: Final = 'pip install "holderpo-agents[vllm]"'

WeightExport = Callable[[torch.nn.Module], Mapping[str, torch.Tensor]]
"""Learner model -> the full weights under the base model's checkpoint names (what a generator
that holds its own copy loads)."""

VLLM_MODES: Final = ("colocate",)
"""Values of ``rollout.vllm.mode`` (a server mode is the next one: ``docs/scale_out.md``)."""


@runtime_checkable
class Policy(Protocol):
    """What the rollout and the evaluator need from a generator."""

    tokenizer: Any
    """The Hugging Face tokenizer (chat template, decode)."""
    max_context: int
    """Longest prompt + response, in tokens."""
    pad_id: int
    """Padding token id (used by :func:`agents.types.collate`)."""

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        params: SamplingParams,
        *,
        allowed: Sequence[Sequence[str] | None] | None = None,
    ) -> list[Generation]:
        """One response per chat prompt, in order (see the module docstring for conventions)."""
        ...

    def prompt_ids(self, prompt: Sequence[Message]) -> list[int]:
        """Token ids of one rendered chat prompt (generation prompt appended)."""
        ...

    def sync(self, model: torch.nn.Module) -> None:
        """Make the generator use the weights of the learner's ``model`` (after every update)."""
        ...

    def generating(self) -> contextlib.AbstractContextManager[None]:
        """Hold what generation needs during the block.

        A sharded HF model: its gathered parameters; vLLM with sleep mode: the engine awake (asleep
        again after the block).
        """
        ...

    def close(self) -> None:
        """Release what the generator holds beyond the training model (an engine)."""
        ...


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


class TokenTrie:
    """Prefix tree over token sequences; node 0 is the root."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        if not sequences:
            raise ValueError("a constraint needs at least one allowed response")
        self.children: list[dict[int, int]] = [{}]
        for seq in sequences:
            node = 0
            for tok in seq:
                nxt = self.children[node].get(tok)
                if nxt is None:
                    nxt = len(self.children)
                    self.children.append({})
                    self.children[node][tok] = nxt
                node = nxt

    @classmethod
    def from_strings(cls, tokenizer: Any, allowed: Sequence[str], eos_id: int) -> TokenTrie:
        """Trie of each string's tokens (no special tokens added) followed by ``eos_id``."""
        seqs = [
            list(tokenizer(s, add_special_tokens=False)["input_ids"]) + [eos_id] for s in allowed
        ]
        return cls(seqs)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block; the previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def sample_next(
    choice_logp: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row from (constrained) log-probs ``choice_logp`` [B, V] -> [B]."""
    if params.greedy:
        return choice_logp.argmax(dim=-1)
    probs = choice_logp.softmax(dim=-1)  # [B, V] renormalised over the allowed tokens
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
        outside = sorted_p.cumsum(dim=-1) - sorted_p > params.top_p  # mass before token > top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _ChatPolicy:
    """What both backends share: chat prompts to token ids, and the checks of a request."""

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

    def _check_request(self, ids: Sequence[Sequence[int]], params: SamplingParams) -> None:
        """Raise ``ValueError`` for bad sampling parameters, empty or over-long prompts."""
        _check_params(params)
        for row in ids:
            if not row:
                raise ValueError("empty prompt: a prompt needs at least one token")
            if len(row) + params.max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt of {len(row)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                    f"max_context={self.max_context}: truncate the prompt ids (generate_ids) or "
                    "lower max_new_tokens"
                )


class HFPolicy(_ChatPolicy):
    """The transformers backend; generates with the training model itself."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_context: int | None = None,
        seed: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        last_logits_only: bool = True,
        share_prefill: bool = True,
        reserve_cache: bool = True,
    ) -> None:
        """Wrap a causal LM and its tokenizer.

        The last three switches are savings that leave the results unchanged (to float
        tolerance); turning them off gives the plain loop, for benchmarks.

        Args:
            model: a transformers causal LM (moved in place when ``device``/``dtype`` are given).
            tokenizer: its tokenizer; needs an EOS token.
            device: where to run; default the model's device.
            dtype: cast the model to this dtype (e.g. bfloat16 on GPU); default unchanged.
            max_context: longest prompt + response; default the model's max positions.
            seed: seed of the sampling generator (reproducible sampling); default unseeded.
            autocast_dtype: run the forward passes under ``torch.autocast`` with this dtype
                (``None``: the model's own dtype).
            last_logits_only: at prefill, only the last position goes through the output head.
            share_prefill: prompts with identical ids are prefilled once and their KV cache is
                copied to the duplicates (the rollouts of a group at their first turn).
            reserve_cache: the KV cache is allocated once for prompt + ``max_new_tokens`` and
                filled in place, instead of being concatenated anew at every token.
        """
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "HFPolicy needs a tokenizer with an EOS token (set tokenizer.eos_token)"
            )
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_context = int(max_context or model.config.max_position_embeddings)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.autocast_dtype = autocast_dtype
        self.last_logits_only = last_logits_only
        self.share_prefill = share_prefill
        self.reserve_cache = reserve_cache
        self._cache_keyword = _cache_keyword(model)

    def sync(self, model: torch.nn.Module) -> None:
        """Nothing to do when ``model`` is the generator itself; else copy its weights."""
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    @contextmanager
    def generating(self) -> Iterator[None]:
        """The full parameters on every rank during the block (FSDP2; else nothing to do)."""
        from agents.training.distributed import gathered_for_generation

        with gathered_for_generation(self.model):
            yield

    def generate_ids(
        self,
        ids: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        allowed: Sequence[Sequence[str] | None] | None = None,
    ) -> list[Generation]:
        """As :meth:`generate`, from already tokenized (e.g. truncated) prompts."""
        self._check_request(ids, params)
        eos = self.tokenizer.eos_token_id
        tries = [
            TokenTrie.from_strings(self.tokenizer, a, eos) if a is not None else None
            for a in (allowed if allowed is not None else [None] * len(ids))
        ]
        with torch.inference_mode(), eval_mode(self.model), self._autocast():
            tokens, logprobs = self._decode(ids, params, tries)
        return [
            Generation(
                prompt_ids=tuple(int(t) for t in p),
                response_ids=tuple(r),
                logprobs=tuple(lp),
                text=str(self.tokenizer.decode(r, skip_special_tokens=True)),
            )
            for p, r, lp in zip(ids, tokens, logprobs, strict=True)
        ]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _decode(
        self,
        ids: Sequence[Sequence[int]],
        params: SamplingParams,
        tries: Sequence[TokenTrie | None],
    ) -> tuple[list[list[int]], list[list[float]]]:
        """The sampling loop: one prefill of the prompts, then one cached forward per token."""
        logits, cache, mask, last = self._prefill(ids, params.max_new_tokens)  # [B, V] ...
        width = mask.shape[1] - params.max_new_tokens  # P
        temperature = 1.0 if params.greedy else params.temperature
        rows = [_Row(trie) for trie in tries]
        for step in range(1, params.max_new_tokens + 1):
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, V]
            chosen = sample_next(logp + self._constraint(rows, logp), params, self.generator)  # [B]
            chosen_logp = logp.gather(-1, chosen[:, None]).squeeze(-1)  # [B]
            for row, tok, lp in zip(rows, chosen.tolist(), chosen_logp.tolist(), strict=True):
                if not row.done:
                    row.append(tok, lp)
                    row.done = row.done or self._ends(row, tok, params.stop)
            if step == params.max_new_tokens or all(row.done for row in rows):
                break
            logits = self.model(
                input_ids=chosen[:, None],  # [B, 1]
                attention_mask=mask[:, : width + step],  # [B, P + step]
                position_ids=last + step,  # [B, 1]
                use_cache=True,
                **{self._cache_keyword: cache},
            ).logits[:, -1]  # [B, V]
        return [row.tokens for row in rows], [row.logprobs for row in rows]

    def _prefill(
        self, ids: Sequence[Sequence[int]], max_new_tokens: int
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """One forward over the left-padded prompts (each distinct prompt once).

        Returns:
            The next-token logits [B, V], the KV cache of the prompts (room for
            ``max_new_tokens`` more), the attention mask of prompt and response [B, P + N] (ones
            over the response columns) and the position of each row's last prompt token [B, 1].
        """
        first, inverse = _distinct(ids) if self.share_prefill else (list(ids), None)
        input_ids, mask = _left_pad(first, self.pad_id, self.device)  # [U, P]
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # [U, P]
        cache = _new_cache(self.model, mask.shape[1] + max_new_tokens, reserve=self.reserve_cache)
        head = {"logits_to_keep": 1} if self.last_logits_only else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_keyword: cache},
            **head,
        )
        logits = out.logits[:, -1]  # [U, V]
        if inverse is not None and len(first) < len(ids):
            index = torch.tensor(inverse, device=self.device)  # [B] row -> its distinct prompt
            cache.batch_select_indices(index)
            logits, mask, positions = logits[index], mask[index], positions[index]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], max_new_tokens))], dim=-1)
        return logits, cache, mask, positions[:, -1:]

    def _constraint(self, rows: Sequence[_Row], logp: torch.Tensor) -> torch.Tensor:
        """Additive mask [B, V]: 0 on tokens a row may take next, -inf elsewhere (0 if free)."""
        bound = [b for b, row in enumerate(rows) if row.trie is not None and not row.done]
        if not bound:
            return torch.zeros_like(logp[:, :1])  # [B, 1] broadcasts
        bias = torch.zeros_like(logp)  # [B, V]
        bias[bound] = float("-inf")
        nodes = [rows[b].trie.children[rows[b].node] for b in bound]  # type: ignore[union-attr]
        at = [b for b, node in zip(bound, nodes, strict=True) for _ in node]
        bias[at, [tok for node in nodes for tok in node]] = 0.0
        return bias

    def _ends(self, row: _Row, tok: int, stop: Sequence[str]) -> bool:
        """True when ``tok``, just appended to ``row``, is EOS or completes a stop string."""
        if tok in self.eos_ids:
            return True
        if not stop:
            return False
        # A stop string of n characters spans at most 4n byte-level tokens; the window holds it.
        window = row.tokens[-(4 * max(len(s) for s in stop) + 1) :]
        text = self.tokenizer.decode(window, skip_special_tokens=False)
        return any(s in text for s in stop)


class _Row:
    """Decoding state of one batch row."""

    def __init__(self, trie: TokenTrie | None) -> None:
        self.trie = trie
        self.node = 0
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.done = False

    def append(self, tok: int, logprob: float) -> None:
        """Add a token; a constrained row is done when its trie path ends."""
        self.tokens.append(tok)
        self.logprobs.append(logprob)
        if self.trie is not None:
            self.node = self.trie.children[self.node][tok]
            self.done = not self.trie.children[self.node]


def _check_params(params: SamplingParams) -> None:
    """Raise ``ValueError`` on sampling parameters the loop cannot honour."""
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={params.max_new_tokens}: generate at least one token")
    if not params.greedy and params.temperature <= 0:
        raise ValueError(
            f"temperature={params.temperature} with sampling: use a positive temperature, "
            "or greedy=True for arg-max decoding"
        )
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p={params.top_p} must be in (0, 1]")


def _left_pad(
    ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``, both [B, P]."""
    length = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for b, row in enumerate(ids):
        if not row:
            raise ValueError("empty prompt: a prompt needs at least one token")
        input_ids[b, length - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[b, length - len(row) :] = 1
    return input_ids.to(device), mask.to(device)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS plus the generation config's EOS id(s)."""
    ids = {int(tokenizer.eos_token_id)}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos is not None:
        ids.update(int(i) for i in config_eos)
    return frozenset(ids)


def _distinct(ids: Sequence[Sequence[int]]) -> tuple[list[Sequence[int]], list[int]]:
    """The distinct prompts in order of first appearance, and each row's index among them."""
    seen: dict[tuple[int, ...], int] = {}
    inverse = [seen.setdefault(tuple(row), len(seen)) for row in ids]
    first = {index: row for row, index in zip(ids, inverse, strict=True)}
    return [first[i] for i in range(len(seen))], inverse


def _cache_keyword(model: Any) -> str:
    """The forward argument that takes the KV cache (``cache``, formerly ``past_key_values``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _new_cache(model: Any, capacity: int, *, reserve: bool) -> Any:
    """An empty KV cache for ``model``.

    With ``reserve``, its full-attention layers hold ``capacity`` positions allocated once (see
    :func:`_reserved_layer_class`).
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=model.config)
    if reserve:
        reserved = _reserved_layer_class()
        cache.layers = [
            reserved(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
        ]
    return cache


@functools.cache
def _reserved_layer_class() -> type:
    """:class:`ReservedLayer`, defined on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A full-attention cache layer with storage for ``capacity`` positions, filled in place.

        ``keys``/``values`` are views of the filled part, so a decoding step writes one position
        instead of copying the whole cache (as concatenation does).
        """

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            batch, heads, _, k_dim = key_states.shape
            v_dim = value_states.shape[-1]
            self.device = key_states.device
            self.key_store = key_states.new_empty((batch, heads, self.capacity, k_dim))
            self.value_store = value_states.new_empty((batch, heads, self.capacity, v_dim))
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache reserved for {self.capacity} positions, asked {end}")
            self.key_store[:, :, self.length : end] = key_states
            self.value_store[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.key_store[:, :, :end], self.value_store[:, :, :end]

        def _views(self) -> None:
            self.keys = self.key_store[:, :, : self.length]  # [B, H, S, D]
            self.values = self.value_store[:, :, : self.length]

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return self.capacity

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self.key_store = self.key_store[indices]
                self.value_store = self.value_store[indices]
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.key_store = self.key_store.repeat_interleave(repeats, dim=0)
                self.value_store = self.value_store.repeat_interleave(repeats, dim=0)
                self._views()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes the (negative) number of positions to remove")
            self.length = max(self.length + tokens_to_remove, 0)
            if self.is_initialized:
                self._views()

        def reset(self) -> None:
            self.length = 0
            if self.is_initialized:
                self._views()

    return ReservedLayer


@dataclass(frozen=True)
class VLLMSettings:
    """The vLLM engine (``rollout.vllm.*``; used when ``rollout.backend=vllm``)."""

    mode: str = "colocate"
    """``colocate``: the engine runs in the trainer's process, on its device, and reloads the
    learner's weights in place after every update (the one mode so far; see :data:`VLLM_MODES`)."""
    gpu_memory_utilization: float = 0.4
    """Share of the GPU's memory the engine may take (weights and KV cache); the learner needs the
    rest. Unused on CPU."""
    kv_cache_gib: float | None = None
    """KV-cache size in GiB; ``None``: on GPU what ``gpu_memory_utilization`` leaves, on CPU
    1 GiB."""
    sleep: bool = True
    """Outside generation the engine sleeps (weights offloaded to CPU memory, KV cache freed), so
    that the update has the GPU; only where the platform has vLLM's sleep mode (CUDA, ROCm),
    elsewhere the engine stays awake."""
    enforce_eager: bool | None = None
    """Skip CUDA graphs and ``torch.compile``; ``None``: yes on CPU, no on GPU."""

    def __post_init__(self) -> None:
        if self.mode not in VLLM_MODES:
            raise ValueError(
                f"rollout.vllm.mode={self.mode!r} is not available; use one of {list(VLLM_MODES)} "
                "(a server mode is planned: docs/scale_out.md)"
            )
        if not 0 < self.gpu_memory_utilization < 1:
            raise ValueError(
                f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization} must be in "
                "(0, 1), e.g. 0.4 (the learner uses the rest of the GPU)"
            )
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(
                f"rollout.vllm.kv_cache_gib={self.kv_cache_gib} must be > 0 GiB, or null"
            )


class VLLMPolicy(_ChatPolicy):
    """The vLLM backend (``vllm`` extra): a vLLM engine in this process, beside the learner.

    The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless already set), so that
    :meth:`sync` hands the learner's tensors to the engine's model without serialising them, and
    so that no engine process is spawned. Requests are token ids rendered by :func:`encode_prompt`
    (the same ids as :class:`HFPolicy`). Log-probs come from the engine in ``processed_logprobs``
    mode: ``log_softmax(logits / temperature)`` of the sampled token, which is the
    :class:`HFPolicy` quantity when ``top_p == 1`` and no constraint applies. With ``top_p < 1``
    or ``allowed``, vLLM reports the log-prob of its truncated / masked distribution (a forced
    token gets 0); the learner's recomputation is the reference there. ``allowed`` uses vLLM's
    structured outputs (a choice grammar), which admits any tokenization of an allowed string, not
    only the one :class:`TokenTrie` builds.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        tokenizer: Any = None,
        *,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.4,
        kv_cache_gib: float | None = None,
        max_context: int | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        sleep: bool = False,
        export: WeightExport | None = None,
        **engine_kwargs: Any,
    ) -> None:
        """Start a vLLM engine on ``model`` (e.g. a directory from ``models.resolve_model``).

        Args:
            model: model directory or hub id.
            tokenizer: its Hugging Face tokenizer; default loaded from ``model``.
            dtype: engine dtype; default ``"bfloat16"`` on GPU and ``"float32"`` on CPU (as
                ``agents.generation.models.load_policy_model``).
            gpu_memory_utilization: share of GPU memory for the engine (the learner needs the
                rest); unused on CPU.
            kv_cache_gib: KV-cache size in GiB; default: on GPU what ``gpu_memory_utilization``
                leaves, on CPU 1 GiB.
            max_context: longest prompt + response; default the model's.
            enforce_eager: skip CUDA graphs and ``torch.compile``; default True on CPU, False on
                GPU.
            seed: engine sampling seed.
            sleep: sleep outside :meth:`generating` blocks where the platform supports it (see
                :attr:`VLLMSettings.sleep`); :attr:`sleeps` says whether it does.
            export: the learner model's weights for :meth:`sync` (default its ``state_dict``;
                LoRA and FSDP2 need theirs, see ``agents.run.runtime.weight_export``).
            **engine_kwargs: passed to ``vllm.LLM``.

        Raises:
            ImportError: when vLLM is not installed (the message names the install command).
            ValueError: on CPU, when the model's attention head size is one vLLM's CPU attention
                kernels lack (the message lists the supported sizes).
        """
        try:
            import vllm
        except ImportError as err:
            raise ImportError(f"VLLMPolicy needs vLLM: run `{VLLM_INSTALL}`") from err
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            _check_cpu_head_size(model)
        if kv_cache_gib is None and on_cpu:
            kv_cache_gib = 1.0
        if kv_cache_gib is not None:
            engine_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * 2**30))
        self.sleeps = sleep and current_platform.is_sleep_mode_available()
        """Whether the engine sleeps outside :meth:`generating` blocks."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = vllm.LLM(
            model=os.fspath(model),
            dtype=dtype or ("float32" if on_cpu else "bfloat16"),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_context,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleeps,
            **engine_kwargs,
        )
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(os.fspath(model))
        self.max_context = int(self.llm.llm_engine.model_config.max_model_len)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.export: WeightExport = export or _state_dict
        self._asleep = False

    def generate_ids(
        self,
        ids: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        allowed: Sequence[Sequence[str] | None] | None = None,
    ) -> list[Generation]:
        """As :meth:`generate`, from already tokenized (e.g. truncated) prompts."""
        self._check_request(ids, params)
        per_prompt = allowed if allowed is not None else [None] * len(ids)
        requests = [{"prompt_token_ids": [int(t) for t in row]} for row in ids]
        sampling = [_vllm_sampling(params, a) for a in per_prompt]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [
            self._generation(row, out.outputs[0]) for row, out in zip(ids, outputs, strict=True)
        ]

    def _generation(self, prompt_ids: Sequence[int], sample: Any) -> Generation:
        """A :class:`Generation` from a vLLM ``CompletionOutput`` (one log-prob dict per token)."""
        tokens = [int(t) for t in sample.token_ids]
        logprobs = [float(step[t].logprob) for step, t in zip(sample.logprobs, tokens, strict=True)]
        return Generation(
            prompt_ids=tuple(int(t) for t in prompt_ids),
            response_ids=tuple(tokens),
            logprobs=tuple(logprobs),
            text=str(self.tokenizer.decode(tokens, skip_special_tokens=True)),
        )

    def sync(self, model: torch.nn.Module) -> None:
        """Load the learner's weights (:attr:`export` of ``model``) into the engine."""
        self.load_weights(self.export(model).items())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full, checkpoint-named weights into the engine's model, then drop cached prefixes.

        The receiving half of the sync seam. Uses the worker's in-place ``reload_weights``
        (checkpoint names, e.g. separate q/k/v projections, are mapped onto the engine's fused
        layers, and kernel-specific weight layouts such as the CPU backend's packed GEMM weights
        are rebuilt); a sleeping engine is woken first.
        """
        self._wake()
        named = [(name, tensor.detach()) for name, tensor in weights]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()

    @contextmanager
    def generating(self) -> Iterator[None]:
        """The engine awake during the block; asleep after it when :attr:`sleeps`.

        Sleep level 1: the weights wait in CPU memory, the KV cache is freed.
        """
        self._wake()
        try:
            yield
        finally:
            if self.sleeps:
                self.llm.sleep(level=1)
                self._asleep = True

    def close(self) -> None:
        """Shut the engine down (with the process group vLLM set up for it, if any)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


def _state_dict(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """The default :data:`WeightExport`: the model's own state dict (no copy)."""
    return model.state_dict()


def _vllm_sampling(params: SamplingParams, allowed: Sequence[str] | None) -> Any:
    """The vLLM sampling parameters of one request.

    A sampled request's seed is drawn from torch's global generator, so that a run seeded per
    iteration (``agents.run.runtime.seed_everything``) samples the same responses when resumed.
    """
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = StructuredOutputsParams(choice=list(allowed)) if allowed is not None else None
    return VllmSamplingParams(
        temperature=0.0 if params.greedy else params.temperature,
        top_p=1.0 if params.greedy else params.top_p,
        max_tokens=params.max_new_tokens,
        stop=list(params.stop),
        include_stop_str_in_output=True,
        skip_special_tokens=False,  # stop strings see special tokens, as in HFPolicy
        logprobs=0,  # the sampled token's log-prob only
        structured_outputs=structured,
        seed=None if params.greedy else int(torch.randint(2**31 - 1, ()).item()),
    )


def _check_cpu_head_size(model: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` when vLLM's CPU attention has no kernel for the model's head size."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(os.fspath(model))
    text = getattr(config, "text_config", None) or config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(
            f"{model}: attention head size {head} is not supported by vLLM's CPU attention "
            f"(supported: {supported}); use a model with one of these sizes (for the built-in tiny "
            "model, agents.generation.models.TinyConfig(num_heads=2) gives 32) or HFPolicy"
        )


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
