"""A plain re-implementation of the authors' DAN structure, the baseline of the benchmarks.

Written here from the description in ``/work/shared/DESIGN.md`` and the paper; it
mirrors the *structure* of the authors' code (github.com/yaoing/DAN, MIT), which is
what the benchmarks measure against:

* one ``RefCrossAttentionHead`` per head = ``RefSpatialAttention`` (1x1 conv + BN,
  then 3x3 / 1x3 / 3x1 convs each + BN, summed, ReLU, summed over channels,
  input x map) followed by ``RefChannelAttention`` (global average pooling,
  Linear / BatchNorm1d / ReLU / Linear / Sigmoid gate, pooled x gate);
* ``RefMultiHead`` holds K such heads and loops over them in Python, then stacks;
* ``ref_affinity_loss`` builds the full B x N distance matrix by the expansion
  |x|^2 + |c|^2 - 2 x.c, masks it with a one-hot label mask, divides by the
  centres' summed variance and clamps every entry to [1e-12, 1e12];
* ``RefDAN`` = the same ResNet-18 trunk as ``examples/dan_recipe/model.py`` + ``RefMultiHead`` +
  Linear + BatchNorm1d.

Nothing here is imported by the library; it exists to be compared against.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import dan_layers

__all__ = [
    "RefChannelAttention",
    "RefCrossAttentionHead",
    "RefDAN",
    "RefMultiHead",
    "RefSpatialAttention",
    "block_from_reference",
    "load_examples_dan",
    "ref_affinity_loss",
    "ref_partition_loss",
]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _conv_bn(cin: int, cout: int, kernel: tuple[int, int]) -> nn.Sequential:
    pad = (kernel[0] // 2, kernel[1] // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad), nn.BatchNorm2d(cout))


class RefSpatialAttention(nn.Module):
    """One head's spatial attention, the authors' way (key names as theirs)."""

    def __init__(self, channels: int = 512, reduction: int = 2) -> None:
        super().__init__()
        hidden = channels // reduction
        self.conv1x1 = _conv_bn(channels, hidden, (1, 1))
        self.conv_3x3 = _conv_bn(hidden, channels, (3, 3))
        self.conv_1x3 = _conv_bn(hidden, channels, (1, 3))
        self.conv_3x1 = _conv_bn(hidden, channels, (3, 1))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1x1(x)
        z = self.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))
        amap = z.sum(dim=1, keepdim=True)
        return x * amap


class RefChannelAttention(nn.Module):
    """One head's channel attention (squeeze-and-excitation on the pooled vector)."""

    def __init__(self, channels: int = 512, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.attention = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.gap(x).flatten(1)
        return pooled * self.attention(pooled)


class RefCrossAttentionHead(nn.Module):
    """Spatial then channel attention; initialised like the authors' head."""

    def __init__(self, channels: int = 512) -> None:
        super().__init__()
        self.sa = RefSpatialAttention(channels)
        self.ca = RefChannelAttention(channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ca(self.sa(x))


class RefMultiHead(nn.Module):
    """K heads held as separate modules, looped over in Python, stacked to (B, K, C)."""

    def __init__(self, channels: int = 512, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        for i in range(num_heads):
            setattr(self, f"cat_head{i}", RefCrossAttentionHead(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [getattr(self, f"cat_head{i}")(x) for i in range(self.num_heads)]
        return torch.stack(outs).permute(1, 0, 2)


def block_from_reference(ref: RefMultiHead, **kwargs) -> dan_layers.MultiHeadAttentionBlock:
    """A fused ``MultiHeadAttentionBlock`` holding exactly ``ref``'s weights and BN statistics."""
    heads = [getattr(ref, f"cat_head{i}") for i in range(ref.num_heads)]
    channels = heads[0].sa.conv1x1[0].in_channels
    p = next(ref.parameters())
    fk = {"device": p.device, "dtype": p.dtype}
    spatial, channel = [], []
    for h in heads:
        sa = dan_layers.SpatialAttention(channels, **fk)
        sa.load_state_dict(h.sa.state_dict())
        ca = dan_layers.ChannelAttention(channels, **fk)
        ca.load_state_dict(h.ca.state_dict())
        spatial.append(sa)
        channel.append(ca)
    block = dan_layers.MultiHeadAttentionBlock(channels, ref.num_heads, **fk, **kwargs)
    block.load_from_heads(spatial, channel)
    return block.train(ref.training)


def ref_affinity_loss(
    features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor
) -> torch.Tensor:
    """The authors' affinity loss: full B x N distance matrix, one-hot mask, clamp, / B."""
    if features.ndim == 4:
        features = features.mean(dim=(2, 3))
    b, n = features.shape[0], centers.shape[0]
    distmat = features.pow(2).sum(dim=1, keepdim=True).expand(b, n) + centers.pow(2).sum(
        dim=1, keepdim=True
    ).expand(n, b).t()
    distmat = torch.addmm(distmat, features, centers.t(), beta=1, alpha=-2)
    classes = torch.arange(n, device=features.device)
    mask = labels.unsqueeze(1).expand(b, n).eq(classes.expand(b, n))
    dist = distmat * mask.to(distmat.dtype)
    dist = dist / centers.var(dim=0).sum()
    return dist.clamp(min=1e-12, max=1e12).sum() / b


def ref_partition_loss(heads: torch.Tensor) -> torch.Tensor:
    """The authors' partition loss: log(1 + K / (mean variance across heads + eps))."""
    k = heads.shape[1]
    if k == 1:
        return heads.new_zeros(())
    var = heads.var(dim=1).mean()
    return torch.log(1 + k / (var + sys.float_info.epsilon))


def load_examples_dan():
    """Import ``dan_recipe.model`` from ``examples/`` (the reference DAN built from dan-layers blocks)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    from dan_recipe import model  # noqa: PLC0415

    return model


class RefDAN(nn.Module):
    """The authors' DAN structure: ResNet-18 trunk, K looped heads, Linear + BatchNorm1d.

    The trunk is ``examples/dan_recipe/model.py``'s ``ResNet18Features`` (torchvision-equivalent), so
    that ours-vs-theirs differs only in the attention heads.
    """

    def __init__(self, num_classes: int = 7, num_heads: int = 4) -> None:
        super().__init__()
        dan = load_examples_dan()
        self.features = dan.ResNet18Features()
        self.num_head = num_heads
        self.heads = RefMultiHead(512, num_heads)
        self.fc = nn.Linear(512, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.features(x)
        heads = self.heads(fmap)
        if heads.shape[1] > 1:
            heads = torch.log_softmax(heads, dim=1)
        logits = self.bn(self.fc(heads.sum(dim=1)))
        return logits, fmap, heads
