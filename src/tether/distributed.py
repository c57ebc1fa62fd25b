"""Data-parallel training on torch.distributed (processes started by ``torchrun``,
``accelerate launch`` or ``tether run --nproc N``).

Every process draws the same batch plan (same seed), takes a strided share of each
optimiser step's items, and normalises its losses by counts summed over all processes
(:func:`all_sum`). After the step's last backward, :func:`sync_gradients` sums the
gradients over processes in a few bucketed all-reduces — the reduction DDP does at the
end of a ``no_sync`` accumulation — so the optimiser step equals one process's on the
whole global batch, at any process count.

Why not the ``DistributedDataParallel`` wrapper itself: its reducer expects one forward
through the wrapper per backward, and Tether's passes are not that shape (a shared prompt
runs once and its K responses run on its KV cache, a reward model reads its backbone and
head separately, a value head rides on the policy's hidden states). Summing the gradients
once per optimiser step needs none of that and gives the same numbers.

With one process (no ``WORLD_SIZE`` above 1 in the environment) every function here is
the identity and nothing is imported or initialised.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch

__all__ = ["world_size", "rank", "local_rank", "is_main", "init_from_env", "device_for_rank", "shard",
           "local_micro", "all_sum", "all_sum_dict", "sync_gradients", "broadcast_object", "gather_objects",
           "barrier", "shutdown"]


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device_for_rank(requested: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``cuda:LOCAL_RANK``) when CUDA is there, else the CPU."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank() >= torch.cuda.device_count():
            from tether.config import ConfigError

            raise ConfigError(f"model.device: process {local_rank()} of this machine has no GPU of its own "
                              f"({torch.cuda.device_count()} visible); start at most one process per GPU, or set "
                              "model.device cpu")
        return torch.device(f"cuda:{local_rank()}")
    if requested == "auto":
        return torch.device("cpu")
    return torch.device(requested)


def init_from_env(backend: str | None = None, timeout_minutes: float = 120.0) -> bool:
    """Join the process group a launcher described in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Returns whether more than one process runs.

    The backend is NCCL when CUDA is there and gloo otherwise. The timeout is long because
    rank 0 alone runs the stages that are not data-parallel (sampling for labelers,
    evaluation) while the others wait.
    """
    if _active():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def shutdown() -> None:
    if _active():
        torch.distributed.destroy_process_group()


def shard(items: Sequence, *, world: int | None = None, at: int | None = None) -> list:
    """This process's strided share ``items[rank::world]`` (every process holds the same list)."""
    world = world_size() if world is None else world
    at = rank() if at is None else at
    return list(items)[at::world]


def local_micro(micro: list[list[int]], micro_batch_size: int) -> list[list[int]]:
    """This process's share of one optimiser step's micro-batches (every process drew the
    same plan): its strided share of the step's items, cut into micro-batches again."""
    if world_size() == 1:
        return micro
    items = shard([i for m in micro for i in m])
    return [items[j : j + micro_batch_size] for j in range(0, len(items), micro_batch_size)]


def _reduce_device() -> torch.device:
    if _active() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(value):
    """The sum over processes of a number or a tensor (a copy; the input is unchanged)."""
    if world_size() == 1:
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().to(_reduce_device(), copy=True)
        torch.distributed.all_reduce(out)
        return out.to(value.device)
    out = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
    torch.distributed.all_reduce(out)
    return float(out.item())


def all_sum_dict(values: dict[str, float]) -> dict[str, float]:
    """Sums over processes of a dict of numbers, in one all-reduce (same keys on every process)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    gathered = gather_objects(keys)
    if any(g != keys for g in gathered):
        raise RuntimeError(f"processes logged different metrics: {gathered}")
    out = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_reduce_device())
    torch.distributed.all_reduce(out)
    return dict(zip(keys, out.cpu().tolist()))


def sync_gradients(params: Sequence[torch.Tensor], bucket_mb: float = 32.0) -> None:
    """Sum ``.grad`` over processes, in buckets of about ``bucket_mb`` MB per dtype.

    A parameter that has a gradient on some process but not on this one (its items never
    reached it) counts zero here; one with no gradient anywhere keeps ``None``, so AdamW
    skips it exactly as a single process would.
    """
    if world_size() == 1:
        return
    device = _reduce_device()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(has)
    live = [p for p, n in zip(params, has.tolist()) if n > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, float] = {}
    limit = bucket_mb * 2**20
    for p in live:
        key = (p.grad.dtype, p.grad.device)
        lists = buckets.setdefault(key, [[]])
        size = p.grad.numel() * p.grad.element_size()
        if lists[-1] and filled.get(key, 0.0) + size > limit:
            lists.append([])
            filled[key] = 0.0
        lists[-1].append(p.grad)
        filled[key] = filled.get(key, 0.0) + size
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for lists in buckets.values():
        for grads in lists:
            flat = _flatten_dense_tensors(grads)
            moved = flat.to(device)
            torch.distributed.all_reduce(moved)
            for g, summed in zip(grads, _unflatten_dense_tensors(moved.to(flat.device), grads)):
                g.copy_(summed)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()
