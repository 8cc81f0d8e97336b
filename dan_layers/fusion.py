r"""DAN's attention fusion network (AFN): scale the heads, fuse them, classify.

Paper: "Distract Your Attention: Multi-head Cross Attention Network for Facial
Expression Recognition", Sec. 3.3, Eq. 5, Fig. 2 (https://arxiv.org/abs/2109.07270).
"""

import torch
from torch import nn

from dan_layers import functional as DF
from dan_layers._tracing import NotScriptable, call_as, is_proxy
from dan_layers._validation import (
    check_batchnorm_batch,
    check_ndim,
    check_positive,
    check_same_device,
    check_size,
)

__all__ = ["AttentionFusion"]


class AttentionFusion(NotScriptable, nn.Module):
    r"""Attention fusion of DAN: log-softmax across heads, sum, linear classifier, BatchNorm.

    $$\tilde h = \log\operatorname{softmax}_k(h),\qquad
      \text{logits} = \mathrm{BN}\Big(W \sum_{k=1}^{K} \tilde h_k + b\Big)$$

    The log-softmax ("feature scaling", Eq. 5) is applied only when $K > 1$, as in
    the authors' forward. The scaled heads are returned as well: they are what
    [`PartitionLoss`][dan_layers.PartitionLoss] takes. Submodules ``fc`` and ``bn`` carry the
    authors' key names; both keep PyTorch's default initialisation, as theirs.

    Note:
        The final BatchNorm1d cannot normalise a batch of one in train mode; such
        input raises a ``ValueError`` (call ``.eval()`` for single samples).

    Args:
        in_channels: feature width $C$ of every head.
        num_classes: number of classes $N$.
        validate: check inputs.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - heads: $(B, K, C)$
        - logits: $(B, N)$
        - scaled heads: $(B, K, C)$

    Example:
        >>> fusion = AttentionFusion(64, num_classes=7)
        >>> logits, scaled = fusion(torch.randn(2, 4, 64))
        >>> logits.shape, scaled.shape
        (torch.Size([2, 7]), torch.Size([2, 4, 64]))
    """

    def __init__(
        self,
        in_channels: int = 512,
        num_classes: int = 7,
        *,
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("num_classes", num_classes)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.validate = validate
        self.fc = nn.Linear(in_channels, num_classes, device=device, dtype=dtype)
        self.bn = nn.BatchNorm1d(num_classes, device=device, dtype=dtype)

    def forward(self, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, scaled_heads)``."""
        if self.validate and not is_proxy(heads):
            check_ndim(heads, "heads", (3,), "(B, K, C)")
            check_size(heads, 2, self.in_channels, "heads", "in_channels")
            check_same_device(heads=heads, weights=self.fc.weight)
            check_batchnorm_batch(heads.shape[0], self.training, "AttentionFusion (BatchNorm1d)")
        scaled = call_as(self, "scaled", DF.scale_heads, heads)
        logits = self.bn(self.fc(scaled.sum(dim=1)))
        return logits, scaled

    def extra_repr(self) -> str:  # noqa: D102
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}"
