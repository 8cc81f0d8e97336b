r"""The losses of DAN: affinity (FCN, Eq. 2), its center-loss baseline, and partition (AFN, Eq. 6).

Paper: "Distract Your Attention: Multi-head Cross Attention Network for Facial
Expression Recognition" (https://arxiv.org/abs/2109.07270).

The modules store hyperparameters (and, for the centre losses, the centres) and
call ``dan_layers.functional``. ``AffinityLoss.centers`` and
``CenterLoss.centers`` are learnable parameters: pass them to the optimizer and
move the loss to the model's device.
"""

import contextlib
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dan_layers import functional as DF
from dan_layers._tracing import NotScriptable, is_proxy
from dan_layers._validation import (
    PARTITION_VARIANTS,
    REDUCTIONS,
    check_choice,
    check_labels,
    check_ndim,
    check_positive,
    check_size,
)
from dan_layers.functional import PARTITION_EPS, PartitionVariant, Reduction

__all__ = ["AffinityLoss", "CenterLoss", "DANLoss", "DANLossOutput", "PartitionLoss"]


def _autocast_off(logits: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast switched off on the device of ``logits``.

    While torch.fx traces (``logits`` is a ``Proxy``, with no device) there is no
    context to record: none of the losses' operations is one that autocast runs in
    lower precision, and every term is computed from float32 (or wider) inputs, so
    the traced graph computes the same values under autocast as without it.
    """
    if is_proxy(logits):
        return contextlib.nullcontext()
    return torch.autocast(device_type=logits.device.type, enabled=False)


class _CenterLossBase(NotScriptable, nn.Module):
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


class PartitionLoss(NotScriptable, nn.Module):
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
          $(B, K, C)$ or a ViT's $(B, K, T, D)$; $(B, K)$ is $K$ scalar heads,
          the same as $(B, K, 1)$
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


class DANLossOutput(NamedTuple):
    """What [`DANLoss`][dan_layers.DANLoss] returns.

    Attributes:
        loss: the total, to backpropagate.
        ce: the cross-entropy term (detached, for logging).
        affinity: the affinity (or center) term before its weight (detached; 0 if off).
        partition: the partition term before its weight (detached; 0 if off).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    affinity: torch.Tensor
    partition: torch.Tensor


AffinityChoice = Literal["affinity", "center", "none"]
PartitionChoice = Literal["paper", "official", "none"]


class DANLoss(NotScriptable, nn.Module):
    r"""DAN's training objective: cross-entropy + affinity loss + partition loss.

    $$\mathcal{L} = \mathrm{CE}(\text{logits}, y)
      + \lambda_{af}\,\mathcal{L}_{af}(\text{feature map}, y)
      + \lambda_{pt}\,\mathcal{L}_{pt}(\text{heads})$$

    with $\lambda_{af} = \lambda_{pt} = 1$ as the paper. Takes what a DAN forward
    gives (logits, the backbone's feature map, the scaled heads of
    [`DANHead`][dan_layers.DANHead]) and returns the total with its parts, so a
    training loop can log them. Every term is computed in float32 (or wider)
    with autocast switched off, as the authors' losses run in float32.

    ``affinity="center"`` swaps in the plain [`CenterLoss`][dan_layers.CenterLoss] and
    ``"none"`` drops the term (the paper's Table 5 ablations); ``partition`` picks
    Eq. 6 (``"paper"``), the authors' code (``"official"``) or ``"none"``, and
    ``normalize=True`` makes it scale-invariant (see
    [`PartitionLoss`][dan_layers.PartitionLoss]).

    !!! warning "The centres are parameters"
        With ``affinity="affinity"`` or ``"center"`` this module owns the class
        centres (``criterion.affinity.centers``): pass ``criterion.parameters()``
        to the optimizer with the model's, move it with the model
        (``criterion.to(device)``), and under DistributedDataParallel wrap the
        model and this loss in one module so every rank holds the same centres.

    Args:
        num_classes: number of classes $N$.
        feat_dim: channels $C$ of the feature map the affinity loss pools.
        lambda_af: weight of the affinity (or center) term.
        lambda_pt: weight of the partition term.
        affinity: ``"affinity"`` (paper), ``"center"`` or ``"none"``.
        partition: ``"paper"`` (Eq. 6), ``"official"`` (authors' code) or ``"none"``.
        normalize: scale-invariant partition loss (ours; needs a partition term).
        num_centers: centres of the affinity loss (default ``num_classes``; the
            authors' RAF-DB script uses 8 for 7 classes).
        label_smoothing: label smoothing of the cross-entropy (0: none, as the paper).
        validate: check inputs.
        device: device of the centres.
        dtype: dtype of the centres.

    Shape:
        - logits: $(B, N)$
        - feature_map: $(B, C, H, W)$ or pooled $(B, C)$
        - heads: $(B, K, C)$ (any shape [`PartitionLoss`][dan_layers.PartitionLoss] takes)
        - labels: $(B,)$, integers in $[0, N)$
        - output: four 0-dim tensors

    Example:
        >>> criterion = DANLoss(num_classes=7, feat_dim=64)
        >>> logits = torch.randn(8, 7, requires_grad=True)
        >>> out = criterion(logits, torch.randn(8, 64, 7, 7), torch.randn(8, 4, 64), torch.randint(0, 7, (8,)))
        >>> out.loss.backward()
        >>> sorted(out._fields), criterion.affinity.centers.grad.shape
        (['affinity', 'ce', 'loss', 'partition'], torch.Size([7, 64]))
    """

    affinity: AffinityLoss | CenterLoss | None
    partition: PartitionLoss | None

    def __init__(
        self,
        num_classes: int = 7,
        feat_dim: int = 512,
        *,
        lambda_af: float = 1.0,
        lambda_pt: float = 1.0,
        affinity: AffinityChoice = "affinity",
        partition: PartitionChoice = "paper",
        normalize: bool = False,
        num_centers: int | None = None,
        label_smoothing: float = 0.0,
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive("num_classes", num_classes)
        check_positive("feat_dim", feat_dim)
        check_choice("affinity", affinity, ("affinity", "center", "none"))
        check_choice("partition", partition, (*PARTITION_VARIANTS, "none"))
        if normalize and partition == "none":
            raise ValueError("normalize: expected a partition term to normalise, got partition='none'")
        if affinity == "center" and num_centers not in (None, num_classes):
            raise ValueError(
                f"num_centers: the center loss has one centre per class, expected {num_classes}, "
                f"got {num_centers}"
            )
        if affinity == "none" and num_centers is not None:
            raise ValueError(f"num_centers: expected None without an affinity term, got {num_centers}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing}")
        fk = {"validate": validate, "device": device, "dtype": dtype}
        if affinity == "affinity":
            self.affinity = AffinityLoss(num_classes, feat_dim, num_centers=num_centers, **fk)  # type: ignore[arg-type]
        elif affinity == "center":
            self.affinity = CenterLoss(num_classes, feat_dim, **fk)  # type: ignore[arg-type]
        else:
            self.affinity = None
        self.partition = (
            None if partition == "none" else PartitionLoss(partition, normalize=normalize, validate=validate)
        )
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.lambda_af = float(lambda_af)
        self.lambda_pt = float(lambda_pt)
        self.label_smoothing = float(label_smoothing)
        self.validate = validate

    def forward(
        self, logits: torch.Tensor, feature_map: torch.Tensor, heads: torch.Tensor, labels: torch.Tensor
    ) -> DANLossOutput:
        """The total loss and its parts; see the class docstring."""
        if self.validate and not is_proxy(logits):
            check_ndim(logits, "logits", (2,), "(B, N)")
            check_size(logits, 1, self.num_classes, "logits", "num_classes")
            check_labels(labels, logits.shape[0], self.num_classes)
        with _autocast_off(logits):
            ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            zero = ce.new_zeros(())
            af = zero if self.affinity is None else self.affinity(feature_map.float(), labels)
            pt = zero if self.partition is None else self.partition(heads.float())
            total = ce + self.lambda_af * af + self.lambda_pt * pt
        return DANLossOutput(total, ce.detach(), af.detach(), pt.detach())

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, lambda_af={self.lambda_af}, "
            f"lambda_pt={self.lambda_pt}, label_smoothing={self.label_smoothing}"
        )
