"""Weight files: safe reading, key reports, torchvision backbones and the authors' layout.

* :func:`load_weights_only` is the one place that calls ``torch.load``: always with
  ``weights_only=True``, and a file it cannot read gives a :class:`CheckpointError`
  that says why in one line (never PyTorch's advice to load unsafely).
* :func:`load_backbone_weights` loads a torchvision-format ResNet-18 file (e.g. the
  MS-Celeb ``resnet18_msceleb.pth`` the authors start from) into the backbone.
* :func:`load_official_checkpoint` / :func:`to_official_state_dict` convert between
  our :class:`~dan_recipe.model.DAN` and the authors' published checkpoints
  (``features.*``, ``cat_head{i}.*``, ``fc.*``, ``bn.*``), strictly.

Our own training checkpoints are :mod:`dan_recipe.checkpoints`'s business; its
:func:`~dan_recipe.checkpoints.load_model` loads either kind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import dan_layers

from .errors import CheckpointError
from .model import DAN, ResNet18Features

__all__ = [
    "CheckpointError",
    "check_state_dict_keys",
    "describe_load_error",
    "format_key_report",
    "infer_official_config",
    "is_official_state_dict",
    "load_backbone_weights",
    "load_official_checkpoint",
    "load_weights_only",
    "official_key_names",
    "read_state_dict",
    "to_official_state_dict",
]

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
