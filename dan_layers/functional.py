r"""Parameter-free maths of the Distract-your-Attention Network.

Paper: Wen, Lin, Wang, Xu, "Distract Your Attention: Multi-head Cross Attention
Network for Facial Expression Recognition", Biomimetics 2023
(https://arxiv.org/abs/2109.07270). Authors' code: github.com/yaoing/DAN (MIT).

Axis legend used throughout: ``b`` batch, ``c`` channels, ``h w`` spatial size,
``k`` heads, ``n`` classes, ``l`` flattened per-head features.

Every function here is stateless; the modules in ``dan_layers`` own the
parameters (class centres, convolution weights) and call these functions.
The losses compute in at least float32, whatever the input dtype (bf16 and fp16
inputs under autocast are promoted), and never synchronise with the host when
``validate=False``. Under ``torch.fx.symbolic_trace`` each function is one
``call_function`` node (named after it) that runs the function itself, checks
included, when the graph runs.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from dan_layers._tracing import fx_leaf
from dan_layers._validation import (
    PARTITION_VARIANTS,
    REDUCTIONS,
    check_choice,
    check_floating,
    check_labels,
    check_ndim,
    check_same_device,
    check_size,
)

__all__ = [
    "affinity_loss",
    "attention_pool",
    "center_loss",
    "fuse_conv_bn",
    "head_overlap",
    "pad_kernel",
    "partition_loss",
    "pool_features",
    "scale_heads",
]

Reduction = Literal["mean", "sum", "none"]
PartitionVariant = Literal["paper", "official"]

#: Default ``eps`` of ``partition_loss``: float64 machine epsilon, as the authors' code.
PARTITION_EPS: float = sys.float_info.epsilon


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the losses compute in: the inputs' promoted dtype, at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    # mean: sum / B, with B >= 1 so that an empty batch gives a graph-connected zero
    return total / max(per_sample.shape[0], 1)


@fx_leaf
def pool_features(features: torch.Tensor) -> torch.Tensor:
    r"""Global-average-pool a feature map to one vector per sample.

    $$\bar x_{b,c} = \frac{1}{HW}\sum_{h,w} x_{b,c,h,w}$$

    Args:
        features: a feature map, or vectors that are returned unchanged.

    Returns:
        The pooled features.

    Shape:
        - features: $(B, C, H, W)$ or $(B, C)$
        - output: $(B, C)$

    Example:
        >>> pool_features(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 3])
    """
    check_ndim(features, "features", (2, 4), "(B, C) or (B, C, H, W)")
    return features.mean(dim=(2, 3)) if features.ndim == 4 else features


def _check_center_inputs(features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> None:
    check_ndim(labels, "labels", (1,), "(B,)")
    check_ndim(centers, "centers", (2,), "(N, C)")
    check_floating(features, "features")
    check_size(features, 1, centers.shape[1], "features", "feature width C (centers.shape[1])")
    check_same_device(features=features, labels=labels, centers=centers)


def _squared_distance_to_own_center(
    features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(|x_i - c_{y_i}|^2 per sample, centers in the compute dtype)``."""
    dtype = _compute_dtype(features, centers)
    x = features.to(dtype)
    c = centers.to(dtype)
    own = c.index_select(0, labels.long())  # (b, c): gathered, exact, O(B*C)
    return (x - own).pow(2).sum(dim=1), c


@fx_leaf
def center_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    validate: bool = True,
) -> torch.Tensor:
    r"""Center loss (Wen et al., ECCV 2016): squared distance of each feature to its class centre.

    The baseline of the paper's ablation (Table 5). With ``reduction="mean"``:

    $$\mathcal{L}_{C} = \frac{1}{B}\sum_{i=1}^{B} \lVert x_i - c_{y_i} \rVert_2^2$$

    (no factor 1/2, like the affinity loss it is compared with).

    Args:
        features: features, or a feature map that is average-pooled first.
        labels: integer class of each sample, in ``[0, N)``.
        centers: one centre per class.
        reduction: ``"mean"`` (sum over the batch divided by B), ``"sum"`` or ``"none"``.
        validate: check shapes, devices and label range (costs a host sync on CUDA).

    Returns:
        The loss, a 0-dim tensor, or per-sample values with ``reduction="none"``.

    Shape:
        - features: $(B, C)$ or $(B, C, H, W)$
        - labels: $(B,)$
        - centers: $(N, C)$
        - output: $()$, or $(B,)$ with ``reduction="none"``

    Example:
        >>> centers = torch.zeros(3, 2)
        >>> center_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([1]), centers)
        tensor(25.)
    """
    check_choice("reduction", reduction, REDUCTIONS)  # free: checked even with validate=False
    features = pool_features(features)
    if validate:
        _check_center_inputs(features, labels, centers)
        check_labels(labels, features.shape[0], centers.shape[0])
    sq_dist, _ = _squared_distance_to_own_center(features, labels, centers)
    return _reduce(sq_dist, reduction)


@fx_leaf
def affinity_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    unbiased: bool = True,
    eps: float = 1e-12,
    num_classes: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    r"""Affinity loss of DAN's feature clustering network (paper Eq. 2).

    Pulls each feature to its class centre and, through the denominator, pushes
    the centres apart. With ``reduction="mean"``:

    $$\mathcal{L}_{af} = \frac{1}{B}\sum_{i=1}^{B}
      \frac{\lVert x_i - c_{y_i} \rVert_2^2}{\sigma_c^2},\qquad
      \sigma_c^2 = \sum_{d=1}^{C} \operatorname{Var}_{j}\,(c_{j,d})$$

    where $\sigma_c^2$ is the per-dimension variance of the centres across
    classes (unbiased by default, as the authors), summed over dimensions.

    Departures from the authors' code (values agree within 1e-5 relative): each
    sample's own centre is gathered (exact, $O(BC)$) instead of expanding the full
    $B \times N$ distance matrix as $|x|^2 + |c|^2 - 2x\cdot c$; their clamp of
    every matrix entry to $[10^{-12}, 10^{12}]$ is not copied (it adds $10^{-12}$
    per non-matching class); $\sigma_c^2$ is clamped below at ``eps`` so that
    collapsed centres give finite values.

    Args:
        features: features, or a feature map that is average-pooled first.
        labels: integer class of each sample.
        centers: the class centres; all rows enter $\sigma_c^2$, also rows that
            no label uses (the authors' RAF-DB script has 8 centres for 7 classes).
        reduction: ``"mean"`` (sum over the batch divided by B, as the authors),
            ``"sum"`` or ``"none"``.
        unbiased: unbiased (N - 1) variance across centres, as the authors.
        eps: lower bound of $\sigma_c^2$.
        num_classes: labels must lie in ``[0, num_classes)``; defaults to the
            number of centres.
        validate: check shapes, devices and label range (costs a host sync on CUDA).

    Returns:
        The loss, a 0-dim tensor, or per-sample values with ``reduction="none"``.

    Shape:
        - features: $(B, C)$ or $(B, C, H, W)$
        - labels: $(B,)$
        - centers: $(N, C)$, $N \ge 2$
        - output: $()$, or $(B,)$ with ``reduction="none"``

    Example:
        >>> centers = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # sigma^2 = 2
        >>> affinity_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), centers)
        tensor(0.5000)
    """
    check_choice("reduction", reduction, REDUCTIONS)  # free: checked even with validate=False
    features = pool_features(features)
    if validate:
        _check_center_inputs(features, labels, centers)
        if centers.shape[0] < 2:
            raise ValueError(
                "centers: expected at least 2 centres (their variance is the loss's "
                f"denominator), got {centers.shape[0]}"
            )
        n = centers.shape[0] if num_classes is None else num_classes
        if n > centers.shape[0]:
            raise ValueError(
                f"num_classes: expected at most the number of centres ({centers.shape[0]}), got {n}"
            )
        check_labels(labels, features.shape[0], n)
    sq_dist, c = _squared_distance_to_own_center(features, labels, centers)
    spread = c.var(dim=0, correction=int(unbiased)).sum().clamp_min(eps)
    return _reduce(sq_dist / spread, reduction)


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    """Scale every ``x[b, k, :]`` to unit root-mean-square; all-zero vectors stay zero."""
    mean_square = x.pow(2).mean(dim=-1, keepdim=True)
    return x * torch.rsqrt(mean_square.clamp_min(torch.finfo(x.dtype).tiny))


@fx_leaf
def partition_loss(
    heads: torch.Tensor,
    *,
    variant: PartitionVariant = "paper",
    normalize: bool = False,
    unbiased: bool = True,
    eps: float = PARTITION_EPS,
    validate: bool = True,
) -> torch.Tensor:
    r"""Partition loss of DAN's attention fusion network (paper Eq. 6).

    Large when the $K$ heads attend to the same thing (small variance across
    heads), small when they spread out. Let $\sigma^2_{il}$ be the variance
    across heads of feature $l$ of sample $i$ ($L$ features per head).

    ``variant="paper"`` (default), Eq. 6, a mean of logarithms:

    $$\mathcal{L}_{pt} = \frac{1}{BL}\sum_{i=1}^{B}\sum_{l=1}^{L}
      \log\left(1 + \frac{K}{\sigma^2_{il} + \epsilon}\right)$$

    ``variant="official"``, the authors' code, a logarithm of the mean variance:

    $$\mathcal{L}_{pt} = \log\left(1 + \frac{K}{\bar\sigma^2 + \epsilon}\right),
      \qquad \bar\sigma^2 = \frac{1}{BL}\sum_{i,l}\sigma^2_{il}$$

    The two are different functions (by Jensen's inequality the paper form is
    never smaller). With one head there is no variance: the result is an exact
    zero that stays connected to the graph, whatever the input holds (the
    authors return the Python int 0).

    Both forms fall when the heads are merely scaled up: $\sigma^2$ grows with
    the square of the scale, so multiplying random heads by 100 takes Eq. 6
    from 1.97 to 0.0011 while the heads are exactly as alike as before. DAN's
    log-softmax across heads does not prevent it: it subtracts the same number
    from every head at a feature, leaving $\sigma^2_{il}$ unchanged.
    ``normalize=True`` (ours, not the paper's) first scales every head of every
    sample to unit root-mean-square over its features,

    $$\hat h_{ikl} = \frac{h_{ikl}}{\sqrt{\tfrac{1}{L}\sum_{l'} h_{ikl'}^2}},$$

    and computes the chosen form on $\hat h$. The loss is then unchanged by any
    positive scaling of the input (of all heads together or of any one head),
    so it can only fall by making the heads' feature profiles differ; heads
    that differ only in scale count as identical. On unit-RMS heads the mean
    variance lies in $[0, K/(K-1)]$ (unbiased), so the loss is bounded below by
    $\log(1 + K - 1) = \log K$ for the official form.

    Args:
        heads: head features, heads on dim 1; trailing dims are flattened into $L$,
            so a ViT's per-head tokens $(B, K, T, D)$ work as they are, and $(B, K)$
            is $K$ scalar heads per sample, the same as $(B, K, 1)$.
        variant: ``"paper"`` or ``"official"`` (checked even with ``validate=False``).
        normalize: scale each head to unit RMS over its features first (scale-invariant).
        unbiased: unbiased (K - 1) variance across heads, as the authors.
        eps: added to the variance; float64 machine epsilon by default, as the
            authors. Keeps collapsed heads finite.
        validate: check the input's shape.

    Returns:
        The loss, a 0-dim tensor (a batch statistic: there is no per-sample form).

    Shape:
        - heads: $(B, K)$ or $(B, K, *)$
        - output: $()$

    Example:
        >>> heads = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])  # variance 2 everywhere
        >>> partition_loss(heads)  # log(1 + 2 / 2)
        tensor(0.6931)
        >>> partition_loss(heads, variant="official")
        tensor(0.6931)
        >>> x = torch.randn(8, 4, 64)
        >>> bool(torch.isclose(partition_loss(100 * x, normalize=True), partition_loss(x, normalize=True)))
        True
        >>> scalars = torch.randn(8, 4)  # four scalar heads per sample
        >>> bool(partition_loss(scalars) == partition_loss(scalars.unsqueeze(-1)))
        True
    """
    check_choice("variant", variant, PARTITION_VARIANTS)  # free: checked even with validate=False
    if validate:
        check_ndim(heads, "heads", range(2, 65), "(B, K) or (B, K, ...) with heads on dim 1")
        check_floating(heads, "heads")
        if heads.numel() == 0:
            raise ValueError(f"heads: expected a non-empty tensor, got shape {tuple(heads.shape)}")
    x = rearrange(heads, "b k ... -> b k (...)").to(_compute_dtype(heads))
    num_heads = x.shape[1]
    if num_heads == 1:
        return x[..., :0].sum()  # a sum over nothing: exactly 0 (not NaN for inf input), in the graph
    if normalize:
        x = _unit_rms(x)
    var = x.var(dim=1, correction=int(unbiased))  # (b, l)
    if variant == "paper":
        return torch.log1p(num_heads / (var + eps)).mean()
    return torch.log1p(num_heads / (var.mean() + eps))


@fx_leaf
def scale_heads(heads: torch.Tensor) -> torch.Tensor:
    r"""DAN's feature scaling of the heads (paper Eq. 5): log-softmax across heads.

    $$\tilde h_{b,k,c} = \log\frac{\exp h_{b,k,c}}{\sum_{k'} \exp h_{b,k',c}}$$

    Applied only when $K > 1$; a single head is returned unchanged, as the
    authors' forward does.

    Args:
        heads: stacked head outputs.

    Returns:
        The scaled heads.

    Shape:
        - heads: $(B, K, C)$
        - output: $(B, K, C)$

    Example:
        >>> scale_heads(torch.zeros(1, 2, 3)).exp().sum(dim=1)
        tensor([[1., 1., 1.]])
    """
    return F.log_softmax(heads, dim=1) if heads.shape[1] > 1 else heads


@fx_leaf
def attention_pool(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    r"""Average-pool a feature map weighted by $K$ spatial maps, without forming $K$ copies.

    $$y_{b,k,c} = \frac{1}{HW}\sum_{h,w} x_{b,c,h,w}\, m_{b,k,h,w}$$

    equal to global average pooling of ``x * maps[:, k:k+1]`` for every head $k$.

    Args:
        x: the feature map.
        maps: one spatial map per head.

    Returns:
        Pooled features per head.

    Shape:
        - x: $(B, C, H, W)$
        - maps: $(B, K, H, W)$
        - output: $(B, K, C)$

    Example:
        >>> attention_pool(torch.ones(2, 3, 4, 4), torch.full((2, 5, 4, 4), 2.0)).shape
        torch.Size([2, 5, 3])
    """
    height, width = x.shape[-2:]
    return torch.einsum("bchw,bkhw->bkc", x, maps) / (height * width)


@fx_leaf
def head_overlap(
    maps: torch.Tensor, *, reduction: Literal["mean", "none"] = "mean", validate: bool = True
) -> torch.Tensor:
    r"""How much $K$ heads' attention maps overlap: 1 for identical maps, 0 for disjoint ones.

    Each map is normalised to sum to 1 over its cells, $p_{bk} = m_{bk} / \sum_{hw} m_{bk}$;
    two heads overlap by the attention mass they put on the same cells,
    $\sum_{hw} \min(p_{bk}, p_{bj})$ (one minus their total-variation distance);
    the result is the mean over the $K(K-1)/2$ head pairs and the samples:

    $$O = \frac{2}{B K (K-1)} \sum_{b=1}^{B} \sum_{k<j} \sum_{h,w} \min\big(p_{bkhw}, p_{bjhw}\big)$$

    It lies in $[0, 1]$ and is unchanged by scaling any map (DAN's maps are
    unnormalised) and by permuting the heads. A map that is zero everywhere
    (a head that attends nowhere) overlaps nothing. Heads that all attend
    evenly everywhere overlap fully, as they do not divide the face.

    Args:
        maps: non-negative attention maps, one per head, such as DAN's spatial maps.
        reduction: ``"mean"`` over samples, or ``"none"`` for one value per sample.
        validate: check the shape, at least two heads and non-negative values
            (the last reads the values: a host sync on CUDA).

    Returns:
        The overlap, a 0-dim tensor, or $(B,)$ with ``reduction="none"``.

    Shape:
        - maps: $(B, K, H, W)$, $K \ge 2$ (any trailing dims are flattened into the cells)
        - output: $()$, or $(B,)$ with ``reduction="none"``

    Example:
        >>> left = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> maps = torch.stack([left, left.flip(-1), 3 * left])[None]   # (1, 3, 2, 2)
        >>> head_overlap(maps)  # pairs: disjoint 0, scaled copy 1, disjoint 0
        tensor(0.3333)
    """
    check_choice("reduction", reduction, ("mean", "none"))
    if validate:
        check_ndim(maps, "maps", range(3, 65), "(B, K, H, W) with heads on dim 1")
        check_floating(maps, "maps")
        if maps.shape[1] < 2:
            raise ValueError(f"maps: expected at least 2 heads to compare, got {maps.shape[1]}")
        if maps.numel() == 0:
            raise ValueError(f"maps: expected a non-empty tensor, got shape {tuple(maps.shape)}")
        if bool((maps < 0).any()):
            raise ValueError("maps: expected non-negative attention maps, got negative values")
    p = rearrange(maps, "b k ... -> b k (...)").to(_compute_dtype(maps))
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    num_heads = p.shape[1]
    shared = torch.minimum(p.unsqueeze(2), p.unsqueeze(1)).sum(dim=-1)  # (b, k, k)
    pairs = torch.triu_indices(num_heads, num_heads, offset=1, device=p.device)
    per_sample = shared[:, pairs[0], pairs[1]].mean(dim=-1)
    return per_sample if reduction == "none" else per_sample.mean()


@fx_leaf
def fuse_conv_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold an eval-mode BatchNorm into the convolution or linear layer before it.

    With $s = \gamma / \sqrt{\sigma^2 + \epsilon}$ per output channel:
    $W' = s\,W$ and $b' = s\,(b - \mu) + \beta$.

    Args:
        weight: conv or linear weight, output channels on dim 0.
        bias: its bias, or ``None``.
        running_mean: BatchNorm running mean $\mu$.
        running_var: BatchNorm running variance $\sigma^2$.
        bn_weight: BatchNorm scale $\gamma$ (``None`` for an affine-free BatchNorm).
        bn_bias: BatchNorm shift $\beta$ (``None`` for an affine-free BatchNorm).
        eps: BatchNorm epsilon.

    Returns:
        ``(weight, bias)`` of the fused layer.

    Shape:
        - weight: $(C_{out}, *)$
        - bias, running_mean, running_var, bn_weight, bn_bias: $(C_{out},)$

    Example:
        >>> w, b = fuse_conv_bn(torch.ones(2, 3), None, torch.zeros(2), torch.full((2,), 4.0),
        ...                     torch.ones(2), torch.zeros(2), eps=0.0)
        >>> w
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]])
    """
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -running_mean if bias is None else bias - running_mean
    fused_bias = shift * scale
    if bn_bias is not None:
        fused_bias = fused_bias + bn_bias
    fused_weight = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return fused_weight, fused_bias


@fx_leaf
def pad_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    r"""Zero-pad a convolution kernel, centred, to a larger odd size.

    A $1\times3$ kernel padded to $3\times3$ computes the same convolution with
    "same" padding, which lets parallel branches merge into one kernel.

    Args:
        weight: convolution weight.
        size: target ``(kh, kw)``; each at least the kernel's and of the same parity.

    Returns:
        The padded weight.

    Shape:
        - weight: $(C_{out}, C_{in}, k_h, k_w)$
        - output: $(C_{out}, C_{in}, size_0, size_1)$

    Example:
        >>> pad_kernel(torch.ones(1, 1, 1, 3), (3, 3))[0, 0]
        tensor([[0., 0., 0.],
                [1., 1., 1.],
                [0., 0., 0.]])
    """
    dh = size[0] - weight.shape[-2]
    dw = size[1] - weight.shape[-1]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(
            f"size: expected at least the kernel size {tuple(weight.shape[-2:])} and an even "
            f"difference on each side, got {tuple(size)}"
        )
    return F.pad(weight, (dw // 2, dw // 2, dh // 2, dh // 2))
