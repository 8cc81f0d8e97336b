"""Prototype forward paths for ``MultiHeadAttentionBlock``, measured by the benchmarks.

These are *candidates* for the library, not part of it: they reuse a block's own
parameters and buffers and change only how the work is laid out, so a benchmark
can compare them interleaved with the library's path and check that the outputs
are equal.

``perhead_forward``: the wide 1x1 convolution stays one convolution, but the
3x3 / 1x3 / 3x1 branches (or the merged ``conv_fused`` after re-parameterization)
run as K dense convolutions on slices of the grouped weights, with their
BatchNorms applied per head on slices of the BatchNorm buffers (train-mode running
statistics are updated in place through the slices). oneDNN's dense convolution
kernels are faster than its grouped ones on CPU, and per-head tensors stay in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dan_layers
from dan_layers import functional as DF


def _chunks(t: torch.Tensor | None, k: int, dim: int = 0) -> list[torch.Tensor | None]:
    # one SplitBackward for all heads (slicing each head separately would make every
    # slice's backward materialise a zero tensor of the full size)
    return [None] * k if t is None else list(t.chunk(k, dim=dim))


def perhead_maps(sa: dan_layers.SpatialAttention, x: torch.Tensor) -> torch.Tensor:
    """``sa.attention_map(x)`` computed with per-head dense branch convolutions: (B, K, H, W)."""
    k = sa.num_heads
    ys = sa.conv1x1(x).chunk(k, dim=1)
    z: list[torch.Tensor | None] = [None] * k
    for name in sa.branch_names:
        module = getattr(sa, name)
        conv, bn = (module, None) if isinstance(module, nn.Conv2d) else module
        ws, bs = _chunks(conv.weight, k), _chunks(conv.bias, k)
        if bn is not None:
            gammas, betas = _chunks(bn.weight, k), _chunks(bn.bias, k)
            means, variances = _chunks(bn.running_mean, k), _chunks(bn.running_var, k)
        for i in range(k):
            zi = F.conv2d(ys[i], ws[i], bs[i], padding=conv.padding)
            if bn is not None:
                use_batch_stats = sa.training or means[i] is None
                zi = F.batch_norm(zi, means[i], variances[i], gammas[i], betas[i], use_batch_stats,
                                  bn.momentum or 0.0, bn.eps)
            z[i] = zi if z[i] is None else z[i] + zi
    return torch.stack([F.relu(zi).sum(dim=1) for zi in z], dim=1)


def perhead_forward(block: dan_layers.MultiHeadAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` with per-head dense branch convolutions (same parameters, same output)."""
    maps = perhead_maps(block.spatial, x)
    return block.channel(DF.attention_pool(x, maps))
