"""The reference DAN, its weight files (ours and the authors'), and loading a model for inference.

Paper: Wen, Lin, Wang, Xu, "Distract Your Attention: Multi-head Cross Attention
Network for Facial Expression Recognition", Biomimetics 2023
(https://arxiv.org/abs/2109.07270).

* :class:`DAN` holds a ResNet-18 trunk (:class:`ResNet18Features`, written here with
  torchvision's parameter names: torchvision from PyPI does not import beside this
  project's CPU torch) and a :class:`dan_layers.DANHead`. ``forward`` returns
  ``(logits, feature_map, scaled_heads)`` like the authors' model.
* Weight files: our training checkpoints (``best.pt``, ``last.pt``: format
  :data:`CHECKPOINT_FORMAT`), the released model as ``model.safetensors`` +
  ``config.json`` (:func:`save_pretrained`), the authors' published checkpoints
  (:func:`load_official_checkpoint`, :func:`to_official_state_dict`) and a
  torchvision-format ResNet-18 such as their MS-Celeb backbone
  (:func:`load_backbone_weights`). Every file is read with
  ``torch.load(weights_only=True)`` or safetensors: nothing in a file is executed.
* :func:`load_model` turns any of them into an evaluation-mode :class:`DAN` and a
  :class:`ModelInfo` (classes, input size, normalisation, the data it learnt from)::

      model, info = load_model("runs/demo/best.pt")
      preprocess = eval_transform(info.image_size, info.mean, info.std)
      logits, _, _ = model(preprocess(image).unsqueeze(0))
      print(info.class_names[int(logits.argmax())])

Architecture facts (tested): 19,723,733 parameters at 7 classes and 4 heads,
2.22 G multiply-accumulates per 224 x 224 image.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import dan_layers

from .transforms import IMAGENET_MEAN, IMAGENET_STD
from .utils import (
    AFFECTNET_CLASSES,
    LABEL_SETS,
    CheckpointError,
    InputError,
    UsageError,
    atomic_write,
    write_json,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONFIG_FILE",
    "DAN",
    "WEIGHTS_FILE",
    "BasicBlock",
    "LabelsNeededError",
    "ModelInfo",
    "ResNet18Features",
    "check_state_dict_keys",
    "count_macs",
    "infer_official_config",
    "is_our_checkpoint",
    "load_backbone_weights",
    "load_model",
    "load_model_state",
    "load_official_checkpoint",
    "load_weights_only",
    "official_key_names",
    "read_checkpoint",
    "read_state_dict",
    "save_pretrained",
    "to_official_state_dict",
]

#: ``format`` of the checkpoints that train_dan.py writes.
CHECKPOINT_FORMAT = "dan-layers/train_dan/1"
_FORMAT_PREFIX = "dan-layers/train_dan/"


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
# DAN = backbone + DANHead
# --------------------------------------------------------------------------------------


class DAN(nn.Module):
    """Distract your Attention Network: a ResNet-18 trunk and a :class:`dan_layers.DANHead`.

    The head holds the K attention heads (``head.attention``) and their fusion
    (``head.fusion``). The state dict keeps the keys DAN checkpoints have always had,
    ``backbone.*``, ``attention.*`` and ``fusion.*`` (the ``head.`` level is left out
    when saving and put back when loading), so every file written before and after
    loads either way.

    Args:
        num_classes: number of expression classes N.
        num_heads: number of cross-attention heads K (the paper uses 4).
        spatial_reduction: channel reduction of each head's 1x1 conv (DAN: 2).
        channel_reduction: reduction of each head's channel-attention MLP (DAN: 16).
        in_channels: image channels.

    Shape:
        forward(x (B,3,H,W)) -> (logits (B,N), feature_map (B,512,H/32,W/32),
        scaled_heads (B,K,512)), the authors' return triple.

    Example:
        >>> model = DAN(num_classes=7).eval()
        >>> logits, feature_map, heads = model(torch.randn(1, 3, 64, 64))
        >>> logits.shape, feature_map.shape, heads.shape
        (torch.Size([1, 7]), torch.Size([1, 512, 2, 2]), torch.Size([1, 4, 512]))
        >>> sorted({k.split(".")[0] for k in model.state_dict()})
        ['attention', 'backbone', 'fusion']
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
        self.backbone = ResNet18Features(in_channels)
        self.head = dan_layers.DANHead(
            ResNet18Features.out_channels,
            int(num_classes),
            num_heads=int(num_heads),
            spatial_reduction=int(spatial_reduction),
            channel_reduction=int(channel_reduction),
        )
        self.spatial_reduction = int(spatial_reduction)
        self.channel_reduction = int(channel_reduction)
        self.register_state_dict_post_hook(_without_head_level)
        self.register_load_state_dict_pre_hook(_with_head_level)

    @property
    def num_classes(self) -> int:
        """Number of classes N."""
        return self.head.num_classes

    @property
    def num_heads(self) -> int:
        """Number of attention heads K."""
        return self.head.num_heads

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feature_map = self.backbone(x)
        logits, scaled_heads = self.head(feature_map)
        return logits, feature_map, scaled_heads

    def forward_details(self, x: Tensor) -> dict[str, Tensor]:
        """The forward triple and what lies between, as a dict.

        Keys: ``logits``, ``feature_map``, ``heads`` (scaled, what the partition loss
        takes), ``raw_heads`` (before the log-softmax, ``(B, K, 512)``) and the heads'
        spatial ``maps`` ``(B, K, H/32, W/32)``.
        """
        feature_map = self.backbone(x)
        raw_heads, maps = self.head.attention(feature_map, return_attention=True)
        logits, heads = self.head.fusion(raw_heads)
        return {
            "logits": logits,
            "feature_map": feature_map,
            "heads": heads,
            "raw_heads": raw_heads,
            "maps": maps,
        }

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> Tensor:
        """Each head's spatial attention map for images ``x``: (B, K, H/32, W/32)."""
        _, maps = self.head.attention(self.backbone(x), return_attention=True)
        return maps


_HEAD_PARTS = ("attention.", "fusion.")


def _without_head_level(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict hook: ``head.attention.*`` -> ``attention.*`` (and ``fusion``)."""
    for key in [k for k in state if k.startswith(prefix + "head.")]:
        state[prefix + key[len(prefix) + len("head.") :]] = state.pop(key)


def _with_head_level(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook: ``attention.*`` -> ``head.attention.*`` (and ``fusion``)."""
    for key in [k for k in state if k.startswith(tuple(prefix + p for p in _HEAD_PARTS))]:
        state[prefix + "head." + key[len(prefix) :]] = state.pop(key)


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


_UNSAFE_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_INNER_ERROR_RE = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def describe_load_error(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line and without unsafe advice.

    PyTorch's messages advise retrying with ``weights_only=False`` (which can run
    arbitrary code from the file); this says what is wrong with the file instead.

    Args:
        exc: The exception ``torch.load`` raised.

    Returns:
        A short reason, e.g. ``"the file is empty"``.
    """
    text = str(exc)
    unsafe = _UNSAFE_GLOBAL_RE.search(text)
    if unsafe:
        return (
            f"it holds a pickled Python object ({unsafe.group(1)}), which is not loaded for safety: "
            "a checkpoint must hold only tensors, numbers, strings, lists and dicts"
        )
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    if isinstance(exc, IsADirectoryError):
        return "expected a file, got a directory"
    if "PytorchStreamReader" in text:
        return "the file is cut short or corrupted (its zip archive cannot be read)"
    inner = _INNER_ERROR_RE.search(text)
    if "Unsupported operand" in text or (inner is None and isinstance(exc, (KeyError, ValueError))):
        return "not a PyTorch checkpoint (the file is not in torch.save's format)"
    if inner:
        return f"not a PyTorch checkpoint ({inner.group(1).strip().rstrip('.')})"
    if "Weights only load failed" in text:
        return "not a PyTorch checkpoint (its contents cannot be unpickled)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a PyTorch checkpoint ({type(exc).__name__}{': ' + first if first else ''})"


def load_weights_only(
    path: str | os.PathLike[str], what: str = "checkpoint", *, flag: str | None = None
) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Args:
        path: The file.
        what: What the file is meant to be, for the message (``"checkpoint"``).
        flag: The command-line option that named the file, to start the message with.

    Returns:
        The loaded object (dicts, lists, tensors, numbers, strings).

    Raises:
        FileNotFoundError: No file at ``path``.
        CheckpointError: Anything else that stops ``torch.load``; the message names
            the file and says why.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with classes, garbage, ...
        where = f"{flag} {path}: cannot read {what}" if flag else f"cannot read {what} {path!r}"
        raise CheckpointError(
            f"{where} with torch.load(weights_only=True): {describe_load_error(exc)}"
        ) from None


# --------------------------------------------------------------------------------------
# Key reports
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
        FileNotFoundError: No file at that path.
        CheckpointError: Unreadable file, or no tensor dict in it.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = load_weights_only(path_or_state_dict, "weights file")
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
    """One line naming every missing, unexpected and misshapen key (20 of each shown)."""

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
    return " ".join(parts[:1]) + " " + "; ".join(parts[1:])


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


def _head_modules(model: DAN) -> tuple[list[dan_layers.SpatialAttention], list[dan_layers.ChannelAttention]]:
    """Fresh per-head SpatialAttention / ChannelAttention modules shaped like ``model``'s."""
    c = model.head.fusion.fc.in_features
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
    c = model.head.fusion.fc.in_features
    sa = dan_layers.SpatialAttention(c, reduction=model.spatial_reduction)  # every head alike
    ca = dan_layers.ChannelAttention(c, reduction=model.channel_reduction)
    for i in range(model.num_heads):
        for k, v in sa.state_dict().items():
            out[f"cat_head{i}.sa.{k}"] = tuple(v.shape)
        for k, v in ca.state_dict().items():
            out[f"cat_head{i}.ca.{k}"] = tuple(v.shape)
    for k, v in model.head.fusion.state_dict().items():
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
    ref = next(model.head.attention.parameters())
    spatial = [m.to(device=ref.device, dtype=ref.dtype) for m in spatial]
    channel = [m.to(device=ref.device, dtype=ref.dtype) for m in channel]
    model.head.attention.load_from_heads(spatial, channel)

    fusion_state = {k: v for k, v in state.items() if k.startswith(("fc.", "bn."))}
    model.head.fusion.load_state_dict(fusion_state, strict=True)
    return model


def to_official_state_dict(model: DAN) -> dict[str, Tensor]:
    """``model``'s weights under the authors' key names (inverse of the loader)."""
    out: dict[str, Tensor] = {}
    for k, v in model.backbone.state_dict().items():
        top, rest = k.split(".", 1)
        out[f"features.{_BACKBONE_TO_FEATURE[top]}.{rest}"] = v.detach().clone()
    spatial, channel = model.head.attention.split_heads()
    for i, (sa, ca) in enumerate(zip(spatial, channel, strict=True)):
        for k, v in sa.state_dict().items():
            out[f"cat_head{i}.sa.{k}"] = v.detach().clone()
        for k, v in ca.state_dict().items():
            out[f"cat_head{i}.ca.{k}"] = v.detach().clone()
    for k, v in model.head.fusion.state_dict().items():
        out[k] = v.detach().clone()
    return out


# --------------------------------------------------------------------------------------
# Our checkpoints, and load_model for inference
# --------------------------------------------------------------------------------------


def is_our_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) is a checkpoint written by train_dan.py (``best.pt``, ``last.pt``)."""
    return isinstance(obj, Mapping) and str(obj.get("format", "")).startswith(_FORMAT_PREFIX)


def read_checkpoint(path: str | os.PathLike[str], flag: str) -> Any:
    """Load a checkpoint file that the command-line option ``flag`` (``"--resume"``) names.

    Returns:
        The loaded object: one of our checkpoints (``format`` checked) or anything
        else ``torch.load(weights_only=True)`` reads (an authors' checkpoint).

    Raises:
        InputError: No such file.
        CheckpointError: Unreadable, or written by a newer version of the recipe.
    """
    try:
        obj = load_weights_only(path, "checkpoint", flag=flag)
    except FileNotFoundError:
        raise InputError(
            "expected a checkpoint file, got a path that does not exist", subject=f"{flag} {path}"
        ) from None
    if is_our_checkpoint(obj) and obj["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"expected checkpoint format {CHECKPOINT_FORMAT!r}, got {obj['format']!r} (written by a newer "
            "train_dan.py)",
            subject=f"{flag} {path}",
        )
    return obj


def load_model_state(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``module.load_state_dict(state)`` after a check that names every key that does not fit.

    Raises:
        CheckpointError: Missing, unexpected or misshapen keys (all named).
    """
    check_state_dict_keys(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model expects, and where it came from.

    Attributes:
        class_names: Name of every output, in logit order.
        image_size: Square input size the model was trained at.
        mean: Normalisation means (RGB) of its inputs.
        std: Normalisation standard deviations (RGB).
        num_heads: Attention heads.
        source: ``"dan-layers"`` (trained by train_dan.py) or ``"authors"``.
        epoch: Training epoch of the weights, if recorded.
        path: The file (``""`` when a loaded dict was passed).
        data: The data it was trained on, as ``--data`` names it (``"synthetic"``,
            ``"rafdb"``, ``"affectnet"``, ``"imagefolder"``), ``None`` if unknown.
    """

    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_heads: int
    source: str
    epoch: int | None
    path: str
    data: str | None = None

    @property
    def synthetic(self) -> bool:
        """Whether it learnt from the built-in synthetic faces only (its labels mean nothing on photos)."""
        return self.data == "synthetic"


class LabelsNeededError(UsageError):
    """An authors' checkpoint whose file holds no class names and whose class count fits several orders.

    Attributes:
        num_classes: The checkpoint's class count.
    """

    def __init__(self, message: str, *, num_classes: int, subject: str | None = None) -> None:
        super().__init__(message, subject=subject)
        self.num_classes = num_classes


#: Files of a released model (timm's and open_clip's layout): weights without pickle, and what they mean.
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
_RELEASE_FORMAT = "dan-layers/dan/1"


def save_pretrained(model: DAN, info: ModelInfo, folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``model`` as ``model.safetensors`` and ``config.json`` into ``folder`` (each atomically).

    ``config.json`` holds what inference needs (classes, image size, normalisation,
    the data it learnt from); :func:`load_model` reads the folder back.

    Returns:
        ``{"weights": path, "config": path}``.
    """
    from safetensors.torch import save

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": _RELEASE_FORMAT,
        "architecture": "DAN (ResNet-18 trunk + dan_layers.DANHead)",
        "num_classes": model.num_classes,
        "num_heads": model.num_heads,
        "spatial_reduction": model.spatial_reduction,
        "channel_reduction": model.channel_reduction,
        "class_names": list(info.class_names),
        "image_size": info.image_size,
        "mean": list(info.mean),
        "std": list(info.std),
        "data": info.data,
        "epoch": info.epoch,
        "dan_layers": dan_layers.__version__,
    }
    weights = folder / WEIGHTS_FILE
    atomic_write(weights, lambda f: f.write(save(state, metadata={"format": "pt"})))
    write_json(config, folder / CONFIG_FILE)
    return {"weights": weights, "config": folder / CONFIG_FILE}


def load_model(
    path: str | os.PathLike[str] | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    labels: Sequence[str] | str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DAN, ModelInfo]:
    """Load a DAN, ours or the authors', ready for inference.

    Ours carry their class names, image size, normalisation and the data they
    learnt from: ``best.pt`` / ``last.pt`` of train_dan.py, or a folder (or its
    ``model.safetensors``) holding ``model.safetensors`` + ``config.json``. The
    authors' published files (``model_state_dict`` in their key layout, see
    :func:`load_official_checkpoint`) carry neither: they were trained at 224 px
    with ImageNet normalisation, and their class names come from ``labels``. With 8
    classes the default is AffectNet-8's order; a 7-class file may be RAF-DB or
    AffectNet-7, whose orders differ, so it needs ``labels``.

    Args:
        path: The checkpoint file or folder (or an already loaded dict).
        num_classes: Expected number of classes; another count is an error.
        labels: Class names in logit order, or ``"rafdb"``, ``"affectnet"`` (8)
            or ``"affectnet7"``. Overrides the names saved in one of ours.
        device: Where to put the model.

    Returns:
        ``(model, info)``: the :class:`DAN` in eval mode on ``device``, and a
        :class:`ModelInfo`.

    Raises:
        InputError: No such file or folder.
        CheckpointError: Unreadable, not a DAN checkpoint, or keys that do not fit.
        UsageError: ``num_classes`` or ``labels`` that do not fit the checkpoint
            (:class:`LabelsNeededError` for a 7-class authors' file without ``labels``).
    """
    where = "" if isinstance(path, Mapping) else os.fspath(path)
    if not isinstance(path, Mapping) and (Path(where).is_dir() or where.endswith(".safetensors")):
        model, info = _load_release(Path(where))
    else:
        if isinstance(path, Mapping):
            raw = path
        else:
            try:
                raw = load_weights_only(path, "checkpoint")
            except FileNotFoundError:
                raise InputError(
                    "expected a checkpoint, got a path that does not exist", subject=where
                ) from None
        model, info = _load_ours(raw, where) if is_our_checkpoint(raw) else _load_authors(raw, where)
    n = model.num_classes
    if num_classes is not None and num_classes != n:
        raise UsageError(
            f"expected a checkpoint with {num_classes} classes, got {n} in {where!r}", subject="num_classes"
        )
    if labels is not None or not info.class_names:
        info = replace(info, class_names=_class_names(labels, n, where))
    return model.to(device).eval(), info


def _load_ours(raw: Mapping[str, Any], where: str) -> tuple[DAN, ModelInfo]:
    if raw["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"expected format {CHECKPOINT_FORMAT!r}, got {raw['format']!r}", subject=where)
    args = raw["args"]
    model = DAN(num_classes=int(raw["num_classes"]), num_heads=int(args["num_heads"]))
    state = {k[len("model.") :]: v for k, v in raw["model"].items() if k.startswith("model.")}
    load_model_state(model, state, f"checkpoint {where}")
    prep = raw.get("preprocessing") or {}
    info = ModelInfo(
        class_names=tuple(raw.get("class_names") or ()),
        image_size=int(prep.get("image_size", args["image_size"])),
        mean=tuple(prep.get("mean", IMAGENET_MEAN)),
        std=tuple(prep.get("std", IMAGENET_STD)),
        num_heads=model.num_heads,
        source="dan-layers",
        epoch=int(raw["epoch"]),
        path=where,
        data=args.get("data"),
    )
    return model, info


def _load_release(where: Path) -> tuple[DAN, ModelInfo]:
    folder = where if where.is_dir() else where.parent
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    for needed in (weights, config_path):
        if not needed.is_file():
            raise InputError(
                f"expected {WEIGHTS_FILE} and {CONFIG_FILE} there, found no {needed.name}", subject=str(where)
            )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        from safetensors.torch import load_file

        state = load_file(weights)
    except Exception as exc:  # malformed JSON, truncated or foreign safetensors
        raise CheckpointError(f"cannot read it ({type(exc).__name__}: {exc})", subject=str(where)) from None
    if not isinstance(config, dict) or config.get("format") != _RELEASE_FORMAT:
        raise CheckpointError(f"expected {CONFIG_FILE} of format {_RELEASE_FORMAT!r}", subject=str(where))
    model = DAN(
        int(config["num_classes"]),
        int(config["num_heads"]),
        spatial_reduction=int(config["spatial_reduction"]),
        channel_reduction=int(config["channel_reduction"]),
    )
    load_model_state(model, state, f"weights {weights}")
    info = ModelInfo(
        tuple(config["class_names"]),
        int(config["image_size"]),
        tuple(config["mean"]),
        tuple(config["std"]),
        model.num_heads,
        "dan-layers",
        config.get("epoch"),
        str(where),
        config.get("data"),
    )
    return model, info


def _load_authors(raw: Any, where: str) -> tuple[DAN, ModelInfo]:
    shape = infer_official_config(raw)
    model = DAN(num_classes=shape["num_classes"], num_heads=shape["num_heads"])
    load_official_checkpoint(model, raw)
    epoch = raw.get("iter") if isinstance(raw, Mapping) else None
    info = ModelInfo(
        (),
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        model.num_heads,
        "authors",
        int(epoch) if isinstance(epoch, (int, float)) else None,
        where,
    )
    return model, info


def _class_names(labels: Sequence[str] | str | None, n: int, where: str) -> tuple[str, ...]:
    if labels is None:
        if n == len(AFFECTNET_CLASSES):
            return AFFECTNET_CLASSES
        raise LabelsNeededError(
            f"expected labels ('rafdb', 'affectnet7' or {n} names) for the authors' {n}-class checkpoint "
            f"{where!r}: its file holds no class names"
            + (" and RAF-DB and AffectNet-7 order their 7 classes differently" if n == 7 else ""),
            num_classes=n,
            subject="labels",
        )
    if isinstance(labels, str):
        if labels not in LABEL_SETS:
            raise UsageError(
                f"expected one of {sorted(LABEL_SETS)} or a list, got {labels!r}", subject="labels"
            )
        labels = LABEL_SETS[labels]
    if len(labels) != n:
        raise UsageError(f"expected {n} names (the checkpoint's classes), got {len(labels)}", subject="labels")
    return tuple(str(v) for v in labels)
