"""Data parallelism on ``torch.distributed`` (launched by ``torchrun``; gloo on CPU, NCCL on GPU).

The library never starts processes or schedules work of its own: when a default process group
is initialised (``torch.distributed.init_process_group``, or `init_from_env` under ``torchrun``),
the three heavy stages split their work by rank and the results are the single-process ones:

* **activation cache** (`stride_nnsight.activations.ActivationCache.build`): rank 0 creates the
  files, every rank computes and writes its share of the document batches (round robin), the
  cache is finished when all ranks are;
* **fitting** (`stride_nnsight.fitting.OperatorFitter`): every rank draws the *same* rows of a
  step from the same generator and computes the losses of its share of them (a strided slice);
  the operator gradients are summed over ranks (an all-reduce of the operator parameters only:
  the base model is frozen), so a step is the single-process step up to float rounding.
  Checkpoints are written by rank 0 and hold nothing rank-specific: a fit resumes with any
  world size;
* **measurement and recovery** (`stride_nnsight.Stride.attribute`): queries are split by rank,
  each rank measures and recovers its own, and the rows are gathered in the original order on
  every rank.

Files are shared through the file system (one node, or a shared one across nodes): every rank
must see the same ``checkpoint_dir`` / ``cache_dir``. Imports only torch and numpy.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = ["rank_and_world", "is_main_process", "init_from_env", "shutdown", "local_indices", "barrier",
           "all_reduce_gradients", "all_reduce_sum", "all_gather_objects", "broadcast_object",
           "assemble_rows"]


def _dist():
    return torch.distributed if torch.distributed.is_available() else None


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when none is initialised."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and shows progress."""
    return rank_and_world()[0] == 0


def init_from_env(backend: Optional[str] = None) -> tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when it asks for more than one process and none is
    initialised yet; ``backend`` defaults to NCCL when CUDA is available, else gloo. Returns
    ``(rank, world_size)``; ``(0, 1)`` outside ``torchrun``."""
    dist = _dist()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist is None or world <= 1 or dist.is_initialized():
        return rank_and_world()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return rank_and_world()


def shutdown(wait: bool = True) -> None:
    """Wait for every rank (``wait=True``), then destroy the default process group (a no-op when
    none is initialised). Call it before a ``torchrun`` process exits: a gloo group still alive
    when the interpreter shuts down can abort the process ("terminate called without an active
    exception", SIGABRT) while another rank is still working, which fails the whole job. Pass
    ``wait=False`` on an error path, where the other ranks may never reach the barrier."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def local_indices(n: int, rank: Optional[int] = None, world: Optional[int] = None) -> np.ndarray:
    """This rank's share of ``n`` items: ``rank, rank + world, ...`` (int64)."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    return np.arange(rank, n, world, dtype=np.int64)


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks, in place (one flat all-reduce per dtype and
    device). A missing gradient counts as zeros, so all ranks reduce the same tensors."""
    if rank_and_world()[1] <= 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (a copy; the input unchanged)."""
    out = values.detach().clone()
    if rank_and_world()[1] > 1:
        torch.distributed.all_reduce(out)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process)."""
    world = rank_and_world()[1]
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if rank_and_world()[1] <= 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def assemble_rows(parts: Sequence[tuple[np.ndarray, Any]], n: int) -> list[Any]:
    """Put per-rank ``(indices, rows)`` back in the original order: a list of ``n`` rows."""
    out: list[Any] = [None] * n
    for index, rows in parts:
        for i, row in zip(np.asarray(index).tolist(), rows):
            out[i] = row
    missing = [i for i, row in enumerate(out) if row is None]
    if missing:
        raise RuntimeError(f"rows {missing[:5]} were not returned by any rank")
    return out
