"""The process group and FSDP2 sharding (``torch.distributed``), launched with ``torchrun``.

This module holds what differs between one process and many: joining the process group
(:func:`init_distributed`), sharding a model (:func:`shard_model`), gathering its weights
(:func:`full_state_dict`, :func:`gathered_for_generation`) and the collectives. Every collective
is the identity without a process group (:data:`ONE_PROCESS`), so the learner
(:class:`agents.training.learner.Learner`), the KL reference (:mod:`agents.training.reference`) and
the checkpoints (:mod:`agents.training.checkpoint`) run one code path on any number of processes.

Each process (rank) holds a shard of every parameter, gradient and optimizer state
(``torch.distributed.fsdp.fully_shard``), computes log-probs and the loss on its own rows of the
batch, and the gradients are summed over the ranks by FSDP's reduce-scatter.

Exact gradient normalisation. A mini-batch of one process is split into micro-batches and
micro-batch ``m`` is weighted by ``u(m) / u(mini)``, where ``u`` is
:func:`holderpo.loss.loss_units` (tokens for ``token_mean``, non-empty rows for ``seq_mean`` and
``seq_sum_const``), so the accumulated gradient is that of the whole mini-batch's loss. Across ranks
the global mini-batch is the union of the ranks' local mini-batches, so the weight of a rank's
micro-batch is ``u(m) / Σ_ranks u(local mini)`` (the denominator is one :func:`all_reduce_sum`),
and the rank gradients must be **summed**: :func:`shard_model` sets FSDP's gradient divide factor
to 1 (its default, a mean over ranks, would shrink every gradient by the world size). The metrics
are weighted the same way and summed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


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


ONE_PROCESS = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
"""The context of a plain ``python -m ...`` (no process group): every collective is the identity."""


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


def all_reduce_max(value: int, ctx: DistContext) -> int:
    """Largest ``value`` over the ranks."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (a picklable value; the identity in one process)."""
    if not ctx.distributed:
        return obj
    box: list[T | None] = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_gather_list(items: list[T], ctx: DistContext) -> list[T]:
    """Every rank's ``items`` concatenated in rank order (``items`` itself with one process)."""
    if not ctx.distributed:
        return items
    gathered: list[list[T] | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part or ()]


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in one process)."""
    if ctx.distributed:
        dist.barrier()
