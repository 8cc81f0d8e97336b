r"""Grad-CAM++ (Chattopadhyay et al., WACV 2018, https://arxiv.org/abs/1710.11063), written here.

For activations $A^k$ of channel $k$ of a target layer and a class score $S$, with
gradients $g^k_{ij} = \partial S / \partial A^k_{ij}$, Grad-CAM++ weighs each channel by

$$w_k = \sum_{ij} \alpha^k_{ij}\,\mathrm{ReLU}(g^k_{ij}), \qquad
  \alpha^k_{ij} = \frac{(g^k_{ij})^2}{2 (g^k_{ij})^2 + \sum_{ab} A^k_{ab}\,(g^k_{ij})^3}$$

and the map is $L_{ij} = \mathrm{ReLU}(\sum_k w_k A^k_{ij})$. The $\alpha$ above is
the paper's Eq. 19: its general $\alpha$ (Eq. 10, built from the second and third
derivatives of the score) for the score $Y = \exp(S)$, where the derivatives of $Y$
are powers of $g$ once $S$ is piecewise linear in $A$ (a ReLU network). It is what
the common implementations compute, pytorch-grad-cam's (used by the DAN authors'
``run_grad_cam.py``) included, whether or not the layers after $A$ are piecewise
linear; in DAN they are not (sigmoid gates, log-softmax over heads), so, there as
there, the closed form is the method's definition rather than Eq. 10 exactly.
Where the denominator is 0 (``g = 0``), $\alpha = 0$.

* :func:`gradcam_plus_plus_weights` and :func:`gradcam_plus_plus` work on any
  leading dimensions (``(..., C, H, W)``), so DAN's ``K`` heads are computed
  together, each head from its own channels.
* :class:`OutputRecorder` keeps a module's forward output (the first tensor of a
  tuple output), to differentiate a score with respect to it.

Written here because pytorch-grad-cam imports torchvision, which does not import
beside this project's CPU build of torch.

For DAN, :func:`explain_heads` runs a batch of faces through a
:class:`~dan_recipe.model.DAN` once and returns, per face and head:

* ``attention``: the head's own spatial attention map (the unnormalised map that
  scales the feature map; ``(B, K, h, w)`` at the feature-map resolution);
* ``gradcam``: Grad-CAM++ for the target class, with each head's spatially attended
  features ``x * map_k`` as the target layer (what the authors' ``run_grad_cam.py``
  computes on ``cat_head{i}.sa``), ``(B, K, h, w)``.

The attended features are read by a forward hook on ``model.head.attention.spatial``,
the unit whose output (with ``return_attention=True``, the pair ``(attended, maps)``)
holds every head; one backward pass gives every head's gradient, since each head's
features reach the score through their own channels. :func:`upsample_maps` brings
maps to the crop's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import DAN

__all__ = [
    "HeadMaps",
    "OutputRecorder",
    "explain_heads",
    "gradcam_plus_plus",
    "gradcam_plus_plus_weights",
    "upsample_maps",
]


def _check_pair(activations: Tensor, gradients: Tensor) -> None:
    if activations.ndim < 3:
        raise ValueError(f"activations: expected (..., C, H, W), got shape {tuple(activations.shape)}")
    if activations.shape != gradients.shape:
        raise ValueError(
            f"gradients: expected the activations' shape {tuple(activations.shape)}, "
            f"got {tuple(gradients.shape)}"
        )


def gradcam_plus_plus_weights(activations: Tensor, gradients: Tensor) -> Tensor:
    r"""Grad-CAM++ channel weights $w_k$ (see the module docstring).

    Args:
        activations: $A$, ``(..., C, H, W)``.
        gradients: $\partial S / \partial A$, same shape.

    Returns:
        ``(..., C)``.

    Raises:
        ValueError: Shapes that differ or have fewer than 3 dimensions.
    """
    _check_pair(activations, gradients)
    g2 = gradients.square()
    g3 = g2 * gradients
    total = activations.sum(dim=(-2, -1), keepdim=True)
    denominator = 2 * g2 + total * g3
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    alpha = torch.where(denominator == 0, torch.zeros_like(g2), g2 / safe)
    return (alpha * gradients.clamp_min(0)).sum(dim=(-2, -1))


def gradcam_plus_plus(activations: Tensor, gradients: Tensor) -> Tensor:
    r"""The Grad-CAM++ map $\mathrm{ReLU}(\sum_k w_k A^k)$, unnormalised.

    Args:
        activations: ``(..., C, H, W)``.
        gradients: Same shape.

    Returns:
        ``(..., H, W)``, non-negative.

    Example:
        >>> a = torch.rand(2, 3, 4, 4)
        >>> gradcam_plus_plus(a, torch.ones_like(a)).shape
        torch.Size([2, 4, 4])
    """
    weights = gradcam_plus_plus_weights(activations, gradients)
    return torch.einsum("...c,...chw->...hw", weights, activations).clamp_min(0)


class OutputRecorder:
    """Keeps the forward output of ``module`` while the ``with`` block runs.

    ``output`` is the module's output of its latest call (the first element when the
    module returns a tuple, e.g. ``SpatialAttention(return_attention=True)``'s
    ``(attended, maps)``). The recorded tensor is the one the rest of the model
    uses, so ``torch.autograd.grad(score, recorder.output)`` is the gradient the
    target layer receives.

    Args:
        module: The target layer.

    Example:
        >>> layer = nn.Conv2d(1, 2, 3)
        >>> with OutputRecorder(layer) as rec:
        ...     _ = layer(torch.randn(1, 1, 5, 5))
        >>> rec.output.shape
        torch.Size([1, 2, 3, 3])
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._output: Tensor | None = None
        self._handle: Any = None

    @property
    def output(self) -> Tensor:
        """The recorded output.

        Raises:
            RuntimeError: The module has not run inside the block.
        """
        if self._output is None:
            raise RuntimeError(f"OutputRecorder: {type(self.module).__name__} has not run inside the block")
        return self._output

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._output = output[0] if isinstance(output, (tuple, list)) else output

    def __enter__(self) -> OutputRecorder:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------------------
# DAN's heads
# --------------------------------------------------------------------------------------


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
    with torch.enable_grad(), OutputRecorder(model.head.attention.spatial) as recorder:
        heads, maps = model.head.attention(feature_map, return_attention=True)
        logits, _ = model.head.fusion(heads)
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
