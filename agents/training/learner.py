"""The learner: old log-probs, PPO epochs over mini-batches, the configured loss, the optimizer.

The learner has no protocol- or loss-specific branches: advantages arrive in the :class:`Batch`,
and the loss is :func:`holderpo.loss.compute_loss` with a :class:`~holderpo.loss.LossConfig` (one
of the presets GRPO / Dr.GRPO / GSPO / GMPO / HölderPO, or a custom one) at the p its schedule
gives the iteration (:class:`holderpo.schedule.PSchedule`; the learner owns it).

It computes only what the update uses (docs/training.md, "What an update computes"): rows that
cannot move the gradient are skipped, π_old is recomputed only when it can differ from π_θ,
every log-prob is that of the generator's temperature-scaled distribution, and the output head
runs on the loss tokens only, in recomputed chunks (:func:`token_logprobs`), so its logits are
never held for the whole batch.

One class runs on one process or many: it takes the process context
(:class:`~agents.training.distributed.DistContext`, one process by default) and sums its
normalisers and metrics with the collectives of :mod:`agents.training.distributed`, which are the
identity without a process group; on several ranks the model is sharded first
(:func:`~agents.training.distributed.shard_model`) and each rank passes its own rows. The KL
reference comes from :func:`agents.training.reference.build_reference` (a frozen copy, or the
LoRA model with its adapters off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from agents.training.distributed import (
    ONE_PROCESS,
    DistContext,
    all_gather_list,
    all_reduce_max,
    all_reduce_sum,
)
from agents.training.logprobs import LOGPROB_CHUNK_TOKENS, token_logprobs
from agents.training.reference import Reference, ReferenceLogprobs, build_reference
from agents.types import Batch
from holderpo.correction import RolloutCorrection, correct, nearest_rank
from holderpo.loss import (
    LossConfig,
    LossOutput,
    accumulation_reg_scale,
    compute_loss,
    loss_units,
    loss_weight,
    reg_units,
)

_ZERO_WHEN_SKIPPED: tuple[str, ...] = ("loss/policy", "loss/total", "loss/clip_frac")
"""Loss metrics of a mini-batch whose rows were all skipped (its loss is exactly 0)."""

_LOSS_VALUES: frozenset[str] = frozenset({"loss/policy", "loss/total", "loss/kl", "loss/entropy"})
"""Metrics that are terms of the loss: a micro-batch's share is its loss weight
(:func:`~holderpo.loss.loss_weight`); the others (fractions) are averaged over the units."""

_COUNTS: tuple[str, ...] = ("loss/optimizer_steps", "loss/skipped_steps")
"""Metrics summed over the update's mini-batches (counts), not averaged."""

OLD_LOGPROB_SOURCES: tuple[str, ...] = ("recompute", "generator")
"""Values of :attr:`LearnerConfig.old_logprobs`."""


@dataclass(frozen=True)
class LearnerConfig:
    """Optimisation settings of the learner.

    The defaults are the default run's: the ``trainer:`` block of ``configs/config.yaml`` lists
    them (``tests/agents/test_config_defaults.py`` checks that they agree).
    """

    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batch_size: int = 64
    """Rows (step samples) per optimizer step."""
    micro_batch_size: int = 8
    """Rows per forward/backward; gradients accumulate over the mini-batch."""
    lr: float = 5e-5
    """AdamW learning rate after warm-up."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2); torch's default. oat's is (0.9, 0.95) (``adam_beta_1``, ``adam_beta_2``)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    skip_nonfinite_grad: bool = True
    """Skip an optimizer step whose global gradient norm is inf or nan, as verl's ``dp_actor``
    does: the gradients are dropped, the weights and optimizer state are untouched, the step is
    counted in ``loss/skipped_steps`` and the learning-rate schedule still advances (verl's
    schedule steps once per update whether or not the optimizer did). ``False`` steps anyway."""
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
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
            for b in betas
        ):
            raise ValueError(
                f"trainer.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}; "
                f"e.g. trainer.adam_betas=[0.9,0.95]"
            )
        object.__setattr__(self, "adam_betas", (float(betas[0]), float(betas[1])))
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
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    warmup = max(cfg.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler


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
    """|log π_θ − log π_rollout| of each response token, before any update (the gap)."""

    gaps: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def add(self, logp: torch.Tensor, micro: Batch) -> None:
        """Add one micro-batch: ``logp`` [n, l] of the model before its first update."""
        keep = micro.loss_mask.bool()  # [n, l]
        diff = (logp.detach().double() - micro.rollout_logprobs.double()).abs()  # [n, l]
        self.gaps.append(diff[keep].float().cpu())

    def metrics(self, ctx: DistContext) -> dict[str, float]:
        """Mean, p99 (nearest rank) and max over every rank's tokens (0 when none)."""
        local = torch.cat(self.gaps) if self.gaps else torch.zeros(0)
        every = torch.cat(all_gather_list([local], ctx))  # [tokens of all ranks]
        n = every.numel()
        return {
            "loss/generator_drift": float(every.double().sum()) / max(n, 1),
            "loss/generator_drift_p99": nearest_rank(every, 0.99),
            "loss/generator_drift_max": float(every.max()) if n else 0.0,
        }


class Learner:
    """Owns the training model, its optimizer, scheduler and p schedule, and the KL reference.

    One instance per process: on several ranks each holds its shard of the model and passes its
    own rows to :meth:`update`. ``cfg.mini_batch_size`` counts rows of the *global* mini-batch
    (all ranks together), so the same configuration gives the same optimizer steps on any number
    of processes.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_cfg: LossConfig,
        cfg: LearnerConfig,
        ctx: DistContext = ONE_PROCESS,
        *,
        temperature: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
        reference_logprobs: ReferenceLogprobs | None = None,
        p_schedule: Callable[[int], float] | None = None,
        correction: RolloutCorrection | None = None,
    ) -> None:
        """Check the sizes, build the optimizer and, when the KL penalty is on, the reference.

        Args:
            model: the training model (parameters with ``requires_grad`` are optimised; on
                several ranks, the model after :func:`~agents.training.distributed.shard_model`).
            loss_cfg: the loss configuration.
            cfg: optimisation settings; ``mini_batch_size`` is global.
            ctx: the process context (default: one process).
            temperature: the generator's sampling temperature; every log-prob the learner
                computes (π_θ, π_old, π_ref, entropy) is of ``softmax(logits / temperature)``.
            autocast_dtype: mixed-precision dtype of the forward passes (``None``: off).
            reference_logprobs: reference log-probs for the KL penalty; default
                :func:`~agents.training.reference.build_reference` of ``model`` (a frozen copy
                when ``loss_cfg.kl_coef > 0``; on a sharded model it must be built before
                sharding and passed here).
            p_schedule: the Hölder order of each iteration, ``p = p_schedule(iteration)``
                (:class:`holderpo.schedule.PSchedule`); default the constant ``loss_cfg.p``.
            correction: the rollout correction between π_old and the generator's log-probs
                (:mod:`holderpo.correction`); default none. When on, π_old is always recomputed
                for every row before the update.
        """
        if temperature <= 0:
            raise ValueError(f"the learner's temperature must be > 0, got {temperature}")
        correction = correction if correction is not None else RolloutCorrection()
        if correction.enabled and cfg.old_logprobs != "recompute":
            raise ValueError(
                f"algorithm.rollout_correction.mode={correction.mode} weighs π_old (the trainer's "
                f"recompute) against the generator's log-probs, but trainer.old_logprobs="
                f"{cfg.old_logprobs} makes them the same; set trainer.old_logprobs=recompute"
            )
        local = cfg.mini_batch_size // ctx.world_size
        if cfg.mini_batch_size % ctx.world_size or local % cfg.micro_batch_size:
            raise ValueError(
                f"trainer.mini_batch_size={cfg.mini_batch_size} must be a multiple of "
                f"world_size * trainer.micro_batch_size = {ctx.world_size * cfg.micro_batch_size}; "
                f"set e.g. trainer.mini_batch_size={ctx.world_size * cfg.micro_batch_size}"
            )
        self.model = model
        self.loss_cfg = loss_cfg
        self.cfg = dataclasses.replace(cfg, mini_batch_size=local)  # this rank's rows per step
        self.ctx = ctx
        self.temperature = float(temperature)
        self.optimizer, self.scheduler = build_optimizer(model, cfg)
        if reference_logprobs is None:
            reference_logprobs = build_reference(
                model, kl_coef=loss_cfg.kl_coef, ctx=ctx, chunk_tokens=cfg.logprob_chunk_tokens
            )
        self.reference_logprobs = reference_logprobs
        # the frozen reference model held beside the training model (None under LoRA, no KL)
        self.reference: nn.Module | None = (
            reference_logprobs.held if isinstance(reference_logprobs, Reference) else None
        )
        self.p_schedule = p_schedule
        self.correction = correction
        self.autocast_dtype = autocast_dtype
        self._shuffle = torch.Generator().manual_seed(cfg.seed)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def p_at(self, iteration: int | None = None, p: float | None = None) -> float:
        """The Hölder order of the update at ``iteration``, or ``p`` when given (exactly one).

        Raises:
            ValueError: both or neither given.
        """
        if (iteration is None) == (p is None):
            raise ValueError("update() takes the iteration (p from the schedule) or p, not both")
        if p is not None:
            return float(p)
        assert iteration is not None
        return float(self.loss_cfg.p if self.p_schedule is None else self.p_schedule(iteration))

    def update(
        self, batch: Batch, iteration: int | None = None, *, p: float | None = None
    ) -> dict[str, float]:
        """PPO epochs of mini-batch updates on one rollout batch; returns every metric it makes.

        π_old is, by :attr:`LearnerConfig.old_logprobs` and the number of updates the batch gets:
        the update's own detached forward when there is exactly one optimizer step (π_old = π_θ
        there, so no second forward is needed), else a recompute before the first step, or the
        generator's log-probs. Rows that cannot move the gradient (:func:`movable_rows`) are not
        computed at all. On several ranks every rank's rows are padded to the longest rank's
        (:meth:`Batch.pad_rows`), since each forward/backward is a collective.

        Args:
            batch: this process's rows.
            iteration: the run's iteration (0-based): p is the schedule's there.
            p: a fixed Hölder order instead of the schedule's (tests, benchmarks).

        Returns:
            ``loss/…`` and ``holder/…`` (``holder/p`` included), ``time/…``, summed or averaged
            over the ranks.
        """
        p = self.p_at(iteration, p)
        loss_cfg = dataclasses.replace(self.loss_cfg, p=p)
        batch = batch.pad_rows(all_reduce_max(len(batch), self.ctx)).to(self.device)
        live = movable_rows(batch, loss_cfg)  # [N]
        if not self.cfg.skip_zero_rows:
            live = torch.ones_like(live)
        drift = _Drift()
        source = self._old_logprob_source(len(batch))
        t0 = time.perf_counter()
        corrected: dict[str, float] = {}
        if source == "recompute":
            rows = batch.loss_mask.bool().any(-1) if self.correction.enabled else live
            batch = self._recompute(batch, rows, drift)
            if self.correction.enabled:
                batch, corrected = self._correct(batch)
                live = live & batch.loss_mask.bool().any(-1)  # rows mis dropped whole
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
                    batch, rows, live, loss_cfg, current_old=source == "current", drift=measure
                )
                first = False
                for key, value in stats.items():
                    sums[key] += value
                    counts[key] += 1
        metrics = {key: sums[key] / counts[key] for key in sums}
        metrics.update({key: sums[key] for key in _COUNTS})  # counts, not means
        metrics["time/old_logprobs_s"] = t1 - t0
        metrics["time/update_s"] = time.perf_counter() - t1
        metrics["holder/p"] = p
        return {**metrics, **corrected, **self._update_metrics(batch, live, drift)}

    def imitate(self, batch: Batch, *, epochs: int, lr: float | None = None) -> dict[str, float]:
        """Behaviour cloning: ``epochs`` passes of mini-batch steps on the response tokens' NLL.

        The loss of a mini-batch is the mean over its response tokens of ``-log π_θ(token)``,
        with the log-probs of every other update (:func:`token_logprobs`, the generator's
        temperature): the same tokenisation, prompts and optimizer as the RL updates, so a warm
        start by demonstrations is the first phase of one run. ``batch.advantages`` is ignored.
        ``lr`` (None: the optimizer's) replaces the learning rate for these steps only; the
        schedule's warm-up counts them and the RL updates after them get the configured rate.

        Returns:
            ``bc/loss`` (mean token NLL of the last epoch), ``bc/loss_first`` (of the first),
            ``bc/optimizer_steps``, ``bc/rows``, ``bc/tokens``, ``time/bc_s``.
        """
        if epochs < 1:
            raise ValueError(f"imitate() needs epochs >= 1, got {epochs}")
        t0 = time.perf_counter()
        batch = batch.pad_rows(all_reduce_max(len(batch), self.ctx)).to(self.device)
        per_epoch: list[float] = []
        steps = 0
        with self._learning_rate(lr):
            for _ in range(epochs):
                order = torch.randperm(len(batch), generator=self._shuffle).to(self.device)
                nll = tokens = 0.0
                for start in range(0, len(batch), self.cfg.mini_batch_size):
                    step_nll, step_tokens = self._imitation_step(
                        batch, order[start : start + self.cfg.mini_batch_size]
                    )
                    nll, tokens, steps = nll + step_nll, tokens + step_tokens, steps + 1
                per_epoch.append(nll / max(tokens, 1.0))
        return {
            "bc/loss": per_epoch[-1],
            "bc/loss_first": per_epoch[0],
            "bc/optimizer_steps": float(steps),
            "bc/rows": float(all_reduce_sum(torch.tensor(float(len(batch))), self.ctx)),
            "bc/tokens": float(all_reduce_sum(batch.loss_mask.sum().double().cpu(), self.ctx)),
            "time/bc_s": time.perf_counter() - t0,
        }

    @contextlib.contextmanager
    def _learning_rate(self, lr: float | None) -> Iterator[None]:
        """The schedule's base rate set to ``lr`` inside the block (None: unchanged)."""
        if lr is None:
            yield
            return
        base = list(self.scheduler.base_lrs)
        factor = self.scheduler.get_last_lr()[0] / base[0]  # the warm-up's current factor
        self.scheduler.base_lrs = [lr] * len(base)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * factor
        try:
            yield
        finally:
            factor = self.scheduler.get_last_lr()[0] / lr
            self.scheduler.base_lrs = base
            for group, rate in zip(self.optimizer.param_groups, base, strict=True):
                group["lr"] = rate * factor
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _imitation_step(self, batch: Batch, rows: torch.Tensor) -> tuple[float, float]:
        """One optimizer step on the token NLL of ``rows``; (summed NLL, tokens) over the ranks."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        rows = rows[torch.argsort(batch.attention_mask[rows].sum(-1), stable=True)]
        total = float(all_reduce_sum(batch.loss_mask[rows].sum().double().cpu(), self.ctx))
        nll = 0.0
        for _, micro, logp in self._micro_logprobs(batch, rows):
            summed = -(logp * micro.loss_mask).sum()  # Σ_t -log π_θ(a_t | s), [B, T] masked
            (summed / max(total, 1.0)).backward()
            nll += float(summed.detach())
        self._clip_and_step()
        return float(all_reduce_sum(torch.tensor(nll, dtype=torch.float64), self.ctx)), total

    def _old_logprob_source(self, rows: int) -> str:
        """``current`` (one optimizer step: the update's own forward), else the configured one.

        A rollout correction needs π_old of every row before the first step: it recomputes.
        """
        single = self.cfg.ppo_epochs == 1 and rows <= self.cfg.mini_batch_size
        reuse = single and self.cfg.reuse_single_update and not self.correction.enabled
        if self.cfg.old_logprobs == "recompute" and reuse:
            return "current"
        return self.cfg.old_logprobs

    def _correct(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        """``batch`` with the tokens ``mis`` drops off its loss mask, and the correction's shares.

        ``loss/rollout_truncated_frac`` (tis) and ``loss/rollout_masked_frac`` (mis) are shares of
        the batch's loss tokens over all ranks. The weights themselves are recomputed per
        micro-batch (:meth:`_micro_loss`; each depends on its own token or row only).
        """
        keep = batch.loss_mask.bool()  # [N, L]
        c = correct(batch.old_logprobs, batch.rollout_logprobs, keep, self.correction)
        counts = torch.tensor(
            [float(keep.sum()), float(c.truncated.sum()), float((keep & ~c.keep).sum())],
            dtype=torch.float64,
        )
        tokens, truncated, masked = all_reduce_sum(counts, self.ctx).tolist()
        mask = batch.loss_mask * c.keep.to(batch.loss_mask.dtype)
        shares = {
            "loss/rollout_truncated_frac": truncated / max(tokens, 1.0),
            "loss/rollout_masked_frac": masked / max(tokens, 1.0),
        }
        return dataclasses.replace(batch, loss_mask=mask), shares

    def _update_metrics(self, batch: Batch, live: torch.Tensor, drift: _Drift) -> dict[str, float]:
        """``loss/rows_skipped_frac`` and the ``loss/generator_drift…`` gap, over all ranks."""
        rows = batch.loss_mask.bool().any(-1)  # [N] real rows (not padding)
        values = torch.tensor([float(rows.sum()), float((rows & ~live).sum())], dtype=torch.float64)
        n_rows, skipped = all_reduce_sum(values, self.ctx).tolist()
        return {"loss/rows_skipped_frac": skipped / max(n_rows, 1.0), **drift.metrics(self.ctx)}

    @torch.no_grad()
    def recompute_old_logprobs(self, batch: Batch) -> Batch:
        """Replace the generator's log-probs with the training model's (same weights, this code)."""
        batch = batch.to(self.device)
        every = torch.ones(len(batch), dtype=torch.bool, device=batch.input_ids.device)
        return self._recompute(batch, every, _Drift())

    def _micro_logprobs(
        self, batch: Batch, rows: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, Batch, torch.Tensor]]:
        """``(row indices, micro-batch, log-probs [b, T])`` of ``rows``, a micro-batch at a time.

        Every rank yields as many (an empty micro-batch pads the rank with fewer rows), since a
        sharded forward is a collective.
        """
        size = self.cfg.micro_batch_size
        for m in range(all_reduce_max(-(-len(rows) // size), self.ctx)):
            idx = rows[m * size : (m + 1) * size]
            micro = batch.select(idx) if len(idx) else _empty_micro(batch)
            with self._autocast():
                logp, _ = token_logprobs(
                    self.model,
                    micro,
                    temperature=self.temperature,
                    chunk_tokens=self.cfg.logprob_chunk_tokens,
                )
            yield idx, micro, logp

    @torch.no_grad()
    def _recompute(self, batch: Batch, live: torch.Tensor, drift: _Drift) -> Batch:
        """``batch`` with the training model's log-probs as ``old_logprobs`` on the ``live`` rows.

        Every rank runs the same number of forwards (padding with an empty micro-batch), since a
        sharded forward is a collective.
        """
        was_training = self.model.training
        self.model.eval()
        old = batch.old_logprobs.clone()
        for idx, micro, logp in self._micro_logprobs(batch, live.nonzero().flatten()):
            if len(idx):
                drift.add(logp, micro)
                old = old.to(torch.promote_types(old.dtype, logp.dtype))  # float64 stays float64
                old[idx, : logp.shape[1]] = logp.to(old.dtype)
        self.model.train(was_training)
        return dataclasses.replace(batch, old_logprobs=old * batch.loss_mask)

    def _mini_batch(
        self,
        batch: Batch,
        rows: torch.Tensor,
        live: torch.Tensor,
        loss_cfg: LossConfig,
        *,
        current_old: bool,
        drift: _Drift | None,
    ) -> dict[str, float]:
        """One optimizer step: gradient accumulation over micro-batches of the live ``rows``.

        Each micro-batch loss is weighted by ``loss_units(micro) / loss_units(mini-batch)``, the
        mini-batch counted over all of its rows (skipped ones included) and all data-parallel
        ranks (:func:`~agents.training.distributed.all_reduce_sum`), so the summed gradient is
        the gradient of the whole mini-batch's loss. The rows are grouped by length first, so a
        micro-batch pads little (the gradient does not depend on the grouping). A mini-batch with
        no live row on any rank runs no forward and takes no optimizer step (its gradient is
        exactly 0).
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        rows = rows[torch.argsort(batch.attention_mask[rows].sum(-1), stable=True)]
        mini = batch.loss_mask[rows]  # KL/entropy may have their own units (reg_aggregation)
        units_all = torch.tensor([loss_units(mini, loss_cfg), reg_units(mini, loss_cfg)])
        total_units, total_reg = (float(u) for u in all_reduce_sum(units_all.double(), self.ctx))
        rows = rows[live[rows]]
        size = self.cfg.micro_batch_size
        n_micro = all_reduce_max(-(-len(rows) // size), self.ctx)
        if n_micro == 0:
            lr = float(self.scheduler.get_last_lr()[0])
            skipped = {"loss/grad_norm": 0.0, "loss/lr": lr, **dict.fromkeys(_COUNTS, 0.0)}
            return {**dict.fromkeys(_ZERO_WHEN_SKIPPED, 0.0), **skipped}
        stats: dict[str, float] = defaultdict(float)
        for m in range(n_micro):
            idx = rows[m * size : (m + 1) * size]
            micro = batch.select(idx) if len(idx) else _empty_micro(batch)
            units = loss_units(micro.loss_mask, loss_cfg)
            weight = loss_weight(micro.loss_mask, loss_cfg, total_units)
            scale = accumulation_reg_scale(micro.loss_mask, loss_cfg, total_units, total_reg)
            out = self._micro_loss(
                micro, loss_cfg, current_old=current_old, drift=drift, reg_scale=scale
            )
            (out.loss * weight).backward()
            stats["units"] += units
            for key, value in out.metrics.items():  # loss terms: their weight; shares: units
                stats[key] += value * (weight * total_units if key in _LOSS_VALUES else units)
        metrics = self._normalise(stats, total_units)
        metrics["loss/grad_norm"], stepped = self._clip_and_step()
        metrics["loss/optimizer_steps"] = float(stepped)
        metrics["loss/skipped_steps"] = float(not stepped)
        metrics["loss/lr"] = float(self.scheduler.get_last_lr()[0])
        return metrics

    def _normalise(self, sums: dict[str, float], total_units: float) -> dict[str, float]:
        """Unit-weighted metric sums -> means over the ranks' mini-batch.

        Loss terms (``loss/…``) are divided by the units of the whole mini-batch, so they are the
        mini-batch's loss (a skipped row contributes exactly 0); the Hölder diagnostics
        (``holder/…``) describe the rows that were computed and are divided by their units.
        """
        keys = sorted(k for k in sums if k != "units")
        reduced = all_reduce_sum(
            torch.tensor([sums[k] for k in keys] + [sums["units"]], dtype=torch.float64), self.ctx
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
        loss_cfg: LossConfig,
        *,
        current_old: bool,
        drift: _Drift | None,
        reg_scale: float = 1.0,
    ) -> LossOutput:
        """Loss of one micro-batch (HölderPO §3 Eq. 2 through :func:`compute_loss`).

        ``loss_cfg``: the loss at this update's p. ``current_old``: π_old is this forward's own
        detached log-probs (the single-update case). ``drift``: measure the generator's drift on
        this forward (the model is not updated yet). ``reg_scale``: weight of the KL/entropy
        terms relative to the policy term (1 unless ``reg_aggregation`` differs from
        ``aggregation``; :func:`accumulation_reg_scale`).
        """
        want_entropy = loss_cfg.entropy_coef > 0
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
        weights = None
        if self.correction.enabled:  # tis / mis weights of this micro-batch's tokens or rows
            weights = correct(old, micro.rollout_logprobs, micro.loss_mask, self.correction)
        return compute_loss(
            loss_cfg,
            logp,
            old,
            micro.advantages,
            micro.loss_mask,
            ref_logp=ref_logp,
            entropy=entropy,
            reg_scale=reg_scale,
            is_weights=None if weights is None else weights.weights,
        )

    def _clip_and_step(self) -> tuple[float, bool]:
        """Clip and step; returns the global norm before clipping and whether the optimizer stepped.

        It does not when the norm is not finite and ``skip_nonfinite_grad`` is on: the gradients
        are dropped and only the learning-rate schedule advances (verl's, once per update).
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = (
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            if self.cfg.grad_clip > 0
            else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        )
        if hasattr(norm, "full_tensor"):  # sharded (DTensor) gradients: the global norm
            norm = norm.full_tensor()
        value = float(norm)  # the same on every rank (a global norm)
        stepped = math.isfinite(value) or not self.cfg.skip_nonfinite_grad
        if stepped:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return value, stepped

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
        """Restore what :meth:`state_dict` returned (without ``optimizer``: restored elsewhere).

        The sharded checkpoint layout keeps the optimizer state in its DCP files beside the
        model's (:mod:`agents.training.checkpoint`), so its trainer state has no ``optimizer``.
        """
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._shuffle.set_state(state["shuffle"])


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
