r"""DAN's head for any backbone: multi-head cross attention (MAN) + attention fusion (AFN).

Paper: "Distract Your Attention: Multi-head Cross Attention Network for Facial
Expression Recognition", Sec. 3.2-3.3, Fig. 2 (https://arxiv.org/abs/2109.07270).

The part of DAN that follows the backbone's feature map: $K$ spatial + channel
attention heads, log-softmax across heads, sum, linear classifier, BatchNorm.
Put it on any backbone that gives a feature map $(B, C, H, W)$ (a ResNet trunk,
MobileFaceNet, IR-50, a ViT's tokens reshaped to a grid) and train it with
[`DANLoss`][dan_layers.DANLoss].
"""

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import nn

from dan_layers._tracing import NotScriptable, static_flag
from dan_layers.attention import DAN_KERNEL_SIZES, MultiHeadAttentionBlock
from dan_layers.fusion import AttentionFusion

__all__ = ["DANHead", "DANHeadOutput"]


class DANHeadOutput(NamedTuple):
    """What [`DANHead`][dan_layers.DANHead] returns: ``(logits, heads)``.

    Attributes:
        logits: class scores $(B, N)$.
        heads: the scaled head features $(B, K, C)$ (log-softmax across heads for
            $K > 1$), what [`PartitionLoss`][dan_layers.PartitionLoss] takes.
    """

    logits: torch.Tensor
    heads: torch.Tensor


class DANHead(NotScriptable, nn.Module):
    r"""DAN's multi-head cross attention and attention fusion on a backbone's feature map.

    $$h = \mathrm{MAN}(x) \in \mathbb{R}^{B \times K \times C},\qquad
      \tilde h = \log\operatorname{softmax}_k(h),\qquad
      \text{logits} = \mathrm{BN}\Big(W \sum_k \tilde h_k + b\Big)$$

    Submodules ``attention`` ([`MultiHeadAttentionBlock`][dan_layers.MultiHeadAttentionBlock])
    and ``fusion`` ([`AttentionFusion`][dan_layers.AttentionFusion]);
    [`reparameterize_model`][dan_layers.reparameterize_model] folds it for deployment,
    and hooks on ``attention.spatial`` give each head's spatially attended features
    (the Grad-CAM target of the authors' script).

    Args:
        in_channels: channels $C$ of the backbone's feature map.
        num_classes: number of classes $N$.
        num_heads: attention heads $K$ (DAN: 4).
        spatial_reduction: width reduction of each head's 1x1 convolution (DAN: 2).
        channel_reduction: width reduction of each head's channel gate (DAN: 16).
        kernel_sizes: kernel sizes of the parallel spatial branches.
        validate: check inputs.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - feature_map: $(B, C, H, W)$
        - logits: $(B, N)$
        - heads: $(B, K, C)$
        - maps (``return_attention=True``): $(B, K, H, W)$

    Example:
        >>> head = DANHead(256, num_classes=7)
        >>> logits, heads = head(torch.randn(2, 256, 7, 7))
        >>> logits.shape, heads.shape
        (torch.Size([2, 7]), torch.Size([2, 4, 256]))
        >>> (logits, heads), maps = head(torch.randn(2, 256, 7, 7), return_attention=True)
        >>> maps.shape
        torch.Size([2, 4, 7, 7])
    """

    def __init__(
        self,
        in_channels: int = 512,
        num_classes: int = 7,
        *,
        num_heads: int = 4,
        spatial_reduction: int = 2,
        channel_reduction: int = 16,
        kernel_sizes: Sequence[tuple[int, int]] = DAN_KERNEL_SIZES,
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk: dict[str, Any] = {"validate": validate, "device": device, "dtype": dtype}
        self.attention = MultiHeadAttentionBlock(
            in_channels,
            num_heads,
            spatial_reduction=spatial_reduction,
            channel_reduction=channel_reduction,
            kernel_sizes=kernel_sizes,
            **fk,
        )
        self.fusion = AttentionFusion(in_channels, num_classes, **fk)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_heads = num_heads

    @overload
    def forward(self, feature_map: torch.Tensor, return_attention: Literal[False] = ...) -> DANHeadOutput: ...

    @overload
    def forward(
        self, feature_map: torch.Tensor, return_attention: Literal[True]
    ) -> tuple[DANHeadOutput, torch.Tensor]: ...

    def forward(
        self, feature_map: torch.Tensor, return_attention: bool = False
    ) -> DANHeadOutput | tuple[DANHeadOutput, torch.Tensor]:
        """``(logits, heads)``; with ``return_attention=True``, ``((logits, heads), maps)``."""
        if static_flag("return_attention", return_attention):
            raw, maps = self.attention(feature_map, return_attention=True)
            return DANHeadOutput(*self.fusion(raw)), maps
        return DANHeadOutput(*self.fusion(self.attention(feature_map)))

    def extra_repr(self) -> str:  # noqa: D102
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, num_heads={self.num_heads}"
