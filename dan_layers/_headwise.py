"""Layers that hold K heads in one set of tensors, and conversion from and to per-head modules.

Parameters are stacked head after head along the output dimension, so that with
one head the layout (and the state-dict keys) are those of a plain ``nn.Conv2d``
or ``nn.Linear``, and the weights of K one-head modules (the authors' layout)
concatenate into a K-head module.

Axis legend: ``b`` batch, ``k`` heads, ``i`` / ``o`` input / output features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from dan_layers._tracing import fx_leaf

__all__: list[str] = []  # private module

ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: The name of the one convolution that re-parameterization merges a spatial unit's branches into.
FUSED_BRANCH = "conv_fused"


@fx_leaf
def headwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: Any,
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """A grouped ``F.conv2d``; on CPU each group runs as its own dense convolution.

    Same output and gradients: the weight, bias and input are split once (one
    ``chunk`` each, whose backward is one concatenation) and the groups' outputs
    concatenated. oneDNN trains dense convolutions about 20% faster than grouped
    ones on CPU (``benchmarks/heads_train.py``). One FX node, so that a traced graph
    picks the path by the device of its input, as the module does.
    """
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    biases: Sequence[torch.Tensor | None] = [None] * groups if bias is None else bias.chunk(groups)
    parts, weights = x.chunk(groups, dim=1), weight.chunk(groups)
    outputs = [
        F.conv2d(part, w, b, stride, padding, dilation, 1)
        for part, w, b in zip(parts, weights, biases, strict=True)
    ]
    return torch.cat(outputs, dim=1)


@fx_leaf
def as_heads(x: torch.Tensor) -> torch.Tensor:
    """A channel unit's input as heads ``(B, K, C)``: as it is, or pooled to ``(B, 1, C)``."""
    if x.ndim == 3:
        return x
    return (x.mean(dim=(2, 3)) if x.ndim == 4 else x).unsqueeze(1)


@fx_leaf
def like_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, K, C)`` in the layout of the channel unit's input ``x``: one head squeezed unless 3-D."""
    return t if x.ndim == 3 else t.squeeze(1)


class HeadwiseConv2d(nn.Conv2d):
    """A grouped ``nn.Conv2d`` (one group per head) that on CPU runs each group as a dense convolution.

    Same parameters, output and gradients as the grouped convolution (see
    ``headwise_conv2d``); on other devices the grouped convolution runs as it is.
    It is a ``Conv2d`` to hooks, FLOP counters and ``isinstance`` checks.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.groups == 1 or self.padding_mode != "zeros":
            return super().forward(x)
        return headwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class HeadwiseLinear(nn.Module):
    """``num_heads`` independent linear layers on head-major flattened features ``(B, K * in)``.

    ``weight`` is ``(K * out, in)`` and ``bias`` ``(K * out,)``, head after head, so
    that with one head the layout (and the computation) is that of ``torch.nn.Linear``.
    Input and output keep the heads flattened into the feature dimension, so the
    BatchNorm1d that follows normalises ``K * out`` channels as a plain (or
    synchronised) BatchNorm1d does.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.num_heads == 1:
            return F.linear(x, self.weight, self.bias)
        k = self.num_heads
        weight = self.weight.unflatten(0, (k, self.out_features))  # (k o) i -> k o i
        out = torch.einsum("bki,koi->bko", x.unflatten(1, (k, self.in_features)), weight)
        return out.flatten(1) + self.bias  # b k o -> b (k o)

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_heads={self.num_heads}, in_features={self.in_features}, out_features={self.out_features}"


def merge_heads_into(target: nn.Module, sources: Sequence[nn.Module], what: str) -> None:
    """Load K one-head modules' weights into the K-head ``target`` (concatenated on dim 0)."""
    num_heads = getattr(target, "num_heads", None)
    if len(sources) != num_heads:
        raise ValueError(f"{what}: expected {num_heads} per-head modules, got {len(sources)}")
    target_state = target.state_dict()
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
    merged = {}
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


def split_heads_from(source: ModuleT, make_head: Callable[[], ModuleT]) -> list[ModuleT]:
    """K one-head modules from ``make_head()`` holding the K-head ``source``'s weights (chunks of dim 0).

    The heads take ``source``'s train/eval mode and re-parameterization state.
    """
    heads = [make_head() for _ in range(cast(int, source.num_heads))]
    for head in heads:
        if source.is_reparameterized:
            head.eval().reparameterize()  # type: ignore[operator]
        head.train(source.training)
    states: list[dict[str, torch.Tensor]] = [{} for _ in heads]
    for key, value in source.state_dict().items():
        chunks = [value] * len(heads) if value.ndim == 0 else value.chunk(len(heads), dim=0)
        for state, chunk in zip(states, chunks, strict=True):
            state[key] = chunk
    for head, state in zip(heads, states, strict=True):
        head.load_state_dict(state)
    return heads
