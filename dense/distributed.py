"""torch.distributed for data-parallel dense training and sharded corpus encoding, launched by ``torchrun``.

``torchrun`` starts one process per GPU and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them and joins the process group (NCCL on CUDA, gloo on CPU). A plain
``python`` run has none of them: everything here then is the single-process case (:data:`SINGLE`) and no process
group is made, so the training and encoding code has one path for both.

Two collectives matter for the training loss, as in DPR and Tevatron:

- :func:`gather_with_grad` all-gathers the embeddings of every rank, so each rank scores its queries against the
  passages of the *global* batch (in-batch negatives from all GPUs). ``all_gather`` returns tensors without a graph;
  putting the local tensor back in its own slot keeps the gradient path to this rank's encoder.
- :func:`all_reduce_gradients` sums the parameter gradients over ranks after the backward pass(es). Every rank
  computes the same global loss but back-propagates only through its own slice, so the sum is the full-batch
  gradient. Summing by hand instead of wrapping the model in ``DistributedDataParallel`` keeps GradCache simple:
  it runs one backward per chunk, and DDP would reduce (or need ``no_sync``) on each of them; its encoder calls are
  also ``encode_query``/``encode_passage``, not ``forward``, which DDP hooks.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT = datetime.timedelta(hours=2)
"""Collective timeout. Ranks wait for each other at barriers after long work (an encoding shard, a checkpoint, the
slowest rank's shards), so it is generous; under ``torchrun`` a failed rank stops the others anyway."""
_BUCKET_ELEMENTS = 1 << 24  # gradients are summed in flat buckets of up to 16M values (64 MB of float32)


class DistributedSetupError(RuntimeError):
    """The launch environment is inconsistent (e.g. ``RANK`` >= ``WORLD_SIZE``) or ranks see different files."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the launch: rank, number of processes, and its GPU on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process: collectives are real."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, models, manifests and logs progress."""
        return self.rank == 0

    def device(self) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def resolve_device(self, device: str | torch.device | None) -> torch.device:
        """``device`` as given, except that a bare ``cuda`` (or none) becomes this rank's GPU."""
        if device is None:
            return self.device()
        device = torch.device(device)
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable value)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


SINGLE = DistContext()
"""One process, no process group."""


def env_context(environ: dict[str, str] | None = None) -> DistContext:
    """The context the launcher's environment variables describe (:data:`SINGLE` without them)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        world_size = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise DistributedSetupError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedSetupError(
            f"inconsistent launch environment RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank}; "
            "start distributed runs with torchrun"
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def current_context() -> DistContext:
    """The context of the process group already joined (:data:`SINGLE` when there is none)."""
    if dist.is_available() and dist.is_initialized():
        env = env_context()
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=env.local_rank)
    return SINGLE


def init_distributed(timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """Join the process group the environment describes (once; later calls return the same context).

    NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo otherwise. Without ``WORLD_SIZE`` > 1
    nothing is initialised and :data:`SINGLE` is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return current_context()
    context = env_context()
    if not context.enabled:
        return SINGLE
    if not dist.is_available():
        raise DistributedSetupError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedSetupError(f"WORLD_SIZE > 1 but {missing} are not set; start distributed runs with torchrun")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group(backend=backend, timeout=timeout)
    logger.info("joined the %s process group: rank %d of %d (local rank %d)", backend, context.rank,
                context.world_size, context.local_rank)
    return context


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined (scripts call this before exiting)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_on_main(context: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; its exception is raised on every rank.

    For decisions that read and change shared files (resume or start over, remove stale files): one rank makes
    them, and no rank is left waiting at a collective when it fails.
    """
    if not context.enabled:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if context.is_main:
        try:
            outcome = (True, fn())
        except Exception as err:  # noqa: BLE001 - handed to the other ranks, then raised here too
            outcome = (False, err)
    ok, value = context.broadcast_object(outcome)
    if not ok:
        raise value
    return value


def gather_with_grad(local: torch.Tensor, context: DistContext) -> torch.Tensor:
    """All ranks' ``local`` tensors concatenated in rank order; gradients flow into this rank's part only.

    Every rank must pass a tensor of the same shape (the trainer splits the global batch evenly).
    """
    if not context.enabled:
        return local
    parts = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[context.rank] = local
    return torch.cat(parts)


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], context: DistContext) -> None:
    """Sum every parameter's ``.grad`` over the ranks, in place (parameters without a gradient are left alone).

    The set of parameters with a gradient is the same on every rank (the same model, the same kind of batch).
    """
    if not context.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        same_kind = buckets and buckets[-1][0].dtype == g.dtype and buckets[-1][0].device == g.device
        if not same_kind or size + g.numel() > _BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel()
    return buckets


def broadcast_parameters(module: torch.nn.Module, context: DistContext) -> None:
    """Rank 0's parameters and buffers on every rank (a model built from the same files already agrees; this makes
    sure of it, e.g. for weights initialised at random)."""
    if not context.enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


__all__ = [
    "DEFAULT_TIMEOUT",
    "SINGLE",
    "DistContext",
    "DistributedSetupError",
    "all_reduce_gradients",
    "broadcast_parameters",
    "current_context",
    "env_context",
    "gather_with_grad",
    "init_distributed",
    "run_on_main",
    "shutdown_distributed",
]
