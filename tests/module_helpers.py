"""Helpers shared by the module tests (imported by name, as pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, biases and BatchNorm running statistics (so eval-mode BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.dtype == torch.long:
            continue
        rand = torch.rand(tensor.shape, generator=g, dtype=torch.float64)
        if name.endswith("running_var") or (name.endswith("weight") and tensor.ndim == 1):  # BN scale
            value = 0.5 + rand
        else:
            value = (rand - 0.5) * (1.0 if tensor.ndim <= 1 else 2.0 / max(tensor[0].numel(), 1) ** 0.5)
        tensor.copy_(value.to(tensor.dtype))
    return module
