"""The reference DAN (Distract your Attention Network) built from dan-layers blocks.

Paper: Wen, Lin, Wang, Xu, "Distract Your Attention: Multi-head Cross Attention
Network for Facial Expression Recognition", Biomimetics 2023
(https://arxiv.org/abs/2109.07270).

This module is importable as ``dan`` with ``examples/`` on ``sys.path`` and has no
side effects on import. It needs neither torchvision nor a download:

* :class:`ResNet18Features` is ResNet-18 without its average pooling and fc, written
  here with torchvision's parameter names, so a torchvision-format ResNet-18 file
  (for example the MS-Celeb ``resnet18_msceleb.pth`` the authors start from) loads
  into it with :func:`load_backbone_weights`.
* :class:`DAN` = backbone + :class:`dan_layers.MultiHeadAttentionBlock` +
  :class:`dan_layers.AttentionFusion`; ``forward`` returns
  ``(logits, feature_map, scaled_heads)`` like the authors' model.
* :func:`load_official_checkpoint` loads the authors' published checkpoints
  (``features.*``, ``cat_head{i}.*``, ``fc.*``, ``bn.*``) strictly, with
  ``torch.load(weights_only=True)``.

Architecture facts (tested): 19,723,733 parameters at 7 classes and 4 heads,
2.22 G multiply-accumulates per 224 x 224 image.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import dan_layers

__all__ = [
    "DAN",
    "BasicBlock",
    "CheckpointError",
    "ResNet18Features",
    "check_state_dict_keys",
    "count_macs",
    "format_key_report",
    "infer_official_config",
    "is_official_state_dict",
    "load_backbone_weights",
    "load_official_checkpoint",
    "official_key_names",
    "read_state_dict",
    "to_official_state_dict",
]


class CheckpointError(RuntimeError):
    """A weights file does not fit the model: names the missing/unexpected/misshapen keys."""


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
# Reading weight files safely
# --------------------------------------------------------------------------------------


def read_state_dict(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    *,
    container_keys: tuple[str, ...] = ("model_state_dict", "state_dict", "model"),
) -> dict[str, Tensor]:
    """Return the tensor dict inside a weights file or mapping.

    Files are read with ``torch.load(weights_only=True)``: no arbitrary object is
    ever unpickled. A dict holding one of ``container_keys`` is unwrapped; a
    ``module.`` prefix on every key (DataParallel/DDP) is stripped.

    Raises:
        CheckpointError: unreadable file, or no tensor dict in it.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # truncated zip, pickle with classes, ...
            raise CheckpointError(
                f"cannot read weights file {path!r} with torch.load(weights_only=True): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    else:
        obj = path_or_state_dict
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict of tensors, got {type(obj).__name__}")
    for key in container_keys:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        keys = sorted(map(str, obj.keys()))[:10]
        raise CheckpointError(
            f"expected a state dict of tensors (optionally under one of {container_keys}), "
            f"got a dict without tensors; its keys: {keys}"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def format_key_report(missing: list[str], unexpected: list[str], shapes: list[str], what: str) -> str:
    """One message naming every missing, unexpected and misshapen key (20 of each shown)."""

    def fmt(keys: list[str]) -> str:
        head = ", ".join(keys[:20])
        return head + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")

    parts = [f"{what} does not match the model:"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {fmt(shapes)}")
    return "\n  ".join(parts)


def check_state_dict_keys(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or misshapen key."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(format_key_report(missing, unexpected, shapes, what))


# --------------------------------------------------------------------------------------
# MS-Celeb / torchvision ResNet-18 backbone file
# --------------------------------------------------------------------------------------


def load_backbone_weights(
    model: DAN | ResNet18Features,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
) -> dict[str, list[str]]:
    """Load a torchvision-format ResNet-18 (e.g. ``resnet18_msceleb.pth``) into the backbone.

    The file may be a bare state dict or hold it under ``state_dict`` (the MS-Celeb
    file) or ``model_state_dict``. ``fc.*`` (the classifier of the pretraining task)
    is dropped and reported. Nothing is silently ignored: with ``strict=True`` any
    other missing or unexpected key (or a shape mismatch) raises
    :class:`CheckpointError`; with ``strict=False`` the matching keys are loaded and
    the rest is returned.

    Returns:
        ``{"missing": [...], "unexpected": [...], "dropped": [...]}`` (key names).
    """
    backbone = model.backbone if isinstance(model, DAN) else model
    state = read_state_dict(path_or_state_dict)
    dropped = sorted(k for k in state if k.startswith("fc."))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if strict and (missing or unexpected or bad_shape):
        raise CheckpointError(format_key_report(missing, unexpected, bad_shape, "ResNet-18 backbone weights"))
    if bad_shape:
        raise CheckpointError(format_key_report([], [], bad_shape, "ResNet-18 backbone weights"))
    backbone.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return {"missing": missing, "unexpected": unexpected, "dropped": dropped}


# --------------------------------------------------------------------------------------
# The authors' checkpoints
# --------------------------------------------------------------------------------------

# authors' features.<i> index -> our backbone attribute (indices 2 = ReLU, 3 = MaxPool)
_FEATURE_INDEX = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}
_BACKBONE_TO_FEATURE = {v: k for k, v in _FEATURE_INDEX.items()}
_HEAD_RE = re.compile(r"^cat_head(\d+)\.(sa|ca)\.(.+)$")


def _head_modules(model: DAN) -> tuple[list[nn.Module], list[nn.Module]]:
    """Fresh per-head SpatialAttention / ChannelAttention modules shaped like ``model``'s."""
    c = model.fusion.fc.in_features
    spatial = [
        dan_layers.SpatialAttention(c, reduction=model.spatial_reduction) for _ in range(model.num_heads)
    ]
    channel = [
        dan_layers.ChannelAttention(c, reduction=model.channel_reduction) for _ in range(model.num_heads)
    ]
    return spatial, channel


def official_key_names(model: DAN) -> dict[str, tuple[int, ...]]:
    """The authors' state-dict key names (and shapes) that fit ``model``."""
    out: dict[str, tuple[int, ...]] = {}
    for k, v in model.backbone.state_dict().items():
        top, rest = k.split(".", 1)
        out[f"features.{_BACKBONE_TO_FEATURE[top]}.{rest}"] = tuple(v.shape)
    c = model.fusion.fc.in_features
    sa = dan_layers.SpatialAttention(c, reduction=model.spatial_reduction)  # every head alike
    ca = dan_layers.ChannelAttention(c, reduction=model.channel_reduction)
    for i in range(model.num_heads):
        for k, v in sa.state_dict().items():
            out[f"cat_head{i}.sa.{k}"] = tuple(v.shape)
        for k, v in ca.state_dict().items():
            out[f"cat_head{i}.ca.{k}"] = tuple(v.shape)
    for k, v in model.fusion.state_dict().items():
        out[k] = tuple(v.shape)
    return out


def infer_official_config(path_or_state_dict: Any) -> dict[str, int]:
    """``{"num_classes": N, "num_heads": K}`` of an authors'-layout checkpoint."""
    state = read_state_dict(path_or_state_dict)
    heads = {int(m.group(1)) for k in state if (m := _HEAD_RE.match(k))}
    if "fc.weight" not in state or not heads:
        raise CheckpointError(
            "not an authors' DAN checkpoint: expected keys fc.weight and cat_head<i>.*, got "
            f"{sorted(state)[:10]}"
        )
    return {"num_classes": int(state["fc.weight"].shape[0]), "num_heads": max(heads) + 1}


def is_official_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether a state dict uses the authors' key names (``features.*``, ``cat_head*``)."""
    return any(k.startswith("features.") for k in state) and any(k.startswith("cat_head") for k in state)


def load_official_checkpoint(model: DAN, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any]) -> DAN:
    """Load one of the authors' checkpoints into ``model``, strictly.

    Accepts the published files (a dict with ``model_state_dict``), a bare state dict,
    or a path to either. Key layout: ``features.{0,1,4..7}.*`` (ResNet-18 trunk),
    ``cat_head{i}.sa.*`` / ``cat_head{i}.ca.*`` per head, ``fc.*`` and ``bn.*``. The
    per-head tensors go through per-head :class:`dan_layers.SpatialAttention` /
    :class:`dan_layers.ChannelAttention` modules (same key names as the authors') and
    :meth:`dan_layers.MultiHeadAttentionBlock.load_from_heads`. After loading, ``model``
    in eval mode computes the authors' logits, feature map and scaled heads.

    Raises:
        CheckpointError: unreadable file, or missing / unexpected / misshapen keys
            (all of them are named).
    """
    state = read_state_dict(path_or_state_dict)
    expected = official_key_names(model)
    check_state_dict_keys({k: torch.empty(s) for k, s in expected.items()}, state, "authors' DAN checkpoint")

    backbone_state = {}
    for k, v in state.items():
        if k.startswith("features."):
            _, idx, rest = k.split(".", 2)
            backbone_state[f"{_FEATURE_INDEX[int(idx)]}.{rest}"] = v
    model.backbone.load_state_dict(backbone_state, strict=True)

    spatial, channel = _head_modules(model)
    for i in range(model.num_heads):
        for kind, mods in (("sa", spatial), ("ca", channel)):
            prefix = f"cat_head{i}.{kind}."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            mods[i].load_state_dict(sub, strict=True)
    ref = next(model.attention.parameters())
    spatial = [m.to(device=ref.device, dtype=ref.dtype) for m in spatial]
    channel = [m.to(device=ref.device, dtype=ref.dtype) for m in channel]
    model.attention.load_from_heads(spatial, channel)

    fusion_state = {k: v for k, v in state.items() if k.startswith(("fc.", "bn."))}
    model.fusion.load_state_dict(fusion_state, strict=True)
    return model


def to_official_state_dict(model: DAN) -> dict[str, Tensor]:
    """``model``'s weights under the authors' key names (inverse of the loader)."""
    out: dict[str, Tensor] = {}
    for k, v in model.backbone.state_dict().items():
        top, rest = k.split(".", 1)
        out[f"features.{_BACKBONE_TO_FEATURE[top]}.{rest}"] = v.detach().clone()
    spatial, channel = model.attention.split_heads()
    for i, (sa, ca) in enumerate(zip(spatial, channel, strict=True)):
        for k, v in sa.state_dict().items():
            out[f"cat_head{i}.sa.{k}"] = v.detach().clone()
        for k, v in ca.state_dict().items():
            out[f"cat_head{i}.ca.{k}"] = v.detach().clone()
    for k, v in model.fusion.state_dict().items():
        out[k] = v.detach().clone()
    return out
