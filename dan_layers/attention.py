r"""DAN's multi-head cross attention network (MAN): spatial and channel attention heads.

Paper: "Distract Your Attention: Multi-head Cross Attention Network for Facial
Expression Recognition", Sec. 3.2, Eq. 3-4, Fig. 4 (https://arxiv.org/abs/2109.07270).

The three units. Each takes ``num_heads`` and holds all heads in one set of
tensors (``dan_layers._headwise``), stacked head after head, so that with
``num_heads=1`` the state-dict keys and shapes are the authors' (``conv1x1.0``,
``conv_3x3.1``, ``attention.3`` ...). Folding for deployment is in
``dan_layers.deploy``, input checks in ``dan_layers._validation``.

One semantics: every unit runs its submodules as modules, on every device, in
eager mode, under ``torch.compile`` / ``torch.export`` and in a ``torch.fx``
graph, whatever hooks are set. A module swapped into a slot (``SyncBatchNorm``,
``GroupNorm``, a norm of your own) is computed as itself, and hooks fire once
per call with the same shapes everywhere. The only device-specific code is in
the grouped convolutions: on CPU each group runs as its own dense convolution
(oneDNN trains those faster), with the grouped convolution's result. Nothing
depends on the batch size or the memory format.

Departures from the paper, as in the authors' code: the spatial map is not
passed through a sigmoid (it is an unnormalised sum over channels of a ReLU
output), and the convolutions have biases.
"""

import operator
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import torch
from torch import nn
from typing_extensions import Self

from dan_layers._headwise import (
    FUSED_BRANCH,
    HeadwiseConv2d,
    HeadwiseLinear,
    as_heads,
    like_input,
    merge_heads_into,
    split_heads_from,
)
from dan_layers._tracing import NotScriptable, call_as, is_proxy, static_flag
from dan_layers._validation import (
    check_batchnorm_batch,
    check_feature_map,
    check_kernel_sizes,
    check_pooled_input,
    check_positive,
    has_training_batchnorm,
    reduced_width,
)

__all__ = ["DAN_KERNEL_SIZES", "ChannelAttention", "MultiHeadAttentionBlock", "SpatialAttention"]

#: The kernel sizes of DAN's parallel spatial-attention branches.
DAN_KERNEL_SIZES: tuple[tuple[int, int], ...] = ((3, 3), (1, 3), (3, 1))

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _reparameterize_in_place(module: ModuleT) -> ModuleT:
    """What the units' ``reparameterize()`` does: ``reparameterize_model(module, inplace=True)``."""
    from dan_layers.deploy import reparameterize_model  # deploy imports this module's classes

    return reparameterize_model(module, inplace=True)


class SpatialAttention(NotScriptable, nn.Module):
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

    The slots ``conv1x1`` and ``conv_<kh>x<kw>`` are ``nn.Sequential(conv, norm)``
    and ``relu`` is a module; all run as modules, so a norm swapped in (for
    example by ``nn.SyncBatchNorm.convert_sync_batchnorm``) is what is computed,
    and hooks on them fire once per call with all heads: ``(B, K * C', H, W)``.
    The output of ``forward`` (what a forward hook on this unit receives) is
    each head's spatially attended features, the target layer of the authors'
    Grad-CAM script.

    Args:
        in_channels: channels $C$ of the input feature map.
        num_heads: heads $K$, held together as grouped convolutions.
        reduction: width reduction $r$ of the 1x1 convolution (DAN: 2).
        kernel_sizes: ``(height, width)`` of each parallel branch, odd ints.
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
        hidden = reduced_width(in_channels, reduction, "reduction")
        check_positive("num_heads", num_heads)
        kernel_sizes = check_kernel_sizes(kernel_sizes)
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
            conv = HeadwiseConv2d(
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
        return self.branch_names == (FUSED_BRANCH,)

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

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial attention map of every head, before it scales the input.

        Runs the same submodules as ``forward`` (their hooks fire); hooks on the
        unit itself do not, since this is not ``forward``.

        Args:
            x: input feature map $(B, C, H, W)$.

        Returns:
            Maps $(B, K, H, W)$.
        """
        if self.validate and not is_proxy(x):
            weight = cast(torch.Tensor, self.conv1x1[0].weight)
            check_feature_map(x, self.in_channels, weight, has_training_batchnorm(self))
        y = self.conv1x1(x)
        z = getattr(self, self.branch_names[0])(y)
        for name in self.branch_names[1:]:
            z = z + getattr(self, name)(y)
        z = self.relu(z)
        per_head = z.unflatten(1, (self.num_heads, -1))  # b (k c) h w -> b k c h w
        return call_as(self, "maps", torch.sum, per_head, 2)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Scale ``x`` by each head's spatial map; optionally also return the maps."""
        maps = self.attention_map(x)
        if self.num_heads == 1:
            out = call_as(self, "attended", operator.mul, x, maps)
        else:
            out = call_as(self, "attended", operator.mul, x.unsqueeze(1), maps.unsqueeze(2))
        return (out, maps) if static_flag("return_attention", return_attention) else out

    def reparameterize(self) -> Self:
        """Fold the norms and merge the parallel branches into one convolution, in place (eval only).

        The 1x1 convolution absorbs its BatchNorm; every branch absorbs its
        BatchNorm, is zero-padded to the largest kernel and all are summed into one
        grouped convolution ``conv_fused`` (all are linear before the ReLU): the same
        output up to float rounding. Idempotent. Any BatchNorm with running statistics
        folds (``SyncBatchNorm`` included), ``Identity`` needs none; any other module
        in a slot is refused before anything changes. This is
        [`reparameterize_model`][dan_layers.reparameterize_model]`(self, inplace=True)`.

        Returns:
            ``self``, modified in place.

        Raises:
            RuntimeError: in train mode (the running statistics would be wrong).
            ValueError: a slot holds a module that cannot be folded (named in the message).
        """
        return _reparameterize_in_place(self)

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in_channels={self.in_channels}, num_heads={self.num_heads}, "
            f"hidden_channels={self.hidden_channels}, kernel_sizes={self.kernel_sizes}"
        )


class ChannelAttention(NotScriptable, nn.Module):
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
        hidden = reduced_width(in_channels, reduction, "reduction")
        check_positive("num_heads", num_heads)
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.reduction = reduction
        self.hidden_channels = hidden
        self.validate = validate
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.attention = nn.Sequential(
            HeadwiseLinear(num_heads, in_channels, hidden, **fk),
            nn.BatchNorm1d(num_heads * hidden, **fk),
            nn.ReLU(),
            HeadwiseLinear(num_heads, hidden, in_channels, **fk),
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
            if isinstance(module, HeadwiseLinear):
                nn.init.normal_(module.weight, std=0.001)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()

    def _gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """The sigmoid gate for pooled features ``(B, K, C)``: ``attention`` on the heads flattened."""
        gate = self.attention(pooled.flatten(1))  # b k c -> b (k c)
        return call_as(self, "gate", torch.unflatten, gate, 1, (self.num_heads, -1))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Gate the pooled channels; optionally also return the gate."""
        if self.validate and not is_proxy(x):
            check_pooled_input(x, self.num_heads, self.in_channels, next(self.parameters()))
            if has_training_batchnorm(self):
                check_batchnorm_batch(x.shape[0], True, "ChannelAttention (BatchNorm1d)")
        pooled = as_heads(x)
        gate = self._gate(pooled)
        out = call_as(self, "gated", like_input, pooled * gate, x)
        if static_flag("return_attention", return_attention):
            return out, like_input(gate, x)
        return out

    def reparameterize(self) -> Self:
        """Fold the BatchNorm1d into the first linear layer, in place (eval only). Idempotent.

        Any BatchNorm with running statistics folds (``SyncBatchNorm`` included); any
        other norm in ``attention[1]`` is refused before anything changes. This is
        [`reparameterize_model`][dan_layers.reparameterize_model]`(self, inplace=True)`.

        Returns:
            ``self``, modified in place.

        Raises:
            RuntimeError: in train mode.
            ValueError: ``attention[1]`` cannot be folded (named in the message).
        """
        return _reparameterize_in_place(self)

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"in_channels={self.in_channels}, num_heads={self.num_heads}, "
            f"hidden_channels={self.hidden_channels}"
        )


class MultiHeadAttentionBlock(NotScriptable, nn.Module):
    r"""DAN's multi-head cross attention network (MAN): $K$ spatial + channel attention heads.

    Every head applies spatial attention to the same feature map and then
    channel attention to the result (global average pooling and a gate), giving
    one $C$-vector per head:

    $$h_k = \mathrm{CA}_k\Big(\frac{1}{HW}\sum_{h,w} x \odot \mathrm{SA}_k(x)\Big),\qquad
      \text{output} = [h_1, \dots, h_K]$$

    The authors keep $K$ separate modules and loop over them; here the heads'
    parameters are held together (grouped convolutions, batched linear layers),
    and on CPU each grouped convolution runs its groups as dense convolutions,
    which oneDNN trains faster. The result equals the per-head computation;
    [`load_from_heads`][dan_layers.MultiHeadAttentionBlock.load_from_heads] and
    [`split_heads`][dan_layers.MultiHeadAttentionBlock.split_heads] convert between
    the two layouts.

    For deployment, [`reparameterize_model`][dan_layers.reparameterize_model] (eval mode)
    folds every BatchNorm and merges the 3x3, 1x3 and 3x1 branches into one 3x3
    convolution per head: 40% fewer multiply-accumulates in the branches, same output.

    Hooks: ``forward`` calls ``spatial`` and ``channel`` as modules. A forward
    hook on ``block.spatial`` receives every head's spatially attended features
    $x \odot \mathrm{SA}_k(x)$, $(B, K, C, H, W)$ (for $K = 1$: $(B, C, H, W)$,
    the authors' ``cat_head{i}.sa`` output): the target of Grad-CAM. When the
    block is called with ``return_attention=True`` that hook's output is the pair
    ``(attended, maps)``. A hook on ``block.channel`` sees the pooled heads
    $(B, K, C)$ in and the head features out.

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
        check_positive("num_heads", num_heads)
        reduced_width(in_channels, spatial_reduction, "spatial_reduction")
        reduced_width(in_channels, channel_reduction, "channel_reduction")
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.validate = validate
        fk: dict[str, Any] = {"num_heads": num_heads, "validate": False, "device": device, "dtype": dtype}
        self.spatial = SpatialAttention(
            in_channels, reduction=spatial_reduction, kernel_sizes=kernel_sizes, **fk
        )
        self.channel = ChannelAttention(in_channels, reduction=channel_reduction, **fk)

    @property
    def is_reparameterized(self) -> bool:
        """Whether [`reparameterize`][dan_layers.MultiHeadAttentionBlock.reparameterize] has been applied."""
        return self.spatial.is_reparameterized and self.channel.is_reparameterized

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Compute every head's feature vector; optionally also the spatial maps."""
        if self.validate and not is_proxy(x):
            weight = cast(torch.Tensor, self.spatial.conv1x1[0].weight)
            check_feature_map(x, self.in_channels, weight, has_training_batchnorm(self.spatial))
            if has_training_batchnorm(self.channel):
                check_batchnorm_batch(x.shape[0], True, "MultiHeadAttentionBlock (BatchNorm1d)")
        maps: torch.Tensor | None = None
        if static_flag("return_attention", return_attention):
            attended, maps = self.spatial(x, return_attention=True)
        else:
            attended = self.spatial(x)
        pooled = attended.mean(dim=(-2, -1))  # (b, k, c), or (b, c) for one head
        heads = self.channel(pooled if self.num_heads > 1 else pooled.unsqueeze(1))
        return (heads, maps) if maps is not None else heads

    def reparameterize(self) -> Self:
        """Fold BatchNorms and merge the spatial branches, in place (eval only). Idempotent.

        Both units are checked before either changes. This is
        [`reparameterize_model`][dan_layers.reparameterize_model]`(self, inplace=True)`.

        Returns:
            ``self``.

        Raises:
            RuntimeError: in train mode.
            ValueError: a slot holds a module that cannot be folded (named in the message).
        """
        return _reparameterize_in_place(self)

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
        merge_heads_into(self.spatial, spatial, "spatial")
        merge_heads_into(self.channel, channel, "channel")
        return self

    def split_heads(self) -> tuple[list[SpatialAttention], list[ChannelAttention]]:
        """Per-head copies of this block's weights as $K$ one-head modules (the authors' layout).

        The copies are in the block's train/eval mode and reparameterization state.

        Returns:
            ``(spatial_heads, channel_heads)``, two lists of length $K$.
        """
        first = next(self.parameters())
        fk: dict[str, Any] = {"device": first.device, "dtype": first.dtype}
        c, sa, ca = self.in_channels, self.spatial, self.channel
        spatial = split_heads_from(
            sa, lambda: SpatialAttention(c, reduction=sa.reduction, kernel_sizes=sa.kernel_sizes, **fk)
        )
        channel = split_heads_from(ca, lambda: ChannelAttention(c, reduction=ca.reduction, **fk))
        return spatial, channel

    def extra_repr(self) -> str:  # noqa: D102
        return f"in_channels={self.in_channels}, num_heads={self.num_heads}"

