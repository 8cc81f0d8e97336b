r"""The losses of DAN: affinity (FCN, Eq. 2), its center-loss baseline, and partition (AFN, Eq. 6).

Paper: "Distract Your Attention: Multi-head Cross Attention Network for Facial
Expression Recognition" (https://arxiv.org/abs/2109.07270).

The modules store hyperparameters (and, for the centre losses, the centres) and
call ``dan_layers.functional``. ``AffinityLoss.centers`` and
``CenterLoss.centers`` are learnable parameters: pass them to the optimizer and
move the loss to the model's device.
"""

from __future__ import annotations

import torch
from torch import nn

from dan_layers import functional as DF
from dan_layers._validation import (
    PARTITION_VARIANTS,
    REDUCTIONS,
    check_choice,
    check_positive,
)
from dan_layers.functional import PARTITION_EPS, PartitionVariant, Reduction

__all__ = ["AffinityLoss", "CenterLoss", "PartitionLoss"]


class _CenterLossBase(nn.Module):
    """Owns ``centers`` ``(num_centers, feat_dim)``, initialised from a standard normal."""

    centers: nn.Parameter

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        num_centers: int | None,
        reduction: str,
        validate: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        check_positive("num_classes", num_classes)
        check_positive("feat_dim", feat_dim)
        num_centers = num_classes if num_centers is None else num_centers
        check_positive("num_centers", num_centers)
        if num_centers < num_classes:
            raise ValueError(
                f"num_centers: expected at least num_classes ({num_classes}), got {num_centers}"
            )
        check_choice("reduction", reduction, REDUCTIONS)
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.reduction = reduction
        self.validate = validate
        self.centers = nn.Parameter(torch.randn(num_centers, feat_dim, device=device, dtype=dtype))

    def extra_repr(self) -> str:  # noqa: D102
        n = self.centers.shape[0]
        extra = f", num_centers={n}" if n != self.num_classes else ""
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}{extra}, reduction={self.reduction!r}"


class AffinityLoss(_CenterLossBase):
    r"""Affinity loss: pull features to their class centre, push the centres apart (paper Eq. 2).

    $$\mathcal{L}_{af} = \frac{1}{B}\sum_{i=1}^{B}
      \frac{\lVert x_i - c_{y_i} \rVert_2^2}{\sigma_c^2}$$

    with $\sigma_c^2$ the per-dimension variance of the centres, summed over
    dimensions. See [`affinity_loss`][dan_layers.functional.affinity_loss] for the details
    and the departures from the authors' code. With the defaults its value and
    gradients equal the authors' implementation within 1e-5 (relative, float32).

    !!! warning "The centres are parameters"
        ``centers`` must be passed to the optimizer and moved with the model
        (``loss.to(device)``); under DistributedDataParallel keep the loss inside
        the wrapped module so every rank holds the same centres.

    Args:
        num_classes: number of classes $N$; labels lie in ``[0, N)``.
        feat_dim: feature width $C$.
        num_centers: rows of ``centers`` (default ``num_classes``). The authors'
            RAF-DB script uses 8 centres for 7 classes: the extra one enters only
            $\sigma_c^2$.
        reduction: ``"mean"`` (authors), ``"sum"`` or ``"none"``.
        unbiased: unbiased variance across centres (authors).
        eps: lower bound of $\sigma_c^2$, keeps collapsed centres finite.
        validate: check inputs (shapes, devices, label range); ``False`` skips the
            checks and the host sync they cost on CUDA.
        device: device of the centres.
        dtype: dtype of the centres.

    Shape:
        - features: $(B, C)$ or $(B, C, H, W)$ (average-pooled)
        - labels: $(B,)$, integers
        - output: $()$, or $(B,)$ with ``reduction="none"``

    Example:
        >>> criterion = AffinityLoss(num_classes=7, feat_dim=512)
        >>> features = torch.randn(8, 512, 7, 7, requires_grad=True)
        >>> labels = torch.randint(0, 7, (8,))
        >>> loss = criterion(features, labels)
        >>> loss.backward()
        >>> criterion.centers.grad.shape
        torch.Size([7, 512])
    """

    def __init__(
        self,
        num_classes: int = 7,
        feat_dim: int = 512,
        *,
        num_centers: int | None = None,
        reduction: Reduction = "mean",
        unbiased: bool = True,
        eps: float = 1e-12,
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_classes, feat_dim, num_centers, reduction, validate, device, dtype)
        if self.centers.shape[0] < 2:
            raise ValueError(
                "num_centers: expected at least 2 (the centres' variance is the denominator), "
                f"got {self.centers.shape[0]}"
            )
        self.unbiased = unbiased
        self.eps = eps

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Compute the loss; see the class docstring."""
        return DF.affinity_loss(
            features,
            labels,
            self.centers,
            reduction=self.reduction,  # type: ignore[arg-type]
            unbiased=self.unbiased,
            eps=self.eps,
            num_classes=self.num_classes,
            validate=self.validate,
        )


class CenterLoss(_CenterLossBase):
    r"""Center loss (Wen et al. 2016), the paper's ablation baseline for the affinity loss.

    $$\mathcal{L}_{C} = \frac{1}{B}\sum_{i=1}^{B} \lVert x_i - c_{y_i} \rVert_2^2$$

    The affinity loss without its division by the centres' variance; nothing
    pushes the centres apart.

    !!! warning "The centres are parameters"
        ``centers`` must be passed to the optimizer and moved with the model.

    Args:
        num_classes: number of classes $N$.
        feat_dim: feature width $C$.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        validate: check inputs; ``False`` skips the checks.
        device: device of the centres.
        dtype: dtype of the centres.

    Shape:
        - features: $(B, C)$ or $(B, C, H, W)$ (average-pooled)
        - labels: $(B,)$, integers
        - output: $()$, or $(B,)$ with ``reduction="none"``

    Example:
        >>> criterion = CenterLoss(num_classes=3, feat_dim=16)
        >>> criterion(torch.randn(4, 16), torch.tensor([0, 1, 2, 1])).shape
        torch.Size([])
    """

    def __init__(
        self,
        num_classes: int = 7,
        feat_dim: int = 512,
        *,
        reduction: Reduction = "mean",
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_classes, feat_dim, None, reduction, validate, device, dtype)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Compute the loss; see the class docstring."""
        return DF.center_loss(
            features,
            labels,
            self.centers,
            reduction=self.reduction,  # type: ignore[arg-type]
            validate=self.validate,
        )


class PartitionLoss(nn.Module):
    r"""Partition loss: make attention heads attend to different things (paper Eq. 6).

    ``variant="paper"`` (default) is Eq. 6, a mean of logarithms over samples and
    features:

    $$\mathcal{L}_{pt} = \frac{1}{BL}\sum_{i,l}\log\left(1 + \frac{K}{\sigma^2_{il} + \epsilon}\right)$$

    ``variant="official"`` is the authors' code, the logarithm of the mean variance:

    $$\mathcal{L}_{pt} = \log\left(1 + \frac{K}{\bar\sigma^2 + \epsilon}\right)$$

    $\sigma^2_{il}$ is the variance across the $K$ heads. It is a batch statistic,
    so there is no ``reduction``. One head gives a graph-connected zero.
    See [`partition_loss`][dan_layers.functional.partition_loss].

    !!! warning "Scaling the heads up lowers the loss"
        Both forms fall as the heads grow: multiplying random heads by 100 takes
        Eq. 6 from 1.97 to 0.0011 with the heads exactly as alike as before, and
        DAN's log-softmax across heads does not stop it. ``normalize=True`` (ours,
        not the paper's) scales each head to unit RMS over its features first,
        which makes the loss invariant to any positive scaling of its input.

    Args:
        variant: ``"paper"`` or ``"official"``.
        normalize: scale each head of each sample to unit RMS first (scale-invariant).
        unbiased: unbiased variance across heads (authors).
        eps: added to the variance (float64 machine epsilon, as the authors).
        validate: check the input's shape.

    Shape:
        - heads: $(B, K, *)$, heads on dim 1, the rest flattened; e.g. DAN's
          $(B, K, C)$ or a ViT's $(B, K, T, D)$
        - output: $()$

    Example:
        >>> criterion = PartitionLoss()
        >>> heads = torch.randn(8, 4, 512, requires_grad=True)
        >>> criterion(heads).backward()
        >>> heads.grad.shape
        torch.Size([8, 4, 512])
    """

    def __init__(
        self,
        variant: PartitionVariant = "paper",
        *,
        normalize: bool = False,
        unbiased: bool = True,
        eps: float = PARTITION_EPS,
        validate: bool = True,
    ) -> None:
        super().__init__()
        check_choice("variant", variant, PARTITION_VARIANTS)
        self.variant = variant
        self.normalize = normalize
        self.unbiased = unbiased
        self.eps = eps
        self.validate = validate

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        """Compute the loss; see the class docstring."""
        return DF.partition_loss(
            heads,
            variant=self.variant,  # type: ignore[arg-type]
            normalize=self.normalize,
            unbiased=self.unbiased,
            eps=self.eps,
            validate=self.validate,
        )

    def extra_repr(self) -> str:  # noqa: D102
        norm = ", normalize=True" if self.normalize else ""
        return f"variant={self.variant!r}{norm}, unbiased={self.unbiased}"
