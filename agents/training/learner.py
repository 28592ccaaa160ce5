"""The learner: old log-probs, PPO epochs over mini-batches, the configured loss, the optimizer.

The learner has no protocol- or loss-specific branches: advantages arrive in the :class:`Batch`,
and the loss is :func:`holderpo.loss.compute_loss` with a :class:`~holderpo.loss.LossConfig` (one
of the presets GRPO / Dr.GRPO / GSPO / GMPO / HölderPO, or a custom one) and the p of the schedule
at this step.

It computes only what the update uses (docs/training.md, "What an update computes"): rows that
cannot move the gradient are skipped, π_old is recomputed only when it can differ from π_θ,
every log-prob is that of the generator's temperature-scaled distribution, and the output head
runs on the loss tokens only, in checkpointed chunks (:func:`token_logprobs`), so its logits are
never held for the whole batch.

Model, optimizer and learning-rate schedule are built in one place (:func:`build_optimizer`), so a
sharded or data-parallel variant replaces that function and :meth:`Learner.reduce` alone (see
:mod:`agents.training.distributed`). The KL reference is a pluggable :data:`ReferenceLogprobs`
callable: a frozen copy of the model by default, the adapter-disabled base model under LoRA
(:mod:`agents.training.lora`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from agents.types import Batch
from holderpo.loss import (
    LossConfig,
    LossOutput,
    accumulation_reg_scale,
    compute_loss,
    loss_units,
    reg_units,
)

_ZERO_WHEN_SKIPPED: tuple[str, ...] = ("loss/policy", "loss/total", "loss/clip_frac")
"""Loss metrics of a mini-batch whose rows were all skipped (its loss is exactly 0)."""

ReferenceLogprobs = Callable[[Batch, float], torch.Tensor]
"""Reference-policy log-probs of a micro-batch at a sampling temperature:
``(Batch [n, l], T) -> Tensor [n, l]`` (no grad)."""

OLD_LOGPROB_SOURCES: tuple[str, ...] = ("recompute", "generator")
"""Values of :attr:`LearnerConfig.old_logprobs`."""

LOGPROB_CHUNK_TOKENS = 256
"""Default loss tokens per output-head chunk of :func:`token_logprobs`
(:attr:`LearnerConfig.logprob_chunk_tokens`)."""


@dataclass(frozen=True)
class LearnerConfig:
    """Optimisation settings of the learner."""

    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batch_size: int = 16
    """Rows (step samples) per optimizer step."""
    micro_batch_size: int = 4
    """Rows per forward/backward; gradients accumulate over the mini-batch."""
    lr: float = 1e-5
    """AdamW learning rate after warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    seed: int = 0
    """Seed of the mini-batch shuffling."""
    old_logprobs: str = "recompute"
    """Where π_old comes from: ``recompute`` (the training model's log-probs before the update;
    when the batch gets a single update, the update's own forward, detached, which is the same
    value) or ``generator`` (the log-probs the generator reported; no extra forward, biased by
    any generator/learner mismatch, see ``loss/generator_drift``)."""
    skip_zero_rows: bool = True
    """Skip the forward/backward of rows that cannot move the gradient (advantage 0 and no KL or
    entropy term); the gradient is unchanged. ``False`` computes them (benchmarks, checks)."""
    reuse_single_update: bool = True
    """When the batch gets exactly one optimizer step, take π_old from that step's own detached
    forward instead of a separate recompute (the same values). ``False`` always recomputes."""
    logprob_chunk_tokens: int = LOGPROB_CHUNK_TOKENS
    """Loss tokens per output-head chunk when computing log-probs (:func:`token_logprobs`): each
    chunk's logits [chunk, V] are recomputed in the backward instead of saved, so memory does not
    grow with tokens x vocabulary. ``0``: the whole response span in one piece (the same values)."""

    def __post_init__(self) -> None:
        if self.old_logprobs not in OLD_LOGPROB_SOURCES:
            raise ValueError(
                f"trainer.old_logprobs={self.old_logprobs!r} is unknown; use one of "
                f"{list(OLD_LOGPROB_SOURCES)}"
            )
        if self.micro_batch_size < 1 or self.mini_batch_size < 1 or self.ppo_epochs < 1:
            raise ValueError(
                "trainer.ppo_epochs, trainer.mini_batch_size and trainer.micro_batch_size must be "
                f">= 1 (got {self.ppo_epochs}, {self.mini_batch_size}, {self.micro_batch_size})"
            )
        if self.logprob_chunk_tokens < 0:
            raise ValueError(
                f"trainer.logprob_chunk_tokens must be >= 0 (0: unchunked), got "
                f"{self.logprob_chunk_tokens}; e.g. "
                f"trainer.logprob_chunk_tokens={LOGPROB_CHUNK_TOKENS}"
            )
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(
                f"trainer.mini_batch_size={self.mini_batch_size} must be a multiple of "
                f"trainer.micro_batch_size={self.micro_batch_size}; set e.g. "
                f"trainer.mini_batch_size={self.micro_batch_size * max(1, self.mini_batch_size // self.micro_batch_size)}"  # noqa: E501
            )


def build_optimizer(
    model: nn.Module, cfg: LearnerConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters with linear warm-up to a constant learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


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
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
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
        packed = _head_in_chunks(head_forward, hidden, tokens, temperature, with_entropy, chunk)
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
    head_forward: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    tokens: _LossTokens,
    temperature: float,
    with_entropy: bool,
    chunk: int,
) -> torch.Tensor:
    """Log-probs (row 0) and entropies (row 1, ``with_entropy``) of the loss tokens -> [S, T].

    ``hidden`` [N, K, H] are the final hidden states at ``tokens.keep``. Each chunk of ``chunk``
    tokens runs head + temperature + log-softmax + gather under non-reentrant activation
    checkpointing, so only its input [chunk, H] is held for the backward, which recomputes the
    chunk's logits [chunk, V]. With no loss token one empty chunk still runs, so the result
    depends on every parameter (a backward through it is a valid, zero, collective).
    """
    picked = hidden[tokens.rows, tokens.cols]  # [T, H]
    checkpointed = torch.is_grad_enabled()
    parts = []
    for start in range(0, max(len(tokens.targets), 1), chunk):
        args = (picked[start : start + chunk], tokens.targets[start : start + chunk])
        if checkpointed:
            part = checkpoint(
                _head_chunk, head_forward, *args, temperature, with_entropy, use_reentrant=False
            )
        else:
            part = _head_chunk(head_forward, *args, temperature, with_entropy)
        parts.append(part)
    return torch.cat(parts, dim=1)


def _head_chunk(
    head_forward: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> torch.Tensor:
    """One chunk: ``hidden`` [c, H], ``targets`` [c] -> [S, c] (log-prob; entropy)."""
    logits = head_forward(hidden)  # [c, V]
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # log-softmax in at least float32
    out = _TokenLogprobEntropy.apply(logits, targets, temperature, with_entropy)
    assert isinstance(out, torch.Tensor)  # for the type checker: apply returns forward's result
    return out


class _TokenLogprobEntropy(torch.autograd.Function):
    """``log softmax(z / T)[y]`` and the entropy of ``softmax(z / T)`` with a written-out backward.

    Autograd through ``log_softmax`` + ``gather`` + the entropy keeps and re-reads several
    [c, V] tensors; here the forward keeps only ``z`` and the log-normaliser (both recomputed
    under the chunk's checkpoint) and the backward is, with s = z/T, log p = s - logsumexp(s):
    ∂ log p_y / ∂s = e_y - p and ∂H / ∂s = -p ⊙ (log p + H) (H = -Σ p log p).
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
        scaled = logits / temperature if temperature != 1.0 else logits  # [c, V]
        lse = torch.logsumexp(scaled, dim=-1)  # [c]
        logp = scaled.gather(1, targets[:, None]).squeeze(1) - lse  # [c]
        entropy = logp.new_zeros(0)
        if with_entropy:
            log_p = scaled - lse[:, None]  # [c, V]
            entropy = -(log_p.exp() * log_p).sum(-1)  # [c]
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        return torch.stack([logp, entropy]) if with_entropy else logp[None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """``grad`` [S, c] -> the gradient [c, V] of the logits."""
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature: float = ctx.temperature
        g_logp = grad[0][:, None]  # [c, 1]
        log_p = logits.div(temperature).sub_(lse[:, None])  # [c, V]
        del logits  # (recomputed by the chunk's checkpoint) one [c, V] fewer from here on
        if len(grad) > 1:  # with the entropy
            p = log_p.exp()
            coef = log_p.add_(entropy[:, None]).mul_(grad[1][:, None]).add_(g_logp)
            grad_s = p.mul_(coef).neg_()  # -p ⊙ (g_logp + g_H (log p + H))
        else:
            grad_s = log_p.exp_().mul_(-g_logp)  # -g_logp · p
        grad_s.scatter_add_(1, targets[:, None], g_logp)  # + g_logp · e_y
        if temperature != 1.0:
            grad_s.div_(temperature)  # ∂s/∂z = 1/T
        return grad_s, None, None, None


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


def movable_rows(batch: Batch, loss_cfg: LossConfig) -> torch.Tensor:
    """Rows whose forward/backward can change the gradient -> bool [N].

    With no KL and no entropy term, the loss of a row is A·M̃ (HölderPO §3 Eq. 2) and its gradient
    is A·∂M̃, exactly 0 when the row's advantage is 0 (every token's, for [N, L] advantages) or
    it has no response token. Its normaliser share (:func:`~holderpo.loss.loss_units`) is kept by
    the caller, so skipping such rows leaves the gradient unchanged.
    """
    has_tokens = batch.loss_mask.bool().any(-1)  # [N]
    if loss_cfg.kl_coef > 0 or loss_cfg.entropy_coef > 0:
        return has_tokens
    adv = batch.advantages
    nonzero = adv != 0 if adv.dim() == 1 else ((adv != 0) & batch.loss_mask.bool()).any(-1)
    return has_tokens & nonzero


@dataclass
class _Drift:
    """Running sum of |log π_θ − log π_generator| over response tokens (before any update)."""

    abs_sum: float = 0.0
    tokens: float = 0.0

    def add(self, logp: torch.Tensor, micro: Batch) -> None:
        """Add one micro-batch: ``logp`` [n, l] of the model before its first update."""
        diff = (logp.detach() - micro.old_logprobs).abs() * micro.loss_mask
        self.abs_sum += float(diff.sum())
        self.tokens += float(micro.loss_mask.sum())


class Learner:
    """Owns the training model, its optimizer and scheduler, and an optional frozen reference."""

    def __init__(
        self,
        model: nn.Module,
        loss_cfg: LossConfig,
        cfg: LearnerConfig,
        *,
        temperature: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
        reference_logprobs: ReferenceLogprobs | None = None,
    ) -> None:
        """Build the optimizer and, when the KL penalty is on, the reference policy.

        Args:
            model: the training model (parameters with ``requires_grad`` are optimised).
            loss_cfg: the loss configuration.
            cfg: optimisation settings.
            temperature: the generator's sampling temperature; every log-prob the learner
                computes (π_θ, π_old, π_ref, entropy) is of ``softmax(logits / temperature)``.
            autocast_dtype: mixed-precision dtype of the forward passes (``None``: off).
            reference_logprobs: reference log-probs for the KL penalty; default (when
                ``loss_cfg.kl_coef > 0``) a frozen copy of ``model``.
        """
        if temperature <= 0:
            raise ValueError(f"the learner's temperature must be > 0, got {temperature}")
        self.model = model
        self.loss_cfg = loss_cfg
        self.cfg = cfg
        self.temperature = float(temperature)
        self.optimizer, self.scheduler = build_optimizer(model, cfg)
        self.reference: nn.Module | None = None
        if reference_logprobs is None and loss_cfg.kl_coef > 0:
            self.reference = _frozen_copy(model)
            reference_logprobs = functools.partial(
                _reference_logprobs, self.reference, chunk_tokens=cfg.logprob_chunk_tokens
            )
        self.reference_logprobs = reference_logprobs
        self.autocast_dtype = autocast_dtype
        self._shuffle = torch.Generator().manual_seed(cfg.seed)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def update(self, batch: Batch, *, p: float) -> dict[str, float]:
        """PPO epochs of mini-batch updates on one rollout batch; returns averaged metrics.

        π_old is, by :attr:`LearnerConfig.old_logprobs` and the number of updates the batch gets:
        the update's own detached forward when there is exactly one optimizer step (π_old = π_θ
        there, so no second forward is needed), else a recompute before the first step, or the
        generator's log-probs. Rows that cannot move the gradient (:func:`movable_rows`) are not
        computed at all.
        """
        batch = _to(batch, self.device)
        live = movable_rows(batch, self.loss_cfg)  # [N]
        if not self.cfg.skip_zero_rows:
            live = torch.ones_like(live)
        drift = _Drift()
        source = self._old_logprob_source(len(batch))
        t0 = time.perf_counter()
        if source == "recompute":
            batch = self._recompute(batch, live, drift)
        t1 = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        first = True
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(len(batch), generator=self._shuffle).to(self.device)
            for start in range(0, len(batch), self.cfg.mini_batch_size):
                rows = order[start : start + self.cfg.mini_batch_size]
                measure = drift if first and source != "recompute" else None
                stats = self._mini_batch(
                    batch, rows, live, p, current_old=source == "current", drift=measure
                )
                first = False
                for key, value in stats.items():
                    sums[key] += value
                    counts[key] += 1
        metrics = {key: sums[key] / counts[key] for key in sums}
        metrics["time/old_logprobs_s"] = t1 - t0
        metrics["time/update_s"] = time.perf_counter() - t1
        return {**metrics, **self._update_metrics(batch, live, drift)}

    def _old_logprob_source(self, rows: int) -> str:
        """``current`` (one optimizer step: the update's own forward), else the configured one."""
        single = self.cfg.ppo_epochs == 1 and rows <= self.cfg.mini_batch_size
        if self.cfg.old_logprobs == "recompute" and single and self.cfg.reuse_single_update:
            return "current"
        return self.cfg.old_logprobs

    def _update_metrics(self, batch: Batch, live: torch.Tensor, drift: _Drift) -> dict[str, float]:
        """``loss/rows_skipped_frac`` and ``loss/generator_drift``, over all ranks."""
        rows = batch.loss_mask.bool().any(-1)  # [N] real rows (not padding)
        values = torch.tensor(
            [float(rows.sum()), float((rows & ~live).sum()), drift.abs_sum, drift.tokens],
            dtype=torch.float64,
        )
        n_rows, skipped, abs_sum, tokens = self.reduce(values).tolist()
        return {
            "loss/rows_skipped_frac": skipped / max(n_rows, 1.0),
            "loss/generator_drift": abs_sum / max(tokens, 1.0),
        }

    @torch.no_grad()
    def recompute_old_logprobs(self, batch: Batch) -> Batch:
        """Replace the generator's log-probs with the training model's (same weights, this code)."""
        every = torch.ones(len(batch), dtype=torch.bool, device=batch.input_ids.device)
        return self._recompute(_to(batch, self.device), every, _Drift())

    @torch.no_grad()
    def _recompute(self, batch: Batch, live: torch.Tensor, drift: _Drift) -> Batch:
        """``batch`` with the training model's log-probs as ``old_logprobs`` on the ``live`` rows.

        Every rank runs the same number of forwards (padding with an empty micro-batch), since a
        sharded forward is a collective.
        """
        was_training = self.model.training
        self.model.eval()
        old = batch.old_logprobs.clone()
        rows = live.nonzero().flatten()
        size = self.cfg.micro_batch_size
        for m in range(self.max_over_ranks(-(-len(rows) // size))):
            idx = rows[m * size : (m + 1) * size]
            micro = batch.select(idx) if len(idx) else _empty_micro(batch)
            with self._autocast():
                logp, _ = token_logprobs(
                    self.model,
                    micro,
                    temperature=self.temperature,
                    chunk_tokens=self.cfg.logprob_chunk_tokens,
                )
            if len(idx):
                drift.add(logp, micro)
                old = old.to(torch.promote_types(old.dtype, logp.dtype))  # float64 stays float64
                old[idx, : logp.shape[1]] = logp.to(old.dtype)
        self.model.train(was_training)
        return dataclasses.replace(batch, old_logprobs=old * batch.loss_mask)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` [K] over the data-parallel ranks (the identity in one process)."""
        return values

    def max_over_ranks(self, value: int) -> int:
        """Largest ``value`` over the data-parallel ranks (the identity in one process)."""
        return value

    def _mini_batch(
        self,
        batch: Batch,
        rows: torch.Tensor,
        live: torch.Tensor,
        p: float,
        *,
        current_old: bool,
        drift: _Drift | None,
    ) -> dict[str, float]:
        """One optimizer step: gradient accumulation over micro-batches of the live ``rows``.

        Each micro-batch loss is weighted by ``loss_units(micro) / loss_units(mini-batch)``, the
        mini-batch counted over all of its rows (skipped ones included) and all data-parallel
        ranks (:meth:`reduce`), so the summed gradient is the gradient of the whole mini-batch's
        loss. The rows are grouped by length first, so a micro-batch pads little (the gradient
        does not depend on the grouping). A mini-batch with no live row on any rank runs no
        forward and takes no optimizer step (its gradient is exactly 0).
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        rows = rows[torch.argsort(batch.attention_mask[rows].sum(-1), stable=True)]
        mini = batch.loss_mask[rows]  # KL/entropy may have their own units (reg_aggregation)
        units_all = torch.tensor([loss_units(mini, self.loss_cfg), reg_units(mini, self.loss_cfg)])
        total_units, total_reg = (float(u) for u in self.reduce(units_all.double()))
        rows = rows[live[rows]]
        size = self.cfg.micro_batch_size
        n_micro = self.max_over_ranks(-(-len(rows) // size))
        if n_micro == 0:
            lr = float(self.scheduler.get_last_lr()[0])
            skipped = {"loss/grad_norm": 0.0, "loss/optimizer_steps": 0.0, "loss/lr": lr}
            return {**dict.fromkeys(_ZERO_WHEN_SKIPPED, 0.0), **skipped}
        stats: dict[str, float] = defaultdict(float)
        for m in range(n_micro):
            idx = rows[m * size : (m + 1) * size]
            micro = batch.select(idx) if len(idx) else _empty_micro(batch)
            units = loss_units(micro.loss_mask, self.loss_cfg)
            scale = accumulation_reg_scale(micro.loss_mask, self.loss_cfg, total_units, total_reg)
            out = self._micro_loss(micro, p, current_old=current_old, drift=drift, reg_scale=scale)
            (out.loss * (units / max(total_units, 1e-12))).backward()
            stats["units"] += units
            for key, value in out.metrics.items():
                stats[key] += value * units
        metrics = self._normalise(stats, total_units)
        metrics["loss/grad_norm"] = self._clip_and_step()
        metrics["loss/optimizer_steps"] = 1.0
        metrics["loss/lr"] = float(self.scheduler.get_last_lr()[0])
        return metrics

    def _normalise(self, sums: dict[str, float], total_units: float) -> dict[str, float]:
        """Unit-weighted metric sums -> means over the ranks' mini-batch.

        Loss terms (``loss/…``) are divided by the units of the whole mini-batch, so they are the
        mini-batch's loss (a skipped row contributes exactly 0); the Hölder diagnostics
        (``holder/…``) describe the rows that were computed and are divided by their units.
        """
        keys = sorted(k for k in sums if k != "units")
        reduced = self.reduce(
            torch.tensor([sums[k] for k in keys] + [sums["units"]], dtype=torch.float64)
        ).tolist()
        computed = max(reduced.pop(), 1e-12)
        total = max(total_units, 1e-12)
        return {
            k: v / (computed if k.startswith("holder/") else total)
            for k, v in zip(keys, reduced, strict=True)
        }

    def _micro_loss(
        self,
        micro: Batch,
        p: float,
        *,
        current_old: bool,
        drift: _Drift | None,
        reg_scale: float = 1.0,
    ) -> LossOutput:
        """Loss of one micro-batch (HölderPO §3 Eq. 2 through :func:`compute_loss`).

        ``current_old``: π_old is this forward's own detached log-probs (the single-update case).
        ``drift``: measure the generator's drift on this forward (the model is not updated yet).
        ``reg_scale``: weight of the KL/entropy terms relative to the policy term (1 unless
        ``reg_aggregation`` differs from ``aggregation``; :func:`accumulation_reg_scale`).
        """
        want_entropy = self.loss_cfg.entropy_coef > 0
        with self._autocast():
            logp, entropy = token_logprobs(
                self.model,
                micro,
                temperature=self.temperature,
                with_entropy=want_entropy,
                chunk_tokens=self.cfg.logprob_chunk_tokens,
            )
            ref_logp = None
            if self.reference_logprobs is not None:
                with torch.no_grad():
                    ref_logp = self.reference_logprobs(micro, self.temperature)
        if drift is not None:
            drift.add(logp, micro)
        old = logp.detach() * micro.loss_mask if current_old else micro.old_logprobs
        return compute_loss(
            dataclasses.replace(self.loss_cfg, p=p),
            logp,
            old,
            micro.advantages,
            micro.loss_mask,
            ref_logp=ref_logp,
            entropy=entropy,
            reg_scale=reg_scale,
        )

    def _clip_and_step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = (
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            if self.cfg.grad_clip > 0
            else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        )
        if hasattr(norm, "full_tensor"):  # sharded (DTensor) gradients: the global norm
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def state_dict(self) -> dict:
        """Optimizer, scheduler and shuffling state (the model is saved separately)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "shuffle": self._shuffle.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._shuffle.set_state(state["shuffle"])


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    for param in ref.parameters():
        param.requires_grad_(False)
    return ref


def _reference_logprobs(
    reference: nn.Module, micro: Batch, temperature: float, *, chunk_tokens: int
) -> torch.Tensor:
    """Log-probs [n, l] of a frozen reference model."""
    return token_logprobs(reference, micro, temperature=temperature, chunk_tokens=chunk_tokens)[0]


def _empty_micro(batch: Batch) -> Batch:
    """A one-row micro-batch with no response token (zero loss units).

    It joins the collectives of a sharded forward/backward when this rank has nothing left to
    compute.
    """
    one = batch.select(torch.arange(1, device=batch.input_ids.device))
    return dataclasses.replace(
        one,
        loss_mask=torch.zeros_like(one.loss_mask),
        advantages=torch.zeros_like(one.advantages),
    )


def _to(batch: Batch, device: torch.device) -> Batch:
    return Batch(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        loss_mask=batch.loss_mask.to(device),
        old_logprobs=batch.old_logprobs.to(device),
        advantages=batch.advantages.to(device),
        seq_ids=batch.seq_ids.to(device),
    )
