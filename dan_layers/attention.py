r"""DAN's multi-head cross attention network (MAN): spatial and channel attention heads.

Paper: "Distract Your Attention: Multi-head Cross Attention Network for Facial
Expression Recognition", Sec. 3.2, Eq. 3-4, Fig. 4 (https://arxiv.org/abs/2109.07270).

Every module here takes ``num_heads`` and holds all heads in one set of tensors:
the first 1x1 convolution is one wide convolution, the 3x3 / 1x3 / 3x1 branches
are grouped convolutions (one group per head), and the channel attention's
linear layers are batched per head. On CUDA the grouped convolutions run as
they are (few kernel launches); on CPU each head's convolutions run as dense
convolutions on chunks of the same weights (channels-last when training on
large batches), because oneDNN runs those faster (same results). Parameters
are stacked head after head along the output dimension, so that with
``num_heads=1`` the state-dict keys and shapes are exactly those of the
authors' per-head modules (``conv1x1.0``, ``conv_3x3.1``, ``attention.3`` ...).

Departures from the paper, as in the authors' code: the spatial map is not
passed through a sigmoid (it is an unnormalised sum over channels of a ReLU
output), and the convolutions have biases.

Axis legend: ``b`` batch, ``k`` heads, ``c`` channels, ``r`` reduced channels,
``h w`` spatial size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.modules import module as torch_module
from typing_extensions import Self

from dan_layers import functional as DF
from dan_layers._validation import (
    check_batchnorm_batch,
    check_ndim,
    check_positive,
    check_same_device,
    check_size,
)

__all__ = ["DAN_KERNEL_SIZES", "ChannelAttention", "MultiHeadAttentionBlock", "SpatialAttention"]

#: The kernel sizes of DAN's parallel spatial-attention branches.
DAN_KERNEL_SIZES: tuple[tuple[int, int], ...] = ((3, 3), (1, 3), (3, 1))

_FUSED_BRANCH = "conv_fused"

#: Batch x height x width from which the CPU training path goes channels-last. Measured
#: with 512 channels, K = 4, on a Zen 4 core: channels-last trained the heads 4-14% slower
#: than NCHW at 256-1024 pixels (4x4 maps, batch 16-64; 7x7, batch 8-16) and 4-7% faster
#: from 1568 (7x7, batch 32) up, where the per-pixel gains outweigh the per-call weight
#: conversion.
_CHANNELS_LAST_MIN_PIXELS = 1200


def _reduced_width(in_channels: int, reduction: int, name: str) -> int:
    check_positive("in_channels", in_channels)
    check_positive(name, reduction)
    width = in_channels // reduction
    if width < 1:
        raise ValueError(
            f"{name}: expected at most in_channels ({in_channels}) so that the reduced width "
            f"is at least 1, got {reduction}"
        )
    return width


def _folded(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``layer`` (conv or linear) with the eval-mode BatchNorm ``bn`` folded in."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm layer to fold, got {type(bn).__name__}")
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("expected a BatchNorm with running statistics, got track_running_stats=False")
    return DF.fuse_conv_bn(
        cast(torch.Tensor, layer.weight),
        cast("torch.Tensor | None", layer.bias),
        mean,
        var,
        bn.weight,
        bn.bias,
        bn.eps,
    )


def _fold_in_place(layer: nn.Module, bn: nn.Module) -> None:
    """Overwrite ``layer``'s weight and bias with the folded ones (the layer has a bias)."""
    weight, bias = _folded(layer, bn)
    cast(torch.Tensor, layer.weight).copy_(weight)
    cast(torch.Tensor, layer.bias).copy_(bias)


def _batchnorm_update_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count a training batch and return the running-average factor, as BatchNorm's forward."""
    if not (bn.training and bn.track_running_stats and bn.num_batches_tracked is not None):
        return 0.0
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward or backward hook (global, or on any of ``modules`` and their children) is set."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    if torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks:
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for module in modules
        for m in module.modules()
    )


def _per_head_conv_bn(module: nn.Module, *, num_heads: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``(i, x) -> BN_i(conv_i(x))``: head ``i`` of a grouped convolution (+ BatchNorm) holding all heads.

    ``module`` is a ``Conv2d``, or a ``Sequential`` of a ``Conv2d`` and a
    ``BatchNorm2d`` (or ``Identity`` once folded). The weights and buffers are
    chunked once per tensor (slicing each head apart would make every slice's
    backward materialise a full-size zero tensor); running statistics are updated
    in place through the chunks, and the batch counter counts this forward once,
    as BatchNorm's own forward does.
    """
    conv, norm = (module[0], module[1]) if isinstance(module, nn.Sequential) else (module, None)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected a Conv2d, got {type(conv).__name__}")

    def chunks(t: torch.Tensor | None) -> Sequence[torch.Tensor | None]:
        return [None] * num_heads if t is None else t.chunk(num_heads)

    weight, bias = conv.weight.chunk(num_heads), chunks(conv.bias)
    padding: Any = conv.padding  # a tuple here; F.conv2d's stub does not list the string form

    def head_conv(i: int, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight[i], bias[i], conv.stride, padding, conv.dilation)

    if not isinstance(norm, nn.BatchNorm2d):
        return head_conv
    bn = norm
    gamma, beta = chunks(bn.weight), chunks(bn.bias)
    mean, var = chunks(bn.running_mean), chunks(bn.running_var)
    use_batch_stats = bn.training or bn.running_mean is None
    factor = _batchnorm_update_factor(bn)

    def head(i: int, x: torch.Tensor) -> torch.Tensor:
        out = head_conv(i, x)
        return F.batch_norm(out, mean[i], var[i], gamma[i], beta[i], use_batch_stats, factor, bn.eps)

    return head


def _require_eval(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(
            f"{type(module).__name__}.reparameterize() folds BatchNorm running statistics and "
            "is only valid in eval mode: call .eval() first"
        )


class _HeadwiseLinear(nn.Module):
    """``num_heads`` independent linear layers applied to ``(B, K, in)``.

    ``weight`` is ``(K * out, in)`` and ``bias`` ``(K * out,)``, head after head, so
    that with one head the layout is that of ``torch.nn.Linear``.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        out_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_features = in_features
        self.out_features = out_features
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_heads * out_features, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(num_heads * out_features, **fk))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_heads == 1:
            return F.linear(x, self.weight, self.bias)
        weight = rearrange(self.weight, "(k o) i -> k o i", k=self.num_heads)
        bias = rearrange(self.bias, "(k o) -> k o", k=self.num_heads)
        return torch.einsum("bki,koi->bko", x, weight) + bias

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_heads={self.num_heads}, in_features={self.in_features}, out_features={self.out_features}"


class SpatialAttention(nn.Module):
    r"""Spatial attention unit of DAN (paper Eq. 3, Fig. 4 left), for one or several heads.

    A 1x1 convolution $C \to C/r$ with BatchNorm, then parallel convolutions
    $C/r \to C$ (3x3, 1x3 and 3x1 by default, "same" padding) each with
    BatchNorm; their sum goes through a ReLU and is summed over channels into one
    map per head. The output is the input scaled by that map:

    $$a = \sum_{c} \mathrm{ReLU}\Big(\sum_{j} \mathrm{BN}_j\big(W_j * \mathrm{BN}_0(W_0 * x)\big)\Big)_c,
      \qquad y = x \odot a$$

    As in the authors' code there is no sigmoid: the map is unnormalised.
    Initialisation as the authors: Kaiming normal (fan out, per head) for the
    convolutions, zero biases, BatchNorm weight 1 and bias 0.

    Args:
        in_channels: channels $C$ of the input feature map.
        num_heads: heads $K$, held together as grouped convolutions.
        reduction: width reduction $r$ of the 1x1 convolution (DAN: 2).
        kernel_sizes: kernel sizes of the parallel branches, odd numbers.
        validate: check inputs.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - x: $(B, C, H, W)$
        - output: $(B, C, H, W)$ for one head, $(B, K, C, H, W)$ for several
        - attention map (``return_attention=True``): $(B, K, H, W)$

    Example:
        >>> sa = SpatialAttention(64)
        >>> out, amap = sa(torch.randn(2, 64, 7, 7), return_attention=True)
        >>> out.shape, amap.shape
        (torch.Size([2, 64, 7, 7]), torch.Size([2, 1, 7, 7]))
    """

    def __init__(
        self,
        in_channels: int = 512,
        *,
        num_heads: int = 1,
        reduction: int = 2,
        kernel_sizes: Sequence[tuple[int, int]] = DAN_KERNEL_SIZES,
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden = _reduced_width(in_channels, reduction, "reduction")
        check_positive("num_heads", num_heads)
        kernel_sizes = tuple((int(kh), int(kw)) for kh, kw in kernel_sizes)
        if not kernel_sizes:
            raise ValueError("kernel_sizes: expected at least one kernel size, got none")
        if any(k < 1 or k % 2 == 0 for size in kernel_sizes for k in size):
            raise ValueError(f"kernel_sizes: expected odd positive sizes, got {kernel_sizes}")
        if len(set(kernel_sizes)) != len(kernel_sizes):
            raise ValueError(f"kernel_sizes: expected distinct sizes, got {kernel_sizes}")
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.reduction = reduction
        self.hidden_channels = hidden
        self.kernel_sizes = kernel_sizes
        self.validate = validate
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        k = num_heads
        self.conv1x1 = nn.Sequential(
            nn.Conv2d(in_channels, k * hidden, kernel_size=1, **fk), nn.BatchNorm2d(k * hidden, **fk)
        )
        names = []
        for kh, kw in kernel_sizes:
            name = f"conv_{kh}x{kw}"
            conv = nn.Conv2d(
                k * hidden, k * in_channels, (kh, kw), padding=(kh // 2, kw // 2), groups=k, **fk
            )
            self.add_module(name, nn.Sequential(conv, nn.BatchNorm2d(k * in_channels, **fk)))
            names.append(name)
        self.branch_names: tuple[str, ...] = tuple(names)
        self.relu = nn.ReLU()
        self.reset_parameters()

    @property
    def is_reparameterized(self) -> bool:
        """Whether [`reparameterize`][dan_layers.SpatialAttention.reparameterize] has merged the branches."""
        return self.branch_names == (_FUSED_BRANCH,)

    def reset_parameters(self) -> None:
        """Re-initialise as the authors: Kaiming normal (fan out) per head, zero biases, BN 1/0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                for chunk in module.weight.data.chunk(self.num_heads, dim=0):
                    nn.init.kaiming_normal_(chunk, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        check_ndim(x, "x", (4,), "(B, C, H, W)")
        check_size(x, 1, self.in_channels, "x", "in_channels")
        check_same_device(x=x, weights=cast(torch.Tensor, self.conv1x1[0].weight))
        check_batchnorm_batch(x.shape[0], self.training, "SpatialAttention", x.shape[2] * x.shape[3])

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial attention map of every head, before it scales the input.

        Args:
            x: input feature map $(B, C, H, W)$.

        Returns:
            Maps $(B, K, H, W)$.
        """
        if self.validate:
            self._check_input(x)
        if self._runs_heads_apart(x):
            return self._per_head_maps(x)
        y = self.conv1x1(x)
        z = getattr(self, self.branch_names[0])(y)
        for name in self.branch_names[1:]:
            z = z + getattr(self, name)(y)
        z = self.relu(z)
        return rearrange(z, "b (k c) h w -> b k c h w", k=self.num_heads).sum(dim=2)

    def _runs_heads_apart(self, x: torch.Tensor) -> bool:
        """Whether ``_per_head_maps`` computes the maps rather than the grouped convolutions.

        Only on CPU, and only while no hook watches the convolution or BatchNorm
        modules: the per-head path calls the functional ops, so module hooks (FLOP
        counters, feature extractors) would not see them; with a hook the modules
        run as such.
        """
        return (
            x.device.type == "cpu"
            and (self.training or self.num_heads > 1)
            and not _hooked(self.conv1x1, *(getattr(self, name) for name in self.branch_names))
        )

    def _per_head_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Each head's maps from its own dense convolutions (the CPU path).

        Same parameters, maps, gradients and BatchNorm running statistics (and batch
        counts) as the grouped convolutions: every head's convolutions and
        BatchNorms run on chunks of the grouped weights and buffers. On CPU oneDNN
        runs dense convolutions faster than grouped ones, and one head's tensors
        stay in cache while it runs. In training on large enough batches the input
        goes channels-last first: there oneDNN's BatchNorm runs about 2x faster and
        its 1x1 and 1x3 convolutions 10-30% faster, which outweighs converting the
        weights on every call once a batch holds at least
        ``_CHANNELS_LAST_MIN_PIXELS`` pixels per channel (see
        ``benchmarks/heads_train.py`` and ``benchmarks/heads_inference.py``).
        """
        k = self.num_heads
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] >= _CHANNELS_LAST_MIN_PIXELS:
            x = x.contiguous(memory_format=torch.channels_last)
        reduce = _per_head_conv_bn(self.conv1x1, num_heads=k)
        branches = [_per_head_conv_bn(getattr(self, name), num_heads=k) for name in self.branch_names]
        maps = []
        for i in range(k):
            y = reduce(i, x)
            z = branches[0](i, y)
            for branch in branches[1:]:
                z = z + branch(i, y)
            maps.append(self.relu(z).sum(dim=1))
        return torch.stack(maps, dim=1)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scale ``x`` by each head's spatial map; optionally also return the maps."""
        maps = self.attention_map(x)
        if self.num_heads == 1:
            out = x * maps
        else:
            out = x.unsqueeze(1) * maps.unsqueeze(2)
        return (out, maps) if return_attention else out

    @torch.no_grad()
    def reparameterize(self) -> Self:
        """Fold the BatchNorms and merge the parallel branches into one convolution (eval only).

        The 1x1 convolution absorbs its BatchNorm; every branch absorbs its
        BatchNorm, is zero-padded to the largest kernel and all are summed into one
        grouped convolution ``conv_fused`` (all are linear before the ReLU). The
        output is unchanged up to float rounding. Idempotent.

        Returns:
            ``self``, modified in place.

        Raises:
            RuntimeError: in train mode (the running statistics would be wrong).
        """
        _require_eval(self)
        if self.is_reparameterized:
            return self
        if isinstance(self.conv1x1[1], nn.BatchNorm2d):
            _fold_in_place(self.conv1x1[0], self.conv1x1[1])
            self.conv1x1[1] = nn.Identity()
        kh = max(size[0] for size in self.kernel_sizes)
        kw = max(size[1] for size in self.kernel_sizes)
        first_conv: nn.Conv2d = getattr(self, self.branch_names[0])[0]
        fused = nn.Conv2d(
            first_conv.in_channels,
            first_conv.out_channels,
            (kh, kw),
            padding=(kh // 2, kw // 2),
            groups=self.num_heads,
            device=first_conv.weight.device,
            dtype=first_conv.weight.dtype,
        )
        fused_bias = cast(torch.Tensor, fused.bias)
        fused.weight.zero_()
        fused_bias.zero_()
        for name in self.branch_names:
            conv, bn = getattr(self, name)
            weight, bias = _folded(conv, bn)
            fused.weight.add_(DF.pad_kernel(weight, (kh, kw)))
            fused_bias.add_(bias)
            delattr(self, name)
        self.add_module(_FUSED_BRANCH, fused)
        self.branch_names = (_FUSED_BRANCH,)
        return self

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in_channels={self.in_channels}, num_heads={self.num_heads}, "
            f"hidden_channels={self.hidden_channels}, kernel_sizes={self.kernel_sizes}"
        )


class ChannelAttention(nn.Module):
    r"""Channel attention unit of DAN (paper Eq. 4, Fig. 4 right), for one or several heads.

    Global average pooling to a vector $p$, then a squeeze-and-excitation gate:

    $$g = \sigma\big(W_2\,\mathrm{ReLU}(\mathrm{BN}(W_1 p + b_1)) + b_2\big),\qquad y = p \odot g$$

    with $W_1: C \to C/r$ and $W_2: C/r \to C$, one pair per head.
    Initialisation as the authors: linear weights normal with std 0.001, zero biases.
    The submodule ``attention`` holds ``[linear, BatchNorm1d, ReLU, linear, Sigmoid]``,
    so a one-head state dict has the authors' keys (``attention.0``, ``.1``, ``.3``).

    Note:
        The BatchNorm1d cannot normalise a batch of one in train mode; such input
        raises a ``ValueError`` saying so (call ``.eval()`` for single samples).

    Args:
        in_channels: channels $C$.
        num_heads: heads $K$ computed together.
        reduction: width reduction $r$ of the gate (DAN: 16).
        validate: check inputs.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - x: $(B, C, H, W)$ (pooled) or $(B, C)$ for one head; $(B, K, C)$ for any $K$
        - output: $(B, C)$, or $(B, K, C)$ for a $(B, K, C)$ input
        - gate (``return_attention=True``): the output's shape

    Example:
        >>> ca = ChannelAttention(64)
        >>> out, gate = ca(torch.randn(2, 64, 7, 7), return_attention=True)
        >>> out.shape, bool(((gate > 0) & (gate < 1)).all())
        (torch.Size([2, 64]), True)
    """

    def __init__(
        self,
        in_channels: int = 512,
        *,
        num_heads: int = 1,
        reduction: int = 16,
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden = _reduced_width(in_channels, reduction, "reduction")
        check_positive("num_heads", num_heads)
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.reduction = reduction
        self.hidden_channels = hidden
        self.validate = validate
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.attention = nn.Sequential(
            _HeadwiseLinear(num_heads, in_channels, hidden, **fk),
            nn.BatchNorm1d(num_heads * hidden, **fk),
            nn.ReLU(),
            _HeadwiseLinear(num_heads, hidden, in_channels, **fk),
            nn.Sigmoid(),
        )
        self.reset_parameters()

    @property
    def is_reparameterized(self) -> bool:
        """Whether [`reparameterize`][dan_layers.ChannelAttention.reparameterize] has folded the BatchNorm."""
        return isinstance(self.attention[1], nn.Identity)

    def reset_parameters(self) -> None:
        """Re-initialise as the authors: normal(std=0.001) weights, zero biases, BN 1/0."""
        for module in self.attention:
            if isinstance(module, _HeadwiseLinear):
                nn.init.normal_(module.weight, std=0.001)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()

    def _gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """The sigmoid gate for pooled features ``(B, K, C)``."""
        squeeze, norm, act, excite, sigmoid = self.attention
        hidden = squeeze(pooled)
        hidden = norm(rearrange(hidden, "b k r -> b (k r)"))
        hidden = rearrange(act(hidden), "b (k r) -> b k r", k=self.num_heads)
        return sigmoid(excite(hidden))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Gate the pooled channels; optionally also return the gate."""
        if self.validate:
            if self.num_heads == 1:
                check_ndim(x, "x", (2, 3, 4), "(B, C), (B, 1, C) or (B, C, H, W)")
            else:
                check_ndim(x, "x", (3,), f"(B, K={self.num_heads}, C)")
            if x.ndim == 3:
                check_size(x, 1, self.num_heads, "x", "num_heads")
            check_size(x, x.ndim - 1 if x.ndim == 3 else 1, self.in_channels, "x", "in_channels")
            check_same_device(x=x, weights=cast(torch.Tensor, self.attention[0].weight))
            check_batchnorm_batch(x.shape[0], self.training, "ChannelAttention (BatchNorm1d)")
        pooled = x if x.ndim == 3 else DF.pool_features(x).unsqueeze(1)
        gate = self._gate(pooled)
        out = pooled * gate
        if x.ndim != 3:
            out, gate = out.squeeze(1), gate.squeeze(1)
        return (out, gate) if return_attention else out

    @torch.no_grad()
    def reparameterize(self) -> Self:
        """Fold the BatchNorm1d into the first linear layer (eval only). Idempotent.

        Returns:
            ``self``, modified in place.

        Raises:
            RuntimeError: in train mode.
        """
        _require_eval(self)
        if self.is_reparameterized:
            return self
        _fold_in_place(self.attention[0], self.attention[1])
        self.attention[1] = nn.Identity()
        return self

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in_channels={self.in_channels}, num_heads={self.num_heads}, "
            f"hidden_channels={self.hidden_channels}"
        )


def _merge_heads_into(target: nn.Module, sources: Sequence[nn.Module], what: str) -> None:
    """Load per-head modules' weights into the fused ``target`` (concatenated on dim 0)."""
    target_state = target.state_dict()
    merged = {}
    for i, source in enumerate(sources):
        if type(source) is not type(target) or getattr(source, "num_heads", None) != 1:
            raise ValueError(
                f"{what}[{i}]: expected a one-head {type(target).__name__}, got "
                f"{type(source).__name__} with num_heads={getattr(source, 'num_heads', None)}"
            )
        keys = set(source.state_dict())
        if keys != set(target_state):
            raise ValueError(
                f"{what}[{i}]: expected the keys of the block's {type(target).__name__} "
                f"(same kernel sizes and reparameterization state), missing "
                f"{sorted(set(target_state) - keys)}, unexpected {sorted(keys - set(target_state))}"
            )
    states = [source.state_dict() for source in sources]
    for key, value in target_state.items():
        parts = [state[key] for state in states]
        if value.ndim == 0:  # num_batches_tracked
            merged[key] = parts[0]
            continue
        merged[key] = torch.cat(parts, dim=0)
        if merged[key].shape != value.shape:
            raise ValueError(
                f"{what}: expected per-head {key} of shape {(value.shape[0] // len(parts), *value.shape[1:])}, "
                f"got {tuple(parts[0].shape)}"
            )
    target.load_state_dict(merged)


def _split_heads_from(source: nn.Module, heads: Sequence[nn.Module]) -> None:
    """Copy the fused ``source``'s weights, chunked on dim 0, into one-head modules."""
    states: list[dict[str, torch.Tensor]] = [{} for _ in heads]
    for key, value in source.state_dict().items():
        chunks = [value] * len(heads) if value.ndim == 0 else value.chunk(len(heads), dim=0)
        for state, chunk in zip(states, chunks, strict=True):
            state[key] = chunk
    for head, state in zip(heads, states, strict=True):
        head.load_state_dict(state)


class MultiHeadAttentionBlock(nn.Module):
    r"""DAN's multi-head cross attention network (MAN): $K$ spatial + channel attention heads.

    Every head applies spatial attention to the same feature map and then
    channel attention to the result (global average pooling and a gate), giving
    one $C$-vector per head:

    $$h_k = \mathrm{CA}_k\Big(\frac{1}{HW}\sum_{h,w} x \odot \mathrm{SA}_k(x)\Big),\qquad
      \text{output} = [h_1, \dots, h_K]$$

    The authors keep $K$ separate modules and loop over them; here the heads'
    parameters are held together (grouped convolutions, batched linear layers)
    and one einsum pools $x$ under the $K$ maps without forming $K$ scaled copies.
    On CUDA the grouped convolutions run as such; on CPU each head's
    convolutions run as dense ones on chunks of the same weights (channels-last
    when training on large batches), which oneDNN runs faster. The result
    equals the per-head computation;
    [`load_from_heads`][dan_layers.MultiHeadAttentionBlock.load_from_heads] and
    [`split_heads`][dan_layers.MultiHeadAttentionBlock.split_heads] convert between
    the two layouts.

    For deployment, [`reparameterize`][dan_layers.MultiHeadAttentionBlock.reparameterize]
    (eval mode) folds every BatchNorm and
    merges the 3x3, 1x3 and 3x1 branches into one 3x3 convolution per head,
    removing 40% of the branches' multiply-accumulates with the same output.

    Args:
        in_channels: channels $C$ of the input feature map (DAN: 512).
        num_heads: number of heads $K$ (DAN: 4).
        spatial_reduction: width reduction of the spatial 1x1 convolution (DAN: 2).
        channel_reduction: width reduction of the channel gate (DAN: 16).
        kernel_sizes: kernel sizes of the parallel spatial branches.
        validate: check inputs.
        device: parameter device.
        dtype: parameter dtype.

    Shape:
        - x: $(B, C, H, W)$
        - output: $(B, K, C)$
        - maps (``return_attention=True``): $(B, K, H, W)$

    Example:
        >>> block = MultiHeadAttentionBlock(64, num_heads=4)
        >>> heads, maps = block(torch.randn(2, 64, 7, 7), return_attention=True)
        >>> heads.shape, maps.shape
        (torch.Size([2, 4, 64]), torch.Size([2, 4, 7, 7]))
    """

    def __init__(
        self,
        in_channels: int = 512,
        num_heads: int = 4,
        *,
        spatial_reduction: int = 2,
        channel_reduction: int = 16,
        kernel_sizes: Sequence[tuple[int, int]] = DAN_KERNEL_SIZES,
        validate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.validate = validate
        self.spatial = SpatialAttention(
            in_channels,
            num_heads=num_heads,
            reduction=spatial_reduction,
            kernel_sizes=kernel_sizes,
            validate=False,
            device=device,
            dtype=dtype,
        )
        self.channel = ChannelAttention(
            in_channels,
            num_heads=num_heads,
            reduction=channel_reduction,
            validate=False,
            device=device,
            dtype=dtype,
        )

    @property
    def is_reparameterized(self) -> bool:
        """Whether [`reparameterize`][dan_layers.MultiHeadAttentionBlock.reparameterize] has been applied."""
        return self.spatial.is_reparameterized and self.channel.is_reparameterized

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Compute every head's feature vector; optionally also the spatial maps."""
        if self.validate:
            self.spatial._check_input(x)
            check_batchnorm_batch(x.shape[0], self.training, "MultiHeadAttentionBlock (BatchNorm1d)")
        maps = self.spatial.attention_map(x)
        heads = self.channel(DF.attention_pool(x, maps))
        return (heads, maps) if return_attention else heads

    def reparameterize(self) -> Self:
        """Fold BatchNorms and merge the spatial branches, in place (eval only). Idempotent.

        Returns:
            ``self``.

        Raises:
            RuntimeError: in train mode.
        """
        self.spatial.reparameterize()
        self.channel.reparameterize()
        return self

    def load_from_heads(
        self, spatial: Sequence[SpatialAttention], channel: Sequence[ChannelAttention]
    ) -> Self:
        """Copy the weights of $K$ one-head modules (the authors' layout) into this block.

        Args:
            spatial: $K$ one-head [`SpatialAttention`][dan_layers.SpatialAttention] modules.
            channel: $K$ one-head [`ChannelAttention`][dan_layers.ChannelAttention] modules.

        Returns:
            ``self``.

        Raises:
            ValueError: wrong number of heads, or modules of another configuration.
        """
        for what, modules in (("spatial", spatial), ("channel", channel)):
            if len(modules) != self.num_heads:
                raise ValueError(
                    f"{what}: expected {self.num_heads} per-head modules, got {len(modules)}"
                )
        _merge_heads_into(self.spatial, spatial, "spatial")
        _merge_heads_into(self.channel, channel, "channel")
        return self

    def split_heads(self) -> tuple[list[SpatialAttention], list[ChannelAttention]]:
        """Per-head copies of this block's weights as $K$ one-head modules (the authors' layout).

        The copies are in the block's train/eval mode and reparameterization state.

        Returns:
            ``(spatial_heads, channel_heads)``, two lists of length $K$.
        """
        first = next(self.parameters())
        device, dtype = first.device, first.dtype
        spatial = [
            SpatialAttention(
                self.in_channels,
                reduction=self.spatial.reduction,
                kernel_sizes=self.spatial.kernel_sizes,
                device=device,
                dtype=dtype,
            )
            for _ in range(self.num_heads)
        ]
        channel = [
            ChannelAttention(
                self.in_channels,
                reduction=self.channel.reduction,
                device=device,
                dtype=dtype,
            )
            for _ in range(self.num_heads)
        ]
        for heads, fused in ((spatial, self.spatial), (channel, self.channel)):
            for head in heads:
                if fused.is_reparameterized:
                    head.eval().reparameterize()
                head.train(fused.training)
            _split_heads_from(fused, heads)
        return spatial, channel

    def extra_repr(self) -> str:  # noqa: D102
        return f"in_channels={self.in_channels}, num_heads={self.num_heads}"

