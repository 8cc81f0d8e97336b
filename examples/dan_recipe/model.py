"""The reference DAN (Distract your Attention Network) built from dan-layers blocks.

Paper: Wen, Lin, Wang, Xu, "Distract Your Attention: Multi-head Cross Attention
Network for Facial Expression Recognition", Biomimetics 2023
(https://arxiv.org/abs/2109.07270).

No side effects on import; needs neither torchvision nor a download:

* :class:`ResNet18Features` is ResNet-18 without its average pooling and fc, written
  here with torchvision's parameter names, so a torchvision-format ResNet-18 file
  (for example the MS-Celeb ``resnet18_msceleb.pth`` the authors start from) loads
  into it with :func:`dan_recipe.weights.load_backbone_weights`.
* :class:`DAN` = backbone + :class:`dan_layers.DANHead` (multi-head attention +
  fusion); ``forward`` returns ``(logits, feature_map, scaled_heads)`` like the
  authors' model.
* :class:`DANWithLosses` is a :class:`dan_layers.DANLoss` holding the :class:`DAN`
  it trains, one module, which is what training (and DistributedDataParallel)
  works on.

Weight files (ours and the authors') are read by :mod:`dan_recipe.checkpoints` and
:mod:`dan_recipe.weights`; :func:`dan_recipe.checkpoints.load_model` is the one call
for inference.

Architecture facts (tested): 19,723,733 parameters at 7 classes and 4 heads,
2.22 G multiply-accumulates per 224 x 224 image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import dan_layers

from .errors import UserError

__all__ = [
    "DAN",
    "BasicBlock",
    "DANWithLosses",
    "ResNet18Features",
    "build_model_with_losses",
    "count_macs",
]


# --------------------------------------------------------------------------------------
# Backbone: ResNet-18 trunk with torchvision's key names
# --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), parameter names as torchvision's."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Features(nn.Module):
    """ResNet-18 without average pooling and fc: image (B,3,H,W) -> map (B,512,H/32,W/32).

    Parameter and buffer names equal torchvision's ``resnet18()`` minus ``fc.*``
    (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``layer4.1.bn2``,
    ``layerN.0.downsample.{0,1}``). Initialisation follows torchvision: Kaiming
    normal (fan_out, ReLU) for convs, BatchNorm weight 1 and bias 0.
    """

    out_channels = 512

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --------------------------------------------------------------------------------------
# DAN
# --------------------------------------------------------------------------------------


class DAN(dan_layers.DANHead):
    """Distract your Attention Network: ResNet-18 trunk + :class:`dan_layers.DANHead`.

    A :class:`dan_layers.DANHead` (K attention heads and their fusion) with the
    ResNet-18 trunk in front, so the state-dict keys are ``backbone.*``,
    ``attention.*`` and ``fusion.*``, as they have always been. Unlike the head,
    ``forward`` takes images.

    Args:
        num_classes: number of expression classes N.
        num_heads: number of cross-attention heads K (the paper uses 4).
        spatial_reduction: channel reduction of each head's 1x1 conv (DAN: 2).
        channel_reduction: reduction of each head's channel-attention MLP (DAN: 16).
        in_channels: image channels.

    Attributes:
        backbone: :class:`ResNet18Features`.
        attention: :class:`dan_layers.MultiHeadAttentionBlock`.
        fusion: :class:`dan_layers.AttentionFusion`.

    Shape:
        forward(x (B,3,H,W)) -> (logits (B,N), feature_map (B,512,H/32,W/32),
        scaled_heads (B,K,512)), the authors' return triple.
    """

    def __init__(
        self,
        num_classes: int = 7,
        num_heads: int = 4,
        *,
        spatial_reduction: int = 2,
        channel_reduction: int = 16,
        in_channels: int = 3,
    ) -> None:
        super().__init__(
            ResNet18Features.out_channels,
            int(num_classes),
            num_heads=int(num_heads),
            spatial_reduction=int(spatial_reduction),
            channel_reduction=int(channel_reduction),
        )
        self.spatial_reduction = int(spatial_reduction)
        self.channel_reduction = int(channel_reduction)
        self.backbone = ResNet18Features(in_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        feature_map = self.backbone(x)
        logits, scaled_heads = super().forward(feature_map)
        return logits, feature_map, scaled_heads

    def forward_details(self, x: Tensor) -> dict[str, Tensor]:
        """The forward triple and what lies between, as a dict.

        Keys: ``logits``, ``feature_map``, ``heads`` (scaled, what the partition loss
        takes), ``raw_heads`` (before the log-softmax, ``(B, K, 512)``) and the heads'
        spatial ``maps`` ``(B, K, H/32, W/32)``.
        """
        feature_map = self.backbone(x)
        raw_heads, maps = self.attention(feature_map, return_attention=True)
        logits, heads = self.fusion(raw_heads)
        return {
            "logits": logits, "feature_map": feature_map, "heads": heads, "raw_heads": raw_heads, "maps": maps,
        }  # fmt: skip

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> Tensor:
        """Each head's spatial attention map for images ``x``: (B, K, H/32, W/32)."""
        _, maps = self.attention(self.backbone(x), return_attention=True)
        return maps


# --------------------------------------------------------------------------------------
# Multiply-accumulate count
# --------------------------------------------------------------------------------------


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of one forward pass over ``x``, per sample.

    Counted with forward hooks on every ``nn.Conv2d`` (output elements x
    in_channels/groups x kernel area) and ``nn.Linear`` (output elements x
    in_features); BatchNorm, ReLU, pooling and elementwise ops are not counted,
    which is the usual convention (and the paper's).
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: Any, out: Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, _inp: Any, out: Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // x.shape[0]


# --------------------------------------------------------------------------------------
# Model + losses in one module (what DDP wraps)
# --------------------------------------------------------------------------------------


class DANWithLosses(dan_layers.DANLoss):
    """DAN and its losses in one module, so that DDP also synchronises the loss centres.

    A :class:`dan_layers.DANLoss` that holds the :class:`DAN` it trains:
    ``forward(images, labels)`` returns a dict: ``loss`` (the total, to
    backpropagate), ``ce``, ``affinity``, ``partition`` (detached parts) and
    ``logits`` (detached). The losses are computed in float32 even under autocast.

    Total loss = CE + lambda_af * affinity (or center) loss + lambda_pt * partition loss.
    State-dict keys: ``model.*`` (the :class:`DAN`) and ``affinity.centers``.

    Args:
        model: The network.
        affinity: ``"affinity"``, ``"center"`` or ``"none"``.
        partition: ``"paper"``, ``"official"`` or ``"none"``.
        partition_normalize: The scale-invariant partition loss (``normalize=True``).
        lambda_af: Weight of the affinity (or center) loss.
        lambda_pt: Weight of the partition loss.
        num_centers: Affinity loss centres (default: one per class).
        label_smoothing: Of the cross-entropy.

    Raises:
        ValueError: On an unknown loss name, or centres that do not fit the loss.
    """

    def __init__(
        self,
        model: DAN,
        *,
        affinity: str = "affinity",
        partition: str = "paper",
        partition_normalize: bool = False,
        lambda_af: float = 1.0,
        lambda_pt: float = 1.0,
        num_centers: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            model.num_classes,
            model.fusion.fc.in_features,
            lambda_af=lambda_af,
            lambda_pt=lambda_pt,
            affinity=affinity,  # type: ignore[arg-type]
            partition=partition,  # type: ignore[arg-type]
            normalize=partition_normalize,
            num_centers=num_centers,
            label_smoothing=label_smoothing,
        )
        self.model = model

    def loss_parameters(self) -> list[nn.Parameter]:
        """The losses' own parameters (the centres), for their optimizer group."""
        return [] if self.affinity is None else list(self.affinity.parameters())

    def forward(  # type: ignore[override]
        self, images: Tensor, labels: Tensor, *, details: bool = False
    ) -> dict[str, Tensor]:
        """The losses; with ``details=True`` also ``maps`` and ``raw_heads`` (detached)."""
        if not details:
            logits, feature_map, heads = self.model(images)
            out = super().forward(logits, feature_map, heads, labels)
            return {**out._asdict(), "logits": logits.detach()}
        d = self.model.forward_details(images)
        out = super().forward(d["logits"], d["feature_map"], d["heads"], labels)
        extra = {k: d[k].detach() for k in ("logits", "maps", "raw_heads")}
        return {**out._asdict(), **extra}


#: The training script's flag for an argument of DAN / DANLoss named in a ValueError.
_FLAG_OF_ARGUMENT = {
    "num_heads": "--num-heads",
    "affinity": "--affinity",
    "partition": "--partition",
    "normalize": "--partition-normalize",
    "num_centers": "--num-centers",
    "label_smoothing": "--label-smoothing",
}


def build_model_with_losses(cfg: Mapping[str, Any], num_classes: int) -> DANWithLosses:
    """A fresh :class:`DAN` and its losses, as the run configuration ``cfg`` says.

    Args:
        cfg: Needs ``num_heads``, ``affinity``, ``partition``, ``lambda_af``,
            ``lambda_pt``, ``num_centers`` and ``label_smoothing``.
        num_classes: Number of classes.

    Returns:
        The module to train (or to evaluate the losses of).

    Raises:
        UserError: Settings that do not fit together (the message names the flag).
    """
    try:
        model = DAN(num_classes=num_classes, num_heads=cfg["num_heads"])
        return DANWithLosses(
            model,
            affinity=cfg["affinity"],
            partition=cfg["partition"],
            partition_normalize=cfg.get("partition_normalize", False),
            lambda_af=cfg["lambda_af"],
            lambda_pt=cfg["lambda_pt"],
            num_centers=cfg["num_centers"],
            label_smoothing=cfg["label_smoothing"],
        )
    except ValueError as exc:  # the library names its argument ("num_centers: ..."); say the flag
        name, _, reason = str(exc).partition(": ")
        raise UserError(f"{_FLAG_OF_ARGUMENT.get(name, name)}: {reason}") from None
