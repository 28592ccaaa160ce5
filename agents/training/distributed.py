"""Data-parallel, sharded training on ``torch.distributed`` (FSDP2), launched with ``torchrun``.

Each process (rank) holds a shard of every parameter, gradient and optimizer state
(``torch.distributed.fsdp.fully_shard``), computes log-probs and the loss on its own rows of the
batch, and the gradients are summed over the ranks by FSDP's reduce-scatter.

Exact gradient normalisation. A mini-batch of the single-process learner is split into
micro-batches and micro-batch ``m`` is weighted by ``u(m) / u(mini)``, where ``u`` is
:func:`holderpo.loss.loss_units` (tokens for ``token_mean``, non-empty rows for ``seq_mean`` and
``seq_sum_const``), so the accumulated gradient is that of the whole mini-batch's loss. Across ranks
the global mini-batch is the union of the ranks' local mini-batches, so the weight of a rank's
micro-batch is ``u(m) / Σ_ranks u(local mini)`` (the denominator is one all-reduce), and the rank
gradients must be **summed**: :func:`shard_model` sets FSDP's gradient divide factor to 1 (its
default, a mean over ranks, would shrink every gradient by the world size). The metrics are weighted
the same way and summed (:meth:`DistributedLearner.reduce`).

Every rank must run the same number of forward/backward passes (each is a collective), so
:class:`DistributedLearner` pads every local batch to the longest one with empty rows (loss mask 0,
zero loss units): they cost a forward pass and change nothing.

Checkpoints are sharded (``torch.distributed.checkpoint``) and resume on any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from agents.training import checkpoint
from agents.training.learner import Learner, LearnerConfig, ReferenceLogprobs, token_logprobs
from agents.types import Batch
from holderpo.loss import LossConfig

TRAINER_FILE = "trainer.pt"
"""File of a sharded checkpoint holding the scheduler, shuffling, RNG and run state (rank 0)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the process group."""

    rank: int
    """Global rank (0 .. world_size-1)."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """Device of this rank's model."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes reports, metrics and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistContext:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ...).

    Without those variables (a plain ``python -m ...``) this is a one-process context and no
    process group is started.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL with CUDA, else gloo.

    Returns:
        This process's :class:`DistContext`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def init_local_process(rank: int, world_size: int, port: int, backend: str = "gloo") -> DistContext:
    """Join a process group of ``world_size`` processes spawned on this machine (tests, benches).

    Sets the variables ``torchrun`` would set (rendezvous on 127.0.0.1:``port``), then calls
    :func:`init_distributed`.
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    return init_distributed(backend)


def close_distributed() -> None:
    """Leave the process group (no-op in one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(
    model: nn.Module, ctx: DistContext, *, mp_dtype: torch.dtype | None = None
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each transformer block, then the root.

    The blocks are the module classes named in the model's ``_no_split_modules`` (transformers
    models list their decoder layer there); gradients are summed over ranks (divide factor 1; see
    the module docstring). One process: the model is returned unchanged.

    Args:
        model: the training model (LoRA already applied, if any).
        ctx: the process context.
        mp_dtype: compute dtype of the forward/backward (``None``: the parameters' dtype);
            gradients are reduced in float32.

    Returns:
        The same module, now an ``FSDPModule``.
    """
    if not ctx.distributed:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=mp_dtype, reduce_dtype=torch.float32 if mp_dtype is not None else None
    )
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in block_names:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # sum over ranks: the loss weights are global
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def pad_batch(batch: Batch, rows: int) -> Batch:
    """``batch`` with empty rows appended up to ``rows`` rows (loss mask 0, advantage 0).

    A padding row repeats row 0's tokens so its forward pass is well defined; ``seq_ids`` is -1.
    """
    extra = rows - len(batch)
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {len(batch)} rows down to {rows}")
    if extra == 0:
        return batch
    if len(batch) == 0:
        raise ValueError("cannot pad an empty batch: every rank needs at least one row")

    def grow(t: torch.Tensor, fill: float | None) -> torch.Tensor:
        pad = t[:1].expand(extra, *t.shape[1:]).clone()  # [extra, ...]
        if fill is not None:
            pad.fill_(fill)
        return torch.cat([t, pad])

    return Batch(
        input_ids=grow(batch.input_ids, None),
        attention_mask=grow(batch.attention_mask, None),
        loss_mask=grow(batch.loss_mask, 0.0),
        old_logprobs=grow(batch.old_logprobs, 0.0),
        advantages=grow(batch.advantages, 0.0),
        seq_ids=grow(batch.seq_ids, -1),
    )


def shard_batch(batch: Batch, ctx: DistContext) -> Batch:
    """This rank's rows of a batch every rank holds: a contiguous chunk, padded to ``ceil(N/W)``.

    Contiguous chunks keep the rows of one group together. Every rank ends with the same number
    of rows, so every rank runs the same number of micro-batches.
    """
    n = len(batch)
    if n < ctx.world_size:
        raise ValueError(f"a batch of {n} rows cannot feed {ctx.world_size} ranks; collect more")
    chunks = torch.arange(n).tensor_split(ctx.world_size)
    mine = batch.select(chunks[ctx.rank])
    width = batch.input_ids.shape[1]  # keep the full width: select() trims to the longest row
    mine = dataclasses.replace(
        mine,
        input_ids=_pad_width(mine.input_ids, width, 0),
        attention_mask=_pad_width(mine.attention_mask, width, 0),
        loss_mask=_pad_width(mine.loss_mask, width, 0),
        old_logprobs=_pad_width(mine.old_logprobs, width, 0),
    )
    return pad_batch(mine, len(chunks[0]))


def _pad_width(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``values`` over the ranks (a copy; ``values`` is not modified)."""
    if not ctx.distributed:
        return values
    out = values.detach().to(ctx.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def all_reduce_metrics(metrics: Mapping[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of each metric over the ranks.

    A key some ranks lack (a subtask they did not play) counts as 0 on those ranks.
    """
    if not ctx.distributed:
        return {k: float(metrics[k]) for k in sorted(metrics)}
    names: list[list[str] | None] = [None] * ctx.world_size
    dist.all_gather_object(names, sorted(metrics))
    keys = sorted({k for n in names for k in n or ()})
    values = [float(metrics.get(k, 0.0)) for k in keys]
    total = all_reduce_sum(torch.tensor(values, dtype=torch.float64), ctx)
    return dict(zip(keys, (total / ctx.world_size).tolist(), strict=True))


class DistributedLearner(Learner):
    """The :class:`Learner` on a sharded model, one instance per rank, each with its own rows.

    ``cfg.mini_batch_size`` counts rows of the *global* mini-batch (all ranks together), so the
    same configuration gives the same optimizer steps on any number of processes.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_cfg: LossConfig,
        cfg: LearnerConfig,
        ctx: DistContext,
        *,
        temperature: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
        reference_logprobs: ReferenceLogprobs | None = None,
    ) -> None:
        """Check the sizes and build the per-rank learner.

        Args:
            model: the model after :func:`shard_model`.
            loss_cfg: the loss configuration.
            cfg: optimisation settings; ``mini_batch_size`` is global.
            ctx: the process context.
            temperature: the generator's sampling temperature (see :class:`Learner`).
            autocast_dtype: mixed-precision dtype of the forward passes.
            reference_logprobs: the KL reference (:func:`frozen_reference` or
                :func:`agents.training.lora.adapter_disabled_logprobs`); needed when ``kl_coef >
                0`` on a sharded model.
        """
        local = cfg.mini_batch_size // ctx.world_size
        if cfg.mini_batch_size % ctx.world_size or local % cfg.micro_batch_size:
            raise ValueError(
                f"trainer.mini_batch_size={cfg.mini_batch_size} must be a multiple of "
                f"world_size * trainer.micro_batch_size = {ctx.world_size * cfg.micro_batch_size}; "
                f"set e.g. trainer.mini_batch_size={ctx.world_size * cfg.micro_batch_size}"
            )
        if loss_cfg.kl_coef > 0 and reference_logprobs is None and ctx.distributed:
            raise ValueError(
                "kl_coef > 0 on a sharded model needs reference_logprobs: build it with "
                "agents.training.distributed.frozen_reference(model, ctx) before "
                "shard_model(model, ctx), "
                "or train LoRA adapters (agents.training.lora.adapter_disabled_logprobs)"
            )
        self.ctx = ctx
        super().__init__(
            model,
            loss_cfg,
            dataclasses.replace(cfg, mini_batch_size=local),
            temperature=temperature,
            autocast_dtype=autocast_dtype,
            reference_logprobs=reference_logprobs,
        )

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` [K] over the ranks."""
        return all_reduce_sum(values, self.ctx)

    def max_over_ranks(self, value: int) -> int:
        """Largest ``value`` over the ranks (micro-batch counts: every rank runs as many)."""
        return all_reduce_max(value, self.ctx)

    def update(self, batch: Batch, *, p: float) -> dict[str, float]:
        """One update on this rank's rows; every rank is padded to the longest local batch."""
        longest = all_reduce_max(len(batch), self.ctx)
        return super().update(pad_batch(batch, longest), p=p)


def all_reduce_max(value: int, ctx: DistContext) -> int:
    """Largest ``value`` over the ranks."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def frozen_reference(model: nn.Module, ctx: DistContext) -> ReferenceLogprobs:
    """A frozen, sharded copy of ``model`` as the KL reference (call before :func:`shard_model`)."""
    import copy

    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        raise ValueError("frozen_reference needs the unsharded model: call it before shard_model")
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    reference = shard_model(reference, ctx)

    def logprobs(micro: Batch, temperature: float) -> torch.Tensor:
        return token_logprobs(reference, micro, temperature=temperature)[0]

    return logprobs


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the full parameters on every rank so ranks can generate independently.

    A sharded forward is a collective; generation runs a different number of forward passes on
    each rank, so the parameters are all-gathered once here and kept until the block ends.
    Memory: one full copy of the parameters per rank during the block.
    """
    from torch.distributed.fsdp import FSDPModule

    shards = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in shards:
        module.set_reshard_after_forward(False)
        module.unshard()
    try:
        yield model
    finally:
        for module in shards:
            module.reshard()
            module.set_reshard_after_forward(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the full (unsharded) weights on every rank (a collective; vLLM reloads)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True)  # cpu_offload would keep them on rank 0 only
    state = get_model_state_dict(model, options=options)
    return {
        name: value.detach().to("cpu", copy=True)
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }


# ------------------------------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint): save on W ranks, load on any number


def save_checkpoint(
    run_dir: Path,
    *,
    learner: Learner,
    state: checkpoint.TrainingState,
    ctx: DistContext,
    keep: int = 2,
) -> Path:
    """Write ``ckpt-<iteration>`` (all ranks call it): sharded model + optimizer, rank-0 extras.

    The writer family of :func:`agents.training.checkpoint.save`: every rank writes its shard into
    the staging folder; once all have, rank 0 adds the trainer state (weights-only loadable) and the
    manifest (size and sha256 of every file, DCP's pickled ``.metadata`` included), renames the
    folder into place and fsyncs the run folder. With frozen parameters (LoRA) only the trainable
    weights and their optimizer state are saved. All ranks must see ``run_dir`` (one machine, or a
    shared file system).

    Raises:
        CheckpointWriteError: on every rank when a rank's write failed; the staging folder is
            removed and rank 0's message says what failed (disk full: bytes needed and free).
    """
    import torch.distributed.checkpoint as dcp

    tmp = checkpoint.staging_dir(run_dir, state.iteration)
    if ctx.is_main:
        checkpoint.stage(run_dir, state.iteration)
    barrier(ctx)
    sharded, weights = _sharded_state(learner)
    extras = {
        "scheduler": learner.scheduler.state_dict(),
        "shuffle": learner._shuffle.get_state(),  # the learner's shuffling state
        "rng": checkpoint.rng_state(),
        "state": dataclasses.asdict(state),
    }
    needed = checkpoint.tensor_bytes(sharded) + checkpoint.tensor_bytes(extras)
    error: Exception | None = None
    try:
        dcp.save(sharded, checkpoint_id=tmp)
    except Exception as exc:  # every rank learns of it below, so none waits forever
        error = exc
    _raise_if_any_failed(error, tmp, needed, ctx)
    if ctx.is_main:
        try:
            checkpoint.write_trainer_state(tmp / TRAINER_FILE, extras)
            checkpoint.publish(tmp, layout="sharded", weights=weights, iteration=state.iteration)
            checkpoint.prune(run_dir, keep)
        except Exception as exc:
            error = exc
    _raise_if_any_failed(error, tmp, needed, ctx)
    return run_dir / checkpoint.checkpoint_name(state.iteration)


def load_checkpoint(
    path: Path, *, learner: Learner, ctx: DistContext, verified: bool = False
) -> checkpoint.TrainingState:
    """Load a checkpoint into ``learner``: sharded on any number of ranks, one-process in one.

    The folder is checked against its manifest (unless ``verified``) and its trainer state read
    (weights-only) before anything changes; DCP's ``.metadata`` is a pickle that torch loads, so
    it is loaded only once its sha256 matched the manifest's.

    Args:
        path: a checkpoint folder.
        learner: the learner, its model built as the run built it (LoRA included).
        ctx: this process's context.
        verified: ``path`` was just verified (by rank 0 for every rank; see
            :func:`resume_checkpoint`).

    Returns:
        Where the run stood.

    Raises:
        CheckpointError: the folder does not verify or read; nothing was changed.
        RuntimeError: a one-process checkpoint under torchrun.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    manifest = checkpoint.read_manifest(path) if verified else checkpoint.verify(path)
    if manifest.layout == "single":
        if ctx.distributed:
            raise RuntimeError(
                f"{path} was written by one process; resume it without torchrun (sharded "
                "checkpoints, written under torchrun, resume on any number of processes)"
            )
        learner_state, state = checkpoint.load(
            path, model=learner.model, map_location=learner.device, verified=True
        )
        learner.load_state_dict(learner_state)
        return state
    extras = checkpoint.read_trainer_state(path / TRAINER_FILE)
    state = checkpoint.training_state(extras, path / TRAINER_FILE)
    sharded, weights = _sharded_state(learner, manifest.weights)
    _dcp_load(sharded, path)
    set_state_dict(
        learner.model,
        learner.optimizer,
        model_state_dict=sharded["model"],
        optim_state_dict=sharded["optimizer"],
        options=StateDictOptions(ignore_frozen_params=weights == "trainable", strict=False),
    )
    learner.scheduler.load_state_dict(extras["scheduler"])
    learner._shuffle.set_state(extras["shuffle"])
    checkpoint.set_rng_state(extras["rng"])
    return state


def resume_checkpoint(
    run_dir: Path, *, learner: Learner, ctx: DistContext
) -> tuple[Path, checkpoint.TrainingState] | None:
    """Load the newest checkpoint of ``run_dir`` that verifies, falling back to older ones.

    Each checkpoint skipped is logged with the reason (missing manifest or file, empty file, size
    or sha256 mismatch, unreadable trainer state). Under torchrun rank 0 checks the folders and
    every rank loads the one it chose.

    Returns:
        The folder loaded and its state, or ``None`` when the run has no checkpoint folder.

    Raises:
        CheckpointError: checkpoints exist but none verifies (the message lists why).
    """
    candidates = list(reversed(checkpoint.all_checkpoints(run_dir)))
    if not ctx.distributed:
        return checkpoint.first_loadable(
            candidates,
            lambda p: load_checkpoint(p, learner=learner, ctx=ctx),
            where=run_dir,
            hint=_START_OVER,
        )
    choice: list[tuple[str, str] | None] = [None]
    if ctx.is_main:
        try:
            found = checkpoint.first_loadable(
                candidates, _check_folder, where=run_dir, hint=_START_OVER
            )
            choice = [("found", str(found[0])) if found else ("none", "")]
        except checkpoint.CheckpointError as exc:
            choice = [("error", str(exc))]
    dist.broadcast_object_list(choice, src=0)
    status, detail = choice[0] or ("none", "")
    if status == "error":
        raise checkpoint.CheckpointError(detail)
    if status == "none":
        return None
    path = Path(detail)
    return path, load_checkpoint(path, learner=learner, ctx=ctx, verified=True)


def load_model_weights(
    path: Path, model: nn.Module, *, map_location: str | torch.device = "cpu"
) -> checkpoint.Manifest:
    """Evaluation: load only the weights of a checkpoint of either layout (any number of ranks).

    The weight files are verified first; the trainer state is never read and no RNG state is
    restored.

    Raises:
        CheckpointError: the weight files or the manifest do not verify.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    manifest = checkpoint.read_manifest(path)
    if manifest.layout == "single":
        return checkpoint.load_weights(path, model=model, map_location=map_location)
    checkpoint.verify(path, manifest.weight_files())
    options = StateDictOptions(ignore_frozen_params=manifest.weights == "trainable", strict=False)
    state = {"model": get_model_state_dict(model, options=options)}
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"], options=options)
    return manifest


def _sharded_state(learner: Learner, weights: str | None = None) -> tuple[dict[str, Any], str]:
    """Model and optimizer state keyed by parameter names (sharded as the model is).

    ``weights="trainable"`` leaves frozen parameters out (the default when some are frozen:
    LoRA); ``"full"`` keeps every weight. Returns the state and which of the two it is.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if weights is None:
        frozen = any(not p.requires_grad for p in learner.model.parameters())
        weights = "trainable" if frozen else "full"
    options = StateDictOptions(ignore_frozen_params=weights == "trainable")
    model_state, optim_state = get_state_dict(learner.model, learner.optimizer, options=options)
    return {"model": model_state, "optimizer": optim_state}, weights


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """``dcp.load`` with an error that says what to fix when the model does not fit."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as exc:
        raise ValueError(
            f"the sharded checkpoint {path} does not load into this model ({type(exc).__name__}: "
            f"{str(exc)[:300]}). Build the model as the run did: the same model.name and "
            "model.lora settings (see the run's run_config.json)"
        ) from exc


_START_OVER = (
    "To start over, keep these folders for inspection and train with a new run_dir= (resume=false "
    "in this run_dir would overwrite its metrics and, after trainer.keep saves, delete them)."
)


def _check_folder(path: Path) -> checkpoint.Manifest:
    """Verify a checkpoint and read its trainer state (what a load needs first)."""
    manifest = checkpoint.verify(path)
    checkpoint.read_trainer_state(path / TRAINER_FILE)
    return manifest


def _raise_if_any_failed(error: Exception | None, tmp: Path, needed: int, ctx: DistContext) -> None:
    """Raise on every rank when any rank failed (a collective); rank 0 removes ``tmp``."""
    if not all_reduce_max(int(error is not None), ctx):
        return
    if ctx.is_main:
        cause = error or RuntimeError("another rank could not write its shard (see its log)")
        raise checkpoint.save_failed(tmp, cause, needed=needed) from error
    raise checkpoint.CheckpointWriteError(
        f"rank {ctx.rank}: writing {tmp.name} failed"
        + (f" here ({type(error).__name__}: {error})" if error else " on another rank")
        + "; rank 0's error says why"
    ) from error


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in one process)."""
    if ctx.distributed:
        dist.barrier()
