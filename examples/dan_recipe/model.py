"""The reference DAN (Distract your Attention Network) built from dan-layers blocks.

Paper: Wen, Lin, Wang, Xu, "Distract Your Attention: Multi-head Cross Attention
Network for Facial Expression Recognition", Biomimetics 2023
(https://arxiv.org/abs/2109.07270).

No side effects on import; needs neither torchvision nor a download:

* :class:`ResNet18Features` is ResNet-18 without its average pooling and fc, written
  here with torchvision's parameter names, so a torchvision-format ResNet-18 file
  (for example the MS-Celeb ``resnet18_msceleb.pth`` the authors start from) loads
  into it with :func:`dan_recipe.weights.load_backbone_weights`.
* :class:`DAN` = backbone + :class:`dan_layers.MultiHeadAttentionBlock` +
  :class:`dan_layers.AttentionFusion`; ``forward`` returns
  ``(logits, feature_map, scaled_heads)`` like the authors' model.
* :class:`DANWithLosses` holds a :class:`DAN` and its losses in one module, which is
  what training (and DistributedDataParallel) works on.

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
import torch.nn.functional as F
from torch import Tensor, nn

import dan_layers

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


class DAN(nn.Module):
    """Distract your Attention Network: ResNet-18 trunk, K attention heads, fusion.

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
        super().__init__()
        self.num_classes = int(num_classes)
        self.num_heads = int(num_heads)
        self.spatial_reduction = int(spatial_reduction)
        self.channel_reduction = int(channel_reduction)
        self.backbone = ResNet18Features(in_channels)
        feat = ResNet18Features.out_channels
        self.attention = dan_layers.MultiHeadAttentionBlock(
            feat,
            num_heads,
            spatial_reduction=spatial_reduction,
            channel_reduction=channel_reduction,
        )
        self.fusion = dan_layers.AttentionFusion(feat, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feature_map = self.backbone(x)
        heads = self.attention(feature_map)
        logits, scaled_heads = self.fusion(heads)
        return logits, feature_map, scaled_heads

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


class DANWithLosses(nn.Module):
    """DAN and its losses in one module, so that DDP also synchronises the loss centres.

    ``forward(images, labels)`` returns a dict: ``loss`` (the total, to backpropagate),
    ``ce``, ``affinity``, ``partition`` (detached parts) and ``logits`` (detached).
    The losses are computed in float32 even under autocast.

    Total loss = CE + lambda_af * affinity (or center) loss + lambda_pt * partition loss.
    State-dict keys: ``model.*`` (the :class:`DAN`) and ``affinity.centers``.

    Args:
        model: The network.
        affinity: ``"affinity"``, ``"center"`` or ``"none"``.
        partition: ``"paper"``, ``"official"`` or ``"none"``.
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
        lambda_af: float = 1.0,
        lambda_pt: float = 1.0,
        num_centers: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        feat_dim = model.fusion.fc.in_features
        self.affinity: nn.Module | None
        if affinity == "affinity":
            self.affinity = dan_layers.AffinityLoss(model.num_classes, feat_dim, num_centers=num_centers)
        elif affinity == "center":
            if num_centers not in (None, model.num_classes):
                raise ValueError(
                    f"--num-centers: center loss expects one centre per class "
                    f"({model.num_classes}), got {num_centers}"
                )
            self.affinity = dan_layers.CenterLoss(model.num_classes, feat_dim)
        elif affinity == "none":
            self.affinity = None
        else:
            raise ValueError(f"affinity: expected affinity|center|none, got {affinity!r}")
        self.partition: nn.Module | None
        if partition in ("paper", "official"):
            self.partition = dan_layers.PartitionLoss(partition)
        elif partition == "none":
            self.partition = None
        else:
            raise ValueError(f"partition: expected paper|official|none, got {partition!r}")
        self.lambda_af = float(lambda_af)
        self.lambda_pt = float(lambda_pt)
        self.label_smoothing = float(label_smoothing)

    def loss_parameters(self) -> list[nn.Parameter]:
        """The losses' own parameters (the centres), for their optimizer group."""
        return [] if self.affinity is None else list(self.affinity.parameters())

    def forward(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits, feature_map, heads = self.model(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            zero = ce.new_zeros(())
            af = self.affinity(feature_map.float(), labels) if self.affinity is not None else zero
            pt = self.partition(heads.float()) if self.partition is not None else zero
            loss = ce + self.lambda_af * af + self.lambda_pt * pt
        return {
            "loss": loss,
            "ce": ce.detach(),
            "affinity": af.detach(),
            "partition": pt.detach(),
            "logits": logits.detach(),
        }


def build_model_with_losses(cfg: Mapping[str, Any], num_classes: int) -> DANWithLosses:
    """A fresh :class:`DAN` and its losses, as the run configuration ``cfg`` says.

    Args:
        cfg: Needs ``num_heads``, ``affinity``, ``partition``, ``lambda_af``,
            ``lambda_pt``, ``num_centers`` and ``label_smoothing``.
        num_classes: Number of classes.

    Returns:
        The module to train (or to evaluate the losses of).
    """
    model = DAN(num_classes=num_classes, num_heads=cfg["num_heads"])
    return DANWithLosses(
        model,
        affinity=cfg["affinity"],
        partition=cfg["partition"],
        lambda_af=cfg["lambda_af"],
        lambda_pt=cfg["lambda_pt"],
        num_centers=cfg["num_centers"],
        label_smoothing=cfg["label_smoothing"],
    )
