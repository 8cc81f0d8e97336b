"""Where each of DAN's heads looks: its spatial attention map, and Grad-CAM++ of its attended features.

:func:`explain_heads` runs a batch of faces through a
:class:`~dan_recipe.model.DAN` once and returns, per face and head:

* ``attention``: the head's own spatial attention map (the unnormalised map that
  scales the feature map; ``(B, K, h, w)`` at the feature-map resolution);
* ``gradcam``: Grad-CAM++ (:mod:`dan_recipe.gradcam`) for the target class, with
  each head's spatially attended features ``x * map_k`` as the target layer (what
  the authors' ``run_grad_cam.py`` computes on ``cat_head{i}.sa``), ``(B, K, h, w)``.

The attended features are read by a forward hook on ``model.attention.spatial``,
the unit whose output (with ``return_attention=True``, the pair
``(attended, maps)``) holds every head; one backward pass gives every head's
gradient, since each head's features reach the score through their own channels.
:func:`upsample_maps` brings maps to the crop's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .gradcam import OutputRecorder, gradcam_plus_plus
from .model import DAN

__all__ = ["HeadMaps", "explain_heads", "upsample_maps"]


@dataclass(frozen=True)
class HeadMaps:
    """Per-face, per-head maps of one batch (all on the CPU, float32).

    Attributes:
        probabilities: ``(B, N)`` softmax of the logits.
        target: ``(B,)`` class explained for each face.
        attention: ``(B, K, h, w)`` spatial attention maps.
        gradcam: ``(B, K, h, w)`` Grad-CAM++ maps, unnormalised.
    """

    probabilities: Tensor
    target: Tensor
    attention: Tensor
    gradcam: Tensor


def _targets(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
    n = logits.shape[1]
    if target is None:
        return logits.argmax(dim=1)
    chosen = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if chosen.numel() == 1:
        chosen = chosen.expand(logits.shape[0])
    if chosen.shape[0] != logits.shape[0] or bool(((chosen < 0) | (chosen >= n)).any()):
        raise ValueError(
            f"target: expected None, one class index or one per face in [0, {n}), got {target!r} "
            f"for {logits.shape[0]} faces"
        )
    return chosen


def explain_heads(model: DAN, images: Tensor, target: int | Sequence[int] | Tensor | None = None) -> HeadMaps:
    """Attention maps and per-head Grad-CAM++ of the target class for a batch of faces.

    The model is used as it is (eval mode expected; re-parameterized or not gives
    the same maps). Its parameters get no gradients.

    Args:
        model: The DAN.
        images: Its input, ``(B, 3, S, S)``.
        target: Class to explain: ``None`` for each face's predicted class, one
            index for all faces, or one index per face.

    Returns:
        A :class:`HeadMaps`.

    Raises:
        ValueError: A target out of range, or of the wrong length.
    """
    with torch.no_grad():
        feature_map = model.backbone(images)
    feature_map = feature_map.detach().requires_grad_(True)  # a graph through the heads even if frozen
    with torch.enable_grad(), OutputRecorder(model.attention.spatial) as recorder:
        heads, maps = model.attention(feature_map, return_attention=True)
        logits, _ = model.fusion(heads)
    attended = recorder.output
    chosen = _targets(target, logits)
    score = logits.gather(1, chosen[:, None]).sum()
    (gradients,) = torch.autograd.grad(score, attended)
    if attended.ndim == 4:  # one head: (B, C, H, W)
        attended, gradients = attended.unsqueeze(1), gradients.unsqueeze(1)
    cams = gradcam_plus_plus(attended.detach().float(), gradients.float())
    return HeadMaps(
        probabilities=torch.softmax(logits.detach().float(), dim=1).cpu(),
        target=chosen.cpu(),
        attention=maps.detach().float().cpu(),
        gradcam=cams.cpu(),
    )


def upsample_maps(maps: Tensor, size: int) -> Tensor:
    """``(..., h, w)`` maps resized to ``(..., size, size)`` (bilinear, corners not aligned)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, size, size)
