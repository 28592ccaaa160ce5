"""Token log-probs of a causal LM: the distribution the generator sampled from, on loss tokens.

:func:`token_logprobs` is what every part of training computes π with (π_θ, π_old, π_ref and the
entropy): ``log_softmax(logits / T)`` at the sampling temperature ``T``, through the output head
on the positions that carry loss only, in chunks whose logits the backward recomputes, so the
logits [N, L, V] are never held for the whole batch (docs/training.md, "Memory of the output
head").
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from agents.types import Batch

LOGPROB_CHUNK_TOKENS = 256
"""Default loss tokens per output-head chunk of :func:`token_logprobs`
(:attr:`agents.training.learner.LearnerConfig.logprob_chunk_tokens`)."""


def token_logprobs(
    model: nn.Module,
    batch: Batch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = LOGPROB_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each response token given the tokens before it, and optionally the entropy.

    The distribution is the one the generator sampled from, ``log_softmax(logits / T)`` at
    sampling temperature ``T`` (as verl and TRL compute it), so π_θ and π_old agree with the
    generator's log-probs and the first importance ratio is 1 for any ``T``.

    With ``chunk_tokens`` > 0 (:func:`_chunked_token_logprobs`) only the positions that carry loss
    go through the output head, ``chunk_tokens`` at a time, each chunk's logits recomputed in the
    backward instead of saved: peak memory is O(chunk_tokens·V) instead of O(N·K·V). ``0`` or
    ``None`` (or a model whose forward does not return its head's output unchanged) takes the
    unchunked path (:func:`_span_token_logprobs`). Both give the same values and gradients on the
    loss mask.

    Returns:
        ``logp`` [N, L] and ``entropy`` [N, L] or ``None``; 0 at position 0 (which nothing
        predicts) and outside the response span. The chunked path also leaves 0 at the positions
        inside the span that carry no loss (every consumer masks them).
    """
    if chunk_tokens:
        out = _chunked_token_logprobs(
            model, batch, temperature=temperature, with_entropy=with_entropy, chunk=chunk_tokens
        )
        if out is not None:
            return out
    return _span_token_logprobs(model, batch, temperature=temperature, with_entropy=with_entropy)


def _span_token_logprobs(
    model: nn.Module, batch: Batch, *, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unchunked :func:`token_logprobs`: the span first..last through the head in one piece.

    Only the span of positions holding response tokens (in any row) goes through the output
    head: prompts are long and responses short in multi-turn rollouts, and the head with its
    vocabulary-wide softmax would otherwise dominate the cost. The logits [N, K, V] and their
    log-softmax are held for the backward.
    """
    n, length = batch.input_ids.shape
    logp = torch.zeros((n, length), device=batch.input_ids.device)
    entropy = torch.zeros_like(logp) if with_entropy else None
    span = batch.loss_mask[:, 1:].any(0).nonzero().flatten() + 1  # response token positions
    # tokens first..last are predicted from positions first-1..last-1; with no response token the
    # model still runs on one position (a sharded forward is a collective every rank must join)
    first, last = (int(span[0]), int(span[-1])) if span.numel() else (length - 1, length - 1)
    keep = torch.arange(first - 1, last, device=batch.input_ids.device)  # [K]
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        logits_to_keep=keep,
        use_cache=False,  # no KV cache: nothing is decoded after this forward
    ).logits  # [N, K, V]
    log_probs = _log_softmax(logits, temperature)  # [N, K, V]
    targets = batch.input_ids[:, first : last + 1, None]  # [N, K, 1]
    logp = logp.to(log_probs.dtype)
    logp[:, first : last + 1] = torch.gather(log_probs, 2, targets).squeeze(-1)
    if entropy is None:
        return logp, None
    entropy = entropy.to(log_probs.dtype)
    entropy[:, first : last + 1] = -(log_probs.exp() * log_probs).sum(-1)  # [N, K]
    return logp, entropy


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the last axis, in at least float32 -> [..., V]."""
    logits = _at_least_float32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


@dataclass(frozen=True)
class _LossTokens:
    """The response tokens that carry loss, flattened: T of them over the whole micro-batch."""

    keep: torch.Tensor
    """[K] positions whose hidden state predicts a loss token in some row (``logits_to_keep``)."""
    rows: torch.Tensor
    """[T] row of each loss token."""
    cols: torch.Tensor
    """[T] index into ``keep`` of the position predicting it (the token sits at ``keep + 1``)."""
    targets: torch.Tensor
    """[T] the token ids."""

    @classmethod
    def of(cls, batch: Batch) -> _LossTokens:
        """The loss tokens of ``batch`` (ordered row by row, then by position)."""
        predicts = batch.loss_mask[:, 1:].bool()  # [N, L-1]: position j predicts token j+1
        keep = predicts.any(0).nonzero().flatten()  # [K]
        if keep.numel() == 0:  # no response token: one position still runs (a sharded forward
            # is a collective every rank must join)
            keep = torch.full(
                (1,), max(predicts.shape[1] - 1, 0), dtype=torch.long, device=keep.device
            )
        rows, cols = predicts[:, keep].nonzero(as_tuple=True)  # [T], [T]
        return cls(keep, rows, cols, batch.input_ids[rows, keep[cols] + 1])

    def scatter(self, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``values`` [T] laid out at the loss tokens' places of a zero [N, L] tensor."""
        out = values.new_zeros(shape)
        return out.index_put((self.rows, self.keep[self.cols] + 1), values)


def _chunked_token_logprobs(
    model: nn.Module, batch: Batch, *, temperature: float, with_entropy: bool, chunk: int
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """:func:`token_logprobs` through the head ``chunk`` loss tokens at a time, or ``None``.

    The model's own forward runs (so FSDP's hooks, PEFT adapters and gradient checkpointing are
    untouched), with its output head swapped for :func:`_head_in_chunks` for that one call: it
    receives the final hidden states [N, K, H] of the kept positions and returns the packed
    [S, T] log-probs (and entropies) in place of the logits. ``None`` when the model has no
    output head, or its forward does not hand the head's output back unchanged (e.g. a logit
    soft-cap after the head): the caller then takes the unchunked path.
    """
    head = _output_head(model)
    if head is None or type(model) in _UNCHUNKABLE:
        return None
    tokens = _LossTokens.of(batch)
    calls: list[torch.Tensor | None] = []
    head_forward = head.forward

    def chunked_head(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[:2] != (len(batch), len(tokens.keep)) or calls:
            calls.append(None)  # not the call this function expects: let the model go on
            return head_forward(hidden)
        packed = _head_in_chunks(
            head, head_forward, hidden, tokens, temperature, with_entropy, chunk
        )
        calls.append(packed)
        return packed

    with _replaced_forward(head, chunked_head):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            logits_to_keep=tokens.keep,
            use_cache=False,  # no KV cache: nothing is decoded after this forward
        )
    if len(calls) != 1 or calls[0] is None or out.logits is not calls[0]:
        _UNCHUNKABLE.add(type(model))
        warnings.warn(
            f"{type(model).__name__}: its forward does not return its output head's result "
            "unchanged, so token log-probs are computed unchunked (trainer.logprob_chunk_tokens "
            "has no effect on this model)",
            stacklevel=3,
        )
        return None
    packed = out.logits  # [S, T]
    shape = batch.input_ids.shape
    logp = tokens.scatter(packed[0], shape)
    return logp, tokens.scatter(packed[1], shape) if with_entropy else None


_UNCHUNKABLE: set[type] = set()
"""Model classes whose forward changed or bypassed the chunked head (they run unchunked)."""


def _head_in_chunks(
    head: nn.Module,
    head_forward: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    tokens: _LossTokens,
    temperature: float,
    with_entropy: bool,
    chunk: int,
) -> torch.Tensor:
    """Log-probs (row 0) and entropies (row 1, ``with_entropy``) of the loss tokens -> [S, T].

    ``hidden`` [N, K, H] are the final hidden states at ``tokens.keep``. A linear head (the
    transformers models' ``lm_head``) runs each chunk of ``chunk`` tokens through
    :class:`_LinearHeadLogprobs`, which keeps only the chunk's input [chunk, H] and its
    log-normaliser for the backward and recomputes the chunk's logits [chunk, V] there. Any
    other head runs head + :class:`_TokenLogprobEntropy` under non-reentrant activation
    checkpointing, to the same effect. With no loss token one empty chunk still runs, so the
    result depends on every parameter (a backward through it is a valid, zero, collective).
    """
    picked = hidden[tokens.rows, tokens.cols]  # [T, H]
    linear = _plain_linear(head)
    checkpointed = torch.is_grad_enabled() and linear is None
    parts = []
    for start in range(0, max(len(tokens.targets), 1), chunk):
        args = (picked[start : start + chunk], tokens.targets[start : start + chunk])
        if linear is not None:
            part = _LinearHeadLogprobs.apply(*args, *linear, temperature, with_entropy)
        elif checkpointed:
            part = checkpoint(
                _head_chunk, head_forward, *args, temperature, with_entropy, use_reentrant=False
            )
        else:
            part = _head_chunk(head_forward, *args, temperature, with_entropy)
        assert isinstance(part, torch.Tensor)  # for the type checker: apply returns forward's
        parts.append(part)
    return torch.cat(parts, dim=1)


def _plain_linear(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [V, H], bias [V] or None)`` of a head that is an unmodified ``nn.Linear``.

    FSDP2 subclasses the module's class but keeps ``nn.Linear.forward`` (its hooks have
    gathered the full weight by the time the head is called); a PEFT-wrapped or custom head has
    another forward and takes the checkpointed path.
    """
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return head.weight, head.bias
    return None


def _head_chunk(
    head_forward: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> torch.Tensor:
    """One chunk: ``hidden`` [c, H], ``targets`` [c] -> [S, c] (log-prob; entropy)."""
    logits = _at_least_float32(head_forward(hidden))  # [c, V]
    out = _TokenLogprobEntropy.apply(logits, targets, temperature, with_entropy)
    assert isinstance(out, torch.Tensor)  # for the type checker: apply returns forward's result
    return out


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as float32 when they are half precision (the softmax runs in float32 or wider)."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``s = z / T`` in at least float32, in place: ``logits`` is a temporary of the caller."""
    logits = _at_least_float32(logits)
    return logits.div_(temperature) if temperature != 1.0 else logits


def _logprob_stats(
    scaled: torch.Tensor, targets: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log p_y``, ``logsumexp(s)`` and the entropy (empty without it) of ``softmax(s)`` -> [c].

    ``scaled`` [c, V] is overwritten (one [c, V] buffer instead of log-softmax's copies).
    """
    picked = scaled.gather(1, targets[:, None]).squeeze(1)  # [c]
    top = scaled.amax(-1, keepdim=True)  # [c, 1]
    shifted = scaled.sub_(top)  # s - max s  [c, V]
    if with_entropy:  # H = log Σe - Σ e·(s - max) / Σe with e = exp(s - max)
        e = shifted.exp()
        total = e.sum(-1)
        entropy = total.log() - (e.mul_(shifted)).sum(-1) / total
    else:
        total, entropy = shifted.exp_().sum(-1), scaled.new_zeros(0)
    lse = total.log_().add_(top.squeeze(1))  # [c]
    return picked - lse, lse, entropy


def _softmax_grad(
    scaled: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """The gradient [c, V] of the logits z (s = z / T) from ``grad`` [S, c], in place on ``s``.

    With log p = s - logsumexp(s): ∂ log p_y / ∂s = e_y - p and ∂H / ∂s = -p ⊙ (log p + H)
    (H = -Σ p log p); ∂s/∂z = 1/T.
    """
    g_logp = grad[0][:, None] / temperature  # [c, 1]
    log_p = scaled.sub_(lse[:, None])  # [c, V]
    if len(grad) > 1:  # with the entropy
        p = log_p.exp()
        coef = log_p.add_(entropy[:, None]).mul_(grad[1][:, None] / temperature).add_(g_logp)
        grad_z = p.mul_(coef).neg_()  # -p ⊙ (g_logp + g_H (log p + H)) / T
    else:
        grad_z = log_p.exp_().mul_(-g_logp)  # -g_logp · p / T
    return grad_z.scatter_add_(1, targets[:, None], g_logp)  # + g_logp · e_y / T


class _TokenLogprobEntropy(torch.autograd.Function):
    """``log softmax(z / T)[y]`` and the entropy of ``softmax(z / T)`` with a written-out backward.

    Autograd through ``log_softmax`` + ``gather`` + the entropy keeps and re-reads several
    [c, V] tensors; here the forward keeps only ``z`` and the log-normaliser (both recomputed
    under the chunk's checkpoint) and the backward is :func:`_softmax_grad`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        with_entropy: bool,
    ) -> torch.Tensor:
        """``logits`` [c, V] (float32 or wider), ``targets`` [c] -> [S, c]."""
        logp, lse, entropy = _logprob_stats(logits / temperature, targets, with_entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        return torch.stack([logp, entropy]) if with_entropy else logp[None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """``grad`` [S, c] -> the gradient [c, V] of the logits."""
        logits, targets, lse, entropy = ctx.saved_tensors
        scaled = logits / ctx.temperature
        del logits  # (recomputed by the chunk's checkpoint) one [c, V] fewer from here on
        return _softmax_grad(scaled, targets, lse, entropy, grad, ctx.temperature), None, None, None


class _LinearHeadLogprobs(torch.autograd.Function):
    """:class:`_TokenLogprobEntropy` of a linear head's logits ``z = h Wᵀ + b``, fused with it.

    The forward keeps ``h`` [c, H] (a slice of the hidden states autograd holds anyway), the
    log-normaliser and the entropy; the backward recomputes ``z`` (one more head matmul, the
    price of never holding [c, V] between forward and backward), turns it in place into ∂/∂z
    (:func:`_softmax_grad`) and multiplies it back: ∂h = ∂z W, ∂W = (hᵀ ∂z)ᵀ, ∂b = Σ ∂z.
    Without an autograd checkpoint the forward's log-normaliser is not recomputed, and the
    softmax runs in place: this is what keeps the chunked path near the unchunked one's time.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        temperature: float,
        with_entropy: bool,
    ) -> torch.Tensor:
        """``hidden`` [c, H], ``targets`` [c], ``weight`` [V, H], ``bias`` [V] -> [S, c]."""
        scaled = _scaled_logits(F.linear(hidden, weight, bias), temperature)  # [c, V]
        logp, lse, entropy = _logprob_stats(scaled, targets, with_entropy)
        ctx.save_for_backward(hidden, targets, weight, bias, lse, entropy)
        ctx.temperature = temperature
        device = hidden.device.type  # the backward's matmuls run under the forward's autocast
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return torch.stack([logp, entropy]) if with_entropy else logp[None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``grad`` [S, c] -> the gradients of ``hidden``, ``weight`` and ``bias``."""
        hidden, targets, weight, bias, lse, entropy = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        wants_h, _, wants_w, wants_b = ctx.needs_input_grad[:4]
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            scaled = _scaled_logits(F.linear(hidden, weight, bias), ctx.temperature)  # [c, V]
            grad_z = _softmax_grad(scaled, targets, lse, entropy, grad, ctx.temperature)
            grad_z = grad_z.to(weight.dtype)  # [c, V] in the head's dtype, as autograd casts it
            grad_h = (grad_z @ weight).to(hidden.dtype) if wants_h else None  # [c, H]
            grad_w = torch.mm(hidden.t(), grad_z).t().to(weight.dtype) if wants_w else None
        grad_b = grad_z.sum(0).to(bias.dtype) if bias is not None and wants_b else None  # [V]
        return grad_h, None, grad_w, grad_b, None, None


def _output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps final hidden states to logits (``lm_head``), or ``None``.

    ``get_output_embeddings`` is the transformers API for it; a PEFT model forwards the call to
    its base model, an FSDP-sharded model is still an instance of its class.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def _replaced_forward(
    module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """``module.forward`` is ``forward`` inside the block (its hooks still run), then restored."""
    previous = module.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's)
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
