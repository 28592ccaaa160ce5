"""The transformers backend: batched sampling with the training model itself, CPU or GPU.

:class:`HFPolicy` *is* the training model (same object), so :meth:`HFPolicy.sync` has nothing to
copy. The sampling loop is written here: left-padded batch, position ids from the attention mask,
one prefill (each distinct prompt once, only the last position through the output head), then one
forward per new token with a KV cache allocated once. ``allowed`` responses are decoded through a
:class:`TokenTrie` of their tokens. The conventions every backend keeps are in
:mod:`agents.generation.base`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from agents.generation.base import ChatPolicy, GatherWeights
from agents.types import Generation, SamplingParams


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


class HFPolicy(ChatPolicy):
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
        gather: GatherWeights | None = None,
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
            gather: holds the model's full parameters during :meth:`generating` (a sharded
                model: the runtime passes FSDP2's gather); default nothing to hold.
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
        self._gather = gather

    def sync(self, model: torch.nn.Module) -> None:
        """Nothing to do when ``model`` is the generator itself; else copy its weights."""
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    @contextmanager
    def generating(self) -> Iterator[None]:
        """The full parameters on every rank during the block (``gather``; else nothing to do)."""
        with self._gather(self.model) if self._gather else contextlib.nullcontext():
            yield

    def generate_ids(
        self,
        ids: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        allowed: Sequence[Sequence[str] | None] | None = None,
    ) -> list[Generation]:
        """As :meth:`generate`, from already tokenized (e.g. truncated) prompts."""
        self.check_request(ids, params)
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
