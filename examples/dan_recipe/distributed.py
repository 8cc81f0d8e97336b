"""Distributed runs (``torchrun``): rank information and the few collectives the recipe uses.

Every helper is a no-op in a single process, so the training code reads the same
with one process or many. The backend is NCCL on CUDA and Gloo on the CPU.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Dist", "state_sha256", "tensor_sha256", "wrap_for_ddp"]


class Dist:
    """Rank/world information (from torchrun's environment); all helpers no-ops for one process."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.owns_group = False

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the process that logs and writes files)."""
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Start the process group (NCCL on CUDA, else Gloo) unless there is one."""
        if not self.enabled or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        self.owns_group = True

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (collective)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers_(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this object started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def wrap_for_ddp(net: nn.Module, device: torch.device, ranks: Dist) -> nn.Module:
    """``net`` in DistributedDataParallel when several processes run, else ``net`` itself.

    Wrap the model *with* its losses (:class:`dan_recipe.model.DANWithLosses`): the
    affinity centres are parameters too, and only DDP keeps them equal on every rank.
    """
    if not ranks.enabled:
        return net
    return nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None
    )


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's bytes (to check that ranks hold the same values)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict's keys and tensors, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
